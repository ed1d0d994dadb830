"""prune_model: scores from training statistics or a pass, budget, slicing, report; config."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.routing import capture_routing
from fedmoe.prune import (
    RoutingStats,
    budget_for_round,
    check_budget,
    compute_scores,
    prune_model,
    routed_mb,
)
from fedmoe.train.loop import lm_loss
from tests.helpers.models import tiny_model

CONF = Path(__file__).resolve().parents[2] / "conf" / "prune"
BLOCKS = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))


def _cfg(**overrides):
    return OmegaConf.merge(OmegaConf.load(CONF / "default.yaml"), overrides)


def test_config_group_defaults():
    assert OmegaConf.load(CONF / "none.yaml").enabled is False
    cfg = _cfg()
    assert (cfg.score, cfg.keep, cfg.at_round, cfg.calibration_tokens) == ("tcess", 0.5, 1, 512)
    check_budget(cfg, tiny_model("qwen3_moe"))


@pytest.mark.filterwarnings("ignore:the kept experts")  # DeepSeek groups may collapse
def test_prune_model_uses_training_stats_and_keeps_top_tcess(family):
    # Prepare: statistics from two "training steps"
    model = tiny_model(family)
    stats = RoutingStats()
    for step in range(2):
        with capture_routing(model, router_probs=False) as trace, torch.no_grad():
            model(input_ids=BLOCKS[2 * step : 2 * step + 2])
        stats.update(trace)
    expected = {i: sorted(np.argsort(-s, kind="stable")[:4].tolist())
                for i, s in stats.tcess().items()}
    # Execute
    report = prune_model(model, BLOCKS, _cfg(), stats)
    # Assert
    assert report["kept"] == expected == report["kept_current"]
    assert report["mb_after"] == pytest.approx(report["mb_before"] / 2)
    assert set(report["num_experts"].values()) == {4}
    assert report["stats"].counts[next(iter(expected))].shape == (4,)
    model.train()
    _, aux = lm_loss(model, BLOCKS[:2])  # training continues: the aux loss sees 4 experts
    assert torch.isfinite(aux)


@pytest.mark.parametrize("score", ["frequency", "reap", "reconstruction", "random"])
def test_a_pass_score_keeps_the_top_scored_experts_with_their_weights(score):
    # Prepare: the scores of a pass over the same blocks, on a copy of the model
    model = tiny_model("qwen2_moe")
    original = MoEAdapter(copy.deepcopy(model))
    cfg = _cfg(score=score, keep_per_layer=3)
    scores = compute_scores(copy.deepcopy(model), BLOCKS, score,
                            calibration_tokens=cfg.calibration_tokens, seed=cfg.seed)
    expected = {i: sorted(np.argsort(-s, kind="stable")[:3].tolist()) for i, s in scores.items()}
    # Execute
    report = prune_model(model, BLOCKS, cfg)
    # Assert: the 3 best-scored experts of each layer (ties: lower id) and nothing else, each
    # with its own router row and weights
    assert report["kept"] == expected
    assert any(ids != [0, 1, 2] for ids in expected.values())  # not merely the first three
    for layer in MoEAdapter(model).moe_layers():
        before = original.layer(layer.index)
        np.testing.assert_allclose(report["scores"][layer.index], scores[layer.index])
        assert layer.num_experts == 3
        for j, e in enumerate(expected[layer.index]):
            torch.testing.assert_close(layer.router.weight[j], before.router.weight[e])
            for name, tensor in layer.expert_tensors(j).items():
                torch.testing.assert_close(tensor, before.expert_tensors(e)[name])


def test_max_mb_budget_respects_the_total():
    model = tiny_model("mixtral")
    before = routed_mb(model)
    report = prune_model(model, BLOCKS, _cfg(score="frequency", max_mb=before * 0.4))
    assert report["mb_after"] <= before * 0.4 + 1e-12
    assert all(len(ids) >= 2 for ids in report["kept"].values())


def test_one_shot_and_gradual_schedules():
    model = tiny_model("olmoe")
    assert budget_for_round(_cfg(at_round=2), 1, model) is None
    assert budget_for_round(_cfg(at_round=2), 2, model)["keep"] == 0.5
    assert budget_for_round(OmegaConf.load(CONF / "none.yaml"), 1, model) is None
    gradual = _cfg(schedule=[[1, 0.75], [3, 0.5]])
    first = budget_for_round(gradual, 1, model)
    assert first == {"keep_per_layer": 6}
    prune_model(model, BLOCKS, gradual, budget=first)
    assert budget_for_round(gradual, 2, model) is None
    second = budget_for_round(gradual, 3, model)
    assert second == {"keep_per_layer": 4}  # half of the ORIGINAL 8, not of 6
    report = prune_model(model, BLOCKS, gradual, budget=second)
    assert all(len(ids) == 4 and max(ids) < 8 for ids in report["kept"].values())
