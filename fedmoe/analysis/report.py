"""The key tables of an analysis, as markdown (``analysis.md``) and on the terminal."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table


def key_tables(report: Mapping) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each key table the report supports."""
    tables = []
    if "consistency" in report:
        c = report["consistency"]
        layers = [u for u in c["cache_size"] if u != "model"]
        header = ["m (= L)", "SRP model [95% CI]", f"SCH model @C={c['cache_size']['model']}",
                  *[f"SRP L{u}" for u in layers],
                  *[f"SCH L{u} @C={c['cache_size'][u]}" for u in layers]]
        rows = [[str(row["segment_length"]), _ci(row["model"]["srp"], row["model"]["srp_ci"]),
                 _ci(row["model"]["sch"], row["model"]["sch_ci"]),
                 *[_f(row[u]["srp"]) for u in layers], *[_f(row[u]["sch"]) for u in layers]]
                for row in c["table"]]
        tables.append(("local routing consistency (SRP per segment length, SCH per lookahead)",
                       header, rows))
        base = c["baselines_at_cache_size"]
        policies = list(base["model"])
        tables.append(("cache hit rate at C = 2 x active experts (free-slot convention)",
                       ["unit", *policies],
                       [[u, *[_f(base[u][p]) for p in policies]] for u in base]))
    if "retrieval" in report:
        r = report["retrieval"]
        ppl = [k for k in ("full", "retrieved", "oracle", "global", "client")
               if f"ppl_{k}" in r]
        rows = [[d, _f(t["accuracy"]), str(t["prompts"]), *[_f(t[f"ppl_{k}"], 2) for k in ppl]]
                for d, t in r["tasks"].items()]
        rows.append(["all", _f(r["accuracy"]), str(r["prompts"]),
                     *[_f(r[f"ppl_{k}"], 2) for k in ppl]])
        names = {"full": "ppl full", "retrieved": "ppl retrieved", "oracle": "ppl own pattern",
                 "global": "ppl global static", "client": "ppl client's pruning"}
        source = r.get("client_pruning", {}).get("source")
        tables.append((f"task-adaptive expert retrieval (keep {r['keep']} experts/layer"
                       + (f"; client's pruning from {source})" if source else ")"),
                       ["domain", "retrieval acc", "prompts", *[names[k] for k in ppl]], rows))
    if "attribution" in report:
        a = report["attribution"]
        layers = sorted({k for s in a["shares"].values() for k in s}, key=int)
        rows = [[d, *[_f(a["shares"][d][layer]["shared"]) for layer in layers],
                 _f(a["blocking"][d]["delta_shared"]), _f(a["blocking"][d]["delta_routed"])]
                for d in a["shares"]]
        tables.append(("shared-expert share of the MoE output norm (routed = 1 - shared); "
                       f"loss increase when blocking (top {a['block_top_n']} routed)",
                       ["domain", *[f"L{layer} shared" for layer in layers], "d loss shared",
                        "d loss routed"], rows))
    if "specialization" in report:
        s = report["specialization"]
        rows = [["domains", _f(s["domains"]["js"]["mean_pairwise"])]]
        if "clients" in s:
            rows.append(["clients", _f(s["clients"]["js"]["mean_pairwise"])])
        tables.append(("expert specialization (mean pairwise JS divergence, bits)",
                       ["between", "mean JS"], rows))
    if "cost" in report and "table" in report["cost"]:
        rows = [[str(t.get("contender", t["policy"])), str(t["budget"]), _f(t["latency_edge_s"]),
                 _f(t["latency_cloud_s"]), f"{t['cost_edge']:.2e}", f"{t['cost_cloud']:.2e}",
                 str(t["fits"]), str(t["edge_wins"])] for t in report["cost"]["table"]]
        tables.append(("edge vs cloud at the reference alpha and bandwidth",
                       ["edge row", "budget", "edge s", "cloud s", "edge cost", "cloud cost",
                        "fits", "edge wins"], rows))
    return tables


def markdown(report: Mapping) -> str:
    """All key tables as GitHub markdown."""
    parts = [f"# fedmoe analysis of `{report.get('model_dir', '?')}`\n"]
    for title, header, rows in key_tables(report):
        parts.append(f"## {title}\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "---|" * len(header))
        parts += ["| " + " | ".join(r) + " |" for r in rows]
        parts.append("")
    if "cost" in report and "skipped" in report["cost"]:
        parts.append(f"Edge vs cloud skipped: {report['cost']['skipped']}.\n")
    return "\n".join(parts)


def print_tables(report: Mapping) -> None:
    """The key tables with rich."""
    console = Console(width=140)
    for title, header, rows in key_tables(report):
        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for r in rows:
            table.add_row(*r)
        console.print(table)


def write_report(report: Mapping, out_dir: str | Path) -> tuple[Path, Path]:
    """``analysis.json`` (everything) and ``analysis.md`` (the key tables)."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "analysis.json", out_dir / "analysis.md"
    json_path.write_text(json.dumps(report, indent=1, default=_plain))
    md_path.write_text(markdown(report))
    return json_path, md_path


def _plain(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def _f(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _ci(x: float, ci: Sequence[float]) -> str:
    return f"{_f(x)} [{_f(ci[0])}, {_f(ci[1])}]"
