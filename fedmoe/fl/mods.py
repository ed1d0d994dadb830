"""Client mods: Flower middleware around every message a ClientApp receives and sends.

``audit_mod`` writes, when ``fl.audit_dir`` is set, one JSON line per message in and out of
the client: its type, and for every record the tensor names, shapes, dtypes and serialized
bytes. It is how fedmoe shows, on the real messages, that routed experts never leave a client.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from fedmoe.fl.bridge import config_from_run_config


def describe(msg: Message) -> dict:
    """Names, shapes, dtypes and serialized bytes of every record of a message."""
    records = {}
    for name, record in msg.content.items():
        entry: dict = {"kind": type(record).__name__, "bytes": record.count_bytes()}
        if isinstance(record, ArrayRecord):
            entry["arrays"] = {
                k: {"shape": list(a.shape), "dtype": a.dtype} for k, a in record.items()
            }
        elif isinstance(record, MetricRecord | ConfigRecord):
            entry["keys"] = sorted(record.keys())
        records[name] = entry
    return {"type": msg.metadata.message_type, "records": records}


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Log every message in and out of this client when ``fl.audit_dir`` is set."""
    audit_dir = config_from_run_config(context.run_config).fl.get("audit_dir")
    if not audit_dir:
        return call_next(msg, context)
    node = context.node_config.get("partition-id", context.node_id)
    path = Path(audit_dir) / f"client_{node}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    reply = call_next(msg, context)
    with open(path, "a") as f:
        f.write(json.dumps({"direction": "in", "pid": os.getpid(), **describe(msg)}) + "\n")
        if not reply.has_error():
            f.write(json.dumps({"direction": "out", "pid": os.getpid(), **describe(reply)}) + "\n")
    return reply
