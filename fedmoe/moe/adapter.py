"""The family adapter: parameter roles and per-layer views of a MoE model.

Usage::

    adapter = MoEAdapter(model)
    adapter.roles()                  # {"model.layers.1.mlp.gate.weight": Role.ROUTER, ...}
    layer = adapter.moe_layers()[0]
    layer.expert_tensors(3)          # views of expert 3's weights
    layer.router_rows([0, 3])        # router rows of experts 0 and 3
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch
from torch import nn

from fedmoe.moe.families import FamilySpec, Role, family_spec

# PEFT wraps modules and renames parameters; roles apply to LoRA tensors exactly as to the base
# weights, so names are normalised back to the base model's before matching.
_PEFT_PREFIX = re.compile(r"^base_model\.model\.")
_PEFT_WRAPPER = re.compile(r"\.(base_layer|original_module)(?=\.)")
_PEFT_ADAPTER = re.compile(
    r"\.(modules_to_save|lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"\.[^.]+(?=\.|$)"
)


def normalize_name(name: str) -> str:
    """Map a (possibly PEFT-wrapped) parameter name to the base model's name."""
    name = _PEFT_PREFIX.sub("", name)
    name = _PEFT_WRAPPER.sub("", name)
    return _PEFT_ADAPTER.sub("", name)


def _compile(pattern: str) -> re.Pattern[str]:
    body = re.escape(pattern).replace(r"\{L\}", r"(?P<layer>\d+)").replace(r"\*", r".*")
    return re.compile(f"^{body}$")


@lru_cache(maxsize=16)
def _family_patterns(model_type: str) -> tuple[tuple[Role, re.Pattern[str]], ...]:
    spec = family_spec(model_type)
    return tuple((role, _compile(p)) for role, pats in spec.patterns.items() for p in pats)


def role_of_name(model_type: str, name: str) -> Role | None:
    """The role of a parameter name in a family, without a model (``None``: no pattern
    claims it, e.g. a buffer). :meth:`MoEAdapter.role_of` is the checked version."""
    base = normalize_name(name)
    claims = {role for role, rx in _family_patterns(model_type) if rx.match(base)}
    return claims.pop() if len(claims) == 1 else None


@dataclass
class MoELayer:
    """One sparse MoE block of a model, with views into its expert and router tensors."""

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: list[nn.Module]
    top_k: int
    scoring: str
    router_buffers: tuple[str, ...]

    @property
    def num_experts(self) -> int:
        """Experts this layer holds now (after pruning, fewer than the config says)."""
        return self.router.weight.shape[0]

    def expert_param_names(self) -> list[str]:
        """Names (relative to ``experts``) of the fused 3-D tensors, expert index first."""
        return [n for n, p in self.experts.named_parameters(recurse=False) if p.dim() == 3]

    def expert_tensors(self, e: int) -> dict[str, torch.Tensor]:
        """Views (not copies) of expert ``e``'s tensors, e.g. ``gate_up_proj`` ``(2I, H)``."""
        return {n: getattr(self.experts, n)[e] for n in self.expert_param_names()}

    def router_rows(self, experts: int | Iterable[int] | None = None) -> torch.Tensor:
        """Router weight rows ``(E', H)`` of the given experts (all when ``None``)."""
        w = self.router.weight
        if experts is None:
            return w
        if isinstance(experts, int):
            return w[experts]
        return w[list(experts)]

    def scores(self, router_logits: torch.Tensor) -> torch.Tensor:
        """Router probabilities from router logits, as the family defines them."""
        if self.scoring == "sigmoid":
            return router_logits.float().sigmoid()
        return router_logits.float().softmax(dim=-1)


