"""Every experiment in conf/experiment/ composes, validates and runs (on tiny settings)."""

from __future__ import annotations

import json

import pytest

from fedmoe.compose import conf_dir
from fedmoe.config import validate
from fedmoe.fl.bridge import compose
from tests.helpers.runs import SMOKE_BASE, TWO_CLIENTS, fedmoe

EXPERIMENTS = sorted(p.relative_to(conf_dir() / "experiment").with_suffix("").as_posix()
                     for p in (conf_dir() / "experiment").rglob("*.yaml"))
# Tiny sizes whatever the experiment says; the corpus and pretraining keys equal
# experiment=smoke's, so every experiment reuses the smoke base model.
TINY = [*SMOKE_BASE, *TWO_CLIENTS, "fl.num_rounds=1", "train.local_steps=1",
        "train.batch_size=2", "data.max_train_blocks_per_client=4",
        "data.max_eval_blocks_per_client=4"]


def test_experiments_are_found():
    assert {"demo", "smoke"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(experiment):
    validate(compose([f"experiment={experiment}"]))
    validate(compose([f"experiment={experiment}", *TINY]))


@pytest.mark.slow
def test_every_experiment_runs_on_tiny_settings(tmp_path, fedmoe_cache):
    # Prepare / Execute: one multirun over all experiments (one process, Ray started per job)
    sweep = tmp_path / "sweep"
    fedmoe(fedmoe_cache, "simulate", "-m", f"experiment={','.join(EXPERIMENTS)}", *TINY,
           f"hydra.sweep.dir={sweep}")
    # Assert: one finished run per experiment
    results = [json.loads(p.read_text()) for p in sorted(sweep.rglob("results.json"))]
    assert len(results) == len(EXPERIMENTS)
    for res in results:
        assert [r["round"] for r in res["rounds"]] == [1]
        assert set(res["clients"]) == {"0", "1"}
        # below a uniform guess over the smoke vocabulary, whatever the experiment
        vocab_size = res["config"]["pretraining"]["vocab_size"]
        assert all(1 < c["final_ppl"] < vocab_size for c in res["clients"].values())
