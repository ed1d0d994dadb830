"""Flower ClientApp: thin glue that hands each message to the client's round and the reply back.

The routed experts (and everything else not aggregated) stay in the client's node-local
store; only the aggregated roles travel (see ``fedmoe.client.local``).

Flower 1.42 runs every message in a fresh ``flwr-clientapp`` process (there is no long-lived
ClientApp mode in this version; see ``fedmoe.fl.worker``), so this module imports only Flower
and fedmoe's config and policy code — no torch, transformers or data libraries (a test guards
the list). The round's work (``fedmoe.fl.client_task``) runs in the node's warm worker when
its node config sets ``warm-worker = true``, else here, imported on first use.
"""

from __future__ import annotations

import os
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedmoe.fl import worker
from fedmoe.fl.mods import audit_mod, error_reply_mod

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
#   warm-worker        true: run the messages in a long-lived worker process of this node that
#                      keeps the model and data between rounds (fedmoe.fl.worker)
#   warm-worker-idle-s seconds without a message before that worker exits (default 900)


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` (clip this client's update to the norm the server's
    DP wrapper sends with each train instruction when ``strategy.dp.enabled``); a
    pass-through for an instruction without a clipping norm. Read from the message, not the
    composed config: composing it cost every message's process a third of a second."""
    config = msg.content.config_records.get("config", {})
    if KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
# --- end of node config --------------------------------------------------------------------


@app.train(mods=[dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context)


def _handle(msg: Message, context: Context) -> Message:
    """The client's round on this message, in the warm worker or here; the reply carries
    ``start_seconds``: from this process's start on the task to the message's handling."""
    started = time.time()
    kind = msg.metadata.message_type
    if worker.enabled(context.node_config):
        content = worker.call(kind, msg.content, context)
    else:
        from fedmoe.fl.client_task import handle

        content = handle(kind, msg.content, context)
    content["metrics"]["start_seconds"] = started - _process_start()
    return Message(content=content, reply_to=msg)


def _process_start() -> float:
    """When this process started on its task (seconds since the epoch): when its token
    arrived if it was started ahead of the task (``fedmoe.fl.prestart``), else its creation."""
    received = os.environ.get("FEDMOE_TASK_RECEIVED")  # fedmoe.fl.prestart.TASK_RECEIVED
    if received is not None:
        return float(received)
    import psutil

    return psutil.Process().create_time()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
