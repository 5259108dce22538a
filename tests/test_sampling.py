"""Sampling (gateway/sampling.py): defaults from settings, greedy, explicit values, seeds per choice."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.sampling import UINT64_MOD, resolve_sampling
from gateway.settings import GatewaySettings
from gateway.validation import ChatRequest

SETTINGS = GatewaySettings(model_id="m", default_temperature=1.0, default_top_p=0.95, default_top_k=64)


def request(**fields: Any) -> ChatRequest:
    return ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


def test_defaults_come_from_settings() -> None:
    params = resolve_sampling(request(), SETTINGS, max_tokens=16)
    assert (params.temperature, params.top_p, params.top_k, params.greedy) == (1.0, 0.95, 64, False)
    values = params.triton_inputs(0)
    assert values["max_tokens"] == 16
    assert "presence_penalty" not in values and "stop_words" not in values
    assert 0 <= values["seed"] < UINT64_MOD


@pytest.mark.parametrize(
    "fields", [{"temperature": 0.0}, {"temperature": 1e-7}, {"top_p": 0.0}, {"top_k": 1, "temperature": 0.8}]
)
def test_greedy_policy(fields: dict[str, Any]) -> None:
    params = resolve_sampling(request(**fields), SETTINGS, max_tokens=8)
    assert params.greedy
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 1.0, 1)


def test_explicit_values_and_top_k_disable() -> None:
    params = resolve_sampling(
        request(
            temperature=0.7,
            top_p=0.5,
            top_k=-1,
            presence_penalty=0.5,
            frequency_penalty=-1.0,
            repetition_penalty=1.1,
            stop=["END", "\n\n"],
        ),
        SETTINGS,
        max_tokens=32,
    )
    values = params.triton_inputs(0)
    assert values["temperature"] == 0.7 and values["top_p"] == 0.5 and values["top_k"] == 0
    assert values["presence_penalty"] == 0.5 and values["frequency_penalty"] == -1.0
    assert values["repetition_penalty"] == 1.1
    assert values["stop_words"] == ["END", "\n\n"]


def test_seeds_per_choice() -> None:
    seeded = resolve_sampling(request(seed=41, n=3), SETTINGS, max_tokens=4)
    assert [seeded.triton_inputs(i)["seed"] for i in range(3)] == [41, 42, 43]
    wrapped = resolve_sampling(request(seed=-1, n=2), SETTINGS, max_tokens=4)
    assert [wrapped.triton_inputs(i)["seed"] for i in range(2)] == [UINT64_MOD - 1, 0]
    unseeded = resolve_sampling(request(n=4), SETTINGS, max_tokens=4)
    assert len({unseeded.triton_inputs(i)["seed"] for i in range(4)}) == 4
