"""Weights & Biases tracking of a federated run (``logger=wandb``; ``logger=none`` turns it off).

One W&B run per experiment, opened and fed by the ServerApp: the resolved Hydra config, one
history row per round (step = round: train loss, the clients' perplexities, bytes down/up and
cumulative, pruning statistics when the clients report them), then a per-client table and
the run's plots, and as W&B artifacts the run's report (``results.json`` and ``plots/``) and,
opt-in with ``logger.log_models=true``, each client's exported model. Offline unless you are
logged in (``logger.mode=auto``); a sweep's runs share one W&B group. This wandb writes only
the transaction log (``run-<id>.wandb``) offline, no ``config.yaml`` or ``wandb-summary.json``;
``wandb sync <run dir>/wandb/offline-run-*`` uploads it later (artifacts included).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedmoe.artifacts import MODEL_DIR, RESULTS_FILE, client_dirs
from fedmoe.reporting.metrics import is_number, run_metrics, spread

log = logging.getLogger(__name__)
# Keys of an eval reply that are not client statistics.
_NOT_STATS = {"num-examples", "client-id", "eval_ppl", "base_ppl"}
# Eval-reply keys reported by pruning clients (fedmoe.prune via fedmoe.client.local).
_PRUNE_PREFIXES = ("experts_kept", "routed_mb")
# Keys of a results.json round entry that round_metrics logs under its own names.
_ROUND_KEYS = {"round", "train_loss", "eval_ppl", "eval_ppl_mean", "eval_ppl_worst",
               "eval_ppl_by_client", "bytes_down", "bytes_up", "payload_bytes", "wall_seconds",
               "accepted", "rejected"}


class Tracker:
    """What the ServerApp calls; this base class tracks nothing (``logger=none``)."""

    def log_round(self, entry: Mapping[str, Any], train_metrics: Mapping | None = None,
                  eval_by_client: Mapping | None = None) -> None:
        """Log one round: its ``results.json`` entry and the strategy's metrics."""

    def finish(self, results: Mapping[str, Any], plots: Mapping[str, Path] | None = None) -> None:
        """Log the end of the run: per-client table, plots, summary; close the run."""

    def close(self, exit_code: int = 0) -> None:
        """Close the run without logging (on error)."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=1 if exc_type else 0)


def build_tracker(cfg: DictConfig) -> Tracker:
    """The tracker ``cfg.logger`` asks for (``name: none | wandb``)."""
    logger = cfg.get("logger") or {}
    if logger.get("name", "none") == "none" or wandb_mode(logger.get("mode", "auto")) == "disabled":
        return Tracker()
    return WandbTracker(cfg)


def wandb_mode(mode: str) -> str:
    """``auto`` -> ``$WANDB_MODE`` if set, else online when an API key is found, else offline.

    The key is looked up locally (``WANDB_API_KEY``, ``wandb login``'s netrc entry or
    settings file), never checked against the server.
    """
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import wandb

    try:
        return "online" if wandb.login(prompt=False, verify=False) else "offline"
    except Exception:  # a malformed netrc entry or settings file must not stop a run
        return "offline"


class WandbTracker(Tracker):
    """One W&B run for a federated run (see the module docstring).

    Parameters
    ----------
    cfg : DictConfig
        The composed ``simulate`` config; ``cfg.logger`` as in ``conf/logger/wandb.yaml``,
        ``cfg.run_dir`` the run directory.
    """

    def __init__(self, cfg: DictConfig) -> None:
        import wandb

        self.wandb = wandb
        lg, run_dir = cfg.logger, Path(cfg.run_dir or ".")
        root = Path(lg.get("dir") or run_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.mode = wandb_mode(lg.get("mode", "auto"))
        self.log_plots = bool(lg.get("log_plots", True))
        self.log_artifacts = bool(lg.get("log_artifacts", True))
        self.log_models = bool(lg.get("log_models", False))
        self.run_dir = run_dir
        self.state_dir = Path(cfg.fl.state_dir or run_dir / "clients") if "fl" in cfg else None
        self.run = wandb.init(
            project=lg.get("project", "fedmoe"), entity=lg.get("entity"), group=lg.get("group"),
            name=lg.get("run_name") or run_dir.name, tags=list(lg.get("tags") or []),
            job_type=str(cfg.strategy.name) if "strategy" in cfg else None,
            config=OmegaConf.to_container(cfg, resolve=True), dir=str(root), mode=self.mode,
            reinit="finish_previous",
            settings=wandb.Settings(silent=not cfg.get("verbose", False), console="off",
                                    disable_git=True, save_code=False, x_disable_stats=True),
        )
        self.cumulative = {"bytes_down": 0, "bytes_up": 0}
        self.last_round: int | None = None

    def log_round(self, entry: Mapping[str, Any], train_metrics: Mapping | None = None,
                  eval_by_client: Mapping | None = None) -> None:
        metrics = round_metrics(entry, self.cumulative, train_metrics, eval_by_client)
        ppl = list(entry.get("eval_ppl_by_client", {}).values())
        if ppl:
            metrics["ppl/clients"] = self.wandb.Histogram(ppl)
        self.last_round = int(entry["round"])
        self.run.log(metrics, step=self.last_round)

    def finish(self, results: Mapping[str, Any], plots: Mapping[str, Path] | None = None) -> None:
        columns, rows = client_table(results)
        final: dict[str, Any] = {"tables/clients": self.wandb.Table(columns=columns, data=rows)}
        if self.log_plots:
            final |= {f"plots/{name}": self.wandb.Image(str(path))
                      for name, path in (plots or {}).items()}
        self.run.log(final, step=self.last_round)
        self.run.summary.update(summary_metrics(results))
        try:
            self._log_artifacts(results)
        except Exception as error:  # an artifact must not fail a finished run
            log.warning("W&B artifacts not logged: %s", error)
        self.close()

    def _log_artifacts(self, results: Mapping[str, Any]) -> None:
        name = _artifact_name(self.run.name)
        if self.log_artifacts and (self.run_dir / RESULTS_FILE).is_file():
            self.run.log_artifact(report_artifact(self.run_dir, name, summary_metrics(results)))
        if self.log_models and self.state_dir is not None:
            for artifact in model_artifacts(self.state_dir, name):
                self.run.log_artifact(artifact)

    def close(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        run.finish(exit_code=exit_code)
        if self.mode == "offline":
            where = Path(run.dir).parent  # <dir>/wandb/offline-run-*/files -> offline-run-*
            print(f"W&B offline run; upload it with: wandb sync {where}")
        elif self.mode == "online":
            print(f"W&B run: {run.url}")


# --- artifacts ---------------------------------------------------------------------------------


def report_artifact(run_dir: Path, name: str, summary: Mapping[str, Any]):
    """The run's report as an artifact ``<name>-report`` (type ``run-report``): its
    ``results.json`` and ``plots/``, with the summary metrics as metadata."""
    import wandb

    artifact = wandb.Artifact(f"{name}-report", type="run-report", metadata=dict(summary),
                              description="fedmoe results.json and plots of one run")
    artifact.add_file(str(run_dir / RESULTS_FILE))
    if (run_dir / "plots").is_dir():
        artifact.add_dir(str(run_dir / "plots"), name="plots")
    return artifact


def model_artifacts(state_dir: Path, name: str) -> list:
    """One artifact ``<name>-client-<id>`` (type ``model``) per client export found under
    ``state_dir`` (``client_*/model``), its model card's fedmoe metadata attached. Opt-in:
    an export holds the client's routed experts, which otherwise never leave it."""
    import wandb

    from fedmoe.prune.card import read_card

    artifacts = []
    for client, folder in client_dirs(state_dir).items():
        model_dir = folder / MODEL_DIR
        if not (model_dir / "config.json").is_file():
            continue
        meta = read_card(model_dir).data.to_dict().get("fedmoe", {}) \
            if (model_dir / "README.md").is_file() else {}
        artifact = wandb.Artifact(f"{name}-client-{client}", type="model", metadata={
            k: v for k, v in meta.items() if k != "config"} | {"client": client})
        artifact.add_dir(str(model_dir))
        artifacts.append(artifact)
    return artifacts


