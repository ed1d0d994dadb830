"""Fixtures of the deployment tests: the smoke base model, the app to `flwr run`, and
federations of real Flower processes on 127.0.0.1 stopped by pid."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmoe.launch.control import stage_app
from fedmoe.launch.federation import LocalFederation
from tests.helpers.federation import server_app_log
from tests.helpers.runs import REPO


@pytest.fixture(scope="session")
def base_model(smoke_base) -> Path:
    """The smoke base model (pretrained once per session under the test cache)."""
    return smoke_base


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
            parts.append(f"--- ServerApp\n{server_app_log(fed.control, run_id)[-4000:]}")
        except Exception as e:  # a diagnostic only: never hide the real failure
            parts.append(f"--- ServerApp log unavailable: {e}")
    return "\n".join(parts)
