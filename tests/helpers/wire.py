"""Run ``fedmoe <command>`` with every message the ServerApp exchanges written down.

    python -m tests.helpers.wire <wire.jsonl> simulate experiment=smoke ...

An observer of the wire that owes nothing to fedmoe's own ``audit_mod``: Flower's in-memory
Grid (the one the Simulation Engine hands the ServerApp) is wrapped, so each instruction pushed
to a node and each reply pulled from one is logged, one JSON line each, with its records and
the names and shapes of its tensors.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.superlink.grid import InMemoryGrid


def describe(message: Message, direction: str) -> dict:
    """Direction, type, node, and per record its tensors (name -> shape) or its keys."""
    meta = message.metadata
    entry = {"direction": direction, "type": meta.message_type,
             "node": meta.dst_node_id if direction == "down" else meta.src_node_id,
             "arrays": {}, "configs": {}, "metrics": {}}
    if message.has_error():
        return entry | {"error": message.error.reason}
    for name, record in message.content.items():
        if isinstance(record, ArrayRecord):
            entry["arrays"][name] = {k: list(a.shape) for k, a in record.items()}
        elif isinstance(record, ConfigRecord):
            entry["configs"][name] = dict(record)
        elif isinstance(record, MetricRecord):
            entry["metrics"][name] = dict(record)
    return entry


def observe(path: Path) -> None:
    """Log every message pushed to and pulled from an :class:`InMemoryGrid` into ``path``."""
    push, pull = InMemoryGrid.push_messages, InMemoryGrid.pull_messages

    def write(messages: Iterable[Message], direction: str) -> None:
        with open(path, "a") as f:
            for message in messages:
                f.write(json.dumps(describe(message, direction), default=str) + "\n")

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        write(messages, "down")
        return push(self, messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(pull(self, message_ids))
        write(replies, "up")
        return replies

    InMemoryGrid.push_messages, InMemoryGrid.pull_messages = push_messages, pull_messages


def read(path: Path) -> list[dict]:
    """The logged messages, in order (none when nothing was exchanged)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


if __name__ == "__main__":
    observe(Path(sys.argv[1]))
    from fedmoe.cli import main

    main(sys.argv[2:])
