"""The model's linear layers, their weights rounded to the deployment's weight dtype and packed once, at
load time, for a CPU kernel that multiplies float32 activations by them.

Why: a decode step is memory-bound. It multiplies a handful of rows (one per active request) by every
weight matrix, so its time is the time to read the weights once, and Gemma's tied LM head (the whole
vocabulary) is most of them. Two things cut that read:

- Packing. Handed plain row-major weights, the BLAS re-lays them out for its kernels on every call once
  more than one row comes in, which for the LM head costs more than the multiply itself.
- Half the bytes. With `weight_dtype` float16 the weights are stored in float16 and FBGEMM's kernel widens
  them to float32 in registers: activations, accumulation and outputs stay float32. A row's result also
  does not depend on the other rows of its batch (tested), so batching never changes a request's tokens.
  The model then computes with weights rounded to float16 (`round_weights`), and so do the references the
  tests compare against (`load_model(pack=False)`).

With float32 weights, or where FBGEMM is missing from the torch build (it is x86-only), the weights are
packed for oneDNN in float32 (`_linear_pointwise` takes dense activations: no oneDNN tensor conversions
around each of a step's hundred-odd small multiplies). Either way the math is the same as
`torch.nn.Linear` over the rounded weights; only the order of the float32 additions differs.
(`make bench` measures it: decode steps at 1 and 8 rows for each kind of layer, and the fidelity of
float16 weights against float32.)
"""

from __future__ import annotations

import torch

__all__ = [
    "WEIGHT_DTYPES",
    "HalfWeightLinear",
    "PackedLinear",
    "available",
    "half_kernel_available",
    "pack_linears",
    "round_weights",
]

# The weight dtypes a deployment may choose (config parameter `weight_dtype`).
WEIGHT_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}


def available() -> bool:
    """oneDNN and its packed-weight linear ops are in this torch build (every official x86 and aarch64
    CPU wheel has them; they are private ops, so a build without them falls back to plain layers)."""
    ops = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available()) and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
    )


def half_kernel_available() -> bool:
    """FBGEMM's float16-weight linear is in this torch build (official x86 CPU wheels)."""
    ops = torch.ops.quantized
    return "fbgemm" in torch.backends.quantized.supported_engines and all(
        hasattr(ops, name) for name in ("linear_prepack_fp16", "linear_dynamic_fp16")
    )


def round_weights(model: torch.nn.Module, weight_dtype: str) -> int:
    """Round, in place, every linear layer's weight and the input embedding to the values `weight_dtype`
    can hold (they stay float32 tensors); how many tensors were rounded.

    The embedding is rounded with the layers because Gemma ties it to the LM head: a lookup and the LM
    head then read the same values, packed or not.
    """
    dtype = WEIGHT_DTYPES[weight_dtype]
    if dtype == torch.float32:
        return 0
    tensors = {id(m.weight): m.weight for m in model.modules() if type(m) is torch.nn.Linear}
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embed = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embed, torch.nn.Embedding):
        tensors[id(embed.weight)] = embed.weight
    with torch.no_grad():
        for weight in tensors.values():
            rounded = weight.to(dtype)
            if not bool(torch.isfinite(rounded).all()):
                raise ValueError(f"weights exceed {weight_dtype}'s range: serve them as float32")
            weight.copy_(rounded)
    return len(tensors)


class PackedLinear(torch.nn.Module):
    """`torch.nn.Linear`'s forward over a oneDNN-packed float32 copy of its weight (inference only)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        bias: torch.Tensor | None = getattr(linear, "bias", None)  # typed as always set; it is not
        # A plain attribute, not a buffer: a packed tensor has no storage for state_dict or .to() to use.
        # No batch-size hint: the layout then suits one row and a step's worth of rows alike.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().float())
        self.bias = None if bias is None else bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(
            x.float().contiguous(), self.packed_weight, self.bias, "none", [], ""
        )
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=onednn"


class HalfWeightLinear(torch.nn.Module):
    """`torch.nn.Linear`'s forward with its weight stored in float16 and float32 activations, accumulation
    and output (FBGEMM's packed float16 GEMM; inference only)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        bias: torch.Tensor | None = getattr(linear, "bias", None)
        weight = linear.weight.detach().float()
        if not torch.equal(weight.half().float(), weight):
            raise ValueError("round the weights to float16 first (round_weights): packing must not round")
        # An opaque packed object, not a buffer, like PackedLinear's.
        self.packed_weight = torch.ops.quantized.linear_prepack_fp16(
            weight, None if bias is None else bias.detach().float()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.float().reshape(-1, shape[-1]).contiguous()
        y = torch.ops.quantized.linear_dynamic_fp16(rows, self.packed_weight)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=fbgemm-float16"


def pack_linears(model: torch.nn.Module, weight_dtype: str) -> int:
    """Replace every float32 `torch.nn.Linear` of `model` by a packed layer; how many were replaced.

    float16: `HalfWeightLinear` where FBGEMM is available (call `round_weights` first), else oneDNN's
    float32 packing of the same rounded values. Module paths stay the same, so hooks found by name (LoRA)
    attach to the packed layers alike. A tied LM head gets its own packed copy; the embedding keeps the
    plain weight for lookups.
    """
    half = WEIGHT_DTYPES[weight_dtype] == torch.float16 and half_kernel_available()
    if not half and not available():
        return 0
    layer = HalfWeightLinear if half else PackedLinear
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32:
                setattr(parent, name, layer(child))
                replaced += 1
    return replaced
