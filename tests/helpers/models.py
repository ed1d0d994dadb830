"""Tiny config-built models of every supported family (hidden 32, 8 experts, 3 layers)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

_COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_hidden_layers=3,
               max_position_embeddings=64, tie_word_embeddings=False)

TINY_FAMILIES: dict[str, dict] = {
    "qwen2_moe": dict(_COMMON, intermediate_size=64, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32, num_key_value_heads=2, num_experts=8,
                      num_experts_per_tok=2, mlp_only_layers=[0]),
    "qwen3_moe": dict(_COMMON, intermediate_size=64, moe_intermediate_size=16, head_dim=8,
                      num_key_value_heads=2, num_experts=8, num_experts_per_tok=2),
    "olmoe": dict(_COMMON, intermediate_size=16, num_key_value_heads=2, num_experts=8,
                  num_experts_per_tok=2),
    "mixtral": dict(_COMMON, intermediate_size=16, num_key_value_heads=2, num_local_experts=8,
                    num_experts_per_tok=2),
    "deepseek_v3": dict(_COMMON, intermediate_size=64, moe_intermediate_size=16,
                        num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, n_group=2,
                        topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8),
    "granitemoeshared": dict(_COMMON, intermediate_size=16, shared_intermediate_size=32,
                             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2),
}


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny model of ``family`` (deterministic for a seed)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **(TINY_FAMILIES[family] | overrides))
    model = AutoModelForCausalLM.from_config(config)
    if family == "deepseek_v3":
        # A non-zero correction bias, so tests see it matter for routing.
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model.eval()


def grafted_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """:func:`tiny_model` with a FLEx graft (``strategy=flex``) on every MoE block: a copy of
    pretrained expert 1, moved off it, with a gate off its start (so the graft matters)."""
    from fedmoe.moe.adapter import MoEAdapter
    from fedmoe.moe.graft import add_grafts, init_grafts

    model = tiny_model(family, seed, **overrides)
    grafts = add_grafts(model)
    adapter = MoEAdapter(model)
    init_grafts(adapter, {layer.index: 1 for layer in adapter.moe_layers()})
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for graft in grafts:
            for p in graft.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model
