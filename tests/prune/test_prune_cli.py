"""`fedmoe prune` through the real CLI: per-layer table, prune.json, a loadable export."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedmoe.checkpoints import load_model
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.families import Role
from fedmoe.prune import export_checkpoint, keep_experts, prune_model
from fedmoe.prune.cli import export, interleaved_blocks, select_domain
from tests.helpers.models import grafted_model, tiny_model
from tests.helpers.runs import SMOKE_BASE, prune

CONF = Path(__file__).resolve().parents[2] / "conf" / "prune"
NUM_EXPERTS = 16  # conf/model/tiny.yaml
NUM_LAYERS = 4


@pytest.fixture
def pruned(smoke_prune) -> tuple[dict, str]:
    """The smoke base model pruned to half its experts by TCESS (tests/conftest.py)."""
    return smoke_prune


@pytest.mark.slow
def test_prune_prints_the_table_and_halves_the_routed_experts(pruned):
    summary, stdout = pruned

    assert [r["layer"] for r in summary["layers"]] == list(range(NUM_LAYERS))
    for r in summary["layers"]:
        assert (r["experts_before"], r["experts_kept"]) == (NUM_EXPERTS, NUM_EXPERTS // 2)
        assert len(set(r["kept"])) == NUM_EXPERTS // 2
        assert r["mb_after"] == pytest.approx(r["mb_before"] / 2)
    assert summary["routed_mb_after"] == pytest.approx(summary["routed_mb_before"] / 2)
    assert summary["routed_mb_before"] == pytest.approx(sum(r["mb_before"] for r in
                                                            summary["layers"]))
    assert summary["eval_blocks"] == 8 and summary["calibration_blocks"] == 4  # 256 / 64
    vocab_size = summary["config"]["pretraining"]["vocab_size"]  # a uniform guess's ppl
    assert 1 < summary["ppl_before"] < vocab_size and 1 < summary["ppl_after"] < vocab_size
    assert summary["ppl_after"] != summary["ppl_before"]  # half the experts do matter
    assert f"{NUM_EXPERTS // 2} / {NUM_EXPERTS}" in stdout
    assert f"{summary['ppl_before']:.2f} -> {summary['ppl_after']:.2f}" in stdout


@pytest.mark.slow
def test_export_loads_with_plain_transformers_with_the_kept_experts(pruned):
    summary, _ = pruned
    export = Path(summary["export"])

    model = AutoModelForCausalLM.from_pretrained(export)
    info = json.loads((export / "fedmoe_experts.json").read_text())

    assert model.config.num_experts == NUM_EXPERTS // 2
    for layer in model.model.layers:
        assert layer.mlp.experts.gate_up_proj.shape[0] == NUM_EXPERTS // 2
        assert layer.mlp.gate.weight.shape[0] == NUM_EXPERTS // 2
    assert info["kept"] == {str(r["layer"]): r["kept"] for r in summary["layers"]}
    assert AutoTokenizer.from_pretrained(export).eos_token_id is not None


@pytest.mark.slow
def test_the_export_reloads_through_model_path_with_the_same_perplexity(pruned, tmp_path,
                                                                        fedmoe_cache):
    # Prepare: the export of the first run, kept whole (keep=1.0) on the same data
    first, _ = pruned
    out_dir = tmp_path / "again"

    # Execute
    summary, _ = prune(tmp_path / "run", fedmoe_cache, *SMOKE_BASE,
                        f"model.path={first['export']}", "prune.keep=1.0", f"out_dir={out_dir}")

    # Assert: the exported weights are the pruned model the first run evaluated
    assert summary["ppl_before"] == pytest.approx(first["ppl_after"], rel=1e-5)
    assert summary["ppl_after"] == pytest.approx(summary["ppl_before"], rel=1e-6)
    assert [r["experts_kept"] for r in summary["layers"]] == [NUM_EXPERTS // 2] * NUM_LAYERS
    assert summary["export"] == str(out_dir) and (out_dir / "config.json").is_file()


@pytest.mark.slow
def test_user_data_calibrates_on_one_domain(pruned, tmp_path, fedmoe_cache):
    # Prepare: a local jsonl file of two domains
    rows = [{"text": f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 4, "kind": "code"}
            for i in range(150)]
    rows += [{"text": f"The {i}th value is the square of {i}, plus {i} again.\n" * 4,
              "kind": "prose"} for i in range(150)]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # Execute
    summary, _ = prune(tmp_path / "run", fedmoe_cache, f"model.path={pruned[0]['export']}",
                        "data=hf", f"data.path={path}", "data.domain_field=kind",
                        "domain=prose", "prune.score=frequency", "prune.keep_per_layer=2")

    # Assert
    assert summary["domain"] == "prose" and summary["config"]["data"]["name"] == "hf"
    assert [r["experts_kept"] for r in summary["layers"]] == [2] * NUM_LAYERS
    assert AutoModelForCausalLM.from_pretrained(summary["export"]).config.num_experts == 2


def test_select_domain_keeps_one_domain_and_names_the_known_ones():
    corpus = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"text": ["x", "y", "z"], "domain": ["a", "b", "a"]})
        for split in ("train", "validation")})

    only_a = select_domain(corpus, "a")

    assert only_a["validation"]["text"] == ["x", "z"]
    assert select_domain(corpus, None) is corpus
    with pytest.raises(ValueError, match=r"domain='c'.*\['a', 'b'\]"):
        select_domain(corpus, "c")


@pytest.mark.slow
def test_interleaved_blocks_alternate_domains(pruned):
    # Prepare: two domains of recognisable text, listed one after the other
    tokenizer = AutoTokenizer.from_pretrained(pruned[0]["export"])
    ds = datasets.Dataset.from_dict({
        "text": ["aaaa " * 200, "aaaa " * 200, "zzzz " * 200, "zzzz " * 200],
        "domain": ["a", "a", "z", "z"]})

    blocks = interleaved_blocks(ds, tokenizer, block_size=16, max_blocks=6)

    # Assert: every prefix is a balanced mix (a, z, a, z, ...)
    texts = [tokenizer.decode(b) for b in blocks]
    assert len(texts) == 6
    assert ["aaaa" in t for t in texts] == [True, False] * 3
    assert ["zzzz" in t for t in texts] == [False, True] * 3


def test_export_declines_a_model_with_unequal_expert_counts(tmp_path):
    # Prepare: what a prune.max_mb budget can leave: 3 experts in one layer, 4 in another
    model = tiny_model("qwen2_moe")
    kept = keep_experts(model, {1: [0, 1, 2], 2: [0, 1, 2, 3]})

    # Execute
    out = export(model, None, tmp_path / "model", {"kept": kept, "scores": None})

    # Assert: no half-written checkpoint either
    assert out is None
    assert not (tmp_path / "model").exists()


def test_pruning_a_grafted_model_keeps_its_graft_through_the_export(tmp_path):
    # Prepare: a strategy=flex client's export, loaded as fedmoe prune loads model.path
    grafted = grafted_model("olmoe")
    source = export_checkpoint(grafted, None, tmp_path / "flex")
    spec = {"family": "olmoe", "path": str(source), "dtype": "float32"}
    model = load_model(spec)
    blocks = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    prune_cfg = OmegaConf.merge(OmegaConf.load(CONF / "default.yaml"), {"score": "frequency"})
    # Execute: prune (half the routed experts), export, reload
    report = prune_model(model, blocks, prune_cfg)
    out = export(model, None, tmp_path / "model", report)
    reloaded = load_model(spec | {"path": str(out)})
    # Assert: the routed experts were halved, the grafts are the client's, untouched, and
    # the reloaded model computes the pruned grafted model
    assert {layer.num_experts for layer in MoEAdapter(reloaded).moe_layers()} == {4}
    graft_names = MoEAdapter(grafted).names(Role.GRAFT)
    assert graft_names and graft_names == MoEAdapter(reloaded).names(Role.GRAFT)
    for name in graft_names:
        assert torch.equal(reloaded.state_dict()[name], grafted.state_dict()[name]), name
    base = tiny_model("olmoe")  # the same pretrained model, pruned alike, without graft
    keep_experts(base, report["kept"])
    with torch.no_grad():
        logits = reloaded(blocks).logits
        torch.testing.assert_close(logits, model(blocks).logits)
        assert (logits - base(blocks).logits).abs().max() > 1e-2
