"""scripts/bench_research.py's statistics on runs whose answers are known: paired per-client
differences, win rates, upload, pruning and routing summaries, and which runs count."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import REPO
from tests.helpers.scripts import load_script

MB = 2**20


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_research")


def write_run(out: Path, strategy: str, seed: int, ppl: list[float], up_mb: float,
              done: bool = True, base: list[float] | None = None) -> None:
    run = out / "natural" / strategy / f"seed{seed}"
    run.mkdir(parents=True)
    clients = {str(c): {"final_ppl": p} for c, p in enumerate(ppl)}
    for c, b in enumerate(base or []):
        clients[str(c)]["base_ppl"] = b
    results = {"clients": clients,
               "rounds": [{"bytes_up": up_mb * MB * len(ppl), "accepted": list(range(len(ppl)))}
                          for _ in range(2)]}
    (run / "results.json").write_text(json.dumps(results))
    if done:
        (run / ".bench_done").touch()


def write_record(out: Path) -> None:
    """local is 10% worse than fedmoe on every client of both seeds; from the base, fedmoe
    moved client 0 by -20% and client 1 by +122%; fedavg's one run failed
    (results.json without the done marker); a personalized-vs-global pruning file where
    personalized wins on 3 of 4 clients and its kept half carries 0.8 of the routing (global:
    0.6); routing where personalization adds 0.1."""
    for seed in (0, 1):
        write_run(out, "fedmoe", seed, [10.0, 20.0], up_mb=1.5, base=[12.5, 9.0])
        write_run(out, "local", seed, [11.0, 22.0], up_mb=0.0)
    write_run(out, "fedavg", 0, [1.0, 1.0], up_mb=9.0, done=False)
    pruning = out / "natural" / "pruning" / "seed0"
    pruning.mkdir(parents=True)
    recovered = [{"client": c, "mode": m, "ppl": p, "ppl_unpruned": 10.0}
                 for c, (pers, glob) in enumerate([(10.1, 10.5), (10.2, 10.4), (10.3, 10.9),
                                                   (10.8, 10.6)])
                 for m, p in (("personalized", pers), ("global", glob))]
    rows = [{"client": c, "score": "tcess", "mode": m, "keep": 0.5, "coverage": cov}
            for c in range(2) for m, cov in (("personalized", 0.8), ("global", 0.6))]
    rows += [{"client": 0, "score": "frequency", "mode": "personalized", "keep": 0.5,
              "coverage": 0.1}, {"client": 0, "score": "tcess", "mode": "personalized",
                                 "keep": 1.0, "coverage": 1.0}]
    (pruning / "bench_pruning.json").write_text(json.dumps({"recovered": recovered,
                                                            "rows": rows}))
    routing = out / "natural" / "consistency"
    routing.mkdir(parents=True)
    (routing / "seed0.json").write_text(json.dumps([
        {"client": c, "base": {"srp": 0.5, "lru_hit": 0.6, "sch_hit": 0.7},
         "personalized": {"srp": 0.6, "lru_hit": 0.7, "sch_hit": 0.8}} for c in range(2)]))


def test_report_pairs_clients_across_seeds_and_skips_failed_runs(bench, tmp_path):
    # Prepare
    write_record(tmp_path)

    # Execute: a report asked for another variant still covers the whole record
    bench.main(["--out", str(tmp_path), "--variants", "dirichlet", "--report-only"])

    # Assert
    report = json.loads((tmp_path / "research.json").read_text())["natural"]
    rows = {r["strategy"]: r for r in report["strategies"]}
    assert set(rows) == {"fedmoe", "local", bench.BASE}  # the failed fedavg run does not count
    base = rows[bench.BASE]  # the starting point, from the base_ppl the fedmoe runs measured
    assert base["ppl_mean"] == pytest.approx(10.75) and base["ppl_worst"] == 12.5
    assert base["fedmoe_vs_pct"] == pytest.approx(50 * (10 / 12.5 + 20 / 9 - 2))
    assert base["fedmoe_wins"] == 0.5 and base["upload_mb_per_client_round"] == 0.0
    assert "better_than_base" not in base
    # client 0 of each seed (paired per client: 11 and 22 beat neither 9 nor 12.5 swapped)
    assert rows["fedmoe"]["better_than_base"] == 0.5
    assert rows["local"]["better_than_base"] == 0.5
    assert rows["local"]["better_than_base_units"] == 4
    assert rows["local"]["better_than_base_ci"] == [0.0, 1.0]  # 2 clients, one better
    local = rows["local"]
    assert local["units"] == 4
    assert local["fedmoe_vs_pct"] == pytest.approx(100 * (10 / 11 - 1))
    assert local["fedmoe_vs_pct_ci"] == pytest.approx([100 * (10 / 11 - 1)] * 2)
    assert local["fedmoe_wins"] == 1.0
    assert rows["fedmoe"]["ppl_mean"] == pytest.approx(15.0)
    assert rows["fedmoe"]["ppl_worst"] == pytest.approx(20.0)
    assert rows["fedmoe"]["upload_mb_per_client_round"] == pytest.approx(1.5)
    assert rows["local"]["upload_mb_per_client_round"] == 0.0
    beats = report["pruning"]["personalized_beats_global"]
    assert beats["share"] == pytest.approx(0.75) and beats["units"] == 4
    assert not beats["goal_met"]
    assert report["pruning"]["personalized_coverage"]["mean"] == pytest.approx(0.8)
    assert report["pruning"]["global_coverage"]["mean"] == pytest.approx(0.6)
    assert report["routing"]["srp"]["difference"] == pytest.approx(0.1)
    assert "| local | 2 |" in (tmp_path / "research.md").read_text()
    assert (tmp_path / "research_natural_client_gains.png").stat().st_size > 0


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout


def test_the_record_in_git_keeps_what_the_report_reads_its_base_model_and_no_run_weights(
        bench, tmp_path):
    # Prepare: a record with what a real run also leaves there: checkpoints, exports, logs
    out = tmp_path / "repo" / "benchmarks" / "research"
    write_record(out)
    shutil.copy(bench.RECORD / ".gitignore", out / ".gitignore")
    run = out / "natural" / "fedmoe" / "seed0"
    for heavy in ("server_state/round_1.safetensors", "server_state/round_1.json",
                  "clients/client_0000/model/model.safetensors",
                  "clients/client_0000/meta.json", "main.log"):
        (run / heavy).parent.mkdir(parents=True, exist_ok=True)
        (run / heavy).write_bytes(b"x")
    (run / ".hydra").mkdir()
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        (run / ".hydra" / name).write_text("seed: 0\n")
    (out / "natural" / "seed0.log").write_text("log")
    (out / "base_model").mkdir()
    for name in ("model.safetensors", "config.json", "pretrain.json", "tokenizer.json"):
        (out / "base_model" / name).write_bytes(b"x")
    bench.main(["--out", str(out), "--variants", "natural", "--report-only"])
    repo = tmp_path / "repo"
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "record")

    # Execute: what a fresh clone holds, and the report it prints
    kept = set(git(repo, "ls-files").split())
    git(tmp_path, "clone", "-q", str(repo), "clone")
    clone = tmp_path / "clone" / "benchmarks" / "research"
    before = (out / "research.json").read_text()
    (clone / "research.json").unlink()
    bench.main(["--out", str(clone), "--variants", "natural", "--report-only"])

    # Assert
    prefix = "benchmarks/research/natural/"
    assert {k for k in kept if k.startswith(prefix + "fedmoe/seed0/")} == {
        prefix + "fedmoe/seed0/" + f for f in
        ("results.json", ".bench_done", ".hydra/config.yaml", ".hydra/overrides.yaml")}
    assert {prefix + "pruning/seed0/bench_pruning.json", prefix + "consistency/seed0.json",
            "benchmarks/research/research.json", "benchmarks/research/research.md",
            "benchmarks/research/research_natural_client_gains.png"} <= kept
    assert prefix + "fedavg/seed0/results.json" in kept  # a failed run's results (not done)
    assert {f"benchmarks/research/base_model/{name}" for name in
            ("model.safetensors", "config.json", "pretrain.json", "tokenizer.json")} <= kept
    assert not any(k.endswith((".safetensors", ".log")) and "/base_model/" not in k or
                   "/clients/" in k or "server_state" in k for k in kept)
    assert json.loads((clone / "research.json").read_text()) == json.loads(before)


def test_a_recorded_run_without_its_exports_is_named_before_the_analysis(bench, tmp_path):
    # Prepare: fedmoe's runs come from the record (results only, no client exports); seed 1's
    # routing analysis is still to do
    write_record(tmp_path)

    # Execute
    with pytest.raises(SystemExit) as stop:
        bench.main(["--out", str(tmp_path), "--variants", "natural", "--strategies", "fedmoe",
                    "--seeds", "1"])

    # Assert: one line naming the run and how to redo it; nothing was deleted
    message = str(stop.value)
    assert "\n" not in message and "client exports are missing" in message
    assert str(tmp_path / "natural" / "fedmoe" / "seed1" / ".bench_done") in message
    assert (tmp_path / "natural" / "fedmoe" / "seed1" / ".bench_done").is_file()



def test_the_report_is_the_same_in_every_process(tmp_path):
    # Prepare: per-client differences that vary, so the intervals have width and depend on
    # which units the bootstrap draws (a constant difference would hide the order)
    out = tmp_path / "record"
    for seed in (0, 1):
        write_run(out, "fedmoe", seed, [10.0, 20.0, 30.0, 12.0], up_mb=1.5)
        write_run(out, "local", seed, [11.0 + seed, 20.5, 33.0, 12.1 + seed], up_mb=0.0)
    script = Path(__file__).parents[1] / "scripts" / "bench_research.py"
    reports = []
    # Execute: the report twice, under two string-hash seeds (set and dict-key order of tuples)
    for hash_seed in ("1", "2"):
        subprocess.run([sys.executable, str(script), "--out", str(out), "--variants", "natural",
                        "--report-only"], check=True, capture_output=True,
                       env=os.environ | {"PYTHONHASHSEED": hash_seed})
        reports.append((out / "research.json").read_text())
    # Assert: the same intervals, digit for digit
    local = next(r for r in json.loads(reports[0])["natural"]["strategies"]
                 if r["strategy"] == "local")
    low, high = local["fedmoe_vs_pct_ci"]
    assert low < high  # the intervals have width
    assert reports[0] == reports[1]


def test_the_record_keeps_its_base_model_and_holds_a_continuation_to_it(bench, tmp_path,
                                                                       smoke_base):
    # Prepare: a record whose base model copy is kept (as the first run leaves it)
    shutil.copytree(smoke_base, tmp_path / "base_model")
    # Execute: the first call records it; the runs are pointed at the copy
    extra = bench.check_base(tmp_path, [])
    recorded = json.loads((tmp_path / "base.json").read_text())
    # Assert
    assert extra == [f"fl.base_model={tmp_path / 'base_model'}"]
    assert recorded["sha256"] == bench.describe_base(smoke_base)["sha256"]
    assert recorded["ppl"] > 1
    # A record of another base model is refused in one line, naming both
    (tmp_path / "base.json").write_text(json.dumps(recorded | {"sha256": "0" * 64}))
    with pytest.raises(SystemExit) as stop:
        bench.check_base(tmp_path, [])
    message = str(stop.value)
    assert "\n" not in message and "not the base model of the runs" in message
    assert recorded["sha256"][:12] in message


def test_the_readmes_research_tables_are_the_recorded_reports_tables(bench):
    # The README's numbers are copied from the records' research.md; a rerun of the report
    # (or a hand edit) that changes a number must show here, not drift silently. Each README
    # table is a block of the report section of the split its paragraph names.
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Research benchmark", 1)[1].split("\n## ", 1)[0]
    reports = {variant: (record / "research.md").read_text().split(f"### {variant} split", 1)[1]
               .split("\n### ", 1)[0] for variant, record in bench.RECORDS.items()}
    checked = 0
    for part in re.split(r"\nResults, ", section)[1:]:
        variant = "natural" if part.startswith("natural") else "dirichlet"
        assert part.startswith(("natural split", "Dirichlet(0.5) split")), part[:40]
        tables = re.findall(r"(?m)^(\|.*\n(?:\|.*\n)+)", part.split("Reading the numbers")[0])
        assert len(tables) == 3, (variant, len(tables))  # strategies, pruning, routing
        for table in tables:
            assert table in reports[variant] + "\n", (variant, table[:200])
            checked += 1
    assert checked == 6


def test_each_variants_record_reproduces_its_committed_report(bench, tmp_path, monkeypatch):
    # The committed tables are what the script computes from the committed runs (no hand
    # edit), and with no --out each variant's report goes to its own record.
    tracked = git(REPO, "ls-files", "--", *(str(r.relative_to(REPO))
                                            for r in bench.RECORDS.values())).split()
    for name in tracked:
        if "/base_model/" not in name and not name.endswith(".png"):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, tmp_path / name)
    copies = {v: tmp_path / r.relative_to(REPO) for v, r in bench.RECORDS.items()}
    monkeypatch.setattr(bench, "RECORDS", copies)
    for copy in copies.values():
        (copy / "research.md").unlink()
    # Execute
    bench.main(["--report-only"])
    # Assert
    for variant, record in bench.RECORDS.items():
        committed = (REPO / record.relative_to(tmp_path) / "research.md").read_text()
        assert (record / "research.md").read_text() == committed
        assert f"### {variant} split" in committed
