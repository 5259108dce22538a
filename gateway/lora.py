"""LoRA adapters, gateway side: `model` → adapter, and a backend that adds the adapter's Triton inputs.

`LoraRegistry` knows the adapters directory, the PEFT → TensorRT-LLM conversion and which adapters' weights
were already sent. Here: `model` may be an adapter name or `base:adapter`; the first request for an adapter
carries `lora_weights`/`lora_config` (converted in a worker thread: seconds for a 27B adapter), later ones
only `lora_task_id`. When the engine no longer has the adapter cached (evicted, Triton restarted) it fails
the request with TensorRT-LLM's cache-miss text; `LoraBackend` then resends it once with the weights.
`/v1/models` lists adapters with `parent`/`root` = the base model id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import numpy as np

from gateway.errors import model_card, model_not_found
from gateway.lora_registry import AdapterEntry, LoraRegistry, UnknownAdapterError
from gateway.settings import GatewaySettings
from gateway.triton.client import GenerationBackend
from gateway.triton.errors import TritonError
from gateway.triton.tensors import ModelSpec, TritonResponse
from gemma3_core.lora import is_cache_miss_error
from triton_io.contract import Ensemble

log = logging.getLogger("gateway.lora")


class LoraService:
    def __init__(self, registry: LoraRegistry, base_ids: list[str]) -> None:
        self.registry = registry
        self.base_ids = base_ids
        self._dtype_checked = False
        self._dtype_lock = asyncio.Lock()

    async def _registry(self, backend: GenerationBackend) -> LoraRegistry:
        """The registry, converting to the dtype the deployed ensemble declares for `lora_weights`.

        FP16 (CPU engine, FP16 GPU engines) is the registry default. A BF16 engine gets float32 tensors:
        tritonclient serializes BF16 from float32, and converting once from the adapter's own precision
        avoids rounding twice (to fp16, then to bf16) and fp16's narrower range.
        """
        if self._dtype_checked:
            return self.registry
        async with self._dtype_lock:
            if not self._dtype_checked:
                declared = (await backend.model_spec()).inputs.get(Ensemble.LORA_WEIGHTS)
                if declared is not None and declared.datatype == "BF16" and self.registry.dtype != np.float32:
                    self.registry = LoraRegistry(self.registry.adapters_dir, dtype=np.float32)
                self._dtype_checked = True
        return self.registry

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> LoraService | None:
        if settings.lora_dir is None:
            return None
        # Scanned at startup: a wrong GATEWAY_LORA_DIR or a broken adapter stops the start, not a request.
        registry = LoraRegistry(settings.lora_dir)
        log.info("LoRA adapters: %s", ", ".join(e.name for e in registry.entries) or "(none)")
        return cls(registry, settings.served_model_ids)

    def knows(self, model: str) -> bool:
        """`model` names an adapter (`adapter` or `base:adapter`)."""
        try:
            return self.registry.resolve(model, self.base_ids) is not None
        except UnknownAdapterError:
            return False

    def resolve(self, model: str) -> AdapterEntry | None:
        """The adapter `model` selects, None for a base model id; 404 for an unknown adapter."""
        try:
            return self.registry.resolve(model, self.base_ids)
        except UnknownAdapterError:
            raise model_not_found(model) from None

    def model_cards(self, created: int) -> list[dict[str, Any]]:
        return [model_card(e.name, created, parent=self.base_ids[0]) for e in self.registry.entries]

    async def request_inputs(
        self, backend: GenerationBackend, adapter: str, *, force_weights: bool = False
    ) -> dict[str, Any]:
        """The adapter's Triton inputs (weights on first use, or when `force_weights` after a cache miss)."""
        registry = await self._registry(backend)
        if force_weights:
            registry.invalidate(adapter)
        return await asyncio.to_thread(registry.request_inputs, adapter, force_weights=force_weights)


class LoraBackend:
    """A `GenerationBackend` that serves one adapter: the inner backend's streams with the adapter's inputs,
    resent once with weights after a cache miss. The generation above it never hears of adapters."""

    def __init__(self, backend: GenerationBackend, lora: LoraService, adapter: str) -> None:
        self.backend = backend
        self.lora = lora
        self.adapter = adapter
        self.url = backend.url

    async def ready(self) -> tuple[bool, str]:
        return await self.backend.ready()

    async def model_spec(self) -> ModelSpec:
        return await self.backend.model_spec()

    async def close(self) -> None:
        pass  # the inner backend is shared; its owner closes it

    async def generate(
        self, prompt: str, values: Mapping[str, Any], request_id: str
    ) -> AsyncGenerator[TritonResponse, None]:
        inputs = await self.lora.request_inputs(self.backend, self.adapter)
        started = False
        try:
            async with contextlib.aclosing(
                self.backend.generate(prompt, {**values, **inputs}, request_id)
            ) as stream:
                async for response in stream:
                    started = True
                    yield response
            return
        except TritonError as exc:
            # Only a failure before any output can be retried: a resend would repeat streamed text.
            if started or not is_cache_miss_error(exc.message):
                raise
            log.info("LoRA adapter %s not cached by the engine; resending with weights", self.adapter)
        inputs = await self.lora.request_inputs(self.backend, self.adapter, force_weights=True)
        stream = self.backend.generate(prompt, {**values, **inputs}, request_id)
        async with contextlib.aclosing(stream):
            async for response in stream:
                yield response