def _artifact_name(run_name: str | None, limit: int = 100) -> str:
    """The run's name as the stem of its artifacts' names: letters, digits, ``-``, ``_`` and
    ``.`` only (a sweep's job directories hold ``=`` and ``,``), at most ``limit`` characters
    (W&B takes 128 in all; a longer name keeps its start and a hash of the whole)."""
    name = re.sub(r"[^\w.-]+", "-", run_name or "run").strip("-") or "run"
    if len(name) <= limit:
        return name
    return f"{name[:limit - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


# --- what is logged (plain dicts; no wandb import) ----------------------------------------------


def round_metrics(entry: Mapping[str, Any], cumulative: dict[str, int],
                  train_metrics: Mapping | None = None,
                  eval_by_client: Mapping | None = None) -> dict[str, float]:
    """The history row of one round.

    Parameters
    ----------
    entry : Mapping
        The round's ``results.json`` entry (``fedmoe.fl.results.round_entry``).
    cumulative : dict
        Running ``bytes_down`` / ``bytes_up`` totals, updated in place.
    train_metrics : Mapping, optional
        The aggregated train metrics of the round (``RoundLog.train_metrics``).
    eval_by_client : Mapping, optional
        Client id -> its evaluate metrics (``RoundLog.eval_by_client``).

    Returns
    -------
    dict
        ``round``, ``train/*``, ``ppl/*`` (``mean``, ``worst``, ``best``, ``std``,
        ``weighted``, ``base_mean``, ``client_<id>``), ``comm/*`` (bytes of the round and
        cumulative), ``clients/*`` (accepted, rejected), ``time/round_s``, and the clients'
        other evaluate metrics when reported: ``prune/*`` (``experts_kept``, ``routed_mb``,
        per client and mean) and ``eval/*`` (mean).
    """
    cumulative["bytes_down"] += int(entry["bytes_down"])
    cumulative["bytes_up"] += int(entry["bytes_up"])
    row: dict[str, float] = {
        "round": int(entry["round"]),
        "comm/bytes_down": int(entry["bytes_down"]), "comm/bytes_up": int(entry["bytes_up"]),
        "comm/cum_bytes_down": cumulative["bytes_down"],
        "comm/cum_bytes_up": cumulative["bytes_up"],
        "comm/cum_bytes": cumulative["bytes_down"] + cumulative["bytes_up"],
        "clients/accepted": len(entry.get("accepted", [])),
        "clients/rejected": len(entry.get("rejected", {})),
        "time/round_s": float(entry["wall_seconds"]),
    }
    row |= _drop_none({"train/loss": entry.get("train_loss"),
                       "ppl/weighted": entry.get("eval_ppl")})
    for key, value in (train_metrics or {}).items():
        if key not in ("num-examples", "client-id", "train_loss") and is_number(value):
            row[f"train/{key}"] = float(value)
    row |= _ppl_metrics(entry.get("eval_ppl_by_client", {}))
    row |= _client_stats({str(c): m for c, m in (eval_by_client or {}).items()})
    for key, value in entry.items():  # round-level keys added later (e.g. by pruning)
        if key not in _ROUND_KEYS and is_number(value):
            row[f"{_namespace(key)}/{key}"] = float(value)
    return row


