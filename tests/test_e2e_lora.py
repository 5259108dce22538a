"""LoRA end to end (issue 9): PEFT adapters on the real 270M model, served through the gateway and Triton.

Two synthetic adapters (r=8 on q_proj/v_proj, random weights from fixed seeds so outputs differ visibly)
are saved with PEFT into a temporary adapters directory; a second gateway (GATEWAY_LORA_DIR) runs in front
of the session's Triton. The reference is PEFT's merged model generating greedily from the same rendered
prompt. Triton carries FP16 LoRA tensors, so equality relies on no near-tie in the logits (docs/lora.md).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.triton.tensors import TritonResponse
from stack.triton_launcher import free_port
from tests.fixtures.gateway import GatewayTarget, gateway_env, run_gateway
from tests.fixtures.remote import deployment_from_env, local_only

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
MAX_TOKENS = 12
ADAPTER_SEEDS = {"sea-alpha": 11, "sea-beta": 22}
B_SCALE = (
    0.05  # std of the random lora_B entries: large enough to change greedy text, small enough to stay fluent
)
COPY = "sea-alpha-copy"  # alpha's files under a name the engine has never seen (cache-miss test)


@dataclass
class LoraSetup:
    adapters_dir: Path
    base: str
    expected: dict[str, str]  # model id → PEFT/transformers greedy text


@pytest.fixture(scope="module")
def lora_setup(gateway: GatewayTarget, tmp_path_factory: pytest.TempPathFactory) -> LoraSetup:
    local_only(gateway, "makes adapters for the local base model and serves them from a second gateway")
    import peft
    import torch

    from cpu_engine.engine import load_model
    from gemma3_core.chat_template import render_chat
    from gemma3_core.detokenize import ByteDetokenizer
    from gemma3_core.tokenizer import encode, load_tokenizer
    from tests.hf_reference import hf_greedy

    triton = gateway.triton
    tok = load_tokenizer(triton.tokenizer_dir)
    ids = encode(tok, render_chat(MESSAGES))
    detok = ByteDetokenizer(tok)

    def greedy_text(model: Any) -> str:
        return detok.token_bytes(hf_greedy(model, ids, MAX_TOKENS)).decode("utf-8", errors="replace")

    root = tmp_path_factory.mktemp("lora") / "adapters"
    expected: dict[str, str] = {}
    for name, seed in ADAPTER_SEEDS.items():
        # Stock transformers layers over the weights the local engine serves (its default weight dtype).
        model = load_model(triton.hf_model_dir, pack=False)
        if triton.model_id not in expected:
            expected[triton.model_id] = greedy_text(model)
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        torch.manual_seed(seed)  # PEFT draws lora_A from torch's global generator: the same adapter every run
        adapted = peft.get_peft_model(model, config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, param in adapted.named_parameters():
                if "lora_B" in pname:  # PEFT zero-inits B: the adapter would be the identity
                    param.copy_(torch.randn(param.shape, generator=gen) * B_SCALE)
        adapted.save_pretrained(root / name)
        expected[name] = greedy_text(adapted.merge_and_unload().eval())
        del model, adapted
    shutil.copytree(root / "sea-alpha", root / COPY)
    expected[COPY] = expected["sea-alpha"]
    return LoraSetup(root, str(triton.model_id), expected)


@pytest.fixture(scope="module")
def lora_gateway(
    gateway: GatewayTarget, lora_setup: LoraSetup, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    env = gateway_env(gateway.triton, free_port(), GATEWAY_LORA_DIR=str(lora_setup.adapters_dir))
    with run_gateway(env, tmp_path_factory.mktemp("gateway-lora") / "gateway.log") as url:
        yield url


@pytest.fixture(scope="module")
def sdk(lora_gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{lora_gateway}/v1", api_key="unused", max_retries=0, timeout=300)


def complete(sdk: openai.OpenAI, model: str) -> str:
    completion = sdk.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
    )
    assert completion.model == model
    return completion.choices[0].message.content or ""


def test_setup_adapters_change_the_output(lora_setup: LoraSetup) -> None:
    texts = [lora_setup.expected[n] for n in (lora_setup.base, *ADAPTER_SEEDS)]
    assert len(set(texts)) == 3, texts  # otherwise the equality tests below prove nothing


def test_models_list_adapters(lora_gateway: str, lora_setup: LoraSetup) -> None:
    data = httpx.get(f"{lora_gateway}/v1/models", timeout=30).json()["data"]
    cards = {m["id"]: m for m in data}
    assert data[0]["id"] == lora_setup.base
    for name in (*ADAPTER_SEEDS, COPY):
        assert cards[name]["parent"] == lora_setup.base and cards[name]["root"] == lora_setup.base


@pytest.mark.parametrize("name", list(ADAPTER_SEEDS))
def test_adapter_equals_peft_merged_model(sdk: openai.OpenAI, lora_setup: LoraSetup, name: str) -> None:
    assert complete(sdk, name) == lora_setup.expected[name]
    # Again (weights are cached by the engine now: only the task id is sent), and as `base:adapter`.
    assert complete(sdk, f"{lora_setup.base}:{name}") == lora_setup.expected[name]


def test_base_model_unchanged(sdk: openai.OpenAI, lora_setup: LoraSetup) -> None:
    assert complete(sdk, lora_setup.base) == lora_setup.expected[lora_setup.base]


def test_interleaved_adapters_do_not_bleed(sdk: openai.OpenAI, lora_setup: LoraSetup) -> None:
    order = ["sea-alpha", "sea-beta", lora_setup.base, "sea-beta", "sea-alpha", lora_setup.base]
    with ThreadPoolExecutor(len(order)) as pool:
        texts = list(pool.map(lambda m: complete(sdk, m), order))
    assert texts == [lora_setup.expected[m] for m in order]


@pytest.mark.parametrize("model", ["no-such-adapter", "{base}:no-such-adapter"])
def test_unknown_adapter_is_404(lora_gateway: str, lora_setup: LoraSetup, model: str) -> None:
    body = {"model": model.format(base=lora_setup.base), "messages": MESSAGES, "max_tokens": 2}
    response = httpx.post(f"{lora_gateway}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"


class Recording:
    """The real Triton client, recording which LoRA inputs each request carried."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.url = inner.url
        self.sent: list[set[str]] = []

    async def ready(self) -> tuple[bool, str]:
        return await self.inner.ready()

    async def model_spec(self) -> Any:
        return await self.inner.model_spec()

    async def close(self) -> None:
        await self.inner.close()

    async def generate(
        self, prompt: str, values: Mapping[str, Any], request_id: str
    ) -> AsyncIterator[TritonResponse]:
        self.sent.append({k for k in values if k.startswith("lora_")})
        async for response in self.inner.generate(prompt, values, request_id):
            yield response


