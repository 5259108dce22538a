"""Test doubles of the gateway's Triton backend (gateway.triton.client.GenerationBackend), for unit tests."""

from __future__ import annotations

from gateway.triton.tensors import ModelSpec


class AlwaysReadyBackend:
    """Ready, declares no optional inputs, closes cleanly; subclasses script `generate`."""

    url = "scripted:0"

    async def ready(self) -> tuple[bool, str]:
        return True, "ready"

    async def model_spec(self) -> ModelSpec:
        return ModelSpec({}, 1)

    async def close(self) -> None:
        pass
