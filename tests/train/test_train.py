"""Local training: the load-balancing loss, and training that actually lowers the loss."""

from __future__ import annotations

import torch

from fedmoe.train.loop import evaluate_lm, lm_loss, train_lm
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


def test_a_non_finite_loss_step_is_skipped_not_applied():
    # Prepare: the LM head row of token 5 is NaN and every target is token 5: NaN losses
    model = tiny_model("qwen2_moe")
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    blocks = torch.full((1, 16), 5)  # every batch predicts token 5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Execute
    result = train_lm(model, blocks, steps=3, batch_size=2, lr=3e-3)
    # Assert: every step skipped, no weight moved (a NaN step would have made them all NaN)
    assert result.skipped == 3 and result.loss != result.loss  # NaN: no step counted
    for name, value in model.named_parameters():
        assert torch.equal(value, before[name]) or torch.isnan(before[name]).any(), name


def test_finite_steps_are_taken_and_not_counted_as_skipped():
    model = tiny_model("qwen2_moe")
    blocks = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    result = train_lm(model, blocks, steps=2, batch_size=2, lr=3e-3)
    assert result.skipped == 0 and result.loss == result.loss
