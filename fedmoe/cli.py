"""`fedmoe <command> [hydra overrides]`: each command is a Hydra app with its own primary
config in ``conf/`` (``conf/<command>.yaml``; ``fedmoe edge bench`` uses ``edge_bench.yaml``).
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
}

USAGE = """usage: fedmoe <command> [hydra overrides ...]

commands:
  pretrain   train the tokenizer and the tiny base model on the embedded corpus
  inspect    print the parameter-role table of a model preset (model=<preset>)
  simulate   federated training of many clients with Flower's Simulation Engine

examples:
  fedmoe simulate                          # the default experiment (conf/experiment/demo.yaml)
  fedmoe simulate experiment=smoke fl.num_rounds=3
  fedmoe inspect model=tiny_olmoe
  fedmoe <command> --help                  # Hydra's help: config groups and values
"""


def conf_dir() -> Path:
    """``conf/`` inside an installed wheel, else the repository's top-level ``conf/``."""
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf"


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``fedmoe <command> ...`` to the command's Hydra app."""
    import hydra

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
    task = getattr(import_module(module), func)
    sys.argv = [f"fedmoe {command}", *argv[1:]]
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=command)(task)()


if __name__ == "__main__":
    main()
