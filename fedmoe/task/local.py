"""One client's local work: rebuild its personalized model, train, evaluate, keep state.

The personalized model of a client is: the base checkpoint, overwritten by the global tensors
the server sent (the aggregated roles), overwritten by the client's personal tensors from
its node-local store (every trained tensor that is not aggregated: by default the routed
experts). Nothing here imports Flower; ``fedmoe/fl/client_app.py`` moves records in and out.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fedmoe.fl.state import PersonalStore
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.families import Role
from fedmoe.moe.models import load_model
from fedmoe.moe.routing import capture_routing
from fedmoe.prune import (
    RoutingStats,
    budget_for_round,
    export_checkpoint,
    keep_experts,
    kept_experts,
    prune_model,
    pruning_enabled,
    routed_mb,
)
from fedmoe.prune.card import client_card
from fedmoe.task.lora import apply_lora
from fedmoe.task.train import evaluate_lm, set_trainable, train_lm


@dataclass
class ClientBlocks:
    """A client's tokenized data."""

    train: torch.Tensor  # (N, T)
    validation: torch.Tensor  # (M, T)
    domains: list[str]
    # Instruction data (data.template): -100 on prompt tokens; None = every token a target.
    train_labels: torch.Tensor | None = None  # (N, T)
    validation_labels: torch.Tensor | None = None  # (M, T)


def prepare_model(model_cfg, checkpoint: str | Path, train_cfg, seed: int = 0) -> nn.Module:
    """The trainable model of a run: full fine-tuning of ``train.trainable`` roles, or LoRA
    on them (``train.method=lora``). Server and clients build it the same way, so tensor
    names agree on both sides."""
    model = load_model(model_cfg, checkpoint=checkpoint)
    if train_cfg.method == "lora":
        torch.manual_seed(seed)  # LoRA A matrices start from the same draw everywhere
        lora = train_cfg.lora
        return apply_lora(model, train_cfg.trainable, lora.r, lora.alpha, lora.dropout)
    if train_cfg.method != "full":
        raise ValueError(f"train.method={train_cfg.method!r}: expected one of ['full', 'lora']")
    set_trainable(model, train_cfg.trainable)
    return model


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def aggregated_names(model: nn.Module, adapter: MoEAdapter, cfg: DictConfig) -> list[str]:
    """Names of the tensors the server aggregates: trained tensors of ``fl.aggregate`` roles."""
    roles = {Role(r) for r in cfg.fl.aggregate}
    return [n for n in trainable_names(model) if adapter.role_of(n) in roles]


def personal_names(model: nn.Module, adapter: MoEAdapter, cfg: DictConfig) -> list[str]:
    """Names of the tensors a client trains and keeps: every trained tensor not aggregated."""
    roles = {Role(r) for r in cfg.fl.aggregate}
    return [n for n in trainable_names(model) if adapter.role_of(n) not in roles]


def expert_rows(model: nn.Module, adapter: MoEAdapter, names: list[str]) -> dict[str, int]:
    """Of ``names``, those whose first dim indexes the routed experts -> their layer index
    (router rows, fused expert tensors; not LoRA factors, whose rows mix experts and rank)."""
    params = dict(model.named_parameters())
    rows = {}
    for name in names:
        layer = adapter.layer_of(name)
        if adapter.role_of(name) not in (Role.ROUTER, Role.ROUTED_EXPERTS) or layer is None:
            continue
        if params[name].shape[0] == adapter.layer(layer).num_experts:
            rows[name] = layer
    return rows


