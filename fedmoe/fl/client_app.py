"""Flower ClientApp: thin glue that unpacks records, calls the task code, packs the reply.

The routed experts (and everything else not aggregated) stay in the client's node-local
store; only the aggregated roles travel (see ``fedmoe.task.local``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmoe.fl.bridge import config_from_run_config
from fedmoe.fl.mods import audit_mod
from fedmoe.task.local import LocalClient
from fedmoe.task.pretrain import base_checkpoint_dir

app = ClientApp(mods=[audit_mod])


def _client(context: Context) -> LocalClient:
    """This node's client: config from the run config, data and state dir from node config."""
    cfg = config_from_run_config(context.run_config)
    node = context.node_config
    client_id = int(node.get("partition-id", node.get("client-id", 0)))
    # Node config wins (a real device names its own directory), then the config; a run
    # launched by `flwr run` without either keeps state under the cache, per run.
    state_root = (node.get("state-dir") or cfg.fl.state_dir
                  or Path(cfg.cache_dir) / "state" / f"run_{context.run_id}")
    if cfg.fl.client_threads:
        torch.set_num_threads(int(cfg.fl.client_threads))
    if not cfg.verbose:
        logging.getLogger("transformers").setLevel(logging.ERROR)
    checkpoint = node.get("base-model") or cfg.fl.base_model or base_model_dir(cfg)
    return LocalClient(cfg, client_id, checkpoint, Path(state_root) / f"client_{client_id:04d}")


def _array_dict(arrays: dict[str, np.ndarray]) -> dict[str, Array]:
    return {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}


def base_model_dir(cfg) -> str:
    """The base checkpoint when the launcher named none: ``model.path`` or the pretrained one."""
    if cfg.model.path:
        return str(cfg.model.path)
    path = base_checkpoint_dir(cfg)
    if not path.exists():
        raise FileNotFoundError(f"no base model at {path}: run `fedmoe pretrain` with the same "
                                "model/data/pretraining config, or set fl.base_model")
    return str(path)


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    record = msg.content.array_records.get("arrays", ArrayRecord())
    return {k: v.numpy() for k, v in record.items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    client = _client(context)
    server_round = int(msg.content["config"].get("server-round", 0))
    out = client.fit(_arrays(msg), server_round)
    content = RecordDict({
        "arrays": ArrayRecord(_array_dict(out["arrays"])),
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
