"""`fedmoe simulate`: many virtual clients on one machine with Flower's Simulation Engine.

The Hydra app composes the config, makes sure the base model exists (pretraining it if
needed), then runs the same ServerApp and ClientApp that `flwr run .` runs, on the Ray
backend, with N virtual SuperNodes. The config reaches both apps through the one bridge
(`fedmoe.fl.bridge`): the Hydra overrides, carried in the run config.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from fedmoe.artifacts import RESULTS_FILE, write_json
from fedmoe.fl.backend import backend_config
from fedmoe.fl.bridge import RUN_CONFIG_KEY, to_run_config
from fedmoe.fl.objective import objective_value
from fedmoe.fl.results import run_failure
from fedmoe.memory import GiB, PeakMemory, available_bytes, checkpoint_bytes, limit_kernel_cache
from fedmoe.prune.summary import print_pruning_summary
from fedmoe.reporting.summary import print_summary

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
limit_kernel_cache()  # Ray's client actors inherit the driver's environment


def _write_app_dir(app_dir: Path, run_config: dict[str, str]) -> None:
    """A minimal Flower App declaration whose run config carries the Hydra overrides.

    The Simulation Engine fuses a node's run config from the app directory's
    ``[tool.flwr.app.config]``; this is the same key `flwr run . --run-config` sets.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    value = json.dumps(run_config[RUN_CONFIG_KEY])  # a TOML basic string is JSON-compatible
    (app_dir / "pyproject.toml").write_text(
        '[project]\nname = "fedmoe-run"\nversion = "0.0.0"\n\n'
        '[tool.flwr.app]\npublisher = "fedmoe"\n\n'
        '[tool.flwr.app.components]\nserverapp = "fedmoe.fl.server_app:app"\n'
        'clientapp = "fedmoe.fl.client_app:app"\n\n'
        f"[tool.flwr.app.config]\n{RUN_CONFIG_KEY} = {value}\n"
    )


def run_simulation_engine(run_config: dict[str, str], num_supernodes: int, app_dir: Path,
                          client_resources: dict, verbose: bool = False,
                          node_config: dict | None = None,
                          backend: dict | None = None) -> None:
    """Run fedmoe's ServerApp and ClientApp on the Simulation Engine (Ray backend).

    ``flwr.simulation.run_simulation`` leaves ``context.run_config`` empty, so this calls the
    engine it wraps with a ``Run`` that carries the run config (Flower 1.42, pinned). Every
    virtual SuperNode sees ``node_config`` (e.g. its privacy policy) in its node config.
    """
    if not verbose:  # importing flwr logs alembic's plugin setup at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)
    from flwr.app import Context, RecordDict
    from flwr.supercore.run import Run

    from fedmoe.fl.client_app import app as client_app
    from fedmoe.fl.policy import NodeConfigApp
    from fedmoe.fl.server_app import app as server_app

    if node_config:
        client_app = NodeConfigApp(client_app, node_config)

    # The module, not the function `flwr.simulation` re-exports under the same name.
    engine = importlib.import_module("flwr.simulation.run_simulation")
    _write_app_dir(app_dir, run_config)
    # The Run that `_run_simulation` would create itself, plus our run config.
    run = Run.create_empty(run_id=engine.generate_rand_int_from_bytes(engine.RUN_ID_NUM_BYTES))
    run.primary_task_id = engine.generate_rand_int_from_bytes(engine.TASK_ID_NUM_BYTES)
    run.federation_id = engine.NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    engine.TaskIdentity.task_id = 1
    engine.TaskIdentity.run_id = run.run_id
    engine.TaskIdentity.node_id = engine.SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    engine_config = backend_config({"client_resources": client_resources,
                                    "backend": backend or {}}, verbose)
    _quiet_flower(verbose)  # after the imports: flwr sets its logger's level on import
    engine._run_simulation(
        num_supernodes=num_supernodes, client_app=client_app, server_app=server_app,
        backend_name="ray", backend_config=engine_config, server_app_context=context,
        app_dir=str(app_dir), is_app=True, run=run, verbose_logging=verbose,
        exit_event=engine.EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
    )


