"""Server checkpoints: the aggregated tensors after each completed round, and resuming from them.

After round ``n`` the ServerApp writes ``<run_dir>/server_state/round_<n>.safetensors`` (the
global aggregated tensors) and then ``round_<n>.json`` (round, sha256 of the tensors, the
strategy's round log), each atomically; the json, written last, marks the checkpoint
complete. A ServerApp started again on the same ``run_dir`` (a SuperLink or ServerApp that
crashed, then ``flwr run`` again) resumes after the newest complete checkpoint instead of from
the base model: ``fl.resume`` null resumes when there is one, true requires one, false
ignores them. Personal experts need nothing here: they live on the clients' disks.

A server optimizer's moments (``strategy.server_opt``: FedAdam/FedYogi's ``m_t`` and
``v_t``) go to ``round_<n>.optimizer.safetensors`` (sha256 in the json too) and are restored
with the tensors, so a resumed run takes the same server steps as one never interrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save_file

from fedmoe.artifacts import atomic_write
from fedmoe.fl.strategy import RoundLog

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "server_state"
_MOMENTS = ("m_t", "v_t")  # flwr.serverapp.strategy.FedOpt's server-optimizer state
_SEP = "::"
# RoundLog fields keyed by client id (JSON turns the int keys into strings).
_BY_CLIENT = ("bytes_up_by_client", "rejected", "eval_by_client", "eval_rejected")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def save_checkpoint(run_dir: str | Path, server_round: int, arrays: ArrayRecord,
                    history: dict[int, RoundLog], keep: int = 0,
                    optimizer: dict[str, dict[str, np.ndarray]] | None = None) -> Path:
    """Write the checkpoint of a completed round; keep the newest ``keep`` (0: all).

    ``optimizer`` is the server optimizer's state (:func:`optimizer_state`), if any.

    Returns
    -------
    Path
        The checkpoint's json file.
    """
    directory = checkpoint_dir(run_dir)
    tensors = {k: np.ascontiguousarray(a.numpy()) for k, a in arrays.items()}
    tensors_path = directory / f"round_{server_round}.safetensors"
    atomic_write(tensors_path, lambda tmp: save_file(tensors, tmp))
    meta = {
        "round": server_round,
        "tensors": tensors_path.name,
        "sha256": _sha256(tensors_path),
        "saved_at": time.time(),
        "history": {str(r): dataclasses.asdict(log) for r, log in sorted(history.items())},
    }
    if optimizer:
        moments = {f"{name}{_SEP}{key}": np.ascontiguousarray(value)
                   for name, state in optimizer.items() for key, value in state.items()}
        opt_path = directory / f"round_{server_round}.optimizer.safetensors"
        atomic_write(opt_path, lambda tmp: save_file(moments, tmp))
        meta["optimizer"] = {"tensors": opt_path.name, "sha256": _sha256(opt_path)}
    json_path = directory / f"round_{server_round}.json"
    text = json.dumps(meta, indent=1, default=str)
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))
    if keep > 0:
        for old in _rounds(directory)[:-keep]:
            # json first: the round stops counting
            for suffix in (".json", ".safetensors", ".optimizer.safetensors"):
                (directory / f"round_{old}{suffix}").unlink(missing_ok=True)
    return json_path


def load_checkpoint(run_dir: str | Path) -> tuple[int, ArrayRecord, dict[int, RoundLog]] | None:
    """The newest complete, intact checkpoint of ``run_dir``, or ``None``.

    A checkpoint whose tensors are missing or do not match their recorded sha256 is skipped
    with a warning naming the file, and the one before it is tried.
    """
    directory = checkpoint_dir(run_dir)
    for server_round in reversed(_rounds(directory)):
        json_path = directory / f"round_{server_round}.json"
        try:
            meta = json.loads(json_path.read_text())
            tensors_path = directory / meta["tensors"]
            if _sha256(tensors_path) != meta["sha256"]:
                raise ValueError(f"{tensors_path} does not match the sha256 in {json_path}")
            tensors = load_file(tensors_path)
        except (OSError, ValueError, KeyError) as e:
            logger.warning("skipping server checkpoint %s: %s", json_path, e)
            continue
        arrays = ArrayRecord({k: Array(v) for k, v in tensors.items()})
        return int(meta["round"]), arrays, _history(meta["history"])
    return None


def optimizer_state(strategy) -> dict[str, dict[str, np.ndarray]]:
    """The moments of a server optimizer (Flower's FedOpt family: ``m_t``, ``v_t``) of
    ``strategy`` or of the strategy a wrapper (DP) holds; empty for plain averaging."""
    inner = getattr(strategy, "strategy", strategy)
    return {name: dict(value) for name in _MOMENTS
            if (value := getattr(inner, name, None))}


def restore_optimizer(strategy, run_dir: str | Path, server_round: int) -> bool:
    """Load the server optimizer's moments saved with round ``server_round`` into
    ``strategy``; False when that checkpoint holds none (a plain-averaging run).

    Raises
    ------
    ValueError
        The strategy has a server optimizer but the file is missing or corrupt (naming it),
        or the checkpoint holds moments a strategy without one cannot use.
    """
    json_path = checkpoint_dir(run_dir) / f"round_{server_round}.json"
    entry = json.loads(json_path.read_text()).get("optimizer")
    inner = getattr(strategy, "strategy", strategy)
    has_opt = all(hasattr(inner, name) for name in _MOMENTS)
    if entry is None:
        if has_opt:
            logger.warning("server checkpoint %s holds no server-optimizer moments: they "
                           "start from zero", json_path)
        return False
    if not has_opt:
        raise ValueError(f"server checkpoint {json_path} holds server-optimizer moments but "
                         "strategy.server_opt is off; set it as in the run that wrote them "
                         "or use fl.resume=false")
    path = json_path.parent / entry["tensors"]
    if not path.is_file() or _sha256(path) != entry["sha256"]:
        raise ValueError(f"{path} is missing or does not match the sha256 in {json_path}")
    for key, value in load_file(path).items():
        name, tensor = key.split(_SEP, 1)
        state = getattr(inner, name) or {}
        state[tensor] = value
        setattr(inner, name, state)
    return True


def resume(cfg, arrays: ArrayRecord) -> tuple[int, ArrayRecord, dict[int, RoundLog]]:
    """Where a run starts: ``(rounds done, global tensors, round log so far)``.

    Parameters
    ----------
    cfg : DictConfig
        The run's config (``run_dir``, ``fl.resume``).
    arrays : ArrayRecord
        The base model's aggregated tensors (the start of a new run); a checkpoint must hold
        the same keys, shapes and dtypes.

    Raises
    ------
    FileNotFoundError
        ``fl.resume=true`` and no complete checkpoint in ``run_dir``.
    ValueError
        The checkpoint holds other tensors than this run aggregates (another model or
        ``fl.aggregate``), naming the file and the difference.
    """
    mode = cfg.fl.get("resume")
    if mode is False:
        return 0, arrays, {}
    found = load_checkpoint(cfg.run_dir)
    if found is None:
        if mode:
            raise FileNotFoundError(f"fl.resume=true but {checkpoint_dir(cfg.run_dir)} holds "
                                    "no complete checkpoint (round_<n>.json + .safetensors)")
        return 0, arrays, {}
    done, saved, history = found
    _check_same_tensors(saved, arrays, checkpoint_dir(cfg.run_dir) / f"round_{done}.json")
    logger.warning("resuming from the checkpoint of round %d in %s", done,
                   checkpoint_dir(cfg.run_dir))
    return done, saved, history


def _check_same_tensors(saved: ArrayRecord, arrays: ArrayRecord, path: Path) -> None:
    if set(saved) != set(arrays):
        raise ValueError(
            f"server checkpoint {path} holds other tensors than this run aggregates "
            f"(missing {sorted(set(arrays) - set(saved))[:3]}, extra "
            f"{sorted(set(saved) - set(arrays))[:3]}): another model or fl.aggregate; use a "
            "new run_dir or fl.resume=false")
    for key, array in arrays.items():
        have = saved[key]
        if tuple(have.shape) != tuple(array.shape) or have.dtype != array.dtype:
            raise ValueError(f"server checkpoint {path}: '{key}' is {have.dtype}{list(have.shape)}"
                             f", this run's is {array.dtype}{list(array.shape)}")


def _rounds(directory: Path) -> list[int]:
    """Rounds with a checkpoint json, ascending."""
    rounds = []
    for path in directory.glob("round_*.json"):
        try:
            rounds.append(int(path.stem.removeprefix("round_")))
        except ValueError:
            continue
    return sorted(rounds)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _history(data: dict) -> dict[int, RoundLog]:
    history = {}
    for server_round, fields in data.items():
        fields = dict(fields)
        for key in _BY_CLIENT:
            fields[key] = {int(c): v for c, v in fields.get(key, {}).items()}
        fields["accepted"] = [int(c) for c in fields.get("accepted", [])]
        known = {f.name for f in dataclasses.fields(RoundLog)}
        history[int(server_round)] = RoundLog(**{k: v for k, v in fields.items() if k in known})
    return history
