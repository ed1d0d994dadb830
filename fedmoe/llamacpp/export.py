"""A fedmoe export (HF MoE checkpoint directory) as one GGUF file that llama.cpp runs.

Written with the ``gguf`` package (PyPI; llama.cpp's own writer library), not by calling
llama.cpp's ``convert_hf_to_gguf.py``: that script ships only in llama.cpp's source tree (it is
on no registry), and it refuses fedmoe's tokenizer, since it names a pre-tokenizer by hashing
the token ids of a fixed text against a list of known hub models. Here the pre-tokenizer is read
from ``tokenizer.json`` and named by the regex it splits with (:data:`PRE_TOKENIZERS`); the
tensor names come from gguf's ``TensorNameMap`` and the metadata and type rules follow the
converter (norms, biases and routers stay F32). Written: qwen2_moe, qwen3_moe, olmoe, mixtral
(llama.cpp's llama) and deepseek_v3 (its deepseek2: latent attention with ``kv_b_proj`` split
per head, grouped sigmoid routing with the correction bias); granitemoeshared is refused.

What llama.cpp runs must compute what the HF model computes. Where one of its architectures
hard-codes a choice the config can change (qwen3moe always renormalizes the top-k weights,
qwen2moe never does, olmoe normalizes keys across all heads), a model whose config differs is
refused with the reason (:func:`unsupported`), never written into a file that runs but
answers differently.

Experts per layer: a GGUF model has one expert count (``<arch>.expert_count``), as an HF
config does, so fedmoe's HF export already refuses models whose layers keep different numbers
of experts (:mod:`fedmoe.prune.export`). Padding a layer with dummy experts would not be exact:
llama.cpp's qwen2moe/olmoe/qwen3moe/llama routers have no bias that could keep a padded row out
of the top-k. A checkpoint whose layers disagree anyway is refused naming the layers.

Quantization: ``f32``, ``f16``, ``bf16`` and ``q8_0`` are written directly (``gguf.quants``);
``q4_k_m`` goes through llama.cpp's own quantizer (``llama_model_quantize`` of
llama-cpp-python) from an intermediate file in the checkpoint's precision.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig

from fedmoe.artifacts import EXPERTS_FILE, ExpertsInfo
from fedmoe.config import ConfigError
from fedmoe.moe.families import family_spec

# gguf's writer logs every file it opens at INFO: here, our temporary file's name.
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)

# fedmoe family (HF model_type) -> llama.cpp architecture.
ARCHITECTURES: dict[str, str] = {
    "qwen2_moe": "QWEN2MOE",
    "qwen3_moe": "QWEN3MOE",
    "olmoe": "OLMOE",
    "mixtral": "LLAMA",  # llama.cpp runs Mixtral as llama with experts
    "deepseek_v3": "DEEPSEEK2",  # multi-head latent attention, grouped sigmoid routing
}
# Families fedmoe trains that llama.cpp has an architecture for, but this writer does not
# convert: the reason, for the one-line refusal.
NOT_WRITTEN: dict[str, str] = {
    "granitemoeshared": "llama.cpp's granitemoe needs Granite's four scaling multipliers and "
                        "its shared_mlp layout; this writer does not do that conversion",
}
Q = gguf.GGMLQuantizationType
# quant -> (type of the weight matrices, llama.cpp's file type); q4_k_m: llama.cpp quantizes.
QUANTS: dict[str, tuple[Q, gguf.LlamaFileType] | None] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_k_m": None,
}
FLOATS = {Q.F32: np.dtype(np.float32), Q.F16: np.dtype(np.float16)}
# Pre-tokenizer regexes of HF tokenizers -> llama.cpp's name for the same split
# (src/llama-vocab.cpp). ByteLevel(use_regex=True) splits with GPT-2's regex.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, str] = {GPT2_REGEX: "gpt-2", QWEN2_REGEX: "qwen2"}


class GGUFExportError(ConfigError):
    """``model_dir`` cannot become a GGUF that computes what the checkpoint computes; the
    message names the file and the reason (a user error: ``fedmoe export gguf`` prints it as
    one line)."""


@dataclass(frozen=True)
class GGUFExport:
    """What :func:`export_gguf` wrote."""

    path: Path
    quant: str
    architecture: str
    bytes: int
    tensor_types: dict[str, int]  # GGML type -> tensors (k-quants fall back on short rows)
    tokenizer_pre: str


# --- what llama.cpp can run ----------------------------------------------------------------


def unsupported(config: PretrainedConfig) -> list[str]:
    """Why llama.cpp would compute something else than the HF model of ``config`` (empty:
    it computes the same)."""
    family = config.model_type
    if family in NOT_WRITTEN:
        return [NOT_WRITTEN[family]]
    if family not in ARCHITECTURES:
        return [f"model_type {family!r} has no llama.cpp architecture here "
                f"(written: {sorted(ARCHITECTURES)})"]
    reasons = []
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        reasons.append(f"rope_type {rope['rope_type']!r} (only the default rope is written)")
    norm = bool(getattr(config, "norm_topk_prob", family == "mixtral"))
    if family in ("qwen2_moe", "olmoe") and norm:
        reasons.append(f"norm_topk_prob=true, but llama.cpp's {ARCHITECTURES[family].lower()} "
                       "never renormalizes the top-k routing weights")
    if family == "qwen3_moe" and not norm:
        reasons.append("norm_topk_prob=false, but llama.cpp's qwen3moe always renormalizes "
                       "the top-k routing weights")
    if family in ("qwen2_moe", "qwen3_moe") and (getattr(config, "mlp_only_layers", None)
                                                 or getattr(config, "decoder_sparse_step", 1) != 1):
        reasons.append("dense layers (mlp_only_layers / decoder_sparse_step), but llama.cpp's "
                       f"{ARCHITECTURES[family].lower()} makes every layer MoE")
    if getattr(config, "use_sliding_window", False) or _window_binds(config):
        reasons.append("sliding-window attention, which llama.cpp's architecture does not apply")
    if family == "olmoe" and config.num_key_value_heads != config.num_attention_heads:
        reasons.append(f"num_key_value_heads={config.num_key_value_heads} < "
                       f"num_attention_heads={config.num_attention_heads}: OLMoE's k_norm then "
                       "spans the kv heads, llama.cpp's olmoe expects it over hidden_size")
    if family == "olmoe" and getattr(config, "clip_qkv", None) is not None:
        reasons.append("clip_qkv, which llama.cpp's olmoe does not apply")
    if family == "deepseek_v3" and not getattr(config, "rope_interleave", True):
        reasons.append("rope_interleave=false: llama.cpp's deepseek2 ropes the interleaved "
                       "layout of DeepSeek's own checkpoints")
    return reasons


def _window_binds(config: PretrainedConfig) -> bool:
    window = getattr(config, "sliding_window", None)
    return config.model_type == "mixtral" and bool(window) and \
        window < config.max_position_embeddings


# --- tensors: HF names and layout -> GGUF names and layout ----------------------------------


@dataclass(frozen=True)
class _Tensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order (GGUF stores it reversed)
    qtype: Q
    load: Callable[[], np.ndarray]  # float32 numpy in torch order


def _hf_tensors(model: torch.nn.Module, config: PretrainedConfig
                ) -> Iterator[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """(HF name, shape, loader) of every tensor llama.cpp reads, in the converter's naming:
    fused experts split into per-projection 3-D tensors ``mlp.experts.{gate,up,down}_proj``
    of shape (E, out, in); q/k rows permuted for llama's rope where the family needs it."""
    permute = ARCHITECTURES[config.model_type] == "LLAMA"
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for name, tensor in model.state_dict().items():
        if name.endswith("self_attn.kv_b_proj.weight"):
            yield from _split_kv_b(name, tensor, config)
        elif name.endswith("mlp.gate.e_score_correction_bias"):  # llama.cpp: exp_probs_b.bias
            yield name.replace("_bias", ".bias"), tuple(tensor.shape), lambda t=tensor: t
        elif name.endswith("mlp.experts.gate_up_proj"):  # (E, 2I, H): gate rows, then up rows
            base, inter = name.removesuffix(".gate_up_proj"), tensor.shape[1] // 2
            shape = (tensor.shape[0], inter, tensor.shape[2])
            yield f"{base}.gate_proj.weight", shape, lambda t=tensor, i=inter: t[:, :i]
            yield f"{base}.up_proj.weight", shape, lambda t=tensor, i=inter: t[:, i:]
        elif name.endswith("mlp.experts.down_proj"):  # (E, H, I)
            yield f"{name}.weight", tuple(tensor.shape), lambda t=tensor: t
        elif permute and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            n = heads if ".q_proj." in name else kv_heads
            yield name, tuple(tensor.shape), lambda t=tensor, n=n: _rope_permute(t, n)
        else:
            yield name, tuple(tensor.shape), lambda t=tensor: t


