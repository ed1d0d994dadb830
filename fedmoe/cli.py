"""`fedmoe <command> [hydra overrides]`: each command is a Hydra app with its own primary
config in ``conf/`` (:class:`Command` names it; ``fedmoe edge bench`` uses ``edge_bench.yaml``).

``fedmoe --help`` lists the commands, ``fedmoe <command> --help`` prints the command's config
groups and composed config (``--hydra-help`` is Hydra's own), ``fedmoe --version`` the version.
Errors a user can fix (a bad config, a missing file or model) end in one line, not a traceback.
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from fedmoe.compose import compose, conf_dir, hydra_value


@dataclass(frozen=True)
class Command:
    """One ``fedmoe`` command.

    Attributes
    ----------
    target : str
        ``"module:function"``; the function takes the composed DictConfig.
    config : str
        Its primary config, ``conf/<config>.yaml``.
    summary : str
        One line for ``fedmoe --help``.
    positional : str, optional
        The key a first positional argument sets (``fedmoe report <dir>``: ``sweep_dir``).
    """

    target: str
    config: str
    summary: str
    positional: str | None = None


# In the order a newcomer meets them; two-word names (`edge generate`) are typed as such.
COMMANDS: dict[str, Command] = {
    "pretrain": Command("fedmoe.train.pretrain:main", "pretrain",
                        "train the tokenizer and the tiny base model (cached, reused)"),
    "inspect": Command("fedmoe.moe.inspect:main", "inspect",
                       "parameter roles (router, shared/routed experts) of a model preset"),
    "simulate": Command("fedmoe.fl.simulation:main", "simulate",
                        "federated training of N virtual clients (Flower Simulation Engine)"),
    "prune": Command("fedmoe.prune.cli:main", "prune_model",
                     "prune one model's routed experts and export it as an HF checkpoint"),
    "edge generate": Command("fedmoe.edge.cli:generate", "edge_generate",
                             "stream a generation with routed experts offloaded to disk"),
    "edge bench": Command("fedmoe.edge.cli:bench", "edge_bench",
                          "in-memory vs offloaded inference: tokens/s, hit rate, memory"),
    "export gguf": Command("fedmoe.llamacpp.cli:main", "export_gguf",
                           "write an export as a GGUF file for llama.cpp (f16, q8_0, q4_k_m)"),
    "analyze": Command("fedmoe.analysis.cli:main", "analyze",
                       "routing consistency, specialization, retrieval, attribution, cost"),
    "report": Command("fedmoe.reporting.sweep:main", "report",
                      "one table (mean ± std over seeds) and plots of a sweep's runs",
                      positional="sweep_dir"),
}

EXAMPLES = """examples:
  fedmoe simulate                          # the default experiment (conf/experiment/demo.yaml)
  fedmoe simulate experiment=smoke fl.num_rounds=3
  fedmoe simulate -m strategy=fedmoe,fedavg,local seed=0,1,2 logger=wandb
  fedmoe report multirun/simulate/<date>_<time>   # the sweep's directory
  fedmoe inspect model=tiny_olmoe
  fedmoe export gguf model_dir=<export> quant=q8_0   # one GGUF file for llama.cpp
  fedmoe <command> --help                  # its config groups and options"""

HELP_FLAGS = {"-h", "--help"}


def usage() -> str:
    """What ``fedmoe --help`` prints: every command with its one line."""
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()]
    return ("usage: fedmoe <command> [hydra overrides ...]\n"
            "       fedmoe <command> --help | fedmoe --version\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n" + EXAMPLES)


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``fedmoe <command> ...`` to the command's Hydra app."""
    import os

    # Progress bars of our own (rich/tqdm) stay; the libraries' per-file bars go.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in HELP_FLAGS | {"help"}:
        print(usage())
        return
    if argv[0] == "--version":
        print(f"fedmoe {_version()}")
        return
    name, args = parse_command(argv)
    command = COMMANDS[name]
    if HELP_FLAGS & set(args):
        print(command_help(name, [a for a in args if a not in HELP_FLAGS]))
        return
    _run(name, command, args)


