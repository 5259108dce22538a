"""The CPU reference engine: TensorRT-LLM's `tensorrt_llm` request contract, run with PyTorch/transformers.

It is Triton-agnostic (the Triton model in `model_repository/tensorrt_llm_reference` marshals tensors in
and out) so it can be tested directly. Semantics follow TensorRT-LLM where the contract defines them:

- ids >= the engine vocab index rows of the request's `prompt_embedding_table`; looked-up embeddings,
  table rows included, are then multiplied by sqrt(hidden) as TensorRT-LLM's Gemma does;
- generation stops on `end_id` (not emitted), on a stop word (emitted), or after `request_output_len`;
- `top_k` 0 and `top_p` 0 (or unset) mean greedy, as in TensorRT-LLM's sampling layers;
- streaming responses carry only the new tokens; `num_output_tokens` counts the tokens in that response;
- `embedding_bias` is added to the logits first; with `return_log_probs` each token comes with its log
  probability under the distribution it was sampled from (bias, bans, grammar mask, penalties and
  temperature applied; before top-k/top-p truncation), plus the TOP_LOG_PROBS_K most likely tokens.

Requests are served in flight, like TensorRT-LLM's inflight batching: every step runs ONE decode forward
over all running requests (rows of a right-aligned padded KV batch, `kv_batch.PaddedKV`, each with its own
positions, LoRA adapter and sampling), plus at most one prefill forward for newly arrived requests. Short
prompts arriving together are prefilled together (an idle engine waits `gather_ms` for a burst to finish
arriving); a prompt longer than `prefill_chunk` tokens is prefilled one chunk per step, so running
requests keep producing a token every step. A cancelled request is dropped at its next step.

The model computes in float32 over weights stored in the deployment's `weight_dtype` (`load_model`;
`packed_linear` says why float16 is the default); the engine thread alone runs torch's parallel ops
(`load_off_thread`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from cpu_engine import packed_linear
from cpu_engine.kv_batch import PaddedKV
from cpu_engine.sampling import Sampling, apply_penalties, ban_bad_words, sample_top_k_top_p

log = logging.getLogger("cpu_engine")

# Weights the engine serves unless its config says otherwise (`weight_dtype`): float16 halves what a decode
# step reads, at the cost `make bench` reports against float32 (packed_linear explains the kernel).
DEFAULT_WEIGHT_DTYPE = "float16"

__all__ = [
    "DEFAULT_WEIGHT_DTYPE",
    "EngineRequestError",
    "GenerationRequest",
    "ReferenceEngine",
    "Sampling",
    "available_cores",
    "load_model",
    "load_off_thread",
]


class EngineRequestError(ValueError):
    """A request the engine refuses; the message goes back to the client."""


@dataclass
class TokenLogProbs:
    """Log probs of the tokens one response carries (requests with `return_log_probs`)."""

    values: list[float] = field(default_factory=list)  # the sampled tokens'
    top_ids: list[list[int]] = field(default_factory=list)  # per token: the most likely ids, best first
    top_values: list[list[float]] = field(default_factory=list)

    def extend(self, other: TokenLogProbs) -> None:
        self.values += other.values
        self.top_ids += other.top_ids
        self.top_values += other.top_values


# sink(new_ids, final, error) — or sink(new_ids, final, error, log_probs) for requests with
# `return_log_probs`: called from the engine thread.
Sink = Callable[..., None]


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
    lora: Any = None  # cpu_engine.lora_hooks.DecodedLora, resolved by the caller
    guided: Any = None  # cpu_engine.guided.GuidedDecoder
    is_cancelled: Callable[[], bool] = lambda: False
    request_id: str = ""
    embedding_bias: torch.Tensor | None = None  # float32 [<= vocab rows]
    return_log_probs: bool = False
    top_log_probs: int = 20  # how many top tokens come with each log prob


@dataclass(eq=False)
class _Row:
    """One admitted request."""

    req: GenerationRequest
    embeds: torch.Tensor  # the prompt's input embeddings [tokens, hidden], scaled
    generated: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # generated but not yet sent (non-streaming)
    pending_log_probs: TokenLogProbs = field(default_factory=TokenLogProbs)  # of `pending`
    generator: torch.Generator | None = None
    prefilled: int = 0  # prompt tokens already in the KV cache
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Prefill:
    """Requests being prefilled: several short prompts in one forward, or one long prompt in chunks."""

    rows: list[_Row]
    kv: PaddedKV


class ReferenceEngine:
    def __init__(
        self,
        model: PreTrainedModel,
        *,
        vocab_size: int,
        max_active: int = 8,
        lora_hooks: Any = None,
        prefill_chunk: int = 256,
        gather_ms: float = 0.0,
        threads: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.threads = threads  # torch threads of the engine thread (None: as the process has them)
        self.vocab_size = vocab_size
        self.max_active = max_active
        self.lora_hooks = lora_hooks
        self.prefill_chunk = prefill_chunk
        self.gather_s = gather_ms / 1e3
        embed = model.get_input_embeddings()
        if not isinstance(embed, torch.nn.Embedding):
            raise TypeError(f"expected an embedding table, the model has {type(embed).__name__}")
        self._embed_weight = embed.weight
        # Gemma3TextScaledWordEmbedding keeps sqrt(hidden) as a tensor in the weight dtype; reuse it so
        # table rows are scaled exactly like text embeddings.
        self._embed_scale = getattr(embed, "embed_scale", torch.tensor(1.0))
        self._inbox: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._waiting: list[GenerationRequest] = []
        self._prefill: _Prefill | None = None
        self._rows: list[_Row] = []  # decoding, in the order of self._kv's rows
        self._kv = PaddedKV.empty(0)
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

    # --- loop --------------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # this thread's own OpenMP team (see load_off_thread)
        with torch.inference_mode():
            while not self._stop.is_set():
                self._admit(block=not (self._rows or self._prefill or self._waiting))
                try:
                    self._step()
                except Exception as exc:  # a broken step fails its requests, never the engine
                    log.exception("engine step failed")
                    for st in [*self._rows, *(self._prefill.rows if self._prefill else [])]:
                        self._finish(st, error=f"engine error: {exc}")
                    self._rows, self._kv, self._prefill = [], PaddedKV.empty(0), None

    def _step(self) -> None:
        self._drop_cancelled()
        if self._prefill is None:
            self._prefill = self._next_prefill()
        if self._prefill is not None:
            self._prefill_step(self._prefill)
        if self._rows:
            self._decode_step()

    def _admit(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        if block and self._waiting and self.gather_s > 0:
            self._gather()

    def _gather(self) -> None:
        """Idle, a request came in: wait while more keep arriving (each within `gather_s` of the last,
        at most four times that in all), so a burst is prefilled in one forward, not one request alone
        and then the rest. (vLLM's scheduler delay and Triton's batching queue delay do the same.)"""
        deadline = time.monotonic() + 4 * self.gather_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self._inbox.get(timeout=min(self.gather_s, left))
            except queue.Empty:
                return
            if item is None:  # shutdown
                return
            self._waiting.append(item)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._waiting if r.is_cancelled()]:
            self._waiting.remove(req)
            _send(req, [], True, None)
        if self._prefill is not None and any(st.req.is_cancelled() for st in self._prefill.rows):
            # Only a chunked (single-row) prefill spans steps; a group is prefilled within one step.
            for st in self._prefill.rows:
                self._finish(st)
            self._prefill = None
        self._keep([st for st in self._rows if not st.req.is_cancelled()], finished=True)

    def _keep(self, keep: list[_Row], *, finished: bool) -> None:
        """Shrink the decode batch to `keep`; the others are finished (if `finished`) by the caller."""
        if len(keep) == len(self._rows):
            return
        index = {id(st): i for i, st in enumerate(self._rows)}
        if finished:
            for st in self._rows:
                if id(st) not in {id(k) for k in keep}:
                    self._finish(st)
        self._kv.select([index[id(st)] for st in keep])
        self._rows = keep

    # --- prefill -----------------------------------------------------------------------------------
    def _next_prefill(self) -> _Prefill | None:
        free = self.max_active - len(self._rows)
        rows: list[_Row] = []
        longest = 0
        while self._waiting and len(rows) < free:
            req = self._waiting[0]
            n = len(req.input_ids)
            if rows and (n > self.prefill_chunk or max(longest, n) * (len(rows) + 1) > self.prefill_chunk):
                break
            self._waiting.pop(0)
            try:
                st = _Row(req, self._embed(req.input_ids, req.prompt_table))
            except Exception as exc:
                _send(req, [], True, f"engine error: {exc}")
                continue
            if req.sampling.seed is not None:
                st.generator = torch.Generator().manual_seed(int(req.sampling.seed) & 0xFFFF_FFFF_FFFF_FFFF)
            rows.append(st)
            longest = max(longest, n)
            if n > self.prefill_chunk:
                break  # a long prompt is prefilled alone, chunk by chunk
        return _Prefill(rows, PaddedKV.empty(len(rows))) if rows else None

    def _prefill_step(self, job: _Prefill) -> None:
        if len(job.rows) == 1:
            st = job.rows[0]
            start = st.prefilled
            chunk = st.embeds[start : start + self.prefill_chunk]
            embeds = chunk[None]
            positions = torch.arange(start, start + len(chunk))[None]
            new_mask = torch.ones(1, len(chunk), dtype=torch.long)
        else:
            width = max(len(st.embeds) for st in job.rows)
            embeds = torch.stack([_left_pad_rows(st.embeds, width) for st in job.rows])
            lengths = torch.tensor([len(st.embeds) for st in job.rows])
            offsets = torch.arange(width)[None] - (width - lengths)[:, None]
            new_mask = (offsets >= 0).long()
            positions = offsets.clamp(min=0)
        mask = torch.cat([job.kv.mask, new_mask], dim=1)
        logits = self._forward(job.rows, job.kv, mask, positions, inputs_embeds=embeds)
        for st in job.rows:
            st.prefilled = len(st.embeds) if len(job.rows) > 1 else st.prefilled + embeds.shape[1]
        if any(st.prefilled < len(st.embeds) for st in job.rows):
            return
        self._prefill = None
        keep = [i for i, st in enumerate(job.rows) if self._sample_and_emit(st, logits[i])]
        job.kv.select(keep)
        self._kv.extend(job.kv)
        self._rows.extend(job.rows[i] for i in keep)

    # --- decode ------------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        rows = self._rows
        ids = torch.tensor([[st.generated[-1]] for st in rows], dtype=torch.long)
        positions = torch.tensor([[len(st.embeds) + len(st.generated) - 1] for st in rows])
        logits = self._forward(rows, self._kv, self._kv.step_mask(1), positions, input_ids=ids)
        keep = [st for i, st in enumerate(rows) if self._sample_and_emit(st, logits[i])]
        self._keep(keep, finished=False)

    # --- model -------------------------------------------------------------------------------------
    def _forward(
        self,
        rows: Sequence[_Row],
        kv: PaddedKV,
        mask: torch.Tensor,
        positions: torch.Tensor,
        **inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Run one forward over `rows`, append its keys/values to `kv`; the last position's logits."""
        cache = kv.cache()
        with self._loras(rows):
            out = self.model(
                **inputs,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        kv.absorb(cache, mask)  # the forward appended to it in place
        return out.logits[:, -1]

    @contextlib.contextmanager
    def _loras(self, rows: Sequence[_Row]) -> Iterator[None]:
        loras = [st.req.lora for st in rows]
        if self.lora_hooks is None or all(lora is None for lora in loras):
            yield
            return
        with self.lora_hooks.apply_rows(loras):
            yield

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
        return emb * self._embed_scale.to(emb.dtype)

    # --- tokens ------------------------------------------------------------------------------------
    def _sample_and_emit(self, st: _Row, logits: torch.Tensor) -> bool:
        """Sample `st`'s next token and send it; False once the request is finished."""
        req = st.req
        try:
            token, log_probs = self._sample(st, logits)
        except Exception as exc:  # one broken request must never take its batch down
            log.exception("request %s failed", req.request_id)
            self._finish(st, error=f"engine error: {exc}")
            return False
        if token == req.end_id:
            self._emit(st, [], None, final=True)
            return False
        st.generated.append(token)
        done = (
            len(st.generated) >= req.max_new_tokens
            or self._hit_stop(st)
            or (req.guided is not None and req.guided.is_terminated())
        )
        self._emit(st, [token], log_probs, final=done)
        return not done

    def _emit(self, st: _Row, new: list[int], log_probs: TokenLogProbs | None, *, final: bool) -> None:
        if st.req.streaming:
            st.pending = new
            st.pending_log_probs = log_probs or TokenLogProbs()
            if not final:
                _send(st.req, new, False, None, st.pending_log_probs)
                st.pending, st.pending_log_probs = [], TokenLogProbs()
        else:
            st.pending.extend(new)
            if log_probs is not None:
                st.pending_log_probs.extend(log_probs)
        if final:
            self._finish(st)

    def _finish(self, st: _Row, *, error: str | None = None) -> None:
        if error:
            _send(st.req, [], True, error)
        else:
            _send(st.req, st.pending, True, None, st.pending_log_probs)

    def _hit_stop(self, st: _Row) -> bool:
        gen = st.generated
        if len(gen) < st.req.min_tokens:
            return False
        return any(len(w) <= len(gen) and gen[-len(w) :] == w for w in st.req.stop_words)

    def _sample(self, st: _Row, logits: torch.Tensor) -> tuple[int, TokenLogProbs | None]:
        req, s = st.req, st.req.sampling
        logits = logits.float().clone()
        if req.embedding_bias is not None:  # first, as TensorRT-LLM adds it to the logits
            n = min(len(req.embedding_bias), len(logits))
            logits[:n] += req.embedding_bias[:n]
        # Embedding rows past the tokenizer (the 27B pads to 262208) are never valid outputs.
        logits[self.vocab_size :] = float("-inf")
        ban_bad_words(logits, req.bad_words, st.generated)
        if len(st.generated) < req.min_tokens:
            logits[req.end_id] = float("-inf")
        if req.guided is not None:
            req.guided.apply_bitmask(logits)
        if s.repetition_penalty != 1.0 or s.presence_penalty or s.frequency_penalty:
            logits = apply_penalties(logits, req.input_ids, st.generated, s)
        token = int(torch.argmax(logits)) if s.greedy else sample_top_k_top_p(logits, s, st.generator)
        if req.guided is not None and not req.guided.accept_token(token):
            raise EngineRequestError(f"guided decoding rejected token {token}")
        return token, (_log_probs(logits, s, token, req.top_log_probs) if req.return_log_probs else None)


def _log_probs(logits: torch.Tensor, s: Sampling, token: int, top: int) -> TokenLogProbs:
    """The sampled token's log prob and the `top` most likely tokens', from this row's final logits."""
    scaled = logits if s.greedy else logits / max(s.temperature, 1e-5)
    lp = torch.log_softmax(scaled, dim=-1)
    best = torch.topk(lp, min(top, lp.numel())) if top > 0 else None
    return TokenLogProbs(
        values=[float(lp[token])],
        top_ids=[best.indices.tolist()] if best is not None else [[]],
        top_values=[best.values.tolist()] if best is not None else [[]],
    )


def _send(
    req: GenerationRequest,
    new: list[int],
    final: bool,
    error: str | None,
    log_probs: TokenLogProbs | None = None,
) -> None:
    try:
        if req.return_log_probs and error is None:
            req.sink(new, final, error, log_probs or TokenLogProbs())
        else:
            req.sink(new, final, error)
    except Exception:  # the client may be gone; nothing else to do
        log.debug("sink failed for %s", req.request_id, exc_info=True)


def _left_pad_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, 0, width - t.shape[0], 0))


