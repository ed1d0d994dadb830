"""Client mods: Flower middleware around every message a ClientApp receives and sends.

``error_reply_mod`` (outermost) turns any failure of the client into an error reply that
carries a category and a fixed message, never the exception's text: file contents, field
values, environment values and paths stay in the device's own log.

``audit_mod`` writes, when the node config's ``audit-dir`` (or, in the server's own trust
domain, ``fl.audit_dir``) is set, one JSON line per message in and out of the client: its type,
and for every record the tensor names, shapes, dtypes and serialized bytes; for an error
reply, what it told the server. It is how fedmoe shows, on the real messages, that routed
experts never leave a client.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from fedmoe.errors import Diverged, PersonalStateError, Refused
from fedmoe.fl.bridge import device_config
from fedmoe.fl.policy import trusts_run_config

logger = logging.getLogger(__name__)

AUDIT_DIR_KEY = "audit-dir"  # node config: where audit_mod writes

# Category and fixed message of each failure the server may learn of. Refusals name only what
# the server itself sent (a config key, a role, a tensor name), so their text goes back.
_FIXED = {
    Diverged: ("diverged", "local training produced non-finite values; nothing was saved or "
                           "sent, the last good personal state is kept"),
    PersonalStateError: ("state", "the personal state on the device is unreadable"),
}
_FAILED = ("failed", "the client failed; the details are in the device's log")


def public_error(error: BaseException) -> str:
    """What the server is told of ``error``: ``"<category>: <message>"``."""
    if isinstance(error, Refused):
        return f"refused: {error}"
    for kind, (category, message) in _FIXED.items():
        if isinstance(error, kind):
            return f"{category}: {message}"
    return "{}: {}".format(*_FAILED)


def error_reply_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Reply to any failure with its category and a fixed message; log the full detail."""
    try:
        return call_next(msg, context)
    except Exception as error:
        logger.exception("%s message of run %s failed", msg.metadata.message_type,
                         context.run_id)
        reason = public_error(error)
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)


def describe(msg: Message) -> dict:
    """Names, shapes, dtypes and serialized bytes of every record of a message."""
    if msg.has_error():
        return {"type": msg.metadata.message_type, "error": msg.error.reason, "records": {}}
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


def audit_dir(context: Context) -> str | None:
    """The node config's ``audit-dir``; in the server's trust domain also ``fl.audit_dir``."""
    if context.node_config.get(AUDIT_DIR_KEY):
        return str(context.node_config[AUDIT_DIR_KEY])
    if trusts_run_config(context.node_config):
        return device_config(context.run_config, context.node_config).fl.get("audit_dir")
    return None


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Log every message in and out of this client when an audit directory is set."""
    directory = audit_dir(context)
    if not directory:
        return call_next(msg, context)
    node = context.node_config.get("partition-id", context.node_id)
    path = Path(directory) / f"client_{node}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        reply = call_next(msg, context)
        out = describe(reply)
    except Exception as error:
        out = {"type": msg.metadata.message_type, "error": public_error(error), "records": {}}
        raise
    finally:
        with open(path, "a") as f:
            f.write(json.dumps({"direction": "in", "pid": os.getpid(), **describe(msg)}) + "\n")
            f.write(json.dumps({"direction": "out", "pid": os.getpid(), **out}) + "\n")
    return reply