@lru_cache(maxsize=2)
def _base(checkpoint: str, model_yaml: str, train_yaml: str,
          seed: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """One model instance per process and its starting weights (reset before each use)."""
    model = prepare_model(OmegaConf.create(model_yaml), checkpoint, OmegaConf.create(train_yaml),
                          seed)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


@lru_cache(maxsize=2)
def _tokenizer(checkpoint: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(checkpoint)


@lru_cache(maxsize=1)
def _partitions(data_yaml: str, num_clients: int):
    from fedmoe.data import client_datasets, load_data

    data = OmegaConf.create(data_yaml)
    return client_datasets(load_data(data), num_clients, data.partition, data.alpha, data.seed)


@lru_cache(maxsize=256)
def client_blocks(data_yaml: str, checkpoint: str, client_id: int) -> ClientBlocks:
    """Tokenized train and held-out blocks of one client (cached per process)."""
    from fedmoe.data.instruct import token_blocks

    data = OmegaConf.create(data_yaml)
    part = _partitions(data_yaml, data.num_clients)[client_id]
    tok = _tokenizer(checkpoint)
    train, train_labels = token_blocks(part.train, tok, data, data.max_train_blocks_per_client)
    val, val_labels = token_blocks(part.validation, tok, data, data.max_eval_blocks_per_client)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"client {client_id} has no full block of data.block_size={data.block_size} tokens "
            f"(train {len(train)}, validation {len(val)}): lower data.num_clients or block_size"
        )
    return ClientBlocks(train, val, part.domains, train_labels, val_labels)


# --- a device's own data (deployment: node config `data-path`) -----------------------------
@lru_cache(maxsize=8)
def local_blocks(data_path: str, data_yaml: str, checkpoint: str) -> ClientBlocks:
    """Tokenized blocks of a device's own text file: train and held-out split by a hash of
    each row's text (validation and test together are held out), never partitioned."""
    from datasets import concatenate_datasets

    from fedmoe.data import load_text_dataset, split_by_hash
    from fedmoe.data.instruct import token_blocks

    data = OmegaConf.create(data_yaml)
    rows = load_text_dataset(data_path, text_field=data.get("text_field"),
                             domain_field=data.get("domain_field"))
    splits = split_by_hash(rows)
    held_out = concatenate_datasets([splits["validation"], splits["test"]])
    tok = _tokenizer(checkpoint)
    train, train_labels = token_blocks(splits["train"], tok, data,
                                       data.max_train_blocks_per_client)
    val, val_labels = token_blocks(held_out, tok, data, data.max_eval_blocks_per_client)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"data-path {data_path!r} ({len(rows)} rows) gives no full block of "
            f"data.block_size={data.block_size} tokens (train {len(train)}, held-out "
            f"{len(val)}): add text or lower data.block_size"
        )
    return ClientBlocks(train, val, sorted(set(rows["domain"])), train_labels, val_labels)
# --- end of a device's own data ------------------------------------------------------------


