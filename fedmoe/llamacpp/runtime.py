"""llama.cpp through llama-cpp-python: load a GGUF, greedy-decode, tokenize, quantize.

``fedmoe export gguf`` uses it to check the file it wrote against the HF model and to quantize
to k-quants; ``scripts/bench_gguf.py`` to time llama.cpp beside fedmoe's edge runtime. No torch
here. llama-cpp-python compiles llama.cpp on install (the ``gguf`` extra; ``scripts/setup.sh``
says how the wheel is built once and cached).
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

# quant -> llama.cpp's file type (include/llama.h: enum llama_ftype).
# f32/f16/bf16/q8_0 are written directly (fedmoe.llamacpp.export); k-quants need llama.cpp.
FILE_TYPES = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}


def quantize(source: str | Path, out: str | Path, quant: str, threads: int | None = None) -> None:
    """llama.cpp's quantizer (``llama-quantize``) from the GGUF ``source`` to ``out``.

    Tensors whose rows the k-quant block (256) does not divide fall back to a type it does,
    as ``llama-quantize`` does (tiny models: most of them).
    """
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[quant]
    params.nthread = threads or 0  # 0: all cores
    # llama.cpp logs a line per tensor (and per fallback) through llama-cpp-python's logger.
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(),
                                                ctypes.byref(params))
    finally:
        logger.setLevel(level)
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {quant} (status {status})")


def load(path: str | Path, n_ctx: int = 0, threads: int | None = None,
         logits_all: bool = False, f32_cache: bool = False) -> llama_cpp.Llama:
    """The GGUF model at ``path`` on the CPU, quiet; ``n_ctx``: tokens of context (0: the
    model's), ``threads``: llama.cpp's (None: its default), ``logits_all``: keep every
    position's logits in ``.scores`` after ``eval``; ``f32_cache``: keys and values cached in
    f32, not llama.cpp's f16 (whose rounding moves logits by up to ~4e-3: for comparing an
    f32 model with transformers). Close it (``close()``) when done."""
    kwargs = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
    if f32_cache:
        kwargs |= {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=False,
                           logits_all=logits_all, **kwargs)


def tokenize(llm: llama_cpp.Llama, text: str) -> list[int]:
    """llama.cpp's token ids of ``text`` as the HF tokenizer encodes it: special tokens in the
    text parsed as such (HF splits them out too), bos only if the GGUF says to add one."""
    return llm.tokenize(text.encode(), add_bos=llm._model.add_bos_token(), special=True)


@dataclass(frozen=True)
class Greedy:
    """A greedy continuation and its timing."""

    tokens: list[int]
    prefill_s: float
    decode_s: float  # the new tokens after the first, one forward each

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 else float("nan")


def greedy(llm: llama_cpp.Llama, prompt_ids: Sequence[int], max_new_tokens: int,
           stop_at_eos: bool = True) -> Greedy:
    """Argmax decoding of ``max_new_tokens`` after ``prompt_ids`` (ids of the HF tokenizer),
    straight from llama.cpp's logits: no sampler, so it is the model's own choice."""
    llm.reset()
    eos = llm.token_eos()
    start = time.perf_counter()
    llm.eval(list(prompt_ids))
    tokens = [int(np.argmax(last_logits(llm)))]
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    while len(tokens) < max_new_tokens and not (stop_at_eos and tokens[-1] == eos):
        llm.eval([tokens[-1]])
        tokens.append(int(np.argmax(last_logits(llm))))
    return Greedy(tokens, prefill, time.perf_counter() - start)


def last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    """The logits after the last evaluated token, ``(n_vocab,)``, a view into llama.cpp's
    buffer (``Llama.scores`` is only filled with ``logits_all=True``)."""
    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),))
