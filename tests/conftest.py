"""Shared fixtures: tiny config-built models of every supported family (hidden 32, 8 experts)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
# fedmoe's cache defaults to the user's ($XDG_CACHE_HOME/fedmoe): tests never write there.
# FEDMOE_TEST_CACHE shares the pretrained smoke base model between checkouts.
if os.environ.get("FEDMOE_TEST_CACHE"):
    TEST_CACHE = Path(os.environ["FEDMOE_TEST_CACHE"])
else:
    TEST_CACHE = Path(tempfile.mkdtemp(prefix="fedmoe-cache-"))
    atexit.register(shutil.rmtree, TEST_CACHE, ignore_errors=True)
os.environ["FEDMOE_CACHE"] = str(TEST_CACHE)

_COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_hidden_layers=3,
               max_position_embeddings=64, tie_word_embeddings=False)

TINY_FAMILIES: dict[str, dict] = {
    "qwen2_moe": dict(_COMMON, intermediate_size=64, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32, num_key_value_heads=2, num_experts=8,
                      num_experts_per_tok=2, mlp_only_layers=[0]),
    "qwen3_moe": dict(_COMMON, intermediate_size=64, moe_intermediate_size=16, head_dim=8,
                      num_key_value_heads=2, num_experts=8, num_experts_per_tok=2),
    "olmoe": dict(_COMMON, intermediate_size=16, num_key_value_heads=2, num_experts=8,
                  num_experts_per_tok=2),
    "mixtral": dict(_COMMON, intermediate_size=16, num_key_value_heads=2, num_local_experts=8,
                    num_experts_per_tok=2),
    "deepseek_v3": dict(_COMMON, intermediate_size=64, moe_intermediate_size=16,
                        num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, n_group=2,
                        topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8),
    "granitemoeshared": dict(_COMMON, intermediate_size=16, shared_intermediate_size=32,
                             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2),
}


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny model of ``family`` (deterministic for a seed)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **(TINY_FAMILIES[family] | overrides))
    model = AutoModelForCausalLM.from_config(config)
    if family == "deepseek_v3":
        # A non-zero correction bias, so tests see it matter for routing.
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(params=sorted(TINY_FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def fedmoe_cache():
    """One cache (corpus, pretrained smoke base model) for the whole test session."""
    return TEST_CACHE


@pytest.fixture(scope="session")
def smoke_run(fedmoe_cache, tmp_path_factory) -> Path:
    """One real ``fedmoe simulate experiment=smoke`` run (a few tens of seconds), shared by
    the session: its run dir holds ``results.json`` and each client's exported model."""
    from fedmoe.cli import main as fedmoe_main

    run_dir = tmp_path_factory.mktemp("smoke_run")
    fedmoe_main(["simulate", "experiment=smoke", f"cache_dir={fedmoe_cache}",
                 f"hydra.run.dir={run_dir}"])
    return run_dir


@pytest.fixture(scope="session")
def pruned_run(fedmoe_cache, tmp_path_factory) -> tuple[Path, str]:
    """A real ``fedmoe simulate experiment=smoke prune.keep=0.5`` (2 clients, 2 rounds) in a
    fresh interpreter: its run dir and what it printed."""
    import subprocess
    import sys

    run_dir = tmp_path_factory.mktemp("pruned_run")
    env = os.environ | {"FEDMOE_CACHE": str(fedmoe_cache), "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "fedmoe.cli", "simulate", "experiment=smoke", "prune.keep=0.5",
         "data.num_clients=2", "fl.min_train_nodes=2", "fl.min_evaluate_nodes=2",
         "fl.min_available_nodes=2", f"hydra.run.dir={run_dir}"],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run_dir, proc.stdout
