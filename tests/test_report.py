"""`fedmoe report`: a sweep's runs in one table (mean ± std over seeds), CSV and plots; and a
real sweep (`fedmoe simulate -m`) with one W&B run per job in one group per sweep."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedmoe.report import collect_runs, parse_overrides, summarize, to_markdown, write_report
from fedmoe.tracking import offline_runs, read_offline_run
from tests.helpers.runs import FAST, TWO_CLIENTS, fedmoe

MB = 2**20


def _fake_results(ppl: list[float], base: float = 200.0, up: int = MB) -> dict:
    clients = {str(c): {"final_ppl": p, "base_ppl": base} for c, p in enumerate(ppl)}
    rounds = [{"round": r, "train_loss": 4.0, "bytes_down": 2 * up, "bytes_up": up}
              for r in (1, 2)]
    return {"config": {"seed": 0}, "clients": clients, "rounds": rounds, "wall_seconds": 10.0}


def _fake_sweep(root: Path, per_strategy: dict[str, list[list[float]]],
                overrides: bool = True) -> Path:
    """Job dirs as Hydra names them, each with results.json and .hydra/overrides.yaml."""
    job = 0
    for strategy, seeds in per_strategy.items():
        for seed, ppl in enumerate(seeds):
            run = root / f"{job}_seed={seed},strategy={strategy}"
            (run / ".hydra").mkdir(parents=True)
            up = {"fedmoe": MB, "fedavg": 8 * MB, "local": 0}[strategy]
            results = _fake_results(ppl, up=up)
            results["config"] = {"seed": seed, "strategy": {"name": strategy},
                                 "run_dir": str(run)}
            (run / "results.json").write_text(json.dumps(results))
            if overrides:
                (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
                    ["experiment=smoke", f"strategy={strategy}", f"seed={seed}"]))
            job += 1
    return root


SWEEP = {"fedmoe": [[100.0, 120.0], [110.0, 130.0]],
         "fedavg": [[150.0, 170.0], [160.0, 180.0]],
         "local": [[190.0, 210.0], [200.0, 220.0]]}


def test_settings_are_the_overrides_but_the_seed(tmp_path):
    report = summarize(collect_runs(_fake_sweep(tmp_path, SWEEP)))
    assert report.keys == ["strategy"] and report.common == {"experiment": "smoke"}
    assert [s.overrides["strategy"] for s in report.settings] == ["fedmoe", "fedavg", "local"]
    assert [s.seeds for s in report.settings] == [["0", "1"]] * 3


def test_mean_and_std_over_seeds(tmp_path):
    report = summarize(collect_runs(_fake_sweep(tmp_path, SWEEP)))
    fedmoe = report.settings[0]
    assert fedmoe.mean["ppl"] == pytest.approx(115.0)  # run means 110 and 120
    assert fedmoe.std["ppl"] == pytest.approx(statistics.stdev([110.0, 120.0]))
    assert fedmoe.mean["ppl_worst"] == pytest.approx(125.0)
    assert fedmoe.mean["ppl_ratio"] == pytest.approx(115.0 / 200.0)
    assert fedmoe.mean["improved"] == 1.0
    assert fedmoe.mean["mb_up"] == pytest.approx(2.0) and fedmoe.std["mb_up"] == 0.0
    assert report.settings[2].mean["mb_total"] == 0.0


def test_markdown_and_csv(tmp_path):
    # Execute
    markdown, files = write_report(_fake_sweep(tmp_path, SWEEP))
    # Assert: one row per strategy, mean ± std, files in the sweep dir
    lines = markdown.splitlines()
    assert lines[0].startswith("| strategy | runs | ppl (mean) |")
    assert lines[2].startswith("| fedmoe | 2 (seed 0,1) | 115.00 ± 7.07 |")
    assert "common overrides: experiment=smoke" in markdown
    assert (tmp_path / "report.md").read_text().endswith(markdown)
    with files["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["strategy"] for r in rows] == ["fedmoe", "fedavg", "local"]
    assert float(rows[1]["ppl_mean"]) == pytest.approx(165.0)
    assert float(rows[1]["ppl_std"]) == pytest.approx(statistics.stdev([160.0, 170.0]))
    for name in ("client_ppl", "communication"):
        assert files[name].stat().st_size > 1000 and files[name].parent == tmp_path


def test_one_seed_has_no_spread(tmp_path):
    report = summarize(collect_runs(_fake_sweep(tmp_path, {"fedmoe": [[100.0, 120.0]]})))
    assert report.keys == [] and report.settings[0].std["ppl"] is None
    assert "| 1 (seed 0) | 110.00 |" in to_markdown(report)  # one run: no "±"


def test_without_hydra_overrides_settings_come_from_the_configs(tmp_path):
    report = summarize(collect_runs(_fake_sweep(tmp_path, SWEEP, overrides=False)))
    assert report.keys == ["strategy.name"] and len(report.settings) == 3


def test_parse_overrides():
    assert parse_overrides(["+a.b=1", "~c", "d=x=y", "hydra.verbose=true"]) == {
        "a.b": "1", "c": "", "d": "x=y"}


def test_no_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json under"):
        collect_runs(tmp_path)


def test_cli_takes_the_sweep_dir_as_positional_argument(tmp_path):
    # Prepare: a directory name Hydra would misread (`=` and `,`), as a sweep's jobs have
    sweep = _fake_sweep(tmp_path / "a=1,b=2", SWEEP)
    # Execute
    proc = subprocess.run([sys.executable, "-m", "fedmoe.cli", "report", str(sweep)],
                          capture_output=True, text=True, timeout=120)
    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| fedavg | 2 (seed 0,1) | 165.00 ± 7.07 |" in proc.stdout
    assert {p.name for p in sweep.iterdir() if p.is_file()} == {
        "report.md", "report.csv", "report_client_ppl.png", "report_communication.png"}


# --- a real sweep -------------------------------------------------------------------------------

TINY = [*FAST, *TWO_CLIENTS, "fl.num_rounds=2"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, fedmoe_cache) -> tuple[Path, str]:
    """`fedmoe simulate -m strategy=fedmoe,local logger=wandb` (2 jobs, 2 rounds, 2 clients)."""
    root = tmp_path_factory.mktemp("sweep") / "sweep-x"
    proc = fedmoe(fedmoe_cache, "simulate", "-m", "strategy=fedmoe,local", "logger=wandb",
                  *TINY, f"hydra.sweep.dir={root}", timeout=900)
    return root, proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_sweep_runs_every_job_in_one_process(sweep):
    root, output = sweep
    runs = collect_runs(root)
    assert sorted(r.results["strategy"]["name"] for r in runs) == ["fedmoe", "local"]
    assert all(len(r.results["rounds"]) == 2 for r in runs)
    # Logs stay concise: one line per round, no Flower/Ray/alembic INFO lines
    assert output.count("round 2: train loss") == 2
    for noise in ("alembic", "[flwr][INFO]", "Started a local Ray instance"):
        assert noise not in output


@pytest.mark.slow
def test_each_job_logs_one_wandb_run_in_the_sweeps_group(sweep):
    root, _ = sweep
    for run in collect_runs(root):
        wb = read_offline_run(run.path)
        results = run.results
        assert wb.group == "sweep-x" and wb.name == run.path.name
        assert wb.config["strategy"]["name"] == results["strategy"]["name"]
        assert [h["round"] for h in wb.history] == [1, 2]
        for logged, entry in zip(wb.history, results["rounds"], strict=True):
            for cid, ppl in entry["eval_ppl_by_client"].items():
                assert logged[f"ppl/client_{cid}"] == pytest.approx(ppl)
            assert logged["comm/bytes_up"] == entry["bytes_up"]
        final = [c["final_ppl"] for c in results["clients"].values()]
        assert wb.summary["final/ppl_mean"] == pytest.approx(statistics.fmean(final))
        assert wb.history[-1]["tables/clients/nrows"] == 2
        assert {"client_perplexity", "communication", "expert_usage"} <= {
            p.stem for p in (run.path / "plots").glob("*.png")}
    assert len(offline_runs(root)) == 2


@pytest.mark.slow
def test_report_of_a_real_sweep(sweep):
    root, _ = sweep
    markdown, files = write_report(root)
    rows = [line for line in markdown.splitlines() if line.startswith("| fedmoe")
            or line.startswith("| local")]
    assert len(rows) == 2 and "| 1 (seed 0) |" in rows[0]
    local = next(r for r in collect_runs(root) if r.results["strategy"]["name"] == "local")
    assert all(e["bytes_up"] == 0 for e in local.results["rounds"])  # nothing leaves a client
    assert all(path.exists() for path in files.values())
