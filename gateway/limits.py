"""Per-request limits beyond the schema: message count, prompt tokens, max_tokens, the context length.

They bound what one request may cost before it reaches the engine; every violation is a 400 naming the
field, with OpenAI-style codes. The body size cap (413) is enforced while reading the body (app.py); the
image count (`images_max_per_request`) by the image fetcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.errors import bad_request
from gateway.settings import GatewaySettings
from gateway.validation import ChatRequest, GenerationRequest


def check_request(request: ChatRequest, settings: GatewaySettings) -> None:
    """The limits a validated request can be checked against before its prompt is rendered."""
    check_messages(request.messages, settings)
    check_max_tokens(request.max_tokens, request.max_tokens_param, settings)


def check_messages(messages: Sequence[Any], settings: GatewaySettings) -> None:
    """Checks that need no tokenizer (run before rendering, so huge conversations are refused cheaply)."""
    if len(messages) > settings.max_messages:
        raise bad_request(
            f"messages has {len(messages)} entries; this deployment accepts at most {settings.max_messages}",
            "messages",
            "too_many_messages",
        )


def check_max_tokens(max_tokens: int | None, param: str, settings: GatewaySettings) -> None:
    if max_tokens is not None and max_tokens > settings.max_completion_tokens:
        raise bad_request(
            f"{param} is {max_tokens}; this deployment accepts at most {settings.max_completion_tokens}",
            param,
            "invalid_value",
        )


def check_prompt_tokens(
    prompt_tokens: int | None, settings: GatewaySettings, prompt_param: str = "messages"
) -> None:
    limit = settings.max_prompt_tokens
    if prompt_tokens is not None and limit is not None and prompt_tokens > limit:
        raise bad_request(
            f"the prompt has {prompt_tokens} tokens; this deployment accepts at most {limit}",
            prompt_param,
            "context_length_exceeded",
        )


def budget(
    prompt_tokens: int | None,
    request: GenerationRequest,
    settings: GatewaySettings,
    prompt_param: str = "messages",
) -> int:
    """The completion's token budget: the prompt and the completion must fit the model's context length.

    Without a tokenizer (`prompt_tokens` None) only the request's own `max_tokens` can be checked; the
    default then is `default_max_tokens`, otherwise whatever room the prompt leaves (at most that default).
    """
    check_prompt_tokens(prompt_tokens, settings, prompt_param)
    limit = settings.max_model_len
    param = request.max_tokens_param
    if request.max_tokens is not None and request.max_tokens > limit:
        raise bad_request(
            f"{param} is {request.max_tokens}, above this model's context length of {limit} tokens",
            param,
            "context_length_exceeded",
        )
    if prompt_tokens is None:
        return request.max_tokens or settings.default_max_tokens
    if prompt_tokens >= limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your {prompt_param} "
            f"resulted in {prompt_tokens} tokens. Please reduce the length of the {prompt_param}.",
            prompt_param,
            "context_length_exceeded",
        )
    if request.max_tokens is not None and prompt_tokens + request.max_tokens > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + request.max_tokens} tokens ({prompt_tokens} in the {prompt_param}, "
            f"{request.max_tokens} in the completion). Please reduce the length of the {prompt_param} "
            "or completion.",
            param,
            "context_length_exceeded",
        )
    return request.max_tokens or min(settings.default_max_tokens, limit - prompt_tokens)
