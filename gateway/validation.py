"""Request validation: JSON parsing, the jsonschema check, and the rules a schema cannot express.

Every violation becomes an `APIError(400)` whose `param` is the offending field as clients name it
(`temperature`, `messages[0].role`, `tools[1].function.name`).
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema_rs
from jsonschema import Draft7Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError, best_match

from gateway.errors import APIError, bad_request
from gateway.responses_input import to_chat_body
from gateway.settings import GatewaySettings
from gemma3_core.constants import SENTENCEPIECE_VOCAB

SCHEMA_DIR = Path(__file__).parent / "schemas"
CHAT_SCHEMA = "chat_request"  # one JSON Schema per endpoint: schemas/<name>.schema.json
COMPLETION_SCHEMA = "completion_request"
RESPONSES_SCHEMA = "responses_request"
_MAX_MESSAGE_CHARS = 300  # jsonschema messages quote the instance; a 1 MB string must not come back


@functools.cache
def load_schema(name: str = CHAT_SCHEMA) -> dict[str, Any]:
    with (SCHEMA_DIR / f"{name}.schema.json").open(encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
        return schema


@functools.cache
def _validator(name: str = CHAT_SCHEMA) -> Draft7Validator:
    # No format checker: `format: uri` stays an annotation (data: URLs and odd-but-valid URLs are the
    # image fetcher's business, not the schema's).
    return Draft7Validator(load_schema(name))


@functools.cache
def _fast_validator(name: str = CHAT_SCHEMA) -> jsonschema_rs.Validator:
    """The same schema in Rust (jsonschema-rs): about 0.5 µs per valid request against 100-300 µs in Python,
    which is most of a request's validation cost under a burst. It only ever says "valid": whatever it
    rejects goes to the Python validator above, which decides and words the error, so its stricter corners
    (formats, `$` before a trailing newline) cannot turn away a request the reference accepts."""
    return jsonschema_rs.validator_for(load_schema(name), validate_formats=False)


def param_path(path: Iterable[str | int]) -> str | None:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _where(err: ValidationError) -> list[str | int]:
    """The instance path the error is about; a missing property counts as part of the path."""
    path = list(err.absolute_path)
    required = err.validator_value
    if err.validator == "required" and isinstance(err.instance, dict) and isinstance(required, list):
        missing = next((p for p in required if p not in err.instance), None)
        if missing is not None:
            path.append(missing)
    return path


def _most_specific(err: ValidationError) -> ValidationError:
    # anyOf/oneOf report one error per branch. Go down only when a branch failed deeper in the instance
    # (e.g. `stop[1]` too short); errors at the same spot ("not null", "not a string") just confuse.
    while err.context:
        deeper = [e for e in err.context if len(_where(e)) > len(err.absolute_path)]
        if not deeper:
            break
        err = best_match(deeper)
    return err


def _expected_types(err: ValidationError) -> list[str]:
    types: list[str] = []
    for branch in err.context or []:
        if branch.validator == "type":
            value = branch.validator_value
            types.extend(str(v) for v in (value if isinstance(value, list) else [value]))
        elif branch.validator in ("enum", "const"):
            value = branch.validator_value
            values = value if branch.validator == "enum" and isinstance(value, list) else [value]
            types.extend(json.dumps(v) for v in values)
    return list(dict.fromkeys(types))


def _describe(err: ValidationError) -> tuple[str, str | None]:
    param = param_path(_where(err))
    if err.validator in ("anyOf", "oneOf"):
        expected = _expected_types(err)
        shown = json.dumps(err.instance)[:80] if _is_small(err.instance) else type(err.instance).__name__
        message = f"{shown} is not valid here" + (f"; expected {', '.join(expected)}" if expected else "")
    else:
        message = err.message
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + "…"
    if param:
        message = f"Invalid value for '{param}': {message}"
    return message, param


def _is_small(value: Any) -> bool:
    return (
        value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) < 80)
    )


def schema_error(body: Any, name: str = CHAT_SCHEMA) -> APIError | None:
    """The most relevant violation of `body` against schemas/<name>.schema.json, or None when it conforms."""
    try:
        if _fast_validator(name).is_valid(body):
            return None
    except ValueError:  # what Rust cannot take (lone surrogates): the reference decides
        pass
    error = best_match(_validator(name).iter_errors(body))
    if error is None:
        return None
    message, param = _describe(_most_specific(error))
    return bad_request(message, param, code="invalid_value" if param else "invalid_request")


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity; JSON does not, and a NaN temperature must not reach the engine.
    raise ValueError(f"invalid JSON constant {name}")


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        detail = str(exc)[:_MAX_MESSAGE_CHARS]
        raise bad_request(f"Request body is not valid JSON: {detail}", None, code="invalid_json") from None


@dataclass
class GenerationRequest:
    """What every generating endpoint resolves the same way: model, sampling, limits, streaming."""

    model: str
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass
class ChatRequest(GenerationRequest):
    """A validated chat request, with defaults resolved and every field typed."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


