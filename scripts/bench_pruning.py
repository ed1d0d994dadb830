"""Personalized vs global expert pruning: every score and keep fraction, side by side.

Clients come from the experiment's non-IID split (``experiment=demo``: 8 clients, natural
partition, two per domain of the embedded corpus). Each client's model is personalized:

    personalized = base + local fine-tuning of router/shared/routed experts
                   (``train.trainable``, ``train.lr``, ``train.batch_size``) on the client's
                   train blocks, ``--steps`` steps of ``train_lm``

or, with ``--run-dir``, the client's exported model of a finished ``fedmoe simulate`` run
(``clients/client_XXXX/model``) where present. Then, for every keep fraction and score, each
client's model is pruned two ways and evaluated on the client's validation blocks:

- personalized: the client's own scores on its own train blocks (what ``fedmoe prune`` and a
  pruning federated client compute),
- global: each client's per-layer score vector normalised (shifted to start at 0, divided by
  its sum, as ``prune.max_mb`` compares layers), averaged over clients; one kept set for all.

Scores, plans and slicing are fedmoe's own (``compute_scores``, ``plan_keep``,
``keep_experts``: the steps of ``prune_model``). ``random`` is the mean over
``--random-seeds`` draws. Keep 1.0 is the unpruned model itself.

Pruning is one-shot (no training after it) in the main grid. A federated client prunes after
round ``prune.at_round`` and keeps training, so at keep 0.5 the ``--recover`` pairs are also
trained ``--recover-steps`` more steps after pruning and compared with the unpruned model
trained the same extra steps (equal compute).

    python scripts/bench_pruning.py --quick        # 4 clients (one per domain), < 5 minutes
    python scripts/bench_pruning.py                # experiment=demo: 8 clients
    python scripts/bench_pruning.py --run-dir outputs/simulate/<run>
    python scripts/bench_pruning.py --quick data.max_eval_blocks_per_client=32   # overrides
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from fedmoe.checkpoints import load_model, resolve_base_model
from fedmoe.client.local import ClientBlocks, client_blocks, prepare_model
from fedmoe.fl.bridge import compose
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.prune import SCORES, compute_scores, keep_experts, plan_keep, routed_mb
from fedmoe.train.loop import evaluate_lm, set_trainable, train_lm

KEEPS = (1.0, 0.75, 0.5, 0.25)
MODES = ("personalized", "global")
GOAL_KEEP = 0.5
# --quick: one client per domain and fewer held-out blocks. The train blocks stay uncapped:
# with 128 of them, 40 local steps overfit and the "personalized" model got worse than base.
QUICK = ["data.num_clients=4", "data.max_eval_blocks_per_client=16"]
RECOVER = "personalized/tcess,global/tcess,personalized/random"

Scores = dict[int, np.ndarray]  # layer -> (E,) scores
Plan = dict[int, list[int]]  # layer -> ids of the kept experts


@dataclass
class Client:
    """One client: its data, its personalized model and the scores of that model."""

    id: int
    data: ClientBlocks
    model: nn.Module
    source: str  # "fine-tuned" or the exported model's path
    base_ppl: float = float("nan")
    ppl: float = float("nan")  # unpruned personalized model
    mb: float = 0.0
    scores: dict[str, list[Scores]] = field(default_factory=dict)  # score -> one per draw


# ---- clients ------------------------------------------------------------------------------
def run_config(overrides: list[str], quick: bool, run_dir: Path | None) -> DictConfig:
    """The ``simulate`` config of the benchmark (or of ``run_dir``'s run, plus overrides)."""
    if run_dir is not None:
        saved = run_dir / ".hydra" / "overrides.yaml"
        base = yaml.safe_load(saved.read_text()) if saved.is_file() else []
    else:
        base = [] if any(o.startswith("experiment=") for o in overrides) else ["experiment=demo"]
    return compose([*base, *(QUICK if quick else []), *overrides])


def load_clients(cfg: DictConfig, checkpoint: Path, steps: int,
                 run_dir: Path | None) -> list[Client]:
    """Every client's personalized model: its run-dir export, else base + local fine-tuning."""
    data_yaml = OmegaConf.to_yaml(cfg.data, resolve=True)
    base = prepare_model(cfg.model, checkpoint, cfg.train, cfg.seed).eval()
    clients = []
    for cid in range(int(cfg.data.num_clients)):
        data = client_blocks(data_yaml, str(checkpoint), cid)
        export = None if run_dir is None else run_dir / "clients" / f"client_{cid:04d}" / "model"
        if export is not None and (export / "config.json").is_file():
            model, source = load_model(cfg.model, checkpoint=export).eval(), str(export)
            set_trainable(model, cfg.train.trainable)  # for --recover: the roles a client trains
        else:
            model, source = fine_tune(cfg, base, data, steps, seed=cid), "fine-tuned"
        client = Client(cid, data, model, source)
        client.base_ppl = evaluate_lm(base, data.validation, cfg.train.batch_size)["ppl"]
        client.ppl = evaluate_lm(model, data.validation, cfg.train.batch_size)["ppl"]
        client.mb = routed_mb(model)
        clients.append(client)
        print(f"client {cid} ({', '.join(data.domains)}; {len(data.train)} train blocks; "
              f"{source}): held-out ppl base {client.base_ppl:.2f} -> personalized "
              f"{client.ppl:.2f}", flush=True)
    return clients


def fine_tune(cfg: DictConfig, model: nn.Module, data: ClientBlocks, steps: int,
              seed: int) -> nn.Module:
    """A copy of ``model`` after ``steps`` local steps on the client's train blocks."""
    model = copy.deepcopy(model)
    t = cfg.train
    train_lm(model, data.train, steps=steps, batch_size=t.batch_size, lr=t.lr,
             aux_loss_coef=t.aux_loss_coef, weight_decay=t.weight_decay,
             max_grad_norm=t.max_grad_norm, seed=cfg.seed * 1_000_003 + seed * 1_009)
    return model.eval()


# ---- scores and pruning -------------------------------------------------------------------
def score_clients(clients: list[Client], cfg: DictConfig, random_seeds: int,
                  calibration_tokens: int, scores: tuple[str, ...] = SCORES) -> None:
    """Each of ``scores`` of every client's model on the first ``calibration_tokens`` of its
    own train blocks (``prune.tcess_k``, ``prune.seed``)."""
    p = cfg.prune
    for c in clients:
        for score in scores:
            draws = random_seeds if score == "random" else 1
            c.scores[score] = [
                compute_scores(c.model, c.data.train, score, tcess_k=p.tcess_k,
                               calibration_tokens=calibration_tokens,
                               seed=int(p.seed) + 1000 * draw + c.id)
                for draw in range(draws)]


def share(s: np.ndarray) -> np.ndarray:
    """A layer's scores as shares of its utility: shifted to start at 0, summing to 1."""
    shifted = np.asarray(s, dtype=np.float64) - np.min(s)
    total = shifted.sum()
    return shifted / total if total > 0 else np.full(len(shifted), 1 / len(shifted))


def pooled(per_client: list[Scores]) -> Scores:
    """The mean over clients of every layer's normalised score vector."""
    return {i: np.mean([share(s[i]) for s in per_client], axis=0) for i in per_client[0]}


def plan(model: nn.Module, scores: Scores, keep: float) -> Plan:
    top_k = {layer.index: layer.top_k for layer in MoEAdapter(model).moe_layers()}
    return plan_keep(scores, {"keep": keep}, top_k)


def pruned_copy(model: nn.Module, kept: Plan) -> nn.Module:
    pruned = copy.deepcopy(model)
    keep_experts(pruned, kept)
    return pruned


def coverage(frequency: Scores, kept: Plan) -> float:
    """Share of the unpruned model's top-k selections that land on kept experts (mean over
    layers): the rest of the tokens' choices are rerouted by pruning."""
    return float(np.mean([frequency[i][ids].sum() / frequency[i].sum()
                          for i, ids in kept.items()]))


def same_experts(clients: list[Client]) -> bool:
    """Global pruning needs every client to hold the same experts (ids line up)."""
    kept = [getattr(c.model.config, "fedmoe_kept_experts", None) for c in clients]
    return all(k == kept[0] for k in kept)


def plans_of(clients: list[Client], score: str, mode: str, keep: float) -> list[list[Plan]]:
    """Per client, one kept set per draw of ``score`` under ``mode``."""
    draws = len(clients[0].scores[score])
    if mode == "personalized":
        return [[plan(c.model, s, keep) for s in c.scores[score]] for c in clients]
    pooled_draws = [pooled([c.scores[score][d] for c in clients]) for d in range(draws)]
    return [[plan(c.model, s, keep) for s in pooled_draws] for c in clients]


def run_grid(clients: list[Client], batch_size: int,
             keeps: tuple[float, ...] = KEEPS) -> list[dict]:
    """One row per client x score x mode x keep: perplexity, routed MB, routing coverage."""
    modes = MODES if same_experts(clients) else ("personalized",)
    rows = []
    for score in clients[0].scores:
        for keep in (1.0, *(k for k in keeps if k != 1.0)):
            for mode in modes:
                for c, plans in zip(clients, plans_of(clients, score, mode, keep), strict=True):
                    if keep == 1.0:  # every expert kept: the unpruned model itself
                        ppls, mb, cov = [c.ppl], c.mb, 1.0
                    else:
                        models = [pruned_copy(c.model, p) for p in plans]
                        ppls = [evaluate_lm(m, c.data.validation, batch_size)["ppl"]
                                for m in models]
                        mb = routed_mb(models[0])
                        cov = (coverage(c.scores["frequency"][0], plans[0])
                               if "frequency" in c.scores else float("nan"))
                    rows.append({"client": c.id, "score": score, "mode": mode, "keep": keep,
                                 "ppl": float(np.mean(ppls)), "ppl_draws": ppls, "mb": mb,
                                 "coverage": cov, "ppl_unpruned": c.ppl, "mb_unpruned": c.mb})
        print(f"evaluated {score}", flush=True)
    return rows


def recover(clients: list[Client], cfg: DictConfig, pairs: list[tuple[str, str]], steps: int,
            keep: float = GOAL_KEEP) -> list[dict]:
    """Pruned models (``pairs`` of mode/score, first draw) trained ``steps`` more steps,
    next to the unpruned model trained as long (the federated pipeline keeps training)."""
    rows = []
    batch_size = int(cfg.train.batch_size)
    plans = {pair: plans_of(clients, pair[1], pair[0], keep) for pair in pairs}
    for i, c in enumerate(clients):
        seed = 10_000 + c.id  # the same batches for every variant of a client
        reference = evaluate_lm(fine_tune(cfg, c.model, c.data, steps, seed),
                                c.data.validation, batch_size)["ppl"]
        for mode, score in pairs:
            pruned = fine_tune(cfg, pruned_copy(c.model, plans[mode, score][i][0]), c.data,
                               steps, seed)
            rows.append({"client": c.id, "score": score, "mode": mode, "keep": keep,
                         "steps": steps, "ppl": evaluate_lm(pruned, c.data.validation,
                                                            batch_size)["ppl"],
                         "ppl_unpruned": reference, "ppl_unpruned_no_steps": c.ppl,
                         "mb": routed_mb(pruned), "mb_unpruned": c.mb})
        print(f"recovered client {c.id}", flush=True)
    return rows


# ---- report -------------------------------------------------------------------------------
def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per score/mode/keep: mean and worst perplexity ratio to unpruned, MB ratio."""
    out: dict[str, dict] = {}
    for r in rows:
        key = f"{r['mode']}/{r['score']}/{r['keep']}"
        s = out.setdefault(key, {"mode": r["mode"], "score": r["score"], "keep": r["keep"],
                                 "ratios": [], "mb_ratios": [], "coverage": []})
        s["ratios"].append(r["ppl"] / r["ppl_unpruned"])
        s["mb_ratios"].append(r["mb"] / r["mb_unpruned"])
        s["coverage"].append(r.get("coverage", float("nan")))
    for s in out.values():
        s |= {"ppl_ratio_mean": float(np.mean(s["ratios"])),
              "ppl_ratio_worst": float(np.max(s["ratios"])),
              "mb_ratio": float(np.mean(s["mb_ratios"])),
              "coverage_mean": float(np.mean(s["coverage"]))}
    return out


def goals(rows: list[dict], keep: float = GOAL_KEEP) -> dict:
    """The three figures the benchmark is judged by, at ``keep``."""
    at = {(r["client"], r["mode"], r["score"]): r for r in rows if r["keep"] == keep}
    clients = sorted({r["client"] for r in rows})

    def wins(other: tuple[str, str]) -> float | None:
        if (clients[0], *other) not in at:
            return None
        return float(np.mean([at[c, "personalized", "tcess"]["ppl"] < at[(c, *other)]["ppl"]
                              for c in clients]))

    increase = [at[c, "personalized", "tcess"]["ppl"] / at[c, "personalized", "tcess"]
                ["ppl_unpruned"] - 1 for c in clients]
    keeps = sorted({r["keep"] for r in rows}, reverse=True)
    mb = {k: float(np.mean([r["mb"] / r["mb_unpruned"] for r in rows if r["keep"] == k]))
          for k in keeps}
    return {"keep": keep, "tcess_ppl_increase_mean": float(np.mean(increase)),
            "tcess_ppl_increase_worst": float(np.max(increase)),
            "tcess_beats_random": wins(("personalized", "random")),
            "tcess_beats_global_tcess": wins(("global", "tcess")),
            "mb_ratio_by_keep": mb}


def print_tables(clients: list[Client], rows: list[dict], summary: dict[str, dict]) -> None:
    console = Console(width=160)
    keeps = sorted({r["keep"] for r in rows}, reverse=True)
    scores = list(clients[0].scores)
    table = Table(title="one-shot pruning: held-out perplexity / unpruned personalized model "
                        "(mean over clients, worst in brackets); routing coverage at 0.5")
    table.add_column("pruning", justify="left")
    for keep in keeps[1:]:
        table.add_column(f"keep {keep:g}", justify="right")
    table.add_column("coverage 0.5", justify="right")
    for mode in MODES:
        for score in scores:
            cells = [summary.get(f"{mode}/{score}/{keep}") for keep in keeps[1:]]
            if any(c is None for c in cells):
                continue
            table.add_row(f"{mode} {score}", *[
                f"{c['ppl_ratio_mean']:.3f} ({c['ppl_ratio_worst']:.3f})" for c in cells],
                f"{summary[f'{mode}/{score}/{GOAL_KEEP}']['coverage_mean']:.3f}")
    mb = [np.mean([r["mb"] for r in rows if r["keep"] == k]) for k in keeps]
    table.add_row("routed-expert MB (ratio)", *[f"{m:.2f} ({m / mb[0]:.3f})" for m in mb[1:]],
                  "", style="bold")
    console.print(table)
    at = {(r["client"], r["mode"], r["score"]): r["ppl"] for r in rows
          if r["keep"] == GOAL_KEEP}
    per = Table(title=f"per client, one-shot at keep {GOAL_KEEP:g}: held-out perplexity")
    columns = ["base", "unpruned", *(f"pers {s}" for s in scores), "global tcess",
               "global frequency"]
    per.add_column("client", justify="left")
    for col in columns:
        per.add_column(col, justify="right")
    for c in clients:
        values = [c.base_ppl, c.ppl, *(at[c.id, "personalized", s] for s in scores),
                  at.get((c.id, "global", "tcess")), at.get((c.id, "global", "frequency"))]
        per.add_row(f"{c.id} {'+'.join(c.data.domains)}",
                    *["-" if v is None else f"{v:.2f}" for v in values])
    console.print(per)


def print_recovery(rows: list[dict]) -> None:
    if not rows:
        return
    steps = rows[0]["steps"]
    table = Table(title=f"keep {GOAL_KEEP:g}, then {steps} more local steps: held-out "
                        f"perplexity / unpruned model trained the same {steps} steps")
    table.add_column("client", justify="left")
    pairs = list(dict.fromkeys((r["mode"], r["score"]) for r in rows))
    for mode, score in pairs:
        table.add_column(f"{mode} {score}", justify="right")
    by = {(r["client"], r["mode"], r["score"]): r for r in rows}
    for c in sorted({r["client"] for r in rows}):
        cells = [by[c, m, s] for m, s in pairs]
        table.add_row(str(c), *[f"{r['ppl']:.2f} ({r['ppl'] / r['ppl_unpruned']:.3f})"
                                for r in cells])
    Console(width=160).print(table)


def print_goals(g: dict, label: str) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    inc = g["tcess_ppl_increase_mean"]
    print(f"[{label}] personalized tcess at {g['keep']:g} kept: perplexity {100 * inc:+.2f}% "
          f"over the unpruned personalized model (mean over clients; worst "
          f"{100 * g['tcess_ppl_increase_worst']:+.2f}%); goal <= +3%: {verdict(inc <= 0.03)}")
    for key, other in (("tcess_beats_random", "random"), ("tcess_beats_global_tcess",
                                                          "global tcess")):
        if g[key] is not None:
            print(f"[{label}] personalized tcess beats {other} in {100 * g[key]:.0f}% of "
                  f"clients; goal >= 80%: {verdict(g[key] >= 0.8)}")
    print(f"[{label}] routed-expert MB / unpruned: " + ", ".join(
        f"keep {k:g} -> {v:.3f}" for k, v in g["mb_ratio_by_keep"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/simulate.yaml")
    parser.add_argument("--quick", action="store_true", help="4 clients, fewer blocks/steps")
    parser.add_argument("--steps", type=int, default=None,
                        help="local fine-tuning steps (default: 100; 40 with --quick)")
    parser.add_argument("--calibration-tokens", type=int, default=8192,
                        help="train tokens each client scores on (a federated client's "
                             "TCESS sees its round-1 training tokens: 20 x 8 x 128 = 20480)")
    parser.add_argument("--random-seeds", type=int, default=3, help="draws of random scores")
    parser.add_argument("--scores", default=",".join(SCORES),
                        help="scores to compare (tcess is required: the goals are about it)")
    parser.add_argument("--keeps", default=",".join(map(str, KEEPS[1:])),
                        help="kept fractions besides 1.0 (0.5 is required)")
    parser.add_argument("--recover", default=RECOVER,
                        help="mode/score pairs trained after pruning at keep 0.5 ('' = none)")
    parser.add_argument("--recover-steps", type=int, default=None,
                        help="steps after pruning (default: 40; 20 with --quick)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="a `fedmoe simulate` run: its clients' exported models")
    # One thread: with two cores shared by other jobs, a second OpenMP thread made local
    # steps 10x slower (threads spin at barriers while the other is descheduled).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default=f"outputs/bench_pruning/"
                                         f"{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (40 if args.quick else 100)
    recover_steps = args.recover_steps or (20 if args.quick else 40)
    pairs = [tuple(p.split("/")) for p in args.recover.split(",") if p]
    start = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        seconds[name] = time.perf_counter() - start - sum(seconds.values())

    cfg = run_config(args.overrides, args.quick, args.run_dir)
    checkpoint = Path(resolve_base_model(cfg))  # fl.base_model of the run, else pretrained
    clients = load_clients(cfg, checkpoint, steps, args.run_dir)
    lap("clients")
    scores = tuple(args.scores.split(","))
    keeps = tuple(float(k) for k in args.keeps.split(","))
    if "tcess" not in scores or GOAL_KEEP not in keeps or not set(scores) <= set(SCORES):
        parser.error(f"--scores must be among {list(SCORES)} and include tcess; --keeps must "
                     f"include {GOAL_KEEP}")
    score_clients(clients, cfg, args.random_seeds, args.calibration_tokens, scores)
    lap("scores")
    rows = run_grid(clients, int(cfg.train.batch_size), keeps)
    lap("one_shot")
    if not same_experts(clients):
        pairs = [p for p in pairs if p[0] != "global"]
    recovered = recover(clients, cfg, pairs, recover_steps) if pairs else []
    lap("recovery")
    summary = summarize(rows)
    g = {"one_shot": goals(rows)}
    print_tables(clients, rows, summary)
    print_recovery(recovered)
    print_goals(g["one_shot"], "one-shot")
    if recovered:
        g["recovered"] = goals(recovered)
        print_goals(g["recovered"], f"+{recover_steps} steps, vs unpruned +{recover_steps}")
    seconds["total"] = time.perf_counter() - start
    print("wall time " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "overrides": args.overrides, "quick": args.quick, "steps": steps,
        "recover_steps": recover_steps, "random_seeds": args.random_seeds,
        "calibration_tokens": args.calibration_tokens, "checkpoint": str(checkpoint),
        "clients": [{"id": c.id, "domains": c.data.domains, "source": c.source,
                     "base_ppl": c.base_ppl, "ppl": c.ppl, "routed_mb": c.mb,
                     "train_blocks": len(c.data.train), "eval_blocks": len(c.data.validation)}
                    for c in clients],
        "goals": g, "summary": summary, "rows": rows, "recovered": recovered,
        "seconds": seconds, "threads": args.threads,
        "data": {k: cfg.data[k] for k in ("num_clients", "partition", "block_size",
                                          "max_train_blocks_per_client",
                                          "max_eval_blocks_per_client")},
        "prune": {k: cfg.prune[k] for k in ("tcess_k", "seed")},
    }
    (out / "bench_pruning.json").write_text(json.dumps(result, indent=2))
    print(f"saved {out / 'bench_pruning.json'}")


if __name__ == "__main__":
    main()
