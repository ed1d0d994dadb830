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

from fedmoe.config import ConfigError
from fedmoe.reporting.sweep import (
    collect_runs,
    find_baseline,
    paired_report,
    parse_overrides,
    summarize,
    to_markdown,
    write_report,
)
from tests.helpers.runs import FAST, TWO_CLIENTS, fedmoe
from tests.helpers.wandb_log import offline_runs, read_offline_run

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


# --- paired statistics against a baseline -------------------------------------------------------

# SWEEP's per-unit gains of fedmoe over fedavg, 100 * (1 - ppl / ppl_fedavg), (seed, client):
GAINS = {("0", "0"): 100 / 3, ("0", "1"): 100 * 50 / 170, ("1", "0"): 31.25,
         ("1", "1"): 100 * 50 / 180}


def test_paired_gains_and_win_rate_against_the_baseline(tmp_path):
    # Prepare
    report = summarize(collect_runs(_fake_sweep(tmp_path, SWEEP)))
    # Execute
    fedmoe, local = paired_report(report, find_baseline(report, "fedavg"))
    # Assert: the gain of each (seed, client), their mean; with 2 seeds x 2 clients a
    # resample is all of one unit with probability 1/4 * 1/4 > 2.5 %, so the 95 % interval
    # runs from the smallest unit's gain to the largest's
    assert fedmoe.gains == pytest.approx(GAINS)
    assert fedmoe.gain.mean == pytest.approx(statistics.fmean(GAINS.values()))
    assert (fedmoe.gain.low, fedmoe.gain.high) == pytest.approx((100 * 50 / 180, 100 / 3))
    assert (fedmoe.win_rate.mean, fedmoe.win_rate.low, fedmoe.win_rate.high) == (1, 1, 1)
    assert local.win_rate.mean == 0 and local.gain.high < 0
    assert (fedmoe.gain.n, fedmoe.clients, fedmoe.seeds) == (4, 2, 2)
    assert (fedmoe.ppl_worst, local.ppl_worst) == (125.0, 215.0)


def test_a_mixed_win_rate(tmp_path):
    # fedmoe beats fedavg on client 0 of both seeds, loses on client 1, ties client 2
    sweep = {"fedmoe": [[100.0, 200.0, 150.0]] * 2, "fedavg": [[150.0, 150.0, 150.0]] * 2}
    report = summarize(collect_runs(_fake_sweep(tmp_path, sweep)))
    (paired,) = paired_report(report, find_baseline(report, "strategy=fedavg"))
    assert paired.win_rate.mean == pytest.approx(0.5)  # (1 + 0 + 0.5) / 3 per seed
    assert paired.gain.mean == pytest.approx((100 / 3 - 100 / 3 + 0) / 3)
    assert paired.win_rate.low < 0.5 < paired.win_rate.high