@dataclass(frozen=True)
class DeploymentFeatures:
    """What the deployed engine can return, from its declared outputs (gateway.triton.tensors.ModelSpec)."""

    log_probs: bool = True
    top_log_probs: bool = True


@dataclass
class CompletionRequest(GenerationRequest):
    """A validated legacy completion request: one or more prompts, each a string or token ids."""

    prompts: list[str | list[int]] = field(default_factory=list)


def _integral_to_int(value: Any) -> Any:
    """Floats with no fractional part (which the schema accepts as integers) as ints, in nested lists."""
    if isinstance(value, list):
        return [_integral_to_int(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _as_fp32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


def _opt_float(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    return None if value is None else float(value)


def _opt_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    return None if value is None else int(value)


def _schema_problem(schema: Any) -> str | None:
    """Why `schema` is not a usable JSON Schema (checked against its own metaschema), or None."""
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        return f"invalid JSON Schema: {exc.message}"
    return None


def _check_tools(body: dict[str, Any]) -> None:
    """Tools, tool_choice, response_format and the tool turns of the conversation, beyond the schema.

    Codes and wording are the ones clients have seen: a problem found while rendering the conversation
    (tool definitions, replayed calls) is `invalid_conversation`, a guided-decoding schema `invalid_value`.
    """
    tools = body.get("tools") or []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        fn = tool["function"]
        name = fn["name"]
        if name in names:
            raise bad_request(
                f"duplicate function name '{name}'", f"tools[{i}].function.name", "invalid_conversation"
            )
        names.add(name)
        problem = _schema_problem(fn["parameters"]) if fn.get("parameters") is not None else None
        if problem is not None:
            raise bad_request(problem, f"tools[{i}].function.parameters", "invalid_conversation")
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in names:
            raise bad_request(
                f"tool_choice names function '{name}', which is not in `tools`",
                "tool_choice",
                "invalid_value",
            )
    elif choice == "required" and not tools:
        raise bad_request(
            "tool_choice 'required' needs a non-empty `tools` list", "tool_choice", "invalid_value"
        )

    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        schema = response_format["json_schema"].get("schema")
        problem = _schema_problem(schema) if schema is not None else None
        if problem is not None:
            raise bad_request(problem, "response_format.json_schema.schema", "invalid_value")
    kind = response_format.get("type")
    if kind in PATTERN_GUIDES:
        problem = _pattern_problem(kind, response_format[kind])
        if problem is not None:
            raise bad_request(problem, f"response_format.{kind}", "invalid_value")

    # A replayed call carries a JSON object; a tool result must answer a call made earlier.
    seen_ids: set[str] = set()
    for i, message in enumerate(body["messages"]):
        if message["role"] == "assistant":
            for j, call in enumerate(message.get("tool_calls") or []):
                _check_arguments(call["function"].get("arguments"), f"messages[{i}].tool_calls[{j}]")
                seen_ids.add(call["id"])
        elif message["role"] == "tool" and message["tool_call_id"] not in seen_ids:
            raise bad_request(
                f"messages[{i}] answers tool_call_id '{message['tool_call_id']}', which no earlier "
                "assistant message's tool_calls contains",
                f"messages[{i}].tool_call_id",
                "invalid_value",
            )


# response_format types that constrain the output with a pattern -> TensorRT-LLM's guide type.
PATTERN_GUIDES: dict[str, str] = {"regex": "regex", "grammar": "ebnf_grammar"}


def _pattern_problem(kind: str, pattern: str) -> str | None:
    """Why xgrammar (the engines' guided-decoding backend) cannot compile `pattern`, or None.

    Without xgrammar in the gateway's environment the pattern is not checked here; the engine then refuses
    a bad one (a 400 from its error message, gateway/errors.py)."""
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    try:
        if kind == "regex":
            xgr.Grammar.from_regex(pattern)
        else:
            xgr.Grammar.from_ebnf(pattern)
    except Exception as exc:  # xgrammar raises RuntimeError or its own error types
        return f"invalid {kind}: {str(exc)[:_MAX_MESSAGE_CHARS]}"
    return None


def _logit_bias(body: dict[str, Any]) -> dict[int, float]:
    """`logit_bias` keys as token ids: decimal integers naming a token of the vocabulary."""
    bias: dict[int, float] = {}
    for key, value in (body.get("logit_bias") or {}).items():
        token = int(key) if key.isascii() and key.isdigit() else -1
        if not 0 <= token < SENTENCEPIECE_VOCAB:
            raise bad_request(
                f"logit_bias keys must be token ids in [0, {SENTENCEPIECE_VOCAB}); got {key[:40]!r}",
                "logit_bias",
                "invalid_value",
            )
        bias[token] = float(value)
    return bias


def _check_log_probs(body: dict[str, Any], features: DeploymentFeatures) -> tuple[bool, int]:
    logprobs = bool(body.get("logprobs"))
    top = _opt_int(body, "top_logprobs") or 0
    if top and not logprobs:
        # As OpenAI: top_logprobs means nothing without logprobs.
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs", "invalid_value")
    if logprobs and not features.log_probs:
        raise bad_request(
            "logprobs are not returned by this deployment's engine", "logprobs", "unsupported_parameter"
        )
    if top and not features.top_log_probs:
        raise bad_request(
            "top_logprobs > 0 is not supported by this deployment's engine (it returns the sampled "
            "tokens' log probs only); send top_logprobs 0",
            "top_logprobs",
            "unsupported_parameter",
        )
    return logprobs, top


def _completion_log_probs(body: dict[str, Any], features: DeploymentFeatures) -> tuple[bool, int]:
    """Legacy `logprobs: N` (0..5, schema-checked; null: none): the sampled tokens' log probs plus the N most
    likely tokens at each position. N = 0 asks for the sampled tokens only, which every engine that returns
    log probs can do; N > 0 needs the top tokens."""
    value = body.get("logprobs")
    if value is None:
        return False, 0
    top = int(value)
    if not features.log_probs:
        raise bad_request(
            "logprobs are not returned by this deployment's engine", "logprobs", "unsupported_parameter"
        )
    if top and not features.top_log_probs:
        raise bad_request(
            f"logprobs {top} asks for the most likely tokens, which this deployment's engine does not "
            "return (it returns the sampled tokens' log probs only); send logprobs 0",
            "logprobs",
            "unsupported_parameter",
        )
    return True, top


def _check_arguments(arguments: str | None, param: str) -> None:
    """A replayed call's `arguments`: a string holding a JSON object (empty means no arguments)."""
    if not arguments:
        return
    try:
        decoded = json.loads(arguments)
    except ValueError:
        raise bad_request(
            "tool call arguments must be a JSON object string",
            f"{param}.function.arguments",
            "invalid_conversation",
        ) from None
    if not isinstance(decoded, dict):
        raise bad_request(
            "tool call arguments must be a JSON object", f"{param}.function.arguments", "invalid_conversation"
        )


def _refuse_images(messages: list[dict[str, Any]]) -> None:
    """A deployment without images must not drop an image part silently (the answer would be about less)."""
    for i, message in enumerate(messages):
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if part.get("type") == "image_url":
                raise bad_request(
                    "images are not enabled on this deployment",
                    f"messages[{i}].content[{j}]",
                    "unsupported_content",
                )


def _invalid_unicode(value: Any, path: list[str | int]) -> list[str | int] | None:
    """Path of the first string holding a lone surrogate (JSON allows "\\ud800"; UTF-8 cannot carry it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _invalid_unicode(item, [*path, str(key)])
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _invalid_unicode(item, [*path, i])
            if found is not None:
                return found
    return None


ModelKnown = Callable[[str], bool] | None

# Fields whose strings reach the prompt, the engine or an error message.
_TEXT_FIELDS = ("model", "messages", "stop", "tools", "tool_choice", "response_format", "user")


def _parse_body(raw: bytes, schema: str, text_fields: Iterable[str]) -> dict[str, Any]:
    body = parse_json(raw)
    if schema == RESPONSES_SCHEMA:
        _check_responses_types(body)
    error = schema_error(body, schema)
    if error is not None:
        raise error
    assert isinstance(body, dict)
    for key in text_fields:
        bad = _invalid_unicode(body.get(key), [key])
        if bad is not None:
            raise bad_request(
                "String contains a lone surrogate (not valid Unicode)", param_path(bad), "invalid_value"
            )
    return body


def _resolve_model(body: dict[str, Any], settings: GatewaySettings, model_known: ModelKnown) -> str:
    model = body.get("model") or settings.model_id
    if model not in settings.served_model_ids and not (model_known is not None and model_known(model)):
        raise APIError(
            404,
            f"The model '{model}' does not exist. Available: {', '.join(settings.served_model_ids)}",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )
    return model


def _generation_fields(
    body: dict[str, Any], settings: GatewaySettings, model_known: ModelKnown
) -> dict[str, Any]:
    """The `GenerationRequest` fields of a chat or completion body (already schema-checked)."""
    model = _resolve_model(body, settings, model_known)
    stream = bool(body.get("stream"))
    stream_options = body.get("stream_options")
    if stream_options is not None and not stream:
        # OpenAI, vLLM and TensorRT-LLM all reject this; silently ignoring it hides a client bug.
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")

    n = _opt_int(body, "n") or 1
    if n > settings.max_n:
        raise bad_request(f"n must be at most {settings.max_n} on this deployment", "n", "invalid_value")

    repetition_penalty = _opt_float(body, "repetition_penalty")
    # The engine takes FP32: a positive double that rounds to 0 there would be refused by the engine.
    if repetition_penalty is not None and _as_fp32(repetition_penalty) <= 0:
        raise bad_request("repetition_penalty must be greater than 0", "repetition_penalty", "invalid_value")

    # max_completion_tokens supersedes the deprecated max_tokens when both are sent.
    max_tokens_param = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(dict.fromkeys(stop or []))
    return {
        "model": model,
        "n": n,
        "stream": stream,
        "include_usage": bool(stream and stream_options and stream_options.get("include_usage")),
        "max_tokens": _opt_int(body, max_tokens_param),
        "max_tokens_param": max_tokens_param,
        "temperature": _opt_float(body, "temperature"),
        "top_p": _opt_float(body, "top_p"),
        "top_k": _opt_int(body, "top_k"),
        "seed": _opt_int(body, "seed"),
        "presence_penalty": _opt_float(body, "presence_penalty"),
        "frequency_penalty": _opt_float(body, "frequency_penalty"),
        "repetition_penalty": repetition_penalty,
        "stop": stops,
        "logit_bias": _logit_bias(body),
    }


def parse_chat_request(
    raw: bytes,
    settings: GatewaySettings,
    model_known: ModelKnown = None,
    features: DeploymentFeatures | None = None,
) -> ChatRequest:
    """`model_known` accepts further model ids (LoRA adapters) besides the deployment's own; `features`
    says what the engine can return (None: not known yet, everything is accepted)."""
    body = _parse_body(raw, CHAT_SCHEMA, _TEXT_FIELDS)
    return chat_request_from_body(body, settings, model_known, features)


def chat_request_from_body(
    body: dict[str, Any],
    settings: GatewaySettings,
    model_known: ModelKnown = None,
    features: DeploymentFeatures | None = None,
) -> ChatRequest:
    """A chat body that passed the chat schema → `ChatRequest` (the rules a schema cannot express)."""
    fields = _generation_fields(body, settings, model_known)
    # Features that would change the response's meaning if silently dropped.
    logprobs, top_logprobs = _check_log_probs(body, features or DeploymentFeatures())
    _check_tools(body)
    if not settings.images_enabled:
        _refuse_images(body["messages"])
    return ChatRequest(
        **fields,
        messages=body["messages"],
        tools=body.get("tools"),
        tool_choice=body.get("tool_choice"),
        response_format=body.get("response_format"),
        parallel_tool_calls=body.get("parallel_tool_calls"),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


# --- legacy completions ---------------------------------------------------------------------------
_COMPLETION_TEXT_FIELDS = ("model", "prompt", "stop", "user")


def parse_completion_request(
    raw: bytes,
    settings: GatewaySettings,
    model_known: ModelKnown = None,
    vocab_size: int | None = None,
    features: DeploymentFeatures | None = None,
) -> CompletionRequest:
    """`vocab_size`: the tokenizer's (token-id prompts need it; None: they are refused); `features`: what
    the engine can return (None: not known yet, everything is accepted)."""
    body = _parse_body(raw, COMPLETION_SCHEMA, _COMPLETION_TEXT_FIELDS)
    fields = _generation_fields(body, settings, model_known)
    for name, why in (
        # The engine returns no log probs for prompt tokens, so echo with logprobs could not be honest either.
        ("echo", "echo is not supported by this deployment"),
        ("suffix", "suffix (insertion) is not supported by this model"),
    ):
        if body.get(name):
            raise bad_request(why, name, "unsupported_parameter")
    logprobs, top_logprobs = _completion_log_probs(body, features or DeploymentFeatures())
    best_of = body.get("best_of")
    if best_of is not None and best_of != fields["n"] and best_of != 1:
        raise bad_request("best_of is not supported by this deployment", "best_of", "unsupported_parameter")
    # JSON Schema counts 2.0 as an integer; the engine needs Python ints.
    prompt = _integral_to_int(body["prompt"])
    # A string, a list of strings, a list of token ids, or a list of token-id lists (schema-checked).
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    for i, item in enumerate(prompts):
        if isinstance(item, list):
            param = "prompt" if len(prompts) == 1 and not isinstance(prompt[0], list) else f"prompt[{i}]"
            if vocab_size is None:
                raise bad_request(
                    "token-id prompts need the deployment's tokenizer (GATEWAY_TOKENIZER_DIR)",
                    param,
                    "unsupported_parameter",
                )
            bad = next((t for t in item if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise bad_request(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})", param)
    if len(prompts) * fields["n"] > settings.max_n:
        raise bad_request(
            f"prompts × n is {len(prompts) * fields['n']}; this deployment accepts at most {settings.max_n}",
            "prompt",
            "invalid_value",
        )
    return CompletionRequest(**fields, prompts=prompts, logprobs=logprobs, top_logprobs=top_logprobs)


# --- Responses API --------------------------------------------------------------------------------
_RESPONSES_TEXT_FIELDS = ("model", "input", "instructions", "tools", "tool_choice", "text", "user")


_RESPONSES_ITEM_TYPES = ("message", "function_call", "function_call_output")


def _check_responses_types(body: Any) -> None:
    """Built-in tools (web_search, …) and stored items (item_reference, …) need OpenAI's servers: say so
    by name rather than with a schema mismatch."""
    tools = body.get("tools") if isinstance(body, dict) else None
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind != "function":
            raise bad_request(
                f"tool type '{kind[:40]}' is not supported by this deployment; only function tools are",
                f"tools[{i}].type",
                "unsupported_parameter",
            )
    items = body.get("input") if isinstance(body, dict) else None
    for i, item in enumerate(items if isinstance(items, list) else []):
        kind = item.get("type") if isinstance(item, dict) else None
        if isinstance(kind, str) and kind not in _RESPONSES_ITEM_TYPES:
            raise bad_request(
                f"input item type '{kind[:40]}' is not supported by this deployment (stateless; items: "
                f"{', '.join(_RESPONSES_ITEM_TYPES)})",
                f"input[{i}].type",
                "unsupported_parameter",
            )


def parse_responses_request(
    raw: bytes, settings: GatewaySettings, model_known: ModelKnown = None
) -> tuple[ChatRequest, dict[str, Any]]:
    """A Responses body → (the equivalent `ChatRequest`, the body). The gateway keeps no state, so what
    needs stored responses is refused rather than silently answered without the earlier context."""
    body = _parse_body(raw, RESPONSES_SCHEMA, _RESPONSES_TEXT_FIELDS)
    if body.get("store"):
        raise bad_request(
            "this deployment is stateless: responses are not stored; send store: false (or leave it out)",
            "store",
            "unsupported_parameter",
        )
    if body.get("previous_response_id") is not None:
        raise bad_request(
            "previous_response_id needs stored responses, which this stateless deployment does not keep; "
            "send the whole conversation in `input`",
            "previous_response_id",
            "unsupported_parameter",
        )
    if body.get("background"):
        raise bad_request("background responses are not supported", "background", "unsupported_parameter")
    chat_body = to_chat_body(body)
    error = schema_error(chat_body, CHAT_SCHEMA)  # the translation of a valid body is valid; make sure
    if error is not None:
        raise error
    request = chat_request_from_body(chat_body, settings, model_known)
    if request.max_tokens is not None:
        request.max_tokens_param = "max_output_tokens"
    return request, body
