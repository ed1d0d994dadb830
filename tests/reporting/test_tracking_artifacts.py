"""W&B artifacts of a run, logged by a real offline W&B run: the report, and opt-in exports."""

from __future__ import annotations

import json
import re

import pytest

from fedmoe.fl.bridge import compose
from fedmoe.reporting.figures import write_run_plots
from fedmoe.reporting.tracking import WandbTracker, _artifact_name
from tests.helpers.wandb_log import read_offline_run


def test_sweep_job_names_make_valid_artifact_names():
    job = "0_data.max_eval_blocks_per_client=4,data.num_clients=2,experiment=smoke," * 3
    name = _artifact_name(job)
    assert len(name) <= 100 and re.fullmatch(r"[\w.-]+", name)
    assert name == _artifact_name(job) != _artifact_name(job + "x")
    assert _artifact_name("2026-11-30_03-00-00") == "2026-11-30_03-00-00"


def _track(run_dir, wandb_dir, *overrides: str):
    """Finish a real offline W&B run on ``run_dir``'s results; the run read back."""
    cfg = compose(["experiment=smoke", "logger=wandb", "logger.mode=offline",
                   f"logger.dir={wandb_dir}", f"run_dir={run_dir}", *overrides])
    results = json.loads((run_dir / "results.json").read_text())
    tracker = WandbTracker(cfg)
    tracker.finish(results, write_run_plots(results, run_dir))
    return read_offline_run(wandb_dir), results  # waits for the run's last record


@pytest.mark.slow
def test_the_report_is_an_artifact_and_exports_are_not_by_default(pruned_run, tmp_path,
                                                                   monkeypatch):
    # Prepare: W&B's staging copies go to a private data dir
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    run_dir, _ = pruned_run

    # Execute
    offline, results = _track(run_dir, tmp_path / "wandb")

    # Assert: one report artifact holding results.json and every plot, metadata = summary
    ours = [a for a in offline.artifacts if a["type"] != "run_table"]  # W&B's own for tables
    assert [a["type"] for a in ours] == ["run-report"]
    report = ours[0]
    assert report["name"] == f"{run_dir.name}-report"
    assert set(report["files"]) == {"results.json", "plots/rounds.png",
                                    "plots/client_perplexity.png", "plots/communication.png",
                                    "plots/expert_usage.png"}
    staged = json.loads(open(report["files"]["results.json"]).read())
    assert staged == results
    mean = sum(c["final_ppl"] for c in results["clients"].values()) / len(results["clients"])
    assert report["metadata"]["final/ppl_mean"] == pytest.approx(mean)


@pytest.mark.slow
def test_client_exports_are_model_artifacts_when_asked(pruned_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    run_dir, _ = pruned_run

    offline, results = _track(run_dir, tmp_path / "wandb", "logger.log_models=true")

    models = [a for a in offline.artifacts if a["type"] == "model"]
    assert [a["name"] for a in models] == [f"{run_dir.name}-client-{c}" for c in (0, 1)]
    for artifact in models:
        client = str(artifact["metadata"]["client"])
        files = set(artifact["files"])
        assert {"config.json", "model.safetensors.index.json", "README.md",
                "fedmoe_experts.json", "tokenizer.json"} <= files
        assert any(f.endswith(".safetensors") for f in files)  # the weights, in safetensors files
        assert artifact["metadata"]["experts_kept"] == results["clients"][client][
            "experts_kept"]
        assert artifact["metadata"]["held_out_ppl"] == pytest.approx(
            results["clients"][client]["final_ppl"], abs=1e-4)
