"""`fedmoe report <sweep dir>`: one table over every run of a sweep, mean ± std over seeds.

Every ``results.json`` under the directory is one run. Runs are grouped into settings by their
Hydra overrides (``.hydra/overrides.yaml``) other than the seed; the table has one row per
setting and one column per override that differs between settings, and each metric is the
mean ± sample std over the setting's seeds. Written into the sweep dir: ``report.md``,
``report.csv``, ``report_client_ppl.png`` and ``report_communication.png``.

With a baseline setting (``baseline=fedavg``), a second table compares every other setting
with it client by client: the units are (seed, client) pairs that both settings ran, and the
per-client perplexity gain, the win rate and their 95 % intervals come from a bootstrap that
resamples seeds and clients (:mod:`fedmoe.reporting.stats`). Also written: ``report_paired.csv``,
``report_paired.json`` and ``report_client_gains.png``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from fedmoe.config import ConfigError
from fedmoe.reporting.metrics import (
    MB,
    RunMetrics,
    cumulative_mb,
    final_ppl_by_client,
    run_metrics,
)
from fedmoe.reporting.stats import (
    Estimate,
    Unit,
    UnmatchedUnits,
    bootstrap_ci,
    crossed,
    paired_differences,
    win_rate,
)

# Config keys that differ between runs without being a setting (fallback without overrides).
_NOT_SETTINGS = {"run_dir", "fl.state_dir", "fl.base_model", "fl.audit_dir", "logger.group",
                 "logger.run_name", "cache_dir", "data.cache_dir"}


@dataclass
class Run:
    """One run of a sweep: its directory, overrides (key -> value) and ``results.json``."""

    path: Path
    overrides: dict[str, str]
    results: dict


@dataclass
class Metric:
    """A column of the table: its header, decimals and which of the run's
    :class:`~fedmoe.reporting.metrics.RunMetrics` it shows."""

    header: str
    decimals: int
    value: Callable[[RunMetrics], float | None]


METRICS: dict[str, Metric] = {
    "ppl": Metric("ppl (mean)", 2, lambda m: m.ppl_mean),
    "ppl_worst": Metric("ppl (worst)", 2, lambda m: m.ppl_worst),
    "base_ppl": Metric("base ppl", 2, lambda m: m.base_ppl_mean),
    "ppl_ratio": Metric("ppl / base", 3, lambda m: m.ppl_ratio),
    "improved": Metric("clients improved", 2, lambda m: m.improved_share),
    "train_loss": Metric("train loss", 3, lambda m: m.train_loss),
    "mb_up": Metric("MB up", 2, lambda m: m.bytes_up / MB),
    "mb_total": Metric("MB total", 2, lambda m: (m.bytes_up + m.bytes_down) / MB),
    "wall_s": Metric("s", 1, lambda m: m.wall_seconds),
}


# --- gathering ---------------------------------------------------------------------------------


def collect_runs(sweep_dir: str | Path) -> list[Run]:
    """Every run under ``sweep_dir`` (a directory with ``results.json``), sorted by path.

    Symbolic links to run directories are followed (a sweep put together from runs made
    elsewhere); a broken link, or a results.json that cannot be read, is a one-line error
    naming it.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"sweep dir {str(sweep_dir)!r} is not a directory")
    runs = [_read_run(path) for path in _results_files(root)]
    if not runs:
        raise FileNotFoundError(f"no results.json under {sweep_dir}: is it the directory of "
                                "a `fedmoe simulate -m ...` sweep (hydra.sweep.dir)?")
    if any(r.overrides is None for r in runs):  # not all Hydra jobs: settings from the configs
        for run, overrides in zip(runs, _config_differences(runs), strict=True):
            run.overrides = overrides
    return runs


