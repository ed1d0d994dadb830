"""Inputs and outputs of the analysis notebooks (``notebooks/*.ipynb``).

A notebook reads ``$FEDMOE_NOTEBOOK_INPUT``: a ``fedmoe analyze`` output dir (with
``analysis.json``) for notebooks 01-03, a ``fedmoe simulate`` run dir (with ``results.json``)
for notebook 04. Unset (or lacking the file), the notebook builds its input at smoke size
with the real code, once, under ``<cache>/notebooks/`` (``$FEDMOE_CACHE``, else the user
cache, :func:`fedmoe.cache.cache_root`), and later runs reuse it. Figures go to
``$FEDMOE_NOTEBOOK_OUTPUT`` (default ``outputs/notebooks``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedmoe.cache import cache_root
from fedmoe.compose import compose

# The smoke base model of `fedmoe simulate experiment=smoke`, so both share one checkpoint.
SMOKE_OVERRIDES = ("pretraining=smoke", "data.max_mb_per_domain=0.5", "data.block_size=64",
                   "model.experts_implementation=eager", "analysis=smoke")


def cache_dir() -> Path:
    return cache_root().resolve()


def output_dir(notebook: str) -> Path:
    """Where a notebook writes its PNGs (created)."""
    root = Path(os.environ.get("FEDMOE_NOTEBOOK_OUTPUT", "outputs/notebooks"))
    path = root / notebook
    path.mkdir(parents=True, exist_ok=True)
    return path


def _given(filename: str) -> Path | None:
    value = os.environ.get("FEDMOE_NOTEBOOK_INPUT")
    if value and (Path(value) / filename).is_file():
        return Path(value)
    return None


def analysis_input() -> Path:
    """A directory with ``analysis.json`` and ``routing.npz``: given, or a smoke analysis."""
    given = _given("analysis.json")
    if given is not None:
        return given
    target = cache_dir() / "notebooks" / "analysis"
    if not (target / "analysis.json").is_file():
        smoke_analysis(target)
    return target


def smoke_analysis(target: Path) -> Path:
    """Run every analysis section at smoke size into ``target`` (pretraining if needed)."""
    from omegaconf import OmegaConf

    from fedmoe.analysis.cli import resolve_model_dir
    from fedmoe.analysis.pipeline import run_analysis
    from fedmoe.analysis.report import write_report

    overrides = [*SMOKE_OVERRIDES, f"cache_dir={cache_dir()}"]
    cfg = compose("analyze", overrides)
    report = run_analysis(OmegaConf.to_container(cfg.analysis, resolve=True),
                          OmegaConf.to_container(cfg.data, resolve=True),
                          resolve_model_dir(cfg), target,
                          experts_implementation=cfg.model.experts_implementation)
    write_report(report, target)
    return target


def run_input() -> Path:
    """A ``fedmoe simulate`` run dir with ``results.json``: given, or a smoke simulation."""
    given = _given("results.json")
    if given is not None:
        return given
    target = cache_dir() / "notebooks" / "simulate"
    if not (target / "results.json").is_file():
        smoke_simulation(target)
    return target


def smoke_simulation(target: Path) -> Path:
    """``fedmoe simulate experiment=smoke`` into ``target`` (about a minute on a laptop)."""
    from fedmoe.cli import main

    main(["simulate", "experiment=smoke", f"cache_dir={cache_dir()}",
          f"hydra.run.dir={target}"])
    return target


def load_report(directory: Path) -> dict:
    return json.loads((Path(directory) / "analysis.json").read_text())
