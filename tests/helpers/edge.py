"""Edge-test helpers: one prompt and a greedy generation of a fixed length."""

from __future__ import annotations

import torch

PROMPT = torch.tensor([[5, 17, 42, 8, 63, 21, 9, 30]])
NEW_TOKENS = 8


@torch.inference_mode()
def greedy(model: torch.nn.Module, input_ids: torch.Tensor = PROMPT) -> torch.Tensor:
    return model.generate(input_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, pad_token_id=0)
