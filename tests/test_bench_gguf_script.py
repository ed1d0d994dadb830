"""scripts/bench_gguf.py end to end at test size: every contender runs in its own process on
the same export and reports speed, memory and its greedy tokens."""

from __future__ import annotations

import json

import pytest

from tests.helpers.scripts import load_script


@pytest.mark.slow
def test_bench_gguf_compares_llama_cpp_with_fedmoe_on_one_export(smoke_prune, tmp_path):
    # Prepare
    bench = load_script("bench_gguf")
    summary, _ = smoke_prune
    out = tmp_path / "bench_gguf.json"

    # Execute
    bench.main(["--model-dir", summary["export"], "--tokens", "4", "--repeats", "1",
                "--out", str(out)])

    # Assert: five contenders, the same greedy tokens, and the GGUF files' sizes in the
    # order of their bits per weight; llama.cpp's process holds no torch
    rows = {r["contender"]: r for r in json.loads(out.read_text())["contenders"]}
    assert list(rows) == ["fedmoe in-memory", "fedmoe edge 2x consistency", "llama.cpp f16",
                          "llama.cpp q8_0", "llama.cpp q4_k_m"]
    reference = rows["fedmoe in-memory"]["tokens"]
    assert len(reference) == 4
    for name in ("fedmoe edge 2x consistency", "llama.cpp f16"):
        assert rows[name]["tokens"] == reference
    assert rows["llama.cpp f16"]["file_mb"] > rows["llama.cpp q8_0"]["file_mb"] \
        > rows["llama.cpp q4_k_m"]["file_mb"]
    assert all(r["decode_tokens_per_s"] > 0 and r["peak_pss_mb"] > 0 for r in rows.values())
    assert rows["llama.cpp f16"]["peak_pss_mb"] < 0.5 * rows["fedmoe in-memory"]["peak_pss_mb"]
