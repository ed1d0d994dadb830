"""Measure generation under a memory budget: speed, hit rates, traffic, memory.

Each *contender* is one way to run the same greedy generation: an in-memory experts
implementation (``eager``, ``batched_mm``, ``grouped_mm``), naive offloading (load on every
use), or the offloaded model with a cache policy, budget and prefetch setting. For offloaded
contenders, Belady's hit rate is computed on the very trace the run recorded, at the same
capacity, so ``hit_rate / belady_hit_rate`` says how close a policy comes to the optimum.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers.generation.streamers import BaseStreamer

from fedmoe.edge.offload import EdgeConfig, EdgeRuntime
from fedmoe.expert_cache import CacheStats, simulate_cache_stats
from fedmoe.moe.adapter import MoEAdapter

# The JSON keys every contender carries (more may follow).
KEYS = ("policy", "budget", "hit_rate", "belady_hit_rate", "prefill_tokens_per_s",
        "decode_tokens_per_s", "bytes_loaded", "peak_rss_mb")


class TimingStreamer(BaseStreamer):
    """Timestamps of what ``generate`` emits: the prompt first, then one call per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@contextmanager
def rss_monitor(interval_s: float = 0.005) -> Iterator[dict[str, float]]:
    """Samples this process's RSS in a thread; ``result["peak_mb"]`` when the block exits."""
    proc, result, stop = psutil.Process(), {"peak_mb": 0.0}, threading.Event()

    def sample() -> None:
        while True:
            result["peak_mb"] = max(result["peak_mb"], proc.memory_info().rss / 2**20)
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_mb"] = max(result["peak_mb"], proc.memory_info().rss / 2**20)


@dataclass
class Timing:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    new_tokens: int
    peak_rss_mb: float
    output_ids: torch.Tensor = field(repr=False)


def best_of(repeats: int, run: Any) -> Timing:
    """The fastest of ``repeats`` calls of ``run()`` (speeds and memory of the best each)."""
    timings = [run() for _ in range(max(1, repeats))]
    return Timing(max(t.prefill_tokens_per_s for t in timings),
                  max(t.decode_tokens_per_s for t in timings), timings[-1].new_tokens,
                  max(t.peak_rss_mb for t in timings), timings[-1].output_ids)


@torch.inference_mode()
def timed_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> Timing:
    """Greedy generation of exactly ``max_new_tokens``; prefill and decode speeds apart."""
    streamer = TimingStreamer()
    with rss_monitor() as rss:
        start = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                             pad_token_id=0)
    # times[0]: prompt handed over; times[1]: first new token (after prefill); then decode.
    prefill_s = streamer.times[1] - start
    decode_steps = len(streamer.times) - 2
    decode_s = streamer.times[-1] - streamer.times[1]
    return Timing(input_ids.numel() / prefill_s,
                  decode_steps / decode_s if decode_steps else float("nan"),
                  len(streamer.times) - 1, rss["peak_mb"], out)


def belady_stats(trace: Mapping[int, Sequence[Sequence[int]]], capacities: Mapping[int, int],
                 warm: bool = False) -> dict[int, CacheStats]:
    """Belady's MIN per layer on a recorded trace at the given capacities."""
    return {i: simulate_cache_stats(steps, capacities[i], "belady", warm=warm)
            for i, steps in trace.items()}


@contextmanager
def replay_routing(model: nn.Module, trace: Mapping[int, torch.Tensor],
                   predictions: Mapping[int, torch.Tensor] | None = None) -> Iterator[None]:
    """Replace each MoE layer's top-k ids by the rows of ``trace[layer]`` (``(T, k)``), in order.

    Every forward call of a layer consumes as many rows as it has tokens (wrapping around), so
    prefill and decode see a recorded sequence of real routing decisions. The gate weights stay
    the model's own; only which experts run changes.

    ``predictions[layer]`` (``(T, k)``, aligned with the trace) replaces the prefetcher's guess
    for that layer: the experts most of the current tokens' recorded predictions name. Without
    it, an offloaded model would guess the replayed routing with its own routers, which have
    nothing to do with it.
    """
    from fedmoe.edge.offload import PREDICTOR_ATTR
    from fedmoe.edge.prefetch import most_voted

    handles, marked = [], []
    current: dict[str, torch.Tensor] = {}  # the rows of the tokens in flight
    for layer in MoEAdapter(model).moe_layers():
        rows = trace[layer.index]
        position = [0]

        def swap(_module, args, kwargs, rows=rows, position=position):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            values = dict(zip(names, args, strict=False)) | kwargs
            ids = values["top_k_index"]  # (T, k)
            take = torch.arange(position[0], position[0] + ids.shape[0]) % rows.shape[0]
            position[0] += ids.shape[0]
            current["take"] = take
            values["top_k_index"] = rows[take].to(ids.device, ids.dtype)
            return (), values

        handles.append(layer.experts.register_forward_pre_hook(swap, with_kwargs=True))
        if predictions is not None and layer.index in predictions:
            guesses = predictions[layer.index]

            def predict(_hidden, limit, guesses=guesses):
                take = current["take"] % guesses.shape[0]
                return most_voted(guesses[take], limit)

            setattr(layer.experts, PREDICTOR_ATTR, predict)
            marked.append(layer.experts)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for experts in marked:
            delattr(experts, PREDICTOR_ATTR)


