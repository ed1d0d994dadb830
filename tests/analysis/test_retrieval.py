"""TCESS, expert restriction by router masking, and TAER on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmoe.analysis.retrieval import (
    PatternLibrary,
    evaluate_retrieval,
    prompt_keys,
    restrict_experts,
    tcess,
)
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.routing import capture_routing
from tests.helpers.models import tiny_model


def test_tcess_keeps_top_k_raw_logits_and_averages_over_all_tokens():
    logits = np.array([[1.0, 3.0, 2.0], [5.0, -1.0, 0.0]])
    np.testing.assert_allclose(tcess(logits, 1), [2.5, 1.5, 0.0])
    np.testing.assert_allclose(tcess(logits, 2), [2.5, 1.5, 1.0])


def test_library_keeps_best_experts_and_retrieves_nearest_key():
    # Prepare: task a favours expert 0 everywhere, task b expert 2 (E=3, k=1).
    a = {1: np.array([[3.0, 1, 0]]), 2: np.array([[0.0, 4, 1]])}
    b = {1: np.array([[0.0, 1, 3]]), 2: np.array([[2.0, 0, 1]])}
    # Execute
    lib = PatternLibrary.build({"a": a, "b": b}, top_k=1, keep=2)
    # Assert: keys are layer-1 TCESS vectors; kept experts ranked by TCESS, ties by id.
    np.testing.assert_allclose(lib.keys, [[3, 0, 0], [0, 0, 3]])
    assert lib.patterns[0].experts == {1: [0, 1], 2: [1, 0]}
    assert lib.retrieve(np.array([2.0, 0, 0.5])).task == "a"
    assert lib.retrieve(np.array([0.0, 1, 2])).task == "b"


def test_restricting_to_all_experts_changes_nothing(family):
    # Prepare
    model = tiny_model(family)
    adapter = MoEAdapter(model)
    ids = torch.randint(0, 96, (2, 12))
    keep = {layer.index: list(range(layer.num_experts)) for layer in adapter.moe_layers()}
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        # Execute
        with restrict_experts(model, keep, adapter):
            got = model(input_ids=ids).logits
    # Assert: the family's routing was reproduced exactly from the logits
    torch.testing.assert_close(got, expected)


def test_restricted_experts_are_never_selected_and_weights_renormalise():
    # Prepare: qwen2_moe (softmax, no top-k normalisation), keep experts {1, 4, 6}.
    model = tiny_model("qwen2_moe")
    adapter = MoEAdapter(model)
    layer = adapter.moe_layers()[0]
    ids = torch.randint(0, 96, (2, 10))
    # Execute
    with torch.no_grad(), restrict_experts(model, {layer.index: [1, 4, 6]}, adapter), \
            capture_routing(model, adapter) as trace:
        model(input_ids=ids)
    rec = trace[layer.index]
    # Assert: only kept ids; weights are the softmax over the kept logits only
    assert set(rec.top_k_index.unique().tolist()) <= {1, 4, 6}
    kept_probs = rec.router_logits[:, [1, 4, 6]].softmax(-1)  # (T, 3)
    expected = kept_probs.topk(2, dim=-1).values
    torch.testing.assert_close(rec.top_k_weights, expected)
    # the other MoE layers were left alone
    other = trace[adapter.moe_layers()[1].index]
    assert not torch.isinf(other.router_logits).any()


def synthetic_tasks(n: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Three tasks, each drawing from its own 4 tokens of a 96-token vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randint(lo, lo + 4, (n, length), generator=gen)
            for name, lo in (("low", 0), ("mid", 40), ("high", 80))}


def test_taer_retrieves_the_right_task_on_a_tiny_model():
    # Prepare: patterns from calibration blocks of three distinct synthetic tasks.
    model = tiny_model("qwen2_moe", seed=1)
    adapter = MoEAdapter(model)
    calibration = synthetic_tasks(6, 24, seed=0)
    logits = {}
    for task, blocks in calibration.items():
        with torch.no_grad(), capture_routing(model, adapter) as trace:
            model(input_ids=blocks)
        logits[task] = {r.layer: r.router_logits.numpy() for r in trace}
    library = PatternLibrary.build(logits, top_k=2, keep=4)
    test = synthetic_tasks(4, 24, seed=1)
    # Execute
    keys = prompt_keys(model, test["mid"][:, :12], adapter=adapter)
    result = evaluate_retrieval(model, library, test, prompt_len=12, batch_size=4)
    # Assert
    assert keys.shape == (4, 8)
    assert result["accuracy"] == 1.0
    assert result["confusion"]["high"] == {"low": 0, "mid": 0, "high": 4}
    # with the right pattern the retrieved and oracle models are the same model
    for task in test:
        t = result["tasks"][task]
        assert t["ppl_retrieved"] == pytest.approx(t["ppl_oracle"])
        assert t["ppl_retrieved"] != pytest.approx(t["ppl_full"])


def test_static_expert_sets_are_measured_next_to_retrieval():
    # Prepare: the same library; static sets "all" (every expert) and "mid" (mid's pattern)
    model = tiny_model("qwen2_moe", seed=1)
    adapter = MoEAdapter(model)
    logits = {}
    for task, blocks in synthetic_tasks(6, 24, seed=0).items():
        with torch.no_grad(), capture_routing(model, adapter) as trace:
            model(input_ids=blocks)
        logits[task] = {r.layer: r.router_logits.numpy() for r in trace}
    library = PatternLibrary.build(logits, top_k=2, keep=4)
    mid = next(p for p in library.patterns if p.task == "mid").experts
    every = {layer.index: list(range(layer.num_experts)) for layer in adapter.moe_layers()}
    test = synthetic_tasks(4, 24, seed=1)
    # Execute
    result = evaluate_retrieval(model, library, test, prompt_len=12, batch_size=4,
                                static={"all": every, "mid": mid})
    # Assert: keeping every expert is the full model; mid's set is mid's oracle
    assert result["ppl_all"] == pytest.approx(result["ppl_full"])
    assert result["tasks"]["mid"]["ppl_mid"] == pytest.approx(result["tasks"]["mid"]["ppl_oracle"])
    assert result["tasks"]["low"]["ppl_mid"] != pytest.approx(result["tasks"]["low"]["ppl_oracle"])


def test_client_pruning_reads_the_clients_export(tmp_path):
    from fedmoe.analysis.pipeline import client_pruning
    from fedmoe.prune.export import export_checkpoint
    from fedmoe.prune.slicing import keep_experts

    # Prepare: an unpruned export whose TCESS ranks experts 5, 2, 7 first in layer 0,
    # and a pruned export holding 4 of 8 experts per layer
    model = tiny_model("qwen2_moe")
    layers = [layer.index for layer in MoEAdapter(model).moe_layers()]
    tcess_0 = [0.1, 0.0, 0.8, 0.2, 0.3, 0.9, 0.0, 0.5]
    routing = {str(i): {"counts": [1] * 8, "tcess": tcess_0 if i == layers[0] else
                        list(range(8))} for i in layers}
    export_checkpoint(model, None, tmp_path / "full", routing_stats=routing)
    export_checkpoint(model, None, tmp_path / "bare")
    pruned = tiny_model("qwen2_moe")
    keep_experts(pruned, {i: [0, 3, 4, 6] for i in layers})
    export_checkpoint(pruned, None, tmp_path / "pruned")
    # Execute
    full = client_pruning(tmp_path / "full", {i: 3 for i in layers})
    bare = client_pruning(tmp_path / "bare", {i: 3 for i in layers})
    cut = client_pruning(tmp_path / "pruned", {i: 2 for i in layers})
    # Assert
    assert full["kept"][layers[0]] == [5, 2, 7]
    assert full["kept"][layers[1]] == [7, 6, 5]
    assert full["source"] == "client routing statistics (tcess)"
    assert bare is None  # no routing statistics: nothing to compare with
    assert cut["source"] == "pruned export"
    assert cut["kept"] == {i: [0, 1, 2, 3] for i in layers}
