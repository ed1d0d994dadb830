"""``edge.budget``: how many experts per MoE layer the expert caches may hold."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

_MEMORY = re.compile(r"^\s*([0-9.]+)\s*(KB|MB|GB|KIB|MIB|GIB)\s*$", re.IGNORECASE)
_UNITS = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(budget: int | str, *, top_k: int, num_experts: int, expert_nbytes: int,
                 num_layers: int) -> int:
    """Experts per layer that ``edge.budget`` allows.

    ``budget`` is an int (experts per layer), ``"<m>x"`` (m times the active experts,
    ``top_k``), ``"all"``, or memory for the routed experts of all MoE layers together
    (``"64MB"``, ``"1.5GiB"``). The result is clipped to ``num_experts``.
    """
    text = str(budget).strip().lower()
    if text == "all":
        return num_experts
    if isinstance(budget, int) or text.isdigit():
        per_layer = int(text)
    elif text.endswith("x"):
        per_layer = math.floor(float(text[:-1]) * top_k)
    elif m := _MEMORY.match(text):
        total = float(m.group(1)) * _UNITS[m.group(2).lower()]
        per_layer = int(total // (expert_nbytes * num_layers))
    else:
        raise ValueError(f"edge.budget={budget!r} not understood: use experts per layer (4), "
                         f"a multiple of the active experts ('2x'), 'all', or memory ('64MB')")
    if per_layer < 1:
        raise ValueError(f"edge.budget={budget!r} holds less than one expert per layer "
                         f"({expert_nbytes} bytes per expert x {num_layers} MoE layers)")
    return min(per_layer, num_experts)


def capacities(budget: int | str, layer_sizes: Mapping[int, int], *, top_k: int,
               expert_nbytes: int) -> dict[int, int]:
    """Per-layer capacities for layers of (possibly pruned) sizes ``{layer: num_experts}``."""
    return {i: parse_budget(budget, top_k=top_k, num_experts=n, expert_nbytes=expert_nbytes,
                            num_layers=len(layer_sizes))
            for i, n in layer_sizes.items()}
