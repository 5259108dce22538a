"""Bad requests → the right 4xx with an OpenAI-shaped body naming the param (no Triton needed).

The app is the real one (`create_app`) driven through httpx's ASGI transport; every case fails before the
gateway talks to Triton, which the backend below asserts.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.errors import APIError
from gateway.settings import GatewaySettings
from gateway.triton.tensors import TritonResponse
from gateway.validation import (
    CompletionRequest,
    DeploymentFeatures,
    parse_chat_request,
    parse_completion_request,
)
from tests.fixtures.asgi import asgi_client
from tests.fixtures.backends import AlwaysReadyBackend

MODEL = "gemma-test"
USER = [{"role": "user", "content": "hi"}]
MAX_MODEL_LEN = 2000  # room for the tool prompt (one CharTokenizer token per character)


class NoTriton(AlwaysReadyBackend):
    """A backend that fails the test if a request gets as far as Triton."""

    url = "no-triton:0"
    generated = 0

    async def generate(self, prompt: str, values: Any, request_id: str) -> AsyncIterator[TritonResponse]:
        NoTriton.generated += 1
        yield TritonResponse(b"ok", 3, 1, False)
        yield TritonResponse(b"", 3, 0, True)


class CharTokenizer:
    """One token per character: enough to exercise the context-length checks."""

    class _Encoding:
        def __init__(self, text: str) -> None:
            self.ids = list(range(len(text)))

    def encode(self, text: str, add_special_tokens: bool = False) -> _Encoding:
        return self._Encoding(text)

    def get_vocab_size(self, **_options: bool) -> int:
        return MAX_MODEL_LEN


def _settings(**overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "model_id": MODEL,
        "model_aliases": ["alias-one"],
        "max_model_len": MAX_MODEL_LEN,
        "max_n": 4,
        "triton_grpc_url": "127.0.0.1:1",
        "images_enabled": False,  # the images-disabled case; fetching is covered by tests/test_e2e_images.py
    }
    values.update(overrides)
    return GatewaySettings(**values)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(_settings(max_request_bytes=64 * 1024), backend=NoTriton(), tokenizer=CharTokenizer())
    async with asgi_client(app) as c:
        yield c


def body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **fields}


def tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

# (case id, request body, expected status, expected param, expected code or None for "don't care")
BAD_REQUESTS: list[tuple[str, Any, int, str | None, str | None]] = [
    ("json-malformed", b"{bad", 400, None, "invalid_json"),
    ("json-not-utf8", b'{"messages": "\xff\xfe"}', 400, None, "invalid_json"),
    (
        "json-nan",
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        400,
        None,
        "invalid_json",
    ),
    ("body-array", [1, 2], 400, None, None),
    (
        "content-lone-surrogate",
        b'{"messages": [{"role": "user", "content": "a\\ud800"}]}',
        400,
        "messages[0].content",
        None,
    ),
    (
        "model-lone-surrogate",
        b'{"model": "\\udc00", "messages": [{"role": "user", "content": "a"}]}',
        400,
        "model",
        None,
    ),
    (
        "role-lone-surrogate",
        b'{"messages": [{"role": "\\ud800", "content": "a"}]}',
        400,
        "messages[0].role",
        None,
    ),
    ("messages-missing", {"model": MODEL}, 400, "messages", None),
    ("messages-empty", body(messages=[]), 400, "messages", None),
    ("messages-string", body(messages="hi"), 400, "messages", None),
    ("message-not-object", body(messages=["hi"]), 400, "messages[0]", None),
    ("role-unknown", body(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role", None),
    ("role-missing", body(messages=[{"content": "x"}]), 400, "messages[0].role", None),
    ("content-int", body(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", None),
    ("content-missing", body(messages=[{"role": "user"}]), 400, "messages[0].content", None),
    (
        "part-type-unknown",
        body(messages=[{"role": "user", "content": [{"type": "video", "video": "x"}]}]),
        400,
        "messages[0].content[0].type",
        None,
    ),
    (
        "part-text-missing",
        body(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        400,
        "messages[0].content[0].text",
        None,
    ),
    (
        "image-url-missing",
        body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "messages[0].content[0].image_url.url",
        None,
    ),
    (
        "images-disabled",
        body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                    ],
                }
            ]
        ),
        400,
        "messages[0].content[1]",
        "unsupported_content",
    ),
    (
        "system-image",
        body(
            messages=[
                {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                *USER,
            ]
        ),
        400,
        "messages[0].content[0].type",
        None,
    ),
    (
        "assistant-no-content",
        body(messages=[*USER, {"role": "assistant"}, *USER]),
        400,
        "messages[1].content",
        None,
    ),
    (
        "roles-not-alternating",
        body(messages=[*USER, *USER]),
        400,
        "messages[1].role",
        "invalid_conversation",
    ),
    (
        "assistant-first",
        body(messages=[{"role": "assistant", "content": "hello"}, *USER]),
        400,
        "messages[0].role",
        "invalid_conversation",
    ),
    ("temperature-high", body(temperature=2.5), 400, "temperature", None),
    ("temperature-negative", body(temperature=-0.1), 400, "temperature", None),
    ("temperature-string", body(temperature="hot"), 400, "temperature", None),
    ("top-p-high", body(top_p=1.5), 400, "top_p", None),
    ("top-p-negative", body(top_p=-1), 400, "top_p", None),
    ("n-zero", body(n=0), 400, "n", None),
    ("n-bool", body(n=True), 400, "n", None),
    ("n-above-limit", body(n=5), 400, "n", None),
    ("n-fraction", body(n=1.5), 400, "n", None),
    ("max-tokens-zero", body(max_tokens=0), 400, "max_tokens", None),
    ("max-completion-tokens-negative", body(max_completion_tokens=-3), 400, "max_completion_tokens", None),
    ("presence-penalty-high", body(presence_penalty=2.5), 400, "presence_penalty", None),
    ("frequency-penalty-low", body(frequency_penalty=-2.5), 400, "frequency_penalty", None),
    ("repetition-penalty-zero", body(repetition_penalty=0), 400, "repetition_penalty", None),
    (
        "repetition-penalty-zero-in-fp32",
        body(repetition_penalty=5e-324),
        400,
        "repetition_penalty",
        "invalid_value",
    ),
    ("top-k-below-minus-one", body(top_k=-2), 400, "top_k", None),
    ("top-k-huge", body(top_k=10**30), 400, "top_k", None),
    ("max-tokens-huge", body(max_tokens=10**30), 400, "max_tokens", None),
    ("seed-string", body(seed="42"), 400, "seed", None),
    ("seed-too-large", body(seed=2**64), 400, "seed", None),
    ("stream-string", body(stream="yes"), 400, "stream", None),
    ("stop-int", body(stop=5), 400, "stop", None),
    ("stop-empty-string", body(stop=""), 400, "stop", None),
    ("stop-list-empty-item", body(stop=["END", ""]), 400, "stop[1]", None),
    (
        "stream-options-without-stream",
        body(stream_options={"include_usage": True}),
        400,
        "stream_options",
        None,
    ),
    (
        "include-usage-string",
        body(stream=True, stream_options={"include_usage": "yes"}),
        400,
        "stream_options.include_usage",
        None,
    ),
    ("logprobs-unsupported", body(logprobs=True), 400, "logprobs", "unsupported_parameter"),
    # The fake backend declares no engine outputs: like an ensemble streamed whole, it returns text only.
    ("top-logprobs-unsupported", body(logprobs=True, top_logprobs=2), 400, "logprobs", None),
    ("top-logprobs-without-logprobs", body(top_logprobs=2), 400, "top_logprobs", "invalid_value"),
    ("logit-bias-not-an-id", body(logit_bias={"hello": 10}), 400, "logit_bias", "invalid_value"),
    ("logit-bias-negative-id", body(logit_bias={"-1": 10}), 400, "logit_bias", "invalid_value"),
    ("logit-bias-past-vocab", body(logit_bias={"262144": 10}), 400, "logit_bias", "invalid_value"),
    ("logit-bias-too-large", body(logit_bias={"42": 101}), 400, "logit_bias.42", None),
    ("regex-missing", body(response_format={"type": "regex"}), 400, "response_format.regex", None),
    (
        "regex-bad",
        body(response_format={"type": "regex", "regex": "(ab"}),
        400,
        "response_format.regex",
        None,
    ),
    (
        "grammar-bad",
        body(response_format={"type": "grammar", "grammar": "root ::= undefined_rule"}),
        400,
        "response_format.grammar",
        "invalid_value",
    ),
    ("user-int", body(user=7), 400, "user", None),
    ("tools-empty", body(tools=[]), 400, "tools", None),
    ("tool-bad-name", body(tools=[tool("not a name")]), 400, "tools[0].function.name", None),
    (
        "tool-type-unknown",
        body(tools=[{"type": "retrieval", "function": {"name": "f"}}]),
        400,
        "tools[0].type",
        None,
    ),
    ("tool-choice-unknown-string", body(tool_choice="sometimes"), 400, "tool_choice", None),
    (
        "tool-choice-unknown-function",
        body(tools=[tool("f")], tool_choice={"type": "function", "function": {"name": "g"}}),
        400,
        "tool_choice",
        None,
    ),
    ("tool-choice-required-without-tools", body(tool_choice="required"), 400, "tool_choice", None),
    (
        "tool-message-unmatched-id",
        body(
            messages=[
                *USER,
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_2", "content": "42"},
            ]
        ),
        400,
        "messages[2].tool_call_id",
        None,
    ),
    (
        "tool-message-without-id",
        body(messages=[*USER, {"role": "tool", "content": "42"}]),
        400,
        "messages[1].tool_call_id",
        None,
    ),
    (
        "tool-call-without-function",
        body(messages=[*USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]),
        400,
        "messages[1].tool_calls[0].function",
        None,
    ),
    ("response-format-type", body(response_format={"type": "xml"}), 400, "response_format.type", None),
    (
        "response-format-schema-missing",
        body(response_format={"type": "json_schema"}),
        400,
        "response_format.json_schema",
        None,
    ),
    ("model-unknown", body(model="gpt-4o"), 404, "model", "model_not_found"),
    (
        "prompt-too-long",
        body(messages=[{"role": "user", "content": "x" * MAX_MODEL_LEN}]),
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "prompt-plus-max-tokens-too-long",
        body(max_tokens=MAX_MODEL_LEN),
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "prompt-plus-max-completion-tokens-too-long",
        body(max_completion_tokens=MAX_MODEL_LEN),
        400,
        "max_completion_tokens",
        "context_length_exceeded",
    ),
    (
        "body-too-large",
        body(messages=[{"role": "user", "content": "x" * 70_000}]),
        413,
        None,
        "request_too_large",
    ),
]


def test_table_is_large_enough() -> None:
    assert len(BAD_REQUESTS) >= 25


@pytest.mark.parametrize(
    ("name", "payload", "status", "param", "code"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
async def test_bad_request(
    client: httpx.AsyncClient, name: str, payload: Any, status: int, param: str | None, code: str | None
) -> None:
    before = NoTriton.generated
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response = await client.post(
        "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    assert NoTriton.generated == before, "the request reached Triton"


# Legacy completions' `logprobs`: an integer 0..5 or null. NoTriton declares no engine outputs (like an
# ensemble streamed whole), so even a valid value is refused, naming `logprobs`.
COMPLETION_LOGPROBS: list[tuple[str, Any, str | None]] = [
    ("above-five", 6, None),
    ("negative", -1, None),
    ("fraction", 1.5, None),
    ("string", "2", None),
    ("bool-chat-style", True, None),  # chat's `logprobs: true` is not the legacy field
    ("zero-without-engine-log-probs", 0, "unsupported_parameter"),
    ("five-without-engine-log-probs", 5, "unsupported_parameter"),
]


@pytest.mark.parametrize(
    ("name", "value", "code"), COMPLETION_LOGPROBS, ids=[c[0] for c in COMPLETION_LOGPROBS]
)
async def test_completion_logprobs_rejected(
    client: httpx.AsyncClient, name: str, value: Any, code: str | None
) -> None:
    before = NoTriton.generated
    response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "logprobs" and error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code
    assert NoTriton.generated == before, "the request reached Triton"


def test_completion_logprobs_by_deployment() -> None:
    """N > 0 needs the top tokens (the CPU reference engine); N = 0 only the sampled tokens' (GPU too)."""
    cpu, gpu = DeploymentFeatures(), DeploymentFeatures(log_probs=True, top_log_probs=False)

    def parse(value: Any, features: DeploymentFeatures) -> CompletionRequest:
        raw = json.dumps({"model": MODEL, "prompt": "x", "logprobs": value}).encode()
        return parse_completion_request(raw, _settings(), features=features)

    assert (parse(5, cpu).logprobs, parse(5, cpu).top_logprobs) == (True, 5)
    assert (parse(2.0, cpu).logprobs, parse(2.0, cpu).top_logprobs) == (True, 2)
    assert (parse(0, gpu).logprobs, parse(0, gpu).top_logprobs) == (True, 0)
    assert (parse(None, gpu).logprobs, parse(None, gpu).top_logprobs) == (False, 0)
    with pytest.raises(APIError) as err:
        parse(1, gpu)
    assert err.value.status == 400 and err.value.param == "logprobs"
    assert "logprobs 0" in err.value.message