def _quiet_flower(verbose: bool) -> None:
    """Flower and Ray log floods only with ``verbose=true``."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        # fedmoe.fl: the strategy's per-round INFO lines (RoundReporter prints one line).
        for name in ("flwr", "alembic", "ray", "fedmoe.fl"):
            logging.getLogger(name).setLevel(logging.WARNING)


def simulation_overrides(cfg: DictConfig, task_overrides: list[str], run_dir: Path,
                         base_model: Path, sweep_group: str | None = None) -> list[str]:
    """The user's overrides plus what only this launch knows (run dir, base model, and
    under ``-m`` the sweep's W&B group). Values are quoted where Hydra would misread them:
    a sweep's job directories hold ``=`` and ``,``."""
    from fedmoe.compose import hydra_value

    extra = [f"run_dir={hydra_value(run_dir)}", f"fl.base_model={hydra_value(base_model)}"]
    if not cfg.fl.state_dir:
        extra.append(f"fl.state_dir={hydra_value(run_dir / 'clients')}")
    if sweep_group and "group" in cfg.logger and not cfg.logger.group:
        extra.append(f"logger.group={hydra_value(sweep_group)}")
    keys = {e.split("=", 1)[0] for e in extra}
    return [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") not in keys] + extra


# Memory of one client actor beyond its base model: Python, torch, transformers, Ray's
# worker (measured about 0.5 GB on this machine), plus a quarter of the model for the
# trainable tensors, optimizer state and activations of a LoRA run.
ACTOR_OVERHEAD_BYTES = 768 * 2**20
ACTOR_MODEL_FACTOR = 1.25


def max_concurrent(cfg: DictConfig, base: str | Path, cpus: int,
                   available: int | None = None) -> tuple[int, str]:
    """How many client actors may run at once, and why.

    Each actor holds one base model (``fedmoe.client.local.SharedModel``); two copies side by
    side must never be what kills a run that fits once. ``fl.max_concurrent_clients`` wins;
    otherwise as many as fit in 80% of MemAvailable (the server and driver load no model),
    at most as many as the CPUs allow (each actor counting the larger of its
    ``client_resources.num_cpus`` and its ``client_threads``). A model counts its checkpoint's
    bytes, its routed experts at their packed size under ``train.quantize``.
    """
    # An actor runs fl.client_threads torch threads: more threads than cores in all makes
    # them wait on each other (two 2-thread QLoRA clients on two cores: several times slower
    # a step than one client alone).
    per_actor_cpus = max(float(cfg.fl.client_resources.num_cpus), cfg.fl.client_threads or 1)
    by_cpu = max(int(cpus // per_actor_cpus), 1)
    if cfg.fl.get("max_concurrent_clients"):
        return min(int(cfg.fl.max_concurrent_clients), by_cpu), "fl.max_concurrent_clients"
    model = checkpoint_bytes(base)
    if model is not None and cfg.train.get("quantize"):  # routed experts at 4 or 8 bits
        from fedmoe.train.quantize import loaded_bytes

        model = loaded_bytes(base, cfg.model.family, cfg.train.quantize) or model
    if model is None:
        return by_cpu, "CPUs (model size unknown)"
    per_actor = model * ACTOR_MODEL_FACTOR + ACTOR_OVERHEAD_BYTES
    free = available if available is not None else available_bytes()
    by_memory = max(int(0.8 * free // per_actor), 1)
    if by_memory < by_cpu:
        return by_memory, (f"memory: {free / GiB:.1f} GiB available, about "
                           f"{per_actor / GiB:.1f} GiB per client")
    return by_cpu, "CPUs"


def _client_resources(cfg: DictConfig, concurrent: int, cpus: int) -> dict:
    """Ray resources per actor so that at most ``concurrent`` actors run at once."""
    resources = dict(cfg.fl.client_resources)
    resources["num_cpus"] = max(float(resources["num_cpus"]), cpus / concurrent)
    return resources


def main(cfg: DictConfig) -> float:
    """Hydra task of ``fedmoe simulate``: run, print the tables, return ``cfg.objective``
    (a number of the run's summary, e.g. the mean held-out perplexity: what a sweeper such
    as ``hparams_search=optuna`` minimizes). ``results.json`` holds the rest; a run in which
    a round accepted no reply exits non-zero, saying why."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from fedmoe.checkpoints import resolve_base_model
    from fedmoe.extras import require
    from fedmoe.fl.policy import trusted_node_config
    from fedmoe.moe.models import check_model_path

    # Ray's Simulation Engine and the run's data (corpus, datasets): the sim extra, checked
    # before any work.
    require("ray", "datasets", needed_by="fedmoe simulate")
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    base = resolve_base_model(cfg)
    base = str(Path(base).resolve()) if Path(base).exists() else base
    check_model_path(base)  # a hub id offline: one line here, not a traceback per client
    # One W&B group per sweep, named after the sweep directory.
    group = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
    overrides = simulation_overrides(cfg, list(hydra_cfg.overrides.task), run_dir, base, group)
    init_args = (cfg.fl.get("backend") or {}).get("init_args") or {}
    cpus = int(init_args.get("num_cpus") or os.cpu_count() or 1)
    concurrent, why = max_concurrent(cfg, base, cpus)
    logging.getLogger(__name__).info("at most %d client(s) at once (%s)", concurrent, why)
    with PeakMemory(interval=1.0) as peak:  # smaps reads cost CPU: once a second
        run_simulation_engine(
            to_run_config(overrides), num_supernodes=int(cfg.data.num_clients),
            app_dir=run_dir / "flower_app",
            client_resources=_client_resources(cfg, concurrent, cpus),
            verbose=bool(cfg.verbose), node_config=trusted_node_config(cfg.fl.aggregate),
            backend=cfg.fl.get("backend"),
        )
    results_path = run_dir / RESULTS_FILE
    if not results_path.exists():
        raise RuntimeError(f"the simulation wrote no {results_path}; rerun with verbose=true")
    results = json.loads(results_path.read_text())
    model = checkpoint_bytes(base)
    results["memory"] = {
        "peak_pss_bytes": peak.peak_bytes, "checkpoint_bytes": model,
        "peak_over_checkpoint": peak.peak_bytes / model if model else None,
        "max_concurrent_clients": concurrent, "why": why, "samples": peak.samples,
    }
    write_json(results_path, results)
    print_summary(results)
    print_pruning_summary(results, cfg.fl.state_dir or run_dir / "clients")
    print(f"results: {results_path}")
    failure = run_failure(results)
    if failure:
        raise SystemExit(f"fedmoe simulate: {failure}")
    return objective_value(results, cfg.objective)
