"""The fast TEST DOUBLE of `tensorrt_llm` honours the engine contract through the real ensemble.

Starts its own tritonserver (render target `cpu-fast-double`) on free ports; needs only the tokenizer of the
prepared CPU artifacts (no model weights are loaded), so it runs in a few seconds once they exist.
"""

from __future__ import annotations

import queue
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from build_engine import fast_double
from build_engine.cpu import cache_root
from build_engine.fast_double import TOKEN_CYCLE, TOKEN_CYCLE_TEXT

pytestmark = pytest.mark.e2e

CYCLE_TEXT = TOKEN_CYCLE_TEXT.encode()
INTERVAL_US = 2000
PROMPT = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def _cycle_bytes(n: int) -> bytes:
    """Bytes of the first n tokens of the cycle (byte-fallback tokens 10-12 are the 3 bytes of '€')."""
    from gemma3_core.detokenize import ByteDetokenizer
    from gemma3_core.tokenizer import load_tokenizer

    tok = load_tokenizer(cache_root() / "hf" / "gemma-3-270m")
    return ByteDetokenizer(tok).token_bytes([TOKEN_CYCLE[i % len(TOKEN_CYCLE)] for i in range(n)])


def _serve(tmp_path_factory: pytest.TempPathFactory, implementation: str) -> Iterator[Any]:
    from stack.triton_launcher import TritonPorts, start

    repo = fast_double.render_repository(
        tmp_path_factory.mktemp(f"fast_double_{implementation}") / "model_repository",
        INTERVAL_US,
        max_batch_size=8,
        max_seq_len=256,
        implementation=implementation,
    )
    log = (repo.parent / "tritonserver.log").open("w")
    proc = start(
        repo,
        ports=TritonPorts.free(),
        log_sink=lambda line: None if log.closed else (log.write(line + "\n"), log.flush()),
    )
    try:
        proc.wait_ready(timeout=180)
        yield proc
    finally:
        proc.stop()
        log.close()
        print(f"[test_fast_double] log: {repo.parent / 'tritonserver.log'}", file=sys.stderr)


@pytest.fixture(scope="module")
def double_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from _serve(tmp_path_factory, "python")


@pytest.fixture(scope="module")
def native_double_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The C++ implementation the benchmarks use (compiled here with g++)."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the native fast double (apt-get install g++)")
    yield from _serve(tmp_path_factory, "native")


# The native double is compiled here; without g++ (the Makefile installs it where it can) it cannot run.
NEEDS_GXX = pytest.mark.optional(reason="compiles the native double with g++, which may be missing")


