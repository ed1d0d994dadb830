"""What the analyses read from a model: per-domain token blocks and per-sample routing.

Data flows: corpus split -> per-domain blocks ``(N, T)`` -> batched forward under
:func:`fedmoe.moe.routing.capture_routing` -> per layer ``top_k_index (N, T, k)`` and
``router_logits (N, T, E)`` as numpy arrays, sample order kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedmoe.checkpoints import model_device
from fedmoe.data import tokenize_blocks
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.routing import capture_routing


def domain_blocks(split: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int,
                  per_domain: int) -> dict[str, torch.Tensor]:
    """Up to ``per_domain`` blocks ``(n, seq_len)`` of each domain of ``split``.

    Domains keep their order of first appearance; a domain with no full block is left out.
    """
    labels = np.asarray(split["domain"], dtype=object)
    out = {}
    for domain in dict.fromkeys(labels.tolist()):
        rows = split.select(np.flatnonzero(labels == domain))
        blocks = tokenize_blocks(rows, tokenizer, seq_len, max_blocks=per_domain)
        if len(blocks):
            out[domain] = blocks
    return out


@dataclass
class Routing:
    """Routing of every MoE layer for N samples of T tokens (numpy, on CPU)."""

    top_k_index: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (N, T, k)
    router_logits: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (N, T, E)
    num_experts: dict[int, int] = field(default_factory=dict)  # layer -> E
    top_k: int = 0

    @property
    def layers(self) -> list[int]:
        return sorted(self.top_k_index)

    def select(self, rows: np.ndarray | slice) -> Routing:
        """The routing of a subset of the samples."""
        return Routing({k: v[rows] for k, v in self.top_k_index.items()},
                       {k: v[rows] for k, v in self.router_logits.items()},
                       dict(self.num_experts), self.top_k)

    def save(self, path) -> None:
        """One ``.npz`` with ``index_<layer>``, ``logits_<layer>`` and ``num_experts``."""
        arrays = {f"index_{k}": v.astype(np.int16) for k, v in self.top_k_index.items()}
        arrays |= {f"logits_{k}": v.astype(np.float16) for k, v in self.router_logits.items()}
        layers = self.layers
        arrays["layers"] = np.array(layers)
        arrays["num_experts"] = np.array([self.num_experts[layer] for layer in layers])
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path) -> Routing:
        z = np.load(path)
        layers = z["layers"].tolist()
        index = {layer: z[f"index_{layer}"].astype(np.int64) for layer in layers}
        return cls(index, {layer: z[f"logits_{layer}"].astype(np.float32) for layer in layers},
                   dict(zip(layers, z["num_experts"].tolist(), strict=True)),
                   int(next(iter(index.values())).shape[-1]))


@torch.no_grad()
def collect_routing(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8,
                    adapter: MoEAdapter | None = None) -> Routing:
    """Run ``blocks`` ``(N, T)`` through ``model`` and keep every MoE layer's routing."""
    adapter = adapter or MoEAdapter(model)
    model.eval()
    n, t = blocks.shape
    with capture_routing(model, adapter, router_probs=False) as trace:
        for start in range(0, n, batch_size):
            model(input_ids=blocks[start : start + batch_size].to(model_device(model)),
                  use_cache=False)
    routing = Routing(top_k=adapter.top_k)
    for rec in trace:  # tokens were flattened batch-major: (B * T) rows per call
        routing.top_k_index[rec.layer] = rec.top_k_index.reshape(n, t, -1).numpy()
        routing.router_logits[rec.layer] = rec.router_logits.reshape(n, t, -1).numpy()
        routing.num_experts[rec.layer] = adapter.layer(rec.layer).num_experts
    return routing