def _split_kv_b(name: str, weight: torch.Tensor, config: PretrainedConfig
                ) -> Iterator[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """DeepSeek's ``kv_b_proj`` (heads * (nope + v), kv_lora_rank) as llama.cpp's absorbed
    multi-head latent attention reads it: per head, ``k_b`` transposed (heads, lora, nope)
    and ``v_b`` (heads, v, lora) (convert_hf_to_gguf's DeepseekV2Model)."""
    heads, nope, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    lora = weight.shape[-1]

    def part(which: int) -> torch.Tensor:
        k_b, v_b = weight.view(heads, nope + v, lora).split([nope, v], dim=1)
        return k_b.transpose(1, 2) if which == 0 else v_b

    base = name.removesuffix("kv_b_proj.weight")
    yield f"{base}k_b_proj.weight", (heads, lora, nope), lambda: part(0)
    yield f"{base}v_b_proj.weight", (heads, v, lora), lambda: part(1)


def _rope_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotates halves of each head (``rotate_half``); llama.cpp's llama ropes adjacent
    pairs: reorder each head's rows from (2, D/2) to (D/2, 2) (convert_hf_to_gguf's permute)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _tensor_plan(model: torch.nn.Module, config: PretrainedConfig, qtype: Q) -> list[_Tensor]:
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[config.model_type])
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    plan = []
    for hf_name, shape, load in _hf_tensors(model, config):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"tensor {hf_name} has no place in llama.cpp's "
                                  f"{gguf.MODEL_ARCH_NAMES[arch]} architecture")
        plan.append(_Tensor(name, shape, _tensor_type(name, shape, qtype),
                            lambda load=load: load().detach().float().cpu().numpy()))
    return plan