def run_in_memory(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                  implementation: str, expert_bytes: int, repeats: int = 1,
                  around: Any = None) -> dict[str, Any]:
    """One in-memory contender (all routed experts resident); the best of ``repeats`` runs."""
    model.set_experts_implementation(implementation)

    def run() -> Timing:
        with (around or _nothing)():
            return timed_generate(model, input_ids, max_new_tokens)

    timing = best_of(repeats, run)
    return {"contender": f"in-memory {implementation}", "policy": implementation,
            "budget": "all", "prefetch": False, "hit_rate": 1.0, "belady_hit_rate": 1.0,
            "prefill_tokens_per_s": timing.prefill_tokens_per_s,
            "decode_tokens_per_s": timing.decode_tokens_per_s, "bytes_loaded": 0,
            "peak_rss_mb": timing.peak_rss_mb, "resident_expert_bytes": expert_bytes,
            "resident_expert_fraction": 1.0, "output_ids": timing.output_ids}


def run_offloaded(runtime: EdgeRuntime, input_ids: torch.Tensor, max_new_tokens: int,
                  config: EdgeConfig, repeats: int = 1, around: Any = None,
                  name: str | None = None) -> dict[str, Any]:
    """One offloaded contender: fresh caches under ``config`` for each of ``repeats`` timed
    generations (speeds: the best; statistics: the last, identical for greedy decoding)."""

    def run() -> Timing:
        runtime.configure(config)
        gc.collect()
        with (around or _nothing)():
            return timed_generate(runtime.model, input_ids, max_new_tokens)

    timing = best_of(repeats, run)
    stats = runtime.stats()
    # A policy that preloads (static) is held to Belady with the optimal preload.
    belady = belady_stats(runtime.trace(), runtime.capacities, warm=config.policy == "static")
    belady_total = sum(belady.values(), CacheStats())
    resident = 0 if config.policy == "none" else runtime.resident_expert_nbytes
    name = name or ("naive offload" if config.policy == "none" else
                    f"{config.policy} {config.budget}{' +prefetch' if config.prefetch else ''}")
    return {"contender": name, "policy": config.policy, "budget": str(config.budget),
            "prefetch": bool(config.prefetch), "hit_rate": stats["overall"]["hit_rate"],
            "belady_hit_rate": belady_total.hit_rate,
            "prefill_tokens_per_s": timing.prefill_tokens_per_s,
            "decode_tokens_per_s": timing.decode_tokens_per_s,
            "bytes_loaded": stats["bytes_loaded"], "peak_rss_mb": timing.peak_rss_mb,
            "cold_misses": stats["overall"]["cold_misses"],
            "hit_rate_warm": stats["overall"]["hit_rate_warm"],
            "hit_rate_per_layer": {str(i): s["hit_rate"] for i, s in stats["layers"].items()},
            "belady_hit_rate_per_layer": {str(i): s.hit_rate for i, s in belady.items()},
            "capacity_per_layer": {str(i): c for i, c in runtime.capacities.items()},
            "prefetch_precision": (stats["prefetch"] or {}).get("precision"),
            "prefetch_recall": (stats["prefetch"] or {}).get("recall"),
            "preload_bytes": stats["preload_bytes"], "resident_expert_bytes": resident,
            "resident_expert_fraction": resident / stats["total_expert_bytes"],
            "output_ids": timing.output_ids}


def contender_configs(budgets: Sequence[int | str], policies: Sequence[str],
                      prefetch: Sequence[bool], window: int,
                      counts: Mapping[int, Sequence[float]] | None) -> list[EdgeConfig]:
    """Every (budget, policy, prefetch) combination that makes sense; naive offload first."""
    configs = [EdgeConfig(budget=1, policy="none")]
    for budget in budgets:
        for policy in policies:
            for pf in prefetch:
                if policy == "static" and (pf or counts is None):
                    continue  # fixed contents: prefetching has nowhere to go
                configs.append(EdgeConfig(budget=budget, policy=policy, window=window,
                                          prefetch=pf, counts=counts))
    return configs


