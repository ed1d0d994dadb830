"""`fedmoe pretrain`: the tokenizer and the base MoE model every federated run starts from.

Data flows: corpus (``data``) -> byte-level BPE fitted on a shuffled mix of all train
domains -> train blocks of every domain, shuffled together -> ``train_lm`` -> per-domain
validation perplexity next to an add-one unigram baseline -> a standard HF checkpoint
(``save_pretrained``) in ``<cache_dir>/base/<model.name>-<hash>``, loadable with plain
``AutoModelForCausalLM`` / ``AutoTokenizer``.

The hash covers everything that changes the weights (model preset, ``pretraining`` with its
own ``pretraining.seed``, the corpus keys of ``data``), so a second call with the same config
reuses the checkpoint at once and a different config never does. The run's top-level
``seed`` is not part of it: the runs of a seed sweep share one base model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedmoe.checkpoints import load_model
from fedmoe.data import load_data, tokenize_blocks, train_tokenizer, unigram_perplexity
from fedmoe.data.corpus import domain_versions
from fedmoe.moe.models import check_model_path, count_parameters
from fedmoe.train.loop import evaluate_lm, train_lm

log = logging.getLogger(__name__)

SUMMARY_FILE = "pretrain.json"
# `data` keys that change the corpus or its blocks (client partitioning keys do not).
_CORPUS_KEYS = ("name", "path", "split", "text_field", "domain_field", "data_files",
                "sources", "max_rows_per_source", "max_mb_per_domain", "chunk_chars", "domains",
                "seed", "block_size")
# Keys that change speed, not weights: left out of the hash.
_RUNTIME_KEYS = {"model": ("experts_implementation",), "pretraining": ("threads",)}
_EVAL_BATCH = 16


# --- where the checkpoint lives ----------------------------------------------------------


def pretrain_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config entries that determine the base checkpoint (hashed for its dir)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    weights = {group: {k: v for k, v in OmegaConf.to_container(cfg[group], resolve=True).items()
                       if k not in runtime}
               for group, runtime in _RUNTIME_KEYS.items()}
    # pretraining.seed is in `weights`; the run's own seed stays out (see the module doc).
    corpus = {k: data[k] for k in _CORPUS_KEYS if data.get(k) is not None}
    if data.get("name") == "embedded" and (versions := domain_versions(data.get("domains"))):
        corpus["domain_versions"] = versions  # a domain whose text changed: a new checkpoint
    return {**weights, "data": corpus}


def base_checkpoint_dir(cfg: DictConfig) -> Path:
    """``<cache_dir>/base/<model.name>-<first 12 hex of sha256(fingerprint)>``."""
    spec = json.dumps(pretrain_fingerprint(cfg), sort_keys=True, default=str)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    return Path(cfg.cache_dir) / "base" / f"{cfg.model.name}-{digest}"


def ensure_base_model(cfg: DictConfig, progress: bool = True) -> Path:
    """The base checkpoint of ``cfg``: the user's ``model.path``, a cached one, or a new one.

    Parameters
    ----------
    cfg : DictConfig
        A composed ``pretrain`` config: ``model``, ``data``, ``pretraining``, ``cache_dir``.
    progress : bool
        Show the training progress bar.

    Returns
    -------
    Path
        ``model.path`` when set (nothing is trained), else :func:`base_checkpoint_dir`, which
        holds the model, the tokenizer and ``pretrain.json``. A checkpoint appears there
        complete or not at all; processes asking for it at once train it once (the others
        wait on its lock file in ``<cache_dir>/locks/``).
    """
    if cfg.model.path:
        return Path(check_model_path(cfg.model.path))
    return _ensure(cfg, progress)[0]


def _ensure(cfg: DictConfig, progress: bool) -> tuple[Path, bool]:
    """The cached base checkpoint of ``cfg``, trained first if missing; whether it was reused."""
    target = base_checkpoint_dir(cfg)
    if (target / SUMMARY_FILE).is_file():
        log.info("reusing base checkpoint %s", target)
        return target, True
    # Runs started together (a parallel sweep, clients of one machine) train it once: the
    # others wait for the lock (<cache>/locks/, not beside the checkpoints), then reuse it.
    locks = target.parent.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(locks / f"{target.parent.name}-{target.name}.lock"):
        if (target / SUMMARY_FILE).is_file():
            log.info("reusing base checkpoint %s (trained by another process)", target)
            return target, True
        model, tokenizer, summary = pretrain(cfg, progress=progress)
        _save_atomically(model, tokenizer, summary, target)
    log.info("saved base checkpoint %s", target)
    return target, False


# --- pretraining ---------------------------------------------------------------------------


def pretrain(
    cfg: DictConfig, progress: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Train the tokenizer and the model of ``cfg`` from scratch (nothing is saved).

    Returns
    -------
    tuple
        The trained model (eval mode), its tokenizer, and the summary written to
        ``pretrain.json``.
    """
    p = cfg.pretraining
    seed = int(p.get("seed", 0))
    start = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(p.threads or os.cpu_count() or 1)
    corpus = load_data(cfg.data)
    texts = tokenizer_texts(corpus["train"], max_mb=p.tokenizer_mb, seed=seed)
    tokenizer = train_tokenizer(texts, vocab_size=p.vocab_size)
    blocks = mixed_blocks(corpus["train"], tokenizer, cfg.data.block_size, seed=seed)
    log.info("tokenizer of %d tokens; %d train blocks of %d", len(tokenizer), len(blocks),
             cfg.data.block_size)
    model = load_model(cfg.model, vocab_size=len(tokenizer))
    _set_special_tokens(model, tokenizer)
    train_start = time.perf_counter()
    result = train_lm(model, blocks, steps=p.steps, batch_size=p.batch_size, lr=p.lr,
                      aux_loss_coef=p.aux_loss_coef, weight_decay=p.weight_decay,
                      max_grad_norm=p.max_grad_norm, warmup_steps=p.warmup_steps,
                      seed=seed, progress="pretrain" if progress else False)
    train_seconds = time.perf_counter() - train_start
    num_eval = p.eval_blocks_per_domain
    domains = evaluate_domains(model, blocks, corpus["validation"], tokenizer,
                               block_size=cfg.data.block_size, max_blocks=num_eval)
    final = evaluate_lm(model, blocks[: num_eval * max(len(domains), 1)], _EVAL_BATCH)
    summary = {
        "model": cfg.model.name, "family": model.config.model_type,
        "parameters": count_parameters(model), "vocab_size": len(tokenizer),
        "steps": result.steps, "batch_size": p.batch_size, "block_size": cfg.data.block_size,
        "tokens_seen": result.tokens, "train_blocks": len(blocks),
        "train_loss_mean": result.loss, "final_train_loss": final["loss"],
        "domains": domains, "overall": _overall(domains),
        "threads": torch.get_num_threads(), "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - start,
        "config": pretrain_fingerprint(cfg),
    }
    return model, tokenizer, summary


