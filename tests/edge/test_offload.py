"""Offloaded experts: identical greedy generations, freed memory, honest accounting."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from fedmoe.checkpoints import load_checkpoint_dir
from fedmoe.edge import IMPLEMENTATION, EdgeConfig, ExpertStore, offload
from fedmoe.edge.runtime import routing_counts
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.families import Role
from fedmoe.prune import export_checkpoint
from tests.helpers.edge import PROMPT, greedy
from tests.helpers.models import grafted_model, tiny_model

BUDGETS = ("1x", "2x", "all")


def test_store_round_trips_every_expert_and_counts_bytes(tmp_path):
    # Prepare
    model = tiny_model("olmoe")
    layer = MoEAdapter(model).moe_layers()[1]

    # Execute
    store = ExpertStore.build(model, tmp_path)
    loaded = store.load(layer.index, 5)

    # Assert
    for name, tensor in layer.expert_tensors(5).items():
        assert torch.equal(loaded[name], tensor)
    per_expert = sum(t.numel() * t.element_size() for t in loaded.values())
    assert store.expert_nbytes(layer.index) == per_expert
    assert (store.loads, store.bytes_loaded) == (1, per_expert)
    assert store.total_nbytes == per_expert * 8 * 3
    assert len(list(tmp_path.glob("layer*/expert*.safetensors"))) == 8 * 3


def test_greedy_generation_is_identical_for_every_policy_and_budget(family, offloadable):
    # Prepare
    model, expected, store = offloadable(family)
    counts = routing_counts(model, PROMPT)
    runtime = offload(model, store, EdgeConfig(budget="1x", policy="none"))
    configs = [EdgeConfig(budget=b, policy=p, prefetch=pf, counts=counts)
               for b in BUDGETS for p in ("lru", "lfu", "consistency") for pf in (False, True)]
    configs += [EdgeConfig(budget=b, policy="static", counts=counts) for b in BUDGETS]

    # Execute / Assert
    assert torch.equal(greedy(model), expected)  # naive offload
    traces = {}
    for config in configs:
        runtime.configure(config)
        assert torch.equal(greedy(model), expected), (family, config.policy, config.budget)
        traces[config.budget] = runtime.trace()
    for budget in BUDGETS:
        runtime.configure(EdgeConfig(budget=budget, policy="belady", trace=traces[budget]))
        assert torch.equal(greedy(model), expected), (family, "belady", budget)
    runtime.close()


def test_offloading_frees_the_resident_experts(offloadable):
    # Prepare
    model, _, store = offloadable("qwen2_moe")
    resident = sum(p.numel() * p.element_size() for p in model.parameters())

    # Execute
    offload(model, store, EdgeConfig(budget="2x", policy="lru"))

    # Assert: the routed experts left (meta tensors of the same shapes), nothing else did
    left = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    assert resident - left == store.total_nbytes
    adapter = MoEAdapter(model)
    for layer in adapter.moe_layers():
        assert all(getattr(layer.experts, n).is_meta for n in layer.expert_param_names())
        assert layer.experts.gate_up_proj.shape[0] == layer.num_experts
    assert model.config._experts_implementation == IMPLEMENTATION


# Experts each step needs in every MoE layer, replayed: prefill (the 8 prompt tokens all
# route to {0, 1}), then the 7 decode steps of an 8-token greedy generation.
STEPS = [[0, 1], [0, 1], [2, 3], [0, 1], [0, 2], [2, 3], [4, 5], [0, 1]]


def _replayed(steps: list[list[int]], prompt_len: int) -> torch.Tensor:
    """The ``(T, k)`` routing rows that make each forward call need ``steps[i]``."""
    return torch.tensor([steps[0]] * prompt_len + steps[1:])


def test_runtime_accounting_is_the_hand_counted_lru(offloadable):
    # Prepare: capacity 2 (1x of top-2). LRU on STEPS by hand (step: hits, misses -> cache):
    #   {0,1}: -, 0 1 (cold) -> {0,1}     {0,1}: 0 1, -            {2,3}: -, 2 3 (cold) -> {2,3}
    #   {0,1}: -, 0 1 -> {0,1}            {0,2}: 0, 2 (1 is the least recent) -> {0,2}
    #   {2,3}: 2, 3 -> {2,3}              {4,5}: -, 4 5 (cold)     {0,1}: -, 0 1
    #   per layer: 16 lookups, 4 hits, 12 misses loaded, 6 of them first uses; the first two
    #   (0, 1) found free slots, hits by the one rule (fedmoe.expert_cache): 6 hits, 4 cold
    from fedmoe.edge.bench import replay_routing

    model, _, store = offloadable("olmoe")
    layers = [layer.index for layer in MoEAdapter(model).moe_layers()]
    rows = _replayed(STEPS, PROMPT.shape[1])
    runtime = offload(model, store, EdgeConfig(budget="1x", policy="lru"))
    # Execute
    with replay_routing(model, {i: rows for i in layers}):
        greedy(model)
    stats, trace = runtime.stats(), runtime.trace()
    # Assert
    assert trace == {i: STEPS for i in layers}
    for i in layers:
        layer = stats["layers"][i]
        assert (layer["lookups"], layer["resident_hits"], layer["first_uses"]) == (16, 4, 6), i
        assert (layer["hits"], layer["cold_misses"]) == (6, 4), i
        assert layer["capacity"] == 2
    # every lookup not found resident loads one expert, nothing else does
    overall = stats["overall"]
    assert stats["loads"] == overall["lookups"] - overall["resident_hits"] == 12 * len(layers)
    assert stats["bytes_loaded"] == 12 * len(layers) * store.expert_nbytes(layers[0])
    assert all(len(ol.weights) <= 2 for ol in runtime.layers)


def test_everything_resident_loads_each_used_expert_once(offloadable):
    # Prepare
    model, _, store = offloadable("qwen3_moe")
    runtime = offload(model, store, EdgeConfig(budget="all", policy="lru"))

    # Execute
    greedy(model)
    stats = runtime.stats()

    # Assert
    # every load is a first use into a free slot: a hit by the one rule, never cold
    overall = stats["overall"]
    assert overall["first_uses"] == overall["free_slot_hits"] == stats["loads"]
    assert (overall["misses"], overall["cold_misses"], overall["hit_rate"]) == (0, 0, 1.0)
    assert overall["hit_rate_warm"] == 1.0


def test_prefetch_precision_and_recall_are_the_known_overlap(offloadable):
    # Prepare: every step needs {0, 1}; the replayed predictions always guess {0, 2}
    from fedmoe.edge.bench import replay_routing

    model, _, store = offloadable("olmoe")
    layers = [layer.index for layer in MoEAdapter(model).moe_layers()]
    need = _replayed([[0, 1]] * 8, PROMPT.shape[1])
    guess = torch.tensor([[0, 2]] * len(need))
    runtime = offload(model, store, EdgeConfig(budget="2x", policy="lru", prefetch=True))
    # Execute
    with replay_routing(model, {i: need for i in layers}, predictions={i: guess for i in layers}):
        greedy(model)
    prefetch = runtime.stats()["prefetch"]
    runtime.close()
    # Assert: every MoE layer but the first is predicted at each of 8 steps: 2 experts
    # guessed, 2 needed, 1 of them right
    predicted = 2 * 8 * (len(layers) - 1)
    assert (prefetch["predicted"], prefetch["actual"], prefetch["correct"]) == (
        predicted, predicted, predicted // 2)
    assert prefetch["precision"] == prefetch["recall"] == 0.5


def test_static_pins_are_loaded_up_front(offloadable):
    # Prepare
    model, _, store = offloadable("olmoe")
    counts = {i: [8 - e for e in range(8)] for i in (0, 1, 2)}  # experts 0, 1 most used

    # Execute
    runtime = offload(model, store, EdgeConfig(budget="1x", policy="static", counts=counts))

    # Assert
    for ol in runtime.layers:
        assert sorted(ol.weights) == [0, 1]
    assert runtime.stats()["preload_bytes"] == 3 * 2 * store.expert_nbytes(0)
    assert runtime.stats()["bytes_loaded"] == 0


def test_a_model_never_offloaded_says_so():
    # Prepare
    model = tiny_model("olmoe")
    model.set_experts_implementation(IMPLEMENTATION)

    # Execute / Assert
    with pytest.raises(RuntimeError, match="never offloaded"):
        model(PROMPT)


def test_a_store_of_another_model_is_rejected(offloadable, tmp_path):
    # Prepare
    other = ExpertStore.build(tiny_model("olmoe", intermediate_size=8), tmp_path)
    model, _, _ = offloadable("olmoe")

    # Execute / Assert
    with pytest.raises(ValueError, match="rebuild the store"):
        offload(model, other)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_prefetch_on_a_side_stream_matches(reference):
    # Prepare
    model, expected, store = reference("qwen2_moe")
    import copy

    gpu = copy.deepcopy(model).to("cuda")
    runtime = offload(gpu, ExpertStore(store.directory),
                      EdgeConfig(budget="2x", policy="lru", prefetch=True))

    # Execute
    out = greedy(gpu, PROMPT.to("cuda")).cpu()
    prefetch = runtime.stats()["prefetch"]
    runtime.close()

    # Assert: same tokens as the CPU eager model (tiny fp32 model: no argmax near-ties)
    assert torch.equal(out, expected)
    assert prefetch["predicted"] > 0


def test_replayed_routing_and_predictions_drive_the_offloaded_layers(offloadable):
    # Prepare: a recorded trace for every MoE layer, and as predictions the trace itself
    from fedmoe.edge.bench import replay_routing

    model, _, store = offloadable("olmoe")
    layers = [layer.index for layer in MoEAdapter(model).moe_layers()]
    gen = torch.Generator().manual_seed(0)
    trace = {i: torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(64)])
             for i in layers}
    runtime = offload(model, store, EdgeConfig(budget="2x", policy="lru", prefetch=True))
    # Execute
    with replay_routing(model, trace, predictions=trace):
        greedy(model)
    stats = runtime.stats()
    steps = {i: list(steps) for i, steps in runtime.trace().items()}
    runtime.configure(EdgeConfig(budget="2x", policy="lru", prefetch=True))  # fresh caches
    with replay_routing(model, trace):  # the model's own routers guess the replayed ids
        greedy(model)
    own = runtime.stats()["prefetch"]
    runtime.close()
    # Assert: each decode step runs exactly its recorded row; perfect predictions are all
    # right (prefill's prediction is capped at the cache, so recall may fall short there)
    prompt = PROMPT.shape[1]
    for i in layers:
        assert steps[i][1] == sorted(trace[i][prompt].tolist())
    assert stats["prefetch"]["precision"] == 1.0
    assert own["precision"] < 1.0
    assert not any(hasattr(m, "_fedmoe_predictor") for m in model.modules())


def test_a_grafted_export_is_served_with_its_graft_resident(tiny_checkpoint, tmp_path):
    # Prepare: a strategy=flex client's export (graft tensors beside the checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = grafted_model("qwen2_moe", vocab_size=len(tokenizer))
    model.set_experts_implementation("eager")
    export = export_checkpoint(model, tokenizer, tmp_path / "model")
    base = tiny_model("qwen2_moe", vocab_size=len(tokenizer))
    # Execute: the edge path -- routed experts never loaded, the store written from the file
    edge, _ = load_checkpoint_dir(export, offloaded=True)
    store = ExpertStore.build_from_checkpoint(edge, export, tmp_path / "store")
    runtime = offload(edge, store, EdgeConfig(budget="1x", policy="lru"))
    # Assert: the grafts are in memory (only routed experts offloaded) and the offloaded
    # model computes the grafted model, not the base one
    adapter = MoEAdapter(edge)
    offloaded = {n for n, p in edge.named_parameters() if p.is_meta}
    assert offloaded == set(adapter.names(Role.ROUTED_EXPERTS))
    assert adapter.names(Role.GRAFT) and not offloaded & set(adapter.names(Role.GRAFT))
    with torch.inference_mode():
        logits = edge(PROMPT).logits
        torch.testing.assert_close(logits, model(PROMPT).logits)
        assert (logits - base(PROMPT).logits).abs().max() > 1e-2
    assert torch.equal(greedy(edge), greedy(model))
    runtime.close()
