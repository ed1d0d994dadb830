"""Export: a plain-transformers checkpoint (no fedmoe import) with the pruned model's logits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig

from fedmoe.artifacts import EXPERTS_FILE, ExpertsInfo
from fedmoe.data import train_tokenizer
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.prune import RoutingStats, export_checkpoint, keep_experts
from fedmoe.prune.budget import expert_mb
from tests.helpers.models import TINY_FAMILIES, tiny_model
from tests.helpers.prune import input_ids, mask_routers

# Four experts per layer, two from each DeepSeek group (0-3, 4-7), different per layer.
KEPT_SETS = [[0, 2, 5, 7], [1, 3, 4, 6], [0, 3, 4, 5]]
PEFT_FAMILIES = ("qwen3_moe", "mixtral")

LOAD_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
root, ids = sys.argv[1], torch.load(sys.argv[2])
logits = {}
for name in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(f"{root}/{name}", dtype=torch.float32).eval()
    with torch.no_grad():
        logits[name] = model(input_ids=ids).logits
AutoTokenizer.from_pretrained(f"{root}/qwen3_moe")
assert "fedmoe" not in sys.modules, "the export must load without fedmoe"
torch.save(logits, f"{root}/loaded.pt")
"""


def _kept(model) -> dict[int, list[int]]:
    layers = MoEAdapter(model).moe_layers()
    return {layer.index: KEPT_SETS[n % 3] for n, layer in enumerate(layers)}


