"""`fedmoe <command> [hydra overrides]`: each command is a Hydra app with its own primary
config in ``conf/`` (``conf/<command>.yaml``; ``fedmoe edge bench`` uses ``edge_bench.yaml``;
``CONFIG_NAMES`` renames the few whose name is taken by a config group).
"""

from __future__ import annotations

import sys
from importlib import import_module
from pathlib import Path

# command -> "module:function"; the function takes the composed DictConfig.
COMMANDS: dict[str, str] = {
    "pretrain": "fedmoe.task.pretrain:main",
    "inspect": "fedmoe.moe.inspect:main",
    "simulate": "fedmoe.fl.simulation:main",
    "analyze": "fedmoe.analysis.cli:main",
    "edge_generate": "fedmoe.edge.cli:generate",
    "edge_bench": "fedmoe.edge.cli:bench",
    "prune": "fedmoe.prune.cli:main",
    "report": "fedmoe.report:main",
}
# Commands taking one positional argument: `fedmoe report <dir>` means `sweep_dir=<dir>`.
POSITIONAL = {"report": "sweep_dir"}
# command -> primary config name, where ``conf/<command>/`` is a config group already.
CONFIG_NAMES: dict[str, str] = {"prune": "prune_model"}

USAGE = """usage: fedmoe <command> [hydra overrides ...]

commands:
  pretrain   train the tokenizer and the tiny base model on the embedded corpus
  inspect    print the parameter-role table of a model preset (model=<preset>)
  simulate   federated training of many clients with Flower's Simulation Engine
  prune      prune one model's routed experts (prune.score, prune.keep) and export it
  report     one table (mean ± std over seeds) and plots of a sweep's runs

examples:
  fedmoe simulate                          # the default experiment (conf/experiment/demo.yaml)
  fedmoe simulate experiment=smoke fl.num_rounds=3
  fedmoe simulate -m strategy=fedmoe,fedavg,local seed=0,1,2 logger=wandb
  fedmoe report multirun/simulate/<date>_<time>   # the sweep's directory
  fedmoe inspect model=tiny_olmoe
  fedmoe <command> --help                  # Hydra's help: config groups and values
"""


def conf_dir() -> Path:
    """``conf/`` inside an installed wheel, else the repository's top-level ``conf/``."""
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf"


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``fedmoe <command> ...`` to the command's Hydra app."""
    import os

    import hydra

    import fedmoe.config  # noqa: F401  (schemas and the fedmoe.dirname resolver, for Hydra)

    # Progress bars of our own (rich/tqdm) stay; the libraries' per-file bars go.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return
    command = argv[0]
    # Two-word commands (`fedmoe edge bench`) map to `edge_bench`.
    if len(argv) > 1 and f"{command}_{argv[1]}" in COMMANDS:
        command, argv = f"{command}_{argv[1]}", argv[1:]
    if command not in COMMANDS:
        sys.exit(f"fedmoe: unknown command {command!r}; one of: {', '.join(sorted(COMMANDS))}")
    module, func = COMMANDS[command].split(":")
    # Every command's config is checked against fedmoe/config.py's schemas before it runs.
    task = _validated(getattr(import_module(module), func), command.replace("_", " "))
    args = argv[1:]
    if command in POSITIONAL:
        key = POSITIONAL[command]
        if args and _is_positional(args[0]):
            args[0] = f"{key}={hydra_value(args[0])}"
        elif not any(a.startswith(f"{key}=") for a in args):
            sys.exit(f"usage: fedmoe {command} <{key.replace('_', ' ')}> [hydra overrides ...]")
    sys.argv = [f"fedmoe {command}", *args]
    config_name = CONFIG_NAMES.get(command, command)
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)(task)()


def _validated(task, command: str):
    """``task`` preceded by the schema check; a bad config exits with its message only."""
    import functools

    from fedmoe.config import ConfigError, validate

    @functools.wraps(task)  # keeps __module__, which Hydra uses for the job name
    def run(cfg):
        try:
            validate(cfg)
        except ConfigError as error:
            raise SystemExit(f"fedmoe {command}: {error}") from None
        return task(cfg)

    return run


def _is_positional(arg: str) -> bool:
    # A sweep's job directories have `=` in their names (`0_seed=0,strategy=fedmoe`).
    return not arg.startswith("-") and ("=" not in arg or Path(arg).exists())


def hydra_value(value: object) -> str:
    """``value`` as a Hydra override value that reads back as the same string: as is when
    it does, else quoted (a sweep's job directories hold ``=`` and ``,``, which Hydra would
    read as a key or a sweep list)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    text = str(value)
    try:
        if OverridesParser.create().parse_override(f"k={text}").value() == text:
            return text
    except Exception:  # a parse error: quote it
        pass
    return "'" + text.replace("'", "\\'") + "'"

if __name__ == "__main__":
    main()
