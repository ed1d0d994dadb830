"""Local training: the load-balancing loss, and training that actually lowers the loss."""

from __future__ import annotations

import torch

from fedmoe.task.train import evaluate_lm, lm_loss, train_lm
from tests.helpers.models import tiny_model


def test_aux_loss_equals_transformers_on_one_moe_layer():
    # With a single MoE layer the per-layer mean is exactly transformers' pooled loss.
    model = tiny_model("mixtral", num_hidden_layers=1)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    _, aux = lm_loss(model, ids)
    reference = model(input_ids=ids, output_router_logits=True).aux_loss
    torch.testing.assert_close(aux, reference)


def test_sigmoid_family_adds_no_aux_loss():
    _, aux = lm_loss(tiny_model("deepseek_v3"), torch.arange(8).reshape(1, 8))
    assert float(aux) == 0.0


def test_training_lowers_held_in_loss():
    model = tiny_model("qwen2_moe")
    blocks = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    before = evaluate_lm(model, blocks)["loss"]
    result = train_lm(model, blocks, steps=30, batch_size=4, lr=3e-3)
    after = evaluate_lm(model, blocks)["loss"]
    assert result.steps == 30 and result.tokens == 30 * 4 * 16
    assert after < before - 0.5
