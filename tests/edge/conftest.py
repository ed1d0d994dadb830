"""Fixtures of the edge tests: offloaded tiny models of every family, a tiny checkpoint dir."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fedmoe.edge import ExpertStore
from tests.helpers.edge import greedy
from tests.helpers.models import tiny_model

PROMPT = torch.tensor([[5, 17, 42, 8, 63, 21, 9, 30]])
NEW_TOKENS = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny ops under a busy CPU otherwise wait on OpenMP barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(family)``: (in-memory eager model, its greedy output, a built store)."""
    made = {}

    def _make(family: str):
        if family not in made:
            model = tiny_model(family)
            model.set_experts_implementation("eager")
            store = ExpertStore.build(model, tmp_path_factory.mktemp(f"store_{family}"))
            made[family] = (model, greedy(model), store)
        return made[family]

    return _make


@pytest.fixture
def offloadable(reference):
    """``offloadable(family)``: a fresh copy of the reference model, its output and store."""
    def _make(family: str):
        model, expected, store = reference(family)
        return copy.deepcopy(model), expected, ExpertStore(store.directory)

    return _make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved qwen2_moe tiny model and a byte-level BPE tokenizer of matching vocabulary."""
    from fedmoe.data import train_tokenizer

    directory = tmp_path_factory.mktemp("tiny_checkpoint")
    texts = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"] * 20
    tokenizer = train_tokenizer(texts, vocab_size=300)
    model = tiny_model("qwen2_moe", vocab_size=len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
