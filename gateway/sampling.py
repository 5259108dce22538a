"""OpenAI sampling parameters → the ensemble's optional input tensors, with the gateway's policies.

Policies (also in docs/gateway.md):
- greedy: `temperature` 0 (below 1e-5), `top_p` 0 or `top_k` 1 all mean greedy decoding, sent as
  `top_k=1, top_p=1, temperature=1` (argmax on every engine; some engines reject temperature 0 or treat
  top_p 0 as "unset").
- `n > 1` with greedy is allowed and returns n identical choices (OpenAI accepts it; vLLM rejects it).
- fields left out take the deployment defaults (Gemma 3's generation_config: top_k 64, top_p 0.95,
  temperature 1.0); `top_k` 0 or -1 disables top-k.
- every choice gets a seed: `seed + i` (mod 2^64) when the request has a seed, otherwise a random one
  (TensorRT-LLM's default seed is a constant, so n unseeded choices would otherwise be identical).
- penalties are sent only when given (the engine's neutral defaults apply otherwise).
- `logit_bias` goes as token ids and weights (preprocessing makes TensorRT-LLM's dense `embedding_bias`).
- `return_perf_metrics` is always asked for: the engine's KV-cache reuse count becomes
  `usage.prompt_tokens_details.cached_tokens`; `return_log_probs` only with `logprobs`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.settings import GatewaySettings
from gateway.validation import GenerationRequest
from triton_io.contract import Ensemble

GREEDY_TEMPERATURE = 1e-5
UINT64_MOD = 1 << 64


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    greedy: bool
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def choice_seed(self, index: int) -> int:
        if self.seed is None:
            return secrets.randbits(63)
        return (self.seed + index) % UINT64_MOD

    def triton_inputs(self, index: int) -> dict[str, Any]:
        """Values for the ensemble inputs of choice `index`."""
        values: dict[str, Any] = {
            Ensemble.MAX_TOKENS: self.max_tokens,
            Ensemble.TEMPERATURE: self.temperature,
            Ensemble.TOP_P: self.top_p,
            Ensemble.TOP_K: self.top_k,
            Ensemble.SEED: self.choice_seed(index),
        }
        for name, value in (
            (Ensemble.PRESENCE_PENALTY, self.presence_penalty),
            (Ensemble.FREQUENCY_PENALTY, self.frequency_penalty),
            (Ensemble.REPETITION_PENALTY, self.repetition_penalty),
        ):
            if value is not None:
                values[name] = value
        if self.stop:
            values[Ensemble.STOP_WORDS] = list(self.stop)
        values[Ensemble.RETURN_PERF_METRICS] = True
        if self.logprobs:
            values[Ensemble.RETURN_LOG_PROBS] = True
        if self.logit_bias:
            ids, weights = zip(*self.logit_bias, strict=True)
            values[Ensemble.EMBEDDING_BIAS_IDS] = np.array([ids], dtype=np.int32)
            values[Ensemble.EMBEDDING_BIAS_WEIGHTS] = np.array([weights], dtype=np.float32)
        return values


def resolve_sampling(
    request: GenerationRequest, settings: GatewaySettings, max_tokens: int
) -> SamplingParams:
    temperature = settings.default_temperature if request.temperature is None else request.temperature
    top_p = settings.default_top_p if request.top_p is None else request.top_p
    top_k = settings.default_top_k if request.top_k is None else max(request.top_k, 0)
    greedy = temperature < GREEDY_TEMPERATURE or top_p == 0 or top_k == 1
    if greedy:
        temperature, top_p, top_k = 1.0, 1.0, 1
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        greedy=greedy,
        seed=None if request.seed is None else request.seed % UINT64_MOD,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
        stop=tuple(request.stop),
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        logit_bias=tuple(request.logit_bias.items()),
    )
