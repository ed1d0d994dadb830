"""Tensors travel in the model's dtype: bf16 as 2 bytes, decoded bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedmoe.fl.codec import RAW_STYPE, decode_record, encode, encode_record, to_numpy, wire_nbytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_round_trip_is_bit_exact(dtype):
    # Prepare: ordinary values and the awkward ones (signed zero, inf, NaN payloads, subnormals)
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(7, 5, generator=gen).to(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40])
    bits = torch.cat([values.flatten(), special.to(dtype)]).view(torch.int16)
    bits = torch.cat([bits, torch.tensor([0x7FC1, -0x7F], dtype=torch.int16)])  # NaN payloads
    tensor = bits.view(dtype)
    # Execute
    array = encode(tensor)
    back = decode_record(ArrayRecord({"x": array}))["x"]
    # Assert: same dtype, shape and bits; half the bytes of float32
    assert array.stype == RAW_STYPE and array.dtype == str(dtype).removeprefix("torch.")
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back.view(torch.int16), tensor.view(torch.int16))
    assert wire_nbytes(array) == tensor.numel() * 2 == wire_nbytes(encode(tensor.float())) // 2


def test_widening_to_numpy_is_exact_and_float32_keeps_flowers_format():
    tensor = torch.randn(4, 3).to(torch.bfloat16)
    widened = to_numpy(encode(tensor))
    assert widened.dtype == np.float32
    assert np.array_equal(widened, tensor.float().numpy())
    plain = encode(torch.randn(4, 3))
    assert plain.stype != RAW_STYPE and np.array_equal(plain.numpy(), to_numpy(plain))


def test_encode_record_casts_to_the_wire_dtype_and_empty_tensors_survive():
    record = encode_record({"w": np.ones((2, 2), np.float32), "e": torch.empty(0, 3)},
                           {"w": "bfloat16", "e": "bfloat16"})
    back = decode_record(record)
    assert back["w"].dtype == torch.bfloat16 and torch.equal(back["w"].float(), torch.ones(2, 2))
    assert back["e"].shape == (0, 3)


def test_a_payload_of_the_wrong_length_is_refused():
    array = encode(torch.ones(3, dtype=torch.bfloat16))
    array.data = array.data[:-1]
    with pytest.raises(ValueError, match="bytes for a bfloat16 tensor"):
        to_numpy(array)
