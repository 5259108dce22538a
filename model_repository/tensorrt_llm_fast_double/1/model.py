"""TEST DOUBLE of Triton's `tensorrt_llm` model -- for overhead and load measurement only, never a model.

It honours the request contract of TensorRT-LLM's backend as the CPU reference engine does (decoupled,
`input_ids` / `request_output_len` / `streaming` / `end_id` / `min_tokens` / `stop_words_list` /
`exclude_input_in_output` / `return_log_probs` in; `output_ids`, `sequence_length`, `num_input_tokens`,
`num_output_tokens` and, with `return_log_probs`, `output_log_probs` plus the top-k extension out;
streaming responses carry only the new tokens; the last token travels with the final flag), but
instead of running a network it emits a fixed cycle of real Gemma 3 token ids -- multi-byte characters and
one character split over three byte-fallback tokens included -- at a configured pace. With it the cost of
everything around the engine (ensemble steps, detokenization, gRPC, the gateway) becomes measurable.

Log probs are made up (every token -0.5; its top-k list is the token and the next cycle ids, at -0.5 - j):
the shapes and the per-token cost are the reference engine's, the numbers mean nothing.

Pacing is an absolute schedule per request (first token after `first_token_delay_us`, then one every
`token_interval_us`), so a loaded process falls behind instead of silently stretching the interval. One
thread serves all requests from a heap ordered by due time; `max_active_requests` caps the in-flight set
like an engine's batch size, the rest wait in arrival order.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from gemma3_core.lora import cache_miss_message
from triton_io.contract import Engine
from triton_io.engine_request import EngineRequest
from triton_io.python_model import param

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

OUTPUTS = (Engine.OUTPUT_IDS, Engine.SEQUENCE_LENGTH, Engine.NUM_INPUT_TOKENS, Engine.NUM_OUTPUT_TOKENS)
_OUTPUT_IDS, _SEQUENCE_LENGTH, _NUM_INPUT_TOKENS, _NUM_OUTPUT_TOKENS = OUTPUTS  # per-token: plain names
LOG_PROB_OUTPUTS = (Engine.OUTPUT_LOG_PROBS, Engine.TOP_LOG_PROB_IDS, Engine.TOP_LOG_PROBS)
LOG_PROB = -0.5  # every token's (made up: see the module docstring)
# is_cancelled() is an IPC round trip to tritonserver; polling it per token would bill the double's own
# work to the server we are measuring, so it is polled at most this often per request.
CANCEL_POLL_S = 0.05

_ONE = np.array([[1]], dtype=np.int32)


@dataclass(frozen=True)
class _Cycle:
    """The ids the double emits, in order (config `token_cycle`, from build_engine/fast_double.py)."""

    ids: tuple[int, ...]
    # Prebuilt per-token tensors: building numpy arrays per response would be the double's dominant cost.
    arrays: dict[int, np.ndarray]
    top_k: int = 0  # alternatives per token with return_log_probs (the engine contract's k)

    @classmethod
    def parse(cls, text: str, top_k: int) -> _Cycle:
        ids = tuple(int(t) for t in text.split(","))
        return cls(ids, {t: np.array([[[t]]], dtype=np.int32) for t in ids}, top_k)

    def at(self, pos: int) -> int:
        return self.ids[pos % len(self.ids)]

    def log_prob_values(self, positions: list[int], prompt_len: int) -> dict[str, np.ndarray]:
        """The log-prob tensors of the tokens at cycle `positions` (0 for an echoed prompt, as the engine)."""
        values = np.array([[[0.0] * prompt_len + [LOG_PROB] * len(positions)]], dtype=np.float32)
        k = self.top_k
        ids = np.array([[[self.at(p + j) for j in range(k)] for p in positions]], dtype=np.int32)
        top = np.tile(np.array([LOG_PROB - j for j in range(k)], dtype=np.float32), (1, len(positions), 1))
        return {
            Engine.OUTPUT_LOG_PROBS: values,
            Engine.TOP_LOG_PROB_IDS: ids.reshape(1, len(positions), k),
            Engine.TOP_LOG_PROBS: top.reshape(1, len(positions), k),
        }


@dataclass(eq=False)
class _Stream:
    sender: Any
    prompt: list[int]
    max_new: int
    end_id: int
    min_tokens: int
    streaming: bool
    exclude_input: bool
    stop_words: list[list[int]]
    n_in: np.ndarray
    log_probs: bool  # return_log_probs, and the client asked for the log-prob outputs
    outputs: tuple[str, ...]  # the requested outputs this double produces
    cycle: _Cycle
    generated: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # cycle position of each generated token
    pos: int = 0
    first_due: float = 0.0
    next_poll: float = 0.0


class _Pacer:
    """One thread, one heap of (due time, arrival seq, stream): emits every token when it is due."""

    def __init__(self, interval_s: float, first_delay_s: float, max_active: int) -> None:
        self.interval_s = interval_s
        self.first_delay_s = first_delay_s
        self.max_active = max(1, max_active)
        self._heap: list[tuple[float, int, _Stream]] = []
        self._waiting: deque[_Stream] = deque()
        self._active = 0
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="fast-double", daemon=True)
        self._thread.start()

    def submit(self, st: _Stream) -> None:
        with self._cond:
            self._waiting.append(st)
            self._admit(time.monotonic())
            self._cond.notify()

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _admit(self, now: float) -> None:  # called with the lock held
        while self._waiting and self._active < self.max_active:
            st = self._waiting.popleft()
            self._active += 1
            st.first_due = now + self.first_delay_s
            st.next_poll = now + CANCEL_POLL_S
            heapq.heappush(self._heap, (st.first_due, next(self._seq), st))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
                if self._stop:
                    return
                # Everything due now, in due order; new arrivals wait for the next pass.
                due: list[_Stream] = []
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[2])
            finished: list[_Stream] = []
            for st in due:
                try:
                    done = _step(st, now)
                except Exception as exc:  # one broken request must not stop the others
                    _send_error(st, f"tensorrt_llm (fast double): {exc}")
                    done = True
                if done:
                    finished.append(st)
                    continue
                # Absolute schedule: token k is due at first_due + k * interval (interval 0 = round robin).
                when = st.first_due + len(st.generated) * self.interval_s
                with self._cond:
                    heapq.heappush(self._heap, (when, next(self._seq), st))
            if finished:
                with self._cond:
                    self._active -= len(finished)
                    self._admit(time.monotonic())


def _send_error(st: _Stream, message: str) -> None:
    with contextlib.suppress(Exception):  # the client may be gone already
        st.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)


def _respond(st: _Stream, ids: list[int], final: bool) -> None:
    echo = not (st.streaming or st.exclude_input)
    if st.streaming and len(ids) == 1:
        out, length = st.cycle.arrays[ids[0]], _ONE
        count = _ONE
    else:
        row = [*st.prompt, *ids] if echo else ids
        out = np.asarray(row, dtype=np.int32).reshape(1, 1, -1)
        length = np.array([[out.shape[-1]]], dtype=np.int32)
        count = np.array([[len(ids)]], dtype=np.int32)
    values = {
        _OUTPUT_IDS: out,
        _SEQUENCE_LENGTH: length,
        _NUM_INPUT_TOKENS: st.n_in,
        _NUM_OUTPUT_TOKENS: count,
    }
    if st.log_probs:
        positions = st.positions[len(st.positions) - len(ids) :] if ids else []
        values.update(st.cycle.log_prob_values(positions, len(st.prompt) if echo else 0))
    # Only what the client asked for (Triton drops the rest anyway, after paying to carry it here).
    tensors = [pb_utils.Tensor(name, values[name]) for name in st.outputs if name in values]
    st.sender.send(pb_utils.InferenceResponse(tensors), flags=FINAL if final else 0)


def _step(st: _Stream, now: float) -> bool:
    """Emit this request's next token; True when the request is finished."""
    if now >= st.next_poll:
        st.next_poll = now + CANCEL_POLL_S
        if st.sender.is_cancelled():
            with contextlib.suppress(Exception):  # a cancelled request may refuse responses
                _respond(st, [], True)
            return True
    token = st.cycle.at(st.pos)
    st.pos += 1
    if token == st.end_id:
        if len(st.generated) >= st.min_tokens:
            # end_id ends generation and is not emitted (TensorRT-LLM); streaming sends an empty final.
            _respond(st, [] if st.streaming else st.generated, True)
            return True
        token = st.cycle.at(st.pos)  # min_tokens bans end_id: take the next id
        st.pos += 1
    st.generated.append(token)
    st.positions.append(st.pos - 1)
    gen = st.generated
    stopped = len(gen) >= st.min_tokens and any(
        len(w) <= len(gen) and gen[-len(w) :] == w for w in st.stop_words
    )
    done = len(gen) >= st.max_new or stopped
    if st.streaming:
        _respond(st, [token], done)
    elif done:
        _respond(st, gen, True)
    return done


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.max_seq_len = int(param(config, "max_seq_len"))
        self.vocab_size = int(param(config, "engine_vocab_size"))
        self.cycle = _Cycle.parse(param(config, "token_cycle"), int(param(config, "top_log_probs_k", "0")))
        interval_s = float(param(config, "token_interval_us", "0")) / 1e6
        delay_s = float(param(config, "first_token_delay_us", "0")) / 1e6
        self.pacer = _Pacer(interval_s, delay_s, int(param(config, "max_active_requests", "8")))
        # LoRA as TensorRT-LLM's PEFT cache behaves towards clients: an id is known once a request carried
        # its weights, and an unknown id without weights fails with the engine's cache-miss text. The
        # weights themselves are ignored (this is not a model).
        self.lora_seen: set[int] = set()
        pb_utils.Logger.log_info(
            f"tensorrt_llm FAST TEST DOUBLE: token interval {interval_s * 1e6:.0f} us, "
            f"first token after {delay_s * 1e6:.0f} us (not a model; benchmarks only)"
        )

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.pacer.submit(self._parse(request, sender))
            except Exception as exc:  # bad input: a clean Triton error, never a hung stream
                error = pb_utils.TritonError(f"tensorrt_llm: {exc}")
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
        return None

    def finalize(self) -> None:
        self.pacer.shutdown()

    def _parse(self, request: Any, sender: Any) -> _Stream:
        parsed = EngineRequest.from_triton(request, max_seq_len=self.max_seq_len, engine="the fast double")
        requested = set(request.requested_output_names())
        if parsed.lora_task_id is not None:
            if parsed.lora_weights is not None:
                self.lora_seen.add(parsed.lora_task_id)
            elif parsed.lora_task_id not in self.lora_seen:
                raise ValueError(cache_miss_message(parsed.lora_task_id))
        return _Stream(
            sender=sender,
            prompt=parsed.input_ids,
            max_new=parsed.max_new_tokens,
            end_id=parsed.end_id,
            min_tokens=parsed.min_tokens,
            streaming=parsed.streaming,
            exclude_input=parsed.exclude_input,
            stop_words=parsed.stop_words,
            n_in=np.array([[len(parsed.input_ids)]], dtype=np.int32),
            log_probs=parsed.return_log_probs and bool(LOG_PROB_OUTPUTS[0] in requested),
            outputs=tuple(n for n in (*OUTPUTS, *LOG_PROB_OUTPUTS) if n in requested),
            cycle=self.cycle,
        )