def print_table(rows: Sequence[Mapping[str, Any]], title: str,
                console: Console | None = None) -> None:
    """The contenders side by side, speeds also as a ratio of the fastest in-memory one."""
    fastest = max((r["decode_tokens_per_s"] for r in rows if r["policy"] in _IN_MEMORY),
                  default=float("nan"))
    table = Table(title=title)
    for col in ("contender", "hit rate", "Belady", "prefill tok/s", "decode tok/s",
                "decode vs best in-mem", "MB loaded", "experts held", "peak RSS MB",
                "prefetch P/R"):
        table.add_column(col, justify="left" if col == "contender" else "right",
                         no_wrap=col == "contender")
    for r in rows:
        pr = (f"{r['prefetch_precision']:.2f}/{r['prefetch_recall']:.2f}"
              if r.get("prefetch_precision") is not None else "-")
        table.add_row(r["contender"], f"{r['hit_rate']:.3f}", f"{r['belady_hit_rate']:.3f}",
                      f"{r['prefill_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s']:.2f}",
                      f"{r['decode_tokens_per_s'] / fastest:.2f}",
                      f"{r['bytes_loaded'] / 1e6:.1f}",
                      f"{100 * r['resident_expert_fraction']:.0f}%",
                      f"{r['peak_rss_mb']:.0f}", pr)
    (console or Console(width=max(Console().width, 150))).print(table)


_IN_MEMORY = ("eager", "batched_mm", "grouped_mm")


def bench_model(model: nn.Module, input_ids: torch.Tensor, store: Any, *, max_new_tokens: int,
                in_memory: Sequence[str], configs: Sequence[EdgeConfig],
                around: Any = None, repeats: int = 1,
                fedmoe_in_memory: bool = True) -> list[dict[str, Any]]:
    """Every contender on one model; the model ends up offloaded (its experts freed).

    Parameters
    ----------
    model : nn.Module
        The full in-memory model (in-memory contenders run first).
    input_ids : (1, P) tensor
        The prompt.
    store : ExpertStore, str or Path
        Where the experts go (see :func:`fedmoe.edge.offload.offload`).
    max_new_tokens : int
        Tokens generated per contender.
    in_memory : sequence of str
        Experts implementations to time with everything resident.
    configs : sequence of EdgeConfig
        Offloaded contenders (see :func:`contender_configs`).
    around : callable, optional
        Returns a fresh context manager wrapped around every contender's run (e.g.
        ``lambda: replay_routing(model, trace)``).
    repeats : int
        Timed runs per contender; the fastest counts (a shared machine is noisy).
    fedmoe_in_memory : bool
        Also time ``"fedmoe in-memory"``: the offloaded model with every expert pinned before
        the first token (budget ``all``), i.e. fedmoe's experts forward without any load.

    Returns
    -------
    list of dict
        One row per contender with :data:`KEYS` and more; ``same_output`` compares its tokens
        with the first in-memory contender's.
    """
    from fedmoe.edge.offload import offload

    expert_bytes = _routed_expert_nbytes(model)
    rows = [run_in_memory(model, input_ids, max_new_tokens, implementation, expert_bytes,
                          repeats, around) for implementation in in_memory]
    runtime = offload(model, store, EdgeConfig(budget=1, policy="none"))
    gc.collect()
    try:
        if fedmoe_in_memory:  # every expert pinned up front: fedmoe's experts forward alone
            every = {layer.index: [1.0] * layer.layer.num_experts for layer in runtime.layers}
            rows.append(run_offloaded(runtime, input_ids, max_new_tokens,
                                      EdgeConfig(budget="all", policy="static", counts=every),
                                      repeats, around, name="fedmoe in-memory"))
        for config in configs:
            rows.append(run_offloaded(runtime, input_ids, max_new_tokens, config, repeats,
                                      around))
    finally:
        runtime.close()
    reference = rows[0]["output_ids"] if rows else None
    for row in rows:
        ids = row.pop("output_ids")
        row["same_output"] = None if reference is None else bool(torch.equal(ids, reference))
    return rows


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _routed_expert_nbytes(model: nn.Module) -> int:
    adapter = MoEAdapter(model)
    return sum(getattr(layer.experts, n).numel() * getattr(layer.experts, n).element_size()
               for layer in adapter.moe_layers() for n in layer.expert_param_names())
