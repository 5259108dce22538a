"""cpu_engine/packed_linear.py: packed layers compute what torch.nn.Linear computes over the same (rounded)
weights, in float32; float16-weight rows do not depend on their batch."""

from __future__ import annotations

import pytest
import torch

from cpu_engine.packed_linear import (
    HalfWeightLinear,
    PackedLinear,
    available,
    half_kernel_available,
    pack_linears,
    round_weights,
)


def test_kernels_are_in_this_torch() -> None:
    # The runtime pins a CPU torch wheel that has both; without them load_model would silently run
    # unpacked (or float16 weights through oneDNN's float32 kernel).
    assert available()
    assert half_kernel_available()


def _rounded_linear(in_features: int, out_features: int, bias: bool) -> torch.nn.Linear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(linear.weight.half())
    return linear


@pytest.mark.parametrize("layer", [PackedLinear, HalfWeightLinear])
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_same_output_as_linear(layer: type[torch.nn.Module], rows: int, bias: bool) -> None:
    linear = _rounded_linear(64, 300, bias)
    packed = layer(linear)
    x = torch.randn(2, rows, 64)
    with torch.inference_mode():
        want, got = linear(x), packed(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(640, 2048), (2048, 640), (640, 5000)])
def test_half_weight_rows_do_not_depend_on_their_batch(shape: tuple[int, int]) -> None:
    """Each row's output is bit for bit the same alone and in batches of any size: the property that
    keeps a request's tokens unchanged however many others share its decode step."""
    layer = HalfWeightLinear(_rounded_linear(*shape, bias=False))
    x = torch.randn(40, shape[0])
    with torch.inference_mode():
        alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
        for batch in (2, 3, 8, 40):
            together = torch.cat([layer(x[i : i + batch]) for i in range(0, len(x), batch)])
            assert torch.equal(together, alone), f"batches of {batch} differ from rows alone"


def test_half_weight_layer_refuses_weights_it_would_round() -> None:
    with pytest.raises(ValueError, match="round"):
        HalfWeightLinear(torch.nn.Linear(8, 8))


class _Tied(torch.nn.Module):
    """An embedding tied to its output layer, as in Gemma."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.hidden = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.embed(ids)))


def test_round_weights_rounds_layers_and_the_tied_embedding_once() -> None:
    model = _Tied()
    before = model.hidden.weight.detach().clone()
    assert round_weights(model, "float32") == 0
    assert torch.equal(model.hidden.weight, before)
    assert round_weights(model, "float16") == 2  # hidden, and head = embedding
    for weight in (model.hidden.weight, model.embed.weight):
        assert weight.dtype == torch.float32 and torch.equal(weight, weight.half().float())
    assert model.head.weight is model.embed.weight
    assert not torch.equal(model.hidden.weight, before)
    with torch.no_grad():
        model.hidden.weight[0, 0] = 1e6
    with pytest.raises(ValueError, match="range"):
        round_weights(model, "float16")


@pytest.mark.parametrize("weight_dtype", ["float32", "float16"])
def test_pack_linears_keeps_paths_and_hooks(weight_dtype: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4, bias=False))
    round_weights(model, weight_dtype)
    x = torch.randn(5, 8)
    with torch.inference_mode():
        want = model(x)
    assert pack_linears(model, weight_dtype) == 2
    kind = "HalfWeightLinear" if weight_dtype == "float16" else "PackedLinear"
    assert [type(m).__name__ for m in model] == [kind, "GELU", kind]
    seen: list[torch.Size] = []
    model[2].register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert seen == [torch.Size([5, 16])]
