"""train.quantize: routed experts frozen in 4 or 8 bits under LoRA (QLoRA, arXiv 2305.14314)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedmoe.compose import compose
from fedmoe.config import ConfigError, validate
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.prune.export import export_checkpoint
from fedmoe.train.expert_lora import IMPLEMENTATION
from fedmoe.train.lora import apply_lora
from fedmoe.train.quantize import (
    check_quantize,
    dequantize,
    fused_experts,
    loaded_bytes,
    quantize_model,
)
from tests.helpers.models import tiny_model

ALL = ["router", "shared_expert", "routed_experts"]
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
# Relative error of a dequantized expert: nf4 has 16 levels per 64-value block, int8 256
# per 256-value block.
TOLERANCE = {"nf4": 0.12, "int8": 0.02}


def _quantized(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    model = copy.deepcopy(model)
    quantize_model(model, kind)
    model.set_experts_implementation(IMPLEMENTATION)
    return model


@pytest.mark.parametrize("hidden", [32, 64])  # rows shorter than a block, rows of whole blocks
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_each_expert_dequantizes_to_its_own_weights(family, kind, hidden):
    # Prepare
    model = tiny_model(family, hidden_size=hidden)
    originals = {path: {p: getattr(m, f"{p}_proj").detach().clone() for p in ("gate_up", "down")}
                 for path, m in fused_experts(model)}
    # Execute
    quantize_model(model, kind)
    # Assert: every expert comes back close to ITS weights (rows of the packed tensors are
    # experts), the fused parameters hold no data, and the packed bytes are 4.5 / 8.1 bits
    # a weight instead of 32
    for path, experts in fused_experts(model):
        for part, full in originals[path].items():
            assert getattr(experts, f"{part}_proj").is_meta
            assert getattr(experts, f"{part}_proj").shape == full.shape
            for e in range(full.shape[0]):
                error = (dequantize(experts, part, e) - full[e]).norm() / full[e].norm()
                assert error < TOLERANCE[kind], (path, part, e, float(error))
            packed = sum(getattr(experts, f"{part}_proj_{s}").numel() *
                         getattr(experts, f"{part}_proj_{s}").element_size()
                         for s in ("qweight", "absmax"))
            bits = 8 * packed / full.numel()
            assert bits == pytest.approx(4.5 if kind == "nf4" else 8.125)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_model_predicts_like_the_full_one(family, kind):
    # Prepare
    model = tiny_model(family)
    # Execute
    with torch.no_grad():
        full = model(IDS).logits
        packed = _quantized(model, kind)(IDS).logits
    # Assert: logits within the quantization error, and not equal (the packed path ran)
    error = float((packed - full).norm() / full.norm())
    assert 0 < error < TOLERANCE[kind] / 2, error


def test_lora_gradients_through_packed_experts_equal_full_precision_ones():
    # Prepare: the same LoRA model twice, one with packed experts, one holding exactly the
    # weights the packed ones decode to (so only the forward/backward path differs); expert
    # widths no other weight or activation of the model has
    base = tiny_model("olmoe", intermediate_size=40)
    packed = apply_lora(_quantized(base, "nf4"), ALL, r=4, alpha=8, seed=1)
    decoded = copy.deepcopy(base)
    for (_, q), (_, d) in zip(fused_experts(packed), fused_experts(decoded), strict=True):
        for part in ("gate_up", "down"):
            weight = getattr(d, f"{part}_proj")
            with torch.no_grad():
                for e in range(weight.shape[0]):
                    weight[e] = dequantize(q, part, e)
    decoded = apply_lora(decoded, ALL, r=4, alpha=8, seed=1)
    for model in (packed, decoded):  # B != 0, so gradients reach A too
        for name, p in model.named_parameters():
            if name.endswith(("lora_gate_up_B", "lora_down_B")):
                torch.nn.init.normal_(p.data, std=0.1, generator=torch.Generator().manual_seed(2))
    saved = []
    # Execute
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        loss = packed(IDS, labels=IDS).loss
    loss.backward()
    decoded(IDS, labels=IDS).loss.backward()
    # Assert: the same loss and factor gradients, and backward kept no expert weight of full
    # size (it dequantizes again instead)
    grads = {n: p.grad for n, p in packed.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_down_A") for n in grads)
    for name, p in decoded.named_parameters():
        if p.requires_grad:
            assert grads[name] is not None and grads[name].abs().sum() > 0, name
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4)
    experts = next(m for _, m in fused_experts(packed))
    weights = [experts.gate_up_proj.shape[1:], experts.down_proj.shape[1:]]  # (80, 32), (32, 40)
    assert not {*weights, *(w[::-1] for w in weights)} & {tuple(s) for s in saved}


def test_a_quantized_client_exports_the_model_it_ran(tmp_path):
    # Prepare: a trained-looking QLoRA model (non-zero B), experts packed in 4 bits
    model = apply_lora(_quantized(tiny_model("qwen2_moe"), "nf4"), ALL, r=4, alpha=8)
    for name, p in model.named_parameters():
        if ".lora_B" in name or "_B" in name.rsplit(".", 1)[-1]:
            torch.nn.init.normal_(p.data, std=0.05, generator=torch.Generator().manual_seed(3))
    keep = {layer.index: [0, 2, 5, 7] for layer in MoEAdapter(model).moe_layers()}
    # Execute: export half the experts, then load the files with plain transformers
    out = export_checkpoint(model, None, tmp_path / "export", kept=keep, select=keep)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    # Assert: the export (dequantized, LoRA merged, pruned) predicts as the live model
    # restricted to those experts does
    from fedmoe.prune.masked import RoutingRestriction

    restriction = RoutingRestriction(MoEAdapter(model))
    restriction.set(keep)
    with torch.no_grad():
        live = model(IDS).logits
        exported = loaded(IDS).logits
    torch.testing.assert_close(exported, live, atol=2e-4, rtol=1e-3)


def test_the_loader_packs_experts_as_it_streams_them(smoke_base):
    # Prepare
    from fedmoe.checkpoints import load_model
    from fedmoe.fl.bridge import compose

    cfg = compose(["experiment=smoke"])
    full = load_model(cfg.model, checkpoint=smoke_base)
    # Execute
    packed = load_model(cfg.model, checkpoint=smoke_base, quantize="int8")
    # Assert: no routed-expert weight in full precision, the rest loaded as before, and the
    # model predicts as the full one within the quantization error
    names = {n for n, p in packed.named_parameters() if p.is_meta}
    assert names and all(n.endswith(("experts.gate_up_proj", "experts.down_proj"))
                         for n in names)
    assert len(names) == 2 * len(list(fused_experts(full)))
    for name, p in full.named_parameters():
        if name not in names:
            torch.testing.assert_close(packed.get_parameter(name), p)
    ids = torch.randint(0, full.config.vocab_size, (2, 16),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = full(ids).logits, packed(ids).logits
    assert float((a - b).norm() / a.norm()) < 0.01
    # what fl.max_concurrent_clients' default counts per client, read from the files'
    # headers, is what the loaded model holds
    held = sum(t.numel() * t.element_size() for t in [*packed.parameters(), *packed.buffers()]
               if not t.is_meta)
    assert loaded_bytes(smoke_base, cfg.model.family, "int8") == pytest.approx(held, rel=0.01)


def test_refused_where_it_cannot_run(monkeypatch):
    import importlib.util

    # a quantized base is never trained in full
    with pytest.raises(ConfigError, match=r"train.quantize=nf4: .* use train=lora"):
        check_quantize("nf4", "full", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train.quantize=int8: .* not on mps"):
        check_quantize("int8", "lora", torch.device("mps"))
    # experts whose weights are no whole number of blocks: refused, naming the tensor
    model = tiny_model("olmoe", intermediate_size=3)  # down_proj: 32 x 3 = 96 values
    with pytest.raises(ValueError, match=r"train.quantize=nf4: an expert's down_proj holds "
                                         r"32x3 values, not a multiple of the 64-value blocks"):
        quantize_model(model, "nf4")
    # bitsandbytes missing: the extra that brings it
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'fedmoe\[qlora\]'"):
        check_quantize("nf4", "lora", torch.device("cpu"))
    # ... and a simulation says so before it starts; a deployment's server needs none
    cfg = compose("simulate", ["experiment=smoke", "train=lora", "train.quantize=nf4"])
    with pytest.raises(ConfigError, match=r"train.quantize=nf4 needs the QLoRA \(bitsandbytes\)"):
        validate(cfg)
    validate(cfg, deployment=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_experts_on_cuda_match_cpu():
    # Prepare
    model = apply_lora(_quantized(tiny_model("olmoe"), "nf4"), ALL, r=4, alpha=8)
    gpu = copy.deepcopy(model).to("cuda")
    # Execute
    cpu_loss = model(IDS, labels=IDS).loss
    gpu_loss = gpu(IDS.cuda(), labels=IDS.cuda()).loss
    cpu_loss.backward()
    gpu_loss.backward()
    # Assert: bitsandbytes' CUDA kernels decode as its CPU ones do
    assert float(gpu_loss) == pytest.approx(float(cpu_loss), rel=1e-4)
    for (name, p), (_, g) in zip(model.named_parameters(), gpu.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(g.grad.cpu(), p.grad, atol=1e-5, rtol=1e-3, msg=name)
