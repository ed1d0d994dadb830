"""Optional packages and the extra of ``pyproject.toml`` that brings each.

The base package is the slim device install (a SuperNode's ClientApp: train and evaluate on
the device's own file); the rest comes as extras. A command that reaches an optional package
that is not installed ends in one line naming the extra, not in a traceback.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

# Top-level module fedmoe imports -> the extra that installs it.
EXTRA_OF: dict[str, str] = {
    "ray": "sim",
    "datasets": "sim",
    "flwr_datasets": "sim",
    "pyarrow": "sim",
    "pandas": "sim",
    "wandb": "track",
    "matplotlib": "track",
    "gguf": "gguf",
    "llama_cpp": "gguf",
    "bitsandbytes": "qlora",
}
EXTRA_NAMES: dict[str, str] = {"sim": "simulation", "track": "tracking", "scale": "scale-out",
                               "gguf": "GGUF (llama.cpp)", "qlora": "QLoRA (bitsandbytes)",
                               "dev": "development"}


class MissingExtra(ModuleNotFoundError):
    """An optional package is not installed; the message names the extra that brings it."""


def missing_extra_message(module: str, needed_by: str) -> str:
    """``"<needed_by> needs the simulation extra (ray is not installed): pip install ..."``."""
    top = module.split(".")[0]
    extra = EXTRA_OF[top]
    return (f"{needed_by} needs the {EXTRA_NAMES[extra]} extra ({top} is not installed): "
            f"pip install 'fedmoe[{extra}]'")


def as_missing_extra(error: ModuleNotFoundError, needed_by: str) -> MissingExtra | None:
    """``error`` as a :class:`MissingExtra` when the module it missed comes with an extra;
    ``None`` for any other module (a broken install, a typo: the traceback should show)."""
    top = (error.name or "").split(".")[0]
    if top not in EXTRA_OF:
        return None
    return MissingExtra(missing_extra_message(top, needed_by), name=error.name)


def require(*modules: str, needed_by: str) -> None:
    """Raise :class:`MissingExtra` unless every one of ``modules`` can be imported (looked up,
    not imported: a command checks before it starts any work)."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(missing_extra_message(module, needed_by), name=module)


@contextmanager
def extra_needed(needed_by: str) -> Iterator[None]:
    """Inside the block, an optional package that is missing raises :class:`MissingExtra`
    naming its extra; any other missing module raises as it is."""
    try:
        yield
    except ModuleNotFoundError as error:
        missing = as_missing_extra(error, needed_by)
        if missing is None:
            raise
        raise missing from None
