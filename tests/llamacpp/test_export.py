"""GGUF export run by real llama.cpp (llama-cpp-python, built from the registry): llama.cpp's
greedy continuation and logits equal fedmoe's in-memory model on the same export, its tokenizer
gives fedmoe's token ids, and what llama.cpp cannot run is refused in one line."""

from __future__ import annotations

import json
import sys
import sysconfig
from contextlib import closing
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from fedmoe.checkpoints import load_checkpoint_dir
from fedmoe.cli import main
from fedmoe.data import train_tokenizer
from fedmoe.llamacpp import runtime
from fedmoe.llamacpp.export import QWEN2_REGEX, GGUFExportError, export_gguf
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.routing import capture_routing
from fedmoe.prune import export_checkpoint, keep_experts
from tests.edge.conftest import one_thread  # noqa: F401  (torch on one thread, as llama.cpp)
from tests.helpers.models import grafted_model, tiny_model
from tests.helpers.runs import fedmoe

pytestmark = pytest.mark.slow

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n",
           "class Stack:\n    def push(self, item):\n        "]
NEW_TOKENS = 16
# What llama.cpp must split and merge as the HF tokenizer does: code, runs of spaces, tabs
# and newlines (GPT-2's `\s+(?!\S)`), contractions, digits, accents, CJK, emoji, a special
# token inside the text, trailing whitespace.
TEXTS = [
    "def f(x):\n    return x  +  1\n\n\n",
    "\t\tif a != b:  # tabs\r\n\t\t\tpass   \n",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "3 33 333 3333 3.14159 1e-9 0x1F 1_000_000",
    "naïve café — “quotes” ½ ÆØÅ Ελληνικά русский",
    "我想在apple工作1314151天～ 🦙🦙 😶‍🌫️ ✅",
    "<|endoftext|>next document<|pad|>",
    "   leading and trailing   ",
    "a\n\nb\n \n  \n   c",
    "",
]


