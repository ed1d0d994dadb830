"""Personal state on node-local disk: what a client keeps and never sends.

One directory per client holds ``personal.safetensors`` (the routed experts and any other
non-aggregated trained tensors, plus routing statistics) and ``meta.json`` (small metadata:
rounds trained, kept expert ids). Both are written atomically (write to a temporary file in
the same directory, then rename), so a crash mid-write leaves the last good state in place.

The last good state survives a corrupt or truncated file too: before a save replaces a
readable state, it is copied to ``personal.prev.safetensors`` / ``meta.prev.json``. Both
files of a state carry the same ``state id`` (the tensors in their safetensors header), so a
pair torn by a crash between the two renames is detected, and ``meta.json`` holds the sha256 of
the tensors file, so a flipped byte is too. A state holding a non-finite tensor counts as
unreadable. ``load`` falls back to the previous state, with a warning naming the unreadable
file; only when neither is readable does it raise :class:`PersonalStateError`, naming the
files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedmoe.artifacts import META_FILE, ClientMeta, atomic_write
from fedmoe.errors import PersonalStateError

TENSORS = "personal.safetensors"
META = META_FILE
PREV_TENSORS = "personal.prev.safetensors"
PREV_META = "meta.prev.json"
# Ties the two files of one saved state together (meta.json key, safetensors header key).
STATE_ID = "_state_id"
SHA256 = "_sha256"  # meta.json key: sha256 of the tensors file

logger = logging.getLogger(__name__)


class PersonalStore:
    """Atomic save/load of one client's personal tensors and metadata.

    Parameters
    ----------
    directory : str or Path
        Node-local directory for this client (created on first save).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @property
    def tensors_path(self) -> Path:
        return self.directory / TENSORS

    @property
    def meta_path(self) -> Path:
        return self.directory / META

    def exists(self) -> bool:
        return self.meta_path.exists() or (self.directory / PREV_META).exists()

    def save(self, tensors: dict[str, torch.Tensor], meta: ClientMeta) -> None:
        """Keep the current state as the previous one (when readable), then write tensors and
        metadata, each atomically (metadata last marks completion)."""
        if _pair_ok(self.tensors_path, self.meta_path):
            atomic_write(self.directory / PREV_TENSORS,
                          lambda tmp: shutil.copyfile(self.tensors_path, tmp))
            atomic_write(self.directory / PREV_META,
                          lambda tmp: shutil.copyfile(self.meta_path, tmp))
        state_id = uuid.uuid4().hex
        plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        data = save(plain, metadata={STATE_ID: state_id})
        atomic_write(self.tensors_path, lambda tmp: Path(tmp).write_bytes(data))
        ties = {STATE_ID: state_id, SHA256: hashlib.sha256(data).hexdigest()}
        text = json.dumps(meta.to_dict() | ties, indent=1, sort_keys=True)
        atomic_write(self.meta_path, lambda tmp: Path(tmp).write_text(text))

    def load(self) -> tuple[dict[str, torch.Tensor], ClientMeta] | None:
        """The saved state, ``None`` if there is none yet.

        An unreadable current state falls back to the previous one (logged, naming the
        file); :class:`PersonalStateError` names the files when neither can be read.
        """
        if not self.exists():
            return None
        state, error = _read_pair(self.tensors_path, self.meta_path)
        if state is not None:
            return state
        prev, prev_error = _read_pair(self.directory / PREV_TENSORS, self.directory / PREV_META)
        if prev is None:
            raise PersonalStateError(f"{error}; no readable previous state either ({prev_error})")
        logger.warning("%s; using the last good state %s (round %s)", error,
                       self.directory / PREV_TENSORS, prev[1].last_round)
        return prev


def _pair_ok(tensors_path: Path, meta_path: Path) -> bool:
    """Whether a saved pair exists and is readable."""
    return _read_pair(tensors_path, meta_path)[0] is not None


def _read_pair(tensors_path: Path, meta_path: Path) -> tuple[tuple | None, str | None]:
    """``((tensors, meta), None)`` for a readable, matching pair, else ``(None, reason)``."""
    if not meta_path.exists():
        return None, f"missing personal-state file {meta_path}"
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON object expected, not {type(meta).__name__}")
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        return None, f"corrupt personal-state file {meta_path}: {e}"
    try:
        data = tensors_path.read_bytes()
        digest = meta.pop(SHA256, None)  # None: a state saved before checksums existed
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            return None, (f"corrupt personal-state file {tensors_path}: its sha256 differs "
                          f"from the one {meta_path} recorded")
        header_id = _header_metadata(data).get(STATE_ID)
        tensors = load(data)
    except (OSError, SafetensorError, RuntimeError, ValueError, struct.error) as e:
        return None, f"corrupt personal-state file {tensors_path}: {e}"
    meta_id = meta.pop(STATE_ID, None)
    if header_id != meta_id:  # both None: a state saved before state ids existed
        return None, (f"personal-state files {tensors_path} and {meta_path} belong to "
                      f"different saves (state id {header_id} vs {meta_id})")
    bad = next((k for k, v in tensors.items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        return None, f"personal-state file {tensors_path} holds non-finite values in '{bad}'"
    try:
        typed = ClientMeta.from_dict(meta)
    except ValueError as e:
        return None, f"corrupt personal-state file {meta_path}: {e}"
    return (tensors, typed), None


def _header_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file's header (8-byte length, then JSON)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}
