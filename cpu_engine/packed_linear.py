"""Linear layers whose float32 weights are packed once, at load time, in oneDNN's blocked layout.

Why: a decode step multiplies a handful of rows (one per active request) by every weight matrix. Handed
plain row-major weights, the BLAS re-lays them out for its kernels on every call once more than one row
comes in, and for Gemma's tied LM head (the whole vocabulary) that costs more than the multiply itself:
batching requests then hardly pays. Packed once, the same float32 multiply reads the weights as they are.
The dtype does not change; only the order of the float32 additions may differ from `torch.nn.Linear`.
The activations stay ordinary dense tensors: converting them to and from oneDNN tensors around each of
a step's hundred-odd small multiplies cost a fifth of a one-row step (`_linear_pointwise` is the op
PyTorch's own compiler emits for packed weights, and takes dense input).
(`make bench` measures it: the reference engine's steps at 1 and 8 rows against plain layers.)
"""

from __future__ import annotations

import torch

__all__ = ["PackedLinear", "available", "pack_linears"]


def available() -> bool:
    """oneDNN and its packed-weight linear ops are in this torch build (every official x86 and aarch64
    CPU wheel has them; they are private ops, so a build without them falls back to plain layers)."""
    ops = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available()) and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
    )


class PackedLinear(torch.nn.Module):
    """`torch.nn.Linear`'s forward over a packed copy of its weight (inference only)."""

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


def pack_linears(model: torch.nn.Module) -> int:
    """Replace every float32 `torch.nn.Linear` of `model` by a `PackedLinear`; how many were replaced.

    Module paths stay the same, so hooks found by name (LoRA) attach to the packed layers alike. A tied
    LM head gets its own packed copy; the embedding keeps the plain weight for lookups.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32:
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    return replaced