def test_report_with_a_baseline_writes_the_paired_table(tmp_path):
    # Execute
    markdown, files = write_report(_fake_sweep(tmp_path, SWEEP), baseline="fedavg",
                                   bootstrap={"n_resamples": 4000})
    # Assert: the table after the first one, its CSV and JSON, the figure
    assert "paired vs baseline strategy=fedavg (worst-client ppl 175.00)" in markdown
    assert ("| strategy=fedmoe | 30.44 [27.78, 33.33] | 1.00 [1.00, 1.00] | 125.00 "
            "| 4 (2 × 2) |") in markdown
    assert (tmp_path / "report.md").read_text().endswith(markdown)
    with files["paired_csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["strategy"] for r in rows] == ["fedmoe", "local"]
    assert float(rows[0]["gain_pct_mean"]) == pytest.approx(30.4432, abs=1e-4)
    assert float(rows[1]["baseline_ppl_worst"]) == 175.0
    document = json.loads(files["paired_json"].read_text())
    assert document["baseline"] == "strategy=fedavg"
    assert document["bootstrap"]["n_resamples"] == 4000
    units = {(u["seed"], u["client"]): u["gain_pct"] for u in document["settings"][0]["gains_pct"]}
    assert units == pytest.approx(GAINS)
    assert files["client_gains"].name == "report_client_gains.png"
    assert files["client_gains"].stat().st_size > 1000


def test_a_missing_client_is_a_one_line_error_naming_run_and_client(tmp_path):
    # Prepare: fedavg's seed-1 run never evaluated client 1
    sweep = _fake_sweep(tmp_path, SWEEP)
    run = next(sweep.glob("*_seed=1,strategy=fedavg"))
    results = json.loads((run / "results.json").read_text())
    results["clients"]["1"]["final_ppl"] = None
    (run / "results.json").write_text(json.dumps(results))
    report = summarize(collect_runs(sweep))
    # Execute / Assert
    with pytest.raises(ConfigError) as error:
        paired_report(report, find_baseline(report, "fedavg"))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("baseline: client 1 of seed 1 is in strategy=fedmoe (run ")
    assert f"but not in strategy=fedavg (run {run}: no final_ppl)" in message


def test_a_missing_seed_is_an_error_naming_it(tmp_path):
    sweep = {"fedmoe": SWEEP["fedmoe"], "fedavg": SWEEP["fedavg"][:1]}
    report = summarize(collect_runs(_fake_sweep(tmp_path, sweep)))
    with pytest.raises(ConfigError, match="client 0 of seed 1 is in strategy=fedmoe .* "
                                          "strategy=fedavg has no run of seed 1"):
        paired_report(report, find_baseline(report, "fedavg"))


def test_two_runs_of_one_seed_are_an_error(tmp_path):
    sweep = _fake_sweep(tmp_path, SWEEP)
    run = next(sweep.glob("*_seed=1,strategy=fedavg"))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        ["experiment=smoke", "strategy=fedavg", "seed=0"]))
    report = summarize(collect_runs(sweep))
    with pytest.raises(ConfigError, match=f"and {run} both have seed 0"):
        paired_report(report, find_baseline(report, "fedavg"))


def test_a_baseline_names_exactly_one_setting(tmp_path):
    report = summarize(collect_runs(_fake_sweep(tmp_path, SWEEP)))
    assert find_baseline(report, "strategy=local") is report.settings[2]
    with pytest.raises(ConfigError, match="baseline=scaffold names 0 settings, not one; the "
                                          "settings: strategy=fedmoe; strategy=fedavg"):
        find_baseline(report, "scaffold")


def test_cli_baseline_prints_the_paired_table(tmp_path):
    # Prepare
    sweep = _fake_sweep(tmp_path / "sweep", SWEEP)
    # Execute
    proc = subprocess.run([sys.executable, "-m", "fedmoe.cli", "report", str(sweep),
                           "baseline=fedavg", "bootstrap.n_resamples=2000"],
                          capture_output=True, text=True, timeout=120)
    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| strategy=fedmoe | 30.44 [27.78, 33.33] | 1.00 [1.00, 1.00] |" in proc.stdout
    assert {"report_paired.csv", "report_paired.json", "report_client_gains.png"} <= {
        p.name for p in sweep.iterdir()}


def test_cli_unmatched_clients_end_in_one_line(tmp_path):
    sweep = {"fedmoe": SWEEP["fedmoe"], "fedavg": SWEEP["fedavg"][:1]}
    sweep = _fake_sweep(tmp_path / "sweep", sweep)
    proc = subprocess.run([sys.executable, "-m", "fedmoe.cli", "report", str(sweep),
                           "baseline=fedavg"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"fedmoe report: baseline: client 0 of seed 1 is in strategy=fedmoe (run "
        f"{sweep / '1_seed=1,strategy=fedmoe'}) but strategy=fedavg has no run of seed 1; "
        "paired statistics need the same seeds and clients in both settings"]


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
