"""Every `fedmoe ...` example of README.md works as written.

Each example is extracted from the README (code blocks and inline code), its placeholders
(``<dir>``, ``<sweep dir>``, ...) filled with the outputs of a real smoke run, and then:

- parsed: the command exists and Hydra composes its config from exactly the example's
  overrides (every combination of a ``-m`` sweep), so a quoting or key error fails here;
- run, where that takes seconds: ``inspect``, ``edge generate``, ``edge bench``, ``prune``,
  ``export gguf``, ``analyze`` and ``report`` run as subprocesses, with smoke sizes appended
  after the example's own overrides (model, data and sweep sizes only). ``simulate`` and
  ``pretrain`` examples are parsed only (minutes each at their sizes); ``experiment=smoke``
  itself is the session's ``smoke_run``.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from fedmoe.cli import COMMANDS, parse_command
from fedmoe.compose import compose, conf_dir
from tests.helpers.runs import SMOKE_BASE

README = Path(__file__).resolve().parents[1] / "README.md"

# Appended to an example that runs: sizes only, never a key the example sets.
SMOKE_SIZES = {
    "inspect": [],
    "edge generate": ["max_new_tokens=8", "edge.threads=1"],
    "edge bench": ["max_new_tokens=4", "budgets=[2x]", "edge.threads=1"],
    "prune": [*SMOKE_BASE, "eval_blocks=8", "prune.calibration_tokens=256", "threads=1"],
    "analyze": ["pretraining=smoke", "data.max_mb_per_domain=0.5", "data.block_size=64",
                "analysis=smoke", "analysis.sections=[consistency,specialization]"],
    "report": [],
    "export gguf": ["threads=1"],
}
NEEDS_USER_FILES = ("/models/", "/data/")  # examples naming the user's own files


def readme_examples(text: str) -> list[str]:
    """Every ``fedmoe <command> ...`` of the README: code-block lines (joined across ``\\``,
    comments dropped) and inline code spans, in order, generic usage lines left out."""
    examples = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if re.match(r"(\.venv/bin/)?fedmoe ", line) and "&&" not in line:
                examples.append(" ".join(shlex.split(line, comments=True)[1:]))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`fedmoe ([^`]+)`", prose):
        if not span.startswith(("<command>", "--")) and "--help" not in span:
            examples.append(span)
    return list(dict.fromkeys(examples))


EXAMPLES = readme_examples(README.read_text())


def test_the_readme_has_examples_of_every_command():
    names = {parse_command(shlex.split(e.replace("[", "").replace("]", "")))[0]
             for e in EXAMPLES}
    assert names == set(COMMANDS)
    assert any("'prompt=\"def fibonacci(n):\"'" in e for e in EXAMPLES)


def _fill(example: str, places: dict[str, str]) -> list[str]:
    """The argv after ``fedmoe``: placeholders filled, optional ``[...]`` brackets dropped."""
    for placeholder, value in places.items():
        example = example.replace(placeholder, value)
    return [a[1:-1] if a.startswith("[") and a.endswith("]") and "=" in a else a
            for a in shlex.split(example)]


@pytest.fixture(scope="module")
def places(smoke_run, tmp_path_factory) -> dict[str, str]:
    """Placeholder -> a real value from the smoke run (a sweep dir of links to it)."""
    sweep = tmp_path_factory.mktemp("readme_sweep")
    (sweep / "0_seed=0").symlink_to(smoke_run.dir, target_is_directory=True)
    export = smoke_run.dir / "clients" / "client_0000" / "model"
    return {"<sweep dir>": str(sweep), "<simulate run>": str(smoke_run.dir), "<dir>": str(export),
            "<preset>": "tiny_olmoe", "<local dir or hub id>": str(export)}


def _combinations(args: list[str]) -> list[list[str]]:
    """Each run of ``args`` (one for a single run, the product of a ``-m`` sweep's lists)."""
    if "-m" not in args:
        return [args]
    parsed = OverridesParser.create().parse_overrides([a for a in args if a != "-m"])
    values = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
              if o.is_sweep_override() else [o.input_line] for o in parsed]
    return [list(c) for c in itertools.product(*values)]


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES)
def test_readme_example_parses_and_composes(example, places):
    # Prepare
    name, args = parse_command(_fill(example, places))
    command = COMMANDS[name]
    if command.positional and args and "=" not in args[0].split("/")[-1]:
        args = [f"{command.positional}={args[0]}", *args[1:]]

    groups = {p.name for p in conf_dir().iterdir() if p.is_dir()}

    # Execute / Assert: Hydra composes every run of the example, each key to its value
    for run in _combinations(args):
        cfg = compose(command.config, run)
        for override in run:
            key, _, value = override.partition("=")
            # a group override picks a file, not a value; Hydra's own keys are not in cfg
            if key not in groups and "/" not in key and not key.startswith("hydra."):
                got = OmegaConf.select(cfg, key)
                got = str(got).lower() if isinstance(got, bool) else str(got)  # YAML's true
                assert got == value.strip("'\""), override


RUNNABLE = [e for e in EXAMPLES if e.split()[0] not in ("simulate", "pretrain")
            and not any(path in e for path in NEEDS_USER_FILES)]


@pytest.mark.slow
@pytest.mark.parametrize("example", RUNNABLE)
def test_readme_example_runs(example, places, fedmoe_cache, tmp_path):
    # Prepare: the example as written, plus sizes, in a fresh interpreter and directory
    argv = _fill(example, places)
    name, _ = parse_command(argv)
    extra = [] if name == "report" else [f"hydra.run.dir={tmp_path / 'run'}"]
    env = os.environ | {"FEDMOE_CACHE": str(fedmoe_cache), "HF_HUB_OFFLINE": "1"}

    # Execute
    proc = subprocess.run([sys.executable, "-m", "fedmoe.cli", *argv, *SMOKE_SIZES[name],
                           *extra], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)

    # Assert: it ran, and wrote nothing into the model it read
    assert proc.returncode == 0, f"fedmoe {example}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    assert not (Path(places["<dir>"]) / "expert_store").exists()
    expected = {"inspect": "parameters", "edge generate": "[edge] policy=consistency budget=2x",
                "edge bench": "wrote", "prune": "held-out perplexity", "analyze": "tables:",
                "report": "| runs |",
                "export gguf": "equal the HF model's; its tokenizer gives the same"}[name]
    assert expected in proc.stdout
