"""cpu_engine/packed_linear.py: packed layers compute what torch.nn.Linear computes, in float32."""

from __future__ import annotations

import pytest
import torch

from cpu_engine.packed_linear import PackedLinear, available, pack_linears


def test_onednn_is_in_this_torch() -> None:
    # The runtime pins a CPU torch wheel that has it; without it load_model would silently run unpacked.
    assert available()


@pytest.mark.parametrize("rows", [1, 3, 8, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_same_output_as_linear(rows: int, bias: bool) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 300, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(2, rows, 64)
    with torch.inference_mode():
        want, got = linear(x), packed(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pack_linears_keeps_paths_and_hooks() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4, bias=False))
    x = torch.randn(5, 8)
    with torch.inference_mode():
        want = model(x)
    assert pack_linears(model) == 2
    assert [type(m).__name__ for m in model] == ["PackedLinear", "GELU", "PackedLinear"]
    seen: list[torch.Size] = []
    model[2].register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert seen == [torch.Size([5, 16])]