def available_cores() -> int:
    """CPU cores this process may run on (cgroup/affinity aware, unlike os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def load_model(
    hf_dir: str,
    threads: int | None = None,
    *,
    weight_dtype: str = DEFAULT_WEIGHT_DTYPE,
    pack: bool = True,
) -> torch.nn.Module:
    """The HF checkpoint computing in float32 with its weights rounded to `weight_dtype`, its linear
    layers packed (`packed_linear`) unless `pack` is False: unpacked, it is the plain transformers model
    over the same weights, which tests take their references from. torch uses `threads` threads
    (default: every available core)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads or available_cores())
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    packed_linear.round_weights(model, weight_dtype)
    if pack:
        packed_linear.pack_linears(model, weight_dtype)
    return model


def load_off_thread(
    hf_dir: str, *, threads: int, weight_dtype: str = DEFAULT_WEIGHT_DTYPE
) -> torch.nn.Module:
    """`load_model` run in a thread that ends with it; the calling thread is left to compute with one
    thread, so an engine started from it (`ReferenceEngine(threads=...)`) owns the process's only pool.

    Why: every thread that runs a parallel torch op keeps an OpenMP (libgomp) pool of its own, and once a
    process holds more OpenMP threads than cores, libgomp stops its idle threads spinning: each parallel
    op then waits for a wake-up. A pool left behind by the loading thread (the Triton stub's, which then
    only marshals requests) slowed the engine thread's one-row decode step more than twice over.
    """
    torch.set_num_threads(1)
    # torch settles a thread's count from the process default on its first parallel op: settle this
    # one's now, before the loader sets the default to `threads`.
    torch.get_num_threads()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-model") as pool:
        return pool.submit(load_model, hf_dir, threads, weight_dtype=weight_dtype).result()
