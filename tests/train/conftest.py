"""Session fixtures for the training tests: the smoke pretraining, shared with every other test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import DictConfig

from fedmoe.compose import compose
from tests.helpers.runs import SMOKE_BASE


@dataclass
class SmokePretrain:
    """A finished smoke pretraining and the means to compose variants of its config."""

    cfg: DictConfig
    checkpoint: Path
    compose: Callable[..., DictConfig]
    overrides: list[str]  # the Hydra overrides of ``cfg`` but the cache dir


@pytest.fixture(scope="session")
def compose_pretrain(fedmoe_cache) -> Callable[..., DictConfig]:
    """``compose_pretrain(*overrides)``: the ``pretrain`` config of experiment=smoke's base
    model, in the test cache, plus ``overrides``."""
    def _compose(*overrides: str) -> DictConfig:
        return compose("pretrain", [*SMOKE_BASE, f"cache_dir={fedmoe_cache}", *overrides])

    return _compose


@pytest.fixture(scope="session")
def smoke_pretrain(compose_pretrain, smoke_base) -> SmokePretrain:
    """The smoke base checkpoint (pretrained once per session) and its ``pretrain`` config."""
    return SmokePretrain(compose_pretrain(), smoke_base, compose_pretrain, list(SMOKE_BASE))
