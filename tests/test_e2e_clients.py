"""Real clients against the real gateway (CPU default, or a deployment via E2E_BASE_URL).

- the openai SDK: a forced tool call that a base model would repeat until `max_tokens` (it must come back
  as `tool_calls`, never as text), streamed arguments equal to the plain ones byte for byte,
  `client.completions` and `client.responses` (plain, streamed, function-call round trip);
- langchain-openai, pydantic-ai and the OpenAI Agents SDK: a forced tool call and a structured output,
  and (Agents SDK) a Responses-API run.

Every answer the `sdk`/`http` fixtures read is checked against OpenAI's openapi.yaml (tests/fixtures/
openai_spec.py); `test_openapi_conformance` says so explicitly and skips where the shared file is absent.
The model is a small base model: the tests judge protocol behaviour, not answers; the forced-call
grammar guarantees parseable calls.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.fixtures.gateway import GatewayTarget
from tests.fixtures.openai_spec import ValidatingTransport, check_answer, require_spec

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CITY_TOOL = {
    "type": "function",
    "function": {
        "name": "record_city",
        "description": "Record a city and its country.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
            "required": ["city", "country"],
        },
    },
}
ASK_CITY = [{"role": "user", "content": "Name a city and its country."}]


class City(BaseModel):
    city: Literal["Paris", "Rome", "Tokyo"]
    country: Literal["France", "Italy", "Japan"]


def _async_sdk(gateway: GatewayTarget) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(), timeout=300)
    return openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key=gateway.api_key or "unused", max_retries=0, http_client=http
    )


# --- the openai SDK: forced tool calls --------------------------------------------------------------
def _forced(gateway: GatewayTarget, **extra: Any) -> dict[str, Any]:
    return {
        "model": gateway.model,
        "messages": ASK_CITY,
        "tools": [CITY_TOOL],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 48,
        **extra,
    }


def test_forced_tool_call_never_becomes_text(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    """The repro: with a free-length list a base model repeats the call until max_tokens and the cut-off
    JSON came back as content. Now: complete calls as tool_calls, duplicates dropped, the list bounded."""
    choice = sdk.chat.completions.create(**_forced(gateway)).choices[0]
    assert choice.message.content is None and choice.message.refusal is None
    calls = choice.message.tool_calls or []
    assert calls, choice
    assert choice.finish_reason in ("tool_calls", "length")
    pairs = [(c.function.name, c.function.arguments) for c in calls]
    assert len(set(pairs)) == len(pairs)  # exact duplicates dropped
    for call in calls:
        assert call.function.name == "record_city"
        assert set(json.loads(call.function.arguments)) == {"city", "country"}


def test_streamed_arguments_are_incremental_and_equal(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    """With parallel_tool_calls false: exactly one call, plain and streamed byte for byte the same."""
    kwargs = _forced(gateway, parallel_tool_calls=False)
    one = sdk.chat.completions.create(**kwargs).choices[0]
    plain = one.message.tool_calls or []
    assert len(plain) == 1 and one.finish_reason == "tool_calls"
    pieces: dict[int, list[str]] = {}
    content = ""
    for chunk in sdk.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            pieces.setdefault(tc.index, []).append((tc.function.arguments if tc.function else None) or "")
    assert content == ""
    assert ["".join(p) for _, p in sorted(pieces.items())] == [c.function.arguments for c in plain]
    assert len([p for p in pieces[0] if p]) > 1  # arguments arrive as generated, not in one piece


# --- the openai SDK: /v1/completions -----------------------------------------------------------------
def test_completions(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    done = sdk.completions.create(
        model=gateway.model, prompt=["The capital of France is", "1, 2, 3,"], max_tokens=8, temperature=0
    )
    assert done.object == "text_completion" and [c.index for c in done.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in done.choices)
    assert done.usage is not None and done.usage.completion_tokens > 0
    streamed = sdk.completions.create(
        model=gateway.model, prompt="1, 2, 3,", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == done.choices[1].text
    ids = sdk.completions.create(model=gateway.model, prompt=[2, 818, 5279], max_tokens=4, temperature=0)
    assert ids.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model=gateway.model, prompt="x", echo=True)
    assert info.value.param == "echo"  # type: ignore[attr-defined]


# --- the openai SDK: /v1/responses -------------------------------------------------------------------
RESPONSES_TOOL = {
    "type": "function",
    "name": "record_city",
    "description": "Record a city and its country.",
    "parameters": CITY_TOOL["function"]["parameters"],  # type: ignore[index]
    "strict": False,
}


def test_responses_plain_and_streamed(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": gateway.model,
        "instructions": "Answer briefly.",
        "input": "Say hello.",
        "max_output_tokens": 12,
        "temperature": 0,
    }
    plain = sdk.responses.create(**kwargs)
    assert plain.status in ("completed", "incomplete") and plain.output_text
    events = list(sdk.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] == f"response.{plain.status}"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == plain.output_text  # greedy: the same text either way


def test_responses_function_call_round_trip(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    ask: list[Any] = [{"role": "user", "content": "Name a city and its country."}]
    first = sdk.responses.create(
        model=gateway.model,
        input=ask,
        tools=[RESPONSES_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_output_tokens=48,
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "record_city" and set(json.loads(call.arguments)) == {"city", "country"}
    follow = [
        *ask,
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "recorded"},
    ]
    second = sdk.responses.create(
        model=gateway.model, input=follow, tools=[RESPONSES_TOOL], tool_choice="none", max_output_tokens=16
    )
    assert second.status in ("completed", "incomplete")
    assert not [item for item in second.output if item.type == "function_call"]
    with pytest.raises(openai.BadRequestError) as info:
        sdk.responses.create(model=gateway.model, input="hi", previous_response_id=first.id)
    assert info.value.param == "previous_response_id"  # type: ignore[attr-defined]


def test_openapi_conformance(gateway: GatewayTarget) -> None:
    """Explicitly: bodies, chunks and events of all three endpoints validate against OpenAI's schema."""
    spec = require_spec()
    checked = 0
    with httpx.Client(base_url=gateway.url, headers=gateway.headers, timeout=300) as client:
        for path, body in [
            ("/v1/chat/completions", {"messages": ASK_CITY, "max_tokens": 8}),
            ("/v1/chat/completions", {**_forced(gateway, parallel_tool_calls=False), "stream": True}),
            ("/v1/completions", {"prompt": "Hello", "max_tokens": 8, "stream": True}),
            ("/v1/completions", {"prompt": "Hello", "max_tokens": 8}),
            ("/v1/responses", {"input": "Hello", "max_output_tokens": 8}),
            (
                "/v1/responses",
                {"input": ASK_CITY, "tools": [RESPONSES_TOOL], "stream": True, "max_output_tokens": 24},
            ),
            ("/v1/responses", {"input": "Hello", "store": True}),
        ]:
            response = client.post(path, json={"model": gateway.model, **body})
            ctype = response.headers.get("content-type", "")
            checked += check_answer(spec, path, response.status_code, ctype, response.content)
    assert checked > 10


