"""`fedmoe edge generate` and `fedmoe edge bench` on a tiny saved checkpoint and on an export
of `fedmoe prune`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedmoe.cli import main
from fedmoe.edge.bench import KEYS

PROMPT = "def add(a, b):"


def test_generate_streams_the_in_memory_models_tokens(tiny_checkpoint, tmp_path, capsys):
    # Prepare: the in-memory greedy continuation
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, experts_implementation="eager")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    expected = tokenizer.decode(out[0], skip_special_tokens=True)

    # Execute
    main(["edge", "generate", f"model_dir={tiny_checkpoint}", f"prompt='{PROMPT}'",
          "max_new_tokens=6", "edge.budget=1x", "edge.policy=lru", "edge.threads=1",
          f"edge.store_dir={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}"])
    printed = capsys.readouterr().out

    # Assert
    assert expected.strip() in printed
    assert "[edge] policy=lru budget=1x hit rate" in printed
    assert (tmp_path / "store" / "expert_store.json").is_file()


def test_bench_writes_every_contender_with_the_documented_keys(tiny_checkpoint, tmp_path,
                                                               capsys):
    # Prepare
    output = tmp_path / "bench.json"

    # Execute
    main(["edge", "bench", f"model_dir={tiny_checkpoint}", "max_new_tokens=4",
          "in_memory=[eager,grouped_mm]", "budgets=[2x]", "policies=[lru,static,consistency]",
          "prefetch=[false,true]", "edge.threads=1", f"output={output}",
          f"hydra.run.dir={tmp_path / 'run'}"])
    result = json.loads(output.read_text())
    printed = capsys.readouterr().out

    # Assert: 2 HF in-memory, fedmoe in-memory, naive, lru x2, static, consistency x2
    rows = result["contenders"]
    assert [r["contender"] for r in rows] == [
        "in-memory eager", "in-memory grouped_mm", "fedmoe in-memory", "naive offload",
        "lru 2x", "lru 2x +prefetch", "static 2x", "consistency 2x", "consistency 2x +prefetch"]
    for row in rows:
        assert set(KEYS) <= set(row)
        assert row["hit_rate"] <= row["belady_hit_rate"] + 1e-12 or row["prefetch"]
        assert row["same_output"] is True
    ours = rows[2]  # every expert pinned before the first token: nothing loaded after
    assert ours["hit_rate"] == 1.0 and ours["bytes_loaded"] == 0
    assert ours["resident_expert_fraction"] == 1.0
    naive = rows[3]
    assert naive["hit_rate"] == 0.0 and naive["bytes_loaded"] > 0
    assert "naive offload" in printed


def test_generate_builds_its_store_in_the_cache_not_in_the_model_dir(tiny_checkpoint, tmp_path,
                                                                     monkeypatch, capsys):
    # Prepare: a private cache (tests run as root here: a read-only mode would not bind)
    monkeypatch.setenv("FEDMOE_CACHE", str(tmp_path / "cache"))
    before = sorted(p.name for p in tiny_checkpoint.iterdir())

    # Execute: twice; the second run reuses the store
    for run in ("a", "b"):
        main(["edge", "generate", f"model_dir={tiny_checkpoint}", f"prompt='{PROMPT}'",
              "max_new_tokens=2", "edge.threads=1", f"hydra.run.dir={tmp_path / run}"])

    # Assert: one store under <cache>/expert_store, named after the model; the model dir as it was
    stores = list((tmp_path / "cache" / "expert_store").iterdir())
    assert len(stores) == 1 and stores[0].name.startswith(f"{tiny_checkpoint.name}-")
    assert (stores[0] / "expert_store.json").is_file()
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == before
    assert "[edge] policy=consistency" in capsys.readouterr().out
def _bench_static(model_dir: Path, tmp_path: Path, *overrides: str) -> dict:
    output = tmp_path / "bench.json"
    main(["edge", "bench", f"model_dir={model_dir}", "max_new_tokens=4", "in_memory=[eager]",
          "budgets=[1x]", "policies=[static]", "prefetch=[false]", "edge.threads=1",
          f"output={output}", f"hydra.run.dir={tmp_path / 'run'}", *overrides])
    return json.loads(output.read_text())


@pytest.mark.slow
def test_bench_calibrates_static_on_an_export_of_fedmoe_prune(smoke_prune, tmp_path):
    # Prepare: `fedmoe prune` records no routing statistics in its export
    export = Path(smoke_prune[0]["export"])
    info = json.loads((export / "fedmoe_experts.json").read_text())
    assert info["routing_stats"] is None
    # Execute
    result = _bench_static(export, tmp_path)
    # Assert: a static contender exists only with counts (here from the calibration pass);
    # it pinned top-k experts in each of the 4 layers and generated what the in-memory model does
    rows = {r["contender"]: r for r in result["contenders"]}
    static = rows["static 1x"]
    assert static["same_output"] is True
    assert static["capacity_per_layer"] == {layer: 2 for layer in info["kept"]}
    assert static["preload_bytes"] > 0 and static["hit_rate"] > 0


@pytest.mark.slow
def test_a_routing_stats_file_without_statistics_is_a_clear_error(smoke_prune, tmp_path,
                                                                  capsys):
    export = Path(smoke_prune[0]["export"])
    with pytest.raises(SystemExit):
        _bench_static(export, tmp_path, f"edge.routing_stats={export / 'fedmoe_experts.json'}")
    assert "records no routing statistics" in capsys.readouterr().err
