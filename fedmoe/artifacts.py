"""A run's files on disk: their names and how they are read, in one place.

A federated run directory (``run_dir``) holds::

    results.json                  the run: rounds, clients, bytes (fedmoe.fl.results builds it)
    clients/                      fl.state_dir: one folder per client, never sent anywhere
      client_0003/
        personal.safetensors      the client's personal tensors (fedmoe.client.state.PersonalStore)
        meta.json                 small metadata (:class:`ClientMeta`): rounds, kept expert
                                  ids, base_ppl, routing statistics, expert counts
        model/                    its export, when the run exports (fedmoe.prune.export):
          fedmoe_experts.json     what transformers does not keep (:class:`ExpertsInfo`)

This module is a leaf (standard library only): the writers (the personal store, the server
checkpoint, the ServerApp) and every reader (figures, W&B, the analyses, ``fedmoe prune``'s
summary) take the names, and the one atomic write, from here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
CLIENTS_DIR = "clients"
META_FILE = "meta.json"
MODEL_DIR = "model"
EXPERTS_FILE = "fedmoe_experts.json"
_CLIENT_PREFIX = "client_"


@dataclass
class ClientMeta:
    """A client's ``meta.json``: what its personal tensors do not say. Layer keys are strings,
    as JSON keeps them; expert ids are ORIGINAL ids (before any pruning)."""

    rounds: int = 0
    """Rounds this client trained in."""
    last_round: int | None = None
    """The server round it last trained in."""
    base_ppl: float | None = None
    """Held-out perplexity of the shared starting point, before any local step (what
    personalization is measured against)."""
    routed_mb_before: float | None = None
    """MB of routed experts it held before pruning."""
    graft_source: dict[str, int] | None = None
    """FLEx (arXiv 2506.00965): layer -> the expert copied into its personal graft."""
    kept: dict[str, list[int]] | None = None
    """Layer -> the routed experts it holds, once pruned (``None``: all of them)."""
    scores: dict[str, list[float]] | None = None
    """Layer -> the pruning score of each held expert, at the last pruning."""
    score: str | None = None
    """The pruning score used (``prune.score``)."""
    routed_mb_after: float | None = None
    """MB of routed experts it holds after pruning."""
    pruned_at: int | None = None
    """The server round it last pruned in."""
    routing_stats: dict | None = None
    """Running routing statistics (:meth:`fedmoe.prune.RoutingStats.to_dict`)."""
    expert_counts: dict[str, list[int]] = field(default_factory=dict)
    """Layer -> selections of each expert over all its local training."""
    expert_counts_by_round: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """Round -> that round's ``{layer: selections per expert}``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this version does not know (a state written by another version), kept as they
    are so a save never loses them."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClientMeta:
        """The metadata in ``data``; :class:`ValueError` naming the key whose value has the
        wrong type (the personal store then counts the file as corrupt)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        meta = cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})
        mappings = {k: getattr(meta, k) for k in ("kept", "expert_counts",
                                                   "expert_counts_by_round")}
        bad = [k for k, v in mappings.items()
               if not isinstance(v, dict) and (k != "kept" or v is not None)]
        if not bad:
            counts = [*(meta.kept or {}).values(), *meta.expert_counts.values()]
            checks = {
                "rounds": _is_int(meta.rounds),
                "last_round": meta.last_round is None or _is_int(meta.last_round),
                "kept/expert_counts": all(isinstance(v, list) and all(map(_is_int, v))
                                          for v in counts),
                "expert_counts_by_round": all(isinstance(v, dict) for v in
                                              meta.expert_counts_by_round.values()),
            }
            bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"wrong type of {', '.join(bad)}")
        return meta

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "extra" and getattr(self, f.name) is not None}
        return self.extra | data

    def kept_ids(self) -> dict[int, list[int]]:
        """:attr:`kept` with int layer keys (empty: every expert held)."""
        return {int(k): [int(i) for i in v] for k, v in (self.kept or {}).items()}


@dataclass
class ExpertsInfo:
    """An export's ``fedmoe_experts.json``: which experts of the original model it holds, and
    why (written by :func:`fedmoe.prune.export_checkpoint`; read by the edge runtime, the
    analyses and the GGUF export). Layer keys are ints here, strings in the file."""

    family: str
    """The model family (``model_type``)."""
    num_experts_original: int
    """Routed experts per layer before any pruning."""
    kept: dict[int, list[int]]
    """Layer -> the ORIGINAL ids of the experts the export holds, in its order."""
    scores: dict[int, list[float]] | None = None
    """Layer -> the pruning score of each held expert (``None``: not pruned by score)."""
    routing_stats: dict | None = None
    """Routing statistics of the export's own experts (a client's per-layer counts and TCESS,
    or :meth:`fedmoe.prune.RoutingStats.to_dict`); ``None``: none recorded."""

    @classmethod
    def read(cls, model_dir: str | Path) -> ExpertsInfo:
        """The file in ``model_dir``; :class:`ValueError` naming it when it is not one."""
        path = Path(model_dir) / EXPERTS_FILE
        try:
            data = json.loads(path.read_text())
            return cls(family=str(data["family"]),
                       num_experts_original=int(data["num_experts_original"]),
                       kept={int(k): [int(e) for e in v] for k, v in data["kept"].items()},
                       scores=None if data.get("scores") is None
                       else {int(k): [float(x) for x in v] for k, v in data["scores"].items()},
                       routing_stats=data.get("routing_stats"))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a fedmoe export's expert record (family, "
                             f"num_experts_original, kept per layer): {e!r}") from e

    def write(self, model_dir: str | Path) -> None:
        data = {"family": self.family, "num_experts_original": int(self.num_experts_original),
                "kept": {str(i): [int(e) for e in ids] for i, ids in sorted(self.kept.items())},
                "scores": None if self.scores is None
                else {str(i): [float(x) for x in s] for i, s in sorted(self.scores.items())},
                "routing_stats": self.routing_stats}
        (Path(model_dir) / EXPERTS_FILE).write_text(json.dumps(data, indent=1))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


def read_meta(path: str | Path) -> ClientMeta:
    """A ``meta.json`` file as :class:`ClientMeta`."""
    return ClientMeta.from_dict(json.loads(Path(path).read_text()))


def client_metas(state_root: str | Path) -> dict[int, ClientMeta]:
    """Client id -> its ``meta.json``, for every client that has one."""
    return {cid: read_meta(path / META_FILE)
            for cid, path in client_dirs(state_root).items() if (path / META_FILE).is_file()}


def expert_counts(state_root: str | Path) -> dict[int, dict[str, list[int]]]:
    """Client id -> ``{layer: selections per expert}`` over all its local training; clients
    that never trained (no counts) are left out."""
    return {cid: {str(k): list(v) for k, v in meta.expert_counts.items()}
            for cid, meta in client_metas(state_root).items() if meta.expert_counts}


def expert_counts_by_round(state_root: str | Path) -> dict[int, dict[int, dict[str, list[int]]]]:
    """Round -> client id -> that round's ``{layer: selections per expert}``, rounds in order."""
    by_round: dict[int, dict[int, dict[str, list[int]]]] = {}
    for cid, meta in client_metas(state_root).items():
        for r, usage in meta.expert_counts_by_round.items():
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
