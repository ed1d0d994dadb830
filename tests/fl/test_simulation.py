"""The federated core on Flower's real Simulation Engine: clients learn, routed experts never
reach the wire (checked by an observer of the server's Grid as well as by ``audit_mod``) for
every expert layout, and the baselines send what they claim to.

The 4-client, 2-round smoke run is the session's ``smoke_run``; the other runs here use
2 clients and rounds of a few seconds.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from fedmoe.checkpoints import load_model
from fedmoe.fl.bridge import compose
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.families import Role
from fedmoe.reporting.summary import headline
from tests.helpers.runs import FAST, TWO_CLIENTS, Run, simulate

pytestmark = pytest.mark.slow

# What the smoke run's clients must learn. Seeds 0, 1, 2 of experiment=smoke (each on its own
# base model) give 1.6-7.6% lower perplexity per client and a train loss 0.017-0.029 nats
# lower in round 2 (seed 0, the tests' own: 1.6-4.7% and 0.028).
MIN_PPL_GAIN = 0.01  # every client's final perplexity at least 1% below its base
MIN_LOSS_DROP = 0.01  # the mean train loss falls at least 0.01 nats from round 1 to round 2


def roles_of(run: Run) -> dict[Role, set[str]]:
    """Parameter names by role of the base model ``run`` started from."""
    cfg = run.results["config"]
    adapter = MoEAdapter(load_model(cfg["model"], checkpoint=cfg["fl"]["base_model"]))
    names = [n for n, _ in adapter.model.named_parameters()]
    return {role: {n for n in names if adapter.role_of(n) == role} for role in Role}


def audited_tensors(run: Run) -> set[str]:
    """Tensor names in any message in or out of any client, as ``audit_mod`` logged them."""
    return {name for m in run.audit for record in m["records"].values()
            for name in record.get("arrays", {})}


# --- the smoke run: results, learning, what its summary says ---------------------------


def test_results_json_has_rounds_clients_and_communication(smoke_run):
    res = smoke_run.results
    assert res["strategy"]["name"] == "fedmoe"
    assert res["config"]["fl"]["aggregate"] == ["router", "shared_expert"]
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    for r in res["rounds"]:
        assert r["accepted"] == [0, 1, 2, 3] and not r["rejected"]
        assert r["bytes_up"] == 4 * r["payload_bytes"]  # every client sends the subset once
        assert sorted(r["eval_ppl_by_client"]) == ["0", "1", "2", "3"]
    # Round 1's clients evaluate the model they trained in the train message (fl.evaluate_in_
    # train); the last round evaluates the final global model: train + evaluate messages.
    first, last = res["rounds"]
    assert first["evaluated_in_train"] and not last["evaluated_in_train"]
    assert first["bytes_down"] == 4 * first["payload_bytes"]
    assert last["bytes_down"] == 8 * last["payload_bytes"]
    assert set(res["clients"]) == {"0", "1", "2", "3"}
    for c in res["clients"].values():
        assert c["examples"] == 64  # data.max_eval_blocks_per_client of experiment=smoke
        assert c["bytes_sent"] == 2 * res["rounds"][0]["payload_bytes"]


def test_every_client_learns_and_train_loss_falls(smoke_run):
    # A run whose clients did not train, or trained without gaining, fails all three.
    res = smoke_run.results
    for cid, c in res["clients"].items():
        assert c["final_ppl"] < (1 - MIN_PPL_GAIN) * c["base_ppl"], (cid, c)
    first, last = res["rounds"][0]["train_loss"], res["rounds"][-1]["train_loss"]
    assert first - last > MIN_LOSS_DROP, [r["train_loss"] for r in res["rounds"]]
    means = [r["eval_ppl_mean"] for r in res["rounds"]]
    assert means[1] < means[0]


def test_perplexities_lie_below_the_vocabulary_size(smoke_run):
    # A model no better than uniform over V tokens has perplexity V; one that learnt
    # anything lies below, and no perplexity is below 1.
    res = smoke_run.results
    vocab = json.loads((Path(res["config"]["fl"]["base_model"]) / "config.json").read_text())
    vocab_size = vocab["vocab_size"]
    assert vocab_size == res["config"]["pretraining"]["vocab_size"] == 512
    ppls = [c[k] for c in res["clients"].values() for k in ("base_ppl", "final_ppl")]
    ppls += [p for r in res["rounds"] for p in r["eval_ppl_by_client"].values()]
    assert all(1 < p < vocab_size for p in ppls), ppls
    assert all(math.isfinite(r["train_loss"]) and 0 < r["train_loss"] < math.log(vocab_size)
               for r in res["rounds"])


def test_summary_lines_state_the_gain_and_the_upload_share(smoke_run):
    # Prepare: both numbers recomputed from the clients and from the model's own tensors
    res, roles = smoke_run.results, roles_of(smoke_run)
    model = load_model(res["config"]["model"], checkpoint=res["config"]["fl"]["base_model"])
    nbytes = {n: p.numel() * 4 for n, p in model.named_parameters()}  # float32 on the wire
    trainable = sum(nbytes[n] for r in (Role.ROUTER, Role.SHARED_EXPERT, Role.ROUTED_EXPERTS)
                    for n in roles[r])
    payload = sum(nbytes[n] for r in (Role.ROUTER, Role.SHARED_EXPERT) for n in roles[r])
    clients = res["clients"].values()
    base = sum(c["base_ppl"] for c in clients) / len(clients)
    final = sum(c["final_ppl"] for c in clients) / len(clients)
    # Execute
    lines = headline(res)
    # Assert: printed at the end of the run, with these values
    printed = " ".join(smoke_run.output.split())
    assert len(lines) == 2 and all(" ".join(line.split()) in printed for line in lines)
    assert (res["payload_bytes"], res["trainable_bytes"]) == (payload, trainable)
    better = sum(c["final_ppl"] < c["base_ppl"] for c in clients)
    assert (f"shared start {base:.2f} -> personalized {final:.2f} ({final / base:.3f}x); "
            f"{better}/4 clients improved") in lines[0]
    assert (f"{payload / 2**20:.2f} MB = {payload / trainable:.1%} of all trainable tensors "
            f"({trainable / 2**20:.2f} MB") in lines[1]


# --- privacy: what crosses the wire -----------------------------------------------------


def test_no_routed_expert_tensor_ever_crosses_the_wire(smoke_run):
    # Prepare: the roles of the model the run used
    roles = roles_of(smoke_run)
    aggregated = roles[Role.ROUTER] | roles[Role.SHARED_EXPERT]
    # Execute: the server's Grid saw these messages; audit_mod saw them at the clients
    down = [m for m in smoke_run.wire if m["direction"] == "down"]
    up = [m for m in smoke_run.wire if m["direction"] == "up"]
    # Assert: 4 clients x (round 1: train with its evaluation; round 2: train, evaluate),
    # each way
    assert len(down) == len(up) == 12 and not any("error" in m for m in up)
    assert len(smoke_run.audit) == 2 * 12
    assert smoke_run.sent_tensors("up") == smoke_run.sent_tensors("down") == aggregated
    assert audited_tensors(smoke_run) == aggregated
    assert roles[Role.ROUTED_EXPERTS] and not smoke_run.sent_tensors() & roles[Role.ROUTED_EXPERTS]
    assert all(not m["arrays"] for m in up if m["type"] == "evaluate")  # metrics only


def test_personal_state_holds_the_routed_experts(smoke_run):
    state = smoke_run.dir / "clients" / "client_0000"
    tensors = load_file(state / "personal.safetensors")
    meta = json.loads((state / "meta.json").read_text())
    assert meta["rounds"] == 2 and meta["last_round"] == 2
    assert set(tensors) == roles_of(smoke_run)[Role.ROUTED_EXPERTS]
    # Routing statistics: every token of every training step picks top-2 of the 16 experts
    cfg = smoke_run.results["config"]
    tokens = 2 * cfg["train"]["local_steps"] * cfg["train"]["batch_size"] * cfg["data"][
        "block_size"]  # over 2 rounds
    counts = meta["expert_counts"]
    assert len(counts) == 4  # every decoder layer of the tiny model is a MoE layer
    assert all(len(c) == 16 and sum(c) == 2 * tokens for c in counts.values())
    # ... round by round too, and the rounds add up to the totals
    history = meta["expert_counts_by_round"]
    assert sorted(history) == ["1", "2"]
    for layer, total in counts.items():
        assert [a + b for a, b in zip(history["1"][layer], history["2"][layer], strict=True)] \
            == total
    from fedmoe.analysis import load_client_usage_by_round

    rounds = load_client_usage_by_round(smoke_run.dir)
    assert len(rounds) == 2 and set(rounds[0]) == {f"client_{c:04d}" for c in range(4)}


def test_personal_experts_differ_between_clients(smoke_run):
    a = load_file(smoke_run.dir / "clients" / "client_0000" / "personal.safetensors")
    b = load_file(smoke_run.dir / "clients" / "client_0001" / "personal.safetensors")
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def preset_checkpoint(smoke_base, tmp_path_factory):
    """``preset_checkpoint(preset)``: a config-built model of a ``conf/model`` preset with
    the smoke tokenizer, saved as a user checkpoint (``model.path``): no pretraining."""
    def make(preset: str) -> Path:
        directory = tmp_path_factory.mktemp(preset)
        tokenizer = AutoTokenizer.from_pretrained(smoke_base)
        torch.manual_seed(0)
        model = load_model(compose([f"model={preset}"]).model, vocab_size=len(tokenizer))
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        return directory

    return make


@pytest.mark.parametrize(("preset", "pruning"), [
    ("tiny_olmoe", []),  # no shared expert: only the router is aggregated
    ("tiny_deepseek_v3", ["prune.keep=0.5"]),  # grouped sigmoid router, experts pruned
])
def test_routed_experts_stay_home_for_every_layout(preset, pruning, preset_checkpoint,
                                                   fedmoe_cache, tmp_path):
    # Prepare / Execute: 2 clients, 2 rounds (with pruning, round 2 runs on half the experts)
    checkpoint = preset_checkpoint(preset)
    run = simulate(tmp_path, fedmoe_cache, *FAST, *TWO_CLIENTS, f"model={preset}",
                   f"model.path={checkpoint}", *pruning)
    roles = roles_of(run)
    # Assert: what the server sent and received, by role
    up = [m for m in run.wire if m["direction"] == "up" and m["type"] == "train"]
    assert [r["accepted"] for r in run.results["rounds"]] == [[0, 1], [0, 1]]
    assert len(up) == 4
    assert run.sent_tensors() == audited_tensors(run) == roles[Role.ROUTER] | roles[
        Role.SHARED_EXPERT]
    assert roles[Role.ROUTED_EXPERTS] and not run.sent_tensors() & roles[Role.ROUTED_EXPERTS]
    if not roles[Role.SHARED_EXPERT]:  # OLMoE: the router is all that travels
        assert all(".mlp.gate." in n for n in run.sent_tensors())
    state = run.dir / "clients" / "client_0000"
    assert set(load_file(state / "personal.safetensors")) <= roles[Role.ROUTED_EXPERTS]
    if pruning:  # round 2 replies carry one router row per kept expert, and say which
        num_experts = run.results["config"]["model"]["config"]["n_routed_experts"]
        for m in up[2:]:
            kept = m["configs"]["experts"]
            assert kept and all(len(ids) == num_experts // 2 for ids in kept.values())
            routers = {k: v for k, v in m["arrays"]["arrays"].items() if k.endswith("gate.weight")}
            assert routers and all(shape[0] == num_experts // 2 for shape in routers.values())
        assert all(c["experts_kept"] == {k: num_experts // 2 for k in c["experts_kept"]}
                   for c in run.results["clients"].values())


@pytest.mark.parametrize("strategy", ["fedavg", "local"])
def test_baselines_send_what_they_claim(strategy, smoke_run, fedmoe_cache, tmp_path):
    # Prepare / Execute
    run = simulate(tmp_path, fedmoe_cache, *FAST, *TWO_CLIENTS, f"strategy={strategy}",
                   "fl.num_rounds=1")
    res, roles = run.results, roles_of(run)
    trainable = roles[Role.ROUTER] | roles[Role.SHARED_EXPERT] | roles[Role.ROUTED_EXPERTS]
    # Assert
    assert res["rounds"][0]["accepted"] == [0, 1]
    if strategy == "local":
        # Nothing leaves a client; router and shared expert stay personal too
        assert res["rounds"][0]["bytes_up"] == 0 and not run.sent_tensors()
        personal = load_file(run.dir / "clients" / "client_0000" / "personal.safetensors")
        assert set(personal) == trainable
    else:
        # Every trainable tensor, routed experts included, both ways; far more than fedmoe
        assert run.sent_tensors("up") == run.sent_tensors("down") == trainable
        assert res["payload_bytes"] == res["trainable_bytes"]
        assert res["rounds"][0]["bytes_up"] == 2 * res["payload_bytes"]
        assert res["payload_bytes"] > 5 * smoke_run.results["payload_bytes"]


def test_the_readme_example_of_robust_aggregation_runs_with_fedadam(fedmoe_cache, tmp_path):
    # Prepare / Execute: the README's example (Dirichlet partition, half the clients sampled,
    # trimmed mean, FedAdam on the aggregate) at test size
    run = simulate(tmp_path, fedmoe_cache, *FAST, "data.partition=dirichlet", "data.alpha=0.3",
                   "fl.fraction_train=0.5", "strategy.rule=trimmed_mean",
                   "strategy.server_opt=adam")
    res = run.results
    # Assert: 2 of 4 clients train per round, everyone is evaluated
    assert res["strategy"] | {"aggregate": None} == {
        "name": "fedmoe", "aggregate": None, "rule": "trimmed_mean", "server_opt": "adam"}
    assert res["config"]["data"]["partition"] == "dirichlet"
    for r in (1, 2):
        train = [m for m in run.wire if m["type"] == "train" and m["direction"] == "down"
                 and m["configs"]["config"]["server-round"] == r]
        assert len(train) == 2 and len(res["rounds"][r - 1]["accepted"]) == 2
        assert len(res["rounds"][r - 1]["eval_ppl_by_client"]) == 4
    # ... and round 1's global tensors are FedAdam's first step from the base model: with
    # beta_1 = 0.9, beta_2 = 0.99, m = 0.1 d and v = 0.01 d^2 (so v = m^2), and
    # x1 = x0 + eta_1 m / (sqrt(v) + tau), eta_1 = eta sqrt(1 - 0.99^2) / (1 - 0.9^2) (Flower
    # bias-corrects with server_round + 1), eta = strategy.server_lr
    state = run.dir / "server_state"
    x1 = load_file(state / "round_1.safetensors")
    moments = load_file(state / "round_1.optimizer.safetensors")
    model = load_model(res["config"]["model"], checkpoint=res["config"]["fl"]["base_model"])
    x0 = dict(model.named_parameters())
    eta, tau = res["config"]["strategy"]["server_lr"], 1e-3  # Flower FedAdam's default tau
    assert set(x1) == roles_of(run)[Role.ROUTER] | roles_of(run)[Role.SHARED_EXPERT]
    for name, value in x1.items():
        m, v = moments[f"m_t::{name}"].double(), moments[f"v_t::{name}"].double()
        torch.testing.assert_close(v, m**2, rtol=1e-4, atol=1e-16)
        step = eta * math.sqrt(1 - 0.99**2) / (1 - 0.9**2) * m / (v.sqrt() + tau)
        torch.testing.assert_close(value.double() - x0[name].detach().double(), step,
                                   rtol=1e-3, atol=1e-7)
        assert step.abs().max() > 0


def test_lora_keeps_routed_expert_factors_on_the_client(fedmoe_cache, tmp_path):
    # Prepare / Execute: LoRA training (train=lora), one round
    run = simulate(tmp_path, fedmoe_cache, *FAST, *TWO_CLIENTS, "train=lora", "fl.num_rounds=1")
    # Assert: only router and shared-expert tensors (LoRA factors included) cross the wire
    sent = run.sent_tensors()
    assert sent == audited_tensors(run)
    assert sent and all((".mlp.gate." in n or "shared_expert" in n) for n in sent)
    assert any("lora_A" in n for n in sent)
    personal = load_file(run.dir / "clients" / "client_0000" / "personal.safetensors")
    assert personal and all(".mlp.experts." in n for n in personal)


# --- resuming a finished run -------------------------------------------------------------


def test_rerunning_a_finished_run_trains_nothing_and_keeps_its_results(smoke_run, fedmoe_cache,
                                                                       tmp_path):
    # Prepare: a copy of the finished smoke run (its server checkpoints say round 2 is done)
    copy = tmp_path / "run"
    shutil.copytree(smoke_run.dir, copy)
    state = copy / "clients" / "client_0000" / "personal.safetensors"
    before = state.read_bytes()
    # Execute: the same command on the same run dir
    again = simulate(tmp_path, fedmoe_cache, "experiment=smoke")
    # Assert: no round ran again; the results and the personal experts are the finished run's
    assert not [m for m in again.wire if m["type"] == "train"]
    res = again.results
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    for old, new in zip(smoke_run.results["rounds"], res["rounds"], strict=True):
        assert (new["train_loss"], new["eval_ppl_by_client"]) == (old["train_loss"],
                                                                   old["eval_ppl_by_client"])
    assert state.read_bytes() == before