@pytest.fixture(params=["python", pytest.param("native", marks=NEEDS_GXX)])
def any_double(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("double_server" if request.param == "python" else "native_double_server")


def _stream(
    url: str, model: str, inputs: dict[str, np.ndarray], *, cancel_after: int | None = None
) -> list[Any]:
    """Send one request on a gRPC stream; return its results until the final flag (or cancellation)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    results: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put(error or result))
    tensors = []
    for name, value in inputs.items():
        t = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        t.set_data_from_numpy(value)
        tensors.append(t)
    client.async_stream_infer(model, tensors, enable_empty_final_response=True)
    out: list[Any] = []
    try:
        while True:
            item = results.get(timeout=30)
            if isinstance(item, Exception):
                out.append(item)
                return out
            out.append(item)
            final = item.get_response().parameters["triton_final_response"].bool_param
            if final:
                return out
            if cancel_after is not None and len(out) >= cancel_after:
                client.stop_stream(cancel_requests=True)
                return out
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def _ensemble_inputs(max_tokens: int, stream: bool, **extra: Any) -> dict[str, np.ndarray]:
    inputs = {
        "text_input": np.array([[PROMPT.encode()]], dtype=object),
        "max_tokens": np.array([[max_tokens]], dtype=np.int32),
        "stream": np.array([[stream]], dtype=bool),
        "exclude_input_in_output": np.array([[True]], dtype=bool),
        "return_num_input_tokens": np.array([[True]], dtype=bool),
        "return_num_output_tokens": np.array([[True]], dtype=bool),
    }
    for name, value in extra.items():
        inputs[name] = np.array([[value]], dtype=np.int32)
    return inputs


def _text(results: list[Any]) -> bytes:
    out = b""
    for r in results:
        arr = r.as_numpy("text_output")
        if arr is not None:
            out += b"".join(arr.reshape(-1))
    return out


def _count(results: list[Any], name: str) -> list[int]:
    return [int(r.as_numpy(name).reshape(-1)[0]) for r in results if r.as_numpy(name) is not None]


def test_streaming_emits_the_cycle_one_token_per_response(any_double: Any) -> None:
    n = 20  # > one cycle: the split '€' and the wrap-around are both covered
    results = _stream(any_double.grpc_url, "ensemble", _ensemble_inputs(n, True))
    assert not any(isinstance(r, Exception) for r in results), results
    with_output = [r for r in results if _count([r], "num_output_tokens")]
    assert _count(with_output, "num_output_tokens") == [1] * n
    assert _text(results) == _cycle_bytes(n)
    assert "€ über".encode() in _text(results)
    n_in = set(_count(with_output, "num_input_tokens"))
    assert len(n_in) == 1 and n_in.pop() > 5


def test_non_streaming_is_one_response_with_the_same_text(double_server: Any) -> None:
    results = _stream(double_server.grpc_url, "ensemble", _ensemble_inputs(7, False))
    with_output = [
        r for r in results if r.as_numpy("text_output") is not None and _count([r], "num_output_tokens")
    ]
    assert len(with_output) == 1
    assert _count(with_output, "num_output_tokens") == [7]
    assert _text(results) == _cycle_bytes(7)


def test_end_id_stops_without_emitting_it_non_streaming(double_server: Any) -> None:
    # end_id = '!' (4th id of the cycle): three tokens, '!' is not output.
    results = _stream(double_server.grpc_url, "ensemble", _ensemble_inputs(10, False, end_id=236888))
    assert not any(isinstance(r, Exception) for r in results), [str(r) for r in results]
    assert _text(results) == b"Hello, world"
    assert sum(_count(results, "num_output_tokens")) == 3


def test_end_id_stops_without_emitting_it_streaming(double_server: Any) -> None:
    results = _stream(double_server.grpc_url, "ensemble", _ensemble_inputs(10, True, end_id=236888))
    assert not any(isinstance(r, Exception) for r in results), [str(r) for r in results]
    assert _text(results) == b"Hello, world"
    assert sum(_count(results, "num_output_tokens")) == 3


def test_paced_at_the_configured_interval(any_double: Any) -> None:
    start = time.perf_counter()
    results = _stream(any_double.grpc_url, "ensemble", _ensemble_inputs(25, True))
    elapsed = time.perf_counter() - start
    assert sum(_count(results, "num_output_tokens")) == 25
    assert elapsed >= 24 * INTERVAL_US / 1e6  # an absolute schedule never runs early


def test_cancellation_stops_generation(any_double: Any) -> None:
    # A long request cancelled after a few tokens; the server must stay healthy and serve the next one.
    results = _stream(any_double.grpc_url, "ensemble", _ensemble_inputs(200, True), cancel_after=3)
    assert len(results) >= 3
    follow = _stream(any_double.grpc_url, "ensemble", _ensemble_inputs(2, True))
    assert _text(follow) == _cycle_bytes(2)


def test_log_probs_only_with_return_log_probs(any_double: Any) -> None:
    """Made-up log probs in the reference engine's shapes: output_log_probs [1, 1, tokens], the top-k
    extension [1, tokens, k] (the token itself first, then the next cycle ids), k the contract's."""
    from triton_io.contract import TOP_LOG_PROBS_K

    inputs = {
        "input_ids": np.array([[2, 9259, 1902]], dtype=np.int32),
        "input_lengths": np.array([[3]], dtype=np.int32),
        "request_output_len": np.array([[3]], dtype=np.int32),
        "streaming": np.array([[True]], dtype=bool),
    }
    plain = _stream(any_double.grpc_url, "tensorrt_llm", inputs)
    assert _count(plain, "output_ids") and all(r.as_numpy("output_log_probs") is None for r in plain)
    asked = {**inputs, "return_log_probs": np.array([[True]], dtype=bool)}
    results = [r for r in _stream(any_double.grpc_url, "tensorrt_llm", asked) if _count([r], "output_ids")]
    assert len(results) == 3
    for i, r in enumerate(results):
        assert r.as_numpy("output_log_probs").tolist() == [[[-0.5]]]
        ids, values = r.as_numpy("ext_top_log_prob_ids"), r.as_numpy("ext_top_log_probs")
        assert ids.shape == values.shape == (1, 1, TOP_LOG_PROBS_K)
        cycle = [TOKEN_CYCLE[(i + j) % len(TOKEN_CYCLE)] for j in range(TOP_LOG_PROBS_K)]
        assert ids.reshape(-1).tolist() == cycle
        assert values.reshape(-1).tolist() == [-0.5 - j for j in range(TOP_LOG_PROBS_K)]


def test_direct_engine_contract_and_errors(double_server: Any) -> None:
    ids = np.array([[2, 9259, 1902]], dtype=np.int32)
    inputs = {
        "input_ids": ids,
        "input_lengths": np.array([[3]], dtype=np.int32),
        "request_output_len": np.array([[4]], dtype=np.int32),
        "streaming": np.array([[False]], dtype=bool),
    }
    results = _stream(double_server.grpc_url, "tensorrt_llm", inputs)
    out = [r for r in results if r.as_numpy("output_ids") is not None and r.as_numpy("output_ids").size]
    assert len(out) == 1
    # exclude_input_in_output unset: the prompt comes back in front of the new tokens, as TensorRT-LLM does.
    assert out[0].as_numpy("output_ids").reshape(-1).tolist() == [2, 9259, 1902, 9259, 236764, 1902, 236888]
    assert int(out[0].as_numpy("sequence_length").reshape(-1)[0]) == 7
    assert int(out[0].as_numpy("num_input_tokens").reshape(-1)[0]) == 3
    bad = {**inputs, "request_output_len": np.array([[0]], dtype=np.int32)}
    errors = _stream(double_server.grpc_url, "tensorrt_llm", bad)
    assert isinstance(errors[-1], Exception) and "request_output_len" in str(errors[-1])


def test_cycle_ids_are_the_documented_text() -> None:
    assert _cycle_bytes(len(TOKEN_CYCLE)) == CYCLE_TEXT


@NEEDS_GXX
def test_native_double_streams_requested_outputs_and_refuses_clearly(native_double_server: Any) -> None:
    url = native_double_server.grpc_url
    inputs = {
        "input_ids": np.array([[2, 9259, 1902]], dtype=np.int32),
        "input_lengths": np.array([[3]], dtype=np.int32),
        "request_output_len": np.array([[18]], dtype=np.int32),
        "streaming": np.array([[True]], dtype=bool),
    }
    results = _stream(url, "tensorrt_llm", inputs)
    assert not any(isinstance(r, Exception) for r in results), [str(r) for r in results]
    ids = [
        int(r.as_numpy("output_ids").reshape(-1)[0]) for r in results if r.as_numpy("output_ids") is not None
    ]
    assert ids == [TOKEN_CYCLE[i % len(TOKEN_CYCLE)] for i in range(18)]
    assert set(_count(results, "num_input_tokens")) == {3}
    assert results[-1].get_response().parameters["triton_final_response"].bool_param
    for bad, needle in (
        ({**inputs, "streaming": np.array([[False]], dtype=bool)}, "streaming"),
        ({**inputs, "request_output_len": np.array([[0]], dtype=np.int32)}, "request_output_len"),
    ):
        errors = _stream(url, "tensorrt_llm", bad)
        assert isinstance(errors[-1], Exception) and needle in str(errors[-1]), errors
    follow = _stream(url, "ensemble", _ensemble_inputs(3, True))  # still serving after the refusals
    assert _text(follow) == _cycle_bytes(3)