class MoEAdapter:
    """Parameter roles and MoE-layer views for any model of a supported family.

    Parameters
    ----------
    model : nn.Module
        A transformers ``*ForCausalLM`` of a supported family, optionally wrapped by PEFT.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.spec: FamilySpec = family_spec(self.config.model_type)
        self._patterns = [
            (role, _compile(p)) for role, pats in self.spec.patterns.items() for p in pats
        ]

    # ---- roles ------------------------------------------------------------------------
    def role_of(self, name: str) -> Role:
        """The one role of a parameter; an error if no pattern, or two roles, claim it."""
        base = normalize_name(name)
        claims = {role for role, rx in self._patterns if rx.match(base)}
        if not claims:
            raise ValueError(
                f"parameter {name!r} of a {self.spec.model_type} model matches no role "
                f"pattern in fedmoe/moe/families.py; declare its role there"
            )
        if len(claims) > 1:
            raise ValueError(
                f"parameter {name!r} is claimed by several roles {sorted(r.value for r in claims)}"
                f" in fedmoe/moe/families.py ({self.spec.model_type}); patterns must not overlap"
            )
        return claims.pop()

    @cached_property
    def _role_table(self) -> dict[str, Role]:
        return {name: self.role_of(name) for name, _ in self.model.named_parameters()}

    def roles(self) -> dict[str, Role]:
        """Every parameter name -> its role (validated: exactly one each)."""
        return dict(self._role_table)

    def names(self, *roles: Role | str) -> list[str]:
        """Parameter names with any of the given roles, in model order."""
        wanted = {Role(r) for r in roles}
        return [n for n, r in self._role_table.items() if r in wanted]

    def layer_of(self, name: str) -> int | None:
        """Decoder-layer index in a parameter name, or ``None`` for global parameters."""
        m = re.search(r"\.layers\.(\d+)\.", normalize_name(name))
        return int(m.group(1)) if m else None

    # ---- MoE layers -------------------------------------------------------------------
    @cached_property
    def _layers(self) -> list[MoELayer]:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        layers = []
        for i, decoder_layer in enumerate(base.model.layers):
            block = getattr(decoder_layer, self.spec.moe_block, None)
            router = getattr(block, self.spec.router, None) if block is not None else None
            if router is None or not hasattr(block, "experts"):
                continue  # a dense layer inside a MoE model (mlp_only_layers, first_k_dense)
            shared = [decoder_layer.get_submodule(s) for s in self.spec.shared
                      if _has_submodule(decoder_layer, s)]
            layers.append(
                MoELayer(
                    index=i,
                    block=block,
                    router=_unwrap(router),
                    experts=_unwrap_experts(block.experts),
                    shared=shared,
                    top_k=int(getattr(router, "top_k", getattr(self.config, self.spec.top_k_key))),
                    scoring=self.spec.scoring,
                    router_buffers=self.spec.router_buffers,
                )
            )
        return layers

    def moe_layers(self) -> list[MoELayer]:
        """The sparse MoE blocks, in depth order (dense layers are skipped)."""
        return list(self._layers)

    def layer(self, index: int) -> MoELayer:
        """The MoE block of decoder layer ``index``."""
        for layer in self._layers:
            if layer.index == index:
                return layer
        raise KeyError(f"decoder layer {index} has no MoE block")

    @property
    def num_experts(self) -> int:
        """Routed experts per layer in the model config (before any pruning)."""
        return int(getattr(self.config, self.spec.num_experts_key))

    @property
    def top_k(self) -> int:
        return int(getattr(self.config, self.spec.top_k_key))


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _unwrap_experts(experts: nn.Module) -> nn.Module:
    """The transformers experts module under PEFT's ``ParamWrapper`` layers (LoRA on
    ``target_parameters`` nests one wrapper per adapted tensor)."""
    while hasattr(experts, "parameter_name") and hasattr(experts, "base_layer"):
        experts = experts.base_layer
    return experts


def _unwrap(module: nn.Module) -> nn.Module:
    """The module PEFT's ``modules_to_save`` wrapper trains (or the module itself)."""
    inner = getattr(module, "modules_to_save", None)
    if inner is not None and hasattr(module, "active_adapter"):
        name = module.active_adapter
        name = name[0] if isinstance(name, list | tuple) else name
        return inner[name]
    return module
