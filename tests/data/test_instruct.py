"""Instruction data: FlowerTune's four datasets (as local files in their formats), prompt
templates, response-only loss, and a federated run on them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F

from fedmoe.data import client_datasets, load_data, train_tokenizer
from fedmoe.data.instruct import (
    IGNORE_INDEX,
    alpaca_prompt,
    instruction_blocks,
    prompt_and_response,
)
from fedmoe.fl.bridge import compose
from fedmoe.train.loop import evaluate_lm, lm_loss
from tests.helpers.models import tiny_model

# One record maker per FlowerTune dataset, with the fields (and field use) of the hub data.
FORMATS = {
    "alpaca_gpt4": lambda i: {  # vicgalle/alpaca-gpt4
        "instruction": f"Give {i % 7 + 2} tips for staying healthy in week {i}.",
        "input": "", "output": " ".join(f"Tip {k}: drink water and sleep {k + i % 3} more hours."
                                        for k in range(1, i % 7 + 3)),
        "text": "preformatted; fedmoe formats the fields itself"},
    "fingpt_sentiment": lambda i: {  # FinGPT/fingpt-sentiment-train
        "input": f"Company {i} shares {'rise' if i % 3 else 'fall'} {i % 9 + 1}% after the "
                 f"quarterly report beats expectations by {i} million dollars.",
        "output": ["negative", "positive", "neutral"][i % 3],
        "instruction": "What is the sentiment of this news? Please choose an answer from "
                       "{negative/neutral/positive}."},
    "medical_flashcards": lambda i: {  # medalpaca/medical_meadow_medical_flashcards
        "input": f"What is the first-line treatment for condition number {i}?",
        "output": f"The first-line treatment for condition {i} is drug {i % 11} taken twice "
                  f"daily for {i % 5 + 1} weeks, with monitoring of liver enzymes.",
        "instruction": "Answer this question truthfully"},
    "code_alpaca": lambda i: {  # flwrlabs/code-alpaca-20k
        "instruction": f"Write a Python function that returns the sum of the first {i} squares.",
        "input": "" if i % 2 else f"n = {i}",
        "output": f"def sum_squares(n={i}):\n    return sum(k * k for k in range(1, n + 1))"},
}
ROWS = 120


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One local jsonl file per FlowerTune dataset, in that dataset's record format."""
    root = tmp_path_factory.mktemp("flowertune")
    out = {}
    for name, make in FORMATS.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(make(i)) + "\n" for i in range(ROWS)))
        out[name] = path
    return out


@pytest.fixture(scope="module")
def tokenizer(files):
    texts = [line for path in files.values() for line in path.read_text().splitlines()]
    return train_tokenizer(texts * 3, vocab_size=400)


@pytest.mark.parametrize("preset", sorted(FORMATS))
def test_each_flowertune_preset_reads_its_dataset_format(preset, files):
    # Prepare: the preset (hub id by default), pointed at a local file of its format
    cfg = compose([f"data={preset}", f"data.path={files[preset]}"])

    # Execute
    dd = load_data(cfg.data)

    # Assert: every row kept, the instruction fields beside the formatted text
    assert cfg.data.template == "alpaca" and cfg.data.response_only
    assert sum(len(dd[s]) for s in dd) == ROWS
    row = dd["train"][0]
    assert {"instruction", "input", "output", "text", "domain"} <= set(row)
    assert row["output"] in row["text"] and row["instruction"].strip() in row["text"]


def test_presets_name_the_flowertune_hub_ids():
    hub = {p: compose([f"data={p}"]).data.path for p in FORMATS}
    assert hub == {"alpaca_gpt4": "vicgalle/alpaca-gpt4",
                   "fingpt_sentiment": "FinGPT/fingpt-sentiment-train",
                   "medical_flashcards": "medalpaca/medical_meadow_medical_flashcards",
                   "code_alpaca": "flwrlabs/code-alpaca-20k"}


def test_alpaca_prompt_is_flowertunes():
    assert alpaca_prompt("Add the numbers.", "1 2") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n1 2\n\n### Response:\n")
    assert alpaca_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")


def _one_record_blocks(tokenizer, record, template, response_only=True):
    prompt, response = prompt_and_response(record, template, tokenizer)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    ids, labels = instruction_blocks(datasets.Dataset.from_list([record]), tokenizer,
                                     len(p) + len(r) + 1, template=template,
                                     response_only=response_only)
    return p, r, ids, labels


