"""The research benchmark: fedmoe against the closest published methods, with 95% CIs.

The setting is ``experiment=research`` (fixed before any result was looked at): the
fine-grained base model ``fine_moe`` (64 routed experts of width 32, top-4, one shared expert,
6 layers) pretrained once on the eight-domain embedded corpus, then 16 clients, two per domain
(``natural``) or Dirichlet(0.5) mixtures of domains (``dirichlet``), 4 rounds of 16 local
steps. Every strategy runs on the same data, seeds and local compute, as one
``fedmoe simulate`` run per (variant, strategy, seed):

- ``fedmoe``: router and shared expert aggregated, routed experts personal (this package);
- ``fedavg``: every parameter aggregated (McMahan et al., arXiv 1602.05629);
- ``fedavg_lora``: FedAvg of LoRA adapters on a frozen base (FlowerTune's recipe);
- ``local``: each client trains alone;
- ``flex``: FLEx (arXiv 2506.00965), non-expert modules federated, one grafted personal
  expert per layer behind an adaptive gate;
- ``fedmoe_sub``: FedMoE (arXiv 2408.11304), a sub-MoE per client chosen by its expert
  activations, modular aggregation of every expert over the clients that hold it;
- ``fedmoe_pruned``: fedmoe whose clients prune to half their routed experts (TCESS,
  PreMoe arXiv 2505.17639) after round 2 and recover in rounds 3-4.

Then, from the finished runs:

1. per strategy: mean and worst per-client held-out perplexity, and against fedmoe the paired
   per-client difference (%) with a 95% bootstrap CI and the share of clients fedmoe beats
   (clients x seeds matched; resampling in :mod:`fedmoe.reporting.stats`); upload MB per client per
   round;
2. pruning in federation: ``fedmoe_pruned`` against ``fedmoe`` trained the same rounds (cost at
   50% kept after recovery, goal <= 3%), and personalized against global pruning after the same
   recovery steps per client (``scripts/bench_pruning.py --run-dir`` on each fedmoe run,
   goal: personalized better for >= 80% of clients);
3. routing consistency of each personalized model on its own domain against the base model's:
   SRP (arXiv 2505.16056, segment 16), and LRU and SCH (lookahead 16) hit rates of a cache of
   a quarter of each layer's experts — does personalization make edge caching easier?

Every step is skipped when its output exists, so the command resumes where it stopped (a
``fedmoe simulate`` run that was cut short resumes from its last round checkpoint; one that
exited non-zero is run again and does not count until it succeeds). The runs go to the
variant's record, ``benchmarks/research`` (natural) or ``benchmarks/research-dirichlet``,
whose results, configs, reports and base model (``base_model/``) git keeps: a fresh clone
prints the tables of the runs done so far and continues the others on the same base model
(``--out <folder>`` starts over, every variant in that folder).

    python scripts/bench_research.py                        # everything (hours on 2 cores)
    python scripts/bench_research.py --variants natural     # the natural split only
    python scripts/bench_research.py --report-only          # tables from what is done
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

SETTING = ["experiment=research"]
PRUNE_KEEP = 0.5  # share of the routed experts a pruned client keeps
# Only fedmoe's clients export their models (the pruning and routing steps read them).
STRATEGIES: dict[str, list[str]] = {
    "fedmoe": ["strategy=fedmoe"],
    "local": ["strategy=local", "fl.export=false"],
    "fedavg": ["strategy=fedavg", "fl.export=false"],
    "fedavg_lora": ["strategy=fedavg_lora", "fl.export=false"],
    "flex": ["strategy=flex", "fl.export=false"],
    "fedmoe_sub": ["strategy=fedmoe_sub", "fl.export=false"],
    "fedmoe_pruned": ["strategy=fedmoe", "prune=default", f"prune.keep={PRUNE_KEEP}",
                      "prune.at_round=2", "fl.export=false"],
}
VARIANTS: dict[str, list[str]] = {
    "natural": [],
    "dirichlet": ["data.partition=dirichlet", "data.alpha=0.5"],
}
SEEDS = (0, 1, 2)
REFERENCE = "fedmoe"
BASE, BASE_KEY = "base (no training)", "base_ppl"  # the table's first row: the starting point
PRUNE_GOAL, PRUNE_WIN_GOAL = 0.03, 0.8
SEGMENT, CACHE_SHARE = 16, 0.25
DONE = ".bench_done"  # written once `fedmoe simulate` exited 0
# The record's own copy of the base model every run starts from (git keeps it, 25 MB): a fresh
# machine continues on it. Pretraining is not bit-reproducible across CPUs (AVX2 vs AVX-512
# sums), so a record without its copy cannot be continued on another kind of machine.
BASE_DIR = "base_model"
# The default --out of each variant: git keeps their small files (the records' .gitignore), so
# the tables and the runs already done travel with the code and a fresh clone continues the
# rest. The Dirichlet variant has a record of its own: it was begun on another kind of CPU,
# with the base model kept (the first record's Dirichlet runs, 2 seeds, are superseded).
RECORD = Path(__file__).resolve().parent.parent / "benchmarks" / "research"
RECORDS = {"natural": RECORD, "dirichlet": RECORD.with_name("research-dirichlet")}


# ---- runs ---------------------------------------------------------------------------------
def run_dir(out: Path, variant: str, strategy: str, seed: int) -> Path:
    return out / variant / strategy / f"seed{seed}"


def check_base(out: Path, extra: list[str]) -> list[str]:
    """Find (or pretrain) the base model every run starts from and hold it to the record's:
    runs on another base are another benchmark. The first call writes ``<out>/base.json``
    (checkpoint name, sha256 of its weights, held-out perplexity) and copies the model to
    ``<out>/base_model``; the override returned points every run at that copy."""
    import shutil

    from fedmoe.fl.bridge import compose
    from fedmoe.train.pretrain import ensure_base_model

    kept = out / BASE_DIR
    base = kept if kept.is_dir() else ensure_base_model(compose([*SETTING, *extra]))
    mine = describe_base(base)
    record = out / "base.json"
    if record.is_file():
        theirs = json.loads(record.read_text())
        if theirs["sha256"] != mine["sha256"]:
            sys.exit(f"{base}: not the base model of the runs in {out} ({theirs['checkpoint']}, "
                     f"sha256 {theirs['sha256'][:12]}, ppl {theirs['ppl']:.3f}; this one: "
                     f"{mine['checkpoint']}, {mine['sha256'][:12]}, ppl {mine['ppl']:.3f}; "
                     f"pretrained with {theirs['threads']} threads there), and the record keeps "
                     f"no {BASE_DIR}/ to continue on: use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(mine, indent=2))
    if not kept.is_dir():
        tmp = out / f".{BASE_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base, tmp)
        tmp.rename(kept)
    return [f"fl.base_model={kept}"]


def describe_base(base: Path) -> dict:
    """Folder name (fedmoe's cache names it by the pretraining config), sha256 of the weights
    and held-out perplexity of a pretrained base model folder."""
    import hashlib

    from fedmoe.train.pretrain import SUMMARY_FILE

    summary = json.loads((base / SUMMARY_FILE).read_text())
    digest = hashlib.sha256()
    for weights in sorted(base.glob("*.safetensors")):
        digest.update(weights.read_bytes())
    return {"checkpoint": base.name, "sha256": digest.hexdigest(),
            "ppl": summary["overall"]["ppl"], "unigram_ppl": summary["overall"]["unigram_ppl"],
            "threads": summary.get("threads"), "train_seconds": summary.get("train_seconds")}


def exports(out: Path, variant: str, seed: int) -> Path:
    """The fedmoe run whose client exports the pruning and routing steps read; a run taken
    from the record has none (git keeps only its results): it must run again."""
    run = run_dir(out, variant, REFERENCE, seed)
    if not (run / "clients" / "client_0000" / "model").is_dir():
        sys.exit(f"{run}: the client exports are missing (a run from the record keeps only its "
                 f"results): delete {run / DONE} to run it again")
    return run


def simulate(out: Path, variant: str, strategy: str, seed: int, extra: list[str]) -> bool:
    """One ``fedmoe simulate`` run in its own process, unless its results.json exists."""
    path = run_dir(out, variant, strategy, seed)
    if (path / DONE).is_file():
        return True
    path.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fedmoe.cli", "simulate", *SETTING, *VARIANTS[variant],
           *STRATEGIES[strategy], *extra, f"seed={seed}", f"hydra.run.dir={path}"]
    print(f"[{time.strftime('%H:%M:%S')}] {variant}/{strategy}/seed{seed}", flush=True)
    with open(path.parent / f"seed{seed}.log", "a") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env=os.environ | {"WANDB_MODE": "offline"}).returncode
    if code != 0:  # a failed run may still have written results.json: it does not count
        print(f"  failed (exit {code}); see {path.parent / f'seed{seed}.log'}", flush=True)
        return False
    (path / DONE).touch()
    return True


def prune_bench(out: Path, variant: str, seed: int, recover_steps: int) -> bool:
    """Personalized vs global TCESS at 50% on the clients of one fedmoe run, after recovery."""
    target = out / variant / "pruning" / f"seed{seed}"
    if (target / "bench_pruning.json").is_file():
        return True
    target.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).with_name("bench_pruning.py")
    cmd = [sys.executable, str(script), "--run-dir", str(exports(out, variant, seed)),
           "--scores", "tcess,frequency", "--keeps", str(PRUNE_KEEP), "--random-seeds", "1",
           "--recover", "personalized/tcess,global/tcess", "--recover-steps",
           str(recover_steps), "--out", str(target)]
    print(f"[{time.strftime('%H:%M:%S')}] {variant}/pruning/seed{seed}", flush=True)
    with open(target / "log.txt", "a") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    return code == 0


def consistency(out: Path, variant: str, seed: int) -> bool:
    """Per client: routing consistency of its personalized model vs the base, on its own
    held-out blocks (``consistency.json`` next to the run)."""
    target = out / variant / "consistency" / f"seed{seed}.json"
    if target.is_file():
        return True
    import yaml
    from omegaconf import OmegaConf

    from fedmoe.analysis.collect import collect_routing
    from fedmoe.checkpoints import load_model, resolve_base_model
    from fedmoe.client.local import client_blocks
    from fedmoe.fl.bridge import compose

    run = exports(out, variant, seed)
    cfg = compose(yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()))
    checkpoint = resolve_base_model(cfg, progress=False)  # the run's fl.base_model
    data_yaml = OmegaConf.to_yaml(cfg.data, resolve=True)
    base = load_model(cfg.model, checkpoint=checkpoint).eval()
    rows = []
    for cid in range(int(cfg.data.num_clients)):
        export = run / "clients" / f"client_{cid:04d}" / "model"
        blocks = client_blocks(data_yaml, str(checkpoint), cid).validation
        personal = load_model(cfg.model, checkpoint=export).eval()
        rows.append({"client": cid, "base": routing_figures(collect_routing(base, blocks)),
                     "personalized": routing_figures(collect_routing(personal, blocks))})
        print(f"  consistency client {cid}: {rows[-1]}", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(rows, indent=2))
    return True


def routing_figures(routing) -> dict[str, float]:
    """Model-wide SRP at segment 16; LRU and SCH(16) hit rate at a quarter of each layer's
    experts, mean over layers (moe-lrc's conventions, :mod:`fedmoe.analysis.consistency`)."""
    from fedmoe.analysis.consistency import cache_curve, routing_mask, srp

    masks = {layer: routing_mask(idx, routing.num_experts[layer])
             for layer, idx in routing.top_k_index.items()}
    model_srp = srp(masks, SEGMENT, num_bootstrap=1)["model"].srp
    hits: dict[str, list[float]] = {"lru": [], "sch": []}
    for layer, idx in routing.top_k_index.items():
        e = routing.num_experts[layer]
        capacity = max(routing.top_k, round(CACHE_SHARE * e))
        hits["lru"].append(cache_curve(idx, e, "lru", num_bootstrap=1).at(capacity))
        hits["sch"].append(cache_curve(idx, e, "sch", SEGMENT, num_bootstrap=1).at(capacity))
    return {"srp": float(model_srp), "lru_hit": float(np.mean(hits["lru"])),
            "sch_hit": float(np.mean(hits["sch"]))}


# ---- statistics ---------------------------------------------------------------------------
def recorded_seeds(out: Path, variant: str) -> list[int]:
    """Every seed with a folder in the record (the default seeds and any other run since)."""
    found = {int(m.group(1)) for path in (out / variant).glob("*/seed*")
             if (m := re.fullmatch(r"seed(\d+)(\.json)?", path.name))}
    return sorted(found | set(SEEDS))


def load_runs(out: Path, variant: str,
              seeds: tuple[int, ...] = SEEDS) -> dict[str, dict[int, dict]]:
    """strategy -> seed -> results.json, for the runs of ``seeds`` that finished."""
    runs: dict[str, dict[int, dict]] = {}
    for strategy in STRATEGIES:
        for seed in seeds:
            path = run_dir(out, variant, strategy, seed)
            if (path / DONE).is_file():
                runs.setdefault(strategy, {})[seed] = json.loads(
                    (path / "results.json").read_text())
    return runs


def per_client(results: dict, key: str = "final_ppl") -> dict[str, float]:
    return {c: v[key] for c, v in results["clients"].items() if v.get(key) is not None}


def units(by_seed: dict[int, dict], key: str = "final_ppl") -> dict[tuple[str, str], float]:
    """(seed, client) -> the client's final held-out perplexity in that seed's run."""
    return {(str(seed), client): value for seed, results in by_seed.items()
            for client, value in per_client(results, key).items()}


def matched(a: dict, b: dict) -> tuple[dict, dict]:
    """Both settings restricted to the units they share (a run still missing is left out)."""
    # In a's order, not a set's: the bootstrap draws units by position, and a set of
    # string tuples is ordered by hash, which changes with every process (PYTHONHASHSEED).
    common = [u for u in a if u in b]
    return {u: a[u] for u in common}, {u: b[u] for u in common}


def relative_difference(a: dict, b: dict):
    """Mean of 100 (a - b) / b over matched units, with its crossed seeds x clients
    bootstrap CI (:mod:`fedmoe.reporting.stats`)."""
    from fedmoe.reporting.stats import bootstrap_ci, crossed, paired_differences

    diff = paired_differences(a, b, relative=True)
    return bootstrap_ci(list(diff.values()), clusters=crossed(diff))


def upload_mb(results: dict) -> float:
    """Bytes uploaded per accepted client per round, in MB (2**20), mean over rounds
    (:mod:`fedmoe.reporting.metrics`)."""
    from fedmoe.reporting.metrics import MB, run_metrics

    return run_metrics(results).bytes_up_per_client_round / MB


def strategy_table(runs: dict[str, dict[int, dict]]) -> list[dict]:
    """One row per strategy, and first the base model every run starts from (``base``: each
    client's held-out perplexity before any training, as the fedmoe runs measured it)."""
    from fedmoe.reporting.stats import bootstrap_ci, crossed, win_rate

    reference = units(runs.get(REFERENCE, {}))
    settings: dict[str, tuple[dict, list[int], list[float], float]] = {}
    base = {seed: r for seed, r in runs.get(REFERENCE, {}).items() if per_client(r, BASE_KEY)}
    if base:
        settings[BASE] = (units(base, BASE_KEY), sorted(base),
                          [max(per_client(r, BASE_KEY).values()) for r in base.values()], 0.0)
    for strategy, by_seed in runs.items():
        if strategy != "fedmoe_pruned":
            settings[strategy] = (units(by_seed), sorted(by_seed),
                                  [max(per_client(r).values()) for r in by_seed.values()],
                                  float(np.mean([upload_mb(r) for r in by_seed.values()])))
    start = settings.get(BASE, ({},))[0]
    rows = []
    for strategy, (ppl, seeds, worst, upload) in settings.items():
        mean = bootstrap_ci(list(ppl.values()), clusters=crossed(ppl))
        row = {"strategy": strategy, "seeds": seeds,
               "ppl_mean": mean.mean, "ppl_mean_ci": [mean.low, mean.high],
               "ppl_worst": float(np.mean(worst)), "upload_mb_per_client_round": upload}
        trained, untrained = matched(ppl, start)
        if strategy != BASE and trained:
            better = win_rate(trained, untrained)
            row |= {"better_than_base": better.mean,
                    "better_than_base_ci": [better.low, better.high],
                    "better_than_base_units": better.n}
        if strategy != REFERENCE and reference:
            ours, theirs = matched(reference, ppl)
            if ours:
                diff, wins = relative_difference(ours, theirs), win_rate(ours, theirs)
                row |= {"units": len(ours), "fedmoe_vs_pct": diff.mean,
                        "fedmoe_vs_pct_ci": [diff.low, diff.high],
                        "fedmoe_wins": wins.mean, "fedmoe_wins_ci": [wins.low, wins.high]}
        rows.append(row)
    return rows


def plot_gains(runs: dict[str, dict[int, dict]], path: Path) -> Path | None:
    """fedmoe's per-client perplexity gain (%) over each other strategy, one point per client
    and seed, the mean and its 95% CI marked (``fedmoe/reporting/figures.py``)."""
    from fedmoe.reporting.figures import plot_gains_by_setting

    reference = units(runs.get(REFERENCE, {}))
    gains, intervals = {}, {}
    for strategy, by_seed in runs.items():
        if strategy in (REFERENCE, "fedmoe_pruned"):
            continue
        theirs, ours = matched(units(by_seed), reference)
        if ours:
            # gain over a baseline: 100 (baseline - fedmoe) / baseline
            gains[strategy] = {u: 100 * (theirs[u] - ours[u]) / theirs[u] for u in ours}
            diff = relative_difference(ours, theirs)
            intervals[strategy] = (-diff.mean, -diff.high, -diff.low)
    if not gains:
        return None
    return plot_gains_by_setting(gains, intervals, path, baseline="the strategy named below")


def pruning_summary(out: Path, variant: str, runs: dict[str, dict[int, dict]],
                    seeds: tuple[int, ...] = SEEDS) -> dict:
    from fedmoe.reporting.stats import bootstrap_ci, crossed, win_rate

    summary: dict = {}
    if "fedmoe_pruned" in runs and REFERENCE in runs:
        pruned, unpruned = matched(units(runs["fedmoe_pruned"]), units(runs[REFERENCE]))
        if pruned:
            cost = relative_difference(pruned, unpruned)
            summary["federated_cost_pct"] = {"mean": cost.mean, "ci": [cost.low, cost.high],
                                             "units": cost.n,
                                             "goal_met": cost.mean <= 100 * PRUNE_GOAL}
    personal, pooled, cost_pct = {}, {}, []
    coverage: dict[str, dict] = {"personalized": {}, "global": {}}
    for seed in seeds:
        path = out / variant / "pruning" / f"seed{seed}" / "bench_pruning.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        for r in record.get("rows", []):
            if (r["score"] == "tcess" and r["keep"] == PRUNE_KEEP and r["mode"] in coverage
                    and math.isfinite(r.get("coverage", math.nan))):
                coverage[r["mode"]][(str(seed), str(r["client"]))] = r["coverage"]
        for r in record["recovered"]:
            unit = (str(seed), str(r["client"]))
            (personal if r["mode"] == "personalized" else pooled)[unit] = r["ppl"]
            if r["mode"] == "personalized":
                cost_pct.append(100 * (r["ppl"] / r["ppl_unpruned"] - 1))
    personal, pooled = matched(personal, pooled)
    if personal:
        wins = win_rate(personal, pooled)
        summary["personalized_beats_global"] = {"share": wins.mean, "ci": [wins.low, wins.high],
                                                "units": wins.n,
                                                "goal_met": wins.mean >= PRUNE_WIN_GOAL}
        summary["recovered_cost_pct_vs_unpruned_same_steps"] = float(np.mean(cost_pct))
    for mode, values in coverage.items():
        if values:  # why pruning costs what it does: how much routing the kept half carries
            c = bootstrap_ci(list(values.values()), clusters=crossed(list(values)))
            summary[f"{mode}_coverage"] = {"mean": c.mean, "ci": [c.low, c.high],
                                           "units": c.n}
    return summary


def consistency_summary(out: Path, variant: str, seeds: tuple[int, ...] = SEEDS) -> dict:
    from fedmoe.reporting.stats import bootstrap_ci, crossed

    rows = {}
    for seed in seeds:
        path = out / variant / "consistency" / f"seed{seed}.json"
        if path.is_file():
            rows |= {(str(seed), str(r["client"])): r for r in json.loads(path.read_text())}
    if not rows:
        return {}
    summary = {}
    for key in ("srp", "lru_hit", "sch_hit"):
        base = np.array([r["base"][key] for r in rows.values()])
        personal = np.array([r["personalized"][key] for r in rows.values()])
        diff = bootstrap_ci(personal - base, clusters=crossed(list(rows)))
        summary[key] = {"base": float(base.mean()), "personalized": float(personal.mean()),
                        "difference": diff.mean, "ci": [diff.low, diff.high],
                        "personalized_higher": float(np.mean(personal > base)),
                        "units": diff.n}
    return summary


# ---- report -------------------------------------------------------------------------------
def fmt_ci(mean: float, ci: list[float] | None, digits: int = 2) -> str:
    if ci is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def markdown(variant: str, table: list[dict], pruning: dict, routing: dict) -> str:
    lines = [f"### {variant} split", "",
             "| strategy | seeds | mean client ppl [95% CI] | worst client ppl (mean over "
             "seeds) | fedmoe vs it, % [95% CI] | fedmoe better, share of clients [95% CI] "
             "| better than the base, share of clients [95% CI] | MB up / client / round |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        vs = fmt_ci(r["fedmoe_vs_pct"], r["fedmoe_vs_pct_ci"]) if "fedmoe_vs_pct" in r else "-"
        wins = fmt_ci(r["fedmoe_wins"], r["fedmoe_wins_ci"]) if "fedmoe_wins" in r else "-"
        improved = (fmt_ci(r["better_than_base"], r["better_than_base_ci"])
                    if "better_than_base" in r else "-")
        lines.append(f"| {r['strategy']} | {len(r['seeds'])} | "
                     f"{fmt_ci(r['ppl_mean'], r['ppl_mean_ci'])} | {r['ppl_worst']:.2f} | {vs} "
                     f"| {wins} | {improved} | {r['upload_mb_per_client_round']:.3f} |")
    if pruning:
        lines += ["", "| pruning at 50% kept | value [95% CI] | goal |", "|---|---|---|"]
        if "federated_cost_pct" in pruning:
            c = pruning["federated_cost_pct"]
            lines.append(f"| fedmoe pruned after round 2 vs unpruned, same rounds, ppl % "
                         f"| {fmt_ci(c['mean'], c['ci'])} | <= +3% "
                         f"({'met' if c['goal_met'] else 'missed'}) |")
        if "personalized_beats_global" in pruning:
            c = pruning["personalized_beats_global"]
            lines.append(f"| personalized beats global TCESS after recovery, share of clients "
                         f"| {fmt_ci(c['share'], c['ci'])} | >= 0.8 "
                         f"({'met' if c['goal_met'] else 'missed'}) |")
        for mode in ("personalized", "global"):
            if f"{mode}_coverage" in pruning:
                c = pruning[f"{mode}_coverage"]
                lines.append(f"| share of the client's routing choices (its unpruned model "
                             f"after round 4) that land on its {mode} TCESS half "
                             f"| {fmt_ci(c['mean'], c['ci'])} "
                             f"| (1.0: the other half unused; 0.5: uniform routing) |")
    if routing:
        lines += ["", "| routing on the client's own domain | base | personalized | "
                  "difference [95% CI] |", "|---|---|---|---|"]
        for key, label in (("srp", f"SRP (segment {SEGMENT})"),
                           ("lru_hit", "LRU hit rate, cache of 1/4 of the experts"),
                           ("sch_hit", f"SCH({SEGMENT}) hit rate, cache of 1/4")):
            c = routing[key]
            lines.append(f"| {label} | {c['base']:.4f} | {c['personalized']:.4f} | "
                         f"{fmt_ci(c['difference'], c['ci'], 4)} |")
    return "\n".join(lines) + "\n"


def run_record(out: Path, variants: list[str], strategies: list[str], seeds: list[int],
               overrides: list[str], recover_steps: int) -> list[str]:
    """Every missing run and analysis of ``variants`` in the record ``out``; what failed."""
    failed = []
    extra = list(overrides)
    if any(not (run_dir(out, v, s, seed) / DONE).is_file()
           for v in variants for s in strategies for seed in seeds):
        extra += check_base(out, overrides)  # only when a run is still to do
    for variant in variants:
        for seed in seeds:  # a seed's every run and analysis before the next seed
            for strategy in strategies:
                if not simulate(out, variant, strategy, seed, extra):
                    failed.append(f"{variant}/{strategy}/seed{seed}")
            if (run_dir(out, variant, REFERENCE, seed) / DONE).is_file():
                consistency(out, variant, seed)
                if not prune_bench(out, variant, seed, recover_steps):
                    failed.append(f"{variant}/pruning/seed{seed}")
    return failed


def write_report(out: Path, variants: Iterable[str] = VARIANTS) -> None:
    """The tables of every run of ``variants`` in the record ``out``, whatever subset of them
    a command ran."""
    report: dict = {}
    text = []
    for variant in variants:
        seeds = tuple(recorded_seeds(out, variant))
        runs = load_runs(out, variant, seeds)
        if not runs:
            continue
        table = strategy_table(runs)
        pruning = pruning_summary(out, variant, runs, seeds)
        routing = consistency_summary(out, variant, seeds)
        report[variant] = {"strategies": table, "pruning": pruning, "routing": routing}
        plot_gains(runs, out / f"research_{variant}_client_gains.png")
        text.append(markdown(variant, table, pruning, routing))
    print("\n".join(text))
    out.mkdir(parents=True, exist_ok=True)
    (out / "research.md").write_text("\n".join(text))
    (out / "research.json").write_text(json.dumps(report, indent=2))
    print(f"saved {out / 'research.json'} and {out / 'research.md'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides after experiment=research, for every run (a "
                             "changed setting is a different benchmark: use another --out)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the runs go (default: each variant's record kept in git, "
                             "which the command continues; another folder reruns everything)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="the runs to do (a report covers every run in its record)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--recover-steps", type=int, default=32,
                        help="local steps after pruning in the personalized-vs-global pairs "
                             "(the federated clients recover for 2 rounds x 16 steps)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    variants, strategies = args.variants.split(","), args.strategies.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    records: dict[Path, list[str]] = {}
    for variant in variants:
        out = (args.out or RECORDS[variant]).resolve()
        records.setdefault(out, []).append(variant)
    failed = []
    for out, its_variants in records.items():
        if not args.report_only:
            failed += run_record(out, its_variants, strategies, seeds, args.overrides,
                                 args.recover_steps)
        # A record of its own reports its own variants (the natural record also holds the
        # superseded Dirichlet runs); another folder reports every variant in it.
        write_report(out, VARIANTS if args.out else
                     [v for v in VARIANTS if RECORDS[v].resolve() == out])
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