def tokenizer_texts(train: datasets.Dataset, max_mb: float, seed: int) -> list[str]:
    """Rows of ``train`` in a seeded random order, up to ``max_mb`` MB of UTF-8 text.

    The shuffle mixes every domain in proportion to its size (the corpus lists domains one
    after another), and the same seed always feeds the tokenizer the same text.
    """
    rows = train["text"]
    order = np.random.default_rng(seed).permutation(len(rows))
    texts, budget = [], max_mb * 1e6
    for i in order.tolist():
        text = rows[i]
        texts.append(text)
        budget -= len(text.encode("utf-8"))
        if budget <= 0:
            break
    return texts


def mixed_blocks(train: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int,
                 seed: int) -> torch.Tensor:
    """Token blocks ``(N, T)`` of every domain of ``train``, shuffled together.

    Each domain is tokenized on its own, so a block never straddles two domains.
    """
    parts = [tokenize_blocks(rows, tokenizer, block_size)
             for rows in _rows_by_domain(train).values()]
    blocks = torch.cat(parts)  # (N, T)
    gen = torch.Generator().manual_seed(seed)
    return blocks[torch.randperm(len(blocks), generator=gen)]


def evaluate_domains(model: PreTrainedModel, train_blocks: torch.Tensor,
                     validation: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, *,
                     block_size: int, max_blocks: int) -> dict[str, dict[str, float]]:
    """Validation perplexity of ``model`` and of the add-one unigram model, per domain.

    Both score the same tokens: every position but the first of up to ``max_blocks``
    blocks of the domain. The unigram model counts ``train_blocks``, the model's own data.

    Returns
    -------
    dict
        ``{domain: {"ppl", "unigram_ppl", "loss", "tokens"}}``; a domain with less than
        one block of validation text is left out.
    """
    vocab_size = model.config.vocab_size
    results = {}
    for domain, rows in _rows_by_domain(validation).items():
        blocks = tokenize_blocks(rows, tokenizer, block_size, max_blocks=max_blocks)
        if len(blocks) == 0:
            log.warning("domain %r has no full validation block; not evaluated", domain)
            continue
        lm = evaluate_lm(model, blocks, _EVAL_BATCH)
        unigram = unigram_perplexity(train_blocks, blocks[:, 1:], vocab_size)
        results[domain] = {"ppl": lm["ppl"], "unigram_ppl": unigram, "loss": lm["loss"],
                           "tokens": int(lm["tokens"])}
    return results


