"""One base model per process: clients switch by writing tensors, pruned clients are views."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from fedmoe.client.local import LocalClient
from fedmoe.fl.bridge import compose
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.prune import export_checkpoint, keep_experts
from fedmoe.prune.masked import KEEP_ATTR, RoutingRestriction
from fedmoe.train.loop import lm_loss
from tests.helpers.models import tiny_model

KEPT = [[0, 2, 5, 7], [1, 3, 4, 6], [0, 3, 4, 5]]  # two per DeepSeek group (0-3, 4-7)


def _kept(model) -> dict[int, list[int]]:
    return {layer.index: KEPT[n % 3] for n, layer in enumerate(MoEAdapter(model).moe_layers())}


def test_restricted_routing_equals_the_sliced_model(family):
    # Prepare
    shared = tiny_model(family)
    kept = _kept(shared)
    sliced = copy.deepcopy(shared)
    keep_experts(sliced, kept)
    ids = torch.arange(24).reshape(2, 12) % 90
    # Execute
    restriction = RoutingRestriction(MoEAdapter(shared))
    restriction.set(kept)
    with torch.no_grad():
        got, expected = shared(ids).logits, sliced(ids).logits
    shared.train(), sliced.train()
    got_ce, got_aux = lm_loss(shared, ids)
    expected_ce, expected_aux = lm_loss(sliced, ids)
    restriction.clear()
    with torch.no_grad():
        full = shared(ids).logits
    # Assert: same logits and losses as the sliced model; lifted, the full model is back
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_ce, expected_ce, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_aux, expected_aux, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(full, expected, atol=1e-4)
    assert not any(hasattr(layer.router, KEEP_ATTR) for layer in MoEAdapter(shared).moe_layers())


def test_export_of_a_view_equals_export_of_the_sliced_model(tmp_path):
    # Prepare
    shared = tiny_model("qwen2_moe")
    kept = _kept(shared)
    sliced = copy.deepcopy(shared)
    keep_experts(sliced, kept)
    # Execute
    export_checkpoint(shared, None, tmp_path / "view", kept=kept, select=kept)
    export_checkpoint(sliced, None, tmp_path / "sliced")
    # Assert: the same tensors, bit for bit, and the same expert bookkeeping
    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out |= load_file(f)
        return out

    view, ref = tensors(tmp_path / "view"), tensors(tmp_path / "sliced")
    assert view.keys() == ref.keys()
    assert all(torch.equal(view[k], ref[k]) for k in ref)
    assert (tmp_path / "view" / "config.json").read_text().count('"num_experts": 4') == 1


@pytest.fixture(scope="module")
def smoke_cfg(fedmoe_cache, tmp_path_factory):
    from fedmoe.train.pretrain import ensure_base_model

    cfg = compose(["experiment=smoke", f"cache_dir={fedmoe_cache}", "train=lora",
                   "prune=default", "prune.keep=0.5", "train.device=cpu", "fl.num_rounds=2"])
    return cfg, str(ensure_base_model(cfg, progress=False))


def test_two_clients_share_one_model_and_never_see_each_other(smoke_cfg, tmp_path):
    # Prepare
    cfg, base = smoke_cfg
    a = LocalClient(cfg, 0, base, tmp_path / "a")
    b = LocalClient(cfg, 1, base, tmp_path / "b")
    start = {n: t.clone() for n, t in a.shared.initial.items()}
    # Execute: A trains and prunes, then B assembles (no state yet), then A again
    out_a = a.fit({}, server_round=1)
    saved_a = a.store.load()[0]
    b.assemble({})
    b_sees = {n: a.shared.params[n].detach().clone() for n in start}
    b_restricted = [hasattr(layer.router, KEEP_ATTR) for layer in b.adapter.moe_layers()]
    a.assemble({})
    # Assert: one model object; B saw the starting tensors and full routing; A got back
    # exactly what it saved (held rows only) and its restricted routing
    assert a.shared is b.shared and a.model is b.model
    assert all(torch.equal(b_sees[n], start[n]) for n in start)
    assert not any(b_restricted)
    held = {int(k): v for k, v in out_a["experts"].items()}
    assert {len(ids) for ids in held.values()} == {8}  # 16 experts, prune.keep=0.5
    for name, value in a.personal_tensors().items():
        assert torch.equal(value, saved_a[name]), name
    assert any(value.shape[0] < a.shared.params[n].shape[0] for n, value in saved_a.items())
    assert all(hasattr(layer.router, KEEP_ATTR) for layer in a.adapter.moe_layers())
    # CPU run: nothing was created on another device
    tensors = [*a.model.parameters(), *a.model.buffers(), *saved_a.values(),
               *out_a["arrays"].values()]
    assert {t.device.type for t in tensors} == {"cpu"}


def test_personal_state_is_megabytes_of_lora_factors(smoke_cfg, tmp_path):
    cfg, base = smoke_cfg
    client = LocalClient(cfg, 2, base, tmp_path / "c")
    out = client.fit({}, server_round=2)  # prune.at_round=1: no pruning in round 2
    saved = client.store.load()[0]
    routed = sum(p.numel() for n, p in client.shared.params.items()
                 if n.endswith(("gate_up_proj", "down_proj")))
    factors = sum(t.numel() for t in saved.values())
    assert all(n.rsplit(".", 1)[1].startswith("lora_") for n in saved)
    assert 0 < factors < routed / 2
    assert out["metrics"]["personal_mb"] == pytest.approx(factors * 4 / 2**20)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_and_evaluation_equal_cpu(smoke_cfg, tmp_path):
    # The same client, round and data on both devices: the model lives where train.device says
    from fedmoe.client import local

    cfg, base = smoke_cfg
    results = {}
    for device in ("cpu", "cuda"):
        local.shared_model.cache_clear()
        run = compose(["experiment=smoke", "train=lora", f"train.device={device}",
                       f"cache_dir={cfg.cache_dir}"])
        client = LocalClient(run, 0, base, tmp_path / device)
        assert {p.device.type for p in client.model.parameters()} == {device}
        out = client.fit({}, server_round=1)
        results[device] = (client.store.load()[0], client.evaluate({}, server_round=1),
                           out["metrics"]["train_loss"])
    (cpu_state, cpu_eval, cpu_loss), (gpu_state, gpu_eval, gpu_loss) = results["cpu"], \
        results["cuda"]
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-3)
    assert gpu_eval["eval_ppl"] == pytest.approx(cpu_eval["eval_ppl"], rel=1e-3)
    for name, value in cpu_state.items():
        torch.testing.assert_close(gpu_state[name], value, atol=1e-4, rtol=1e-3)
