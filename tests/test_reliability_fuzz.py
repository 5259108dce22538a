"""Schemathesis fuzzing of the gateway's own OpenAPI document: no response >= 500, no hang.

The gateway (`python -m gateway`, a subprocess) runs in front of a real tritonserver with the FAST ENGINE
TEST DOUBLE at full speed (no pacing), so valid requests complete in milliseconds. Every operation gets
up to FUZZ_EXAMPLES generated requests (default 1000; the chat completion operation, whose body is the
full request schema, uses them all); the last test checks that at least 1000 requests were sent.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from build_engine.cpu import CpuArtifacts, cache_root
from gemma3_core import constants as C
from stack.triton_launcher import free_port
from tests.fixtures.double import run_double
from tests.fixtures.gateway import gateway_env, run_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
REQUEST_TIMEOUT_S = 30.0  # a response slower than this counts as a hang
SENT: Counter[int] = Counter()  # status code -> count
SLOWEST: list[float] = [0.0]


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz")
    with run_double(root, token_interval_us=0) as double:
        triton = SimpleNamespace(
            grpc_url=double.ports.grpc_url,
            model_id=C.CPU_MODEL_ID,
            tokenizer_dir=CpuArtifacts(cache_root()).tokenizer_dir,
            max_model_len=512,
        )
        env = gateway_env(
            triton,
            free_port(),
            GATEWAY_DEFAULT_MAX_TOKENS="16",
            GATEWAY_MAX_COMPLETION_TOKENS="64",
            GATEWAY_REQUEST_TIMEOUT_S="20",
            GATEWAY_IMAGES_ENABLED="false",
        )
        with run_gateway(env, root / "gateway.log") as url:
            yield url


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_gateway: str) -> object:
    return schemathesis.openapi.from_url(f"{fuzz_gateway}/openapi.json")


def _operations(schema: object) -> list[object]:
    # schemathesis' pytest plugin does not run under this pytest, so drive its strategies directly.
    return [result.ok() for result in schema.get_all_operations()]  # type: ignore[attr-defined]


def test_fuzz_no_server_errors_no_hangs(fuzz_schema: object) -> None:
    operations = _operations(fuzz_schema)
    assert any(op.path == "/v1/chat/completions" for op in operations)  # type: ignore[attr-defined]
    for operation in operations:

        @given(case=operation.as_strategy())  # type: ignore[attr-defined]
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,  # the same requests every run
            database=None,
        )
        def fuzz(case: object) -> None:
            started = time.monotonic()
            # Connection: close, so no idle keep-alive socket delays the gateway's shutdown at teardown.
            response = case.call(timeout=REQUEST_TIMEOUT_S, headers={"Connection": "close"})  # type: ignore[attr-defined]
            SLOWEST[0] = max(SLOWEST[0], time.monotonic() - started)
            SENT[response.status_code] += 1
            assert response.status_code < 500, (case, response.status_code, response.text[:500])
            if response.status_code >= 400:
                assert "error" in response.json()  # OpenAI-shaped, never an HTML/plain error page

        fuzz()


def test_fuzz_request_count() -> None:
    total = sum(SENT.values())
    print(f"\n[fuzz] {total} requests, statuses {dict(sorted(SENT.items()))}, slowest {SLOWEST[0]:.2f} s")
    if FUZZ_EXAMPLES >= 1000:
        assert total >= 1000
    assert not any(status >= 500 for status in SENT)
