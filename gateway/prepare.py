"""Raw request body → everything one chat completion needs before it takes a slot.

validate (every 400: gateway/validation.py) → limits → render the prompt → fetch images → token budget
(gateway/limits.py) → sampling. Every failure is an `APIError` (4xx), so an invalid request never waits
for, or holds, an admission slot.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import limits, tracing
from gateway.images import ImageService, images_tensor
from gateway.lora import LoraService
from gateway.prompt import render_prompt
from gateway.sampling import SamplingParams, resolve_sampling
from gateway.settings import GatewaySettings
from gateway.tools import NO_TOOLS, ToolPlan, plan_tools
from gateway.validation import ChatRequest, DeploymentFeatures, GenerationRequest, parse_chat_request
from gemma3_core.chat_template import expand_image_markers
from triton_io.contract import Ensemble

PromptCounter = Callable[[str], Awaitable[int | None]]  # None without a tokenizer


@dataclass
class ChatContext:
    """Everything one generating request needs (chat, legacy completions and the Responses API alike)."""

    request: GenerationRequest
    prompt: str
    prompt_tokens: int | None  # gateway's own count (None without a tokenizer)
    sampling: SamplingParams
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    arrival: float = field(default_factory=time.monotonic)
    request_id: str | None = None  # the HTTP request id (gateway/logs.py); Triton gets "<id>-<choice>"
    extra_inputs: dict[str, Any] = field(default_factory=dict)  # images, guided decoding (all choices)
    tools: ToolPlan = NO_TOOLS
    adapter: str | None = None  # LoRA adapter name
    # Several prompts (legacy completions): choice i generates from prompts[i // n]; empty: [prompt].
    prompts: list[str] = field(default_factory=list)

    @property
    def choice_count(self) -> int:
        return max(1, len(self.prompts)) * self.request.n

    def prompt_index(self, choice: int) -> int:
        return choice // self.request.n

    def prompt_of(self, choice: int) -> str:
        return self.prompts[self.prompt_index(choice)] if self.prompts else self.prompt


async def prepare(
    raw: bytes,
    settings: GatewaySettings,
    count_prompt: PromptCounter,
    images: ImageService | None = None,
    lora: LoraService | None = None,
    features: DeploymentFeatures | None = None,
) -> ChatContext:
    """Validate, render and size the request; every failure is an `APIError` (4xx)."""
    with tracing.span("validate"):
        request = parse_chat_request(raw, settings, lora.knows if lora else None, features)
    return await prepare_chat(request, settings, count_prompt, images, lora)


async def prepare_chat(
    request: ChatRequest,
    settings: GatewaySettings,
    count_prompt: PromptCounter,
    images: ImageService | None = None,
    lora: LoraService | None = None,
) -> ChatContext:
    """A validated chat request (from a chat body or a translated Responses body) → its context."""
    limits.check_request(request, settings)
    adapter = lora.resolve(request.model) if lora else None
    tools = plan_tools(
        request.tools,
        request.tool_choice,
        request.response_format,
        request.parallel_tool_calls,
        settings.max_tool_calls,
    )
    with tracing.span("render_prompt"):
        prompt = render_prompt(request.messages, request.tools, request.tool_choice)
    # Rendered first so a malformed conversation costs no fetch; all images are fetched concurrently.
    fetched = await images.fetch(request.messages) if images is not None else []
    # Count what the engine will see: each marker expands to the full image sequence (256 soft tokens).
    prompt_tokens = await count_prompt(expand_image_markers(prompt) if fetched else prompt)
    max_tokens = limits.budget(prompt_tokens, request, settings)
    sampling = resolve_sampling(request, settings, max_tokens)
    extra: dict[str, Any] = tools.triton_inputs()
    if fetched:
        extra[Ensemble.IMAGES] = images_tensor(fetched)
    return ChatContext(
        request=request,
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        sampling=sampling,
        extra_inputs=extra,
        tools=tools,
        adapter=adapter.name if adapter is not None else None,
    )
