"""Install size: the slim device install against the full one, on disk.

Builds two fresh virtual environments from this checkout, torch's CPU build first in both:
``slim`` = ``pip install .`` (what a SuperNode needs) and ``full`` = ``pip install .[sim,track]``
(what every device installed before the extras: Ray, datasets, W&B, matplotlib). Measures
each one's ``site-packages`` and whole venv as ``du`` does, lists the optional packages each
can import, prints them side by side with the ratio and saves JSON.

    python scripts/bench_install.py                       # results/install_size.json
    python scripts/bench_install.py --keep /tmp/venvs     # keep the venvs there
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedmoe.install import create_venv, importable, venv_size

REPO = Path(__file__).resolve().parents[1]
INSTALLS = {"slim": (), "full": ("sim", "track")}


def measure(root: Path) -> dict[str, dict]:
    """Build and measure every install of :data:`INSTALLS` under ``root``."""
    rows = {}
    for name, extras in INSTALLS.items():
        start = time.perf_counter()
        python = create_venv(root / name, REPO, extras)
        rows[name] = {"pip_install": "." + (f"[{','.join(extras)}]" if extras else ""),
                      **venv_size(python), "optional_importable": importable(python),
                      "install_seconds": round(time.perf_counter() - start, 1)}
    return rows


def print_table(rows: dict[str, dict]) -> None:
    slim, full = rows["slim"], rows["full"]
    table = Table(title="fedmoe installed size on disk (MB = 2^20 bytes)")
    for column in ("", "slim (device)", "full (before: sim + track)", "slim / full"):
        table.add_column(column, justify="left" if not column else "right")
    for key in ("site_packages_mb", "venv_mb", "torch_mb"):
        table.add_row(key, f"{slim[key]:.0f}", f"{full[key]:.0f}",
                      f"{slim[key] / full[key]:.0%}")
    rest = [r["site_packages_mb"] - r["torch_mb"] for r in (slim, full)]
    table.add_row("site-packages without torch", f"{rest[0]:.0f}", f"{rest[1]:.0f}",
                  f"{rest[0] / rest[1]:.0%}")
    table.add_row("optional importable", " ".join(slim["optional_importable"]) or "none",
                  " ".join(full["optional_importable"]), "")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "install_size.json")
    parser.add_argument("--keep", type=Path, help="build the venvs here and keep them")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="fedmoe-install-"))
    try:
        rows = measure(root)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    ratio = {key: round(rows["slim"][key] / rows["full"][key], 3)
             for key in ("site_packages_mb", "venv_mb")}
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"installs": rows, "slim_over_full": ratio}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
