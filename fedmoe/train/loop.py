"""Causal-LM training with the router load-balancing loss, and perplexity evaluation.

The same loop serves pretraining, local federated training and baselines: it works on any
model of a supported family and a tensor of token blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from fedmoe.checkpoints import model_device
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.families import Role
from fedmoe.prune.masked import KEEP_ATTR


@dataclass
class TrainResult:
    """What a call to :func:`train_lm` did."""

    steps: int
    tokens: int
    loss: float  # mean causal-LM loss over the steps taken
    aux_loss: float  # mean load-balancing loss over the steps taken
    skipped: int = 0  # steps skipped: non-finite loss or gradient norm


def set_trainable(model: nn.Module, roles: Iterable[Role | str]) -> list[str]:
    """Train exactly the parameters of the given roles; freeze the rest.

    Returns the names of the trainable parameters.
    """
    adapter = MoEAdapter(model)
    wanted = {Role(r) for r in roles}
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(adapter.role_of(name) in wanted)
        if p.requires_grad:
            names.append(name)
    return names


class _RouterLogits:
    """Collects every MoE layer's router logits (with their graph) during one forward."""

    def __init__(self, adapter: MoEAdapter) -> None:
        self.layers = [layer for layer in adapter.moe_layers() if layer.scoring == "softmax"]
        self.logits: list[torch.Tensor] = []
        self.handles = []

    def __enter__(self) -> _RouterLogits:
        for layer in self.layers:
            self.handles.append(layer.router.register_forward_hook(self._hook))
        return self

    def _hook(self, module, _args, output) -> None:
        logits = output[0] if isinstance(output, tuple) else output
        keep = getattr(module, KEEP_ATTR, None)  # a pruned client on a shared model
        self.logits.append(logits if keep is None else logits[..., keep])

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def aux_loss(self, reference: torch.Tensor) -> torch.Tensor:
        """Mean over layers of the Switch load-balancing loss (arXiv 2101.03961, eq. 4-6).

        Computed per layer, so layers pruned to different expert counts train too. Families
        that score experts with a sigmoid (DeepSeek-V3 balances with a bias instead) add none.
        """
        if not self.logits:
            return reference.new_zeros(())
        losses = [
            load_balancing_loss_func((z,), z.shape[-1], layer.top_k)
            for z, layer in zip(self.logits, self.layers, strict=True)
        ]
        return torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in losses]).mean()


def weight_dtype(model: nn.Module) -> torch.dtype:
    """The dtype holding most of the model's weights (the base checkpoint's dtype; trainable
    tensors may be float32 on top of a bf16 base)."""
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get) if sizes else torch.float32


def autocast_for(model: nn.Module) -> AbstractContextManager:
    """Autocast to the model's low-precision dtype when its weights are bf16/fp16.

    The frozen base stays in the checkpoint's dtype while trainable tensors are float32
    (``fedmoe.train.lora``): under autocast matmuls run in the base dtype on any device and
    the loss, softmax and optimizer state stay in float32.
    """
    dtype = weight_dtype(model)
    if dtype not in (torch.bfloat16, torch.float16):
        return nullcontext()
    return torch.autocast(model_device(model).type, dtype=dtype)


def lm_loss(model: nn.Module, input_ids: torch.Tensor, adapter: MoEAdapter | None = None,
            labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy and the router load-balancing loss of one batch.

    ``labels`` ``(B, T)`` (default: ``input_ids``) are the targets; ``-100`` marks a position
    the loss skips (the prompt of an instruction record, ``fedmoe.data.instruct``).
    """
    with _RouterLogits(adapter or MoEAdapter(model)) as routers, autocast_for(model):
        out = model(input_ids=input_ids.to(model_device(model)), use_cache=False)
    logits = out.logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    targets = (input_ids if labels is None else labels)[:, 1:].to(logits.device)  # (B, T-1)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                         ignore_index=-100)
    return ce, routers.aux_loss(ce)


def train_lm(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    aux_loss_coef: float = 0.01,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    warmup_steps: int = 0,
    seed: int = 0,
    progress: bool | str = False,
    optimizer: torch.optim.Optimizer | None = None,
    accumulate: int = 1,
    labels: torch.Tensor | None = None,
) -> TrainResult:
    """Run ``steps`` AdamW steps on random batches of ``blocks`` ``(N, T)``.

    Parameters
    ----------
    aux_loss_coef : float
        Weight of the router load-balancing loss added to the causal-LM loss.
    warmup_steps : int
        Linear warm-up, then cosine decay to 10% of ``lr`` (0 = constant ``lr``).
    progress : bool or str
        Show a progress bar (a string is its description).
    optimizer : torch.optim.Optimizer, optional
        Reuse an optimizer (e.g. one restored from personal state).
    accumulate : int
        Gradient accumulation: each step averages the gradients of ``accumulate`` batches of
        ``batch_size`` (the effective batch), for a memory of one batch.
    labels : Tensor, optional
        ``(N, T)`` targets of ``blocks`` (``-100``: not trained on); default the blocks.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter has requires_grad (train.trainable)")
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, warmup_steps))
    gen = torch.Generator().manual_seed(seed)
    adapter = MoEAdapter(model)
    model.train()
    ce_sum = aux_sum = 0.0
    skipped = 0
    bar = tqdm(range(steps), desc=progress if isinstance(progress, str) else "train",
               disable=not progress, leave=False)
    accumulate = max(int(accumulate), 1)
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        ce_step = aux_step = 0.0
        finite = True
        for _ in range(accumulate):
            idx = torch.randint(0, blocks.shape[0], (batch_size,), generator=gen)
            ce, aux = lm_loss(model, blocks[idx], adapter,
                              None if labels is None else labels[idx])
            loss = (ce + aux_loss_coef * aux) / accumulate
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            ce_step += ce.item() / accumulate
            aux_step += aux.item() / accumulate
        if not finite or not _finite_grads(params, max_grad_norm):
            # One NaN step would make every weight NaN through the optimizer: skip it.
            opt.zero_grad(set_to_none=True)
            skipped += 1
            continue
        opt.step()
        sched.step()
        ce_sum += ce_step
        aux_sum += aux_step
        bar.set_postfix(loss=f"{ce_step:.3f}")
    model.eval()
    n = max(steps - skipped, 1)
    tokens = steps * accumulate * batch_size * blocks.shape[1]
    return TrainResult(steps, tokens, ce_sum / n if steps > skipped else math.nan,
                       aux_sum / n, skipped)


def _finite_grads(params: list[nn.Parameter], max_grad_norm: float | None) -> bool:
    """Clip the gradients; ``False`` when their norm is not finite."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)
    return bool(torch.isfinite(norm))


def _schedule(steps: int, warmup: int):
    def factor(step: int) -> float:
        if warmup <= 0:
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@torch.no_grad()
def evaluate_lm(model: nn.Module, blocks: torch.Tensor, batch_size: int = 16,
                labels: torch.Tensor | None = None) -> dict[str, float]:
    """Token-level cross-entropy and perplexity of ``model`` on ``blocks`` ``(N, T)``, over
    the positions ``labels`` keep (default: every token; ``-100`` skips one)."""
    model.eval()
    total, count = 0.0, 0
    device = model_device(model)
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size].to(device)
        with autocast_for(model):
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]  # (B, T-1, V)
        targets = (batch if labels is None else
                   labels[start : start + batch_size].to(device))[:, 1:]
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum",
            ignore_index=-100,
        ).item()
        count += int((targets != -100).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": float(count)}
