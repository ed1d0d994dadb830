"""A run's files on disk: their names and how they are read, in one place.

A federated run directory (``run_dir``) holds::

    results.json                  the run: rounds, clients, bytes (fedmoe.fl.results builds it)
    clients/                      fl.state_dir: one folder per client, never sent anywhere
      client_0003/
        personal.safetensors      the client's personal tensors (fedmoe.client.state.PersonalStore)
        meta.json                 small metadata: rounds, kept expert ids, base_ppl,
                                  expert_counts {layer: selections per expert},
                                  expert_counts_by_round {round: {layer: counts}}
        model/                    its pruned export, when the run prunes (fedmoe.prune.export)

This module is a leaf (standard library only): the writers (the personal store, the server
checkpoint, the ServerApp) and every reader (figures, W&B, the analyses, ``fedmoe prune``'s
summary) take the names, and the one atomic write, from here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
CLIENTS_DIR = "clients"
META_FILE = "meta.json"
MODEL_DIR = "model"
_CLIENT_PREFIX = "client_"


def client_dir_name(client_id: int) -> str:
    """``client_0003``: the folder of client 3's personal state."""
    return f"{_CLIENT_PREFIX}{int(client_id):04d}"


def client_dir(state_root: str | Path, client_id: int) -> Path:
    """The folder of ``client_id``'s personal state under ``state_root`` (``fl.state_dir``)."""
    return Path(state_root) / client_dir_name(client_id)


def client_dirs(state_root: str | Path) -> dict[int, Path]:
    """Client id -> folder, for every client folder under ``state_root``, by id."""
    found = {}
    for path in Path(state_root).glob(f"{_CLIENT_PREFIX}*"):
        suffix = path.name.removeprefix(_CLIENT_PREFIX)
        if path.is_dir() and suffix.isdigit():
            found[int(suffix)] = path
    return dict(sorted(found.items()))


def client_metas(state_root: str | Path) -> dict[int, dict[str, Any]]:
    """Client id -> its ``meta.json``, for every client that has one."""
    return {cid: json.loads((path / META_FILE).read_text())
            for cid, path in client_dirs(state_root).items() if (path / META_FILE).is_file()}


def expert_counts(state_root: str | Path) -> dict[int, dict[str, list[int]]]:
    """Client id -> ``{layer: selections per expert}`` over all its local training; clients
    that never trained (no counts) are left out."""
    return {cid: {str(k): list(v) for k, v in meta["expert_counts"].items()}
            for cid, meta in client_metas(state_root).items() if meta.get("expert_counts")}


def expert_counts_by_round(state_root: str | Path) -> dict[int, dict[int, dict[str, list[int]]]]:
    """Round -> client id -> that round's ``{layer: selections per expert}``, rounds in order."""
    by_round: dict[int, dict[int, dict[str, list[int]]]] = {}
    for cid, meta in client_metas(state_root).items():
        for r, usage in (meta.get("expert_counts_by_round") or {}).items():
            by_round.setdefault(int(r), {})[cid] = usage
    return dict(sorted(by_round.items()))


def atomic_write(path: Path, write) -> None:
    """Run ``write(tmp)`` on a temporary file next to ``path``, fsync it, rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (:func:`atomic_write`)."""
    text = json.dumps(data, indent=2, default=str)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
