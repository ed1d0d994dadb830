"""The ServerApp's deployment rules without processes: checkpoints and resuming, rounds counted
from a checkpoint, the minimum of replies, silent nodes, and central DP around FedMoE."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from omegaconf import OmegaConf

from fedmoe.fl import checkpoint
from fedmoe.fl.rounds import RoundRules
from fedmoe.fl.server_app import _deployed
from fedmoe.fl.strategy import FedMoE, RoundLog
from tests.helpers.records import ROUTER

pytestmark = pytest.mark.usefixtures("serverapp_identity")


def arrays(value: float = 0.0, shape=(4, 2)) -> ArrayRecord:
    return ArrayRecord({ROUTER: Array(np.full(shape, value, np.float32))})


def cfg(run_dir, **fl):
    base = {"resume": None, "min_replies": 1, "round_timeout": 30, "min_train_nodes": 2,
            "keep_checkpoints": 0}
    return OmegaConf.create({"run_dir": str(run_dir), "fl": base | fl,
                             "strategy": {"dp": {"enabled": False}}})


def history() -> dict[int, RoundLog]:
    return {1: RoundLog(accepted=[0, 3], rejected={7: "nan"}, bytes_up_by_client={0: 8},
                        eval_by_client={3: {"eval_ppl": 9.5}})}


# --- checkpoints --------------------------------------------------------------------------


def test_checkpoint_round_trip_keeps_tensors_and_round_log(tmp_path):
    # Execute
    checkpoint.save_checkpoint(tmp_path, 1, arrays(1.5), history())
    done, saved, log = checkpoint.load_checkpoint(tmp_path)
    # Assert: the tensors bit for bit; the log with its int client ids back
    assert done == 1
    np.testing.assert_array_equal(saved[ROUTER].numpy(), np.full((4, 2), 1.5, np.float32))
    assert log[1].accepted == [0, 3] and log[1].rejected == {7: "nan"}
    assert log[1].eval_by_client == {3: {"eval_ppl": 9.5}}
    assert log[1].bytes_up_by_client == {0: 8}


def test_resume_takes_the_newest_intact_checkpoint(tmp_path, caplog):
    # Prepare: round 3's tensors were damaged after its json was written
    for r in (1, 2, 3):
        checkpoint.save_checkpoint(tmp_path, r, arrays(float(r)), {})
    damaged = checkpoint.checkpoint_dir(tmp_path) / "round_3.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedmoe.fl.checkpoint"):
        done, saved, _ = checkpoint.resume(cfg(tmp_path), arrays())
    # Assert
    assert done == 2 and saved[ROUTER].numpy()[0, 0] == 2.0
    assert "round_3" in caplog.text and "sha256" in caplog.text


def test_a_round_without_its_json_does_not_count(tmp_path):
    # A crash between the tensors and the json of round 2
    checkpoint.save_checkpoint(tmp_path, 1, arrays(1.0), {})
    checkpoint.save_checkpoint(tmp_path, 2, arrays(2.0), {})
    (checkpoint.checkpoint_dir(tmp_path) / "round_2.json").unlink()
    assert checkpoint.load_checkpoint(tmp_path)[0] == 1


def test_keep_prunes_old_checkpoints(tmp_path):
    for r in (1, 2, 3):
        checkpoint.save_checkpoint(tmp_path, r, arrays(), {}, keep=2)
    names = sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir())
    assert names == ["round_2.json", "round_2.safetensors", "round_3.json",
                     "round_3.safetensors"]


def test_resume_modes(tmp_path):
    # fresh run dir: start at round 0; fl.resume=true demands a checkpoint
    assert checkpoint.resume(cfg(tmp_path), arrays())[0] == 0
    with pytest.raises(FileNotFoundError, match="fl.resume=true"):
        checkpoint.resume(cfg(tmp_path, resume=True), arrays())
    checkpoint.save_checkpoint(tmp_path, 4, arrays(), {})
    assert checkpoint.resume(cfg(tmp_path, resume=True), arrays())[0] == 4
    assert checkpoint.resume(cfg(tmp_path, resume=False), arrays())[0] == 0


def test_checkpoint_of_another_model_is_refused_naming_the_file(tmp_path):
    checkpoint.save_checkpoint(tmp_path, 1, arrays(shape=(8, 2)), {})
    with pytest.raises(ValueError, match=r"round_1.json: '.*gate.weight' is float32\[8, 2\]"):
        checkpoint.resume(cfg(tmp_path), arrays())


def test_round_rules_number_rounds_after_the_checkpoint(tmp_path):
    # Prepare
    class Recorder(Strategy):
        def __init__(self):
            self.seen = []

        def configure_train(self, server_round, *args):
            self.seen.append(("train", server_round))
            return []

        def aggregate_train(self, server_round, replies):
            self.seen.append(("aggregate", server_round))
            return None, None

        def configure_evaluate(self, server_round, *args):
            self.seen.append(("evaluate", server_round))
            return []

        def aggregate_evaluate(self, server_round, replies):
            self.seen.append(("aggregate_evaluate", server_round))

        def summary(self):
            pass

    inner = Recorder()
    runner = RoundRules(inner, lambda r: [], round_timeout=30, offset=3)
    # Execute: start()'s round 1 after a checkpoint of round 3
    runner.start(Grid([]), arrays(), num_rounds=1)
    # Assert
    assert inner.seen == [("train", 4), ("aggregate", 4), ("evaluate", 4),
                          ("aggregate_evaluate", 4)]


# --- round rules and DP -------------------------------------------------------------------


class Grid:
    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return self.node_ids

    def send_and_receive(self, messages, timeout):
        list(messages)
        return []


def replies_from(messages, nodes, value=1.0, shape=(4, 2)):
    return [Message(RecordDict({"arrays": arrays(value, shape),
                                "metrics": MetricRecord({"num-examples": 1, "client-id": n})}),
                    reply_to=messages[n]) for n in nodes]


def test_silent_nodes_are_logged_and_too_few_replies_keep_the_old_tensors(tmp_path, caplog):
    # Prepare: 3 nodes sampled, only node 1 replies; at least 2 replies are required
    strategy = FedMoE(expert_rows={ROUTER: 1}, min_available_nodes=1)
    runner = _deployed(cfg(tmp_path, min_replies=2), strategy, done=0)
    sent = {m.metadata.dst_node_id: m
            for m in runner.configure_train(1, arrays(), ConfigRecord(), Grid([1, 2, 3]))}
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedmoe.fl.rounds"):
        aggregated, _ = runner.aggregate_train(1, replies_from(sent, [1]))
    # Assert
    assert aggregated is None  # start() keeps the previous global tensors
    assert "no train reply from node(s) [2, 3] within fl.round_timeout=30 s" in caplog.text
    assert "1 accepted replies < fl.min_replies=2" in caplog.text


def test_dp_wraps_fedmoe_adds_noise_and_sends_the_clipping_norm(tmp_path):
    # Prepare
    config = cfg(tmp_path)
    config.strategy.dp = {"enabled": True, "noise_multiplier": 0.5, "clipping_norm": 2.0,
                          "num_sampled_clients": None}
    strategy = FedMoE(expert_rows={ROUTER: 1}, min_available_nodes=1)
    runner = _deployed(config, strategy, done=0)
    shape = (1000, 4)  # 4000 noise draws: their std is known to about 1%
    # Execute
    messages = list(runner.configure_train(1, arrays(0.0, shape), ConfigRecord(), Grid([1, 2])))
    sent = {m.metadata.dst_node_id: m for m in messages}
    aggregated, _ = runner.aggregate_train(1, replies_from(sent, [1, 2], 1.0, shape))
    # Assert: the clients are told the norm; noise of std 0.5 * 2 / 2 (min_train_nodes) = 0.5
    # around the mean reply (standard errors: of the std 0.0056, of the mean 0.0079)
    dp = runner.strategy
    assert isinstance(dp, DifferentialPrivacyClientSideFixedClipping)
    assert dp.num_sampled_clients == 2
    assert all(m.content["config"]["clipping_norm"] == 2.0 for m in messages)
    noise = aggregated[ROUTER].numpy() - 1.0
    assert 0.47 < noise.std() < 0.53 and abs(noise.mean()) < 0.04  # both bands > 5 errors
    assert strategy.history[1].accepted == [1, 2]  # FedMoE's own checks still ran


def test_resumed_server_optimizer_takes_the_uninterrupted_step(tmp_path):
    # Prepare: FedMoE + FedAdam; round 1 is checkpointed with Adam's moments
    from fedmoe.fl.strategy import build_strategy

    def adam():
        return build_strategy("fedmoe", server_opt="adam", expert_rows={ROUTER: 1},
                              min_available_nodes=1, eta=0.1)

    def train_round(strategy, server_round, start, value):
        sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(
            server_round, start, ConfigRecord(), Grid([1, 2]))}
        return strategy.aggregate_train(server_round, replies_from(sent, [1, 2], value))[0]

    first = adam()
    after_1 = train_round(first, 1, arrays(0.0), 1.0)
    checkpoint.save_checkpoint(tmp_path, 1, after_1, first.history,
                               optimizer=checkpoint.optimizer_state(first))
    uninterrupted = train_round(first, 2, after_1, 3.0)[ROUTER].numpy()
    # Execute: a new ServerApp process resumes round 2 from the checkpoint
    resumed = adam()
    done, saved, resumed.history = checkpoint.resume(cfg(tmp_path), after_1)
    restored = checkpoint.restore_optimizer(resumed, tmp_path, done)
    step = train_round(resumed, 2, saved, 3.0)[ROUTER].numpy()
    from_zero = train_round(adam(), 2, saved, 3.0)[ROUTER].numpy()
    # Assert: the same step as without the restart; zero moments would step elsewhere
    assert restored and done == 1
    np.testing.assert_array_equal(step, uninterrupted)
    assert not np.allclose(from_zero, uninterrupted)


def test_plain_averaging_checkpoints_no_optimizer_and_refuses_foreign_moments(tmp_path):
    plain = FedMoE(expert_rows={ROUTER: 1})
    assert checkpoint.optimizer_state(plain) == {}
    checkpoint.save_checkpoint(tmp_path, 1, arrays(), {}, optimizer={"m_t": {ROUTER: np.ones(2)},
                                                                      "v_t": {ROUTER: np.ones(2)}})
    assert (tmp_path / "server_state" / "round_1.optimizer.safetensors").is_file()
    with pytest.raises(ValueError, match="strategy.server_opt is off"):
        checkpoint.restore_optimizer(plain, tmp_path, 1)
