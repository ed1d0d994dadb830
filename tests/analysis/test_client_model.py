"""`fedmoe analyze` on a client's personalized model exported by a real smoke simulation."""

from __future__ import annotations

import json
import math

import pytest

from fedmoe.analysis.notebook import SMOKE_OVERRIDES
from fedmoe.artifacts import ExpertsInfo
from fedmoe.cli import main as fedmoe_main


@pytest.mark.slow
def test_analyze_judges_retrieval_against_the_clients_own_pruning(smoke_run, fedmoe_cache,
                                                                   tmp_path):
    # Prepare: client 0's export, with the routing statistics it gathered while training
    model_dir = smoke_run.dir / "clients" / "client_0000" / "model"
    info = ExpertsInfo.read(model_dir)
    assert all("tcess" in rec for rec in info.routing_stats.values())
    # Execute
    fedmoe_main(["analyze", *SMOKE_OVERRIDES, "analysis.sections=[retrieval,specialization]",
                 f"model_dir={model_dir}", f"run_dir={smoke_run.dir}", f"cache_dir={fedmoe_cache}",
                 f"hydra.run.dir={tmp_path}"])
    # Assert
    report = json.loads((tmp_path / "analysis.json").read_text())
    r = report["retrieval"]
    assert r["client_pruning"]["source"] == "client routing statistics (tcess)"
    for key in ("ppl_full", "ppl_retrieved", "ppl_oracle", "ppl_global", "ppl_client"):
        assert math.isfinite(r[key]) and r[key] > 1, key
        assert all(math.isfinite(t[key]) for t in r["tasks"].values()), key
    # the client's set is a real restriction (half of 16 experts), not the full model again
    assert r["keep"] == 8 and r["ppl_client"] != pytest.approx(r["ppl_full"], rel=1e-6)
    assert "client's pruning" in (tmp_path / "analysis.md").read_text()
    assert "clients" in report["specialization"]
