"""The slow tier: routed-expert weights written one safetensors file per layer and expert.

Layout of a store directory::

    expert_store.json                    # layers, experts, tensor names/shapes/dtypes, bytes
    layer003/expert0007.safetensors      # {"gate_up_proj": (2I, H), "down_proj": (H, I)}

Files are read through ``safetensors.safe_open`` (memory-mapped): a load touches only the
bytes of one expert. Every load is counted, so benchmarks report the traffic of a policy.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fedmoe.moe.adapter import MoEAdapter

INDEX = "expert_store.json"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


class ExpertStore:
    """Per-expert weight files of a model's MoE layers, with a count of bytes loaded.

    Parameters
    ----------
    directory : str or Path
        A directory written by :meth:`ExpertStore.build`.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{index} not found: build the store first "
                                    f"(ExpertStore.build(model, {str(self.directory)!r}))")
        meta = json.loads(index.read_text())
        self.model_type: str = meta["model_type"]
        self.layers: dict[int, dict] = {int(k): v for k, v in meta["layers"].items()}
        self._lock = threading.Lock()
        self.bytes_loaded = 0
        self.loads = 0

    # ---- writing ----------------------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, directory: str | Path,
              adapter: MoEAdapter | None = None) -> ExpertStore:
        """Write every routed expert of ``model`` to ``directory``; returns the opened store."""
        adapter = adapter or MoEAdapter(model)
        directory = Path(directory)
        layers = {}
        for layer in adapter.moe_layers():
            names = layer.expert_param_names()
            if any(getattr(layer.experts, n).is_meta for n in names):
                raise ValueError(f"layer {layer.index} experts are already offloaded (meta "
                                 f"tensors); build the store from the full model")
            folder = directory / f"layer{layer.index:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for e in range(layer.num_experts):
                tensors = {n: t.detach().to("cpu").clone() for n, t in
                           layer.expert_tensors(e).items()}
                save_file(tensors, str(folder / f"expert{e:04d}.safetensors"))
            params = {n: getattr(layer.experts, n) for n in names}
            layers[str(layer.index)] = {
                "num_experts": layer.num_experts,
                "tensors": {n: {"shape": list(p.shape[1:]), "dtype": str(p.dtype)}
                            for n, p in params.items()},
                "expert_nbytes": sum(p[0].numel() * p.element_size() for p in params.values()),
            }
        meta = {"format": 1, "model_type": model.config.model_type, "layers": layers}
        (directory / INDEX).write_text(json.dumps(meta, indent=2))
        return cls(directory)

    @classmethod
    def build_from_checkpoint(cls, model: nn.Module, checkpoint: str | Path,
                              directory: str | Path) -> ExpertStore:
        """Write the store straight from a checkpoint's safetensors files, one expert in
        memory at a time: ``model`` (whose experts may be ``meta``: never loaded) gives the
        layout, :func:`fedmoe.checkpoints.checkpoint_plan` where each tensor goes."""
        from fedmoe.checkpoints import checkpoint_plan, safetensors_files

        adapter = MoEAdapter(model)
        directory = Path(directory)
        state = model.state_dict(keep_vars=True)
        plan = checkpoint_plan(safetensors_files(Path(checkpoint)), state)
        if plan is None:
            raise ValueError(f"{checkpoint}: its tensors do not map onto the model's; load the "
                             f"model in memory and use ExpertStore.build")
        experts = {}  # fused tensor name -> (layer, parameter name)
        layers = {}
        for layer in adapter.moe_layers():
            prefix = next(n for n, t in state.items() if t is getattr(layer.experts,
                          layer.expert_param_names()[0])).rsplit(".", 1)[0]
            params = {n: getattr(layer.experts, n) for n in layer.expert_param_names()}
            experts |= {f"{prefix}.{n}": (layer.index, n) for n in params}
            layers[str(layer.index)] = {
                "num_experts": layer.num_experts,
                "tensors": {n: {"shape": list(p.shape[1:]), "dtype": str(p.dtype)}
                            for n, p in params.items()},
                "expert_nbytes": sum(p[0].numel() * p.element_size() for p in params.values()),
            }
        pending: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        filled: dict[tuple[int, int], int] = {}
        parts = {}  # (layer, expert) -> checkpoint tensors that make it up
        for entries in plan.values():
            for _, target in entries:
                if target.name in experts and target.index is not None:
                    key = (experts[target.name][0], target.index)
                    parts[key] = parts.get(key, 0) + 1
        for file, entries in plan.items():
            with safe_open(str(file), framework="pt", device="cpu", backend="pread") as f:
                for ckpt_key, target in entries:
                    if target.name not in experts or target.index is None:
                        continue
                    layer, name = experts[target.name]
                    key = (layer, target.index)
                    shape = tuple(layers[str(layer)]["tensors"][name]["shape"])
                    dtype = _DTYPES[layers[str(layer)]["tensors"][name]["dtype"]]
                    buf = pending.setdefault(key, {}).setdefault(
                        name, torch.empty(shape, dtype=dtype))
                    dest = buf if target.half is None else \
                        buf[target.half * shape[0] // 2:(target.half + 1) * shape[0] // 2]
                    dest.copy_(f.get_tensor(ckpt_key))
                    filled[key] = filled.get(key, 0) + 1
                    if filled[key] == parts[key]:  # every piece of this expert is in
                        folder = directory / f"layer{layer:03d}"
                        folder.mkdir(parents=True, exist_ok=True)
                        save_file(pending.pop(key), str(folder / f"expert{key[1]:04d}.safetensors"))
        meta = {"format": 1, "model_type": model.config.model_type, "layers": layers}
        (directory / INDEX).write_text(json.dumps(meta, indent=2))
        return cls(directory)

    # ---- reading ----------------------------------------------------------------------------
    def path(self, layer: int, expert: int) -> Path:
        return self.directory / f"layer{layer:03d}" / f"expert{expert:04d}.safetensors"

    def num_experts(self, layer: int) -> int:
        return int(self.layers[layer]["num_experts"])

    def expert_nbytes(self, layer: int) -> int:
        """Bytes of one expert of ``layer`` (all its tensors)."""
        return int(self.layers[layer]["expert_nbytes"])

    @property
    def total_nbytes(self) -> int:
        """Bytes of every routed expert of every layer."""
        return sum(self.expert_nbytes(i) * self.num_experts(i) for i in self.layers)

    def shapes(self, layer: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Fused shape ``(E, ...)`` and dtype of each expert tensor of ``layer``."""
        info = self.layers[layer]
        return {n: ((info["num_experts"], *t["shape"]), _DTYPES[t["dtype"]])
                for n, t in info["tensors"].items()}

    def load(self, layer: int, expert: int, device: torch.device | str | None = None,
             pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """Expert ``expert`` of ``layer``: ``{name: tensor}`` (a copy; thread-safe)."""
        if expert not in range(self.num_experts(layer)):
            raise IndexError(f"layer {layer} of {self.directory} has "
                             f"{self.num_experts(layer)} experts, not expert {expert}")
        with safe_open(str(self.path(layer, expert)), framework="pt", device="cpu") as f:
            tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 (not a dict)
        if pin_memory:
            tensors = {n: t.pin_memory() for n, t in tensors.items()}
        if device is not None and torch.device(device).type != "cpu":
            tensors = {n: t.to(device, non_blocking=pin_memory) for n, t in tensors.items()}
        with self._lock:
            self.loads += 1
            self.bytes_loaded += self.expert_nbytes(layer)
        return tensors

    def reset_counters(self) -> None:
        with self._lock:
            self.loads = 0
            self.bytes_loaded = 0