def test_prompt_tokens_are_masked_and_the_response_is_the_target(tokenizer):
    record = FORMATS["code_alpaca"](4)
    p, r, ids, labels = _one_record_blocks(tokenizer, record, "alpaca")
    assert ids[0].tolist() == p + r + [tokenizer.eos_token_id]
    assert labels[0, :len(p)].eq(IGNORE_INDEX).all()
    assert labels[0, len(p):].tolist() == r + [tokenizer.eos_token_id]
    assert tokenizer.decode(r) == record["output"]
    _, _, _, unmasked = _one_record_blocks(tokenizer, record, "alpaca", response_only=False)
    assert torch.equal(unmasked, ids)


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_the_tokenizers_chat_template_splits_user_turn_from_answer(tokenizer):
    # Prepare: a tokenizer with a chat template
    chat = train_tokenizer(["<|user|> hello <|assistant|> hi"] * 5 + ["x y z"] * 5, 300)
    chat.chat_template = CHAT_TEMPLATE
    record = FORMATS["medical_flashcards"](3)

    # Execute
    prompt, response = prompt_and_response(record, "chat", chat)
    p, r, ids, labels = _one_record_blocks(chat, record, "chat")

    # Assert: the instruction and input in the user turn; the answer (and end mark) only
    assert prompt == (f"<|user|>\n{record['instruction']}\n\n{record['input']}<|end|>\n"
                      "<|assistant|>\n")
    assert response == f"{record['output']}<|end|>\n"
    assert labels[0, :len(p)].eq(IGNORE_INDEX).all() and labels[0, len(p):].ne(-100).all()


def test_chat_without_a_chat_template_names_the_key(tokenizer):
    with pytest.raises(ValueError, match="data.template=chat needs a tokenizer with a chat "):
        prompt_and_response(FORMATS["code_alpaca"](1), "chat", tokenizer)


def test_response_only_loss_is_the_cross_entropy_of_the_response_tokens(tokenizer):
    # Prepare: a tiny model over this tokenizer's vocabulary, two records in one block
    torch.manual_seed(0)
    model = tiny_model("qwen2_moe", vocab_size=len(tokenizer))
    ds = datasets.Dataset.from_list([FORMATS["fingpt_sentiment"](i) for i in range(2)])
    ids, labels = instruction_blocks(ds, tokenizer, 96, template="alpaca")

    # Execute
    ce, _ = lm_loss(model, ids, labels=labels)
    ev = evaluate_lm(model, ids, labels=labels)

    # Assert: equal to the loss computed by hand over the unmasked positions only
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        keep = labels[:, 1:] != IGNORE_INDEX
        expected = F.cross_entropy(logits[keep].float(), labels[:, 1:][keep])
    assert 0 < keep.sum() < keep.numel()
    assert ce.item() == pytest.approx(expected.item(), rel=1e-5)
    assert ev["tokens"] == keep.sum().item() and ev["loss"] == pytest.approx(expected.item(),
                                                                            rel=1e-5)


def test_mixed_preset_gives_each_group_of_clients_one_domain(files):
    # Prepare: FlowerTune's four domains, each from a local file
    overrides = [f"data.sources.{d}={files[p]}" for d, p in (
        ("general", "alpaca_gpt4"), ("finance", "fingpt_sentiment"),
        ("medical", "medical_flashcards"), ("code", "code_alpaca"))]
    cfg = compose(["data=flowertune_mixed", *overrides])

    # Execute
    clients = client_datasets(load_data(cfg.data), cfg.data.num_clients, cfg.data.partition)

    # Assert: 8 clients, one domain each, two per domain (clients d and d + 4)
    domains = [c.domains for c in clients]
    assert all(len(d) == 1 for d in domains) and len(domains) == 8
    assert domains[:4] == domains[4:]
    assert sorted(d[0] for d in domains[:4]) == ["code", "finance", "general", "medical"]


@pytest.mark.slow
def test_federated_run_on_instruction_data(files, smoke_base, fedmoe_cache, tmp_path):
    # Prepare: the smoke base model, 2 clients of the code dataset (a local file)
    base = str(smoke_base)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedmoe.cli", "simulate", "experiment=smoke", "data=code_alpaca",
           f"data.path={files['code_alpaca']}", f"model.path={base}", "data.num_clients=2",
           "fl.num_rounds=1", "train.local_steps=2", "data.max_train_blocks_per_client=8",
           "data.max_eval_blocks_per_client=4", f"hydra.run.dir={run_dir}"]

    # Execute
    proc = subprocess.run(cmd, env=os.environ | {"FEDMOE_CACHE": str(fedmoe_cache)},
                          capture_output=True, text=True, timeout=900)

    # Assert: both clients trained and were evaluated on response tokens
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["data"]["template"] == "alpaca"
    assert set(results["clients"]) == {"0", "1"}
    assert all(math.isfinite(c["final_ppl"]) and c["final_ppl"] > 1
               for c in results["clients"].values())
