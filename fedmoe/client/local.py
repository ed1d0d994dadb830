"""One client's local work: rebuild its personalized model, train, evaluate, keep state.

The personalized model of a client is: the base checkpoint, overwritten by the global tensors
the server sent (the aggregated roles), overwritten by the client's personal tensors from
its node-local store (every trained tensor that is not aggregated: by default the routed
experts). Nothing here imports Flower; ``fedmoe/fl/client_app.py`` moves records in and out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fedmoe.artifacts import ClientMeta
from fedmoe.checkpoints import load_model, resolve_device
from fedmoe.client.guards import check_global, check_trained, kept_personal
from fedmoe.client.state import PersonalStore
from fedmoe.memory import release_free_memory
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.families import Role
from fedmoe.moe.graft import add_grafts, grafts, init_grafts, most_activated
from fedmoe.moe.routing import LayerRouting, RoutingTrace, capture_routing
from fedmoe.prune import RoutingStats, budget_for_round, export_checkpoint, pruning_enabled
from fedmoe.prune.budget import expert_mb
from fedmoe.prune.card import client_card
from fedmoe.prune.masked import RoutingRestriction
from fedmoe.prune.pipeline import plan_pruning
from fedmoe.prune.scores import compute_scores
from fedmoe.train.loop import autocast_for, evaluate_lm, set_trainable, train_lm, weight_dtype
from fedmoe.train.lora import apply_lora
from fedmoe.train.quantize import check_quantize


@dataclass
class ClientBlocks:
    """A client's tokenized data."""

    train: torch.Tensor  # (N, T)
    validation: torch.Tensor  # (M, T)
    domains: list[str]
    # Instruction data (data.template): -100 on prompt tokens; None = every token a target.
    train_labels: torch.Tensor | None = None  # (N, T)
    validation_labels: torch.Tensor | None = None  # (M, T)


