"""A frozen base in 4 or 8 bits under LoRA: QLoRA for the routed experts (arXiv 2305.14314).

``train.quantize=nf4`` (or ``int8``) stores each MoE layer's fused routed-expert tensors
(``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)) -- 93% of OLMoE-1B-7B's weights -- in
bitsandbytes' blockwise formats, while LoRA factors train on top (``train=lora``):

- ``nf4``: 4-bit NormalFloat, one float32 absmax per 64 weights (QLoRA's data type, without
  its double quantization): 4.5 bits a weight, 0.28x of bf16;
- ``int8``: bitsandbytes' 8-bit dynamic blockwise code, one absmax per 256 weights: 0.52x.

Attention, embeddings, router and shared expert stay in the checkpoint's dtype (transformers'
bitsandbytes integration would replace ``nn.Linear`` layers only, never fused 3-D experts).

Storage, per experts module and part: non-persistent buffers ``<part>_proj_qweight`` (E, n)
uint8 and ``<part>_proj_absmax`` (E, blocks) float32 -- expert index first, so a block never
spans two experts and one expert dequantizes alone -- and ``<part>_proj_code`` (the 16 or
256 values a code stands for). ``<part>_proj`` stays a parameter on the ``meta`` device: its
shape and dtype are those of the checkpoint tensor (state-dict keys, sizes and export work as
before) and any code that would read its values fails loudly instead of reading nothing.

Forward and backward dequantize one expert at a time (:class:`_FrozenLinear`): backward
decodes the weight again instead of autograd keeping a full-precision copy per expert hit
(QLoRA's memory saving would be lost to the activations otherwise).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.config import TRAIN_QUANTIZE as KINDS
from fedmoe.config import ConfigError, quantize_method_error

BLOCKSIZE = {"nf4": 64, "int8": 256}
# Bytes a packed weight takes: its code plus its share of the block's float32 absmax.
BYTES_PER_WEIGHT = {"nf4": 4 / 8 + 4 / BLOCKSIZE["nf4"], "int8": 8 / 8 + 4 / BLOCKSIZE["int8"]}
PARTS = ("gate_up", "down")  # the fused expert tensors `<part>_proj`
KIND_ATTR = "_fedmoe_quantized"


def check_quantize(kind: str | None, method: str, device: torch.device) -> None:
    """Refuse a ``train.quantize`` that cannot run, in one line naming the key."""
    if not kind:
        return
    if kind not in KINDS:
        raise ConfigError(f"train.quantize={kind!r}: expected null or one of {list(KINDS)}")
    if error := quantize_method_error(kind, method):
        raise ConfigError(error)
    if importlib.util.find_spec("bitsandbytes") is None:
        from fedmoe.extras import missing_extra_message

        raise ConfigError(missing_extra_message("bitsandbytes", f"train.quantize={kind}"))
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.quantize={kind}: bitsandbytes runs on cpu and cuda, not "
                          f"on {device.type} (train.device)")


def loaded_bytes(checkpoint: str | Path, family: str, kind: str) -> int | None:
    """Bytes a local safetensors checkpoint takes once loaded with ``train.quantize=kind``
    (routed experts packed, the rest as stored), from the files' headers alone; ``None`` for
    anything else (a hub id, ``.bin`` files)."""
    from safetensors import safe_open

    from fedmoe.checkpoints import safetensors_files
    from fedmoe.moe.adapter import role_of_name
    from fedmoe.moe.families import Role, family_spec

    files = safetensors_files(Path(checkpoint)) if Path(checkpoint).is_dir() else []
    if not files:
        return None
    model_type = family_spec(family).model_type
    total = 0.0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                numel = math.prod(tensor.get_shape())
                if role_of_name(model_type, key) == Role.ROUTED_EXPERTS:
                    total += numel * BYTES_PER_WEIGHT[kind]
                else:
                    total += numel * _DTYPE_BYTES.get(tensor.get_dtype(), 4)
    return int(total)


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2,
                "U8": 1, "I8": 1, "BOOL": 1}


def fused_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every fused routed-experts module (3-D ``gate_up_proj``/``down_proj``)."""
    for path, module in model.named_modules():
        weights = [getattr(module, f"{p}_proj", None) for p in PARTS]
        if all(isinstance(w, nn.Parameter) and w.ndim == 3 for w in weights):
            yield path, module


def quantized_names(model: nn.Module) -> set[str]:
    """State-dict names of the tensors ``train.quantize`` stores packed."""
    return {f"{path}.{p}_proj" for path, _ in fused_experts(model) for p in PARTS}


def is_quantized(experts: nn.Module) -> bool:
    return getattr(experts, KIND_ATTR, None) is not None