@pytest.mark.parametrize(
    "payload",
    [
        # The model card's examples, with the served model id.
        {
            "stream": True,
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Name the european capitals"},
            ],
        },
        # Edge Functions example: no model field.
        {"stream": True, "messages": USER},
        # An alias, nulls for optional fields, and fields clients send that the gateway ignores.
        {
            "model": "alias-one",
            "messages": USER,
            "temperature": None,
            "top_p": None,
            "stop": None,
            "store": False,
            "metadata": {"k": "v"},
            "parallel_tool_calls": True,
            "service_tier": "auto",
            "user": "u-1",
        },
        # Replayed assistant tool calls with an `index`, a matching tool result, tools and tool_choice.
        {
            "messages": [
                *USER,
                {"role": "assistant", "content": "", "tool_calls": [{**CALL, "index": 0}]},
                {"role": "user", "content": "thanks"},
            ],
            "tools": [tool("f")],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        },
        {
            "messages": [{"role": "developer", "content": "Be brief."}, *USER],
            "top_p": 0,
            "n": 2,
            "temperature": 0,
        },
        {
            "messages": USER,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        },
        {
            "messages": USER,
            "max_completion_tokens": 5,
            "max_tokens": 7,
            "seed": -1,
            "top_k": -1,
            "stop": "\n",
        },
    ],
)
async def test_accepted(client: httpx.AsyncClient, payload: dict[str, Any]) -> None:
    response = await client.post("/v1/chat/completions", json=payload)
    assert response.status_code == 200, response.text


