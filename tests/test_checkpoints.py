"""The one loader: streams every family's checkpoint exactly as transformers loads it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedmoe.checkpoints import holds_grafts, load_model, resolve_device
from fedmoe.moe.adapter import MoEAdapter, role_of_name
from fedmoe.moe.families import Role
from fedmoe.moe.graft import grafts
from fedmoe.prune import export_checkpoint
from tests.helpers.models import grafted_model, tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every tiny family saved by transformers (its original per-expert key layout)."""
    root = tmp_path_factory.mktemp("ckpt")
    for family in ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v3",
                   "granitemoeshared"):
        tiny_model(family).save_pretrained(root / family)
    return root


def test_streamed_weights_equal_from_pretrained(saved, family):
    # Prepare
    reference = AutoModelForCausalLM.from_pretrained(saved / family).eval()
    # Execute
    model = load_model({"family": family, "path": str(saved / family), "dtype": "float32"})
    # Assert: the same tensors under the same names, and the same logits
    expected, got = reference.state_dict(), model.state_dict()
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    ids = torch.arange(14).reshape(2, 7) % 90
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=0, rtol=0)


def test_skip_leaves_tensors_unread_on_meta(saved):
    # The server reads only the tensors it aggregates.
    model = load_model({"family": "olmoe", "path": str(saved / "olmoe"), "dtype": "float32"},
                       skip=lambda n: role_of_name("olmoe", n) != Role.ROUTER)
    state = model.state_dict()
    loaded = {n for n, t in state.items() if not t.is_meta}
    assert loaded == {n for n in state if role_of_name("olmoe", n) == Role.ROUTER}
    reference = AutoModelForCausalLM.from_pretrained(saved / "olmoe").state_dict()
    for name in loaded:
        assert torch.equal(state[name], reference[name])


def test_bf16_preset_loads_in_bf16(saved):
    model = load_model({"family": "qwen2_moe", "path": str(saved / "qwen2_moe"),
                        "dtype": "bfloat16"})
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_wrong_family_and_missing_checkpoint_are_one_line_errors(saved, tmp_path):
    with pytest.raises(ValueError, match="model.family='olmoe'"):
        load_model({"family": "olmoe", "path": str(saved / "mixtral")})
    with pytest.raises(FileNotFoundError, match="model.path=.*no config.json") as info:
        load_model({"family": "olmoe", "path": str(tmp_path / "nowhere")})
    assert "\n" not in str(info.value)


def test_device_setting_is_checked_not_silently_ignored():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device='cuda'"):
            resolve_device("cuda")


def _backing_file(address: int) -> str | None:
    """The file mapped at ``address`` in this process (``None``: anonymous memory)."""
    for line in open("/proc/self/maps"):
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


def test_mapped_input_embedding_stays_in_the_file(saved):
    # The edge keeps the input embedding in the checkpoint's memory mapping: a lookup pages
    # in only the rows of the tokens seen.
    path = saved / "olmoe"
    spec = {"family": "olmoe", "path": str(path), "dtype": "float32"}
    model = load_model(spec, map_embeddings=True)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    weight = model.get_input_embeddings().weight
    backing = _backing_file(weight.data_ptr())
    assert backing and backing.startswith(str(path)) and backing.endswith(".safetensors")
    assert not weight.requires_grad
    ids = torch.arange(14).reshape(2, 7) % 90
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=0, rtol=0)
    # Without the option (and for the other weights) the tensors are read into memory.
    assert _backing_file(load_model(spec).get_input_embeddings().weight.data_ptr()) is None
    assert _backing_file(model.lm_head.weight.data_ptr()) is None


# --- grafted checkpoints (strategy=flex) ------------------------------------------------------


@pytest.fixture(scope="module")
def grafted(tmp_path_factory):
    """``grafted(family)``: (a grafted tiny model in memory, its export as a flex client
    writes it: ``export_checkpoint``, the graft tensors beside the standard checkpoint)."""
    made = {}

    def _make(family: str):
        if family not in made:
            model = grafted_model(family)
            made[family] = model, export_checkpoint(
                model, None, tmp_path_factory.mktemp(f"grafted_{family}") / "model")
        return made[family]

    return _make


def test_a_grafted_export_loads_as_the_grafted_model(grafted, family):
    # Prepare
    model, export = grafted(family)
    base = tiny_model(family)  # the same pretrained weights, no graft
    ids = torch.arange(14).reshape(2, 7) % 90
    # Execute
    reloaded = load_model({"family": family, "path": str(export), "dtype": "float32"})
    # Assert: every tensor, the grafts' included, is back; the logits are the grafted
    # model's, not the base model's
    assert holds_grafts(export, family)
    assert len(grafts(MoEAdapter(reloaded))) == len(MoEAdapter(model).moe_layers())
    expected, got = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    with torch.no_grad():
        logits = reloaded(ids).logits
        torch.testing.assert_close(logits, model(ids).logits, atol=0, rtol=0)
        assert (logits - base(ids).logits).abs().max() > 1e-2


def test_a_grafted_export_honours_dtype_names_and_skip(grafted):
    model, export = grafted("qwen2_moe")
    spec = {"family": "qwen2_moe", "path": str(export), "dtype": "bfloat16"}
    graft_names = set(MoEAdapter(model).names(Role.GRAFT))
    # The preset's dtype holds for the grafts too
    reloaded = load_model(spec)
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    assert set(MoEAdapter(reloaded).names(Role.GRAFT)) == graft_names
    # skip / names leave the grafts on meta, or load them alone, like any other tensor
    skipped = load_model(spec, skip=lambda n: n in graft_names).state_dict()
    assert {n for n, t in skipped.items() if t.is_meta} == graft_names
    alone = load_model(spec, names=graft_names).state_dict()
    assert {n for n, t in alone.items() if not t.is_meta} == graft_names
    for name in graft_names:
        assert torch.equal(alone[name], model.state_dict()[name].to(torch.bfloat16)), name


def test_a_plain_checkpoint_holds_no_grafts(saved, family):
    assert not holds_grafts(saved / family, family)
    assert not grafts(MoEAdapter(load_model({"family": family, "path": str(saved / family)})))
