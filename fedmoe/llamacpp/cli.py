"""`fedmoe export gguf`: an export as one GGUF file, checked in llama.cpp.

    fedmoe export gguf model_dir=<checkpoint> quant=q8_0
"""

from __future__ import annotations

import importlib.util
from contextlib import closing
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from fedmoe.checkpoints import load_checkpoint_dir
from fedmoe.config import ConfigError
from fedmoe.edge.runtime import resolve_model_dir
from fedmoe.llamacpp.export import QUANTS, export_gguf


def main(cfg: DictConfig) -> dict[str, Any]:
    """Write ``model_dir`` as a GGUF file; with llama-cpp-python installed, run it and compare
    llama.cpp's greedy continuation of ``check_prompt`` with the HF model's.

    Returns
    -------
    dict
        ``path``, ``quant``, ``bytes``, ``architecture`` and, when checked, ``check``
        (``hf`` and ``llama_cpp`` token ids, ``agree``: the leading tokens that are equal).
    """
    from hydra.core.hydra_config import HydraConfig

    if not cfg.model_dir:
        raise ConfigError("model_dir is required: a fedmoe export (fedmoe prune, or a client's "
                          "export of fedmoe simulate) or another HF MoE checkpoint directory")
    if cfg.quant not in QUANTS:
        raise ConfigError(f"quant={cfg.quant!r}: expected one of {list(QUANTS)}")
    model_dir = resolve_model_dir(cfg.model_dir)
    # fedmoe's exports are folders named `model` (clients/client_0003/model): the parent's name.
    name = model_dir.resolve().name
    name = model_dir.resolve().parent.name if name == "model" else name
    out = Path(cfg.out or Path(HydraConfig.get().runtime.output_dir) / f"{name}-{cfg.quant}.gguf")
    model, tokenizer = load_checkpoint_dir(model_dir)
    written = export_gguf(model_dir, out, cfg.quant, model=model, threads=cfg.threads)
    types = ", ".join(f"{n} {t}" for t, n in written.tensor_types.items())
    print(f"wrote {written.path} ({written.architecture}, {written.quant}, "
          f"{written.bytes / 1e6:.1f} MB; tensors: {types}; "
          f"tokenizer pre-tokenizer {written.tokenizer_pre!r})")
    result = {"path": str(written.path), "quant": written.quant, "bytes": written.bytes,
              "architecture": written.architecture}
    if cfg.check:
        result["check"] = _check(cfg, model, tokenizer, written.path)
    print(f"run it: llama-completion -m {written.path} -no-cnv -p {cfg.check_prompt!r} -n 64 "
          "(with a GPU: -ngl 99 --cpu-moe keeps the routed experts in CPU memory)")
    return result


def _check(cfg: DictConfig, model, tokenizer, path: Path) -> dict[str, Any] | None:
    """Greedy tokens of llama.cpp and of the HF model after ``check_prompt``, and how many
    leading ones agree; ``None`` (with a hint) when llama-cpp-python is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        print("not checked in llama.cpp: llama-cpp-python is not installed "
              "(pip install 'fedmoe[gguf]')")
        return None
    from fedmoe.llamacpp import runtime

    prompt, n = tokenizer(cfg.check_prompt).input_ids, int(cfg.check_tokens)
    with torch.inference_mode():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    hf = hf[0, len(prompt):].tolist()
    with closing(runtime.load(path, threads=cfg.threads)) as llm:
        ours = runtime.greedy(llm, prompt, n).tokens
        same_ids = runtime.tokenize(llm, cfg.check_prompt) == prompt
    agree = next((i for i, (a, b) in enumerate(zip(hf, ours, strict=False)) if a != b),
                 min(len(hf), len(ours)))
    drift = "" if agree == len(hf) or cfg.quant in ("f32", "f16", "bf16") \
        else " (a quantized file may drift from the HF model)"
    print(f"llama.cpp check: {agree} of {len(hf)} greedy tokens after {cfg.check_prompt!r} "
          f"equal the HF model's; its tokenizer gives {'the same' if same_ids else 'OTHER'} "
          f"prompt ids{drift}")
    return {"hf": hf, "llama_cpp": ours, "agree": agree, "same_prompt_ids": same_ids}
