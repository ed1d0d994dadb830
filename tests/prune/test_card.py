"""Every export carries a Hugging Face model card with fedmoe's metadata."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from fedmoe.prune import export_checkpoint, keep_experts
from fedmoe.prune.card import CARD_FILE, model_card
from tests.helpers.models import tiny_model

KEPT = {1: [0, 3, 5, 6], 2: [1, 2, 4, 7]}  # qwen2_moe tiny: layer 0 is dense


def test_export_writes_a_card_the_hub_library_reads(tmp_path):
    # Prepare: a tiny qwen2_moe model pruned to 4 of 8 experts per MoE layer
    model = tiny_model("qwen2_moe")
    keep_experts(model, KEPT)
    config = {"seed": 3, "prune": {"score": "tcess", "keep": 0.5}}

    # Execute
    out = export_checkpoint(model, None, tmp_path / "export", card={
        "name": "fedmoe client 2 (tiny)", "base_model": "allenai/OLMoE-1B-7B-0924",
        "held_out_ppl": 12.3456789, "base_ppl": 20.0, "config": config})
    card = ModelCard.load(out / CARD_FILE)
    meta = card.data.to_dict()

    # Assert: Hub metadata, the held-out perplexity as a model-index result, fedmoe's block
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == "allenai/OLMoE-1B-7B-0924"
    assert {"fedmoe", "mixture-of-experts", "qwen2_moe", "pruned-experts"} <= set(meta["tags"])
    result = card.data.eval_results[0]
    assert (result.metric_type, result.metric_value) == ("perplexity", 12.3457)
    assert card.data.model_name == "fedmoe client 2 (tiny)"
    fedmoe = meta["fedmoe"]
    assert fedmoe["experts_kept"] == {"1": 4, "2": 4}
    assert fedmoe["kept_expert_ids"] == {"1": [0, 3, 5, 6], "2": [1, 2, 4, 7]}
    assert fedmoe["num_experts_original"] == 8 and fedmoe["config"] == config
    assert "held-out perplexity: 12.346 (shared starting model: 20.000)" in card.text


def test_a_local_base_is_not_given_to_the_hub_as_base_model(tmp_path):
    card = model_card(family="olmoe", kept={0: [0, 1]}, num_experts_original=2,
                      base_model=str(tmp_path))
    meta = card.data.to_dict()
    assert "base_model" not in meta and meta["fedmoe"]["base_model"] == str(tmp_path)
    assert "pruned-experts" not in meta["tags"] and "model-index" not in meta


@pytest.mark.slow
def test_federated_client_exports_carry_their_own_perplexity(pruned_run):
    # Prepare
    run_dir, _ = pruned_run
    results = json.loads((run_dir / "results.json").read_text())

    for cid, client in results["clients"].items():
        # Execute
        card = ModelCard.load(run_dir / "clients" / f"client_{int(cid):04d}" / "model" / CARD_FILE)
        meta = card.data.to_dict()

        # Assert: the client's own final perplexity, its kept experts, the run's config
        assert card.data.eval_results[0].metric_value == pytest.approx(client["final_ppl"],
                                                                       abs=1e-4)
        assert meta["fedmoe"]["experts_kept"] == client["experts_kept"]
        assert meta["fedmoe"]["config"]["prune"]["keep"] == 0.5
        assert meta["fedmoe"]["base_model"] == results["config"]["fl"]["base_model"]
        assert f"client {cid}" in card.data.model_name
