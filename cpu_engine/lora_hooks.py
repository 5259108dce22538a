"""Per-request LoRA for the CPU reference engine: TensorRT-LLM's request tensors applied with torch hooks.

The tensor layout (and its decoding, `from_trtllm_tensors`) is `gemma3_core.lora`; this module only runs
it. One forward may carry rows of different adapters (the engine batches all active requests), so the
hooks add each adapter's delta to its own rows only.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gemma3_core.lora import (
    HF_TO_TRTLLM,
    TRTLLM_TO_HF,
    LoraError,
    LoraTaskNotCachedError,
    from_trtllm_tensors,
)

_TARGET_RE = re.compile(
    r"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d+)\.(?P<parent>self_attn|mlp)\.(?P<name>\w+)$"
)


@dataclass(frozen=True)
class DecodedLora:
    """A task's matrices as float32 torch tensors on the model's device, ready for the hooks."""

    task_id: int
    deltas: Mapping[tuple[str, int], tuple[torch.Tensor, torch.Tensor, float]]


# (adapter, the batch rows it applies to; None = every row) for the forward in progress.
_Groups = tuple[tuple[DecodedLora, torch.Tensor | None], ...]


def _row_groups(loras: Sequence[DecodedLora | None]) -> _Groups:
    by_task: dict[int, tuple[DecodedLora, list[int]]] = {}
    for row, lora in enumerate(loras):
        if lora is not None:
            by_task.setdefault(id(lora), (lora, []))[1].append(row)
    if len(by_task) == 1:
        lora, rows = next(iter(by_task.values()))
        if len(rows) == len(loras):
            return ((lora, None),)
    return tuple((lora, torch.tensor(rows, dtype=torch.long)) for lora, rows in by_task.values())


class LoraHooks:
    """Per-request LoRA for a HF Gemma 3 torch model, emulating TensorRT-LLM's PEFT cache.

    Forward hooks are installed once on every q/k/v/o/gate/up/down Linear of the text decoder and are
    no-ops unless `apply(lora)` / `apply_rows(loras)` is active in the current context (contextvar: safe
    with threads/asyncio tasks), so the base model is untouched outside them. Decoded tasks are kept in an
    LRU cache keyed by task id (like the engine's PEFT cache): `resolve(task_id)` without weights on an
    unknown id raises `LoraTaskNotCachedError` with TensorRT-LLM's exact message.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        capacity: int = 32,
        dense_in_width: int | None = None,
        allowed_modules: Collection[str] | None = None,
    ) -> None:
        self._targets: dict[tuple[str, int], Any] = {}  # torch.nn.Linear or PackedLinear
        for path, mod in model.named_modules():
            m = _TARGET_RE.match(path)
            if m is None or m["name"] not in HF_TO_TRTLLM or "vision" in m["prefix"]:
                continue
            self._targets[(m["name"], int(m["layer"]))] = mod
        if not self._targets:
            raise LoraError("no Gemma decoder projections found in the model")
        self._device = next(model.parameters()).device  # packed layers keep no regular weight
        self.dims: dict[str, tuple[int, int]] = {
            name: (int(mod.in_features), int(mod.out_features)) for (name, _), mod in self._targets.items()
        }
        if allowed_modules is not None:  # the engine's lora_target_modules (HF or TensorRT-LLM names)
            allowed = {TRTLLM_TO_HF.get(m, m) for m in allowed_modules}
            self.dims = {k: v for k, v in self.dims.items() if k in allowed}
        self.num_layers = 1 + max(layer for _, layer in self._targets)
        self.capacity = capacity
        self.dense_in_width = dense_in_width
        self._cache: OrderedDict[int, DecodedLora] = OrderedDict()
        self._lock = threading.Lock()
        self._active: contextvars.ContextVar[_Groups] = contextvars.ContextVar(
            f"lora_active_{id(self)}", default=()
        )
        self._handles = [
            mod.register_forward_hook(self._make_hook(key)) for key, mod in self._targets.items()
        ]

    def _make_hook(self, key: tuple[str, int]) -> Callable[..., Any]:
        def hook(
            module: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor
        ) -> torch.Tensor | None:
            out = None
            for lora, rows in self._active.get():
                delta = lora.deltas.get(key)
                if delta is None:
                    continue
                a, b, scale = delta
                x = inputs[0] if rows is None else inputs[0].index_select(0, rows)
                y = (x.to(a.dtype) @ a.T) @ b.T
                if scale != 1.0:
                    y = y * scale
                y = y.to(output.dtype)
                if rows is None:
                    out = (output if out is None else out) + y
                else:
                    out = output.clone() if out is None else out
                    out.index_add_(0, rows, y)
            return out

        return hook

    def decode(self, task_id: int, weights: np.ndarray, config: np.ndarray) -> DecodedLora:
        """Validate and convert request tensors (no caching)."""
        mats = from_trtllm_tensors(
            weights, config, self.dims, dense_in_width=self.dense_in_width, num_layers=self.num_layers
        )
        deltas = {}
        for key, m in mats.items():
            deltas[key] = (
                torch.from_numpy(np.ascontiguousarray(m.a)).to(self._device),
                torch.from_numpy(np.ascontiguousarray(m.b)).to(self._device),
                float(m.scale),
            )
        return DecodedLora(task_id=int(task_id), deltas=deltas)

    def resolve(
        self, task_id: int, weights: np.ndarray | None = None, config: np.ndarray | None = None
    ) -> DecodedLora:
        """The engine's per-request step: cached task → it; else decode the sent weights; else cache miss.

        Like TensorRT-LLM, weights sent for a task id that is already cached are ignored.
        """
        task_id = int(task_id)
        with self._lock:
            hit = self._cache.get(task_id)
            if hit is not None:
                self._cache.move_to_end(task_id)
                return hit
        if weights is None or config is None:
            raise LoraTaskNotCachedError(task_id)
        decoded = self.decode(task_id, weights, config)
        with self._lock:
            self._cache[task_id] = decoded
            self._cache.move_to_end(task_id)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)  # in-flight requests keep their own reference
        return decoded

    def __contains__(self, task_id: object) -> bool:
        with self._lock:
            return task_id in self._cache

    @contextlib.contextmanager
    def apply(self, lora: DecodedLora | None) -> Iterator[None]:
        """Activate `lora` on every row of forwards run inside the block (None = base model)."""
        with self.apply_rows([lora]):
            yield

    @contextlib.contextmanager
    def apply_rows(self, loras: Sequence[DecodedLora | None]) -> Iterator[None]:
        """Activate `loras[i]` on batch row i of forwards run inside the block (None = base model)."""
        token = self._active.set(_row_groups(loras))
        try:
            yield
        finally:
            self._active.reset(token)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
