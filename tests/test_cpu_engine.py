"""The batched CPU reference engine answers every request exactly as it does when that request runs alone.

Real Gemma 3 270M weights, the engine in process (no Triton): a corpus that mixes greedy and seeded
sampling, penalties, stop and bad words, min_tokens, guided decoding, two LoRA adapters and the base
model, a prompt embedding table, streaming and non-streaming, and a long prompt that is prefilled in
chunks. Run all at once (one decode forward per step over every row), then one by one; the tokens must be
identical. A cancelled request leaves the others untouched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from build_engine.cpu import CpuArtifacts
from cpu_engine.engine import GenerationRequest, ReferenceEngine, Sampling, TokenLogProbs
from cpu_engine.guided import GuidedDecoder, tokenizer_info_from_tokenizer_json
from cpu_engine.lora_hooks import DecodedLora, LoraHooks
from gemma3_core import constants as C
from gemma3_core.chat_template import render_chat
from gemma3_core.tokenizer import encode

pytestmark = [pytest.mark.slow]

VOCAB = C.GEMMA3_270M.vocab_size


@dataclass
class Outcome:
    chunks: list[list[int]] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)  # requests with return_log_probs
    top_ids: list[list[int]] = field(default_factory=list)
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c]


Factory = Callable[[], dict[str, Any]]  # fresh request fields (a guided decoder is stateful)


def _random_lora(hooks: LoraHooks, task_id: int, seed: int) -> DecodedLora:
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for (name, layer), mod in hooks._targets.items():
        if name in ("q_proj", "v_proj", "down_proj") and layer % 3 == 0:
            a = torch.randn(4, mod.in_features, generator=gen) * 0.05
            b = torch.randn(mod.out_features, 4, generator=gen) * 0.05
            deltas[(name, layer)] = (a, b, 1.0)
    return DecodedLora(task_id=task_id, deltas=deltas)


@pytest.fixture(scope="module")
def engine(hf_model: torch.nn.Module) -> Any:
    hooks = LoraHooks(hf_model)
    # A small prefill chunk so the long prompt of the corpus is prefilled over several steps.
    eng = ReferenceEngine(hf_model, vocab_size=VOCAB, max_active=8, lora_hooks=hooks, prefill_chunk=64)
    yield eng
    eng.shutdown()
    hooks.remove()


@pytest.fixture(scope="module")
def corpus(engine: ReferenceEngine, tokenizer: Any, cpu_artifacts: CpuArtifacts) -> list[Factory]:
    hooks = engine.lora_hooks
    lora_a, lora_b = _random_lora(hooks, 11, 1), _random_lora(hooks, 22, 2)
    width = max(VOCAB, tokenizer.get_vocab_size(with_added_tokens=True))
    info = tokenizer_info_from_tokenizer_json(cpu_artifacts.tokenizer_dir / "tokenizer.json", width)
    schema = json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})

    def chat(text: str) -> list[int]:
        return encode(tokenizer, render_chat([{"role": "user", "content": text}]))

    table = torch.randn(4, hf_model_hidden(engine), generator=torch.Generator().manual_seed(5)) * 0.02
    image_prompt = chat("Describe: ")[:-4] + [VOCAB + i for i in range(4)] + chat("Describe: ")[-4:]
    long_prompt = chat("Summarise this text. " + "The river flows past the old mill and the bridge. " * 14)
    assert len(long_prompt) > 2 * engine.prefill_chunk
    word = encode(tokenizer, " Paris")
    bias = torch.zeros(VOCAB)
    bias[encode(tokenizer, " red") + encode(tokenizer, " blue")] = -100.0  # banned
    bias[encode(tokenizer, " green")] = 5.0
    france = chat("What is the capital of France?")
    base = dict(end_id=C.END_OF_TURN_ID, stop_words=[[C.EOS_ID]])
    return [
        lambda: dict(base, input_ids=chat("Name three European capitals."), max_new_tokens=24),
        lambda: dict(base, input_ids=chat("Count to five."), max_new_tokens=20, streaming=True),
        lambda: dict(base, input_ids=france, max_new_tokens=16, stop_words=[word]),
        lambda: dict(base, input_ids=france, max_new_tokens=16, bad_words=[word]),
        lambda: dict(
            base,
            input_ids=chat("Say hi."),
            max_new_tokens=12,
            min_tokens=12,
            sampling=Sampling(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3, top_k=1),
        ),
        lambda: dict(
            base,
            input_ids=chat("Write a short poem about the sea."),
            max_new_tokens=20,
            streaming=True,
            sampling=Sampling(temperature=0.9, top_k=40, top_p=0.9, seed=1234),
        ),
        lambda: dict(
            base,
            input_ids=chat("Where do you live? Answer in JSON."),
            max_new_tokens=24,
            guided=GuidedDecoder.create("json_schema", schema, info),
        ),
        lambda: dict(base, input_ids=chat("Tell me a fact."), max_new_tokens=16, lora=lora_a),
        lambda: dict(base, input_ids=chat("Tell me a fact."), max_new_tokens=16, lora=lora_b, streaming=True),
        lambda: dict(base, input_ids=image_prompt, max_new_tokens=12, prompt_table=table),
        lambda: dict(base, input_ids=long_prompt, max_new_tokens=16, lora=lora_a),
        lambda: dict(
            base, input_ids=chat("Name a colour."), max_new_tokens=10, return_log_probs=True, top_log_probs=5
        ),
        lambda: dict(
            base,
            input_ids=chat("Name a colour."),
            max_new_tokens=10,
            streaming=True,
            return_log_probs=True,
            embedding_bias=bias,
            sampling=Sampling(temperature=0.7, top_k=20, seed=7),
        ),
    ]


def hf_model_hidden(engine: ReferenceEngine) -> int:
    return int(engine._embed_weight.shape[1])


def _submit(engine: ReferenceEngine, fields: dict[str, Any], cancel_after: int | None = None) -> Outcome:
    out = Outcome()

    def sink(new: list[int], final: bool, error: str | None, log_probs: TokenLogProbs | None = None) -> None:
        out.error = error
        if log_probs is not None:
            assert len(log_probs.values) == len(new), "one log prob per token of the response"
            out.log_probs += log_probs.values
            out.top_ids += log_probs.top_ids
        if new:
            out.chunks.append(list(new))
        if final:
            out.done.set()

    def cancelled() -> bool:
        return cancel_after is not None and len(out.tokens) >= cancel_after

    engine.submit(GenerationRequest(sink=sink, is_cancelled=cancelled, **fields))
    return out


def _wait(outs: list[Outcome], timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    for o in outs:
        assert o.done.wait(max(0.0, deadline - time.monotonic())), "request did not finish"
        assert o.error is None, o.error


def test_batched_equals_single(engine: ReferenceEngine, corpus: list[Factory]) -> None:
    alone = []
    for make in corpus:
        out = _submit(engine, make())
        _wait([out])
        alone.append(out)
    together = [_submit(engine, make()) for make in corpus]
    _wait(together)
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert a.tokens, f"request {i} produced nothing"
        assert b.tokens == a.tokens, f"request {i}: batched {b.tokens} != alone {a.tokens}"
        assert len(b.chunks) == len(a.chunks), f"request {i}: response count differs"
        assert b.log_probs == pytest.approx(a.log_probs, abs=1e-3), f"request {i}: log probs differ"
        assert b.top_ids == a.top_ids, f"request {i}: top tokens differ"


def test_log_probs_and_embedding_bias(engine: ReferenceEngine, tokenizer: Any) -> None:
    prompt = encode(tokenizer, render_chat([{"role": "user", "content": "Name a colour."}]))
    greedy = _submit(
        engine,
        dict(
            input_ids=prompt,
            max_new_tokens=6,
            end_id=C.END_OF_TURN_ID,
            return_log_probs=True,
            top_log_probs=3,
        ),
    )
    _wait([greedy])
    assert len(greedy.log_probs) == len(greedy.tokens) and all(v <= 0 for v in greedy.log_probs)
    # Greedy: the sampled token is the most likely, so it heads its top list.
    assert [top[0] for top in greedy.top_ids] == greedy.tokens
    assert all(len(top) == 3 for top in greedy.top_ids)
    # +100 forces a token at every step, -100 bans the greedy first token.
    forced_id = encode(tokenizer, " green")[0]
    force = torch.zeros(VOCAB)
    force[forced_id] = 100.0
    forced = _submit(
        engine, dict(input_ids=prompt, max_new_tokens=4, embedding_bias=force, return_log_probs=True)
    )
    ban = torch.zeros(VOCAB)
    ban[greedy.tokens[0]] = -100.0
    banned = _submit(
        engine, dict(input_ids=prompt, max_new_tokens=2, end_id=C.END_OF_TURN_ID, embedding_bias=ban)
    )
    _wait([forced, banned])
    assert forced.tokens == [forced_id] * 4 and forced.log_probs == pytest.approx([0.0] * 4, abs=1e-3)
    assert banned.tokens[0] != greedy.tokens[0]


def test_cancelled_row_leaves_others_untouched(engine: ReferenceEngine, corpus: list[Factory]) -> None:
    alone = _submit(engine, corpus[0]())
    _wait([alone])
    long = corpus[1]() | {"max_new_tokens": 200, "min_tokens": 200}
    cancelled = _submit(engine, long, cancel_after=3)
    other = _submit(engine, corpus[0]())
    _wait([cancelled, other])
    assert 3 <= len(cancelled.tokens) < 200
    assert other.tokens == alone.tokens


@pytest.mark.parametrize("gather_ms", [0.0, 100.0])
def test_idle_engine_gathers_a_burst_into_one_prefill(
    hf_model: torch.nn.Module, tokenizer: Any, gather_ms: float
) -> None:
    """Requests arriving a few ms apart at an idle engine: prefilled together when it gathers, the
    first alone (and the rest after it) when it does not."""
    eng = ReferenceEngine(hf_model, vocab_size=VOCAB, max_active=8, gather_ms=gather_ms)
    seen: list[int] = []
    prefill_step = eng._prefill_step
    eng._prefill_step = lambda job: (seen.append(len(job.rows)), prefill_step(job))[1]  # type: ignore[method-assign]
    try:
        prompt = encode(tokenizer, render_chat([{"role": "user", "content": "Say hi."}]))
        outs = []
        for _ in range(4):
            outs.append(_submit(eng, dict(input_ids=prompt, max_new_tokens=2, end_id=C.END_OF_TURN_ID)))
            time.sleep(0.01)
        _wait(outs)
        assert all(o.tokens == outs[0].tokens for o in outs)
    finally:
        eng.shutdown()
    assert sum(seen) == 4
    assert seen == [4] if gather_ms else seen[0] == 1


_SERVING_THREADS = """
import sys, torch
from cpu_engine.engine import GenerationRequest, ReferenceEngine, load_off_thread
from cpu_engine.packed_linear import HalfWeightLinear

model = load_off_thread(sys.argv[1], threads=2)
caller = torch.get_num_threads()
seen = []
engine = ReferenceEngine(model, vocab_size=int(sys.argv[2]), threads=2)
done = __import__("threading").Event()
engine.submit(GenerationRequest(
    input_ids=[2, 818], max_new_tokens=1,
    sink=lambda new, final, error: (seen.append(torch.get_num_threads()), final and done.set()),
))
assert done.wait(120)
engine.shutdown()
print(caller, seen[-1], type(model.lm_head).__name__)
"""


def test_served_model_computes_in_the_engine_thread_only(cpu_artifacts: CpuArtifacts) -> None:
    """As the Triton model serves it: loaded by a passing thread, the calling thread left with one torch
    thread (it only marshals requests), the engine thread with its own count (load_off_thread says why:
    a second OpenMP pool slows every parallel op of the engine's). A process of its own: thread counts
    are process state."""
    out = subprocess.run(
        [sys.executable, "-c", _SERVING_THREADS, str(cpu_artifacts.hf_dir), str(VOCAB)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "2", "HalfWeightLinear"]
