"""Benchmark edge inference: offloaded experts with caching and prefetch vs in-memory.

    .venv/bin/python scripts/bench_edge.py --quick            # < 3 minutes
    .venv/bin/python scripts/bench_edge.py [--model-dir EXPORT] [--out edge_bench.json]  # ~15 min

Models
    (a) the tiny pretrained base model (``fedmoe pretrain``; ``--quick``: its smoke variant),
        or a personalized export given by ``--model-dir``;
    (b) an OLMoE-shaped model at real dimensions (hidden 2048, 64 experts of intermediate 1024,
        top-8), 2 layers, random weights;
    (c) a Qwen1.5-MoE-shaped model (hidden 2048, 60 experts of 1408 + a shared expert of 5632,
        top-4), 2 layers, random weights.

Routing of (b) and (c). Random routers route unrealistically (nearly uniform, no locality),
so (b) and (c) replay real routing: model (a) runs over a document of the embedded corpus
(``fedmoe.data``; validation split) and its per-token top-k per layer is recorded. A target
layer needing k experts out of E takes ``g = ceil(k / k_src)`` source layers (cycling through
them) and maps expert ``e`` of the j-th to ``(j * E_src + e) mod E`` (a collision inside one
token moves to the next free id), so every slot keeps a real expert's temporal pattern. The
replay swaps the top-k ids at the experts' input, for in-memory and offloaded contenders alike;
gate weights stay the model's own. Static pins come from a calibration pass over other
documents of the same domain (train split), mapped the same way. Prefetch guesses are replayed
too: model (a)'s own per-token predictions (layer l's router on layer l-1's expert input, as
the runtime predicts), mapped the same way; the random routers of (b) and (c) would guess ids
unrelated to the replayed routing.

Goals reported: at 2x the active experts per layer, the best online policy with prefetch
reaches >= 90% of Belady's hit rate on the same trace; decode tokens/s >= 50% of the fastest
in-memory contender while holding <= 40% of the routed-expert bytes; fedmoe in-memory (every
expert pinned, fedmoe's experts forward) decodes no slower than HF eager.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, OlmoeConfig, Qwen2MoeConfig

from fedmoe.checkpoints import load_checkpoint_dir
from fedmoe.data import load_data
from fedmoe.edge.bench import bench_model, contender_configs, print_table, replay_routing
from fedmoe.edge.prefetch import predicted_top_k
from fedmoe.edge.runtime import (
    compose_pretrain,
    resolve_model_dir,
    routing_counts,
)
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.routing import capture_routing

SMOKE = ["pretraining=smoke", "data.max_mb_per_domain=0.5", "model.config.num_hidden_layers=2",
         "model.config.hidden_size=64"]
DOMAIN = "python_code"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke base model, fewer contenders")
    p.add_argument("--model-dir", help="personalized export for (a) (default: tiny base model)")
    p.add_argument("--out", default="edge_bench.json", help="JSON output path")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: stable timings on a shared machine)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="weights of models (b) and (c)")
    p.add_argument("--skip-large", action="store_true", help="only model (a)")
    return p.parse_args(argv)


# ---- routing from real text ------------------------------------------------------------------


def corpus_tokens(tokenizer, cfg, split: str, min_tokens: int,
                  per_document: int | None = None) -> torch.Tensor:
    """Token ids of ``DOMAIN`` documents of ``split`` (at most ``per_document`` of each),
    concatenated until ``min_tokens``."""
    rows = load_data(cfg.data)[split].filter(lambda r: r["domain"] == DOMAIN)
    ids: list[int] = []
    for text in rows["text"]:
        ids += tokenizer(text).input_ids[:per_document]
        if len(ids) >= min_tokens:
            break
    return torch.tensor([ids[:min_tokens]])


@torch.inference_mode()
def record_top_k(model, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per MoE layer (in depth order), of one teacher-forced pass: the ``(T, k)`` top-k ids,
    and the ``(T, k)`` ids the prefetcher predicts for that layer (its router on the previous
    MoE layer's expert input, as :mod:`fedmoe.edge.prefetch` does at run time; the first
    layer, which has no previous one, on the token embeddings)."""
    layers = MoEAdapter(model).moe_layers()
    inputs: dict[int, torch.Tensor] = {}

    def keep(index):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs[index] = hidden.reshape(-1, hidden.shape[-1])
        return hook

    handles = [layer.experts.register_forward_pre_hook(keep(layer.index), with_kwargs=True)
               for layer in layers]
    try:
        with capture_routing(model, router_probs=False) as trace:
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    embeddings = model.get_input_embeddings()(input_ids)
    previous = [embeddings.reshape(-1, embeddings.shape[-1])]
    previous += [inputs[layer.index] for layer in layers[:-1]]
    predicted = [predicted_top_k(h.float(), layer) for h, layer in zip(previous, layers,
                                                                          strict=True)]
    return [r.top_k_index for r in trace], predicted


