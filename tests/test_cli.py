"""`fedmoe` as a user types it: help, version, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmoe import __version__
from fedmoe.cli import COMMANDS, command_help, main, parse_command


def fedmoe(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """``fedmoe <args>`` in a fresh interpreter (offline, as in CI)."""
    return subprocess.run([sys.executable, "-m", "fedmoe.cli", *args], cwd=cwd,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"} | env,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_every_command_on_one_line_each(capsys):
    main(["--help"])
    printed = capsys.readouterr().out
    for name, command in COMMANDS.items():
        lines = [line for line in printed.splitlines() if line.strip().startswith(f"{name} ")]
        assert len(lines) == 1 and command.summary in lines[0], name
    assert {"edge generate", "edge bench", "analyze"} <= set(COMMANDS)


def test_version(capsys):
    main(["--version"])
    assert capsys.readouterr().out.strip() == f"fedmoe {__version__}"
    assert __version__ == "0.1.0"  # pyproject.toml's


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help_naming_fedmoe_and_its_groups(name, capsys):
    # Execute: the way a user types it (`fedmoe edge generate --help`)
    main([*name.split(), "--help"])
    printed = capsys.readouterr().out

    # Assert: fedmoe's header, not Hydra's app; the groups of this command only
    assert printed.startswith(f"fedmoe {name}: {COMMANDS[name].summary}")
    assert "powered by Hydra" not in printed
    groups = printed.split("config groups")[1].split("config (")[0] if "config groups" in \
        printed else ""
    if name in ("simulate", "pretrain", "prune", "analyze"):
        assert "  model " in groups and "tiny_olmoe" in groups
    if name.startswith("edge"):
        assert "  edge " in groups and "  model " not in groups
    if name == "report":
        assert groups == "" and "sweep_dir: ???" in printed
        assert f"usage: fedmoe {name} <sweep dir>" in printed


def test_help_applies_overrides_to_the_shown_config():
    shown = command_help("simulate", ["experiment=smoke", "fl.num_rounds=7"])
    assert "num_rounds: 7" in shown
    assert re.search(r"\n  experiment +smoke, demo, research\n", shown)  # in use first


def test_edge_alone_lists_its_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["edge", "--help"])
    printed = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "edge generate" in printed and "edge bench" in printed


@pytest.mark.parametrize("argv, message", [
    (["edge", "genrate"], "unknown command 'edge genrate'"),
    (["frobnicate"], "unknown command 'frobnicate'; one of: pretrain, inspect, simulate, prune, "
                     "edge generate, edge bench, export gguf, analyze, report"),
])
def test_unknown_commands_name_the_real_ones(argv, message):
    with pytest.raises(SystemExit) as exit_:
        parse_command(argv)
    assert message in str(exit_.value.code)


def _one_line_error(proc: subprocess.CompletedProcess, prefix: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr
    return lines[0]


def test_hub_id_offline_is_one_line(tmp_path):
    proc = fedmoe("inspect", "model=olmoe_1b_7b", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    line = _one_line_error(proc, "fedmoe inspect: model.path='allenai/OLMoE-1B-7B-0924'")
    assert "hf download allenai/OLMoE-1B-7B-0924" in line


def test_simulate_with_hub_id_offline_fails_before_starting_ray(tmp_path):
    proc = fedmoe("simulate", "experiment=smoke", "model=olmoe_1b_7b",
                  f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    _one_line_error(proc, "fedmoe simulate: model.path='allenai/OLMoE-1B-7B-0924'")
    assert not (tmp_path / "flower_app").exists()


def test_missing_local_model_path_is_one_line(tmp_path):
    proc = fedmoe("inspect", f"model.path={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path}",
                  cwd=tmp_path)
    _one_line_error(proc, f"fedmoe inspect: model.path='{tmp_path / 'nope'}' does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("command", ["prune", "analyze"])
def test_prune_and_analyze_run_on_the_configured_device(tmp_path, command):
    # Both load through the one loader on `device`; a device that is not there is refused
    # before any work (no pretraining, nothing written).
    proc = fedmoe(command, "device=cuda", f"cache_dir={tmp_path / 'cache'}",
                  f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    line = _one_line_error(proc, f"fedmoe {command}: device='cuda': no CUDA device")
    assert "device=auto or cpu" in line
    assert not (tmp_path / "cache").exists()


def _run_dir(path: Path, ppl: float, seed: int = 0) -> Path:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({
        "rounds": [{"round": 1, "train_loss": 3.0, "bytes_up": 10, "bytes_down": 20}],
        "clients": {"0": {"final_ppl": ppl, "base_ppl": 2 * ppl}},
        "config": {"seed": seed}}))
    return path


def test_report_follows_a_folder_of_symlinks(tmp_path):
    # Prepare: two runs made elsewhere, gathered by links (one of them through a link to
    # the folder's own parent, which must not loop)
    a, b = _run_dir(tmp_path / "runs" / "a", 10.0), _run_dir(tmp_path / "runs" / "b", 30.0, seed=1)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "seed=0").symlink_to(a, target_is_directory=True)
    (sweep / "seed=1").symlink_to(b, target_is_directory=True)
    (sweep / "loop").symlink_to(sweep, target_is_directory=True)

    # Execute
    proc = fedmoe("report", str(sweep), cwd=tmp_path)

    # Assert: both runs, one setting, mean 20 over the two seeds
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 2 (seed 0,1) | 20.00 ± 14.14 |" in proc.stdout


@pytest.mark.parametrize("make, prefix", [
    (lambda d: (d / "job").symlink_to(d / "gone"), "fedmoe report: {d}/job is a broken link"),
    (lambda d: _run_dir(d / "job", 1.0).joinpath("results.json").write_text("{"),
     "fedmoe report: cannot read the run in {d}/job"),
    (lambda d: None, "fedmoe report: no results.json under {d}"),
])
def test_report_on_a_bad_folder_is_one_line(tmp_path, make, prefix):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    make(sweep)
    _one_line_error(fedmoe("report", str(sweep), cwd=tmp_path), prefix.format(d=sweep))


def test_report_on_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    _one_line_error(fedmoe("report", str(tmp_path / "f"), cwd=tmp_path),
                    f"fedmoe report: sweep dir '{tmp_path / 'f'}' is not a directory")
