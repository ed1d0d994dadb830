"""fedmoe's installs: a fresh virtual environment with chosen extras, and its size on disk.

The base package is the slim device install; the extras (``pyproject.toml``) bring the rest.
``scripts/bench_install.py`` measures the device install against the full one, and the slim
install's test (``tests/deploy/test_slim_install.py``) runs a real round from one.
"""

from __future__ import annotations

import os
import subprocess
import venv
from collections.abc import Sequence
from pathlib import Path

# pip takes this CPU build from the machine's disk; a bare `torch` may pull a multi-GB CUDA
# build (scripts/setup.sh installs it first for the same reason). Elsewhere: the range.
TORCH = ("torch==2.13.0", "torch>=2.4,<3")
OPTIONAL = ("ray", "datasets", "pyarrow", "pandas", "wandb", "matplotlib")
MiB = 2**20


def pip(python: str | Path, *args: str, timeout: float = 1200) -> None:
    """``python -m pip install <args>`` (quiet); raise with pip's output when it fails."""
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def create_venv(path: str | Path, source: str | Path, extras: Sequence[str] = ()) -> Path:
    """A new virtual environment at ``path`` with fedmoe installed from ``source`` (a checkout)
    with ``extras``, torch's CPU build first; its interpreter.

    Raises
    ------
    FileExistsError
        When ``path`` exists (a venv is not relocatable: build it where it will stay).
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it or choose another path")
    venv.EnvBuilder(with_pip=True, symlinks=True).create(path)
    python = path / "bin" / "python"
    try:
        pip(python, TORCH[0])
    except RuntimeError:
        pip(python, TORCH[1])
    target = str(Path(source).resolve()) + (f"[{','.join(extras)}]" if extras else "")
    pip(python, target)
    return python


def disk_mb(path: str | Path) -> float:
    """MB (2**20 bytes) that ``path`` takes on disk, as ``du`` counts: allocated blocks, links
    not followed, a file with several hard links once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total / MiB


def site_packages(python: str | Path) -> Path:
    """The ``site-packages`` directory of the environment of interpreter ``python``."""
    out = subprocess.run([str(python), "-c", "import sysconfig; "
                          "print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=60)
    return Path(out.stdout.strip())


def venv_size(python: str | Path) -> dict[str, float]:
    """``site_packages_mb``, ``venv_mb`` (the whole environment: executables such as ``uv``
    that Flower installs into ``bin/`` included) and ``torch_mb`` (the ``torch`` package
    alone, the same build in every install) of interpreter ``python``'s venv."""
    packages = site_packages(python)
    prefix = Path(python).parent.parent
    return {"site_packages_mb": round(disk_mb(packages), 1),
            "venv_mb": round(disk_mb(prefix), 1),
            "torch_mb": round(disk_mb(packages / "torch"), 1)}


def importable(python: str | Path, modules: Sequence[str] = OPTIONAL) -> list[str]:
    """Which of ``modules`` interpreter ``python`` finds (looked up, not imported)."""
    code = ("import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] "
            "if importlib.util.find_spec(m)))")
    out = subprocess.run([str(python), "-c", code, *modules], capture_output=True, text=True,
                         check=True, timeout=60, env={**os.environ, "PYTHONPATH": ""})
    return out.stdout.split()