def stack_routing(source: list[torch.Tensor], source_experts: int, layers: list[int],
                  num_experts: int, top_k: int) -> dict[int, torch.Tensor]:
    """Map recorded ``(T, k_src)`` routing to target layers of ``num_experts``, ``top_k``."""
    k_src = source[0].shape[1]
    groups = math.ceil(top_k / k_src)
    out = {}
    for i, layer in enumerate(layers):
        parts = [(j * source_experts + source[(i * groups + j) % len(source)]) % num_experts
                 for j in range(groups)]
        stacked = torch.cat(parts, dim=1)  # (T, groups * k_src)
        rows = []
        for row in stacked.tolist():
            picked: list[int] = []
            for e in row:
                while e in picked:  # collision after the modulo: next free id
                    e = (e + 1) % num_experts
                picked.append(e)
            rows.append(picked[:top_k])
        out[layer] = torch.tensor(rows)
    return out


def counts_of(trace: dict[int, torch.Tensor], num_experts: int) -> dict[int, list[int]]:
    return {i: torch.bincount(t.flatten(), minlength=num_experts).tolist()
            for i, t in trace.items()}


# ---- models ------------------------------------------------------------------------------------


def large_configs(vocab_size: int) -> dict[str, object]:
    common = dict(vocab_size=vocab_size, hidden_size=2048, num_hidden_layers=2,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                  tie_word_embeddings=False)
    return {
        "olmoe-shaped": OlmoeConfig(**common, intermediate_size=1024, num_experts=64,
                                    num_experts_per_tok=8),
        "qwen1.5-moe-shaped": Qwen2MoeConfig(**common, intermediate_size=5632,
                                             moe_intermediate_size=1408, num_experts=60,
                                             num_experts_per_tok=4,
                                             shared_expert_intermediate_size=5632),
    }


def goals(rows: list[dict]) -> dict[str, float | bool | None]:
    """The issue's three goals, as ratios."""
    in_memory = [r for r in rows if r["budget"] == "all" and "in-memory" in r["contender"]]
    fastest = max((r["decode_tokens_per_s"] for r in in_memory), default=float("nan"))
    by_name = {r["contender"]: r for r in rows}
    ours, eager = by_name.get("fedmoe in-memory"), by_name.get("in-memory eager")
    ours_vs_eager = (ours["decode_tokens_per_s"] / eager["decode_tokens_per_s"]
                     if ours and eager else None)
    at_2x = [r for r in rows if r["budget"] == "2x" and r["prefetch"]]
    best = max(at_2x, key=lambda r: r["hit_rate"], default=None)
    small = [r for r in rows if not r["contender"].startswith("in-memory")
             and r["policy"] != "none" and r["resident_expert_fraction"] <= 0.4]
    fast = max(small, key=lambda r: r["decode_tokens_per_s"], default=None)
    hit_ratio = best["hit_rate"] / best["belady_hit_rate"] if best else None
    speed_ratio = fast["decode_tokens_per_s"] / fastest if fast else None
    return {"best_2x_prefetch": best["contender"] if best else None,
            "hit_rate_vs_belady": hit_ratio,
            "hit_goal_met": None if hit_ratio is None else hit_ratio >= 0.9,
            "fastest_small_budget": fast["contender"] if fast else None,
            "decode_vs_fastest_in_memory": speed_ratio,
            "speed_goal_met": None if speed_ratio is None else speed_ratio >= 0.5,
            "fedmoe_in_memory_decode_vs_eager": ours_vs_eager,
            "in_memory_goal_met": None if ours_vs_eager is None else ours_vs_eager >= 1.0}