def _ppl_metrics(by_client: Mapping[str, float]) -> dict[str, float]:
    row = {f"ppl/{k}": v for k, v in spread(by_client.values()).items()}
    return row | {f"ppl/client_{c}": float(v) for c, v in by_client.items()}


def _client_stats(eval_by_client: Mapping[str, Mapping]) -> dict[str, float]:
    """Base perplexity, pruning statistics (per client and mean) and other eval metrics (mean)."""
    per_key: dict[str, dict[str, float]] = {}
    for client, metrics in eval_by_client.items():
        kept = [v for k, v in metrics.items() if k.startswith("experts_kept.")]
        if kept:  # experts_kept.<layer> -> one number per client
            per_key.setdefault("experts_kept", {})[client] = float(sum(kept))
        for key, value in metrics.items():
            if key not in _NOT_STATS and not key.startswith("experts_kept.") and is_number(value):
                per_key.setdefault(key, {})[client] = float(value)
    row = {}
    base = [float(m["base_ppl"]) for m in eval_by_client.values() if is_number(m.get("base_ppl"))]
    if base:
        row["ppl/base_mean"] = statistics.fmean(base)
    for key, values in per_key.items():
        namespace = _namespace(key)
        name = key.removeprefix("eval_")
        row[f"{namespace}/{name}_mean"] = statistics.fmean(values.values())
        if namespace == "prune":
            row |= {f"prune/{key}/client_{c}": v for c, v in values.items()}
    return row


def summary_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The run's headline numbers (:mod:`fedmoe.reporting.metrics`): final and base perplexity
    over clients, bytes, time."""
    m = run_metrics(results)
    out = {
        "final/ppl_mean": m.ppl_mean,
        "final/ppl_worst": m.ppl_worst,
        "final/base_ppl_mean": m.base_ppl_mean,
        "final/ppl_ratio": m.ppl_ratio,
        "final/clients_improved": m.clients_improved,
        "comm/total_bytes_down": m.bytes_down,
        "comm/total_bytes_up": m.bytes_up,
        "payload_bytes": results.get("payload_bytes"),
        "trainable_bytes": results.get("trainable_bytes"),
        "wall_seconds": m.wall_seconds,
        "num_rounds": m.rounds,
    }
    return _drop_none(out)


def client_table(results: Mapping[str, Any]) -> tuple[list[str], list[list]]:
    """Columns and rows of the per-client table: every number ``results.json`` holds per client
    (nested dicts flattened as ``key.sub``; ``experts_kept`` also summed over layers), plus
    ``ppl_ratio`` = final / base perplexity. Columns empty for every client are left out."""
    flat = {}
    for cid, entry in results.get("clients", {}).items():
        row: dict[str, Any] = {"client": int(cid)}
        for key, value in entry.items():
            if isinstance(value, Mapping):
                row |= {f"{key}.{k}": v for k, v in value.items() if is_number(v)}
                if key == "experts_kept" and value:
                    row["experts_kept"] = sum(value.values())
            elif is_number(value):
                row[key] = value
        if is_number(row.get("final_ppl")) and is_number(row.get("base_ppl")):
            row["ppl_ratio"] = row["final_ppl"] / row["base_ppl"]
        flat[cid] = row
    columns: list[str] = []
    for row in flat.values():
        columns += [k for k in row if k not in columns]
    return columns, [[row.get(c) for c in columns] for row in flat.values()]


def _namespace(key: str) -> str:
    return "prune" if key.startswith(_PRUNE_PREFIXES) else "eval"


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}
