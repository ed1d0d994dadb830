"""Training MoE language models: the loop and evaluation (:mod:`~fedmoe.train.loop`), LoRA on
attention and on the routed experts (:mod:`~fedmoe.train.lora`,
:mod:`~fedmoe.train.expert_lora`), and pretraining the base model
(:mod:`~fedmoe.train.pretrain`). No Flower import here."""

from fedmoe.train.loop import evaluate_lm, set_trainable, train_lm

__all__ = ["evaluate_lm", "set_trainable", "train_lm"]
