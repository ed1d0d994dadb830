"""Flower ClientApp: thin glue that unpacks records, calls the task code, packs the reply.

The routed experts (and everything else not aggregated) stay in the client's node-local
store; only the aggregated roles travel (see ``fedmoe.task.local``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from fedmoe.checkpoints import resolve_base_model
from fedmoe.fl.bridge import device_config
from fedmoe.fl.codec import decode_record, encode_record
from fedmoe.fl.mods import audit_mod, error_reply_mod
from fedmoe.fl.policy import check_send_policy
from fedmoe.task.local import LocalClient

app = ClientApp(mods=[error_reply_mod, audit_mod])


# --- node config of a device (deployment) --------------------------------------------------
# What a SuperNode's `--node-config` may set; everything else comes from the run config.
#   partition-id       this client's number: names its state dir and its results entry (set it:
#                      without it the id derives from the node id, which changes on a restart
#                      unless the node authenticates with a registered key); without data-path
#                      also its partition of the run's data
#   data-path          the device's own text file (json, jsonl, csv, parquet, txt); read on the
#                      device, only example counts and metrics leave it
#   state-dir          node-local root of the personal state
#   base-model         the device's copy of the base checkpoint
#   memory-budget-mb   MB of routed experts this device keeps (sets prune.max_mb: pruning on)
#   send-roles         roles that may leave the device (default router,shared_expert); a run
#                      asking for more is refused (fedmoe.fl.policy)
#   trust-run-config   true: the device applies the whole run config, paths included (one
#                      trust domain, as `fedmoe simulate`); default: only fedmoe.fl.policy's
#                      allowlist, and its paths come from this node config alone
#   audit-dir          log every message in and out here (fedmoe.fl.mods.audit_mod)
#   debug-delay-s      TEST HOOK, not for real devices: sleep this long before training, in
#   debug-delay-round  round debug-delay-round only (0: every round), to simulate a slow device
log = logging.getLogger(__name__)


def _node_cfg(context: Context):
    """The run's config as this device accepts it, with its memory budget when its node config
    gives one; a run asking for roles the device does not send is refused."""
    budget = context.node_config.get("memory-budget-mb")
    extra = [] if budget is None else [f"prune.max_mb={float(budget)}"]
    cfg = device_config(context.run_config, context.node_config, extra)
    check_send_policy(cfg.fl.aggregate, context.node_config)
    return cfg


def _client_id(context: Context) -> int:
    node = context.node_config
    if "partition-id" in node or "client-id" in node:
        return int(node.get("partition-id", node.get("client-id")))
    log.warning("node config has no partition-id: client id taken from node id %s",
                context.node_id)
    return int(context.node_id % 1_000_000)


def _debug_delay(context: Context, server_round: int) -> None:
    """TEST HOOK (node config ``debug-delay-s``, ``debug-delay-round``): a slow device."""
    delay = float(context.node_config.get("debug-delay-s", 0) or 0)
    only = int(context.node_config.get("debug-delay-round", 0) or 0)
    if delay > 0 and only in (0, server_round):
        log.warning("debug-delay-s: sleeping %.1f s before training round %d", delay,
                    server_round)
        time.sleep(delay)


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` (clip this client's update to the norm the server's
    DP wrapper sends) when ``strategy.dp.enabled``; a pass-through otherwise."""
    dp = device_config(context.run_config, context.node_config).strategy.get("dp")
    if dp is not None and dp.enabled:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
# --- end of node config --------------------------------------------------------------------


def _client(context: Context) -> LocalClient:
    """This node's client: config from the run config, data and state dir from node config."""
    cfg = _node_cfg(context)
    node = context.node_config
    client_id = _client_id(context)
    # Node config wins (a real device names its own directory), then the config; a run
    # launched by `flwr run` without either keeps state under the cache, per run.
    state_root = (node.get("state-dir") or cfg.fl.state_dir
                  or Path(cfg.cache_dir) / "state" / f"run_{context.run_id}")
    if cfg.fl.client_threads:
        torch.set_num_threads(int(cfg.fl.client_threads))
    if not cfg.verbose:
        logging.getLogger("transformers").setLevel(logging.ERROR)
    checkpoint = node.get("base-model") or resolve_base_model(cfg, progress=False)
    return LocalClient(cfg, client_id, checkpoint, Path(state_root) / f"client_{client_id:04d}",
                       data_path=node.get("data-path"))


def _arrays(msg: Message) -> dict[str, torch.Tensor]:
    """The global tensors of an instruction, in the dtype they were sent in."""
    return decode_record(msg.content.array_records.get("arrays", ArrayRecord()))


@app.train(mods=[dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    client = _client(context)
    server_round = int(msg.content["config"].get("server-round", 0))
    _debug_delay(context, server_round)
    out = client.fit(_arrays(msg), server_round)
    # The base checkpoint's dtype: bf16 travels as 2 bytes. Flower's DP clipping mod reads
    # the arrays as numpy, so with DP they go as float32.
    dp = client.cfg.strategy.get("dp")
    wire = "float32" if dp is not None and dp.enabled else client.wire_dtype()
    content = RecordDict({
        "arrays": encode_record(out["arrays"], {k: wire for k in out["arrays"]}),
        "metrics": MetricRecord(out["metrics"]),
    })
    if out["experts"]:
        content["experts"] = ConfigRecord({k: list(v) for k, v in out["experts"].items()})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    client = _client(context)
    server_round = int(msg.content["config"].get("server-round", 0))
    metrics = client.evaluate(_arrays(msg), server_round)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
