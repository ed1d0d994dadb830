"""Tiny presets build without transformers' warning about special ids outside the vocabulary."""

from __future__ import annotations

import pytest
import yaml
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

from fedmoe.compose import conf_dir
from fedmoe.moe.models import build_config

TINY = sorted(p.stem for p in (conf_dir() / "model").glob("tiny*.yaml"))


@pytest.mark.parametrize("preset", TINY)
def test_tiny_preset_special_ids_lie_in_a_small_vocabulary(preset):
    # Prepare: the smoke tokenizer's vocabulary (conf/pretraining/smoke.yaml)
    model = yaml.safe_load((conf_dir() / "model" / f"{preset}.yaml").read_text())
    logger = hf_logging.get_logger("transformers.configuration_utils")

    # Execute
    with CaptureLogger(logger) as captured:
        config = build_config(model, vocab_size=512)

    # Assert
    assert "within the vocabulary" not in captured.out
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        assert value is None or 0 <= value < 512, (key, value)
