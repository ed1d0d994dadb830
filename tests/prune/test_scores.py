"""Expert utility scores: hand-computed values, accumulation, and the pass-based scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.routing import capture_routing
from fedmoe.prune import SCORES, RoutingStats, compute_scores
from tests.helpers.models import tiny_model

# 4 tokens, hidden 2, 3 experts: logits z = h W^T are small integers without ties.
HIDDEN = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 2.0], [2.0, -1.0]])
ROUTER = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 2.0]])
# z = [[1, 0, -1], [0, 1, 2], [1, 2, 3], [2, -1, -4]]


def _hand_router() -> Qwen3MoeTopKRouter:
    config = AutoConfig.for_model("qwen3_moe", hidden_size=2, num_experts=3,
                                  num_experts_per_tok=2)
    router = Qwen3MoeTopKRouter(config)
    router.weight.data.copy_(ROUTER)
    return router


def test_frequency_and_tcess_match_hand_computation():
    # Prepare
    logits, _, index = _hand_router()(HIDDEN)
    stats, stats_k1 = RoutingStats(), RoutingStats(tcess_k=1)
    # Execute
    stats.update_layer(0, index, logits)
    stats_k1.update_layer(0, index, logits)
    # Assert
    # top-2 sets: {0,1}, {2,1}, {2,1}, {0,1} -> counts [2, 4, 2] over 4 tokens
    np.testing.assert_allclose(stats.frequency()[0], [0.5, 1.0, 0.5])
    # top-2 logits kept, rest zeroed: [1,0,0] + [0,1,2] + [0,2,3] + [2,-1,0] = [3, 2, 5]
    np.testing.assert_allclose(stats.tcess()[0], [0.75, 0.5, 1.25])
    # k = 1: [1,0,0] + [0,0,2] + [0,0,3] + [2,0,0] = [3, 0, 5]
    np.testing.assert_allclose(stats_k1.tcess()[0], [0.75, 0.0, 1.25])


def test_routing_stats_accumulate_like_one_pass_and_survive_json(family):
    # Prepare
    model = tiny_model(family)
    blocks = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(0))
    stats = RoutingStats()
    # Execute: one update per "training step" of 2 blocks
    for step in range(3):
        with capture_routing(model, router_probs=False) as trace:
            with torch.no_grad():
                model(input_ids=blocks[2 * step : 2 * step + 2])
        stats.update(trace)
    restored = RoutingStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    # Assert
    for score in ("frequency", "tcess"):
        once = compute_scores(model, blocks, score, calibration_tokens=None)
        for i, expected in once.items():
            np.testing.assert_allclose(restored.scores(score)[i], expected, atol=1e-9)
    assert restored.num_tokens == 6 * 16
    freq = restored.frequency()
    assert all(abs(f.sum() - MoEAdapter(model).top_k) < 1e-9 for f in freq.values())


def test_routing_stats_select_reindexes_and_rejects_stale_shapes():
    stats = RoutingStats()
    logits, _, index = _hand_router()(HIDDEN)
    stats.update_layer(0, index, logits)
    kept = stats.select({0: [1, 2]})
    np.testing.assert_allclose(kept.frequency()[0], [1.0, 0.5])
    with pytest.raises(ValueError, match="select"):
        stats.update_layer(0, index[:, :1], logits[:, :2])


def test_reap_is_gate_times_expert_output_norm_over_routed_tokens():
    # Prepare: expected value from the expert weights directly (SwiGLU, no experts forward)
    model = tiny_model("qwen3_moe")
    blocks = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    layer = MoEAdapter(model).moe_layers()[1]
    seen = {}

    def record_first_call(_module, args):
        seen.setdefault("args", args)  # returns None: the inputs are left as they are

    handle = layer.experts.register_forward_pre_hook(record_first_call)
    # Execute
    scores = compute_scores(model, blocks, "reap")[layer.index]
    handle.remove()
    # Assert
    hidden, index, weights = seen["args"]
    expected = np.zeros(8)
    for e in range(8):
        token, slot = torch.where(index == e)
        gate, up = F.linear(hidden[token], layer.experts.gate_up_proj[e]).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, layer.experts.down_proj[e])  # (n_e, H)
        if len(token):
            expected[e] = (weights[token, slot] * out.norm(dim=-1)).mean().item()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-7)
    assert (scores > 0).sum() >= 2


def test_reconstruction_orders_all_experts(family):
    # Prepare
    model = tiny_model(family)
    blocks = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    # Execute
    scores = compute_scores(model, blocks, "reconstruction", calibration_tokens=24)
    # Assert: a permutation of 8/8, 7/8, ..., 1/8 per layer
    for s in scores.values():
        np.testing.assert_allclose(np.sort(s), np.arange(1, 9) / 8)
    assert len(scores) == len(MoEAdapter(model).moe_layers())


def test_random_scores_are_seeded_and_unknown_scores_name_the_key():
    model = tiny_model("olmoe")
    blocks = torch.zeros(1, 8, dtype=torch.long)
    a = compute_scores(model, blocks, "random", seed=3)
    b = compute_scores(model, blocks, "random", seed=3)
    c = compute_scores(model, blocks, "random", seed=4)
    assert all(np.array_equal(a[i], b[i]) for i in a)
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match=r"prune\.score='magic'.*tcess"):
        compute_scores(model, blocks, "magic")
    assert SCORES == ("frequency", "tcess", "reap", "reconstruction", "random")


def test_reconstruction_first_pick_is_the_best_single_expert():
    # Prepare: with one expert kept, a softmax family routes every token to it with weight 1
    model = tiny_model("qwen3_moe")
    blocks = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    layer = MoEAdapter(model).moe_layers()[1]
    seen = {}

    def record_first_call(_module, args):
        seen.setdefault("args", args)

    handle = layer.experts.register_forward_pre_hook(record_first_call)
    # Execute
    scores = compute_scores(model, blocks, "reconstruction")[layer.index]
    handle.remove()
    # Assert
    hidden, index, weights = seen["args"]
    with torch.no_grad():
        target = layer.experts(hidden, index, weights)  # (T, H)
        errors = [(target - layer.experts(hidden, torch.full_like(index[:, :1], e),
                                          torch.ones_like(weights[:, :1]))).norm().item()
                  for e in range(8)]
    assert int(np.argmax(scores)) == int(np.argmin(errors))
