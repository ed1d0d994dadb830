"""Personal state on node-local disk: what a client keeps and never sends.

One directory per client holds ``personal.safetensors`` (the routed experts and any other
non-aggregated trained tensors, plus routing statistics) and ``meta.json`` (small metadata:
rounds trained, kept expert ids). Both are written atomically (write to a temporary file in
the same directory, then rename), so a crash mid-write leaves the last good state in place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TENSORS = "personal.safetensors"
META = "meta.json"


class PersonalStateError(RuntimeError):
    """A personal-state file exists but cannot be read; the message names the file."""


def _atomic_write(path: Path, write) -> None:
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
        return self.meta_path.exists()

    def save(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Write tensors then metadata, each atomically (metadata last marks completion)."""
        plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        _atomic_write(self.tensors_path, lambda tmp: save_file(plain, tmp))
        text = json.dumps(meta, indent=1, sort_keys=True)
        _atomic_write(self.meta_path, lambda tmp: Path(tmp).write_text(text))

    def load(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The saved state, ``None`` if there is none yet; a clear error if it is corrupt."""
        if not self.exists():
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PersonalStateError(f"corrupt personal-state file {self.meta_path}: {e}") from e
        try:
            tensors = load_file(self.tensors_path)
        except (OSError, SafetensorError, RuntimeError) as e:
            raise PersonalStateError(
                f"corrupt personal-state file {self.tensors_path}: {e}"
            ) from e
        return tensors, meta