def _hf_greedy(model, prompt_ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS,
                             do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def _compare(model_dir: Path, gguf_path: Path) -> list[tuple[list[int], list[int], np.ndarray]]:
    """Per prompt: fedmoe's greedy tokens, llama.cpp's, and the largest |logit difference|
    at each position of prompt + continuation (both teacher-forced on fedmoe's tokens), so a
    model that repeats one token is still compared on its whole output distribution; NaN
    from the first router near-tie on (:func:`_first_tie`). fedmoe's model is the in-memory
    one loaded from the same export."""
    model, tokenizer = load_checkpoint_dir(model_dir)
    rows = []
    llm = runtime.load(gguf_path, n_ctx=64, threads=1, logits_all=True, f32_cache=True)
    with closing(llm):
        for prompt in PROMPTS:
            ids = tokenizer(prompt).input_ids
            ours, hf = runtime.greedy(llm, ids, NEW_TOKENS).tokens, _hf_greedy(model, ids)
            seq = ids + hf
            llm.reset()
            llm.eval(seq)
            with torch.inference_mode(), capture_routing(model, router_probs=False) as trace:
                reference = model(torch.tensor([seq])).logits[0].float().numpy()  # (T, V)
            gaps = np.abs(llm.scores[:len(seq)] - reference).max(axis=1)  # (T,)
            tie = _first_tie(trace, model.config.num_experts_per_tok)
            gaps[len(seq) if tie is None else tie:] = np.nan
            rows.append((hf, ours, gaps))
    return rows


def _first_tie(trace, k: int, margin: float = 1e-4) -> int | None:
    """The first position where some layer's router scores its k-th and (k+1)-th expert
    within ``margin`` (``None``: nowhere): there f32 rounding may pick either (both runtimes
    are right), and later positions inherit the choice through the KV cache. Seen on random
    weights (qwen3_moe: 2e-5 at one token)."""
    ties = []
    for layer in trace:
        scores = layer.router_logits.reshape(-1, layer.router_logits.shape[-1])  # (T, E)
        ranked = scores.sort(dim=-1, descending=True).values
        ties += torch.nonzero(ranked[:, k - 1] - ranked[:, k] < margin).flatten().tolist()
    return min(ties, default=None)


def _assert_same(rows, atol: float) -> None:
    for hf, ours, gaps in rows:
        assert ours == hf
        assert len(hf) == NEW_TOKENS or hf[-1] == 0  # 16 tokens, or stopped at eos
        assert not np.nanmax(gaps, initial=0) >= atol, gaps
    compared = np.concatenate([gaps for *_, gaps in rows])
    assert np.isfinite(compared).mean() > 0.5  # a near-tie cuts one prompt short, not all


# --- qwen2_moe: the tiny default family, trained -----------------------------------------------


def test_base_model_runs_in_llama_cpp_as_in_fedmoe(smoke_base, tmp_path):
    written = export_gguf(smoke_base, tmp_path / "base.gguf", "f32")

    assert written.architecture == "qwen2moe" and written.tokenizer_pre == "gpt-2"
    _assert_same(_compare(smoke_base, written.path), atol=2e-3)


def test_personalized_pruned_client_export_runs_in_llama_cpp(pruned_run, tmp_path):
    # Prepare: a client's export of a real federated run (routed experts trained on its own
    # data, pruned to half of them)
    run_dir, _ = pruned_run
    export = run_dir / "clients" / "client_0000" / "model"
    kept = json.loads((export / "fedmoe_experts.json").read_text())["kept"]

    # Execute
    written = export_gguf(export, tmp_path / "client.gguf", "f32")

    # Assert: llama.cpp holds the kept experts only, and computes what fedmoe computes
    reader = gguf.GGUFReader(written.path)
    assert reader.fields["qwen2moe.expert_count"].contents() == len(kept["0"]) == 8
    assert json.loads(reader.fields["fedmoe.kept_experts"].contents()) == kept
    _assert_same(_compare(export, written.path), atol=2e-3)


def test_q8_0_size_and_agreement_are_reported(smoke_base, tmp_path, record_property):
    f16 = export_gguf(smoke_base, tmp_path / "f16.gguf", "f16")
    q8 = export_gguf(smoke_base, tmp_path / "q8_0.gguf", "q8_0")

    rows = _compare(smoke_base, q8.path)
    agree = sum(next((i for i, (a, b) in enumerate(zip(hf, ours, strict=False)) if a != b),
                     len(hf)) for hf, ours, _ in rows)
    total = sum(len(hf) for hf, _, _ in rows)
    record_property("q8_0_bytes", q8.bytes)
    record_property("q8_0_greedy_agreement", f"{agree}/{total}")
    print(f"\nq8_0: {q8.bytes / 1e6:.2f} MB ({q8.bytes / f16.bytes:.0%} of f16), greedy tokens "
          f"equal to fedmoe's: {agree}/{total}, max |logit gap| "
          f"{max(np.nanmax(r[2]) for r in rows):.4f}")
    # 8.5 bits per weight for the matrices, norms and routers kept in F32
    assert 0.5 < q8.bytes / f16.bytes < 0.6
    assert max(np.nanmax(gaps) for *_, gaps in rows) < 0.5


def test_q4_k_m_is_quantized_by_llama_cpp(smoke_base, tmp_path):
    q8 = export_gguf(smoke_base, tmp_path / "q8_0.gguf", "q8_0")
    q4 = export_gguf(smoke_base, tmp_path / "q4_k_m.gguf", "q4_k_m", threads=1)

    # k-quant blocks are 256 wide: only rows that long get Q4_K/Q6_K, the tiny model's
    # 128-wide rows fall back (Q5_0, Q8_0, ...), as llama-quantize does
    assert {"Q4_K", "Q6_K"} <= set(q4.tensor_types) and "Q5_0" in q4.tensor_types
    assert q4.bytes < 0.8 * q8.bytes
    with closing(runtime.load(q4.path, threads=1)) as llm:
        assert len(runtime.greedy(llm, [10, 20, 30], 4, stop_at_eos=False).tokens) == 4


# --- other families, config-built, pruned --------------------------------------------------------

FAMILY_OVERRIDES = {
    "qwen2_moe": dict(mlp_only_layers=[]),  # llama.cpp's qwen2moe: every layer MoE
    "olmoe": dict(num_key_value_heads=4),  # llama.cpp's olmoe: k_norm over hidden_size
    "qwen3_moe": dict(norm_topk_prob=True),  # llama.cpp's qwen3moe always renormalizes
    "mixtral": {},
    # a dense first layer, grouped sigmoid routing (2 groups, 1 picked), q_lora
    "deepseek_v3": {},
}


@pytest.fixture(scope="module")
def tokenizer(smoke_base):
    return AutoTokenizer.from_pretrained(smoke_base)


def _pruned_export(family: str, tokenizer, out: Path, **overrides) -> Path:
    """A tiny random ``family`` model (DeepSeek's correction bias non-zero) on ``tokenizer``'s
    vocabulary, pruned to 6 of 8 experts per MoE layer, exported by fedmoe."""
    model = tiny_model(family, vocab_size=len(tokenizer), eos_token_id=0, bos_token_id=0,
                       pad_token_id=1, **overrides)
    keep_experts(model, {layer.index: [0, 2, 3, 5, 6, 7]
                         for layer in MoEAdapter(model).moe_layers()})
    return export_checkpoint(model, tokenizer, out)


@pytest.mark.parametrize("family", sorted(FAMILY_OVERRIDES))
def test_other_families_run_in_llama_cpp_as_in_fedmoe(family, tokenizer, tmp_path):
    export = _pruned_export(family, tokenizer, tmp_path / family, **FAMILY_OVERRIDES[family])

    written = export_gguf(export, tmp_path / f"{family}.gguf", "f32")

    assert written.architecture == {"mixtral": "llama", "deepseek_v3": "deepseek2"}.get(
        family, family.replace("_", ""))
    _assert_same(_compare(export, written.path), atol=1e-3)


# --- the tokenizer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_tokenizer():
    """fedmoe's tokenizer trained to 4096 tokens (as `fedmoe pretrain` does) on standard-library
    sources and the prose of the reference manual, so many merges take part."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / f).read_text() for f in ("argparse.py", "inspect.py", "typing.py",
                                                 "pydoc_data/topics.py")]
    return train_tokenizer(texts, vocab_size=4096)


@pytest.mark.parametrize("pre", ["gpt-2", "qwen2"])
def test_llama_cpp_tokenizes_as_fedmoe(pre, big_tokenizer, tmp_path):
    # Prepare: a tiny model carrying the tokenizer; "qwen2": the same vocabulary behind
    # Qwen2's split regex (what Qwen MoE checkpoints on the hub use)
    export = _pruned_export("qwen2_moe", big_tokenizer, tmp_path / "model", mlp_only_layers=[])
    if pre == "qwen2":
        _use_qwen2_split(export / "tokenizer.json")
    hf = AutoTokenizer.from_pretrained(export)

    written = export_gguf(export, tmp_path / "tok.gguf", "f16")

    assert written.tokenizer_pre == pre
    with closing(runtime.load(written.path, n_ctx=64, threads=1)) as llm:
        for text in TEXTS:
            assert runtime.tokenize(llm, text) == hf(text).input_ids, text
            assert llm.detokenize(hf(text).input_ids, special=True).decode() == text


def _use_qwen2_split(path: Path) -> None:
    data = json.loads(path.read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
         "use_regex": False}]}
    path.write_text(json.dumps(data))


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, overrides, reason", [
    ("qwen3_moe", dict(norm_topk_prob=False), "norm_topk_prob=false, but llama.cpp's qwen3moe "
                                              "always renormalizes"),
    ("olmoe", {}, "num_key_value_heads=2 < num_attention_heads=4"),
    ("qwen2_moe", {}, "dense layers (mlp_only_layers"),
    ("deepseek_v3", dict(rope_interleave=False), "rope_interleave=false"),
    ("granitemoeshared", {}, "granitemoe needs Granite's four scaling multipliers"),
])
def test_what_llama_cpp_would_compute_otherwise_is_refused(family, overrides, reason, tokenizer,
                                                            tmp_path):
    export = _pruned_export(family, tokenizer, tmp_path / family, **overrides)

    with pytest.raises(GGUFExportError) as error:
        export_gguf(export, tmp_path / "x.gguf", "f16")

    assert str(error.value).startswith(f"{export / 'config.json'}: llama.cpp cannot run")
    assert reason in str(error.value) and "\n" not in str(error.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_layers_with_different_expert_counts_are_refused_naming_them(tokenizer, tmp_path):
    export = _pruned_export("mixtral", tokenizer, tmp_path / "m")
    info = json.loads((export / "fedmoe_experts.json").read_text())
    info["kept"]["1"] = info["kept"]["1"][:4]
    (export / "fedmoe_experts.json").write_text(json.dumps(info))

    with pytest.raises(GGUFExportError, match=r"MoE layers keep different numbers of experts "
                                              r"\{0: 6, 1: 4, 2: 6\}"):
        export_gguf(export, tmp_path / "x.gguf", "f16")


@pytest.fixture(scope="module")
def grafted_export(tmp_path_factory) -> Path:
    """A strategy=flex client's export: a grafted tiny Mixtral (a family llama.cpp runs as it
    is) with a small byte-level tokenizer of its vocabulary."""
    texts = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"] * 20
    small = train_tokenizer(texts, vocab_size=300)
    model = grafted_model("mixtral", vocab_size=len(small))
    return export_checkpoint(model, small, tmp_path_factory.mktemp("grafted") / "model")


def test_a_grafted_model_is_refused_not_written_without_its_graft(grafted_export, tmp_path):
    with pytest.raises(GGUFExportError) as error:
        export_gguf(grafted_export, tmp_path / "x.gguf", "f16")

    assert str(error.value).startswith(f"{grafted_export}: a grafted model (strategy=flex")
    assert "llama.cpp has no graft" in str(error.value) and "\n" not in str(error.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


# --- the command ---------------------------------------------------------------------------------


def test_export_gguf_command_writes_and_checks_the_file(smoke_base, fedmoe_cache, tmp_path):
    proc = fedmoe(fedmoe_cache, "export", "gguf", f"model_dir={smoke_base}", "quant=f16",
                  f"hydra.run.dir={tmp_path}")

    out = tmp_path / f"{smoke_base.name}-f16.gguf"
    assert f"wrote {out} (qwen2moe, f16," in proc.stdout
    assert (f"llama.cpp check: {NEW_TOKENS} of {NEW_TOKENS} greedy tokens after "
            "'def fibonacci(n):' equal the HF model's; its tokenizer gives the same prompt ids"
            in proc.stdout)
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == 1  # MOSTLY_F16


@pytest.mark.parametrize("args, line", [
    ([], "fedmoe export gguf: model_dir is required"),
    (["model_dir={base}", "quant=q3"], "fedmoe export gguf: quant='q3': expected one of"),
    (["model_dir={tmp}"], "fedmoe export gguf: model_dir='{tmp}' holds no config.json"),
])
def test_bad_input_is_one_line(args, line, smoke_base, fedmoe_cache, tmp_path):
    fill = {"base": smoke_base, "tmp": tmp_path}
    proc = fedmoe(fedmoe_cache, "export", "gguf", *(a.format(**fill) for a in args),
                  f"hydra.run.dir={tmp_path}", check=False)

    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line.format(**fill)), proc.stderr


def test_export_gguf_command_refuses_a_grafted_model_in_one_line(grafted_export, fedmoe_cache,
                                                                 tmp_path):
    proc = fedmoe(fedmoe_cache, "export", "gguf", f"model_dir={grafted_export}",
                  f"hydra.run.dir={tmp_path}", check=False)

    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"fedmoe export gguf: {grafted_export}: a grafted model")
    assert not list(tmp_path.glob("*.gguf"))


def test_without_the_gguf_extra_the_command_names_it(monkeypatch, tmp_path):
    # Prepare: the device install, without the gguf package
    monkeypatch.setitem(sys.modules, "gguf", None)
    for module in ("fedmoe.llamacpp.cli", "fedmoe.llamacpp.export"):
        monkeypatch.delitem(sys.modules, module, raising=False)

    # Execute / Assert
    with pytest.raises(SystemExit) as exit_:
        main(["export", "gguf", "model_dir=x", f"hydra.run.dir={tmp_path}"])
    assert str(exit_.value.code) == ("fedmoe export gguf needs the GGUF (llama.cpp) extra "
                                     "(gguf is not installed): pip install 'fedmoe[gguf]'")