class LocalClient:
    """A client's personalized model, rebuilt from base + global + personal state.

    Parameters
    ----------
    cfg : DictConfig
        The composed ``simulate`` config.
    client_id : int
        Partition id of this client.
    checkpoint : str or Path
        Base model directory (``fedmoe pretrain`` output or ``model.path``).
    state_dir : str or Path
        Node-local directory for this client's personal state.
    data_path : str or Path or None
        The device's own text file (any format ``load_text_dataset`` reads); ``None``: the
        client's partition of the run's data.
    """

    def __init__(self, cfg: DictConfig, client_id: int, checkpoint: str | Path,
                 state_dir: str | Path, data_path: str | Path | None = None) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.checkpoint = str(checkpoint)
        self.store = PersonalStore(state_dir)
        model_yaml = OmegaConf.to_yaml(cfg.model, resolve=True)
        train_yaml = OmegaConf.to_yaml(cfg.train, resolve=True)
        self._template, _ = _base(self.checkpoint, model_yaml, train_yaml, cfg.seed)
        template_adapter = MoEAdapter(self._template)
        self._rows = expert_rows(self._template, template_adapter,
                                 aggregated_names(self._template, template_adapter, cfg))
        self.model, self.adapter = self._template, template_adapter
        data_yaml = OmegaConf.to_yaml(cfg.data, resolve=True)
        self.data = (local_blocks(str(data_path), data_yaml, self.checkpoint) if data_path
                     else client_blocks(data_yaml, self.checkpoint, client_id))

    # ---- model assembly ------------------------------------------------------------------
    def assemble(self, global_arrays: dict[str, np.ndarray]) -> dict:
        """Base model, sliced to the kept experts, then global, then personal tensors."""
        saved = self.store.load()
        tensors, meta = saved if saved else ({}, {"rounds": 0})
        # A fresh copy each time: clients of one process share the template, and pruning
        # replaces tensors in place.
        self.model = copy.deepcopy(self._template)
        kept = {int(k): v for k, v in (meta.get("kept") or {}).items()}
        if kept:
            keep_experts(self.model, kept)
        self.adapter = MoEAdapter(self.model)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in global_arrays.items():
                layer = self._rows.get(name)
                if layer is not None and layer in kept:
                    value = value[kept[layer]]  # router rows of the experts this client holds
                params[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
            for name, value in tensors.items():
                if name in params:
                    params[name].copy_(value)
        return meta

    def personal_tensors(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        names = personal_names(self.model, self.adapter, self.cfg)
        return {n: params[n].detach().clone() for n in names}

    def outgoing(self) -> dict[str, np.ndarray]:
        """The aggregated tensors after local training (float32, as the server keeps them)."""
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().float().numpy().copy()
                for n in aggregated_names(self.model, self.adapter, self.cfg)}

    # ---- one round -----------------------------------------------------------------------
    def fit(self, global_arrays: dict[str, np.ndarray], server_round: int) -> dict:
        """Local steps on the client's data, pruning when due; personal state saved."""
        meta = self.assemble(global_arrays)
        if "base_ppl" not in meta:
            # Before any local step the model is the shared starting point: remember how well
            # it does on this client's held-out data, to report what personalization gained.
            meta["base_ppl"] = self._held_out()["ppl"]
            meta["routed_mb_before"] = routed_mb(self.model)
        start = time.perf_counter()
        with capture_routing(self.model, self.adapter, router_probs=False) as trace:
            result = self._train(server_round)
        stats = self._routing_stats(meta)
        stats.update(trace)  # frequency and TCESS accumulate from training: no extra pass
        meta = _merge_routing(meta, trace, kept_experts(self.model), server_round)
        meta |= {"rounds": meta["rounds"] + 1, "last_round": server_round}
        meta |= self._maybe_prune(server_round, stats)
        self.store.save(self.personal_tensors(), meta)
        return {
            "arrays": self.outgoing(),
            "metrics": {"num-examples": int(self.data.train.shape[0]),
                        "client-id": self.client_id, "train_loss": result.loss,
                        "aux_loss": result.aux_loss, "steps": result.steps,
                        "train_seconds": time.perf_counter() - start},
            "experts": meta.get("kept"),
        }

    def _train(self, server_round: int):
        t = self.cfg.train
        return train_lm(
            self.model, self.data.train, steps=t.local_steps, batch_size=t.batch_size,
            lr=t.lr, aux_loss_coef=t.aux_loss_coef, weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm, labels=self.data.train_labels,
            seed=self.cfg.seed * 1_000_003 + self.client_id * 1_009 + server_round,
            progress=f"client {self.client_id}" if self.cfg.verbose else False,
        )

    def _routing_stats(self, meta: dict) -> RoutingStats:
        prune = self.cfg.get("prune")
        if meta.get("routing_stats"):
            return RoutingStats.from_dict(meta["routing_stats"])
        return RoutingStats(prune.get("tcess_k") if prune else None)

    def _maybe_prune(self, server_round: int, stats: RoutingStats) -> dict:
        """Prune the routed experts when the schedule says so; the meta entries to keep."""
        prune = self.cfg.get("prune")
        budget = (budget_for_round(prune, server_round, self.model)
                  if pruning_enabled(prune) else None)
        if budget is None:
            return {"routing_stats": stats.to_dict()}
        report = prune_model(self.model, self.data.train, prune, stats, budget=budget)
        self.adapter = MoEAdapter(self.model)
        new_stats = report["stats"] or RoutingStats(prune.get("tcess_k"))
        return {"kept": {str(k): [int(i) for i in v] for k, v in report["kept"].items()},
                "scores": {str(k): [float(x) for x in v] for k, v in report["scores"].items()},
                "score": report["score"], "routed_mb_after": report["mb_after"],
                "pruned_at": server_round, "routing_stats": new_stats.to_dict()}

    def evaluate(self, global_arrays: dict[str, np.ndarray], server_round: int = 0) -> dict:
        """Held-out perplexity of the client's personalized model (and of the base model)."""
        meta = self.assemble(global_arrays)
        ev = self._held_out()
        # A client that never trained holds no personal state: its model is the shared one.
        base_ppl = meta.get("base_ppl", ev["ppl"])
        kept = kept_experts(self.model)
        metrics = {"num-examples": int(self.data.validation.shape[0]),
                   "client-id": self.client_id, "eval_loss": ev["loss"], "eval_ppl": ev["ppl"],
                   "base_ppl": float(base_ppl), "routed_mb": routed_mb(self.model),
                   "routed_mb_before": float(meta.get("routed_mb_before", routed_mb(self.model)))}
        metrics |= {f"experts_kept.{layer}": len(ids) for layer, ids in kept.items()}
        if server_round and server_round == int(self.cfg.fl.num_rounds) and self.cfg.fl.export:
            self.export(meta, metrics)
        return metrics

    def export(self, meta: dict, metrics: dict | None = None) -> Path | None:
        """The personalized model as a standard HF checkpoint in ``<state dir>/model``."""
        out = self.store.directory / "model"
        kept = kept_experts(self.model)
        counts = meta.get("expert_counts", {})
        # Per layer: selections of each expert the model holds, in the exported model's order
        # (what an edge cache pins by), and by original id (what analysis compares).
        routing = {str(layer): {"counts": [counts.get(str(layer), [])[i] for i in ids],
                                "counts_by_original_id": counts.get(str(layer), [])}
                   for layer, ids in kept.items() if str(layer) in counts}
        if meta.get("routing_stats"):  # TCESS of the held experts, in the model's order
            for layer, score in RoutingStats.from_dict(meta["routing_stats"]).tcess().items():
                if str(layer) in routing and len(score) == len(kept[layer]):
                    routing[str(layer)]["tcess"] = score.tolist()
        try:
            export_checkpoint(self.model, _tokenizer(self.checkpoint), out, kept=kept,
                              scores=meta.get("scores"), routing_stats=routing,
                              card=client_card(self.cfg, self.client_id, self.checkpoint, metrics))
        except ValueError as e:  # e.g. unequal expert counts per layer: no single HF config
            logging.getLogger(__name__).warning("client %d: no export: %s", self.client_id, e)
            return None
        return out

    def _held_out(self) -> dict[str, float]:
        return evaluate_lm(self.model, self.data.validation, self.cfg.train.batch_size,
                           labels=self.data.validation_labels)


def _merge_routing(meta: dict, trace, kept: dict[int, list[int]], server_round: int) -> dict:
    """Add this round's per-layer expert selection counts to the running totals and to the
    per-round history, indexed by ORIGINAL expert id (so counts of a pruned client stay
    comparable with everyone's, and specialization can be followed round by round)."""
    totals = dict(meta.get("expert_counts", {}))
    this_round = {}
    for rec in trace:
        ids = kept[rec.layer]
        size = max(len(totals.get(str(rec.layer), [])), max(ids) + 1)
        counts = [0] * size
        for i, c in zip(ids, rec.counts(len(ids)).tolist(), strict=True):
            counts[i] = int(c)
        old = totals.get(str(rec.layer), [])
        totals[str(rec.layer)] = [a + b for a, b in zip(old + [0] * (size - len(old)), counts,
                                                        strict=True)]
        this_round[str(rec.layer)] = counts
    history = dict(meta.get("expert_counts_by_round", {})) | {str(server_round): this_round}
    return meta | {"expert_counts": totals, "expert_counts_by_round": history}
