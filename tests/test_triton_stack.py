"""The CPU Triton stack end to end: real tritonserver, real Gemma 3 270M weights, tritonclient.grpc.aio."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from gemma3_core import constants as C
from gemma3_core.chat_template import render_chat
from gemma3_core.detokenize import ByteDetokenizer
from gemma3_core.tokenizer import encode
from tests.ensemble_client import ensemble_inputs, stream, tensor
from tests.fixtures.triton import engine_goes_idle
from tests.hf_reference import hf_greedy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = [
    render_chat([{"role": "user", "content": "Name three European capitals."}]),
    render_chat(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Zähle bis fünf, bitte: ünd?"},
        ]
    ),
    "<bos>日本の首都は東京です。日本の有名な食べ物は",
    "<bos>The quick brown fox 🦊 jumps over",
]


async def engine_greedy(url: str, ids: list[int], n: int) -> list[int]:
    inputs = [
        tensor("input_ids", [ids], np.int32),
        tensor("input_lengths", [[len(ids)]], np.int32),
        tensor("request_output_len", [[n]], np.int32),
        tensor("end_id", [[C.END_OF_TURN_ID]], np.int32),
        tensor("runtime_top_k", [[1]], np.int32),
        tensor("streaming", [[True]], bool),
        tensor("stop_words_list", [[[C.EOS_ID], [1]]], np.int32),
    ]
    res = await stream(url, "tensorrt_llm", inputs, output="output_ids")
    assert res.error is None, res.error
    return res.ids


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_greedy_tokens_equal_transformers(triton_server, hf_model, tokenizer, prompt: str) -> None:
    ids = encode(tokenizer, prompt)
    n = 24
    expected = hf_greedy(hf_model, ids, n)
    got = await engine_greedy(triton_server.grpc_url, ids, n)
    assert got == expected
    # ... and the ensemble's text is exactly those tokens' text.
    res = await stream(triton_server.grpc_url, "ensemble", ensemble_inputs(prompt, n, top_k=1))
    assert res.error is None, res.error
    assert res.data == ByteDetokenizer(tokenizer).token_bytes(expected)
    assert res.num_input_tokens == len(ids)
    assert res.num_output_tokens == len(expected)


async def test_plain_ensemble_request_gets_only_the_completion(triton_server, hf_model, tokenizer) -> None:
    # No stream, no exclude_input_in_output: the deployment default (true on GPU and CPU alike) applies.
    prompt = PROMPTS[3]
    expected = hf_greedy(hf_model, encode(tokenizer, prompt), 8)
    inputs = [tensor("text_input", [[prompt]]), tensor("max_tokens", [[8]], np.int32)]
    res = await stream(triton_server.grpc_url, "ensemble", inputs)
    assert res.error is None, res.error
    assert res.data == ByteDetokenizer(tokenizer).token_bytes(expected)


@pytest.mark.parametrize("prompt", [PROMPTS[2], PROMPTS[3], "<bos>中文：我喜欢吃"])
async def test_streamed_text_equals_non_streamed(triton_server, prompt: str) -> None:
    kw = dict(top_k=1, exclude_input_in_output=True)
    streamed = await stream(
        triton_server.grpc_url, "ensemble", ensemble_inputs(prompt, 32, stream_=True, **kw)
    )
    whole = await stream(triton_server.grpc_url, "ensemble", ensemble_inputs(prompt, 32, stream_=False, **kw))
    assert streamed.error is None and whole.error is None
    assert len(streamed.chunks) > 1 and len(whole.chunks) == 1
    assert streamed.data == whole.data
    text = whole.data.decode("utf-8")  # valid UTF-8 once joined, even if a chunk split a character
    assert re.search(r"[^\x00-\x7f]", text), f"prompt should produce non-ASCII text, got {text!r}"


async def test_seed_reproducible(triton_server) -> None:
    prompt = PROMPTS[0]
    kw = dict(temperature=1.0, top_p=0.95, exclude_input_in_output=True)
    a = await stream(triton_server.grpc_url, "ensemble", ensemble_inputs(prompt, 24, seed=1234, **kw))
    b = await stream(triton_server.grpc_url, "ensemble", ensemble_inputs(prompt, 24, seed=1234, **kw))
    c = await stream(triton_server.grpc_url, "ensemble", ensemble_inputs(prompt, 24, seed=99, **kw))
    assert a.data == b.data
    assert a.data != c.data


async def test_max_tokens_honoured(triton_server) -> None:
    res = await stream(
        triton_server.grpc_url, "ensemble", ensemble_inputs(PROMPTS[3], 7, min_tokens=7, top_k=1)
    )
    assert res.error is None
    assert res.num_output_tokens == 7


async def test_stop_words_stop(triton_server, tokenizer) -> None:
    prompt = PROMPTS[3]
    full = await stream(triton_server.grpc_url, "ensemble", ensemble_inputs(prompt, 24, top_k=1))
    words = full.data.decode().split()
    assert len(words) > 3
    stop = words[2]
    cut = await stream(
        triton_server.grpc_url, "ensemble", ensemble_inputs(prompt, 24, top_k=1, stop_words=[" " + stop])
    )
    assert cut.error is None
    assert cut.data.decode().endswith(stop)
    assert cut.num_output_tokens < full.num_output_tokens


async def test_cancellation_frees_the_engine(triton_server, tokenizer) -> None:
    url = triton_server.grpc_url
    ids = encode(tokenizer, PROMPTS[0])
    inputs = [
        tensor("input_ids", [ids], np.int32),
        tensor("input_lengths", [[len(ids)]], np.int32),
        tensor("request_output_len", [[1500]], np.int32),
        tensor("min_tokens", [[1500]], np.int32),
        tensor("streaming", [[True]], bool),
    ]
    t0 = time.monotonic()
    await stream(url, "ensemble", ensemble_inputs(PROMPTS[0], 8, top_k=1, min_tokens=8))
    idle = time.monotonic() - t0
    # A long generation, abandoned after three responses: leaving the gRPC stream cancels the request.
    # (Straight to the engine: Triton 2.51 does not pass an ensemble request's cancellation on to the
    # composing models, which is why the gateway streams from `tensorrt_llm` directly.)
    long = await stream(url, "tensorrt_llm", inputs, output="output_ids", stop_after=3)
    assert len(long.chunks) == 3
    assert engine_goes_idle(triton_server), "the engine kept generating for a cancelled request"
    t0 = time.monotonic()
    res = await stream(url, "ensemble", ensemble_inputs(PROMPTS[0], 8, top_k=1, min_tokens=8))
    after = time.monotonic() - t0
    assert res.num_output_tokens == 8
    assert after < idle * 1.6 + 0.5, (idle, after)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (lambda n: [tensor("max_tokens", [[8]], np.int32)], "text_input"),
        (lambda n: ensemble_inputs("", 8), "empty"),
        (lambda n: ensemble_inputs(PROMPTS[0], 0), "max_tokens"),
        (lambda n: ensemble_inputs(PROMPTS[0], -5), "max_tokens"),
        (lambda n: ensemble_inputs("<bos>" + "word " * (n + 16), 8), "context"),
        (lambda n: ensemble_inputs("<bos>look: " + C.IMAGE_SOFT_TOKEN, 8), C.IMAGE_SOFT_TOKEN),
        (lambda n: ensemble_inputs("<bos>" + C.START_OF_IMAGE, 8), "image"),
        (lambda n: ensemble_inputs(PROMPTS[0], 8, images=[b"not an image"]), "image"),
    ],
)  # n: the served context (max_seq_len)
async def test_bad_input_is_a_clean_error(triton_server, inputs, message: str) -> None:
    res = await stream(triton_server.grpc_url, "ensemble", inputs(triton_server.max_model_len), timeout=30)
    assert res.error is not None, "expected an error response"
    assert message.lower() in res.error.lower(), res.error


async def test_engine_rejects_bad_tensors(triton_server) -> None:
    url = triton_server.grpc_url
    base = [tensor("input_lengths", [[3]], np.int32), tensor("request_output_len", [[4]], np.int32)]
    res = await stream(url, "tensorrt_llm", base, output="output_ids", timeout=30)
    assert res.error and "input_ids" in res.error
    ids = [tensor("input_ids", [[2, 9259, C.SENTENCEPIECE_VOCAB + 5]], np.int32)]
    res = await stream(url, "tensorrt_llm", base + ids, output="output_ids", timeout=30)
    assert res.error and "prompt_embedding_table" in res.error


async def test_stream_ending_on_end_id_is_clean(triton_server, tokenizer) -> None:
    # The engine's last streamed response after end_id carries zero tokens: it must end the stream cleanly.
    prompt = PROMPTS[3]
    ids = await engine_greedy(triton_server.grpc_url, encode(tokenizer, prompt), 8)
    end_id = ids[3]
    assert end_id not in ids[:3]
    res = await stream(triton_server.grpc_url, "ensemble", ensemble_inputs(prompt, 8, top_k=1, end_id=end_id))
    assert res.error is None, res.error
    assert res.num_output_tokens == 3
    assert res.data == ByteDetokenizer(tokenizer).token_bytes(ids[:3])


async def test_ensemble_applies_a_logit_bias(triton_server, tokenizer) -> None:
    """Triton runs the ensemble itself: bias ids/weights -> preprocessing's dense EMBEDDING_BIAS -> engine."""
    prompt = PROMPTS[3]
    plain = await stream(triton_server.grpc_url, "ensemble", ensemble_inputs(prompt, 4, top_k=1))
    assert plain.error is None
    forced_id = encode(tokenizer, " green")[0]
    inputs = [
        *ensemble_inputs(prompt, 4, top_k=1),
        tensor("embedding_bias_ids", [[forced_id]], np.int32),
        tensor("embedding_bias_weights", [[100.0]], np.float32),
    ]
    forced = await stream(triton_server.grpc_url, "ensemble", inputs)
    assert forced.error is None, forced.error
    assert forced.data.decode() == " green" * 4 != plain.data.decode()
    bad = [
        *ensemble_inputs(prompt, 4),
        tensor("embedding_bias_ids", [[C.GEMMA3_270M.vocab_size]], np.int32),
        tensor("embedding_bias_weights", [[1.0]], np.float32),
    ]
    refused = await stream(triton_server.grpc_url, "ensemble", bad)
    assert refused.error is not None and "embedding bias ids" in str(refused.error)