def _results_files(root: Path) -> list[Path]:
    """``results.json`` files under ``root``, following links to directories (each real
    directory walked once, so a link to an ancestor cannot loop)."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            if entry.is_symlink() and not entry.exists():
                raise FileNotFoundError(f"{entry} is a broken link (to {os.readlink(entry)})")
        if "results.json" in filenames:
            found.append(Path(dirpath) / "results.json")
    return sorted(found)


def _read_run(path: Path) -> Run:
    """The run whose ``results.json`` is ``path`` (overrides from Hydra's record, if any)."""
    try:
        results = json.loads(path.read_text())
        overrides_file = path.parent / ".hydra" / "overrides.yaml"
        overrides = (parse_overrides(yaml.safe_load(overrides_file.read_text()) or [])
                     if overrides_file.is_file() else None)
    except (OSError, ValueError, yaml.YAMLError) as error:  # JSONDecodeError is a ValueError
        raise FileNotFoundError(f"cannot read the run in {path.parent}: "
                                f"{str(error).splitlines()[0]}") from error
    if not isinstance(results, dict) or not isinstance(results.get("rounds", []), list):
        raise FileNotFoundError(f"{path} is not a fedmoe results.json (no rounds list)")
    return Run(path.parent, overrides, results)


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """``["+a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}``; Hydra's own keys are left out."""
    parsed = {}
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra."):
            parsed[key] = value
    return parsed


def _config_differences(runs: list[Run]) -> list[dict[str, str]]:
    flat = [_flatten(r.results.get("config", {})) for r in runs]
    keys = {k for f in flat for k in f} - _NOT_SETTINGS
    varying = sorted(k for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1)
    return [{k: json.dumps(f.get(k)).strip('"') for k in varying} for f in flat]


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


# --- the table ---------------------------------------------------------------------------------


@dataclass
class Setting:
    """The runs of one setting (same overrides but the seed) and their metric statistics."""

    overrides: dict[str, str]
    runs: list[Run]
    seeds: list[str] = field(default_factory=list)
    mean: dict[str, float | None] = field(default_factory=dict)
    std: dict[str, float | None] = field(default_factory=dict)

    def label(self, keys: list[str]) -> str:
        """``k=v`` of the ``keys`` this setting overrides (a key it leaves at its default is
        left out, not shown as ``k=-``); ``defaults`` when it overrides none of them."""
        parts = [f"{k}={self.overrides[k]}" for k in keys if k in self.overrides]
        return ", ".join(parts) or ("defaults" if keys else "all runs")


@dataclass
class Report:
    """Settings in first-seen order, the override keys that tell them apart, the rest."""

    settings: list[Setting]
    keys: list[str]
    common: dict[str, str]
    seed_key: str


def summarize(runs: list[Run], seed_key: str = "seed") -> Report:
    """Group ``runs`` by their overrides other than ``seed_key``; mean and std per metric."""
    groups: dict[str, Setting] = {}
    for run in runs:
        setting = {k: v for k, v in run.overrides.items() if k != seed_key}
        key = json.dumps(setting, sort_keys=True)
        groups.setdefault(key, Setting(setting, [])).runs.append(run)
    settings = list(groups.values())
    all_keys = list(dict.fromkeys(k for s in settings for k in s.overrides))
    keys = [k for k in all_keys if len({s.overrides.get(k) for s in settings}) > 1]
    common = {k: settings[0].overrides[k] for k in all_keys
              if k not in keys and k in settings[0].overrides}
    for s in settings:
        metrics = [run_metrics(r.results) for r in s.runs]
        s.seeds = [str(r.overrides.get(seed_key, r.results.get("config", {}).get(seed_key, "?")))
                   for r in s.runs]
        for name, metric in METRICS.items():
            values = [v for v in map(metric.value, metrics) if v is not None]
            s.mean[name] = statistics.fmean(values) if values else None
            s.std[name] = statistics.stdev(values) if len(values) > 1 else None
    return Report(settings, keys, common, seed_key)


def to_markdown(report: Report) -> str:
    """The table as GitHub markdown: ``mean ± std`` (std over seeds; none with one seed)."""
    header = [*report.keys, "runs", *(m.header for m in METRICS.values())]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < len(report.keys) else "---:"
                            for i in range(len(header))) + "|"]
    for s in report.settings:
        cells = [s.overrides.get(k, "-") for k in report.keys]
        cells.append(f"{len(s.runs)} ({report.seed_key} {','.join(s.seeds)})")
        cells += [_cell(s.mean[n], s.std[n], m.decimals) for n, m in METRICS.items()]
        lines.append("| " + " | ".join(cells) + " |")
    if report.common:
        common = " ".join(f"{k}={v}" for k, v in report.common.items())
        lines.append(f"\ncommon overrides: {common}")
    return "\n".join(lines) + "\n"


def _cell(mean: float | None, std: float | None, decimals: int) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.{decimals}f}" + ("" if std is None else f" ± {std:.{decimals}f}")