def _rows_by_domain(ds: datasets.Dataset) -> dict[str, datasets.Dataset]:
    """The rows of each domain, domains in order of first appearance."""
    labels = np.asarray(ds["domain"], dtype=object)
    domains = list(dict.fromkeys(labels.tolist()))
    return {d: ds.select(np.flatnonzero(labels == d)) for d in domains}


def _overall(domains: dict[str, dict[str, float]]) -> dict[str, float]:
    """Perplexities over all evaluated tokens (token-weighted mean of the log-perplexities)."""
    tokens = sum(d["tokens"] for d in domains.values())
    if tokens == 0:
        return {"ppl": float("nan"), "unigram_ppl": float("nan"), "tokens": 0}

    def pooled(key: str) -> float:
        return math.exp(sum(d["tokens"] * math.log(d[key]) for d in domains.values()) / tokens)

    return {"ppl": pooled("ppl"), "unigram_ppl": pooled("unigram_ppl"), "tokens": tokens}


def _set_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the model config the tokenizer's eos/bos/pad ids, so ``generate`` stops right."""
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.pad_token_id = tokenizer.pad_token_id


def _save_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     summary: dict[str, Any], target: Path) -> None:
    """Write the checkpoint into a temporary sibling of ``target``, then rename it in place.

    A killed run leaves only a temporary directory, never a ``target`` that looks complete.
    When another process finished the same checkpoint first, its copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        if target.exists() and not (target / SUMMARY_FILE).is_file():
            shutil.rmtree(target)  # an incomplete leftover (no pretrain.json)
        os.replace(tmp, target)
    except OSError:
        if not (target / SUMMARY_FILE).is_file():
            raise
        log.info("another process saved %s first; keeping its checkpoint", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- command -------------------------------------------------------------------------------


def print_summary(summary: dict[str, Any], reused: bool) -> None:
    """A rich table of per-domain validation perplexity, model vs unigram baseline."""
    table = Table(title=f"base model {summary['model']}: validation perplexity")
    for column in ("domain", "val ppl", "unigram ppl", "ratio", "tokens"):
        table.add_column(column, justify="left" if column == "domain" else "right")
    rows = [*summary["domains"].items(), ("overall", summary["overall"])]
    for i, (name, r) in enumerate(rows):
        table.add_row(name, f"{r['ppl']:.2f}", f"{r['unigram_ppl']:.2f}",
                      f"{r['ppl'] / r['unigram_ppl']:.3f}", f"{r['tokens']:,}",
                      style="bold" if i == len(rows) - 1 else None)
    Console(width=120).print(table)
    how = "reused the saved checkpoint" if reused else "pretrained now"
    print(f"{how}: {summary['family']}, {summary['parameters']:,} parameters, "
          f"{summary['steps']} steps, {summary['tokens_seen']:,} tokens seen, "
          f"final train loss {summary['final_train_loss']:.3f}, "
          f"wall time {summary['wall_seconds']:.1f} s "
          f"(training {summary['train_seconds']:.1f} s, {summary['threads']} threads)")


def main(cfg: DictConfig) -> dict[str, Any]:
    """Pretrain (or reuse) the base model of ``cfg``, print its table, copy its summary.

    Returns
    -------
    dict
        The checkpoint's ``pretrain.json`` plus ``checkpoint`` (path) and ``reused``; only
        these two when ``model.path`` names the user's own checkpoint.
    """
    from hydra.core.hydra_config import HydraConfig

    if cfg.model.path:
        check_model_path(cfg.model.path)
        print(f"model.path is set: using {cfg.model.path} as the base model (no pretraining)")
        return {"checkpoint": str(cfg.model.path), "reused": True}
    checkpoint, reused = _ensure(cfg, progress=True)
    summary = json.loads((checkpoint / SUMMARY_FILE).read_text())
    print_summary(summary, reused)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    shutil.copy2(checkpoint / SUMMARY_FILE, run_dir / SUMMARY_FILE)
    print(f"base checkpoint: {checkpoint}")
    return {**summary, "checkpoint": str(checkpoint), "reused": reused}
