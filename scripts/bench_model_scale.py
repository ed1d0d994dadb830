"""A full-size OLMoE-1B-7B-shaped model through fedmoe on one machine: memory, time, bytes.

Builds a random-weight checkpoint with the exact OLMoE-1B-7B config (16 layers, hidden 2048,
64 experts of intermediate 1024, top-8, vocabulary 50304: 6.9 B parameters, bf16, about
13 GB; the tiny base's tokenizer), written one decoder layer at a time so building it needs
no 13 GB of memory. Then, side by side in one run:

1. ``fedmoe simulate``: 4 clients, 2 rounds, LoRA (2 steps per round, sequence 128, batch 1,
   activation checkpointing), each client pruned to 50% of its routed experts at round 2 and
   exported. Peak memory is the PSS of the whole process tree (Ray's workers included),
   sampled by this script, divided by the checkpoint's bytes (goal <= 1.3).
2. ``fedmoe edge generate``-style decoding of one export with a cache of 2x the active
   experts per layer, every expert file evicted from the page cache first
   (``POSIX_FADV_DONTNEED``), so misses are disk reads: peak memory (goal <= 4 GB), decode
   tokens/s, bytes read per token, and the disk's cold sequential read speed.
   With ``--only qlora`` (in the default set), the same simulation again with the routed
   experts frozen in 4 bits (``train.quantize=nf4``), one client actor at a time like the
   bf16 run: peak ÷ checkpoint and seconds per step side by side with bf16; its exports are
   deleted after it.
3. The tiny model's smoke simulation with this tree and with another checkout
   (``--before``, e.g. a ``git worktree`` of the previous release): seconds, and the ratio.

Prints a table and ratios, saves ``bench_model_scale.json``. Disk: checkpoint 13 GB + 4
exports of 6.5 GB during the run; three exports are deleted after it (``--keep-exports``).

Usage::

    .venv/bin/python scripts/bench_model_scale.py --dir /work/bench_scale \\
        [--before /tmp/fedmoe_before] [--only sim|qlora|edge|tiny|upload]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedmoe.memory import GiB, PeakMemory  # noqa: E402

OLMOE_1B_7B = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                   num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                   num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                   clip_qkv=None, norm_topk_prob=False, router_aux_loss_coef=0.01,
                   output_router_logits=False, bos_token_id=0, eos_token_id=0,
                   pad_token_id=1)

SIM = ["model=olmoe_1b_7b", "train=lora", "data.num_clients=4", "fl.num_rounds=2",
       "train.local_steps=2", "train.batch_size=1", "data.block_size=128",
       "data.max_train_blocks_per_client=32", "data.max_eval_blocks_per_client=2",
       "train.gradient_checkpointing=true", "train.device=cpu", "fl.client_threads=2",
       "prune=default", "prune.keep=0.5", "prune.at_round=2", "fl.min_train_nodes=4",
       "fl.min_evaluate_nodes=4", "fl.min_available_nodes=4", "data.max_mb_per_domain=0.5",
       "pretraining=smoke"]


# --- 1. the checkpoint -----------------------------------------------------------------------


@torch.no_grad()
def build_checkpoint(out: Path, tokenizer_dir: Path, seed: int = 0,
                     layers: int | None = None) -> int:
    """Random OLMoE-1B-7B weights (std 0.02, norms 1), one shard per decoder layer, in the
    layout transformers saves (``layers``: cut to that many); returns the weight bytes."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model("olmoe", **(OLMOE_1B_7B | (
        {"num_hidden_layers": layers} if layers else {})))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    groups: dict[str, list[str]] = {}
    for name in model.state_dict():
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(name)
    gen = torch.Generator().manual_seed(seed)
    state, weight_map, total = model.state_dict(), {}, 0
    order = sorted(groups, key=lambda k: -1 if k == "rest" else int(k))
    for n, group in enumerate(order, 1):
        shard = {}
        for name in groups[group]:
            shape = state[name].shape
            if name.endswith("norm.weight"):
                shard[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                shard[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        shard = revert_weight_conversion(model, shard)
        file = f"model-{n:05d}-of-{len(order):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(out / file),
                  metadata={"format": "pt"})
        weight_map |= {k: file for k in shard}
        total += sum(v.numel() * v.element_size() for v in shard.values())
        print(f"  shard {n}/{len(order)} ({group})", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(out)
    for f in tokenizer_dir.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return total


def tiny_tokenizer_dir(cache: Path) -> Path:
    from fedmoe.fl.bridge import compose
    from fedmoe.train.pretrain import ensure_base_model

    return Path(ensure_base_model(compose(["experiment=smoke", f"cache_dir={cache}"]),
                                  progress=False))


# --- helpers ---------------------------------------------------------------------------------


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None,
                 timeout: float = 6 * 3600) -> dict:
    """Run ``cmd``; its wall seconds, exit code, output tail and the peak PSS of its tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd)
    with PeakMemory(proc.pid, interval=0.5) as peak:
        out, _ = proc.communicate(timeout=timeout)
    return {"seconds": time.perf_counter() - start, "rc": proc.returncode,
            "peak_pss_bytes": peak.peak_bytes, "tail": out[-3000:]}


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache: the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_read_mb_s(path: Path) -> float:
    """Sequential read speed of ``path`` after evicting it (MB/s)."""
    evict([path])
    start, size = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(16 * 2**20):
            size += len(chunk)
    return size / 1e6 / (time.perf_counter() - start)


def simulate(tree: Path, cache: Path, run_dir: Path, overrides: list[str]) -> tuple[dict, dict]:
    """``fedmoe simulate`` of ``tree`` into a fresh ``run_dir``: the measurement and its
    ``results.json``; a failed run stops the benchmark with its output."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "fedmoe.cli", "simulate", *overrides,
           f"hydra.run.dir={run_dir}"]
    result = run_measured(cmd, env_for(tree, cache), cwd=tree)
    if result["rc"] != 0:
        raise SystemExit(f"simulate {overrides} failed (rc {result['rc']}):\n{result['tail']}")
    return result, json.loads((run_dir / "results.json").read_text())


