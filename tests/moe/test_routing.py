"""Routing capture records exactly what the experts computed with."""

from __future__ import annotations

import torch

from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.routing import capture_routing
from tests.helpers.models import tiny_model


def _expert_io(layer):
    """Hooks recording the experts module's input hidden states and output."""
    seen: dict[str, torch.Tensor] = {}

    def pre(_m, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()

    def post(_m, _args, output):
        seen["out"] = output.detach()

    return seen, [layer.experts.register_forward_pre_hook(pre, with_kwargs=True),
                  layer.experts.register_forward_hook(post)]


def _recompute(layer, hidden, index, weights):
    """The routed-experts output from recorded routing and the adapter's expert views."""
    out = torch.zeros_like(hidden)
    act = layer.experts.act_fn
    for t in range(hidden.shape[0]):
        for slot in range(index.shape[1]):
            w = layer.expert_tensors(int(index[t, slot]))
            gate, up = (w["gate_up_proj"] @ hidden[t]).chunk(2)  # (I,), (I,)
            out[t] += weights[t, slot] * (w["down_proj"] @ (act(gate) * up))
    return out


def test_capture_matches_what_experts_computed(family):
    # Prepare
    model = tiny_model(family)
    adapter = MoEAdapter(model)
    layer = adapter.moe_layers()[-1]
    seen, handles = _expert_io(layer)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    # Execute
    with torch.no_grad(), capture_routing(model, adapter) as trace:
        model(ids)
    for h in handles:
        h.remove()
    rec = trace[layer.index]
    # Assert: shapes, then the layer's output recomputed from the record
    assert rec.top_k_index.shape == (14, 2) and rec.router_probs.shape == (14, 8)
    assert len(trace) == len(adapter.moe_layers())
    expected = _recompute(layer, seen["hidden"], rec.top_k_index, rec.top_k_weights)
    torch.testing.assert_close(expected, seen["out"], atol=1e-5, rtol=1e-4)


def test_probs_and_top_k_are_consistent(family):
    model = tiny_model(family)
    with torch.no_grad(), capture_routing(model) as trace:
        model(torch.arange(12).reshape(1, 12))
    for rec in trace:
        probs = rec.router_probs
        assert torch.all((probs >= 0) & (probs <= 1))
        if family != "deepseek_v3":  # softmax routers: probabilities sum to one
            torch.testing.assert_close(probs.sum(-1), torch.ones(12))
        # Plain top-k routers pick the k most probable experts (DeepSeek-V3 adds a bias
        # and group-limited routing, so its picks may differ from plain top-k).
        if family != "deepseek_v3":
            top = probs.topk(2, dim=-1).indices.sort(-1).values
            assert torch.equal(top, rec.top_k_index.sort(-1).values)
        assert rec.counts().sum() == 12 * 2


def test_capture_accumulates_over_calls_and_removes_hooks():
    model = tiny_model("olmoe")
    with torch.no_grad(), capture_routing(model) as trace:
        model(torch.arange(5).reshape(1, 5))
        model(torch.arange(3).reshape(1, 3))
    assert trace[0].num_tokens == 8
    layer = MoEAdapter(model).moe_layers()[0]
    assert not layer.experts._forward_pre_hooks and not layer.router._forward_hooks