async def test_model_routes(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL, "alias-one"]
    assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL
    missing = await client.get("/v1/models/ISTA-DASLab/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_routing_errors_are_openai_shaped(client: httpx.AsyncClient) -> None:
    not_found = await client.get("/v1/nothing")
    assert not_found.status_code == 404 and "error" in not_found.json()
    wrong_method = await client.get("/v1/chat/completions")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


async def test_health_and_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health/live")).status_code == 200
    assert (await client.get("/health/ready")).status_code == 200
    await client.post("/v1/chat/completions", json={"messages": []})
    text = (await client.get("/metrics")).text
    assert 'gateway_http_requests_total{method="POST",route="/v1/chat/completions",status="400"}' in text
    for name in (
        "gateway_time_to_first_token_seconds",
        "gateway_inter_token_latency_seconds",
        "gateway_prompt_tokens_total",
        "gateway_completion_tokens_total",
        "gateway_requests_in_flight",
    ):
        assert name in text


async def test_openapi_documents_the_request_body(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    body_schema = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body_schema["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    schemas = doc["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["type"] == "object"
    # Every $ref in the document resolves.
    refs = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    for ref in refs:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    assert (await client.get("/docs")).status_code == 200


async def test_api_key() -> None:
    app = create_app(_settings(api_key="sekret"), backend=NoTriton())
    async with asgi_client(app) as c:
        denied = await c.post("/v1/chat/completions", json=body())
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "invalid_api_key"
        allowed = await c.post(
            "/v1/chat/completions", json=body(), headers={"Authorization": "Bearer sekret"}
        )
        assert allowed.status_code == 200
        assert (await c.get("/health/live")).status_code == 200  # probes stay open


async def test_triton_unreachable_is_503() -> None:
    """The real gRPC client against a closed port: a clear 503, not a 500 or a hang."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(_settings(triton_grpc_url=f"127.0.0.1:{port}", triton_probe_timeout_s=2.0))
    try:
        async with asgi_client(app) as c:
            for stream in (False, True):
                response = await c.post("/v1/chat/completions", json=body(stream=stream), timeout=20)
                assert response.status_code == 503, response.text
                error = response.json()["error"]
                assert f"127.0.0.1:{port}" in error["message"]
                assert error["code"] == "triton_unavailable"
            ready = await c.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json()["status"] == "unavailable"
    finally:
        await app.state.gateway.backend.close()


# --- tools, tool_choice and tool turns: the rules the prompt renderer relies on --------------------------
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "x"}]


def _call(call_id: str, name: str, arguments: str = "{}") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _rejected(request: dict[str, Any]) -> APIError:
    with pytest.raises(APIError) as e:
        parse_chat_request(json.dumps({"model": MODEL, **request}).encode(), _settings())
    assert e.value.status == 400
    return e.value


@pytest.mark.parametrize(
    ("tools", "tool_choice", "param"),
    [
        ([{"type": "retrieval"}], None, "tools[0].type"),
        ([{"type": "function"}], None, "tools[0].function"),
        ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "dotted.name"}}], None, "tools[0].function.name"),
        ([WEATHER, WEATHER], None, "tools[1].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
            None,
            "tools[0].function.parameters",
        ),
        (TOOLS, "sometimes", "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "missing"}}, "tool_choice"),
        (TOOLS, {"type": "function"}, "tool_choice.function"),
        ([], "required", "tools"),
        (None, {"type": "function", "function": {"name": "get_time"}}, "tool_choice"),
    ],
)
def test_tool_validation_names_the_field(tools: Any, tool_choice: Any, param: str) -> None:
    request: dict[str, Any] = {"messages": ASK}
    if tools is not None:
        request["tools"] = tools
    if tool_choice is not None:
        request["tool_choice"] = tool_choice
    assert _rejected(request).param == param


def test_valid_tool_choices() -> None:
    for choice in (None, "none", "auto", "required", {"type": "function", "function": {"name": "get_time"}}):
        request = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": choice}
        parse_chat_request(json.dumps(request).encode(), _settings())


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([*ASK, {"role": "tool", "tool_call_id": "nope", "content": "r"}], "messages[1].tool_call_id"),
        (
            [
                *ASK,
                {"role": "assistant", "content": None, "tool_calls": [_call("c1", "get_time")]},
                {"role": "tool", "content": "r"},
            ],
            "messages[2].tool_call_id",
        ),
        (
            [
                *ASK,
                {"role": "tool", "tool_call_id": "c1", "content": "early"},
                {"role": "assistant", "content": None, "tool_calls": [_call("c1", "get_time")]},
            ],
            "messages[1].tool_call_id",
        ),
    ],
)
def test_tool_message_without_matching_call(messages: list[dict[str, Any]], param: str) -> None:
    assert _rejected({"messages": messages, "tools": TOOLS}).param == param


def test_bad_assistant_tool_call_arguments() -> None:
    for arguments, message in (("{not json", "a JSON object string"), ("[1]", "a JSON object")):
        replay = [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [_call("c1", "get_time", arguments)]},
        ]
        error = _rejected({"messages": replay, "tools": TOOLS})
        assert error.param == "messages[1].tool_calls[0].function.arguments"
        assert error.message.endswith(message) and error.code == "invalid_conversation"
    no_id = {"type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    replay = [*ASK, {"role": "assistant", "content": None, "tool_calls": [no_id]}]
    assert _rejected({"messages": replay, "tools": TOOLS}).param == "messages[1].tool_calls[0].id"


def test_bad_response_format_names_the_field() -> None:
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}
    assert (
        _rejected({"messages": ASK, "response_format": bad_schema}).param
        == "response_format.json_schema.schema"
    )
    assert _rejected({"messages": ASK, "response_format": {"type": "yaml"}}).param == "response_format.type"
