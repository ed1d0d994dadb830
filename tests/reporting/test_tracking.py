"""W&B tracking (fedmoe/reporting/tracking.py): what a round logs, and an offline run read back
(tests/helpers/wandb_log.py)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from fedmoe.fl.bridge import compose
from fedmoe.reporting.figures import plot_communication
from fedmoe.reporting.tracking import (
    Tracker,
    build_tracker,
    client_table,
    round_metrics,
    summary_metrics,
    wandb_mode,
)
from tests.helpers import wandb_log
from tests.helpers.wandb_log import read_offline_run

MB = 2**20


def _entry(server_round: int, ppl: dict[str, float], up: int = 3 * MB, down: int = 6 * MB):
    return {"round": server_round, "train_loss": 5.0 - server_round, "eval_ppl": 99.0,
            "eval_ppl_mean": sum(ppl.values()) / len(ppl), "eval_ppl_worst": max(ppl.values()),
            "eval_ppl_by_client": ppl, "bytes_down": down, "bytes_up": up,
            "payload_bytes": MB, "wall_seconds": 1.5, "accepted": [0, 1], "rejected": {}}


def _eval(ppl: float, kept: list[int] | None = None) -> dict:
    metrics = {"num-examples": 16, "client-id": 0, "eval_loss": 4.0, "eval_ppl": ppl,
               "base_ppl": 200.0, "routed_mb": 6.0, "routed_mb_before": 12.0}
    return metrics | {f"experts_kept.{layer}": n for layer, n in enumerate(kept or [])}


def _results(rounds: list[dict]) -> dict:
    last = rounds[-1]["eval_ppl_by_client"]
    return {
        "config": {"seed": 0}, "strategy": {"name": "fedmoe"}, "payload_bytes": MB,
        "trainable_bytes": 10 * MB, "rounds": rounds, "wall_seconds": 3.0,
        "clients": {c: {"final_ppl": p, "base_ppl": 200.0, "examples": 16, "bytes_sent": 6 * MB,
                        "bytes_received": 12 * MB, "rounds_trained": 2,
                        "routed_expert_mb": {"before": 12.0, "after": 6.0},
                        "experts_kept": {"0": 8, "1": 8}} for c, p in last.items()},
    }


def test_round_metrics_hold_client_perplexities_bytes_and_pruning():
    # Prepare
    cumulative = {"bytes_down": 0, "bytes_up": 0}
    first = _entry(1, {"0": 150.0, "1": 250.0})
    by_client = {0: _eval(150.0, kept=[8, 6]), 1: _eval(250.0, kept=[8, 8])}
    # Execute
    round_metrics(first, cumulative)
    row = round_metrics(_entry(2, {"0": 100.0, "1": 300.0}), cumulative,
                        {"train_loss": 3.0, "aux_loss": 0.5, "num-examples": 64}, by_client)
    # Assert
    assert row["round"] == 2 and row["train/loss"] == 3.0 and row["train/aux_loss"] == 0.5
    assert row["ppl/mean"] == 200.0 and row["ppl/worst"] == 300.0 and row["ppl/best"] == 100.0
    assert row["ppl/client_0"] == 100.0 and row["ppl/client_1"] == 300.0
    assert row["ppl/weighted"] == 99.0 and row["ppl/base_mean"] == 200.0
    assert row["comm/bytes_up"] == 3 * MB and row["comm/cum_bytes_up"] == 6 * MB
    assert row["comm/cum_bytes"] == 18 * MB
    assert row["prune/experts_kept/client_0"] == 14 and row["prune/experts_kept_mean"] == 15
    assert row["prune/routed_mb_mean"] == 6.0 and row["prune/routed_mb_before_mean"] == 12.0
    assert row["eval/loss_mean"] == 4.0
    assert "train/num-examples" not in row and not any("client-id" in k for k in row)


def test_round_metrics_log_round_keys_added_later():
    row = round_metrics(_entry(1, {"0": 1.0}) | {"routed_mb_total": 24.0, "note": "x"},
                        {"bytes_down": 0, "bytes_up": 0})
    assert row["prune/routed_mb_total"] == 24.0 and "eval/note" not in row


def test_summary_and_client_table():
    results = _results([_entry(1, {"0": 150.0, "1": 250.0})])
    summary = summary_metrics(results)
    assert summary["final/ppl_mean"] == 200.0 and summary["final/ppl_worst"] == 250.0
    assert summary["final/clients_improved"] == 1 and summary["num_rounds"] == 1
    columns, rows = client_table(results)
    assert columns[0] == "client" and [r[0] for r in rows] == [0, 1]
    row = dict(zip(columns, rows[1], strict=True))
    assert row["ppl_ratio"] == 250.0 / 200.0 and row["experts_kept"] == 16
    assert row["routed_expert_mb.after"] == 6.0 and row["experts_kept.1"] == 8


@pytest.mark.parametrize(("mode", "env", "logged_in", "expected"), [
    ("offline", {"WANDB_MODE": "online"}, True, "offline"),
    ("disabled", {}, True, "disabled"),
    ("auto", {"WANDB_MODE": "offline"}, True, "offline"),
    ("auto", {"WANDB_API_KEY": "x" * 40}, False, "online"),
    ("auto", {}, True, "online"),
    ("auto", {}, False, "offline"),
])
def test_wandb_mode_is_offline_unless_logged_in(mode, env, logged_in, expected, monkeypatch):
    import wandb

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(wandb, "login", lambda **kwargs: logged_in)
    assert wandb_mode(mode) == expected


def test_logger_none_and_disabled_track_nothing():
    assert type(build_tracker(compose([]))) is Tracker
    assert type(build_tracker(compose(["logger=wandb", "logger.mode=disabled"]))) is Tracker


def test_an_offline_run_holds_config_history_table_and_plots(tmp_path, monkeypatch):
    # Prepare: a config as the ServerApp sees it, two rounds of results
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = OmegaConf.merge(compose(["logger=wandb", "logger.group=sweep-a"]),
                          {"run_dir": str(tmp_path)})
    rounds = [_entry(1, {"0": 150.0, "1": 250.0}), _entry(2, {"0": 140.0, "1": 230.0})]
    plot = plot_communication(rounds, tmp_path / "plot.png")
    # Execute
    with build_tracker(cfg) as tracker:
        for entry in rounds:
            tracker.log_round(entry, {"train_loss": entry["train_loss"]},
                              {0: _eval(entry["eval_ppl_by_client"]["0"])})
        tracker.finish(_results(rounds), {"ppl": plot})
    run = read_offline_run(tmp_path)
    # Assert: one history row per round, the values logged, config and summary
    assert run.group == "sweep-a" and run.name == tmp_path.name
    assert [row["round"] for row in run.history] == [1, 2]
    assert [row["ppl/client_1"] for row in run.history] == [250.0, 230.0]
    assert run.history[-1]["comm/cum_bytes_down"] == 12 * MB
    assert run.history[-1]["tables/clients/nrows"] == 2  # W&B flattens media dicts
    assert run.history[-1]["plots/ppl/_type"] == "image-file"
    assert run.config["strategy"]["name"] == "fedmoe" and run.config["run_dir"] == str(tmp_path)
    assert run.summary["final/ppl_mean"] == 185.0 and run.summary["num_rounds"] == 2
    assert list((run.path / "files" / "media" / "images").rglob("*.png"))


def test_read_offline_run_reassembles_records_across_blocks():
    # Prepare: a log whose second record spans the 32 KiB block boundary
    import struct

    small, big = b"a" * 10, b"b" * 40000
    head = b":W&B" + b"\xe1\xbe\x00"
    data = head + struct.pack("<IHB", 0, len(small), 1) + small
    first = wandb_log._BLOCK - len(data) - 7
    data += struct.pack("<IHB", 0, first, 2) + big[:first]
    data += struct.pack("<IHB", 0, len(big) - first, 4) + big[first:]
    # Execute / Assert
    assert list(wandb_log._log_records(data)) == [small, big]

