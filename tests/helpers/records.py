"""Flower-record helpers of the strategy and ServerApp tests."""

from __future__ import annotations

import numpy as np

# A router weight key (decoder layer 1): its first dim indexes the routed experts.
ROUTER = "model.layers.1.mlp.gate.weight"


def f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)