def parse_command(argv: list[str]) -> tuple[str, list[str]]:
    """The command ``argv`` names (one or two words) and the arguments after it; exits with
    the commands there are when it names none."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            return name, argv[words:]
    family = [n for n in COMMANDS if n.startswith(f"{argv[0]} ")]
    if family:  # `fedmoe edge`, `fedmoe edge --help`, `fedmoe edge typo`
        listing = "\n".join(f"  {n:<14} {COMMANDS[n].summary}" for n in family)
        text = f"usage: fedmoe {argv[0]} <{'|'.join(n.split()[1] for n in family)}> ...\n" + listing
        if len(argv) > 1 and argv[1] not in HELP_FLAGS:
            sys.exit(f"fedmoe: unknown command {' '.join(argv[:2])!r}\n{text}")
        print(text)
        sys.exit(0)
    sys.exit(f"fedmoe: unknown command {argv[0]!r}; one of: {', '.join(COMMANDS)} "
             "(fedmoe --help)")


def _run(name: str, command: Command, args: list[str]) -> None:
    import hydra

    import fedmoe.config  # noqa: F401  (schemas and the fedmoe.dirname resolver, for Hydra)

    module, func = command.target.split(":")
    try:
        target = getattr(import_module(module), func)
    except ModuleNotFoundError as error:
        _exit_if_extra_missing(error, name)
        raise
    task = _user_errors(target, name)
    if command.positional:
        key = command.positional
        if args and _is_positional(args[0]):
            args[0] = f"{key}={hydra_value(args[0])}"
        elif not any(a.startswith(f"{key}=") for a in args):
            sys.exit(f"usage: fedmoe {name} <{key.replace('_', ' ')}> [hydra overrides ...]")
    sys.argv = [f"fedmoe {name}", *args]
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=command.config)(task)()


def _user_errors(task, name: str):
    """``task`` preceded by the schema check; a bad config, an error that names the missing
    file or model, or an optional package that is not installed, exits with its message on
    one line."""
    import functools
    import os

    from fedmoe.config import ConfigError, validate

    @functools.wraps(task)  # keeps __module__, which Hydra uses for the job name
    def run(cfg):
        try:
            validate(cfg)  # every command: the schema check comes before any work
            return task(cfg)
        except ModuleNotFoundError as error:
            _exit_if_extra_missing(error, name)
            raise
        except (ConfigError, FileNotFoundError, NotADirectoryError) as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            raise SystemExit(f"fedmoe {name}: {error}") from None

    return run


def _exit_if_extra_missing(error: ModuleNotFoundError, name: str) -> None:
    """Exit with one line naming the extra when ``error`` is an optional package missing
    (``fedmoe simulate`` without Ray: the ``sim`` extra); return for any other module."""
    import os

    from fedmoe.extras import as_missing_extra

    missing = as_missing_extra(error, f"fedmoe {name}")
    if missing is not None and os.environ.get("HYDRA_FULL_ERROR") != "1":
        raise SystemExit(str(missing)) from None


def command_help(name: str, overrides: list[str]) -> str:
    """``fedmoe <name> --help``: the command's line, usage, its config groups with their
    options (default first) and its composed config (interpolations unresolved)."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    command = COMMANDS[name]
    try:
        cfg = compose(command.config, overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as error:
        sys.exit(f"fedmoe {name} --help: {str(error).splitlines()[0]}")
    # Hydra records the choices last-first; the defaults list's order reads better.
    choices = {g: o for g, o in reversed(cfg.hydra.runtime.choices.items())
               if not g.startswith("hydra/")}
    first = f"<{command.positional.replace('_', ' ')}> " if command.positional else ""
    lines = [f"fedmoe {name}: {command.summary}", "",
             f"usage: fedmoe {name} {first}[key=value ...]   (one run)",
             f"       fedmoe {name} {first}-m key=a,b ...    (a sweep: one run per value)", ""]
    if choices:
        lines.append("config groups (group=option; the one in use first):")
        width = max(len(g) for g in choices)
        for group, chosen in choices.items():
            options = _group_options(group.split("@")[0])
            ordered = ", ".join(str(o) for o in [chosen, *(o for o in options if o != chosen)])
            lines += textwrap.wrap(ordered, 96, initial_indent=f"  {group:<{width}}  ",
                                   subsequent_indent=" " * (width + 4))
        lines.append("")
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    lines += ["config (set any key: key=value; `--cfg job` prints it resolved):",
              OmegaConf.to_yaml(job, resolve=False).rstrip(), "",
              f"Hydra's own options: fedmoe {name} --hydra-help"]
    return "\n".join(lines)


def _group_options(group: str) -> list[str]:
    root = conf_dir() / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def _version() -> str:
    from fedmoe import __version__

    return __version__


def _is_positional(arg: str) -> bool:
    # A sweep's job directories have `=` in their names (`0_seed=0,strategy=fedmoe`).
    return not arg.startswith("-") and ("=" not in arg or Path(arg).exists())


if __name__ == "__main__":
    main()
