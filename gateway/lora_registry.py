"""The gateway's LoRA adapters directory: names, stable task ids, converted tensors and what was sent.

The layout knowledge (PEFT files → TensorRT-LLM `lora_weights`/`lora_config`) is `gemma3_core.lora`'s;
this module is the runtime registry built on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gemma3_core.lora import (
    LoraError,
    _check_config,
    _hf_names,
    load_peft_adapter,
    save_npy_pair,
    to_trtllm_tensors,
    with_batch_dim,
)
from triton_io.contract import Ensemble

log = logging.getLogger(__name__)


class UnknownAdapterError(KeyError):
    """`model` names an adapter that is not configured (the gateway answers 404)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"The model `{self.name}` does not exist."


_CONVERTER_VERSION = "1"
TASK_ID_MAX = 2**63 - 1


def stable_task_id(name: str) -> int:
    """A 63-bit id derived from the adapter name only, so it survives gateway and Triton restarts."""
    tid = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1
    return tid or 1


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    task_id: int
    path: Path
    rank: int


class LoraRegistry:
    """The gateway's view of the adapters directory (one subdirectory per adapter, named by it).

    * ids: `adapters.json` in the directory may pin ids (`{"name": 17}` or `{"name": {"task_id": 17}}`);
      others get `stable_task_id(name)`.
    * tensors are converted lazily (`tensors`), cached in memory and, with `cache_dir`, as .npy files keyed
      by a digest of the adapter files (conversion of a 27B adapter takes seconds: call from a thread).
    * `request_inputs(name)` returns the Triton inputs; weights are included until they have been sent
      once. On an engine error matching `is_cache_miss_error` call `invalidate(name)` and retry once
      (weights are then included again); after a Triton restart, `invalidate_all()`.
    """

    def __init__(
        self,
        adapters_dir: str | os.PathLike[str],
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        dtype: Any = np.float16,
        separator: str = ":",
        dense_in_width: int | None = None,
        max_rank: int | None = None,
        allowed_modules: Collection[str] | None = None,
        strict: bool = True,
    ) -> None:
        self.adapters_dir = Path(adapters_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.dtype = np.dtype(dtype)
        self.separator = separator
        self.dense_in_width = dense_in_width
        self.max_rank = max_rank
        self.allowed_modules = _hf_names(allowed_modules) if allowed_modules is not None else None
        self._lock = threading.Lock()
        self._tensors: dict[str, tuple[npt.NDArray[Any], npt.NDArray[Any]]] = {}
        self._sent: set[str] = set()
        self._entries: dict[str, AdapterEntry] = {}
        self._scan(strict)

    # scanning ---------------------------------------------------------------------------------------
    def _explicit_ids(self) -> dict[str, int]:
        p = self.adapters_dir / "adapters.json"
        if not p.is_file():
            return {}
        raw = json.loads(p.read_text())
        ids: dict[str, int] = {}
        for name, v in raw.items():
            tid = v["task_id"] if isinstance(v, dict) else v
            if not isinstance(tid, int) or isinstance(tid, bool) or not 0 < tid <= TASK_ID_MAX:
                raise LoraError(f"{p}: task id of {name!r} must be an integer in [1, 2**63)")
            ids[name] = tid
        return ids

    def _scan(self, strict: bool) -> None:
        if not self.adapters_dir.is_dir():
            raise LoraError(f"LoRA adapters directory {self.adapters_dir} does not exist")
        explicit = self._explicit_ids()
        by_id: dict[int, str] = {}
        for d in sorted(p for p in self.adapters_dir.iterdir() if p.is_dir()):
            if not (d / "adapter_config.json").is_file():
                continue
            try:
                entry = self._entry(d, explicit.get(d.name))
            except (LoraError, ValueError, KeyError, OSError) as e:
                if strict:
                    raise
                log.error("skipping LoRA adapter %s: %s", d, e)
                continue
            if entry.task_id in by_id:
                raise LoraError(
                    f"adapters {by_id[entry.task_id]!r} and {entry.name!r} share task id {entry.task_id}"
                )
            by_id[entry.task_id] = entry.name
            self._entries[entry.name] = entry
        unknown = set(explicit) - set(self._entries)
        if unknown:
            log.warning("adapters.json names unknown adapters: %s", ", ".join(sorted(unknown)))

    def _entry(self, d: Path, explicit_id: int | None) -> AdapterEntry:
        name = d.name
        if self.separator in name or not name.strip():
            raise LoraError(f"adapter name {name!r} must not contain {self.separator!r}")
        cfg = json.loads((d / "adapter_config.json").read_text())
        _check_config(cfg, str(d))
        if not (d / "adapter_model.safetensors").is_file():
            raise LoraError(f"{d}: no adapter_model.safetensors")
        ranks = [int(cfg["r"]), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]
        if self.max_rank is not None and max(ranks) > self.max_rank:
            raise LoraError(f"{d}: rank {max(ranks)} exceeds the engine's max_lora_rank {self.max_rank}")
        return AdapterEntry(
            name=name,
            task_id=explicit_id if explicit_id is not None else stable_task_id(name),
            path=d,
            rank=max(ranks),
        )

    # lookup -----------------------------------------------------------------------------------------
    @property
    def entries(self) -> list[AdapterEntry]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> AdapterEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownAdapterError(name) from None

    def resolve(self, model: str, base_ids: Collection[str]) -> AdapterEntry | None:
        """`model` → adapter (`adapter` or `base<sep>adapter`), or None when `model` is a base model id.

        Raises UnknownAdapterError (→ 404) for `base<sep>unknown` and for any other unknown `model`.
        """
        if model in self._entries:
            return self._entries[model]
        if model in base_ids:
            return None
        base, sep, adapter = model.rpartition(self.separator)
        if sep and base in base_ids:
            return self.get(adapter)
        raise UnknownAdapterError(model)

    # tensors ----------------------------------------------------------------------------------------
    def _digest(self, entry: AdapterEntry) -> str:
        h = hashlib.sha256()
        h.update(f"{_CONVERTER_VERSION}|{self.dtype.str}|{self.dense_in_width}|".encode())
        h.update((entry.path / "adapter_config.json").read_bytes())
        st = (entry.path / "adapter_model.safetensors").stat()
        h.update(f"{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def tensors(self, name: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """(`lora_weights` [1, rows, len] of `dtype`, `lora_config` int32 [1, rows, 3]) for `name`."""
        entry = self.get(name)
        with self._lock:
            hit = self._tensors.get(name)
        if hit is not None:
            return hit
        pair = self._load_or_convert(entry)
        with self._lock:
            self._tensors[name] = pair
        return pair

    def _load_or_convert(self, entry: AdapterEntry) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        cached = None
        if self.cache_dir is not None:
            cached = self.cache_dir / f"{entry.name}-{self._digest(entry)}"
            wp, cp = cached / "model.lora_weights.npy", cached / "model.lora_config.npy"
            if wp.is_file() and cp.is_file():
                return np.load(wp), np.load(cp)
        adapter = load_peft_adapter(entry.path)
        if self.allowed_modules is not None:
            extra = set(adapter.modules) - self.allowed_modules
            if extra:
                raise LoraError(f"adapter {entry.name!r} adapts {sorted(extra)}, not enabled in the engine")
        pair = with_batch_dim(*to_trtllm_tensors(adapter, self.dtype, dense_in_width=self.dense_in_width))
        if cached is not None:
            save_npy_pair(cached, *pair)
        return pair

    # send state -------------------------------------------------------------------------------------
    def needs_weights(self, name: str) -> bool:
        with self._lock:
            return name not in self._sent

    def request_inputs(self, name: str, *, force_weights: bool = False) -> dict[str, npt.NDArray[Any]]:
        """Triton inputs for one request: `lora_task_id` uint64 [1, 1], plus weights/config on first use."""
        entry = self.get(name)
        inputs = {Ensemble.LORA_TASK_ID: np.array([[entry.task_id]], dtype=np.uint64)}
        if force_weights or self.needs_weights(name):
            weights, config = self.tensors(name)
            inputs[Ensemble.LORA_WEIGHTS] = weights
            inputs[Ensemble.LORA_CONFIG] = config
            with self._lock:
                self._sent.add(name)  # optimistic: a failed send surfaces as a cache miss → invalidate
        return inputs

    def invalidate(self, name: str) -> None:
        with self._lock:
            self._sent.discard(name)

    def invalidate_all(self) -> None:
        with self._lock:
            self._sent.clear()
