"""Flower ServerApp: the initial aggregated tensors, the FedMoE strategy, results.json.

Only the roles in ``fl.aggregate`` (default: router and shared experts) ever leave the server
or come back to it; the strategy's hooks log communication and per-client evaluation.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from fedmoe.artifacts import RESULTS_FILE, write_json
from fedmoe.client.local import aggregated_names, expert_rows, prepare_model, trainable_names
from fedmoe.config import validate
from fedmoe.fl import checkpoint
from fedmoe.fl.bridge import config_from_run_config
from fedmoe.fl.codec import encode_record, wire_nbytes
from fedmoe.fl.progress import ProgressGrid
from fedmoe.fl.results import client_entries, round_entry
from fedmoe.fl.rounds import RoundRules
from fedmoe.fl.strategy import build_strategy
from fedmoe.moe.adapter import MoEAdapter, role_of_name
from fedmoe.moe.families import Role, family_spec
from fedmoe.prune import check_budget, pruning_enabled
from fedmoe.reporting.figures import write_run_plots
from fedmoe.reporting.tracking import Tracker, build_tracker
from fedmoe.train.loop import weight_dtype

app = ServerApp()


def initial_arrays(cfg) -> tuple[ArrayRecord, dict[str, int], int, dict[str, str]]:
    """The aggregated tensors of the base model (float32, as the strategy keeps them), which
    of them are per-expert, the bytes every trainable tensor would take on the wire (what
    FedAvg-style training sends) and the wire dtype of each aggregated tensor.

    The model is built on the ``meta`` device and only the base tensors of the aggregated
    roles are read: the server of a 7B model holds megabytes, not the model.
    """
    roles = {Role(r) for r in cfg.fl.aggregate}
    model_type = family_spec(cfg.model.family).model_type
    model = prepare_model(cfg.model, cfg.fl.base_model, cfg.train, cfg.seed, device="cpu",
                          skip=lambda name: role_of_name(model_type, name) not in roles)
    adapter = MoEAdapter(model)
    if pruning_enabled(cfg.prune):
        check_budget(cfg.prune, adapter)  # a budget that cannot be met fails before training
    names = aggregated_names(model, adapter, cfg)
    params = dict(model.named_parameters())
    wire = str(weight_dtype(model)).removeprefix("torch.")
    arrays = ArrayRecord({n: Array(params[n].detach().float().numpy().copy()) for n in names})
    itemsize = torch.empty(0, dtype=weight_dtype(model)).element_size()
    trainable = sum(params[n].numel() * itemsize for n in trainable_names(model))
    return arrays, expert_rows(model, adapter, names), trainable, {n: wire for n in names}


def _strategy(cfg, rows: dict[str, int], wire_dtypes: dict[str, str]):
    s, fl = cfg.strategy, cfg.fl
    if s.get("dp") is not None and s.dp.enabled:  # Flower's DP mods read arrays as numpy
        wire_dtypes = {k: "float32" for k in wire_dtypes}
    kwargs = dict(
        expert_rows=rows, wire_dtypes=wire_dtypes, rule=s.rule, trim_beta=s.trim_beta,
        max_update_norm=s.max_update_norm, max_weight_share=s.max_weight_share,
        max_weight_median=s.max_weight_median, max_abs_value=s.max_abs_value,
        fraction_train=fl.fraction_train, fraction_evaluate=fl.fraction_evaluate,
        min_train_nodes=fl.min_train_nodes, min_evaluate_nodes=fl.min_evaluate_nodes,
        min_available_nodes=fl.min_available_nodes,
    )
    if s.server_opt:
        kwargs["eta"] = s.server_lr
    strategy = build_strategy("fedmoe", server_opt=s.server_opt, **kwargs)
    # Only when every client evaluated trains too (else the evaluate messages reach more).
    if (fl.get("evaluate_in_train") and 0 < fl.fraction_evaluate <= fl.fraction_train
            and fl.min_evaluate_nodes <= fl.min_train_nodes):
        strategy.evaluate_in_train_before = int(fl.num_rounds)
    return strategy


class RoundReporter:
    """``evaluate_fn`` hook: one concise line per round, results.json kept up to date, and the
    round logged to the tracker (W&B with ``logger=wandb``)."""

    def __init__(self, cfg, strategy, payload_bytes: int, tracker: Tracker | None = None) -> None:
        self.cfg, self.strategy, self.payload = cfg, strategy, payload_bytes
        self.tracker = tracker or Tracker()
        self.bar = tqdm(total=int(cfg.fl.num_rounds), desc="rounds", unit="round")
        self.t0 = time.perf_counter()
        self.trainable_bytes = 0

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        log = self.strategy.history[server_round]
        entry = round_entry(server_round, log, self.payload)
        self.bar.update(1)
        self.bar.write(
            f"round {server_round}: train loss {_f(entry['train_loss'])}, held-out ppl "
            f"mean {_f(entry['eval_ppl_mean'])} worst {_f(entry['eval_ppl_worst'])}, "
            f"{entry['bytes_up'] / 2**20:.2f} MB up, {entry['wall_seconds']:.1f} s"
            + (f", rejected {entry['rejected']}" if entry["rejected"] else "")
        )
        self.write()
        self.tracker.log_round(entry, log.train_metrics, log.eval_by_client)
        return None

    def write(self) -> dict:
        history = self.strategy.history
        s = self.cfg.strategy
        results = {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "strategy": {"name": s.name, "aggregate": list(self.cfg.fl.aggregate),
                         "rule": s.rule, "server_opt": s.server_opt},
            "payload_bytes": self.payload,
            "trainable_bytes": self.trainable_bytes,
            "rounds": [round_entry(r, history[r], self.payload) for r in sorted(history)],
            "clients": client_entries(history, self.payload),
            "wall_seconds": time.perf_counter() - self.t0,
        }
        write_json(Path(self.cfg.run_dir) / RESULTS_FILE, results)
        return results


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


# --- deployment: DP, minimum replies, checkpoints after each round -------------------------
def _deployed(cfg, strategy, done: int) -> RoundRules:
    """The strategy ``start`` runs: FedMoE wrapped in Flower's central DP (client-side
    clipping) when ``strategy.dp.enabled``, inside the round rules (rounds counted from
    ``done + 1``, at least ``fl.min_replies`` accepted replies)."""
    inner = strategy
    dp = cfg.strategy.get("dp")
    if dp is not None and dp.enabled:
        from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

        sampled = dp.num_sampled_clients or cfg.fl.min_train_nodes
        inner = DifferentialPrivacyClientSideFixedClipping(
            strategy, float(dp.noise_multiplier), float(dp.clipping_norm), int(sampled))
    return RoundRules(inner, lambda r: strategy.history[r].accepted,
                      min_replies=int(cfg.fl.get("min_replies", 1)),
                      round_timeout=float(cfg.fl.round_timeout), offset=done)


def _checkpointing(reporter, cfg, strategy, done: int):
    """``evaluate_fn``: the reporter, then a checkpoint of the completed round."""
    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return reporter(0, arrays)
        out = reporter(server_round + done, arrays)
        checkpoint.save_checkpoint(cfg.run_dir, server_round + done, arrays, strategy.history,
                                   keep=int(cfg.fl.get("keep_checkpoints", 0)),
                                   optimizer=checkpoint.optimizer_state(strategy))
        return out

    return evaluate_fn
# --- end of deployment --------------------------------------------------------------------


def _runtime_config(cfg, run_id: int):
    """Fill what a launcher other than `fedmoe simulate` (e.g. `flwr run .`) left unset."""
    if cfg.fl.base_model and cfg.run_dir:
        return cfg
    from fedmoe.checkpoints import resolve_base_model

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if not cfg.fl.base_model:
        cfg.fl.base_model = resolve_base_model(cfg, progress=False)
    if not cfg.run_dir:
        cfg.run_dir = str(Path("outputs") / "flwr" / f"run_{run_id}")
    return cfg


@app.main()
def main(grid: Grid, context: Context) -> None:
    # Before anything is built: `flwr run .` gets here unchecked. The node-count rule is the
    # launcher's (`fedmoe simulate` checked it; a deployment's nodes are who connects).
    validate(config_from_run_config(context.run_config), deployment=True)
    cfg = _runtime_config(config_from_run_config(context.run_config), context.run_id)
    arrays, rows, trainable_bytes, wire_dtypes = initial_arrays(cfg)
    payload = int(sum(wire_nbytes(a) for a in encode_record(
        {k: a.numpy() for k, a in arrays.items()}, wire_dtypes).values()))
    strategy = _strategy(cfg, rows, wire_dtypes)
    done, arrays, strategy.history = checkpoint.resume(cfg, arrays)
    if done:
        checkpoint.restore_optimizer(strategy, cfg.run_dir, done)
    with build_tracker(cfg) as tracker:  # closed as failed if anything below raises
        reporter = RoundReporter(cfg, strategy, payload, tracker)
        reporter.trainable_bytes = trainable_bytes
        _deployed(cfg, strategy, done).start(
            grid=ProgressGrid(grid), initial_arrays=arrays,
            num_rounds=max(int(cfg.fl.num_rounds) - done, 0),
            timeout=float(cfg.fl.round_timeout), train_config=ConfigRecord({}),
            evaluate_config=ConfigRecord({}),
            evaluate_fn=_checkpointing(reporter, cfg, strategy, done),
        )
        reporter.bar.close()
        results = reporter.write()
        state_dir = cfg.fl.state_dir or Path(cfg.run_dir) / "clients"
        tracker.finish(results, write_run_plots(results, cfg.run_dir, state_dir))
