"""`POST /v1/completions`, OpenAI's legacy endpoint: raw prompts, no chat template.

It reuses the chat path: validation (gateway/validation.py), limits, sampling, admission and the
`Generation` of `ChatService.serve`; only the prompt and the response shape differ.

- `prompt`: a string, a list of strings, token ids, or a list of token-id lists; each prompt gets `n`
  choices (choice `i * n + j` is prompt i's j-th), so `len(prompts) × n ≤ GATEWAY_MAX_N`.
- `<bos>`: Gemma needs it first and the engine's tokenizer adds no special tokens, so the gateway prepends
  `<bos>` unless the prompt already starts with it (text `"<bos>…"` or token id 2). Special-token
  strings in a text prompt (`<start_of_turn>`) are read as those tokens, so a hand-rendered chat works.
- token-id prompts are decoded (special tokens kept) and the text goes through the engine's tokenizer;
  that re-encoding is usually, not always, the same ids.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway import limits, sse
from gateway.chat import ChatService
from gateway.generation import Delta, Event, Finish, Generation
from gateway.prepare import ChatContext
from gateway.responses import wait_all
from gateway.sampling import resolve_sampling
from gateway.validation import parse_completion_request
from gemma3_core import constants as C

OBJECT = "text_completion"


def with_bos(text: str) -> str:
    return text if text.startswith(C.BOS) else C.BOS + text


async def _prompt_text(prompt: str | list[int], tokenizer: Any | None) -> str:
    if isinstance(prompt, str):
        return with_bos(prompt)
    assert tokenizer is not None  # validation refuses token ids without a tokenizer
    ids = prompt if prompt[:1] == [C.BOS_ID] else [C.BOS_ID, *prompt]
    return await asyncio.to_thread(tokenizer.decode, ids, skip_special_tokens=False)


async def prepare_completion(raw: bytes, service: ChatService) -> ChatContext:
    settings, lora = service.settings, service.lora
    tokenizer = service.tokenizer()
    vocab = tokenizer.get_vocab_size(with_added_tokens=True) if tokenizer is not None else None
    request = parse_completion_request(raw, settings, lora.knows if lora else None, vocab)
    limits.check_max_tokens(request.max_tokens, request.max_tokens_param, settings)
    adapter = lora.resolve(request.model) if lora else None
    prompts = [await _prompt_text(p, tokenizer) for p in request.prompts]
    counts = [await service.encode_len(p) for p in prompts]
    known = [c for c in counts if c is not None]
    # One budget for all prompts: the longest one must fit the context.
    max_tokens = limits.budget(max(known) if known else None, request, settings, "prompt")
    return ChatContext(
        request=request,
        prompt=prompts[0],
        prompts=prompts,
        prompt_tokens=sum(known) if known else None,
        sampling=resolve_sampling(request, settings, max_tokens),
        id=f"cmpl-{uuid.uuid4().hex}",
        adapter=adapter.name if adapter is not None else None,
    )


def _choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


async def collect_completion(generation: Generation, first: Event | None = None) -> dict[str, Any]:
    """The non-streamed `text_completion` body."""
    await wait_all(generation, first)
    ctx = generation.ctx
    return {
        "id": ctx.id,
        "object": OBJECT,
        "created": ctx.created,
        "model": ctx.request.model,
        "choices": [_choice(c.index, c.text, c.finish_reason) for c in generation.choices],
        "usage": generation.usage(),
    }


class CompletionChunkWriter:
    """Streamed `text_completion` objects (same shape as the body, one choice each, `finish_reason` null
    until the choice's last chunk, as OpenAI streams them), then `[DONE]`."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        ctx = generation.ctx
        self.head = {"id": ctx.id, "object": OBJECT, "created": ctx.created, "model": ctx.request.model}
        self.include_usage = ctx.request.include_usage

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        # Unlike chat chunks, no `"usage": null` on the others: OpenAI's schema for these objects has a
        # non-nullable usage.
        chunk: dict[str, Any] = {**self.head, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return sse.encode_event(chunk)

    def start(self, out: list[bytes]) -> None:
        pass

    def encode(self, event: Event, out: list[bytes]) -> bool:
        if isinstance(event, Delta):
            out.append(self._chunk([_choice(event.index, event.text, None)]))
            return False
        if isinstance(event, Finish):
            out.append(self._chunk([_choice(event.index, "", event.reason)]))
            return not self.generation.unfinished
        out.append(sse.error_event(event.error.body()))
        return True

    def end(self, out: list[bytes]) -> None:
        if not self.generation.unfinished and self.include_usage:
            out.append(self._chunk([], self.generation.usage()))
        out.append(sse.DONE)


async def handle_completion(service: ChatService, raw: bytes, http_request: Request) -> Response:
    async def answer(root: Any) -> Response:
        ctx = await prepare_completion(raw, service)
        return await service.serve(ctx, http_request, collect_completion, CompletionChunkWriter, root)

    return await service.traced(http_request, answer)
