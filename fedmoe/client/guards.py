"""A client's checks on what it is given and what it keeps: no bad global tensor is applied,
no non-finite tensor is saved or sent, and no personal tensor is dropped by the server's config.

Two exceptions (``fedmoe.errors``) mark why a client stops a round. Their messages name only
what the server sent (config keys, tensor names, roles), never the device's data or paths, so
the ClientApp may send them back (see ``fedmoe.fl.mods.error_reply_mod``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedmoe.errors import Diverged, Refused

# Largest magnitude a client accepts in a global tensor. Trained LM weights are O(1); a value
# this large is an attack or a divergence, and would overflow float16/bfloat16 arithmetic.
MAX_ABS_VALUE = 1e4


def check_global(arrays: Mapping[str, object], model: nn.Module, names: Iterable[str],
                 max_abs: float = MAX_ABS_VALUE) -> None:
    """Refuse global tensors other than ``names`` at their shapes in ``model``, or any value
    that is not finite or exceeds ``max_abs`` in magnitude.

    Raises
    ------
    Refused
        Naming the tensor and what is wrong with it.
    """
    params = dict(model.named_parameters())
    expected = {n: tuple(params[n].shape) for n in names}
    unknown = sorted(set(arrays) - set(expected))
    if unknown:
        raise Refused(f"global tensors {unknown[:3]} are not ones this device aggregates")
    for name, value in arrays.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.float().numpy()  # bf16 as sent (fedmoe.fl.codec): widened exactly
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise Refused(f"global tensor '{name}' is not a float array")
        if value.shape != expected[name]:
            raise Refused(f"global tensor '{name}' has shape {value.shape}, expected "
                          f"{expected[name]}")
        if not np.isfinite(value).all():
            raise Refused(f"global tensor '{name}' has non-finite values")
        if value.size and float(np.abs(value).max()) > max_abs:
            raise Refused(f"global tensor '{name}' exceeds |x| <= {max_abs:g}")


def check_trained(steps: int, skipped: int, *tensors: Mapping[str, torch.Tensor],
                  max_abs: float = MAX_ABS_VALUE) -> None:
    """After local training: refuse to save or send when every step was skipped (non-finite
    loss), or any tensor is non-finite or beyond ``max_abs``; the last good personal state
    stays as it was.

    Raises
    ------
    Diverged
        Naming the first bad tensor.
    """
    if steps and skipped >= steps:
        raise Diverged(f"all {steps} local steps had a non-finite loss")
    for group in tensors:
        for name, value in group.items():
            value = torch.as_tensor(value)
            if not torch.isfinite(value).all():
                raise Diverged(f"local training made '{name}' non-finite")
            if value.numel() and float(value.abs().max()) > max_abs:
                raise Diverged(f"local training took '{name}' beyond |x| <= {max_abs:g}")


def kept_personal(personal: Sequence[str], saved: Iterable[str], sent: Iterable[str],
                  model: nn.Module) -> list[str]:
    """Names of the personal tensors to save: this round's personal ones, plus every tensor
    saved before that the model still has and that is not sent now. A server's config that
    trains fewer roles never shrinks a device's personal state."""
    params, sent = dict(model.named_parameters()), set(sent)
    extra = [n for n in saved if n in params and n not in sent and n not in personal]
    return [*personal, *extra]
