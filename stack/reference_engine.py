"""The CPU reference engine: TensorRT-LLM's `tensorrt_llm` request contract, run with PyTorch/transformers.

It is Triton-agnostic (the Triton model in `model_repository/tensorrt_llm_reference` marshals tensors in
and out) so it can be tested directly. Semantics follow TensorRT-LLM where the contract defines them:

- ids >= the engine vocab index rows of the request's `prompt_embedding_table`; looked-up embeddings,
  table rows included, are then multiplied by sqrt(hidden) as TensorRT-LLM's Gemma does;
- generation stops on `end_id` (not emitted), on a stop word (emitted), or after `request_output_len`;
- `top_k` 0 and `top_p` 0 (or unset) mean greedy, as in TensorRT-LLM's sampling layers;
- streaming responses carry only the new tokens; `num_output_tokens` counts the tokens in that response.

Requests are served in-flight: one engine thread advances every active request by one token per round
(round-robin; each request keeps its own KV cache), so a long generation never blocks a short one, and a
cancelled request is dropped at its next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("reference_engine")


class EngineRequestError(ValueError):
    """A request the engine refuses; the message goes back to the client."""


@dataclass
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1 or (self.top_k <= 0 and self.top_p <= 0.0)


# sink(new_ids, final, error, num_input_tokens): called from the engine thread.
Sink = Callable[[list[int], bool, str | None], None]


@dataclass
class GenerationRequest:
    input_ids: list[int]
    max_new_tokens: int
    sink: Sink
    end_id: int = 1
    min_tokens: int = 0
    streaming: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    stop_words: list[list[int]] = field(default_factory=list)
    bad_words: list[list[int]] = field(default_factory=list)
    prompt_table: torch.Tensor | None = None  # [rows, hidden]
    lora: Any = None  # gemma3_core.lora.DecodedLora, resolved by the caller
    guided: Any = None  # gemma3_core.guided.GuidedDecoder
    is_cancelled: Callable[[], bool] = lambda: False
    request_id: str = ""


@dataclass
class _Active:
    req: GenerationRequest
    generated: list[int] = field(default_factory=list)
    cache: Any = None
    pending: list[int] = field(default_factory=list)  # generated but not yet sent (non-streaming)
    generator: torch.Generator | None = None
    started: float = field(default_factory=time.monotonic)


class ReferenceEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        vocab_size: int,
        max_active: int = 8,
        lora_hooks: Any = None,
    ) -> None:
        self.model = model.eval()
        self.vocab_size = vocab_size
        self.max_active = max_active
        self.lora_hooks = lora_hooks
        embed = model.get_input_embeddings()
        self._embed_weight = embed.weight
        # Gemma3TextScaledWordEmbedding keeps sqrt(hidden) as a tensor in the weight dtype; reuse it so
        # table rows are scaled exactly like text embeddings.
        self._embed_scale = getattr(embed, "embed_scale", torch.tensor(1.0))
        self._inbox: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._waiting: list[GenerationRequest] = []
        self._active: list[_Active] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reference-engine", daemon=True)
        self._thread.start()

    # --- public ------------------------------------------------------------------------------------
    def submit(self, req: GenerationRequest) -> None:
        self._inbox.put(req)

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    @property
    def num_active(self) -> int:
        return len(self._active) + len(self._waiting)

    # --- loop --------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                self._admit(block=not self._active)
                for st in list(self._active):
                    try:
                        self._advance(st)
                    except Exception as exc:  # one broken request must never take the engine down
                        log.exception("request %s failed", st.req.request_id)
                        self._finish(st, error=f"engine error: {exc}")

    def _admit(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        while self._waiting and len(self._active) < self.max_active:
            req = self._waiting.pop(0)
            st = _Active(req)
            if req.sampling.seed is not None:
                st.generator = torch.Generator().manual_seed(int(req.sampling.seed) & 0xFFFF_FFFF_FFFF_FFFF)
            self._active.append(st)

    def _finish(self, st: _Active, *, error: str | None = None) -> None:
        if st in self._active:
            self._active.remove(st)
        st.cache = None
        try:
            st.req.sink([] if error else st.pending, True, error)
        except Exception:  # the client may be gone; nothing else to do
            log.debug("sink failed for %s", st.req.request_id, exc_info=True)

    def _embed(self, ids: Sequence[int], table: torch.Tensor | None) -> torch.Tensor:
        ids_t = torch.tensor(ids, dtype=torch.long)
        is_table = ids_t >= self.vocab_size
        if is_table.any():
            if table is None:
                raise EngineRequestError(
                    f"input_ids contain ids >= vocab size {self.vocab_size} "
                    "but no prompt_embedding_table was sent"
                )
            rows = ids_t[is_table] - self.vocab_size
            if int(rows.max()) >= table.shape[0]:
                raise EngineRequestError(
                    f"prompt table id {int(rows.max()) + self.vocab_size} "
                    f"is past the table ({table.shape[0]} rows)"
                )
        emb = torch.nn.functional.embedding(ids_t.clamp(max=self.vocab_size - 1), self._embed_weight)
        if is_table.any() and table is not None:
            emb[is_table] = table[rows].to(emb.dtype)
        return (emb * self._embed_scale.to(emb.dtype))[None]

    def _forward(self, st: _Active, **kwargs: Any) -> torch.Tensor:
        kwargs.update(past_key_values=st.cache, use_cache=True, logits_to_keep=1)
        if self.lora_hooks is not None and st.req.lora is not None:
            with self.lora_hooks.apply(st.req.lora):
                out = self.model(**kwargs)
        else:
            out = self.model(**kwargs)
        st.cache = out.past_key_values
        return out.logits[0, -1]

    def _advance(self, st: _Active) -> None:
        req = st.req
        if req.is_cancelled():
            self._finish(st)
            return
        if st.cache is None:
            logits = self._forward(st, inputs_embeds=self._embed(req.input_ids, req.prompt_table))
        else:
            logits = self._forward(st, input_ids=torch.tensor([[st.generated[-1]]]))
        token = self._sample(st, logits)
        if token == req.end_id:
            self._emit(st, [], final=True)
            return
        st.generated.append(token)
        done = (
            len(st.generated) >= req.max_new_tokens
            or self._hit_stop(st)
            or (req.guided is not None and req.guided.is_terminated())
        )
        self._emit(st, [token], final=done)

    def _emit(self, st: _Active, new: list[int], *, final: bool) -> None:
        if st.req.streaming:
            st.pending = new
            if not final:
                st.req.sink(new, False, None)
                st.pending = []
        else:
            st.pending.extend(new)
        if final:
            self._finish(st)

    def _hit_stop(self, st: _Active) -> bool:
        gen = st.generated
        if len(gen) < st.req.min_tokens:
            return False
        return any(len(w) <= len(gen) and gen[-len(w) :] == w for w in st.req.stop_words)

    def _sample(self, st: _Active, logits: torch.Tensor) -> int:
        req, s = st.req, st.req.sampling
        logits = logits.float()
        # Embedding rows past the tokenizer (the 27B pads to 262208) are never valid outputs.
        logits[self.vocab_size :] = float("-inf")
        self._ban_bad_words(st, logits)
        if len(st.generated) < req.min_tokens:
            logits[req.end_id] = float("-inf")
        if req.guided is not None:
            req.guided.mask_logits(logits)
        if s.repetition_penalty != 1.0 or s.presence_penalty or s.frequency_penalty:
            logits = _apply_penalties(logits, req.input_ids, st.generated, s)
        token = int(torch.argmax(logits)) if s.greedy else _sample_top_k_top_p(logits, s, st.generator)
        if req.guided is not None and not req.guided.accept_token(token):
            raise EngineRequestError(f"guided decoding rejected token {token}")
        return token

    def _ban_bad_words(self, st: _Active, logits: torch.Tensor) -> None:
        gen = st.generated
        for word in st.req.bad_words:
            prefix = word[:-1]
            if not prefix or (len(prefix) <= len(gen) and gen[-len(prefix) :] == prefix):
                logits[word[-1]] = float("-inf")


def _apply_penalties(
    logits: torch.Tensor, prompt: Sequence[int], generated: Sequence[int], s: Sampling
) -> torch.Tensor:
    # vLLM/OpenAI semantics: repetition over prompt + output, presence/frequency over the output only.
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(generated)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
    if generated and (s.presence_penalty or s.frequency_penalty):
        ids, counts = torch.unique(torch.tensor(generated, dtype=torch.long), return_counts=True)
        logits[ids] -= s.presence_penalty + s.frequency_penalty * counts.float()
    return logits


def _sample_top_k_top_p(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    logits = logits / max(s.temperature, 1e-5)
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0.0 < s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < s.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def load_model(hf_dir: str, threads: int | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
