"""`POST /v1/responses`, OpenAI's Responses API, stateless: the request is translated to a chat request
(gateway/responses_input.py, validated in gateway/validation.py) and served by the chat path; this module
shapes the result as a `response` object or as the documented event stream:

    response.created, response.in_progress,
    per output item: response.output_item.added,
        message:       response.content_part.added, response.output_text.delta…, response.output_text.done,
                       response.content_part.done
        function_call: response.function_call_arguments.delta…, response.function_call_arguments.done
    response.output_item.done; finally response.completed (or response.incomplete when max_output_tokens
    cut the output; an `error` event when generation failed).

Output items: a `message` (when there is text, or nothing else), then one `function_call` per tool call
(`call_id` is the call's id; a `function_call_output` item answers it in the next request).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.chat import ChatService
from gateway.generation import Delta, Event, Failure, Generation
from gateway.prepare import ChatContext, prepare_chat
from gateway.responses import wait_all
from gateway.tools import ToolReader
from gateway.validation import parse_responses_request


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [_text_part(text)] if text is not None else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


class ResponseShape:
    """The request-dependent fields of every `response` object of one request."""

    def __init__(self, ctx: ChatContext, body: dict[str, Any]) -> None:
        self.ctx = ctx
        self.id = _new_id("resp")
        tools = [
            {
                "type": "function",
                "name": t["name"],
                "description": t.get("description"),
                "parameters": t.get("parameters") or {"type": "object", "properties": {}},
                "strict": bool(t.get("strict")),
            }
            for t in body.get("tools") or []
        ]
        text = body.get("text") or {}
        sampling = ctx.sampling
        self.fields: dict[str, Any] = {
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": ctx.request.model,
            "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
            "previous_response_id": None,
            "store": False,
            "temperature": 0.0 if sampling.greedy else sampling.temperature,
            "text": {"format": text.get("format") or {"type": "text"}},
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": tools,
            "top_p": sampling.top_p,
            "truncation": "disabled",
            "metadata": body.get("metadata") or {},
        }
        if body.get("user") is not None:
            self.fields["user"] = body["user"]

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, int] | None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.ctx.created,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "output": output,
            **({"usage": _usage(usage)} if usage is not None else {}),
            **self.fields,
        }


def _usage(usage: dict[str, int]) -> dict[str, Any]:
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def body_shaper(shape: ResponseShape) -> Any:
    async def collect_response(generation: Generation, first: Event | None = None) -> dict[str, Any]:
        await wait_all(generation, first)
        (choice,) = generation.choices
        message, finish_reason = generation.ctx.tools.message(choice.text, choice.finish_reason)
        status = _status(finish_reason)
        calls = message.get("tool_calls") or []
        output: list[dict[str, Any]] = []
        if message["content"] or not calls:
            output.append(_message_item(_new_id("msg"), message["content"] or "", status))
        for call in calls:
            fn = call["function"]
            output.append(_call_item(_new_id("fc"), call["id"], fn["name"], fn["arguments"], "completed"))
        return shape.response(status, output, generation.usage())

    return collect_response


class ResponseEventWriter:
    """The Responses event stream of one generation (one choice)."""

    def __init__(self, generation: Generation, shape: ResponseShape) -> None:
        self.generation = generation
        self.shape = shape
        self.reader: ToolReader | None = generation.ctx.tools.new_parser()
        self.seq = 0
        self.output: list[dict[str, Any]] = []  # finished items
        self.message: dict[str, Any] | None = None  # the open message item
        self.call: dict[str, Any] | None = None  # the open function_call item

    def _event(self, kind: str, out: list[bytes], **fields: Any) -> None:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        out.append(f"event: {kind}\ndata: {data}\n\n".encode("utf-8", "replace"))

    def start(self, out: list[bytes]) -> None:
        created = self.shape.response("in_progress", [], None)
        self._event("response.created", out, response=created)
        self._event("response.in_progress", out, response=created)

    # --- items -----------------------------------------------------------------------------------
    def _open_message(self, out: list[bytes]) -> dict[str, Any]:
        if self.message is None:
            self.message = _message_item(_new_id("msg"), None, "in_progress")
            index = len(self.output)
            self._event("response.output_item.added", out, output_index=index, item=self.message)
            self.message["content"] = [_text_part("")]
            self._event(
                "response.content_part.added",
                out,
                item_id=self.message["id"],
                output_index=index,
                content_index=0,
                part=_text_part(""),
            )
        return self.message

    def _text(self, text: str, out: list[bytes]) -> None:
        if not text:
            return
        if self.call is not None:
            self._close_call(out, "completed")
        self._open_message(out)
        assert self.message is not None
        self.message["content"][0]["text"] += text
        self._event(
            "response.output_text.delta",
            out,
            item_id=self.message["id"],
            output_index=len(self.output),
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def _close_message(self, out: list[bytes], status: str) -> None:
        item = self.message
        if item is None:
            return
        index, part = len(self.output), item["content"][0]
        ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
        self._event("response.output_text.done", out, text=part["text"], logprobs=[], **ids)
        self._event("response.content_part.done", out, part=part, **ids)
        item["status"] = status
        self._event("response.output_item.done", out, output_index=index, item=item)
        self.output.append(item)
        self.message = None

    def _tool_delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        for tc in delta["tool_calls"]:
            if "id" in tc:
                self._close_message(out, "completed")
                if self.call is not None:
                    self._close_call(out, "completed")
                self.call = _call_item(_new_id("fc"), tc["id"], tc["function"]["name"], "", "in_progress")
                self._event("response.output_item.added", out, output_index=len(self.output), item=self.call)
            piece = tc["function"].get("arguments", "")
            if piece and self.call is not None:
                self.call["arguments"] += piece
                self._event(
                    "response.function_call_arguments.delta",
                    out,
                    item_id=self.call["id"],
                    output_index=len(self.output),
                    delta=piece,
                )

    def _close_call(self, out: list[bytes], status: str) -> None:
        item = self.call
        if item is None:
            return
        index = len(self.output)
        self._event(
            "response.function_call_arguments.done",
            out,
            item_id=item["id"],
            output_index=index,
            name=item["name"],
            arguments=item["arguments"],
        )
        item["status"] = status
        self._event("response.output_item.done", out, output_index=index, item=item)
        self.output.append(item)
        self.call = None

    def _deltas(self, deltas: list[dict[str, Any]], out: list[bytes]) -> None:
        for delta in deltas:
            if "content" in delta:
                self._text(delta["content"], out)
            else:
                self._tool_delta(delta, out)

    # --- events ----------------------------------------------------------------------------------
    def encode(self, event: Event, out: list[bytes]) -> bool:
        if isinstance(event, Delta):
            if self.reader is None:
                self._text(event.text, out)
            else:
                self._deltas(self.reader.feed(event.text), out)
            return False
        if isinstance(event, Failure):
            error = event.error
            self._event("error", out, code=error.code, message=error.message, param=error.param)
            return True
        reason = event.reason
        if self.reader is not None:
            self._deltas(self.reader.finish(), out)
            reason = self.generation.ctx.tools.finish_reason(self.reader, reason)
        status = _status(reason)
        complete = {c.id for c in self.reader.calls} if self.reader is not None else set()
        if self.call is not None:
            self._close_call(out, "completed" if self.call["call_id"] in complete else "incomplete")
        if not self.output:
            self._open_message(out)  # no output at all: one empty message, as the non-streamed body has
        self._close_message(out, status)
        final = self.shape.response(status, self.output, self.generation.usage())
        self._event(f"response.{status}", out, response=final)
        return True

    def end(self, out: list[bytes]) -> None:
        pass  # the Responses stream has no [DONE]


async def handle_responses(service: ChatService, raw: bytes, http_request: Request) -> Response:
    settings, lora = service.settings, service.lora

    async def answer(root: Any) -> Response:
        request, body = parse_responses_request(raw, settings, lora.knows if lora else None)
        ctx = await prepare_chat(request, settings, service.encode_len, service.images, lora)
        ctx.id = _new_id("resp")
        shape = ResponseShape(ctx, body)
        shape.id = ctx.id
        return await service.serve(
            ctx,
            http_request,
            body_shaper(shape),
            lambda generation: ResponseEventWriter(generation, shape),
            root,
        )

    return await service.traced(http_request, answer)
