"""Per-family declarations of parameter roles.

Every parameter of a supported Hugging Face MoE model has exactly one role, declared here once
per model family as name patterns. Aggregation, pruning, offloading and export ask the adapter
(`fedmoe.moe.adapter`), never match parameter names themselves.

Pattern syntax: ``{L}`` stands for a decoder-layer index, ``*`` for any run of characters; the
pattern must match the whole (PEFT-normalised) parameter name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    """What a parameter is in a MoE model, and so how fedmoe treats it."""

    ROUTER = "router"
    SHARED_EXPERT = "shared_expert"
    ROUTED_EXPERTS = "routed_experts"
    BACKBONE = "backbone"
    # A personal expert grafted beside a MoE block (fedmoe/moe/graft.py, FLEx arXiv
    # 2506.00965): present only in a grafted model, never aggregated.
    GRAFT = "graft"


ROLES: tuple[str, ...] = tuple(r.value for r in Role)

# Parts every decoder-only HF family shares: embeddings, attention, norms, the LM head.
_BACKBONE_COMMON = (
    "model.embed_tokens.*",
    "model.layers.{L}.self_attn.*",
    "model.layers.{L}.input_layernorm.*",
    "model.layers.{L}.post_attention_layernorm.*",
    "model.norm.*",
    "lm_head.*",
)
# Dense MLP of the layers a MoE model keeps dense (mlp_only_layers, first_k_dense_replace).
_DENSE_MLP = ("model.layers.{L}.mlp.gate_proj.*", "model.layers.{L}.mlp.up_proj.*",
              "model.layers.{L}.mlp.down_proj.*")


@dataclass(frozen=True)
class FamilySpec:
    """How one transformers MoE family lays out its MoE blocks.

    Attributes
    ----------
    model_type : str
        ``config.model_type`` of the family.
    moe_block : str
        Attribute of a decoder layer that holds the sparse MoE block.
    router : str
        Attribute of the MoE block holding the router (``weight`` of shape ``(E, H)``).
    shared : tuple of str
        Attributes of the decoder layer (dotted) that make up the shared expert(s).
    num_experts_key : str
        Config key with the number of routed experts.
    scoring : str
        ``"softmax"`` or ``"sigmoid"``: how router logits become probabilities.
    router_buffers : tuple of str
        Per-expert router buffers (first dim indexes experts), e.g. DeepSeek-V3's bias.
    patterns : dict
        Role -> name patterns.
    """

    model_type: str
    moe_block: str
    router: str
    shared: tuple[str, ...]
    num_experts_key: str
    scoring: str
    patterns: dict[Role, tuple[str, ...]]
    router_buffers: tuple[str, ...] = ()
    top_k_key: str = "num_experts_per_tok"


def _mlp_family(model_type: str, num_experts_key: str, shared: tuple[str, ...] = (),
                scoring: str = "softmax", router_buffers: tuple[str, ...] = ()) -> FamilySpec:
    """The common transformers 5.x layout: ``mlp.gate`` router, fused ``mlp.experts``."""
    return FamilySpec(
        model_type=model_type,
        moe_block="mlp",
        router="gate",
        shared=shared,
        num_experts_key=num_experts_key,
        scoring=scoring,
        router_buffers=router_buffers,
        patterns={
            Role.ROUTER: ("model.layers.{L}.mlp.gate.weight", "model.layers.{L}.mlp.gate.bias"),
            Role.ROUTED_EXPERTS: ("model.layers.{L}.mlp.experts.*",),
            Role.SHARED_EXPERT: tuple(f"model.layers.{{L}}.{s}.*" for s in shared),
            Role.BACKBONE: _BACKBONE_COMMON + _DENSE_MLP,
            Role.GRAFT: ("model.layers.{L}.mlp.graft.*",),
        },
    )


FAMILIES: dict[str, FamilySpec] = {
    "qwen2_moe": _mlp_family(
        "qwen2_moe", "num_experts", shared=("mlp.shared_expert", "mlp.shared_expert_gate")
    ),
    "qwen3_moe": _mlp_family("qwen3_moe", "num_experts"),
    "olmoe": _mlp_family("olmoe", "num_experts"),
    "mixtral": _mlp_family("mixtral", "num_local_experts"),
    "deepseek_v3": _mlp_family(
        "deepseek_v3",
        "n_routed_experts",
        shared=("mlp.shared_experts",),
        scoring="sigmoid",
        router_buffers=("e_score_correction_bias",),
    ),
    "granitemoeshared": FamilySpec(
        model_type="granitemoeshared",
        moe_block="block_sparse_moe",
        router="router",
        shared=("shared_mlp",),
        num_experts_key="num_local_experts",
        scoring="softmax",
        patterns={
            Role.ROUTER: ("model.layers.{L}.block_sparse_moe.router.weight",),
            Role.ROUTED_EXPERTS: ("model.layers.{L}.block_sparse_moe.experts.*",),
            Role.SHARED_EXPERT: ("model.layers.{L}.shared_mlp.*",),
            Role.BACKBONE: _BACKBONE_COMMON,
            Role.GRAFT: ("model.layers.{L}.block_sparse_moe.graft.*",),
        },
    ),
}


def family_spec(model_type: str) -> FamilySpec:
    """The spec of a supported family, or a clear error listing the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"model family {model_type!r} is not supported (model.family); "
            f"supported: {sorted(FAMILIES)}"
        ) from None
