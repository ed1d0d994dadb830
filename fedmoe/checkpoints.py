"""The one loader: resolve the base model, load a checkpoint, on a device, in its dtype.

Every command loads models through :func:`load_model`. For a local safetensors checkpoint it
streams the weights itself instead of calling ``from_pretrained``:

- the model is built on the ``meta`` device and materialized tensor by tensor, so a process
  never holds more than the model plus one checkpoint tensor;
- files are read with ``pread`` (``safe_open(..., backend="pread")``), not memory-mapped.
  ``from_pretrained`` maps the whole file and keeps the mapping alive through the tensors it
  does not convert, so after loading a MoE (whose experts it fuses into new tensors) the
  process holds the checkpoint twice: measured 2.0x the checkpoint's bytes in PSS on an
  OLMoE-shaped model (``scripts/bench_model_scale.py`` measures the loader against it);
- ``names`` loads only some tensors (the server needs the router and shared experts of a 7B
  model, not the model), the rest stays on ``meta``; ``skip`` leaves some out (the edge
  runtime streams routed experts from its own store);
- ``map_embeddings`` leaves the input embedding in the file's memory mapping: a lookup pages
  in only the rows of the tokens seen (0.2 GB of an OLMoE-1B-7B stays on disk at the edge);
- ``quantize`` packs each fused routed-expert tensor in 4 or 8 bits as soon as it is read
  (``train.quantize``, :mod:`fedmoe.train.quantize`).

A checkpoint holding grafted experts (a ``strategy=flex`` client's export,
:mod:`fedmoe.moe.graft`) loads as the grafted model: the grafts are added to the model before
its tensors are read, and their tensors are streamed like the rest. One whose tensors do not
map onto the grafted model is refused, never loaded with its grafts dropped.

Checkpoints written by transformers 5.x keep the original per-expert layout
(``mlp.experts.<e>.gate_proj.weight``) while the model holds fused 3-D tensors
(``mlp.experts.gate_up_proj``); :data:`KEY_RULES` maps one onto the other for the supported
families. A checkpoint the rules do not cover completely (or a hub id) loads with
``from_pretrained``, whose memory mapping is then dropped.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from fedmoe.config import TRAIN_DEVICES as DEVICES
from fedmoe.config import ConfigError
from fedmoe.memory import release_free_memory
from fedmoe.moe.adapter import role_of_name
from fedmoe.moe.families import Role, family_spec
from fedmoe.moe.graft import add_grafts
from fedmoe.moe.models import DTYPES, build_config, check_model_path, plain, validate_config

log = logging.getLogger(__name__)


# --- devices -------------------------------------------------------------------------------


def resolve_device(spec: str | None = "auto", key: str = "train.device") -> torch.device:
    """``train.device`` (or the config ``key`` given) as a torch device.

    ``auto``: the GPU this process may use (Ray and Flower's Simulation Engine set
    ``CUDA_VISIBLE_DEVICES`` to the GPUs assigned to a client actor, so ``cuda`` is that GPU),
    else Apple's ``mps``, else the CPU. An explicit device that is not there is an error
    naming the key, never a silent fall-back.
    """
    spec = (spec or "auto").lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={spec!r}: no CUDA device is visible to this process "
                          f"(use {key}=auto or cpu, or give clients GPUs with "
                          "fl.client_resources.num_gpus)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}={spec!r}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{key}={spec!r}: expected one of {list(DEVICES)}")
    return device


def model_device(model: nn.Module) -> torch.device:
    """Where the model's (first real) weights are: where its inputs must go."""
    for p in model.parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")


# --- where the base model is ---------------------------------------------------------------


