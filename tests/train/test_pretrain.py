"""`fedmoe pretrain`: a reusable, hash-addressed base checkpoint that plain HF code loads."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmoe.checkpoints import load_model
from fedmoe.data import DOMAINS, load_data
from fedmoe.moe.models import count_parameters
from fedmoe.train.pretrain import (
    SUMMARY_FILE,
    base_checkpoint_dir,
    ensure_base_model,
    tokenizer_texts,
)
from tests.helpers.runs import child_env

pytestmark = pytest.mark.slow

# The pretrained smoke base model's perplexity is at least this factor below the unigram
# model's on every domain (the README: the base model must be far below it).
UNIGRAM_FACTOR = 1.2

SAMPLE_TEXT = "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n"

# Runs in a fresh interpreter: only torch and transformers, never fedmoe.
PLAIN_HF_SCRIPT = """
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

checkpoint, text, out = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(checkpoint)
model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
ids = tokenizer(text, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(input_ids=ids, use_cache=False).logits
assert "fedmoe" not in sys.modules, "the plain HF load imported fedmoe"
torch.save({"ids": ids, "logits": logits, "decoded": tokenizer.decode(ids[0])}, out)
"""


def _subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without fedmoe's cache or import path (a plain HF user's), offline."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "FEDMOE_CACHE"}}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def _mtimes(directory) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.iterdir())}


def test_checkpoint_is_a_complete_hf_directory_named_by_hash(smoke_pretrain):
    # Prepare
    cfg, checkpoint = smoke_pretrain.cfg, smoke_pretrain.checkpoint

    # Execute
    files = {p.name for p in checkpoint.iterdir()}

    # Assert
    assert checkpoint.parent == Path(cfg.cache_dir) / "base"
    assert re.fullmatch(rf"{cfg.model.name}-[0-9a-f]{{12}}", checkpoint.name)
    assert {"config.json", "model.safetensors", "tokenizer.json", SUMMARY_FILE} <= files
    assert base_checkpoint_dir(cfg) == checkpoint
    # The atomic save leaves no temporary sibling behind.
    assert not [p.name for p in checkpoint.parent.iterdir() if p.name.startswith(".")]


def test_plain_transformers_load_matches_fedmoe_load(smoke_pretrain, tmp_path):
    # Prepare
    out = tmp_path / "plain_hf.pt"
    command = [sys.executable, "-c", PLAIN_HF_SCRIPT, str(smoke_pretrain.checkpoint),
               SAMPLE_TEXT, str(out)]

    # Execute
    proc = subprocess.run(command, cwd=tmp_path, env=_subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    plain = torch.load(out)
    model = load_model(smoke_pretrain.cfg.model, checkpoint=smoke_pretrain.checkpoint).eval()
    with torch.no_grad():
        logits = model(input_ids=plain["ids"], use_cache=False).logits

    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert plain["decoded"] == SAMPLE_TEXT  # byte-level BPE round-trips
    assert plain["ids"].shape[1] > 5
    assert logits.dtype == torch.float32
    assert logits.shape == (1, plain["ids"].shape[1], model.config.vocab_size)
    assert logits.std() > 0.1  # trained weights, not a constant output
    torch.testing.assert_close(logits, plain["logits"], atol=1e-5, rtol=0)


def test_second_call_reuses_checkpoint_without_training(smoke_pretrain):
    # Prepare
    before = _mtimes(smoke_pretrain.checkpoint)
    cfg = smoke_pretrain.compose()  # composed afresh: the hash must be stable

    # Execute
    again = ensure_base_model(cfg, progress=False)

    # Assert: the same files, none written again
    assert again == smoke_pretrain.checkpoint
    assert _mtimes(again) == before


@pytest.mark.parametrize("override", [
    "pretraining.seed=1",
    "pretraining.steps=121",
    "pretraining.lr=1e-3",
    "model.config.num_experts=8",
    "data.max_mb_per_domain=0.25",
    "data.block_size=32",
])
def test_weight_changing_config_gets_another_dir(smoke_pretrain, override):
    # Execute
    other = base_checkpoint_dir(smoke_pretrain.compose(override))

    # Assert
    assert other != smoke_pretrain.checkpoint
    assert other.parent == smoke_pretrain.checkpoint.parent


@pytest.mark.parametrize("override", [
    "seed=1",  # the run's seed: a seed sweep shares one base model
    "pretraining.threads=1",
    "model.experts_implementation=eager",
    "data.num_clients=3",
    "data.partition=iid",
    "data.cache_dir=/elsewhere",
])
def test_runtime_and_partition_keys_keep_the_dir(smoke_pretrain, override):
    # Execute
    same = base_checkpoint_dir(smoke_pretrain.compose(override))

    # Assert
    assert same == smoke_pretrain.checkpoint


def test_user_checkpoint_skips_pretraining(smoke_pretrain, tmp_path):
    # Prepare: a user's checkpoint directory (its config is all that is read)
    (tmp_path / "mine").mkdir()
    shutil.copy(smoke_pretrain.checkpoint / "config.json", tmp_path / "mine" / "config.json")
    cfg = smoke_pretrain.compose(f"model.path={tmp_path / 'mine'}")
    base = smoke_pretrain.checkpoint.parent
    before = sorted(base.iterdir())

    # Execute
    checkpoint = ensure_base_model(cfg, progress=False)

    # Assert
    assert checkpoint == tmp_path / "mine"
    assert sorted(base.iterdir()) == before


def test_summary_has_model_and_unigram_ppl_per_domain(smoke_pretrain):
    # Prepare
    cfg = smoke_pretrain.cfg
    vocab_size = cfg.pretraining.vocab_size
    block = cfg.data.block_size

    # Execute
    summary = json.loads((smoke_pretrain.checkpoint / SUMMARY_FILE).read_text())
    model = load_model(cfg.model, checkpoint=smoke_pretrain.checkpoint)

    # Assert: a uniform guess over the vocabulary has perplexity vocab_size; the unigram
    # model beats it, and the base model beats the unigram model on every domain by at least
    # UNIGRAM_FACTOR (seeds 0-2 of the smoke pretraining: 1.25-1.29 on the weakest domain)
    assert list(summary["domains"]) == list(DOMAINS)
    for domain, r in summary["domains"].items():
        assert 1 < r["ppl"] < r["unigram_ppl"] < vocab_size, domain
        assert r["unigram_ppl"] > UNIGRAM_FACTOR * r["ppl"], (domain, r)
        assert r["tokens"] == cfg.pretraining.eval_blocks_per_domain * (block - 1), domain
    assert summary["overall"]["tokens"] == sum(r["tokens"] for r in summary["domains"].values())
    ppls = [r["ppl"] for r in summary["domains"].values()]
    assert min(ppls) <= summary["overall"]["ppl"] <= max(ppls)
    assert summary["steps"] == cfg.pretraining.steps
    assert summary["tokens_seen"] == cfg.pretraining.steps * cfg.pretraining.batch_size * block
    assert summary["parameters"] == count_parameters(model)
    assert summary["vocab_size"] == model.config.vocab_size == vocab_size
    assert math.isfinite(summary["final_train_loss"])
    assert 0 < summary["train_seconds"] < summary["wall_seconds"]


def test_tokenizer_text_is_a_seeded_mix_capped_in_mb(smoke_pretrain):
    # Prepare
    train = load_data(smoke_pretrain.cfg.data)["train"]
    domain_of = dict(zip(train["text"], train["domain"], strict=False))

    # Execute
    texts = tokenizer_texts(train, max_mb=0.2, seed=0)
    again = tokenizer_texts(train, max_mb=0.2, seed=0)
    other_seed = tokenizer_texts(train, max_mb=0.2, seed=1)

    # Assert
    sizes = [len(t.encode("utf-8")) for t in texts]
    assert sum(sizes) >= 0.2e6 > sum(sizes[:-1])
    assert texts == again
    assert texts != other_seed
    assert {domain_of[t] for t in texts} == set(DOMAINS)


def test_cli_prints_table_and_copies_summary(smoke_pretrain, tmp_path):
    # Prepare: the same config through the real CLI, cache_dir from $FEDMOE_CACHE.
    run_dir = tmp_path / "run"
    cache = Path(smoke_pretrain.cfg.cache_dir)
    command = [sys.executable, "-m", "fedmoe.cli", "pretrain", *smoke_pretrain.overrides,
               f"hydra.run.dir={run_dir}"]

    # Execute
    proc = subprocess.run(command, cwd=tmp_path, env=child_env(cache), capture_output=True,
                          text=True, timeout=300)

    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reused" in proc.stdout
    for name in (*DOMAINS, "overall", "unigram ppl"):
        assert name in proc.stdout, name
    assert f"base checkpoint: {smoke_pretrain.checkpoint}" in proc.stdout
    copied = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert copied == json.loads((smoke_pretrain.checkpoint / SUMMARY_FILE).read_text())


def test_cli_reuses_the_user_cache_from_any_working_directory(smoke_pretrain, tmp_path):
    # Prepare: $XDG_CACHE_HOME/fedmoe is the tests' cache (no $FEDMOE_CACHE, no cache_dir=);
    # two unrelated working directories.
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    (xdg / "fedmoe").symlink_to(Path(smoke_pretrain.cfg.cache_dir), target_is_directory=True)
    expected = xdg / "fedmoe" / "base" / smoke_pretrain.checkpoint.name
    env = _subprocess_env(XDG_CACHE_HOME=str(xdg))
    if os.environ.get("PYTHONPATH"):  # a checkout run from its own tree, not the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    outputs = []

    # Execute
    for cwd in (tmp_path / "a", tmp_path / "b" / "c"):
        cwd.mkdir(parents=True)
        command = [sys.executable, "-m", "fedmoe.cli", "pretrain", *smoke_pretrain.overrides,
                   "seed=7", f"hydra.run.dir={cwd / 'run'}"]
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)
        outputs.append(proc)

    # Assert: both reuse the one checkpoint (nothing pretrained, whatever the run seed)
    for proc in outputs:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "reused the saved checkpoint" in proc.stdout
        assert f"base checkpoint: {expected}" in proc.stdout
    assert not list(tmp_path.rglob(".cache"))


def test_runs_started_together_pretrain_once(smoke_pretrain, tmp_path):
    # Prepare: a cache of this test's own (so no earlier session trained it; FEDMOE_TEST_CACHE
    # may persist), holding the built corpus; 6 steps, a base nobody trained yet
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "corpus").symlink_to(Path(smoke_pretrain.cfg.cache_dir) / "corpus",
                                  target_is_directory=True)
    overrides = [*smoke_pretrain.overrides, f"cache_dir={cache}", "pretraining.steps=6"]

    # Execute: two `fedmoe pretrain` at once
    procs = [subprocess.Popen([sys.executable, "-m", "fedmoe.cli", "pretrain", *overrides,
                               f"hydra.run.dir={tmp_path / str(i)}"],
                              env=child_env(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]

    # Assert: one trained it, the other waited and reused it
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
    stdout = [out for out, _ in outputs]
    assert sorted("pretrained now" in out for out in stdout) == [False, True]
    assert sum("reused the saved checkpoint" in out for out in stdout) == 1
    checkpoints = {re.search(r"base checkpoint: (\S+)", out).group(1) for out in stdout}
    assert len(checkpoints) == 1