def _tensor_type(name: str, shape: tuple[int, ...], qtype: Q) -> Q:
    """The converter's rules: 1-D tensors, norms, biases and routers stay F32 (llama.cpp
    reads them as F32); a row length the block size does not divide falls back to F16."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") \
            or ".ffn_gate_inp" in name:
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else Q.F16


def check_grafts(model_dir: Path, family: str) -> None:
    """No grafted experts (a ``strategy=flex`` client's export), or a refusal: llama.cpp's
    architectures have no place for a graft, and a file without it would be another model."""
    from fedmoe.checkpoints import holds_grafts

    if holds_grafts(model_dir, family):
        raise GGUFExportError(f"{model_dir}: a grafted model (strategy=flex, a personal "
                              f"expert beside each MoE block) cannot be written: llama.cpp has "
                              f"no graft, and without it the file would be the base model")


def check_expert_counts(model_dir: Path) -> None:
    """One expert count in every MoE layer (``fedmoe_experts.json``), or a refusal naming the
    layers. fedmoe's HF export never writes a model whose layers differ; this keeps a
    hand-made checkpoint from failing deep inside the loader."""
    info = model_dir / EXPERTS_FILE
    if not info.is_file():
        return
    counts = {layer: len(ids) for layer, ids in ExpertsInfo.read(model_dir).kept.items()}
    if len(set(counts.values())) > 1:
        raise GGUFExportError(
            f"{info}: MoE layers keep different numbers of experts {counts}; a GGUF model has "
            "one expert count, and padding is not exact (llama.cpp's router has no bias to keep "
            "a padded expert out of the top-k). Prune with prune.keep or prune.keep_per_layer")


# --- metadata --------------------------------------------------------------------------------


def _add_hparams(writer: gguf.GGUFWriter, config: PretrainedConfig, file_type: int) -> None:
    """The keys llama.cpp reads for these architectures (convert_hf_to_gguf's TextModel plus
    the family's own)."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_rope_freq_base(float((config.rope_parameters or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_expert_count(getattr(config, family_spec(config.model_type).num_experts_key))
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_vocab_size(config.vocab_size)
    # olmoe, mixtral: intermediate_size is the expert's; qwen, deepseek: the dense MLP's.
    writer.add_feed_forward_length(config.intermediate_size)
    if config.model_type == "deepseek_v3":
        _add_deepseek(writer, config)
    else:
        head_dim = getattr(config, "head_dim", None) \
            or config.hidden_size // config.num_attention_heads
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
    if config.model_type in ("qwen2_moe", "qwen3_moe"):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if config.model_type == "qwen2_moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    writer.add_file_type(file_type)


def _add_deepseek(writer: gguf.GGUFWriter, config: PretrainedConfig) -> None:
    """DeepSeek-V3's latent attention (written as MQA over the compressed kv, as llama.cpp
    runs it absorbed) and its routing: sigmoid scores, grouped top-k, bias for selection,
    optional renormalization and a scale."""
    rope, nope = config.qk_rope_head_dim, config.qk_nope_head_dim
    writer.add_head_count_kv(1)
    writer.add_key_length(config.kv_lora_rank + rope)
    writer.add_value_length(config.kv_lora_rank)
    writer.add_key_length_mla(nope + rope)
    writer.add_value_length_mla(config.v_head_dim)
    writer.add_rope_dimension_count(rope)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    writer.add_q_lora_rank(config.q_lora_rank or 0)  # 0: a full q_proj (DeepSeek-V2-Lite's)
    writer.add_leading_dense_block_count(config.first_k_dense_replace)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_shared_count(config.n_shared_experts)
    writer.add_expert_weights_scale(float(config.routed_scaling_factor))
    writer.add_expert_weights_norm(bool(config.norm_topk_prob))
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.add_expert_group_count(config.n_group)
    writer.add_expert_group_used_count(config.topk_group)


def _add_provenance(writer: gguf.GGUFWriter, model_dir: Path) -> None:
    """``general.name`` (the model card's name, else the folder's) and fedmoe's kept experts
    (original ids per layer), so the file says which experts it holds."""
    from fedmoe.prune.card import CARD_FILE, read_card

    card = read_card(model_dir).data if (model_dir / CARD_FILE).is_file() else None
    writer.add_name(getattr(card, "model_name", None) or model_dir.resolve().name)
    if (model_dir / EXPERTS_FILE).is_file():
        info = ExpertsInfo.read(model_dir)
        writer.add_string("fedmoe.kept_experts",
                          json.dumps({str(k): v for k, v in info.kept.items()}))
        writer.add_uint32("fedmoe.num_experts_original", info.num_experts_original)


# --- tokenizer -------------------------------------------------------------------------------


def tokenizer_pre(tokenizer_json: dict[str, Any], source: Path) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the pre-tokenizer of a byte-level BPE
    ``tokenizer.json``: the one whose split regex is the same."""
    model = tokenizer_json.get("model", {}).get("type")
    if model != "BPE":
        raise GGUFExportError(f"{source}: a {model} tokenizer; the GGUF export writes "
                              "byte-level BPE tokenizers (llama.cpp's gpt2 vocabulary) only")
    if tokenizer_json.get("normalizer"):
        raise GGUFExportError(f"{source}: a tokenizer with a normalizer "
                              f"({tokenizer_json['normalizer'].get('type')}), which llama.cpp's "
                              "gpt2 vocabulary does not apply")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regex, byte_level = None, False
    for step in steps:
        if step.get("type") == "ByteLevel":
            if step.get("add_prefix_space"):
                raise GGUFExportError(f"{source}: ByteLevel add_prefix_space=true, which "
                                      "llama.cpp's gpt2 vocabulary does not apply")
            byte_level = True
            if step.get("use_regex", True):
                regex = regex or GPT2_REGEX
        elif step.get("type") == "Split" and step.get("behavior") == "Isolated" \
                and not step.get("invert") and regex is None:
            regex = step.get("pattern", {}).get("Regex")
        else:
            raise GGUFExportError(f"{source}: pre-tokenizer step {step.get('type')} has no "
                                  "equal in llama.cpp's gpt2 vocabulary")
    if not byte_level or regex not in PRE_TOKENIZERS:
        raise GGUFExportError(f"{source}: a pre-tokenizer (regex {regex!r}) that llama.cpp "
                              f"has no known equal of (known: {sorted(PRE_TOKENIZERS.values())})")
    return PRE_TOKENIZERS[regex]


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> str:
    """``tokenizer.ggml.*``: the gpt2 (byte-level BPE) vocabulary, its merges, the special
    token ids and whether llama.cpp adds a bos token (as the HF tokenizer does or not)."""
    from transformers import AutoTokenizer

    source = model_dir / "tokenizer.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: the GGUF export needs the model's "
                                "tokenizer next to its weights (fedmoe's exports carry it)")
    data = json.loads(source.read_text())
    pre = tokenizer_pre(data, source)
    vocab: dict[int, str] = {i: t for t, i in data["model"]["vocab"].items()}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    vocab |= {i: t["content"] for i, t in added.items()}
    if max(vocab) >= vocab_size:
        raise GGUFExportError(f"{source}: token id {max(vocab)} does not fit the model's "
                              f"vocab_size {vocab_size}")
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in vocab:  # embedding rows no token uses
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        tokens.append(vocab[i])
        types.append(T.NORMAL if i not in added else
                     T.CONTROL if added[i].get("special") else T.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    # Whether llama.cpp prepends bos must follow what the HF tokenizer does, not a guess.
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    bos = hf.bos_token_id
    special.add_special_token["bos"] = bos is not None and hf("a").input_ids[:1] == [bos]
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)
    return pre


# --- writing ---------------------------------------------------------------------------------


def export_gguf(model_dir: str | Path, out: str | Path, quant: str = "f16",
                model: torch.nn.Module | None = None, threads: int | None = None) -> GGUFExport:
    """Write the checkpoint in ``model_dir`` as one GGUF file ``out`` of type ``quant``.

    Parameters
    ----------
    model_dir : str or Path
        An HF checkpoint directory of a family in :data:`ARCHITECTURES` with its tokenizer
        (a fedmoe client export, ``fedmoe prune``'s export or a base model).
    out : str or Path
        The GGUF file; written atomically (a temporary sibling renamed into place).
    quant : str
        One of :data:`QUANTS`.
    model : nn.Module, optional
        The checkpoint already loaded (by :func:`fedmoe.checkpoints.load_model`).
    threads : int, optional
        Threads of llama.cpp's quantizer (``q4_k_m``).

    Raises
    ------
    GGUFExportError
        If llama.cpp would compute something else than the HF model (the reason is named).
    """
    model_dir, out = Path(model_dir), Path(out)
    if quant not in QUANTS:
        raise GGUFExportError(f"quant={quant!r}: expected one of {list(QUANTS)}")
    config = _config(model_dir)
    if model is None:
        model = _load(model_dir, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if quant == "q4_k_m":
            from fedmoe.llamacpp.runtime import quantize

            # llama.cpp quantizes from a file in the checkpoint's own precision.
            source = {"float32": "f32", "bfloat16": "bf16"}.get(_dtype(config), "f16")
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-") as work:
                stats = _write(model, config, model_dir, Path(work) / "src.gguf", source)
                quantize(Path(work) / "src.gguf", tmp, quant, threads=threads)
        else:
            stats = _write(model, config, model_dir, tmp, quant)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    types = Counter(t.tensor_type.name for t in gguf.GGUFReader(out).tensors)
    return GGUFExport(out, quant, stats["architecture"], out.stat().st_size,
                      dict(types.most_common()), stats["tokenizer_pre"])


def _config(model_dir: Path) -> PretrainedConfig:
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model_dir={str(model_dir)!r} holds no config.json: pass a "
                                "fedmoe export or another HF MoE checkpoint directory")
    config = AutoConfig.from_pretrained(str(model_dir))
    check_expert_counts(model_dir)
    reasons = unsupported(config)
    if reasons:
        raise GGUFExportError(f"{model_dir / 'config.json'}: llama.cpp cannot run this "
                              f"{config.model_type} model as it is: {'; '.join(reasons)}")
    check_grafts(model_dir, config.model_type)
    return config


def _dtype(config: PretrainedConfig) -> str:
    return str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")


def _load(model_dir: Path, config: PretrainedConfig) -> torch.nn.Module:
    from fedmoe.checkpoints import load_model

    dtype = _dtype(config) if _dtype(config) in ("float32", "bfloat16", "float16") else "float32"
    return load_model({"family": config.model_type, "path": str(model_dir), "dtype": dtype})


def _write(model: torch.nn.Module, config: PretrainedConfig, model_dir: Path, path: Path,
           quant: str) -> dict[str, Any]:
    """Two passes, so only one converted tensor is in memory at a time: every tensor's name,
    shape and type go into the header, then the data follows tensor by tensor."""
    qtype, file_type = QUANTS[quant]
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[config.model_type])
    plan = _tensor_plan(model, config, qtype)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    _add_hparams(writer, config, int(file_type))
    _add_provenance(writer, model_dir)
    pre = _add_tokenizer(writer, model_dir, config.vocab_size)
    if quant == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in plan:
        shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype) if t.qtype not in FLOATS \
            else t.shape
        dtype = FLOATS.get(t.qtype, np.dtype(np.uint8))
        writer.add_tensor_info(t.name, shape, dtype, int(np.prod(shape)) * dtype.itemsize,
                               raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with torch.no_grad():
        for t in plan:
            writer.write_tensor_data(gguf.quants.quantize(t.load(), t.qtype))
    writer.close()
    return {"architecture": gguf.MODEL_ARCH_NAMES[arch], "tokenizer_pre": pre}