def resolve_base_model(cfg: Any, progress: bool = True) -> str:
    """The base checkpoint of a composed config: ``model.path``, then ``fl.base_model``, then
    the checkpoint ``fedmoe pretrain`` writes for this config (trained now if missing).
    ``model.path`` must load (a one-line error names it if not)."""
    if cfg.model.get("path"):
        return check_model_path(cfg.model.path)
    fl = cfg.get("fl")
    if fl is not None and fl.get("base_model"):
        return str(fl.base_model)
    from fedmoe.extras import extra_needed

    # No base model given (a device: node config base-model): pretrain one, on the corpus.
    with extra_needed("pretraining a base model (none given: model.path, fl.base_model, "
                      "or a device's node config base-model)"):
        from fedmoe.train.pretrain import ensure_base_model

    return str(ensure_base_model(cfg, progress=progress))


def load_checkpoint_dir(model_dir: str | Path, dtype: str = "float32", device: str = "cpu",
                        offloaded: bool = False, experts_implementation: str | None = None
                        ) -> tuple[PreTrainedModel, Any]:
    """Model (eval mode, on ``device``) and tokenizer of a saved checkpoint directory (an
    export, a base model, any ``save_pretrained`` folder of a supported family).

    ``offloaded``: the routed experts are not read (they stay on the ``meta`` device): the
    edge runtime serves them from its expert store (``ExpertStore.build_from_checkpoint``),
    so a device never holds more than the dense part of the model plus its expert cache; the
    input embedding stays memory-mapped (a token's lookup pages in its row only).
    """
    from transformers import AutoTokenizer

    from fedmoe.moe.adapter import role_of_name
    from fedmoe.moe.families import Role

    model_type = AutoConfig.from_pretrained(str(model_dir)).model_type
    skip = (lambda name: role_of_name(model_type, name) == Role.ROUTED_EXPERTS) \
        if offloaded else None
    model = load_model({"family": model_type, "path": str(model_dir), "dtype": dtype,
                        "experts_implementation": experts_implementation},
                       device=device, skip=skip, map_embeddings=offloaded)
    return model.eval(), AutoTokenizer.from_pretrained(str(model_dir))


# --- checkpoint keys -> model tensors --------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: ``name[index][rows]`` of the model's state dict."""

    name: str
    index: int | None = None  # expert index into a fused 3-D tensor
    half: int | None = None  # 0: first half of dim 1 (gate), 1: second half (up)


# (pattern, target template, half). Per-expert Linear weights of the original layouts go
# into the fused ``gate_up_proj`` (E, 2I, H) -- gate rows first, as the experts' forward
# ``.chunk(2, dim=-1)`` reads them -- and ``down_proj`` (E, H, I).
_EXPERT = r"(?P<pre>.*\.)(?:block_sparse_moe|mlp)\.experts\.(?P<e>\d+)\."
KEY_RULES: tuple[tuple[re.Pattern[str], str, int | None], ...] = (
    (re.compile(_EXPERT + r"(?:gate_proj|w1)\.weight$"), "{pre}mlp.experts.gate_up_proj", 0),
    (re.compile(_EXPERT + r"(?:up_proj|w3)\.weight$"), "{pre}mlp.experts.gate_up_proj", 1),
    (re.compile(_EXPERT + r"(?:down_proj|w2)\.weight$"), "{pre}mlp.experts.down_proj", None),
)
# Whole-tensor renames (Mixtral's ``block_sparse_moe`` is ``mlp`` in transformers 5.x;
# GraniteMoeShared's ``input_linear``/``output_linear``/``router.layer``).
RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.block_sparse_moe\.gate\."), ".mlp.gate."),
    (re.compile(r"\.block_sparse_moe\.input_linear\.weight$"),
     ".block_sparse_moe.experts.gate_up_proj"),
    (re.compile(r"\.block_sparse_moe\.output_linear\.weight$"),
     ".block_sparse_moe.experts.down_proj"),
    (re.compile(r"\.block_sparse_moe\.router\.layer\.weight$"), ".block_sparse_moe.router.weight"),
    # A grafted Mixtral's graft, as transformers' reversion of ``mlp`` writes it.
    (re.compile(r"\.block_sparse_moe\.graft\."), ".mlp.graft."),
)


