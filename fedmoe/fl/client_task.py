"""The work of one ClientApp message: Flower records in, the client's round, records out.

``fedmoe.fl.client_app`` (the light glue every message's process imports) hands each message
here, either in its own process or through the device's warm worker (``fedmoe.fl.worker``),
which keeps this module's imports, the base model and the tokenized data between messages.
Everything here takes and returns picklable Flower records, so both paths run the same code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedmoe.artifacts import client_dir
from fedmoe.checkpoints import resolve_base_model
from fedmoe.client.local import LocalClient
from fedmoe.fl.bridge import device_config
from fedmoe.fl.codec import decode_record, encode_record
from fedmoe.fl.policy import check_send_policy
from fedmoe.fl.strategy import EVALUATION_RECORD, EXPERTS_RECORD
from fedmoe.memory import limit_kernel_cache, release_free_memory

log = logging.getLogger(__name__)

limit_kernel_cache()  # before the first kernel of this process


def handle(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The reply content to a ``train`` or ``evaluate`` message's ``content``; the memory
    the round freed goes back to the OS before the reply (warm workers and Ray actors live on
    for the next message)."""
    try:
        return _handle(kind, content, context)
    finally:
        release_free_memory()


def _handle(kind: str, content: RecordDict, context: Context) -> RecordDict:
    client = _client(context)
    config = content["config"]
    server_round = int(config.get("server-round", 0))
    arrays = decode_record(content.array_records.get("arrays", ArrayRecord()))
    if kind == "evaluate":
        return RecordDict({"metrics": MetricRecord(client.evaluate(arrays, server_round))})
    out = client.fit(arrays, server_round, evaluate=bool(config.get("evaluate", False)))
    # The base checkpoint's dtype: bf16 travels as 2 bytes. Flower's DP clipping mod reads
    # the arrays as numpy, so with DP they go as float32.
    dp = client.cfg.strategy.get("dp")
    wire = "float32" if dp is not None and dp.enabled else client.wire_dtype()
    reply = RecordDict({
        "arrays": encode_record(out["arrays"], {k: wire for k in out["arrays"]}),
        "metrics": MetricRecord(out["metrics"]),
    })
    if out["experts"]:
        reply[EXPERTS_RECORD] = ConfigRecord({k: list(v) for k, v in out["experts"].items()})
    if "evaluation" in out:
        reply[EVALUATION_RECORD] = MetricRecord(out["evaluation"])
    return reply


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
    return LocalClient(cfg, client_id, checkpoint, client_dir(state_root, client_id),
                       data_path=node.get("data-path"))