def _lora(model):
    torch.manual_seed(1)  # random A and B (init_lora_weights=False), so LoRA changes logits
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                        modules_to_save=["gate"])  # the router trained fully
    return get_peft_model(model, config)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every family exported plain, two with LoRA; loaded back in ONE fedmoe-free process."""
    root = tmp_path_factory.mktemp("exports")
    ids = input_ids(5)
    torch.save(ids, root / "ids.pt")
    tokenizer = train_tokenizer(["experts route tokens to the few that matter"] * 20,
                                vocab_size=300)
    memory = {}
    for family in sorted(TINY_FAMILIES):
        model = tiny_model(family)
        keep_experts(model, _kept(model))
        stats = RoutingStats()
        stats.update_layer(1, torch.tensor([[0, 1]]), torch.randn(1, 4))
        scores = {i: np.arange(4.0) for i in _kept(model)}
        export_checkpoint(model, tokenizer if family == "qwen3_moe" else None,
                          root / family, scores=scores, routing_stats=stats)
        with torch.no_grad():
            memory[family] = model(input_ids=ids).logits
    for family in PEFT_FAMILIES:
        model = _lora(tiny_model(family))
        keep_experts(model, _kept(model))
        export_checkpoint(model, None, root / f"peft_{family}")
        with torch.no_grad():
            memory[f"peft_{family}"] = model(input_ids=ids).logits
    names = list(memory)
    subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(root), str(root / "ids.pt"), *names],
                   check=True, cwd=root)
    return root, memory, torch.load(root / "loaded.pt")


def test_plain_transformers_load_gives_the_pruned_logits(exported, family):
    root, memory, loaded = exported
    torch.testing.assert_close(loaded[family], memory[family], atol=1e-5, rtol=0)
    config = AutoConfig.from_pretrained(root / family)
    assert getattr(config, MoEAdapter(tiny_model(family)).spec.num_experts_key) == 4
    assert list((root / family).glob("*.safetensors"))


def test_experts_file_keeps_original_ids_scores_and_stats(exported):
    root, _, _ = exported
    info = ExpertsInfo.read(root / "qwen3_moe")
    assert info.kept == {0: [0, 2, 5, 7], 1: [1, 3, 4, 6], 2: [0, 3, 4, 5]}
    np.testing.assert_array_equal(info.scores[1], np.arange(4.0))
    assert info.routing_stats["layers"]["1"]["tokens"] == 1
    assert info.num_experts_original == 8 and info.family == "qwen3_moe"
    assert (root / "qwen3_moe" / "tokenizer.json").exists()
    assert (root / "qwen3_moe" / EXPERTS_FILE).exists()
    assert not list(root.glob(".*tmp-*")), "temporary export directories left behind"


@pytest.mark.parametrize("family", PEFT_FAMILIES)
def test_peft_export_merges_lora_and_keeps_a_loadable_adapter(exported, family):
    # Prepare
    root, memory, loaded = exported
    base = tiny_model(family)
    keep_experts(base, ExpertsInfo.read(root / f"peft_{family}").kept)
    # Execute
    reloaded = PeftModel.from_pretrained(base, root / f"peft_{family}" / "adapter").eval()
    # Assert
    with torch.no_grad():
        logits = reloaded(input_ids=input_ids(5)).logits
    torch.testing.assert_close(logits, memory[f"peft_{family}"], atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded[f"peft_{family}"], memory[f"peft_{family}"],
                               atol=1e-5, rtol=0)
    assert (memory[f"peft_{family}"] - memory[family]).abs().max() > 1e-3  # LoRA mattered


@pytest.mark.parametrize("family", PEFT_FAMILIES)
def test_lora_on_experts_is_sliced_exactly(family):
    # Prepare
    pruned, reference = _lora(tiny_model(family)), _lora(tiny_model(family))
    kept = _kept(pruned)
    mask_routers(reference, kept)
    # Execute
    keep_experts(pruned, kept)
    # Assert
    wrapper = pruned.base_model.model.model.layers[0].mlp.experts
    assert wrapper.num_experts == 4 and wrapper.lora_A["default"].weight.shape[0] == 4 * 2
    router = pruned.base_model.model.model.layers[0].mlp.gate
    trained = router.modules_to_save["default"]
    assert router.original_module.weight.shape[0] == trained.num_experts == 4
    assert expert_mb(pruned)[0] == expert_mb(tiny_model(family))[0]
    ids = input_ids(6)
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


def test_unequal_counts_are_refused_and_exports_replace_atomically(tmp_path: Path):
    model = tiny_model("olmoe")
    keep_experts(model, {0: [0, 1, 2], 1: [0, 1, 2, 3]})
    with pytest.raises(ValueError, match=r"different numbers of experts.*prune\.max_mb"):
        export_checkpoint(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    model = tiny_model("olmoe")
    export_checkpoint(model, None, tmp_path / "out")
    (tmp_path / "out" / "stale.txt").write_text("from the previous export")
    export_checkpoint(model, None, tmp_path / "out")
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert ExpertsInfo.read(tmp_path / "out").kept == {i: list(range(8)) for i in range(3)}


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v3", "granitemoeshared"])
def test_files_are_cut_at_the_size_limit_and_load_the_same(tmp_path: Path, family):
    # Prepare: pruned to 4 of 8 experts, tens of KB per decoder layer; fused expert tensors
    # above the limit are written a few experts at a time (granitemoeshared's checkpoint
    # keeps them fused: whole)
    model = tiny_model(family)
    keep_experts(model, _kept(model))
    limit = 10_000
    # Execute
    export_checkpoint(model, None, tmp_path / "whole")
    export_checkpoint(model, None, tmp_path / "cut", max_shard_bytes=limit)
    # Assert: more files, each under the limit unless it holds one larger tensor, no file
    # mixing two decoder layers, and the same tensors under the same names
    from safetensors.torch import load_file

    cut = {f.name: load_file(f) for f in (tmp_path / "cut").glob("*.safetensors")}
    whole = {}
    for f in (tmp_path / "whole").glob("*.safetensors"):
        whole |= load_file(f)
    assert len(cut) > len(list((tmp_path / "whole").glob("*.safetensors")))
    for name, tensors in cut.items():
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit or len(tensors) == 1, (name, size)
        groups = {k.split(".")[2] if k.startswith("model.layers.") else "rest" for k in tensors}
        assert len(groups) == 1, (name, groups)
    merged = {k: v for tensors in cut.values() for k, v in tensors.items()}
    assert merged.keys() == whole.keys()
    for key, value in whole.items():
        assert torch.equal(merged[key], value), key