# --- langchain-openai ----------------------------------------------------------------------------------
def _langchain(gateway: GatewayTarget) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=gateway.model,
        base_url=f"{gateway.url}/v1",
        api_key=gateway.api_key or "unused",  # type: ignore[arg-type]
        temperature=0,
        max_tokens=64,  # type: ignore[call-arg]
        max_retries=0,
        http_client=httpx.Client(transport=ValidatingTransport(), timeout=300),
    )


def test_langchain_forced_tool_call_and_structured_output(gateway: GatewayTarget) -> None:
    llm = _langchain(gateway)
    message = llm.bind_tools([City], tool_choice="required").invoke("Name a city and its country.")
    assert message.tool_calls and message.tool_calls[0]["name"] == "City"
    City.model_validate(message.tool_calls[0]["args"])
    for method in ("function_calling", "json_schema"):
        result = llm.with_structured_output(City, method=method).invoke("Name a city and its country.")
        assert isinstance(result, City), (method, result)  # was None when the call came back as text


# --- pydantic-ai ---------------------------------------------------------------------------------------
def _pydantic_ai_model(gateway: GatewayTarget) -> Any:
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIChatModel(gateway.model, provider=OpenAIProvider(openai_client=_async_sdk(gateway)))


def test_pydantic_ai_tool_output_and_native_output(gateway: GatewayTarget) -> None:
    from pydantic_ai import Agent, NativeOutput

    settings: Any = {"temperature": 0, "max_tokens": 64}
    model = _pydantic_ai_model(gateway)
    # Default output mode: a forced call of the output tool.
    tool_run = Agent(model, output_type=City, model_settings=settings).run_sync(
        "Name a city and its country."
    )
    assert isinstance(tool_run.output, City)
    native = Agent(model, output_type=NativeOutput(City), model_settings=settings)
    assert isinstance(native.run_sync("Name a city and its country.").output, City)


# --- the OpenAI Agents SDK ----------------------------------------------------------------------------
def _agents_run(gateway: GatewayTarget, responses_api: bool, **agent_args: Any) -> Any:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # no trace export to OpenAI from a test
    client = _async_sdk(gateway)
    model_class = OpenAIResponsesModel if responses_api else OpenAIChatCompletionsModel
    settings = agent_args.pop("model_settings", ModelSettings(temperature=0, max_tokens=64))
    agent = Agent(
        name="tester",
        instructions="You record cities.",
        model=model_class(model=gateway.model, openai_client=client),
        model_settings=settings,
        **agent_args,
    )
    return Runner.run_sync(agent, "Name a city and its country.", max_turns=3)


@pytest.mark.parametrize("responses_api", [False, True], ids=["chat", "responses"])
def test_agents_sdk_forced_tool_call(gateway: GatewayTarget, responses_api: bool) -> None:
    from agents import ModelSettings, function_tool

    recorded: list[tuple[str, str]] = []

    @function_tool
    def record_city(city: str, country: str) -> str:
        """Record a city and its country."""
        recorded.append((city, country))
        return f"recorded {city}"

    result = _agents_run(
        gateway,
        responses_api,
        tools=[record_city],
        tool_use_behavior="stop_on_first_tool",
        model_settings=ModelSettings(
            tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=64
        ),
    )
    assert len(recorded) == 1  # the tool really ran (it was reported as text before)
    assert result.final_output == f"recorded {recorded[0][0]}"


@pytest.mark.parametrize("responses_api", [False, True], ids=["chat", "responses"])
def test_agents_sdk_structured_output(gateway: GatewayTarget, responses_api: bool) -> None:
    result = _agents_run(gateway, responses_api, output_type=City)
    assert isinstance(result.final_output, City)


def test_agents_sdk_responses_text_run(gateway: GatewayTarget) -> None:
    from agents import ModelSettings

    # The SDK treats `response.incomplete` (max_output_tokens reached) as a failed run, as it should; a
    # base model rambles, so the gateway's `stop` extension ends the answer at the first line.
    settings = ModelSettings(temperature=0, max_tokens=64, extra_body={"stop": ["\n"]})
    result = _agents_run(gateway, responses_api=True, model_settings=settings)
    assert isinstance(result.final_output, str)