def bench_one(name: str, model, input_ids, *, quick: bool, large: bool, new_tokens: int,
              counts, replay=None, predictions=None, repeats: int = 1) -> dict:
    # batched_mm gathers one weight copy per (token, expert) pair: GBs at real dimensions.
    in_memory = ["eager", "grouped_mm"] if large and quick else ["eager", "batched_mm",
                                                                 "grouped_mm"]
    if quick and large:  # the contenders the goals are judged on
        configs = [c for c in contender_configs(["2x"], ["lru", "static", "consistency"],
                                                [False, True], 16, counts)
                   if c.prefetch or c.policy in {"none", "static", "lru"}]
    else:
        configs = contender_configs(["1x", "2x", "4x"], ["lru", "lfu", "static", "consistency"],
                                    [False, True], 16, counts)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedmoe-bench-store-") as store:
        rows = bench_model(model, input_ids, store, max_new_tokens=new_tokens,
                           in_memory=in_memory, configs=configs,
                           around=(lambda: replay_routing(model, replay, predictions))
                           if replay else None,
                           repeats=repeats)
    print_table(rows, f"{name}: prompt {input_ids.shape[1]} tokens, {new_tokens} new")
    result = {"model": name, "prompt_tokens": input_ids.shape[1], "new_tokens": new_tokens,
              "seconds": time.perf_counter() - start, "goals": goals(rows), "contenders": rows}
    print(json.dumps({name: result["goals"]}, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = SMOKE if args.quick else []
    cfg = compose_pretrain(overrides)
    model_dir = resolve_model_dir(args.model_dir, overrides)
    prompt_len, new_tokens = (32, 16) if args.quick else (64, 128)
    results = []

    # (a) the tiny pretrained (or personalized) model: its own routing.
    model, tokenizer = load_checkpoint_dir(model_dir)
    doc = corpus_tokens(tokenizer, cfg, "validation", prompt_len + new_tokens)
    # The client's routing statistics: 64 tokens of each of many train documents.
    calibration = corpus_tokens(tokenizer, cfg, "train", 1024, per_document=64)
    routing, routing_predicted = record_top_k(model, doc)
    routing_cal, _ = record_top_k(model, calibration)
    counts = routing_counts(model, calibration)
    source_experts = max(len(c) for c in counts.values())
    results.append(bench_one(f"(a) {model_dir.name}", model, doc[:, :prompt_len],
                             quick=args.quick, large=False, new_tokens=new_tokens,
                             counts=counts, repeats=3))
    del model
    gc.collect()

    # (b), (c): real dimensions, replayed real routing.
    if not args.skip_large:
        dtype = getattr(torch, args.dtype)
        large_prompt, large_new = (8, 8) if args.quick else (16, 128)
        for letter, (name, config) in zip("bc", large_configs(len(tokenizer)).items(),
                                          strict=True):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
            layers = list(range(config.num_hidden_layers))
            e, k = config.num_experts, config.num_experts_per_tok
            replay = stack_routing(routing, source_experts, layers, e, k)
            predictions = stack_routing(routing_predicted, source_experts, layers, e, k)
            cal = counts_of(stack_routing(routing_cal, source_experts, layers, e, k), e)
            results.append(bench_one(f"({letter}) {name}", model, doc[:, :large_prompt],
                                     quick=args.quick, large=True, new_tokens=large_new,
                                     counts=cal, replay=replay, predictions=predictions))
            del model
            gc.collect()

    summary = {r["model"]: r["goals"] for r in results}
    Path(args.out).write_text(json.dumps({"quick": args.quick, "threads": args.threads,
                                          "model_dir": str(model_dir), "summary": summary,
                                          "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