def env_for(tree: Path, cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), FEDMOE_CACHE=str(cache), WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    return env


# --- 2. the simulation -----------------------------------------------------------------------


def simulate_large(ckpt: Path, work: Path, cache: Path, name: str = "sim",
                   extra: tuple[str, ...] = ()) -> dict:
    run_dir = work / name
    result, results = simulate(ROOT, cache, run_dir, [*SIM, f"model.path={ckpt}", *extra])
    rounds = results["rounds"]
    clients = results["clients"]
    train = [r for r in rounds]
    steps = 2 * len(clients) * len(rounds)
    return {
        "run_dir": str(run_dir), "wall_seconds": result["seconds"],
        "peak_pss_bytes": result["peak_pss_bytes"],
        "peak_pss_in_run": results.get("memory", {}).get("peak_pss_bytes"),
        "train_seconds_mean_per_client_round": [r.get("train_seconds") for r in train],
        "round_seconds": [r["wall_seconds"] for r in rounds],
        "steps": steps,
        "personal_mb": {c: v.get("personal_mb") for c, v in clients.items()},
        "upload_bytes_per_client_round": results["payload_bytes"],
        "bytes_up": [r["bytes_up"] for r in rounds],
        "accepted": [r["accepted"] for r in rounds],
        "final_ppl": {c: v["final_ppl"] for c, v in clients.items()},
        "max_concurrent_clients": results.get("memory", {}).get("max_concurrent_clients"),
    }


def raw_aggregated_bytes(ckpt: Path) -> tuple[int, int]:
    """Bytes of the aggregated roles' tensors in the model's dtype (OLMoE: the routers), and
    of the ArrayRecord a client sends with them (Flower's own count: payload and metadata)."""
    from fedmoe.fl.bridge import compose
    from fedmoe.fl.codec import encode_record
    from fedmoe.fl.server_app import initial_arrays

    cfg = compose([*SIM, f"model.path={ckpt}", f"fl.base_model={ckpt}"])
    arrays, _, _, wire = initial_arrays(cfg)
    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}
    raw = sum(a.numpy().size * itemsize[wire[k]] for k, a in arrays.items())
    record = encode_record({k: a.numpy() for k, a in arrays.items()}, wire)
    return raw, record.count_bytes()


# --- 3. the edge -----------------------------------------------------------------------------

EDGE_CHILD = """
import json, sys, time, torch
from pathlib import Path
from fedmoe.memory import PeakMemory
from fedmoe.checkpoints import load_checkpoint_dir
from fedmoe.edge.store import ExpertStore
from fedmoe.edge.offload import EdgeConfig, offload
model_dir, store_dir, out, tokens, policy = sys.argv[1:6]
torch.set_num_threads(2)
with PeakMemory(interval=0.05) as peak:
    model, tok = load_checkpoint_dir(model_dir, "bfloat16", "cpu", offloaded=True)
    store = ExpertStore(store_dir)
    runtime = offload(model, store, EdgeConfig(budget="2x", policy=policy, prefetch=False))
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=1, do_sample=False)  # prefill
        store.reset_counters()
        start = time.perf_counter()
        out_ids = model.generate(ids, max_new_tokens=int(tokens), do_sample=False)
        seconds = time.perf_counter() - start
    stats = runtime.stats()
new = out_ids.shape[1] - ids.shape[1]
Path(out).write_text(json.dumps({"peak_pss_bytes": peak.peak_bytes, "seconds": seconds,
    "new_tokens": new, "bytes_loaded": store.bytes_loaded, "hit_rate":
    stats["overall"]["hit_rate"], "resident_expert_bytes": stats["resident_expert_bytes"]}))
"""