def prepare_model(model_cfg, checkpoint: str | Path, train_cfg, seed: int = 0,
                  device: str | torch.device = "cpu", skip=None) -> nn.Module:
    """The trainable model of a run: full fine-tuning of ``train.trainable`` roles, or LoRA
    on them (``train.method=lora``). Server and clients build it the same way, so tensor
    names (and LoRA's starting factors) agree on both sides.

    ``skip(name)`` leaves base tensors unloaded on the ``meta`` device (the server builds
    the model this way, loading only what it aggregates). ``train.quantize`` stores the
    routed experts in 4 or 8 bits (:mod:`fedmoe.train.quantize`; the server reads none).
    """
    quantize = train_cfg.get("quantize")
    if skip is None:
        check_quantize(quantize, train_cfg.method, torch.device(device))
    model = load_model(model_cfg, checkpoint=checkpoint, device=device, skip=skip,
                       quantize=quantize)
    if Role.GRAFT in {Role(r) for r in train_cfg.trainable}:
        add_grafts(model)  # FLEx: a personal expert beside each MoE block (zero until grafted)
    if train_cfg.get("gradient_checkpointing"):
        # Recompute each decoder layer in backward: activations of one layer, not all.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train_cfg.method == "lora":
        lora = train_cfg.lora
        return apply_lora(model, train_cfg.trainable, lora.r, lora.alpha, lora.dropout, seed)
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
    (router rows, fused expert tensors and fedmoe's expert LoRA factors)."""
    params = dict(model.named_parameters())
    rows = {}
    for name in names:
        layer = adapter.layer_of(name)
        if adapter.role_of(name) not in (Role.ROUTER, Role.ROUTED_EXPERTS) or layer is None:
            continue
        if params[name].shape[0] == adapter.layer(layer).num_experts:
            rows[name] = layer
    return rows


class SharedModel:
    """The one base model of a process, shared by every client that runs in it.

    Loaded once (``fedmoe.checkpoints.load_model`` streams it: no second copy), never
    copied. A client switch writes only what differs: :meth:`reset` puts the trainable
    tensors back to their starting values (LoRA factors and router: small; full fine-tuning
    keeps a copy of the trained roles) and lifts any routing restriction; the client then
    writes the global and its personal tensors, and restricts routing to the experts it
    holds (a pruned client is a view of the shared model, not a slice of a copy).
    """

    def __init__(self, checkpoint: str, model_cfg, train_cfg, seed: int,
                 device: torch.device) -> None:
        self.model = prepare_model(model_cfg, checkpoint, train_cfg, seed, device)
        self.adapter = MoEAdapter(self.model)
        self.params = dict(self.model.named_parameters())
        self.trainable = trainable_names(self.model)
        self.initial = {n: self.params[n].detach().clone() for n in self.trainable}
        # Every tensor whose first dim indexes a layer's routed experts -> the layer.
        self.expert_rows = expert_rows(self.model, self.adapter, list(self.params))
        self.restriction = RoutingRestriction(self.adapter)
        self.device = device
        self._originals: dict[str, torch.Tensor] = {}  # frozen tensors a client overwrote

    @torch.no_grad()
    def write(self, name: str, value: torch.Tensor, rows: list[int] | None = None) -> None:
        """Write a client's tensor (into ``rows`` of the expert axis when given). A frozen
        tensor's base value is kept first, so :meth:`reset` restores it for the next client."""
        param = self.params[name]
        if name not in self.initial and name not in self._originals:
            self._originals[name] = param.detach().clone()
        if rows is None:
            param.copy_(value)
        else:
            param[torch.tensor(rows, device=param.device)] = value.to(param.device, param.dtype)

    @torch.no_grad()
    def reset(self) -> None:
        """Trainable tensors to their starting values, overwritten frozen ones to the base,
        routing among all experts."""
        for name, value in (self.initial | self._originals).items():
            self.params[name].copy_(value)
        self._originals.clear()
        self.restriction.clear()


@lru_cache(maxsize=1)
def shared_model(checkpoint: str, model_yaml: str, train_yaml: str, seed: int,
                 device: str) -> SharedModel:
    """The process's base model (one: a different config replaces it)."""
    return SharedModel(checkpoint, OmegaConf.create(model_yaml), OmegaConf.create(train_yaml),
                       seed, torch.device(device))


@lru_cache(maxsize=2)
def _tokenizer(checkpoint: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(checkpoint)


@lru_cache(maxsize=1)
def _partitions(data_yaml: str, num_clients: int):
    from fedmoe.data import client_partitions

    return client_partitions(OmegaConf.create(data_yaml), num_clients)


@lru_cache(maxsize=256)
def client_blocks(data_yaml: str, checkpoint: str, client_id: int) -> ClientBlocks:
    """Tokenized train and held-out blocks of one client, cached per process and on disk
    (``<cache>/blocks``): a device whose every message runs in a fresh process reads them
    back instead of partitioning and tokenizing the corpus again."""
    path = _blocks_path(data_yaml, checkpoint, client_id)
    blocks = _read_blocks(path)
    if blocks is None:
        blocks = _client_blocks(data_yaml, checkpoint, client_id)
        _write_blocks(path, blocks)
    return blocks


def _client_blocks(data_yaml: str, checkpoint: str, client_id: int) -> ClientBlocks:
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


def _blocks_path(data_yaml: str, checkpoint: str, client_id: int) -> Path:
    """Where a client's blocks are kept: named by everything they derive from (the data
    config, the tokenizer's files, fedmoe's data code, the client id)."""
    from fedmoe.cache import cache_root

    digest = hashlib.sha256(f"{data_yaml}\0{client_id}".encode())
    for path in sorted(Path(checkpoint).glob("tokenizer*")):
        digest.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    for path in sorted((Path(__file__).parents[1] / "data").glob("*.py")):
        digest.update(path.read_bytes())
    return cache_root() / "blocks" / f"client_{client_id:04d}-{digest.hexdigest()[:20]}.npz"


def _read_blocks(path: Path) -> ClientBlocks | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            tensor = lambda key: torch.from_numpy(z[key]) if key in z else None  # noqa: E731
            return ClientBlocks(tensor("train"), tensor("validation"),
                                [str(d) for d in z["domains"]], tensor("train_labels"),
                                tensor("validation_labels"))
    except (OSError, ValueError, KeyError):  # none yet, or unreadable: tokenize again
        return None


def _write_blocks(path: Path, blocks: ClientBlocks) -> None:
    arrays = {"train": blocks.train.numpy(), "validation": blocks.validation.numpy(),
              "domains": np.array(blocks.domains, dtype=str)}
    for key in ("train_labels", "validation_labels"):
        if getattr(blocks, key) is not None:
            arrays[key] = getattr(blocks, key).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a reader sees the whole file or none


# --- a device's own data (deployment: node config `data-path`) -----------------------------
@lru_cache(maxsize=8)
def local_blocks(data_path: str, data_yaml: str, checkpoint: str) -> ClientBlocks:
    """Tokenized blocks of a device's own text file: train and held-out split by a hash of
    each row's text (validation and test together are held out), never partitioned. Read
    without ``datasets`` (the slim device install has none), as the ``hf`` loader reads it."""
    from fedmoe.data.files import read_text_rows, split_rows
    from fedmoe.data.instruct import token_blocks

    data = OmegaConf.create(data_yaml)
    rows = read_text_rows(data_path, text_field=data.get("text_field"),
                          domain_field=data.get("domain_field"))
    splits = split_rows(rows)
    held_out = splits["validation"] + splits["test"]
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
    return ClientBlocks(train, val, sorted({row["domain"] for row in rows}), train_labels,
                        val_labels)
# --- end of a device's own data ------------------------------------------------------------


class LocalClient:
    """A client's personalized model: the shared base + global tensors + personal state.

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

    Personal tensors are stored sliced to the experts the client holds (expert-indexed
    tensors have one row per held expert, in id order), as a pruned model would hold them.
    """

    def __init__(self, cfg: DictConfig, client_id: int, checkpoint: str | Path,
                 state_dir: str | Path, data_path: str | Path | None = None) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.checkpoint = str(checkpoint)
        self.store = PersonalStore(state_dir)
        self._saved_names: list[str] = []  # personal tensors of the last saved state
        device = resolve_device(cfg.train.get("device", "cpu"))
        self.shared = shared_model(self.checkpoint, OmegaConf.to_yaml(cfg.model, resolve=True),
                                   OmegaConf.to_yaml(cfg.train, resolve=True), cfg.seed,
                                   str(device))
        self.model, self.adapter = self.shared.model, self.shared.adapter
        self._rows = expert_rows(self.model, self.adapter,
                                 aggregated_names(self.model, self.adapter, cfg))
        self._personal = personal_names(self.model, self.adapter, cfg)
        self.held = self._all_experts()
        data_yaml = OmegaConf.to_yaml(cfg.data, resolve=True)
        self.data = (local_blocks(str(data_path), data_yaml, self.checkpoint) if data_path
                     else client_blocks(data_yaml, self.checkpoint, client_id))

    def _all_experts(self) -> dict[int, list[int]]:
        return {layer.index: list(range(layer.num_experts))
                for layer in self.adapter.moe_layers()}

    # ---- model assembly ------------------------------------------------------------------
    @torch.no_grad()
    def assemble(self, global_arrays: dict[str, torch.Tensor | np.ndarray]) -> ClientMeta:
        """The shared model reset, then global tensors, then personal ones; routing
        restricted to the experts this client holds."""
        check_global(global_arrays, self.model,
                     aggregated_names(self.model, self.adapter, self.cfg))
        saved = self.store.load()
        tensors, meta = saved if saved else ({}, ClientMeta())
        self._saved_names = list(tensors)
        self.shared.reset()
        kept = meta.kept_ids()
        self.held = self._all_experts() | kept
        self.shared.restriction.set(kept)
        for name, value in global_arrays.items():
            # Router rows come for every expert; a pruned client's other rows go unused.
            self.shared.write(name, torch.as_tensor(value))
        for name, value in tensors.items():
            if name in self.shared.params:
                self.shared.write(name, value, self._rows_of(name, value))
        return meta

    def _rows_of(self, name: str, value: torch.Tensor) -> list[int] | None:
        """The expert rows a tensor stored with one row per held expert goes to (``None``:
        a whole tensor)."""
        layer = self.shared.expert_rows.get(name)
        if layer is None or value.shape[0] == self.shared.params[name].shape[0]:
            return None
        return self.held[layer]

    def _gather(self, name: str, rows: dict[str, int]) -> torch.Tensor:
        """A tensor as this client holds it: expert-indexed rows cut to the held experts."""
        param = self.shared.params[name].detach()
        layer = rows.get(name)
        if layer is not None and len(self.held[layer]) != param.shape[0]:
            param = param[torch.tensor(self.held[layer], device=param.device)]
        return param

    def personal_tensors(self) -> dict[str, torch.Tensor]:
        """What the client keeps: this round's personal tensors and any saved before that
        the server's config no longer trains (a config never shrinks a device's state)."""
        names = kept_personal(self._personal, self._saved_names,
                              aggregated_names(self.model, self.adapter, self.cfg), self.model)
        return {n: self._gather(n, self.shared.expert_rows).to("cpu", copy=True)
                for n in names}

    def personal_mb(self) -> float:
        """MB of the personal state this client keeps on disk (its trained tensors)."""
        return sum(self._gather(n, self.shared.expert_rows).numel()
                   * self.shared.params[n].element_size() for n in self._personal) / 2**20

    def outgoing(self) -> dict[str, torch.Tensor]:
        """The aggregated tensors after local training (router rows of the held experts)."""
        return {n: self._gather(n, self._rows).to("cpu")
                for n in aggregated_names(self.model, self.adapter, self.cfg)}

    def wire_dtype(self) -> str:
        """The dtype tensors travel in: the base checkpoint's (bf16 for the real presets)."""
        return str(weight_dtype(self.model)).removeprefix("torch.")

    # ---- one round -----------------------------------------------------------------------
    def fit(self, global_arrays: dict[str, torch.Tensor | np.ndarray], server_round: int,
            evaluate: bool = False) -> dict:
        """Local steps on the client's data, pruning when due; personal state saved.

        ``evaluate``: also evaluate the model just trained on the held-out data (its metrics
        under ``"evaluation"``), so a round needs no separate evaluate message.
        """
        begun = time.perf_counter()
        meta = self.assemble(global_arrays)
        assembled = time.perf_counter()
        if meta.base_ppl is None:
            # Before any local step the model is the shared starting point: remember how well
            # it does on this client's held-out data, to report what personalization gained.
            meta.base_ppl = self._held_out()["ppl"]
            meta.routed_mb_before = self._routed_mb()
        if grafts(self.adapter) and meta.graft_source is None:
            meta.graft_source = self._graft()
        start = time.perf_counter()
        with capture_routing(self.model, self.adapter, router_probs=False) as trace:
            result = self._train(server_round)
        trace = held_layout(trace, self.held)
        stats = self._routing_stats(meta)
        stats.update(trace)  # frequency and TCESS accumulate from training: no extra pass
        _merge_routing(meta, trace, self.held, server_round)
        meta.rounds, meta.last_round = meta.rounds + 1, server_round
        self._maybe_prune(meta, server_round, stats)
        personal, outgoing = self.personal_tensors(), self.outgoing()
        check_trained(result.steps, result.skipped, personal, outgoing)  # else nothing saved
        self.store.save(personal, meta)
        trained = time.perf_counter()
        out = {
            "arrays": outgoing,
            "metrics": {"num-examples": int(self.data.train.shape[0]),
                        "client-id": self.client_id, "train_loss": result.loss,
                        "aux_loss": result.aux_loss, "steps": result.steps,
                        "assemble_seconds": assembled - begun,
                        "train_seconds": trained - start,
                        "personal_mb": sum(t.numel() * t.element_size()
                                           for t in personal.values()) / 2**20},
            "experts": meta.kept,
        }
        if evaluate:
            out["evaluation"] = self._evaluation(meta)
            out["evaluation"]["eval_seconds"] = time.perf_counter() - trained
        return out

    def _graft(self) -> dict[str, int]:
        """Graft onto each MoE layer a copy of the expert this client's data selects most
        often (FLEx, arXiv 2506.00965; fedmoe/moe/graft.py); the layer -> expert chosen."""
        prune = self.cfg.get("prune")
        tokens = int(prune.calibration_tokens) if prune else 512
        with autocast_for(self.model):
            frequency = compute_scores(self.model, self.data.train, "frequency",
                                       calibration_tokens=tokens, adapter=self.adapter,
                                       batch_size=self.cfg.train.batch_size)
        sources = most_activated(frequency, self.held)
        init_grafts(self.adapter, sources)
        return {str(layer): e for layer, e in sources.items()}

    def _train(self, server_round: int):
        t = self.cfg.train
        return train_lm(
            self.model, self.data.train, steps=t.local_steps, batch_size=t.batch_size,
            lr=t.lr, aux_loss_coef=t.aux_loss_coef, weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm, accumulate=int(t.get("grad_accumulation") or 1),
            labels=self.data.train_labels,
            seed=self.cfg.seed * 1_000_003 + self.client_id * 1_009 + server_round,
            progress=f"client {self.client_id}" if self.cfg.verbose else False,
        )

    def _routing_stats(self, meta: ClientMeta) -> RoutingStats:
        prune = self.cfg.get("prune")
        if meta.routing_stats:
            return RoutingStats.from_dict(meta.routing_stats)
        return RoutingStats(prune.get("tcess_k") if prune else None)

    def _routed_mb(self) -> float:
        sizes = expert_mb(self.adapter)
        return sum(sizes[i] * len(ids) for i, ids in self.held.items())

    def _maybe_prune(self, meta: ClientMeta, server_round: int, stats: RoutingStats) -> None:
        """Prune the routed experts when the schedule says so; ``meta`` records the outcome."""
        prune = self.cfg.get("prune")
        budget = (budget_for_round(prune, server_round, self.adapter)
                  if pruning_enabled(prune) else None)
        if budget is None:
            meta.routing_stats = stats.to_dict()
            return
        with autocast_for(self.model):
            report = plan_pruning(self.model, self.data.train, prune, stats, budget=budget,
                                  held=self.held)
        held = {i: [self.held[i][j] for j in ids] for i, ids in report["kept_current"].items()}
        self.held = self.held | held
        self.shared.restriction.set(self.held)
        new_stats = report["stats"] or RoutingStats(prune.get("tcess_k"))
        meta.kept = {str(k): [int(i) for i in v] for k, v in self.held.items()}
        meta.scores = {str(k): [float(x) for x in v] for k, v in report["scores"].items()}
        meta.score, meta.routed_mb_after = report["score"], report["mb_after"]
        meta.pruned_at, meta.routing_stats = server_round, new_stats.to_dict()

    def evaluate(self, global_arrays: dict[str, torch.Tensor | np.ndarray],
                 server_round: int = 0) -> dict:
        """Held-out perplexity of the client's personalized model (and of the base model)."""
        begun = time.perf_counter()
        meta = self.assemble(global_arrays)
        assembled = time.perf_counter()
        metrics = self._evaluation(meta)
        metrics |= {"assemble_seconds": assembled - begun,
                    "eval_seconds": time.perf_counter() - assembled}
        if server_round and server_round == int(self.cfg.fl.num_rounds) and self.cfg.fl.export:
            self.export(meta, metrics)
        return metrics

    def _evaluation(self, meta: ClientMeta) -> dict:
        """Held-out metrics of the model as it stands, with what personalization changed."""
        ev = self._held_out()
        # A client that never trained holds no personal state: its model is the shared one.
        base_ppl = ev["ppl"] if meta.base_ppl is None else meta.base_ppl
        metrics = {"num-examples": int(self.data.validation.shape[0]),
                   "client-id": self.client_id, "eval_loss": ev["loss"], "eval_ppl": ev["ppl"],
                   "base_ppl": float(base_ppl), "routed_mb": self._routed_mb(),
                   "routed_mb_before": float(self._routed_mb() if meta.routed_mb_before is None
                                             else meta.routed_mb_before),
                   "personal_mb": self.personal_mb()}
        return metrics | {f"experts_kept.{layer}": len(ids) for layer, ids in self.held.items()}

    def export(self, meta: ClientMeta, metrics: dict | None = None) -> Path | None:
        """The personalized model as a standard HF checkpoint in ``<state dir>/model``."""
        out = self.store.directory / "model"
        kept = self.held
        release_free_memory()  # the evaluation's buffers: the export's peak comes on top
        counts = meta.expert_counts
        # Per layer: selections of each expert the model holds, in the exported model's order
        # (what an edge cache pins by), and by original id (what analysis compares).
        routing = {str(layer): {"counts": [counts.get(str(layer), [])[i] for i in ids],
                                "counts_by_original_id": counts.get(str(layer), [])}
                   for layer, ids in kept.items() if str(layer) in counts}
        if meta.routing_stats:  # TCESS of the held experts, in the model's order
            for layer, score in RoutingStats.from_dict(meta.routing_stats).tcess().items():
                if str(layer) in routing and len(score) == len(kept[layer]):
                    routing[str(layer)]["tcess"] = score.tolist()
        try:
            export_checkpoint(self.model, _tokenizer(self.checkpoint), out, kept=kept,
                              select=kept, scores=meta.scores, routing_stats=routing,
                              card=client_card(self.cfg, self.client_id, self.checkpoint, metrics))
        except ValueError as e:  # e.g. unequal expert counts per layer: no single HF config
            logging.getLogger(__name__).warning("client %d: no export: %s", self.client_id, e)
            return None
        return out

    def _held_out(self) -> dict[str, float]:
        return evaluate_lm(self.model, self.data.validation, self.cfg.train.batch_size,
                           labels=self.data.validation_labels)


def held_layout(trace: RoutingTrace, held: dict[int, list[int]]) -> RoutingTrace:
    """A routing trace of the shared model in the layout of the client's held experts:
    expert ids as positions among them, router logits of those experts only (what the
    sliced model would have recorded)."""
    out = RoutingTrace()
    for rec in trace:
        ids = held[rec.layer]
        if len(ids) == rec.router_logits.shape[-1] or not rec.router_logits.numel():
            out.layers[rec.layer] = rec
            continue
        lookup = torch.full((rec.router_logits.shape[-1],), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        probs = rec.router_probs[:, ids] if rec.router_probs.numel() else rec.router_probs
        out.layers[rec.layer] = LayerRouting(rec.layer, lookup[rec.top_k_index],
                                             rec.top_k_weights, rec.router_logits[:, ids], probs)
    return out


def _merge_routing(meta: ClientMeta, trace, kept: dict[int, list[int]],
                   server_round: int) -> None:
    """Add this round's per-layer expert selection counts to the running totals and to the
    per-round history, indexed by ORIGINAL expert id (so counts of a pruned client stay
    comparable with everyone's, and specialization can be followed round by round)."""
    totals = dict(meta.expert_counts)
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
    meta.expert_counts = totals
    meta.expert_counts_by_round = meta.expert_counts_by_round | {str(server_round): this_round}
