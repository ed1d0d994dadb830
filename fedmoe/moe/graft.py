"""Expert grafting: one personal expert per MoE layer beside the frozen pretrained MoE.

FLEx (Liu et al., "Personalized Federated Learning for Mixture-of-Experts LLMs via Expert
Grafting", arXiv 2506.00965) keeps a pretrained MoE's experts frozen, aggregates only the
shared non-expert parameters, and grafts onto each MoE layer a client-specific expert built
from the pretrained experts its local data activates, combined with the MoE output through an
adaptive gate; the grafted expert and its gate are trained locally and never leave the client.

What the paper's abstracts fix, and what is ours (its full text and code, at
anonymous.4open.science/r/FLEx-8F12, were not available here):

- from the paper: one grafted expert per client and MoE layer, initialised from pretrained
  expert weights selected by the client's own routing; frozen pretrained experts; a gate
  trained jointly with the grafted expert; only shared non-expert modules aggregated.
- ours: the grafted expert is a copy of the ONE pretrained expert the client's data selects
  most often (top-k frequency; v2 of the paper builds it "from selected components" of
  several, which we do not reproduce); the gate is a per-token scalar on the block's input,
  ``y = moe(x) + sigmoid(w . x + b) * expert_p(x)``, with ``w = 0`` and ``b = -2`` so the
  graft starts at about 12% of an unweighted expert output (the order of one routed expert's
  router weight) rather than at zero, which would cut its gradient.

The graft lives in the MoE block as ``<moe block>.graft`` (``expert``: a one-expert instance of
the family's own fused experts module, so the expert computes exactly as the pretrained ones
do; ``expert_gate``: ``Linear(H, 1)``), so its parameters have their own role
(:class:`fedmoe.moe.families.Role.GRAFT`) and the MoE block keeps every name it had. A forward
hook on the block adds the gated graft output to the block's output.

A client's export (``LocalClient.export``) is the base model's standard checkpoint with the
graft tensors (``*.graft.*``) beside it. fedmoe's loader (:func:`fedmoe.checkpoints.load_model`)
sees them and returns the grafted model: :func:`add_grafts`, then the graft tensors read like
the rest. Plain transformers still reads it as the pretrained MoE (it leaves the graft tensors
out), and llama.cpp has no graft: ``fedmoe export gguf`` refuses such a checkpoint. The edge
runtime keeps the graft in memory, as it does the shared expert, and offloads only the routed
experts. Evaluation in federation always uses the grafted model.

Usage::

    add_grafts(model)                        # zero grafts: the model computes as before
    init_grafts(model, {0: 5, 1: 2, ...})    # layer -> pretrained expert to copy
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedmoe.moe.adapter import MoEAdapter, MoELayer

GATE_BIAS_INIT = -2.0  # sigmoid(-2) = 0.12: the graft starts small (module docstring)


class GraftedExpert(nn.Module):
    """A personal expert and its adaptive gate, beside one sparse MoE block.

    Parameters
    ----------
    experts : nn.Module
        The block's fused experts module: its class builds the personal expert.
    config : PretrainedConfig
        The model's config (copied, with one routed expert).
    num_experts_key : str
        The family's config key for the number of routed experts.
    """

    def __init__(self, experts: nn.Module, config, num_experts_key: str) -> None:
        super().__init__()
        p = next(experts.parameters())
        config = copy.deepcopy(config)
        setattr(config, num_experts_key, 1)
        with torch.device(p.device):
            self.expert = type(experts)(config).to(p.dtype)  # fused tensors (1, ., .)
            self.expert_gate = nn.Linear(config.hidden_size, 1, dtype=p.dtype)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Zero expert (output 0), gate ``sigmoid(b)``: the block computes as without graft."""
        if self.expert_gate.weight.is_meta:
            return
        for t in self.expert.parameters():
            t.zero_()
        self.expert_gate.weight.zero_()
        self.expert_gate.bias.fill_(GATE_BIAS_INIT)

    @torch.no_grad()
    def copy_expert(self, experts: nn.Module, e: int) -> None:
        """Take pretrained expert ``e``'s weights (fused tensors ``(E, ., .)`` -> ``(1, ., .)``)
        and put the gate back to its starting value."""
        for name, t in self.expert.named_parameters(recurse=False):
            t.copy_(getattr(experts, name)[e : e + 1])
        self.expert_gate.weight.zero_()
        self.expert_gate.bias.fill_(GATE_BIAS_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``sigmoid(w . x + b) * expert_p(x)`` for block input ``x`` ``(..., H)``."""
        flat = x.reshape(-1, x.shape[-1])  # (T, H)
        index = torch.zeros(flat.shape[0], 1, dtype=torch.long, device=x.device)  # (T, 1)
        weight = torch.ones(flat.shape[0], 1, dtype=flat.dtype, device=x.device)  # (T, 1)
        out = self.expert(flat, index, weight)  # (T, H)
        gate = torch.sigmoid(self.expert_gate(flat))  # (T, 1)
        return (gate * out).reshape(x.shape)


def _add_graft_output(block: nn.Module, args: tuple, output):
    """Forward hook of a grafted MoE block: its output plus the gated graft output."""
    graft = block.graft(args[0])
    if isinstance(output, tuple):  # (hidden, router_logits, ...) in some families
        return (output[0] + graft, *output[1:])
    return output + graft


def add_grafts(model: nn.Module) -> list[GraftedExpert]:
    """Add a zero graft to every sparse MoE block of ``model`` (idempotent).

    The model then computes as before; :func:`init_grafts` gives the grafts their experts.
    Returns the grafts in depth order.
    """
    adapter = MoEAdapter(model)
    grafts = []
    for layer in adapter.moe_layers():
        if not hasattr(layer.block, "graft"):
            layer.block.graft = GraftedExpert(layer.experts, adapter.config,
                                              adapter.spec.num_experts_key)
            layer.block.register_forward_hook(_add_graft_output)
        grafts.append(layer.block.graft)
    return grafts


def grafts(adapter: MoEAdapter) -> dict[int, GraftedExpert]:
    """Decoder-layer index -> the graft of its MoE block (empty for an ungrafted model)."""
    return {layer.index: layer.block.graft for layer in adapter.moe_layers()
            if hasattr(layer.block, "graft")}


def most_activated(frequency: dict[int, torch.Tensor | list[float]],
                   held: dict[int, list[int]] | None = None) -> dict[int, int]:
    """Per layer, the original id of the expert the client's tokens selected most often
    (``frequency``: layer -> per-expert selection share among the held experts)."""
    out = {}
    for layer, freq in frequency.items():
        best = int(torch.as_tensor(freq).argmax())
        ids = (held or {}).get(int(layer))
        out[int(layer)] = ids[best] if ids is not None and len(ids) == len(freq) else best
    return out


def init_grafts(adapter: MoEAdapter, sources: dict[int, int]) -> None:
    """Each layer's graft becomes a copy of pretrained expert ``sources[layer]``."""
    by_layer: dict[int, MoELayer] = {layer.index: layer for layer in adapter.moe_layers()}
    for index, e in sources.items():
        layer = by_layer[index]
        layer.block.graft.copy_expert(layer.experts, e)
