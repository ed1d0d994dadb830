"""Local training and evaluation of MoE language models (no Flower import here)."""

from fedmoe.task.train import evaluate_lm, set_trainable, train_lm

__all__ = ["evaluate_lm", "set_trainable", "train_lm"]
