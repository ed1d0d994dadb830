"""Personal state: atomic writes, clear errors, and a client restart resumes bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fedmoe.artifacts import ClientMeta
from fedmoe.client.state import PersonalStateError, PersonalStore
from tests.helpers.runs import FAST, child_env


def test_save_load_round_trip(tmp_path):
    store = PersonalStore(tmp_path / "c0")
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    store.save(tensors, ClientMeta(rounds=2))
    loaded, meta = store.load()
    assert meta == ClientMeta(rounds=2)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert sorted(os.listdir(tmp_path / "c0")) == ["meta.json", "personal.safetensors"]


def test_no_state_is_none_and_corrupt_state_names_the_file(tmp_path):
    store = PersonalStore(tmp_path)
    assert store.load() is None
    store.save({"a": torch.ones(2)}, ClientMeta(rounds=1))
    store.tensors_path.write_bytes(store.tensors_path.read_bytes()[:20])  # truncated
    with pytest.raises(PersonalStateError, match="personal.safetensors"):
        store.load()


def test_failed_write_keeps_the_last_good_state(tmp_path, monkeypatch):
    store = PersonalStore(tmp_path)
    store.save({"a": torch.ones(2)}, ClientMeta(rounds=1))
    import fedmoe.client.state as state

    def boom(path, data):  # the tensors file is written with Path.write_bytes
        with open(path, "wb") as f:
            f.write(data[:7])
        raise OSError("disk full")

    monkeypatch.setattr(state.Path, "write_bytes", boom)
    with pytest.raises(OSError, match="disk full"):
        store.save({"a": torch.zeros(2)}, ClientMeta(rounds=2))
    tensors, meta = PersonalStore(tmp_path).load()
    assert meta.rounds == 1 and torch.equal(tensors["a"], torch.ones(2))
    # No temporary file left; the state being replaced was kept as the previous one
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "meta.prev.json",
                                            "personal.prev.safetensors", "personal.safetensors"]


_CLIENT = textwrap.dedent("""
    import json, sys, hashlib
    import numpy as np
    from fedmoe.fl.bridge import compose
    from fedmoe.client.local import LocalClient
    cfg = compose(json.loads(sys.argv[1]))
    client = LocalClient(cfg, 1, cfg.fl.base_model, sys.argv[2])
    if sys.argv[3] == "fit":
        client.fit({}, server_round=1)
    else:
        client.assemble({})
    digest = {n: hashlib.sha256(t.numpy().tobytes()).hexdigest()
              for n, t in client.personal_tensors().items()}
    print(json.dumps(digest))
""")


@pytest.mark.slow
def test_client_restart_resumes_personal_experts_bit_for_bit(tmp_path, fedmoe_cache, smoke_base):
    # Prepare: the smoke settings on their base model
    env = child_env(fedmoe_cache)
    overrides = json.dumps([*FAST, f"cache_dir={fedmoe_cache}", f"fl.base_model={smoke_base}"])
    state = tmp_path / "client_0001"

    def run(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", _CLIENT, overrides, str(state), mode],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    # Execute: one process trains and exits; a fresh process rebuilds the client
    trained = run("fit")
    restarted = run("assemble")
    # Assert: the routed experts the new process holds are the trained ones, bit for bit
    assert trained and restarted == trained
    assert all(".mlp.experts." in name for name in trained)


@pytest.mark.parametrize(("key", "value"), [("rounds", "7"), ("kept", {"0": ["x"]}),
                                            ("kept", [1, 2]), ("expert_counts", None),
                                            ("last_round", True)])
def test_a_meta_json_of_the_wrong_types_falls_back_to_the_previous_state(tmp_path, key, value):
    # Prepare: two good saves, then the current meta.json rewritten with one mistyped key
    # (its state id and checksum left as they were, as a hand edit would)
    store = PersonalStore(tmp_path)
    store.save({"a": torch.ones(2)}, ClientMeta(rounds=1, last_round=1))
    store.save({"a": torch.zeros(2)}, ClientMeta(rounds=2, last_round=2))
    data = json.loads(store.meta_path.read_text())
    store.meta_path.write_text(json.dumps(data | {key: value}))
    # Execute
    tensors, meta = store.load()
    # Assert: the last good state, not a TypeError in the middle of a round
    assert meta == ClientMeta(rounds=1, last_round=1) and torch.equal(tensors["a"], torch.ones(2))
