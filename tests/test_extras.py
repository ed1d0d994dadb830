"""Optional packages: a command that reaches one that is missing ends in one line naming the
extra that brings it (the slim venv of tests/deploy/test_slim_install.py runs the real ones)."""

from __future__ import annotations

import sys

import pytest

from fedmoe import extras
from fedmoe.checkpoints import resolve_base_model
from fedmoe.cli import _user_errors
from fedmoe.fl.bridge import compose


def test_a_missing_optional_package_names_its_extra():
    error = ModuleNotFoundError("No module named 'ray'", name="ray")
    missing = extras.as_missing_extra(error, "fedmoe simulate")
    assert str(missing) == ("fedmoe simulate needs the simulation extra (ray is not "
                            "installed): pip install 'fedmoe[sim]'")
    assert str(extras.as_missing_extra(ModuleNotFoundError(name="matplotlib.pyplot"), "x")) \
        .endswith("needs the tracking extra (matplotlib is not installed): "
                  "pip install 'fedmoe[track]'")
    # Any other module is a broken install or a typo: its traceback should show
    assert extras.as_missing_extra(ModuleNotFoundError(name="torch"), "x") is None


def test_require_looks_up_without_importing(monkeypatch):
    monkeypatch.setattr(extras.importlib.util, "find_spec",
                        lambda name: None if name == "datasets" else object())
    extras.require("ray", needed_by="fedmoe simulate")
    with pytest.raises(extras.MissingExtra, match=r"fedmoe simulate needs the simulation "
                                                  r"extra \(datasets is not installed\)"):
        extras.require("ray", "datasets", needed_by="fedmoe simulate")


def test_a_command_missing_an_extra_exits_with_one_line(monkeypatch):
    # Prepare: a task that reaches W&B, which is not installed
    def task(cfg):
        raise ModuleNotFoundError("No module named 'wandb'", name="wandb")

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run = _user_errors(task, "simulate")

    # Execute / Assert
    with pytest.raises(SystemExit) as exit_:
        run(compose(["experiment=smoke"]))
    assert str(exit_.value.code) == ("fedmoe simulate needs the tracking extra (wandb is not "
                                     "installed): pip install 'fedmoe[track]'")


def test_a_device_without_a_base_model_and_without_datasets_is_told_the_extra(monkeypatch):
    # Prepare: no base model given, and no datasets to pretrain one with (the slim install)
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.delitem(sys.modules, "fedmoe.train.pretrain", raising=False)
    cfg = compose(["experiment=smoke"])

    # Execute / Assert
    with pytest.raises(extras.MissingExtra, match=r"pretraining a base model \(none given: "
                       r"model.path, fl.base_model, or a device's node config base-model\) "
                       r"needs the simulation extra \(datasets is not installed\)"):
        resolve_base_model(cfg)
