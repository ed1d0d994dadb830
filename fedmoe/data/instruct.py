"""Instruction data: prompt templates and token blocks whose loss covers the responses only.

An instruction record (``instruction``, optional ``input``, ``output``: the alpaca format of
FlowerTune's datasets) becomes a prompt and a response by a template:

- ``alpaca``: the Stanford Alpaca prompt (the one FlowerTune formats with), response after
  ``### Response:``;
- ``chat``: the tokenizer's own chat template (``tokenizer.apply_chat_template``), the
  instruction (and input) as the user turn, the output as the assistant turn.

:func:`instruction_blocks` packs prompt + response + eos of every record into blocks, like
:func:`fedmoe.data.lm.tokenize_blocks`, with labels that are ``-100`` (ignored by the loss) on
prompt tokens: with ``data.response_only`` the model learns to answer, not to echo prompts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from fedmoe.config import PROMPT_TEMPLATES as TEMPLATES
from fedmoe.data.lm import tokenize_blocks

if TYPE_CHECKING:
    from fedmoe.data.lm import Rows

IGNORE_INDEX = -100  # positions the loss skips (torch's cross_entropy default)
INSTRUCTION_FIELDS: tuple[str, ...] = ("instruction", "input", "output")

ALPACA_HEADER = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.")
ALPACA_HEADER_INPUT = ("Below is an instruction that describes a task, paired with an input "
                       "that provides further context. Write a response that appropriately "
                       "completes the request.")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt of one record, ending where the response starts.

    Examples
    --------
    >>> alpaca_prompt("Add.", "1 2").splitlines()[-4:]
    ['### Input:', '1 2', '', '### Response:']
    """
    header = ALPACA_HEADER_INPUT if input else ALPACA_HEADER
    body = f"### Instruction:\n{instruction.strip()}\n\n"
    if input:
        body += f"### Input:\n{input.strip()}\n\n"
    return f"{header}\n\n{body}### Response:\n"


def prompt_and_response(record: Mapping[str, Any], template: str,
                        tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[str, str]:
    """The prompt and the response of an instruction record under ``template``."""
    instruction = str(record.get("instruction") or "")
    extra = str(record.get("input") or "")
    output = str(record.get("output") or "").strip()
    if template == "alpaca":
        return alpaca_prompt(instruction, extra), output
    if template == "chat":
        return chat_prompt_and_response(tokenizer, instruction, extra, output)
    raise ValueError(f"data.template={template!r}: expected one of {list(TEMPLATES)}")


def chat_prompt_and_response(tokenizer: PreTrainedTokenizerBase | None, instruction: str,
                             extra: str, output: str) -> tuple[str, str]:
    """Prompt = the chat up to the assistant's turn (generation prompt included), response =
    the rest of the rendered chat (the answer and the template's end-of-turn marks)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.template=chat needs a tokenizer with a chat template "
                         "(tokenizer_config.json 'chat_template'); this base model's has none: "
                         "use data.template=alpaca")
    user = f"{instruction.strip()}\n\n{extra.strip()}" if extra else instruction.strip()
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the tokenizer's chat template renders the user turn differently with "
                         "and without the answer: cannot tell prompt from response")
    return prompt, full[len(prompt):]


def is_instruction_data(ds: Rows) -> bool:
    """Rows that carry ``instruction`` and ``output`` (kept by both loaders)."""
    columns = ds.column_names if hasattr(ds, "column_names") else (ds[0] if len(ds) else {})
    return {"instruction", "output"} <= set(columns)


def instruction_blocks(
    ds: Rows,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    max_blocks: int | None = None,
    *,
    template: str = "alpaca",
    response_only: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token blocks of instruction records and their labels.

    Every record is tokenized as prompt, response, eos (no other special tokens), the
    records concatenated in order and cut into full blocks (the remainder dropped).

    Returns
    -------
    tuple[Tensor, Tensor]
        ``input_ids`` and ``labels``, ``torch.long`` of shape ``(N, block_size)``; labels equal
        the ids, but are ``-100`` on prompt tokens when ``response_only``.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("instruction_blocks needs a tokenizer with an eos_token_id")
    budget = None if max_blocks is None else max_blocks * block_size
    ids: list[int] = []
    labels: list[int] = []
    for record in ds:
        prompt, response = prompt_and_response(record, template, tokenizer)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += p + r
        labels += ([IGNORE_INDEX] * len(p) if response_only else p) + r
        if budget is not None and len(ids) >= budget:
            break
    num_blocks = len(ids) // block_size
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    n = num_blocks * block_size
    shape = (num_blocks, block_size)
    return (torch.tensor(ids[:n], dtype=torch.long).view(shape),  # (N, T)
            torch.tensor(labels[:n], dtype=torch.long).view(shape))  # (N, T)


def token_blocks(ds: Rows, tokenizer: PreTrainedTokenizerBase,
                 data: Mapping[str, Any], max_blocks: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The blocks of ``ds`` under the ``data`` config: instruction blocks and labels when
    ``data.template`` is set and the rows are instruction records, else plain text blocks
    (every token a target: labels ``None``)."""
    block_size = int(data["block_size"])
    template = data.get("template")
    if template and is_instruction_data(ds):
        return instruction_blocks(ds, tokenizer, block_size, max_blocks, template=template,
                                  response_only=bool(data.get("response_only", True)))
    return tokenize_blocks(ds, tokenizer, block_size, max_blocks), None