@torch.no_grad()
def quantize_part(experts: nn.Module, part: str, weight: torch.Tensor, kind: str) -> None:
    """Store ``weight`` (E, out, in), the full-precision value of ``<part>_proj``, packed on
    its device; the parameter becomes a ``meta`` placeholder of the same shape and dtype."""
    import bitsandbytes.functional as bnbf

    num_experts, out_features, in_features = weight.shape
    blocksize = BLOCKSIZE[kind]
    if (out_features * in_features) % blocksize:
        raise ValueError(f"train.quantize={kind}: an expert's {part}_proj holds "
                         f"{out_features}x{in_features} values, not a multiple of the "
                         f"{blocksize}-value blocks")
    # One expert at a time (bitsandbytes' CPU quantizer holds ~7x its input in temporaries),
    # flattened: with out*in a multiple of the block size an expert is whole blocks, and on
    # CPU bitsandbytes 0.50 quantizes rows shorter than a block badly (0.2-0.4 relative error
    # instead of 0.09 for nf4).
    packed, absmax = [], []
    for e in range(num_experts):
        flat = weight[e].contiguous().reshape(-1)
        if kind == "nf4":
            q, state = bnbf.quantize_4bit(flat, blocksize=blocksize, quant_type="nf4")
        else:
            q, state = bnbf.quantize_blockwise(flat, blocksize=blocksize)
        packed.append(q.reshape(-1))  # (out*in/2,) nf4, (out*in,) int8
        absmax.append(state.absmax.float())  # (out*in/blocksize,)
    name = f"{part}_proj"
    experts.register_buffer(f"{name}_qweight", torch.stack(packed), persistent=False)
    experts.register_buffer(f"{name}_absmax", torch.stack(absmax), persistent=False)
    experts.register_buffer(f"{name}_code", state.code, persistent=False)
    experts._parameters[name] = nn.Parameter(
        torch.empty(weight.shape, dtype=weight.dtype, device="meta"), requires_grad=False)
    setattr(experts, KIND_ATTR, kind)


def quantize_model(model: nn.Module, kind: str) -> None:
    """Quantize every loaded fused routed-experts tensor of ``model`` in place (tensors on
    ``meta``, e.g. the server's, are left as they are)."""
    for _, experts in fused_experts(model):
        for part in PARTS:
            weight = getattr(experts, f"{part}_proj")
            if not weight.is_meta:
                quantize_part(experts, part, weight.detach(), kind)


def dequantize(experts: nn.Module, part: str, e: int) -> torch.Tensor:
    """Expert ``e``'s ``<part>_proj`` weight (out, in) in the checkpoint's dtype."""
    from bitsandbytes.functional import QuantState, dequantize_4bit, dequantize_blockwise

    kind = getattr(experts, KIND_ATTR)
    name = f"{part}_proj"
    shape = getattr(experts, name).shape[1:]
    dtype = getattr(experts, name).dtype
    packed = getattr(experts, f"{name}_qweight")[e]
    # Blocks were cut from the flattened weight; where rows are whole blocks, decoding it as
    # (out, in) gives the same values and lets bitsandbytes' CPU kernel split the rows across
    # threads (2x faster on two cores than one flat row).
    rows_ok = shape[-1] % BLOCKSIZE[kind] == 0
    state = QuantState(absmax=getattr(experts, f"{name}_absmax")[e],
                       shape=shape if rows_ok else torch.Size([shape.numel()]),
                       code=getattr(experts, f"{name}_code"), blocksize=BLOCKSIZE[kind],
                       quant_type="nf4" if kind == "nf4" else None, dtype=dtype)
    if kind == "nf4":
        return dequantize_4bit(packed.reshape(-1, 1), state).reshape(shape)
    return dequantize_blockwise(packed, state).reshape(shape)


def expert_weight(experts: nn.Module, part: str, e: int) -> torch.Tensor:
    """Expert ``e``'s ``<part>_proj`` (out, in): a view, or dequantized when stored packed."""
    if is_quantized(experts):
        return dequantize(experts, part, e)
    return getattr(experts, f"{part}_proj")[e]


def expert_linear(experts: nn.Module, part: str, e: int, x: torch.Tensor) -> torch.Tensor:
    """``x W_e^T`` for expert ``e``'s frozen ``<part>_proj``; x: (n, in) -> (n, out)."""
    if is_quantized(experts):
        return _FrozenLinear.apply(x, experts, part, e)
    return F.linear(x, getattr(experts, f"{part}_proj")[e])


def experts_device(experts: nn.Module) -> torch.device:
    """Where an experts module's weights are (packed or not)."""
    for tensor in [*experts.parameters(), *experts.buffers()]:
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


# Decoded weights are freed at once, but glibc keeps freed blocks of their size (8 MB for an
# OLMoE-1B-7B expert's gate/up) in its heap, fragmented among activations: on a 4-layer
# OLMoE-shaped client that grew the training peak by 0.9 GB. Handing them back to the OS
# every TRIM_BYTES decoded (malloc_trim) cost 6-11% of a step; a fixed mmap threshold
# (MALLOC_MMAP_THRESHOLD_) cost 47%.
TRIM_BYTES = 256 * 2**20
_decoded = 0


def _decode(experts: nn.Module, part: str, e: int) -> torch.Tensor:
    global _decoded
    weight = dequantize(experts, part, e)
    if weight.device.type == "cpu":
        _decoded += weight.numel() * weight.element_size()
        if _decoded >= TRIM_BYTES:
            from fedmoe.memory import release_free_memory

            _decoded = 0
            release_free_memory()  # the blocks freed so far (this one is still held)
    return weight


class _FrozenLinear(torch.autograd.Function):
    """``x W^T`` with ``W`` dequantized in forward and again in backward (frozen: no weight
    gradient, and the input is not needed either), so autograd saves no tensor at all --
    least of all a full-precision weight per expert."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, experts: nn.Module, part: str, e: int) -> torch.Tensor:
        ctx.experts, ctx.part, ctx.e, ctx.dtype = experts, part, e, x.dtype
        weight = _decode(experts, part, e)  # (out, in)
        return F.linear(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = _decode(ctx.experts, ctx.part, ctx.e)
        return (grad @ weight.to(grad.dtype)).to(ctx.dtype), None, None, None
