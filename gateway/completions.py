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
- `logprobs: N`: the legacy shape (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) of the same
  per-token entries chat returns (gateway.generation.ChoiceLogProbs owns the token strings, so the tokens
  joined equal the text). Each `top_logprobs` map holds the N most likely tokens and always the sampled
  one under its `tokens` string, so up to N + 1 keys (N = 0: the sampled token alone), as OpenAI
  describes it; alternatives whose strings coincide (byte-fallback pieces) keep the likelier one.
  `text_offset` counts characters (code points) of the choice's text, across a stream's chunks. A
  streamed choice's last chunk (finish_reason, no text) carries empty lists.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway import limits, sse
from gateway.chat import ChatService
from gateway.generation import Choice, Delta, Event, Finish, Generation
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
    features = await service.features()
    request = parse_completion_request(raw, settings, lora.knows if lora else None, vocab, features)
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


def legacy_logprobs(entries: Sequence[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """Chat `logprobs.content` entries in the legacy completions shape; `offset`: where the first token
    starts in the choice's text."""
    tokens: list[str] = []
    values: list[float] = []
    offsets: list[int] = []
    tops: list[dict[str, float]] = []
    for entry in entries:
        token, value = entry["token"], entry["logprob"]
        top: dict[str, float] = {}
        for alt in entry["top_logprobs"]:
            if alt["bytes"] == entry["bytes"] or alt["token"] == token:
                top.setdefault(token, value)  # the sampled token, at its rank, under its `tokens` string
            else:
                top.setdefault(alt["token"], alt["logprob"])
        top.setdefault(token, value)
        tokens.append(token)
        values.append(value)
        offsets.append(offset)
        tops.append(top)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def _choice_of(choice: Choice) -> dict[str, Any]:
    lp = choice.log_probs
    logprobs = legacy_logprobs(lp.released) if lp is not None else None
    return _choice(choice.index, choice.text, choice.finish_reason, logprobs)


async def collect_completion(generation: Generation, first: Event | None = None) -> dict[str, Any]:
    """The non-streamed `text_completion` body."""
    await wait_all(generation, first)
    ctx = generation.ctx
    return {
        "id": ctx.id,
        "object": OBJECT,
        "created": ctx.created,
        "model": ctx.request.model,
        "choices": [_choice_of(c) for c in generation.choices],
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
        # With logprobs: where each choice's next token starts in its text (offsets run across chunks).
        self.offsets: dict[int, int] | None = (
            {c.index: 0 for c in generation.choices} if ctx.request.logprobs else None
        )

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
        offsets = self.offsets
        if isinstance(event, Delta):
            logprobs = None
            if offsets is not None and event.logprobs is not None:
                logprobs = legacy_logprobs(event.logprobs, offsets[event.index])
                offsets[event.index] += sum(map(len, logprobs["tokens"]))
            out.append(self._chunk([_choice(event.index, event.text, None, logprobs)]))
            return False
        if isinstance(event, Finish):
            logprobs = legacy_logprobs((), offsets[event.index]) if offsets is not None else None
            out.append(self._chunk([_choice(event.index, "", event.reason, logprobs)]))
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