async def test_engine_cache_miss_is_retried_with_weights(
    gateway: GatewayTarget, lora_setup: LoraSetup
) -> None:
    """The gateway believes the weights were sent, the engine never saw them: its real cache-miss error
    makes the gateway resend once with the weights, and the client sees a normal answer."""
    from gateway.app import create_app
    from gateway.settings import GatewaySettings
    from gateway.triton.client import TritonStreamClient

    triton = gateway.triton
    settings = GatewaySettings(
        model_id=lora_setup.base,
        model_aliases=[],
        triton_grpc_url=triton.grpc_url,
        tokenizer_dir=triton.tokenizer_dir,
        max_model_len=triton.max_model_len,
        lora_dir=lora_setup.adapters_dir,
        images_enabled=False,
    )
    backend = Recording(TritonStreamClient(settings.grpc_url, settings.triton_model))
    app = create_app(settings, backend=backend)
    registry = app.state.gateway.lora.registry
    registry.request_inputs(COPY)  # marks the weights as sent without sending them: an engine that forgot
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            body = {"model": COPY, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0}
            response = await client.post("/v1/chat/completions", json=body, timeout=300)
    finally:
        await backend.close()
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == lora_setup.expected[COPY]
    assert backend.sent == [{"lora_task_id"}, {"lora_task_id", "lora_weights", "lora_config"}]


# --- against a deployment (E2E_BASE_URL): the adapter it serves, named by E2E_LORA_MODEL ---------------
def _deployment() -> tuple[str, str, dict[str, str]]:
    target = deployment_from_env()
    if target is None:
        pytest.skip("local_covered: the tests above serve PEFT-verified adapters from a local gateway")
    return target


def test_deployment_serves_its_adapter() -> None:
    import os

    url, model, headers = _deployment()
    adapter = os.environ.get("E2E_LORA_MODEL")
    if not adapter:
        pytest.skip("remote_unsupported: set E2E_LORA_MODEL to an adapter id the deployment serves")
    with httpx.Client(base_url=url, headers=headers, timeout=300) as http:
        ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert adapter in ids, sorted(ids)
        body = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0}
        base = http.post("/v1/chat/completions", json={**body, "model": model})
        tuned = http.post("/v1/chat/completions", json={**body, "model": adapter})
        assert base.status_code == tuned.status_code == 200, (base.text, tuned.text)
        assert tuned.json()["model"] == adapter and tuned.json()["choices"][0]["message"]["content"]


def test_deployment_unknown_adapter_is_404() -> None:
    url, model, headers = _deployment()
    body = {"model": f"{model}:no-such-adapter", "messages": MESSAGES, "max_tokens": 2}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"
