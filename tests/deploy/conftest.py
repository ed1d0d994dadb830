"""Fixtures of the deployment tests: one smoke base model, the app to `flwr run`, tiny
settings, and federations of real Flower processes on 127.0.0.1 stopped by pid."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmoe.fl.deploy import LocalFederation, stage_app

REPO = Path(__file__).resolve().parents[2]

# Seconds-long rounds: one local step on a few blocks; no model export at the end.
TINY = [
    "experiment=smoke",
    "train.local_steps=1",
    "data.max_train_blocks_per_client=8",
    "data.max_eval_blocks_per_client=2",
    "fl.export=false",
]


@pytest.fixture(scope="session")
def base_model(fedmoe_cache) -> Path:
    """The smoke base model, pretrained once per session under the test cache."""
    from fedmoe.fl.bridge import compose
    from fedmoe.task.pretrain import ensure_base_model

    old = os.environ.get("FEDMOE_CACHE")
    os.environ["FEDMOE_CACHE"] = str(fedmoe_cache)
    try:
        return ensure_base_model(compose(["experiment=smoke"]), progress=False)
    finally:
        if old is None:
            os.environ.pop("FEDMOE_CACHE")
        else:
            os.environ["FEDMOE_CACHE"] = old


@pytest.fixture(scope="session")
def app_dir(tmp_path_factory) -> Path:
    """The Flower App (pyproject, fedmoe/, conf/) that `flwr run` bundles and ships."""
    return stage_app(REPO, tmp_path_factory.mktemp("app") / "fedmoe_app")


@pytest.fixture
def make_federation(fedmoe_cache) -> Iterator:
    """Build LocalFederations; every process they started is stopped at teardown."""
    made: list[LocalFederation] = []

    def make(root: Path, **kwargs) -> LocalFederation:
        fed = LocalFederation(root, env={"FEDMOE_CACHE": str(fedmoe_cache)}, **kwargs)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.stop()


def dump_logs(fed: LocalFederation, run_id: int | None = None) -> str:
    """The tails of every process log (and the ServerApp's), for assertion messages."""
    parts = [f"--- {s.name}\n{s.log()[-2500:]}"
             for s in [fed.superlink, *fed.nodes] if s is not None]
    if run_id is not None:
        try:
            parts.append(f"--- ServerApp\n{fed.control.logs(run_id)[-4000:]}")
        except Exception as e:  # a diagnostic only: never hide the real failure
            parts.append(f"--- ServerApp log unavailable: {e}")
    return "\n".join(parts)
