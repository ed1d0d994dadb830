"""Reading an offline W&B run back (its transaction log), for the tracking tests."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class OfflineRun:
    """What an offline W&B run holds: its directory, config, final summary and history rows."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    group: str = ""
    name: str = ""
    artifacts: list[dict[str, Any]] = field(default_factory=list)


def offline_runs(root: str | Path) -> list[Path]:
    """The ``offline-run-*`` directories under ``root`` (a run dir, a sweep dir, ...), sorted."""
    return sorted(p.parent for p in Path(root).rglob("offline-run-*/run-*.wandb"))


def read_offline_run(path: str | Path, wait_s: float = 30.0) -> OfflineRun:
    """Read an offline run's transaction log (``offline-run-*/run-<id>.wandb``).

    Parameters
    ----------
    path : str or Path
        The ``offline-run-*`` directory, or a directory holding exactly one below it.
    wait_s : float
        wandb's service process writes the log after ``run.finish()`` returns: wait up to this
        long for the run's exit record (a run that crashed has none; what is there is read).

    Returns
    -------
    OfflineRun
        Config (key -> value), the summary after the last update, every history row
        (W&B's own ``_step``, ``_runtime``, ``_timestamp`` included), values JSON-decoded,
        and the logged artifacts (name, type, aliases, metadata, file path -> staged copy).
    """

    path = Path(path)
    if not path.name.startswith("offline-run-"):
        found = offline_runs(path)
        if len(found) != 1:
            raise FileNotFoundError(f"expected one offline W&B run under {path}, found {found}")
        path = found[0]
    run = OfflineRun(path)
    for record in _wait_for_exit(next(path.glob("run-*.wandb")), wait_s):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.config |= _items(record.run.config.update)
            # Later run records (updates) may leave these empty.
            run.group = record.run.run_group or run.group
            run.name = record.run.display_name or run.name
        elif kind == "config":
            run.config |= _items(record.config.update)
        elif kind == "summary":
            run.summary |= _items(record.summary.update)
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "artifact":
            a = record.artifact
            run.artifacts.append({
                "name": a.name, "type": a.type, "aliases": list(a.aliases),
                "metadata": json.loads(a.metadata or "{}"),
                "files": {e.path: e.local_path for e in a.manifest.contents}})
    run.config = {k: v.get("value", v) if isinstance(v, dict) else v
                  for k, v in run.config.items() if k != "_wandb"}
    return run


def _wait_for_exit(log_file: Path, wait_s: float) -> list:
    """The records of ``log_file`` once its exit record is there (or ``wait_s`` passed)."""
    import time

    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + wait_s
    while True:
        try:
            records = [pb.Record.FromString(p) for p in _log_records(log_file.read_bytes())]
        except DecodeError:  # the last record is still being written
            records = None
        done = records is not None and any(r.WhichOneof("record_type") == "exit"
                                           for r in records)
        if done or time.monotonic() >= deadline:
            return records or []
        time.sleep(0.2)


def _items(items) -> dict[str, Any]:
    return {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}


_BLOCK = 32768  # LevelDB log format: 32 KiB blocks, 7-byte chunk headers
_HEADER = 7  # the file starts with ":W&B", a 2-byte magic and a version byte


def _log_records(data: bytes) -> Iterator[bytes]:
    """Records of a W&B transaction log (LevelDB log format: chunks within 32 KiB blocks)."""
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log (no ':W&B' header)")
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0:  # zero padding at the end of a block
            pos += _BLOCK - pos % _BLOCK
            continue
        parts.append(data[pos + _HEADER:pos + _HEADER + length])
        pos += _HEADER + length
        if kind in (1, 4):  # FULL or LAST chunk ends a record
            yield b"".join(parts)
            parts = []
