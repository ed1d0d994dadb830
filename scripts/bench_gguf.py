"""Benchmark llama.cpp against fedmoe's edge runtime on the same export: decode tokens/s and
peak memory, side by side.

    .venv/bin/python scripts/bench_gguf.py --model-dir <export> [--tokens 64] [--threads 1]

Contenders, each greedy-decoding ``--tokens`` new tokens after the same prompt, in a fresh
Python process of its own, so its peak memory is its whole footprint (interpreter, libraries,
weights, caches), measured from outside as the PSS of the process (``fedmoe.memory``):

- fedmoe in-memory: the HF model with every routed expert resident (transformers' experts);
- fedmoe edge: ``fedmoe edge generate``'s runtime, routed experts served from the expert store
  through a cache of ``--budget`` experts per layer (``--policy``, prefetch on);
- llama.cpp f16, q8_0 and q4_k_m: the GGUF files ``fedmoe export gguf`` writes, run through
  llama-cpp-python (no torch in that process: what a device running llama.cpp holds).

Decode tokens/s is the best of ``--repeats`` runs (the first new token, which ends the prompt's
prefill, is not counted). Prints a table with the ratios to fedmoe in-memory and writes JSON.
Default export: the smoke base model pruned by ``fedmoe prune`` (trained in the cache if
missing). One thread each by default: timings on a shared machine are steadier.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
LLAMA_QUANTS = ("f16", "q8_0", "q4_k_m")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", help="a fedmoe export (default: a `fedmoe prune` export of "
                                       "the smoke base model)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    p.add_argument("--repeats", type=int, default=5, help="generations per contender (best)")
    p.add_argument("--threads", type=int, default=1, help="torch / llama.cpp threads")
    p.add_argument("--budget", default="2x", help="fedmoe edge: experts cached per layer")
    p.add_argument("--policy", default="consistency", help="fedmoe edge: cache policy")
    p.add_argument("--out", default="bench_gguf.json", help="JSON output path")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a contender, in its own process
    p.add_argument("--path", help=argparse.SUPPRESS)  # its GGUF file or expert store
    return p.parse_args(argv)


# --- contenders (each in its own process) ------------------------------------------------------


def run_fedmoe(args: argparse.Namespace, offloaded: bool) -> dict:
    import torch

    from fedmoe.checkpoints import load_checkpoint_dir
    from fedmoe.edge import EdgeConfig, ExpertStore, offload
    from fedmoe.edge.bench import best_of, timed_generate

    torch.set_num_threads(args.threads)
    model, tokenizer = load_checkpoint_dir(args.model_dir, offloaded=offloaded)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    if offloaded:
        config = EdgeConfig(budget=args.budget, policy=args.policy, prefetch=True)
        runtime = offload(model, ExpertStore(args.path), config)

        def run():
            runtime.configure(config)  # cold caches each time, as a fresh start
            return timed_generate(model, input_ids, args.tokens)
    else:
        def run():
            return timed_generate(model, input_ids, args.tokens)
    timing = best_of(args.repeats, run)
    return {"decode_tokens_per_s": timing.decode_tokens_per_s,
            "prefill_tokens_per_s": timing.prefill_tokens_per_s,
            "tokens": timing.output_ids[0, input_ids.shape[1]:].tolist()}


def run_llama_cpp(args: argparse.Namespace) -> dict:
    from contextlib import closing

    from fedmoe.llamacpp import runtime

    with closing(runtime.load(args.path, threads=args.threads)) as llm:
        ids = runtime.tokenize(llm, PROMPT)
        runs = [runtime.greedy(llm, ids, args.tokens, stop_at_eos=False)
                for _ in range(args.repeats)]
    return {"decode_tokens_per_s": max(r.decode_tokens_per_s for r in runs),
            "prefill_tokens_per_s": max(len(ids) / r.prefill_s for r in runs),
            "tokens": runs[-1].tokens}


def worker(args: argparse.Namespace) -> None:
    if args.worker.startswith("llama.cpp"):
        result = run_llama_cpp(args)
    else:
        result = run_fedmoe(args, offloaded=args.worker.startswith("fedmoe edge"))
    print(json.dumps(result))


# --- the parent: files, processes, memory, table -----------------------------------------------


def contender(name: str, args: argparse.Namespace, path: Path | None) -> dict:
    """Run one contender in a fresh interpreter; its result and its peak PSS."""
    from fedmoe.memory import PeakMemory

    cmd = [sys.executable, __file__, "--worker", name, "--model-dir", str(args.model_dir),
           "--tokens", str(args.tokens), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--budget", args.budget, "--policy", args.policy]
    cmd += ["--path", str(path)] if path else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory(pid=proc.pid, interval=0.02) as peak:
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{err[-3000:]}")
    return {"contender": name, **json.loads(out.strip().splitlines()[-1]),
            "peak_pss_mb": peak.peak_bytes / 2**20}


def default_export(work: Path) -> Path:
    """``fedmoe prune`` of the smoke base model (half of the experts, by TCESS)."""
    run = work / "prune"
    subprocess.run([sys.executable, "-m", "fedmoe.cli", "prune", "pretraining=smoke",
                    "data.max_mb_per_domain=0.5", "data.block_size=64", "eval_blocks=8",
                    "prune.calibration_tokens=256", "prune.keep=0.5", f"hydra.run.dir={run}"],
                   check=True, capture_output=True)
    return run / "model"


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Path | None]:
    """The GGUF files and the expert store the contenders read (not timed, not measured)."""
    from fedmoe.checkpoints import load_checkpoint_dir
    from fedmoe.edge import ExpertStore
    from fedmoe.llamacpp.export import export_gguf

    paths: dict[str, Path | None] = {"fedmoe in-memory": None}
    model, _ = load_checkpoint_dir(args.model_dir, offloaded=True)
    paths[f"fedmoe edge {args.budget} {args.policy}"] = ExpertStore.build_from_checkpoint(
        model, Path(args.model_dir), work / "store").directory
    for quant in LLAMA_QUANTS:
        written = export_gguf(args.model_dir, work / f"model-{quant}.gguf", quant,
                              threads=args.threads)
        paths[f"llama.cpp {quant}"] = written.path
    return paths


def print_table(rows: list[dict], title: str) -> None:
    base = next(r for r in rows if r["contender"] == "fedmoe in-memory")
    table = Table(title=title)
    for col in ("contender", "file MB", "decode tok/s", "x in-memory", "peak PSS MB",
                "x in-memory", "tokens = in-memory"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for r in rows:
        same = sum(1 for _ in _common_prefix(r["tokens"], base["tokens"]))
        table.add_row(r["contender"], f"{r['file_mb']:.2f}" if r.get("file_mb") else "",
                      f"{r['decode_tokens_per_s']:.1f}",
                      f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}",
                      f"{r['peak_pss_mb']:.0f}", f"{r['peak_pss_mb'] / base['peak_pss_mb']:.2f}",
                      f"{same}/{len(base['tokens'])}")
    Console(width=140).print(table)


def _common_prefix(a: list[int], b: list[int]):
    for x, y in zip(a, b, strict=False):
        if x != y:
            return
        yield x


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    with tempfile.TemporaryDirectory(prefix="fedmoe-bench-gguf-") as tmp:
        work = Path(tmp)
        args.model_dir = Path(args.model_dir) if args.model_dir else default_export(work)
        paths = prepare(args, work)
        rows = []
        for name, path in paths.items():
            row = contender(name, args, path)
            row["file_mb"] = path.stat().st_size / 2**20 if path and path.is_file() else None
            rows.append(row)
    print_table(rows, f"llama.cpp vs fedmoe edge: {args.model_dir} ({args.tokens} new tokens, "
                      f"{args.threads} thread(s))")
    result = {"model_dir": str(args.model_dir), "prompt": PROMPT, "tokens": args.tokens,
              "threads": args.threads, "repeats": args.repeats, "budget": args.budget,
              "policy": args.policy, "contenders": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
