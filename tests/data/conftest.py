"""Session fixtures for the data tests: the smoke corpus of the session cache, a tiny
tokenizer."""

from __future__ import annotations

import datasets
import pytest

from fedmoe.data import build_corpus, train_tokenizer

SMALL_MB = 0.5


@pytest.fixture(scope="session", autouse=True)
def _quiet_datasets():
    datasets.disable_progress_bars()


@pytest.fixture(scope="session")
def corpus_cache(fedmoe_cache) -> str:
    """Where ``experiment=smoke`` keeps its corpus (``data.cache_dir: ${cache_dir}/corpus``)."""
    return str(fedmoe_cache / "corpus")


@pytest.fixture(scope="session")
def small_corpus(corpus_cache) -> datasets.DatasetDict:
    """The embedded corpus at 0.5 MB per domain (about 1,200 rows)."""
    return build_corpus(max_mb_per_domain=SMALL_MB, cache_dir=corpus_cache)


@pytest.fixture(scope="session")
def tiny_tokenizer(small_corpus):
    """A 512-token byte-level BPE fitted on 300 train rows (a fraction of a second)."""
    return train_tokenizer(small_corpus["train"]["text"][:300], vocab_size=512)