def edge(export: Path, work: Path, cache: Path, tokens: int, policy: str) -> dict:
    from fedmoe.checkpoints import load_checkpoint_dir
    from fedmoe.edge.store import ExpertStore

    store_dir = work / "expert_store"
    if not (store_dir / "expert_store.json").is_file():
        model, _ = load_checkpoint_dir(export, "bfloat16", "cpu", offloaded=True)
        start = time.perf_counter()
        ExpertStore.build_from_checkpoint(model, export, store_dir)
        print(f"  expert store written in {time.perf_counter() - start:.0f} s", flush=True)
        del model
    files = [*store_dir.rglob("*.safetensors"), *export.glob("*.safetensors")]
    evict(files)
    out = work / "edge.json"
    result = run_measured([sys.executable, "-c", EDGE_CHILD, str(export), str(store_dir),
                           str(out), str(tokens), policy], env_for(ROOT, cache), cwd=ROOT)
    if result["rc"] != 0:
        raise SystemExit(f"edge failed:\n{result['tail']}")
    measured = json.loads(out.read_text())
    measured["disk_cold_read_mb_s"] = cold_read_mb_s(max(files, key=lambda p: p.stat().st_size))
    measured["export_bytes"] = sum(f.stat().st_size for f in export.glob("*.safetensors"))
    measured["store_bytes"] = sum(f.stat().st_size for f in store_dir.rglob("*.safetensors"))
    return measured


# --- 4. the tiny model, before and after -----------------------------------------------------


# The same run on both trees, whatever each tree's smoke preset says (the presets changed).
TINY = ["experiment=smoke", "pretraining.steps=40", "train.local_steps=4", "train.batch_size=4",
        "data.max_train_blocks_per_client=64", "data.max_eval_blocks_per_client=16"]


def tiny(tree: Path, cache: Path, work: Path, tag: str) -> dict:
    """The smoke simulation on ``tree``: a first run pretrains (not timed), the second is."""
    for attempt in ("warm", "timed"):
        result, results = simulate(tree, cache, work / f"tiny_{tag}_{attempt}",
                                   [*TINY, f"cache_dir={cache}"])
    rounds = results["rounds"]
    return {"seconds": result["seconds"], "round_seconds": [r["wall_seconds"] for r in rounds],
            "peak_pss_bytes": result["peak_pss_bytes"]}


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("bench_model_scale"))
    ap.add_argument("--before", type=Path, help="another checkout for the tiny-model ratio")
    ap.add_argument("--only", choices=["sim", "qlora", "edge", "tiny", "upload"],
                    action="append")
    ap.add_argument("--edge-tokens", type=int, default=16)
    ap.add_argument("--edge-policy", default="lru")
    ap.add_argument("--keep-exports", type=int, default=1)
    args = ap.parse_args()
    work = args.dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    ckpt = work / "olmoe_1b_7b"
    report_path = work / "bench_model_scale.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    only = set(args.only or ["sim", "qlora", "edge", "tiny"])
    if not (ckpt / "config.json").is_file():
        print("building the OLMoE-1B-7B-shaped checkpoint ...", flush=True)
        report["checkpoint_bytes"] = build_checkpoint(ckpt, tiny_tokenizer_dir(cache))
    report["checkpoint_bytes"] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    if "sim" in only:
        print("simulate: 4 clients x 2 rounds on the 6.9B model ...", flush=True)
        report["simulate"] = simulate_large(ckpt, work, cache)
        raw, record = raw_aggregated_bytes(ckpt)
        report["simulate"] |= {"raw_aggregated_bytes": raw, "record_bytes": record}
        exports = sorted((work / "sim" / "clients").glob("client_*/model"))
        for extra in exports[args.keep_exports:]:
            shutil.rmtree(extra)
        report["simulate"]["exports_kept"] = [str(e) for e in exports[:args.keep_exports]]
        report_path.write_text(json.dumps(report, indent=2))
    if "qlora" in only:
        print("simulate: the same with the routed experts in nf4 (train.quantize=nf4) ...",
              flush=True)
        # One client actor at a time, as the bf16 run (its memory allows no second one), so
        # the two peaks compare one client each; by default this machine would run two.
        report["simulate_nf4"] = simulate_large(ckpt, work, cache, "sim_nf4",
                                                ("train.quantize=nf4",
                                                 "fl.max_concurrent_clients=1"))
        for export in (work / "sim_nf4" / "clients").glob("client_*/model"):
            shutil.rmtree(export)  # bf16 like the others: the edge uses the first run's
        report_path.write_text(json.dumps(report, indent=2))
    if "upload" in only and "sim" not in only:
        raw, record = raw_aggregated_bytes(ckpt)
        report["simulate"] |= {"raw_aggregated_bytes": raw, "record_bytes": record}
        report_path.write_text(json.dumps(report, indent=2))
    if "edge" in only:
        export = Path(report["simulate"]["exports_kept"][0])
        print(f"edge: decoding {export} with 2x cache, cold reads ...", flush=True)
        report["edge"] = edge(export, work, cache, args.edge_tokens, args.edge_policy)
        report_path.write_text(json.dumps(report, indent=2))
    if "tiny" in only:
        report["tiny_after"] = tiny(ROOT, cache, work, "after")
        if args.before:
            report["tiny_before"] = tiny(args.before.resolve(), cache, work, "before")
        report_path.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"wrote {report_path}")