def checkpoint_target(key: str, model_keys: Mapping[str, Any]) -> Target | None:
    """The model tensor (or part of one) a checkpoint key fills; ``None`` if none does."""
    if key in model_keys:
        return Target(key)
    for pattern, template, half in KEY_RULES:
        m = pattern.match(key)
        if m:
            name = template.format(pre=m["pre"])
            if name not in model_keys:  # GraniteMoeShared keeps block_sparse_moe
                name = name.replace(".mlp.experts.", ".block_sparse_moe.experts.")
            return Target(name, int(m["e"]), half) if name in model_keys else None
    for pattern, new in RENAMES:
        renamed = pattern.sub(new, key)
        if renamed != key and renamed in model_keys:
            return Target(renamed)
    return None


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files (sharded or single), ``[]`` if it has none."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    single = directory / "model.safetensors"
    return [single] if single.is_file() else []


def _file_keys(file: Path) -> list[str]:
    """The tensor names of one safetensors file (its header only is read)."""
    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def holds_grafts(directory: str | Path, family: str) -> bool:
    """Whether a checkpoint directory holds grafted experts (:mod:`fedmoe.moe.graft`,
    ``strategy=flex``): a tensor whose name, as the model spells it or as the checkpoint
    layout does (:data:`RENAMES`), has the role ``graft``."""
    for file in safetensors_files(Path(directory)):
        for key in _file_keys(file):
            names = (key, *(pattern.sub(new, key) for pattern, new in RENAMES))
            if any(role_of_name(family, name) == Role.GRAFT for name in names):
                return True
    return False


def checkpoint_plan(files: Iterable[Path], model_keys: Mapping[str, Any]
                    ) -> dict[Path, list[tuple[str, Target]]] | None:
    """Checkpoint key -> target, per file; ``None`` when a key maps nowhere or a model
    tensor is left unfilled (then the checkpoint is loaded by ``from_pretrained``)."""
    plan: dict[Path, list[tuple[str, Target]]] = {}
    filled: set[str] = set()
    for file in files:
        entries = []
        for key in _file_keys(file):
            target = checkpoint_target(key, model_keys)
            if target is None:
                log.info("checkpoint key %s of %s matches no model tensor", key, file)
                return None
            entries.append((key, target))
            filled.add(target.name)
        plan[file] = entries
    return plan if set(model_keys) <= filled else None


# --- loading ----------------------------------------------------------------------------------


def load_model(
    model_cfg: Any,
    checkpoint: str | Path | None = None,
    vocab_size: int | None = None,
    *,
    device: str | torch.device = "cpu",
    names: Iterable[str] | None = None,
    skip: Callable[[str], bool] | None = None,
    map_embeddings: bool = False,
    quantize: str | None = None,
) -> PreTrainedModel:
    """The model a ``model`` preset describes, in the preset's dtype, on ``device``.

    Parameters
    ----------
    model_cfg : DictConfig or dict
        A ``model`` group entry (``family``, ``path``, ``dtype``, ``config``).
    checkpoint : str or Path, optional
        Used when the preset has no ``path`` (e.g. the output of ``fedmoe pretrain``).
    vocab_size : int, optional
        Vocabulary size when building from config (random weights).
    device : str or torch.device
        Where the weights live.
    names : iterable of str, optional
        Load only these state-dict entries; everything else stays on the ``meta`` device.
    skip : callable, optional
        ``skip(name)`` true: leave that entry on ``meta`` (not read).
    map_embeddings : bool
        Keep the input embedding memory-mapped (read-only, CPU, untied, stored in the
        model's dtype; otherwise it is read like the rest).
    quantize : {"nf4", "int8"}, optional
        Store the routed experts packed (``train.quantize``, :mod:`fedmoe.train.quantize`),
        each fused tensor quantized as soon as it is read: the process never holds the
        experts in full precision, only one layer's tensor at a time.
    """
    m = plain(model_cfg)
    dtype = DTYPES[m.get("dtype") or "float32"]
    source = m.get("path") or checkpoint
    if not source:
        model = AutoModelForCausalLM.from_config(build_config(m, vocab_size), dtype=dtype)
        model = model.to(device)
    else:
        model = _load_checkpoint(str(source), m["family"], dtype, torch.device(device),
                                 names=set(names) if names is not None else None, skip=skip,
                                 map_embeddings=map_embeddings, quantize=quantize)
    if m.get("experts_implementation"):
        model.set_experts_implementation(m["experts_implementation"])
    if quantize:
        from fedmoe.train.expert_lora import IMPLEMENTATION
        from fedmoe.train.quantize import quantize_model

        quantize_model(model, quantize)  # what is still in full precision (not streamed)
        model.set_experts_implementation(IMPLEMENTATION)  # the one that reads packed experts
    return model


