"""Fixtures of the federated tests: the smoke base model, and the device's own cache."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def base_model(fedmoe_cache) -> Path:
    """The smoke base model, pretrained once per session under the test cache."""
    from fedmoe.fl.bridge import compose
    from fedmoe.train.pretrain import ensure_base_model

    return ensure_base_model(compose(["experiment=smoke", f"cache_dir={fedmoe_cache}"]),
                             progress=False)


@pytest.fixture
def device_cache(fedmoe_cache, monkeypatch) -> Path:
    """A device's own cache (FEDMOE_CACHE): where it builds its share of the corpus."""
    monkeypatch.setenv("FEDMOE_CACHE", str(fedmoe_cache))
    return fedmoe_cache