def print_table(report: dict) -> None:
    ck = report["checkpoint_bytes"]
    rows = [("checkpoint", f"{ck / 1e9:.2f} GB")]
    if "simulate" in report:
        s = report["simulate"]
        up = s["upload_bytes_per_client_round"]
        rows += [
            ("simulate peak PSS / checkpoint (goal <= 1.3)", f"{s['peak_pss_bytes'] / ck:.3f}"),
            ("simulate wall s (4 clients x 2 rounds)", f"{s['wall_seconds']:.0f}"),
            ("s per local step (client train seconds / 2 steps)",
             ", ".join(f"{t / 2:.1f}" for t in s["train_seconds_mean_per_client_round"] if t)),
            ("s per round (wall, 4 clients one at a time, eval, export)",
             ", ".join(f"{t:.0f}" for t in s["round_seconds"])),
            ("personal state MB per client", ", ".join(f"{v:.1f}" for v in
                                                     s["personal_mb"].values() if v)),
            ("upload MB per client per round", f"{up / 1e6:.3f}"),
            ("upload overhead vs raw aggregated bytes (ArrayRecord.count_bytes)",
             f"{s['record_bytes'] / s['raw_aggregated_bytes'] - 1:.4%}"
             if "record_bytes" in s else "-"),
            ("clients accepted per round", str([len(a) for a in s["accepted"]])),
        ]
    if "simulate_nf4" in report:
        q = report["simulate_nf4"]
        rows += [
            ("nf4 experts: simulate peak PSS / checkpoint", f"{q['peak_pss_bytes'] / ck:.3f}"),
            ("nf4 experts: s per local step",
             ", ".join(f"{t / 2:.1f}" for t in q["train_seconds_mean_per_client_round"] if t)),
            ("nf4 experts: clients accepted per round", str([len(a) for a in q["accepted"]])),
        ]
        if "simulate" in report:
            s = report["simulate"]
            rows += [("nf4 / bf16 peak PSS", f"{q['peak_pss_bytes'] / s['peak_pss_bytes']:.3f}"),
                     ("nf4 / bf16 seconds per step", f"{_per_step(q) / _per_step(s):.3f}")]
    if "edge" in report:
        e = report["edge"]
        rows += [
            ("export size", f"{e['export_bytes'] / 1e9:.2f} GB"),
            ("edge peak PSS (goal <= 4 GB)", f"{e['peak_pss_bytes'] / 1e9:.2f} GB "
                                             f"({e['peak_pss_bytes'] / GiB:.2f} GiB)"),
            ("edge decode tokens/s (cold disk)", f"{e['new_tokens'] / e['seconds']:.3f}"),
            ("edge MB read per token", f"{e['bytes_loaded'] / e['new_tokens'] / 1e6:.1f}"),
            ("edge hit rate", f"{e['hit_rate']:.3f}"),
            ("disk cold sequential read", f"{e['disk_cold_read_mb_s']:.0f} MB/s"),
        ]
    if "tiny_after" in report:
        a = report["tiny_after"]
        rows.append(("tiny smoke simulate s (after)", f"{a['seconds']:.1f}"))
        if "tiny_before" in report:
            b = report["tiny_before"]
            rows += [("tiny smoke simulate s (before)", f"{b['seconds']:.1f}"),
                     ("tiny after / before (<= 1: no slower)",
                      f"{a['seconds'] / b['seconds']:.3f}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _per_step(sim: dict) -> float:
    train = [t for t in sim["train_seconds_mean_per_client_round"] if t]
    return sum(train) / len(train) / 2


if __name__ == "__main__":
    main()