def _load_checkpoint(source: str, family: str, dtype: torch.dtype, device: torch.device,
                     names: set[str] | None, skip: Callable[[str], bool] | None,
                     map_embeddings: bool = False, quantize: str | None = None
                     ) -> PreTrainedModel:
    path = Path(source)
    config = _checkpoint_config(source)
    if config.model_type != family_spec(family).model_type:
        raise ValueError(f"model.path={source!r} holds a {config.model_type!r} model, "
                         f"but model.family={family!r}")
    validate_config(config, where=f"config.json of {source}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        grafted = path.is_dir() and holds_grafts(path, family)
        if grafted:  # a strategy=flex export: its grafts are read like any other tensor
            add_grafts(model)
        wanted = {k for k in model.state_dict()
                  if (names is None or k in names) and not (skip and skip(k))}
        plan = checkpoint_plan(safetensors_files(path), model.state_dict()) \
            if path.is_dir() else None
        if plan is None and grafted:  # from_pretrained would drop the grafts
            raise ValueError(f"checkpoint {source!r} holds grafted experts (strategy=flex) but "
                             f"its tensors do not map onto the grafted {family} model")
        if plan is None:
            return _from_pretrained(source, dtype, device)
        embedding = _embedding_name(model) if map_embeddings and device.type == "cpu" else None
        mapped = {embedding} if embedding in wanted and _map_tensor(model, plan, embedding) \
            else set()
        packed = _quantized_names(model, quantize) & (wanted - mapped)
        _materialize(model, wanted - mapped - packed, device)
        _stream_weights(model, plan, wanted - mapped - packed, device)
        for name in sorted(packed):  # one fused expert tensor in full precision at a time
            _materialize(model, {name}, device)
            _stream_weights(model, plan, {name}, device)
            _quantize(model, name, quantize)
        if packed:
            release_free_memory()  # the full-precision tensors' pages, back to the OS
    except (SafetensorError, EOFError, pickle.UnpicklingError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"checkpoint {source!r}: its weights file is truncated or corrupt "
                         f"({first})") from None
    _tie_and_check(model, wanted - packed)
    return model.eval()


def _quantized_names(model: nn.Module, quantize: str | None) -> set[str]:
    if not quantize:
        return set()
    from fedmoe.train.quantize import quantized_names

    return quantized_names(model)


def _quantize(model: nn.Module, name: str, kind: str) -> None:
    from fedmoe.train.quantize import quantize_part

    module_name, _, attr = name.rpartition(".")
    quantize_part(model.get_submodule(module_name), attr.removesuffix("_proj"),
                  model.get_parameter(name).detach(), kind)


def _checkpoint_config(source: str):
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as e:  # an unreachable hub id, a missing dir: one line naming the source
        raise FileNotFoundError(
            f"model.path={source!r}: no config.json there and it cannot be fetched "
            f"({str(e).splitlines()[0]}); pass a local checkpoint directory") from None


def _materialize(model: nn.Module, wanted: set[str], device: torch.device) -> None:
    """Give every wanted parameter/buffer real (uninitialized) storage on ``device``;
    non-persistent buffers (rotary inverse frequencies) are recomputed by their module."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name not in wanted or not tensor.is_meta:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        empty = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        if isinstance(tensor, nn.Parameter):
            setattr(module, attr, nn.Parameter(empty, requires_grad=tensor.requires_grad))
        else:
            module.register_buffer(attr, empty,
                                   persistent=attr not in module._non_persistent_buffers_set)
    for module in model.modules():  # e.g. rotary embeddings' inv_freq (not in checkpoints)
        for attr, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta and attr in module._non_persistent_buffers_set:
                _rebuild_buffer(module, attr, device)


def _rebuild_buffer(module: nn.Module, attr: str, device: torch.device) -> None:
    """Recompute a derived buffer by building the module anew from its config (rotary
    embeddings); anything else left on ``meta`` is an error naming it."""
    config = getattr(module, "config", None)
    if config is None:
        raise RuntimeError(f"cannot rebuild the non-persistent buffer {attr!r} of "
                           f"{type(module).__name__}")
    with torch.device(device):
        fresh = type(module)(config)
    for name, buf in fresh.named_buffers(recurse=False):
        module.register_buffer(name, buf, persistent=name not in module._non_persistent_buffers_set)
    for name, value in vars(fresh).items():  # e.g. original_inv_freq, a plain attribute
        if isinstance(value, torch.Tensor) and not name.startswith("_"):
            setattr(module, name, value)


@torch.no_grad()
def _stream_weights(model: nn.Module, plan: dict[Path, list[tuple[str, Target]]],
                    wanted: set[str], device: torch.device) -> None:
    """Copy each checkpoint tensor into its place; one tensor in flight at a time."""
    state = model.state_dict(keep_vars=True)
    for file, entries in plan.items():
        todo = [(k, t) for k, t in entries if t.name in wanted]
        if not todo:
            continue
        # pread, not mmap: a mapping would keep every page read resident in this process.
        with safe_open(str(file), framework="pt", device="cpu", backend="pread") as f:
            for key, target in todo:
                dest = state[target.name]
                if target.index is not None:
                    dest = dest[target.index]
                if target.half is not None:
                    rows = dest.shape[0] // 2
                    dest = dest[target.half * rows:(target.half + 1) * rows]
                value = f.get_tensor(key)
                if value.shape != dest.shape:
                    raise ValueError(f"{file}: tensor {key} has shape {tuple(value.shape)}, "
                                     f"the model expects {tuple(dest.shape)} for {target.name}")
                dest.copy_(value)


def _embedding_name(model: PreTrainedModel) -> str | None:
    """State-dict name of the input embedding's weight (``None``: tied to the output)."""
    if getattr(model.config, "tie_word_embeddings", False):
        return None  # the output layer reads every row each token: nothing to leave on disk
    embedding = model.get_input_embeddings()
    return next((f"{path}.weight" for path, module in model.named_modules()
                 if module is embedding), None)


def _map_tensor(model: nn.Module, plan: dict[Path, list[tuple[str, Target]]],
                name: str) -> bool:
    """Put the checkpoint's tensor ``name`` in place as a view of the file's memory mapping
    (safetensors' default backend); ``False`` when it is stored otherwise (renamed, fused or
    in another dtype), then it is read like the rest."""
    param = model.get_parameter(name)
    for file, entries in plan.items():
        if (name, Target(name)) not in entries:
            continue
        with safe_open(str(file), framework="pt", device="cpu") as f:
            value = f.get_tensor(name)  # lazily paged in: the mapping outlives the handle
        if value.dtype != param.dtype or value.shape != param.shape:
            return False
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(value, requires_grad=False))
        return True
    return False


def _tie_and_check(model: PreTrainedModel, wanted: set[str]) -> None:
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in model.state_dict().items() if t.is_meta and n in wanted]
    if left:
        raise ValueError(f"checkpoint left {len(left)} tensors unloaded, e.g. {left[:3]}")


def _from_pretrained(source: str, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """``from_pretrained``, then every tensor copied out of its memory mapping (else the
    process keeps the whole file resident next to the converted experts)."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.to(device, copy=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()
