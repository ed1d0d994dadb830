"""`fedmoe inspect` on every family, and presets loading a local checkpoint via model.path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmoe.checkpoints import load_model
from fedmoe.compose import compose
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.families import ROLES
from fedmoe.moe.inspect import role_table
from tests.helpers.models import tiny_model

PRESETS = ["tiny", "tiny_olmoe", "tiny_qwen3_moe", "tiny_mixtral", "tiny_deepseek_v3",
           "tiny_granitemoeshared"]
REAL = ["olmoe_1b_7b", "qwen1_5_moe_a2_7b", "deepseek_v3_style", "qwen3_30b_a3b"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedmoe.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_inspect_prints_and_writes_the_role_table_for_all_six_families(tmp_path):
    # One process, a Hydra sweep over the presets (one run directory each)
    proc = _run("inspect", "-m", f"model={','.join(PRESETS)}", f"hydra.sweep.dir={tmp_path}",
                "hydra.sweep.subdir=${model.name}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    families = set()
    for preset in PRESETS:
        table = json.loads((tmp_path / preset / "inspect.json").read_text())
        families.add(table["family"])
        assert "routed_experts" in proc.stdout and "total" in proc.stdout
        total = sum(table["total"][r]["params"] for r in ROLES)
        assert total == table["total_params"] > 0
        assert table["total"]["router"]["tensors"] == len(table["moe_layers"])
        layer = str(table["moe_layers"][0])
        assert table["layers"][layer]["routed_experts"]["tensors"] == 2
    assert len(families) == 6


def test_role_table_sums_to_the_model_size(family):
    model = tiny_model(family)
    table = role_table(model)
    assert table["total_params"] == sum(p.numel() for p in model.parameters())
    per_layer = sum(v[r]["params"] for v in table["layers"].values() for r in ROLES)
    assert per_layer == table["total_params"]


@pytest.mark.parametrize("preset", REAL)
def test_real_presets_load_a_local_checkpoint_with_the_same_code(preset, tmp_path):
    # Prepare: the preset's family, saved locally from a config-built tiny model
    cfg = compose("inspect", [f"model={preset}"])
    family = cfg.model.family
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "ckpt")
    # Execute: the same preset, pointed at the local directory
    cfg = compose("inspect", [f"model={preset}", f"model.path={tmp_path / 'ckpt'}",
                              "model.dtype=float32"])
    loaded = load_model(cfg.model)
    # Assert
    assert loaded.config.model_type == family
    assert MoEAdapter(loaded).roles() == MoEAdapter(model).roles()
    if preset == REAL[0]:  # and through the CLI, once
        proc = _run("inspect", f"model={preset}", f"model.path={tmp_path / 'ckpt'}",
                    f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((tmp_path / "out" / "inspect.json").read_text())["family"] == family


def test_wrong_family_for_a_checkpoint_names_the_key(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model.family"):
        load_model({"family": "olmoe", "path": str(tmp_path), "dtype": "float32"})


def test_top_k_above_experts_names_the_key():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        load_model({"family": "olmoe", "config": {"num_experts": 4, "num_experts_per_tok": 8,
                                                  "hidden_size": 32, "num_attention_heads": 4,
                                                  "intermediate_size": 16}})
