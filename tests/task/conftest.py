"""Session fixtures for the task tests: one smoke pretraining shared by every test."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from fedmoe.cli import conf_dir
from fedmoe.task.pretrain import ensure_base_model

# A seconds-long pretraining: the smoke group, a 0.5 MB/domain corpus, a 2-layer model.
SMOKE_OVERRIDES = [
    "pretraining=smoke",
    "data.max_mb_per_domain=0.5",
    "model.config.num_hidden_layers=2",
    "model.config.hidden_size=64",
]


@dataclass
class SmokePretrain:
    """A finished smoke pretraining and the means to compose variants of its config."""

    cfg: DictConfig
    checkpoint: Path
    seconds: float
    compose: Callable[..., DictConfig]
    overrides: list[str]  # the Hydra overrides of ``cfg`` but the cache dirs


@pytest.fixture(scope="session")
def pretrain_cache(tmp_path_factory) -> Path:
    """``cache_dir`` of the tests; the corpus cache lives in its ``corpus/``."""
    return tmp_path_factory.mktemp("fedmoe_cache")


@pytest.fixture(scope="session")
def compose_pretrain(pretrain_cache) -> Callable[..., DictConfig]:
    """``compose_pretrain(*overrides)``: the smoke ``pretrain`` config plus ``overrides``."""
    base = [*SMOKE_OVERRIDES, f"cache_dir={pretrain_cache}",
            f"data.cache_dir={pretrain_cache / 'corpus'}"]

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose("pretrain", overrides=[*base, *overrides])

    return _compose


@pytest.fixture(scope="session")
def smoke_pretrain(compose_pretrain) -> SmokePretrain:
    """The smoke base checkpoint, pretrained once per session."""
    datasets.disable_progress_bars()
    cfg = compose_pretrain()
    start = time.perf_counter()
    checkpoint = ensure_base_model(cfg, progress=False)
    seconds = time.perf_counter() - start
    return SmokePretrain(cfg, checkpoint, seconds, compose_pretrain, list(SMOKE_OVERRIDES))