def write_csv(report: Report, path: str | Path) -> Path:
    """One row per setting: the distinguishing overrides, runs, seeds, ``<metric>_mean/_std``."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*report.keys, "runs", "seeds",
                         *(f"{n}_{stat}" for n in METRICS for stat in ("mean", "std"))])
        for s in report.settings:
            stats = [s.mean[n] if stat == "mean" else s.std[n]
                     for n in METRICS for stat in ("mean", "std")]
            writer.writerow([*(s.overrides.get(k, "") for k in report.keys), len(s.runs),
                             " ".join(s.seeds), *("" if v is None else v for v in stats)])
    return path


# --- the paired table --------------------------------------------------------------------------


@dataclass
class Paired:
    """One setting against the baseline over their matched units (seed, client).

    ``gains`` is the per-unit perplexity gain in percent of the baseline's perplexity,
    ``100 * (ppl_baseline - ppl) / ppl_baseline``: above 0, the setting is better.
    """

    label: str
    overrides: dict[str, str]
    gains: dict[Unit, float]
    gain: Estimate
    win_rate: Estimate
    ppl_worst: float | None  # mean over seeds of the worst client's perplexity
    seeds: int
    clients: int


def find_baseline(report: Report, baseline: str) -> Setting:
    """The one setting that ``baseline`` names: its label (``strategy=fedavg, lr=0.1``), one
    of its ``key=value`` overrides, or one of their values (``fedavg``)."""
    def names(s: Setting) -> set[str]:
        parts = {f"{k}={s.overrides[k]}" for k in report.keys if k in s.overrides}
        return {s.label(report.keys), *parts, *(p.partition("=")[2] for p in parts)}

    found = [s for s in report.settings if baseline in names(s)]
    if len(found) != 1:
        labels = "; ".join(s.label(report.keys) for s in report.settings)
        raise ConfigError(f"baseline={baseline} names {len(found)} settings, not one; "
                          f"the settings: {labels}")
    return found[0]


def paired_report(report: Report, baseline: Setting, *, confidence: float = 0.95,
                  n_resamples: int = 10_000, seed: int = 0) -> list[Paired]:
    """Every setting but ``baseline`` against it, unit by unit (see :class:`Paired`)."""
    base = _units(baseline)
    paired = []
    for s in report.settings:
        if s is baseline:
            continue
        units = _units(s)
        try:
            # paired_differences is (ppl - base) / base: a gain is its opposite
            gains = {u: -d for u, d in paired_differences(units, base, relative=True).items()}
        except UnmatchedUnits as error:
            raise _unmatched(error, (s, baseline), report.keys) from None
        bootstrap = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
        paired.append(Paired(
            s.label(report.keys), s.overrides, gains,
            bootstrap_ci(list(gains.values()), clusters=crossed(gains), **bootstrap),
            win_rate(units, base, **bootstrap), s.mean["ppl_worst"],
            seeds=len({u[0] for u in gains}), clients=len({u[1] for u in gains})))
    return paired


def _units(s: Setting) -> dict[Unit, float]:
    """(seed, client id) -> final perplexity of every evaluated client of every run."""
    units, runs = {}, {}
    for seed, run in zip(s.seeds, s.runs, strict=True):
        if seed in runs:  # a unit would stand for two runs
            raise ConfigError(f"baseline: runs {runs[seed].path} and {run.path} both have seed "
                              f"{seed}; paired statistics need one run per seed and setting")
        runs[seed] = run
        for cid, ppl in final_ppl_by_client(run.results).items():
            units[seed, cid] = ppl
    return units


def _unmatched(error: UnmatchedUnits, pair: tuple[Setting, Setting], keys: list[str]):
    """One line: the first unit one setting of ``pair`` has and the other lacks, its run."""
    has, lacks = pair if error.only_a else pair[::-1]
    seed, cid = (error.only_a or error.only_b)[0]
    run = dict(zip(has.seeds, has.runs, strict=True))[seed].path
    other = dict(zip(lacks.seeds, lacks.runs, strict=True)).get(seed)
    missing = (f"not in {lacks.label(keys)} (run {other.path}: no final_ppl)" if other
               else f"{lacks.label(keys)} has no run of seed {seed}")
    return ConfigError(f"baseline: client {cid} of seed {seed} is in {has.label(keys)} (run "
                       f"{run}) but {missing}; paired statistics need the same seeds and "
                       "clients in both settings")


def paired_markdown(paired: list[Paired], baseline: Setting, keys: list[str],
                    confidence: float = 0.95) -> str:
    """The paired table: gain (%) and win rate with their intervals, worst clients, units."""
    level = f"{confidence:.0%} CI"
    lines = [f"paired vs baseline {baseline.label(keys)} (worst-client ppl "
             f"{_cell(baseline.mean['ppl_worst'], None, 2)}); gain = perplexity below the "
             "baseline's, % of it, per client and seed", "",
             f"| setting | ppl gain % [{level}] | win rate [{level}] | ppl (worst) "
             "| units (clients × seeds) |", "|---|---:|---:|---:|---:|"]
    for p in paired:
        lines.append(f"| {p.label} | {_interval(p.gain, 2)} | {_interval(p.win_rate, 2)} "
                     f"| {_cell(p.ppl_worst, None, 2)} | {p.gain.n} ({p.clients} × {p.seeds}) |")
    return "\n".join(lines) + "\n"


def _interval(e: Estimate, decimals: int) -> str:
    return f"{e.mean:.{decimals}f} [{e.low:.{decimals}f}, {e.high:.{decimals}f}]"


def write_paired(paired: list[Paired], baseline: Setting, keys: list[str], out: Path,
                 bootstrap: Mapping[str, Any]) -> dict[str, Path]:
    """``report_paired.csv`` (one row per setting) and ``report_paired.json`` (also every
    unit's gain), for a benchmark script to read."""
    rows = [{"setting": p.label, **{k: p.overrides.get(k, "") for k in keys},
             "units": p.gain.n, "clients": p.clients, "seeds": p.seeds,
             **{f"gain_pct_{k}": getattr(p.gain, k) for k in ("mean", "low", "high")},
             **{f"win_rate_{k}": getattr(p.win_rate, k) for k in ("mean", "low", "high")},
             "ppl_worst": p.ppl_worst, "baseline_ppl_worst": baseline.mean["ppl_worst"]}
            for p in paired]
    with (out / "report_paired.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["setting"])
        writer.writeheader()
        writer.writerows(rows)
    document = {
        "baseline": baseline.label(keys), "baseline_overrides": baseline.overrides,
        "bootstrap": {**bootstrap, "interval": "percentile",
                      "resampling": "seeds and clients independently (pigeonhole)"},
        "settings": [{**row, "gains_pct": [{"seed": s, "client": c, "gain_pct": g}
                                           for (s, c), g in p.gains.items()]}
                     for row, p in zip(rows, paired, strict=True)],
    }
    (out / "report_paired.json").write_text(json.dumps(document, indent=2))
    return {"paired_csv": out / "report_paired.csv", "paired_json": out / "report_paired.json"}


# --- the command -------------------------------------------------------------------------------


def write_report(sweep_dir: str | Path, seed_key: str = "seed",
                 out_dir: str | Path | None = None, baseline: str | None = None,
                 bootstrap: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Path]]:
    """Gather the sweep, write ``report.md``, ``report.csv`` and the figures.

    Parameters
    ----------
    baseline : str, optional
        A setting (see :func:`find_baseline`): adds the paired table and its files.
    bootstrap : Mapping, optional
        ``confidence``, ``n_resamples`` and ``seed`` of the paired table's intervals.

    Returns
    -------
    tuple[str, dict[str, Path]]
        The markdown table(s) and name -> path of every file written.
    """
    from fedmoe.reporting.figures import plot_communication_by_setting, plot_perplexity_by_setting

    report = summarize(collect_runs(sweep_dir), seed_key)
    out = Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown, files = to_markdown(report), {}
    if baseline is not None:
        bootstrap = {"confidence": 0.95, "n_resamples": 10_000, "seed": 0, **(bootstrap or {})}
        paired_md, files = _write_paired_section(report, baseline, bootstrap, out)
        markdown += "\n" + paired_md
    (out / "report.md").write_text(f"# Sweep report: {Path(sweep_dir).resolve()}\n\n{markdown}")
    per_client, cumulative = {}, {}
    for s in report.settings:
        label = s.label(report.keys)
        per_client[label] = {}
        for run in s.runs:
            for cid, ppl in final_ppl_by_client(run.results).items():
                per_client[label].setdefault(cid, []).append(ppl)
        cumulative[label] = [cumulative_mb(run.results) for run in s.runs]
    return markdown, {
        **files,
        "markdown": out / "report.md",
        "csv": write_csv(report, out / "report.csv"),
        "client_ppl": plot_perplexity_by_setting(per_client, out / "report_client_ppl.png"),
        "communication": plot_communication_by_setting(cumulative,
                                                       out / "report_communication.png"),
    }


def _write_paired_section(report: Report, baseline: str, bootstrap: dict[str, Any],
                          out: Path) -> tuple[str, dict[str, Path]]:
    """The paired table's markdown, and its CSV, JSON and figure written into ``out``."""
    from fedmoe.reporting.figures import plot_gains_by_setting

    base = find_baseline(report, baseline)
    if len(report.settings) == 1:
        raise ConfigError(f"baseline={baseline}: the sweep has no other setting to compare")
    paired = paired_report(report, base, **bootstrap)
    files = write_paired(paired, base, report.keys, out, bootstrap)
    files["client_gains"] = plot_gains_by_setting(
        {p.label: p.gains for p in paired},
        {p.label: (p.gain.mean, p.gain.low, p.gain.high) for p in paired},
        out / "report_client_gains.png", baseline=base.label(report.keys))
    return paired_markdown(paired, base, report.keys, bootstrap["confidence"]), files


def main(cfg: DictConfig) -> str:
    """Hydra task of ``fedmoe report <sweep dir>``: print the table, name the files."""
    markdown, files = write_report(cfg.sweep_dir, cfg.seed_key, cfg.out_dir, cfg.baseline,
                                   cfg.bootstrap)
    print(markdown)
    for path in files.values():
        print(f"wrote {path}")
    return markdown
