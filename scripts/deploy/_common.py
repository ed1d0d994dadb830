"""Shared bits of the deployment launchers (not a launcher itself)."""

from __future__ import annotations

import os
from pathlib import Path


def flwr_home() -> Path:
    """``$FLWR_HOME``, else Flower's default ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
