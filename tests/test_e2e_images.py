"""Images end to end (issue 4): the real gateway fetches `image_url` parts and Triton runs the vision path.

The CPU model is a small base model with a synthetic vision tower: the tests check mechanics (token counts
equal HF's Gemma3Processor, images change the output, fetch policy errors are 400s naming the part, a slow
image host does not stall other requests), never answer quality.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from stack.triton_launcher import free_port
from tests.fixtures.gateway import (
    CARD_MULTIMODAL,
    NEEDS_CURL,
    GatewayTarget,
    gateway_env,
    run_gateway,
)
from tests.fixtures.remote import gpu_model, local_only

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


MAX_TOKENS = 8
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


# --- images ------------------------------------------------------------------------------------------
def _encode(img: Any, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def red_png() -> bytes:
    return _encode(Image.new("RGB", (64, 48), (220, 20, 20)), "PNG")


def noise_jpeg() -> bytes:
    import numpy as np

    pixels = np.random.default_rng(7).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), "JPEG")


def stripes_png() -> bytes:
    import numpy as np

    pixels = np.zeros((100, 100, 3), dtype=np.uint8)
    pixels[::8] = (0, 255, 0)
    pixels[:, ::5, 2] = 255
    return _encode(Image.fromarray(pixels), "PNG")


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG declaring 10^10 pixels (a decompression bomb): must be refused before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(*urls: str, text: str = "Describe the image.") -> list[dict[str, Any]]:
    return [SYSTEM, {"role": "user", "content": [{"type": "text", "text": text}, *map(image_part, urls)]}]


# --- fixtures ------------------------------------------------------------------------------------------
def _sdk(url: str, api_key: str = "") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", max_retries=0, timeout=300)


class ImageHost:
    """A local image server: /red.png, /noise.jpg, /text (not an image), /stall (never answers in time)."""

    def __init__(self) -> None:
        files = {"/red.png": (red_png(), "image/png"), "/noise.jpg": (noise_jpeg(), "image/jpeg")}
        files["/text"] = (b"hello, not an image", "text/plain")
        self.release = threading.Event()
        release = self.release

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/stall":
                    release.wait(60)  # a slow host: the gateway's read timeout fires first
                    return
                body, kind = files.get(self.path, (b"", ""))
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", kind or "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()
    yield host
    host.close()


@pytest.fixture(scope="module")
def allow_gateway(gateway: GatewayTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second gateway (same Triton) whose image allow-list admits 127.0.0.1, with short fetch timeouts."""
    triton = local_only(gateway, "starts a second gateway with other settings in front of the local Triton")
    env = gateway_env(
        triton,
        free_port(),
        GATEWAY_IMAGES_ALLOW_LIST="127.0.0.1",
        GATEWAY_IMAGES_READ_TIMEOUT_S="3",
        GATEWAY_IMAGES_FETCH_TIMEOUT_S="5",
    )
    with run_gateway(env, tmp_path_factory.mktemp("gateway-images") / "gateway.log") as url:
        yield url


def greedy(sdk: openai.OpenAI, model: str, messages: list[dict[str, Any]], **kw: Any) -> Any:
    return sdk.chat.completions.create(
        model=model, messages=messages, max_tokens=kw.pop("max_tokens", MAX_TOKENS), temperature=0, **kw
    )


def hf_prompt_tokens(gateway: GatewayTarget, messages: list[dict[str, Any]], images: list[bytes]) -> int:
    """HF's count: our template rendering, then transformers' Gemma3Processor (expansion + tokenizer)."""
    local_only(gateway, "counts tokens with the local tokenizer files")
    import transformers

    from gemma3_core.chat_template import render_chat

    template = [
        {
            **m,
            "content": [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]
            if isinstance(m["content"], list)
            else m["content"],
        }
        for m in messages
    ]
    prompt = render_chat(template, add_generation_prompt=True)
    tok = transformers.AutoTokenizer.from_pretrained(
        gateway.triton.tokenizer_dir,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    try:  # transformers 5: the PIL backend by name (the default one wants torchvision)
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil as ImageProcessor,
        )
    except ImportError:  # older transformers
        from transformers import Gemma3ImageProcessor as ImageProcessor
    processor = transformers.Gemma3Processor(
        image_processor=ImageProcessor(size={"height": 896, "width": 896}),
        tokenizer=tok,
        image_seq_length=256,
    )
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    out = processor(text=[prompt], images=[pil], add_special_tokens=False, return_tensors="np")
    return int(out["input_ids"].shape[1])


# --- happy paths -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def red_answer(gateway: GatewayTarget, sdk: openai.OpenAI) -> Any:
    """The greedy answer to the red PNG as a data URL; the tests that send the same request by another
    route (streamed, by http URL) compare with it instead of asking again (each image costs a prefill)."""
    return greedy(sdk, gateway.model, ask(data_url(red_png())))


def check_counts_like_hf(
    gateway: GatewayTarget, messages: list[dict[str, Any]], data: bytes, completion: Any
) -> None:
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert isinstance(completion.choices[0].message.content, str)
    assert completion.usage is not None
    # 256 soft tokens + boi/eoi + newlines per image: the engine saw the image.
    assert completion.usage.prompt_tokens == hf_prompt_tokens(gateway, messages, [data])
    assert completion.usage.prompt_tokens > 256


def test_png_data_url_counts_like_hf(gateway: GatewayTarget, red_answer: Any) -> None:
    check_counts_like_hf(gateway, ask(data_url(red_png())), red_png(), red_answer)


def test_jpeg_data_url_counts_like_hf(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    data = noise_jpeg()
    messages = ask(data_url(data, "image/jpeg"))
    check_counts_like_hf(gateway, messages, data, greedy(sdk, gateway.model, messages))


def test_two_images_in_one_message(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    images = [red_png(), noise_jpeg()]
    messages = ask(data_url(images[0]), data_url(images[1], "image/jpeg"), text="Compare the images.")
    completion = greedy(sdk, gateway.model, messages)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == hf_prompt_tokens(gateway, messages, images)
    assert completion.usage.prompt_tokens > 2 * 256


def test_images_change_output_and_are_deterministic(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    def text(data: bytes) -> str:
        return greedy(sdk, gateway.model, ask(data_url(data)), max_tokens=12).choices[0].message.content or ""

    red, stripes = text(red_png()), text(stripes_png())
    assert red != stripes  # the pixels reach the model
    assert text(red_png()) == red  # same image, greedy: same output


def test_streaming_with_image(gateway: GatewayTarget, sdk: openai.OpenAI, red_answer: Any) -> None:
    stream = greedy(sdk, gateway.model, ask(data_url(red_png())), stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == red_answer.choices[0].message.content


def test_http_url_from_allow_listed_host(
    gateway: GatewayTarget, allow_gateway: str, image_host: ImageHost, red_answer: Any
) -> None:
    sdk = _sdk(allow_gateway)
    by_url = greedy(sdk, gateway.model, ask(image_host.url("/red.png")))
    by_data = red_answer
    assert by_url.choices[0].message.content == by_data.choices[0].message.content
    assert by_url.usage is not None and by_data.usage is not None
    assert by_url.usage.prompt_tokens == by_data.usage.prompt_tokens
    # The allow-list admits the host; the content rules still apply.
    error = _error(
        httpx.post(f"{allow_gateway}/v1/chat/completions", json=_body(gateway, image_host.url("/text")))
    )
    assert error["param"] == "messages[1].content[1].image_url.url"


def test_slow_image_host_does_not_stall_other_requests(
    gateway: GatewayTarget, allow_gateway: str, image_host: ImageHost
) -> None:
    text_body = {
        "model": gateway.model,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        "temperature": 0,
    }
    with ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        slow = pool.submit(
            httpx.post,
            f"{allow_gateway}/v1/chat/completions",
            json=_body(gateway, image_host.url("/stall")),
            timeout=60,
        )
        time.sleep(0.5)  # the stalled fetch is in flight
        fast = httpx.post(f"{allow_gateway}/v1/chat/completions", json=text_body, timeout=60)
        fast_done = time.monotonic() - started
        assert fast.status_code == 200, fast.text
        assert not slow.done(), "the stalled fetch should still be waiting"
        slow_response = slow.result()
    assert fast_done < 3.0 + 0.5 + 10, fast_done  # finished well before the stalled fetch would have
    error = _error(slow_response)
    assert error["param"] == "messages[1].content[1].image_url.url"
    assert error["code"] == "image_timeout"


# --- bad input ----------------------------------------------------------------------------------------
def _body(gateway: GatewayTarget, *urls: str, **extra: Any) -> dict[str, Any]:
    return {"model": gateway.model, "messages": ask(*urls), "max_tokens": 4, **extra}


def _error(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("not-an-image", "invalid_image_format"),
        ("private-address", "image_url_forbidden"),
        ("file-url", "invalid_image_url"),
        ("decompression-bomb", "image_too_large"),
        ("not-base64", "invalid_image_url"),
    ],
)
def test_bad_image_is_400_naming_the_part(
    gateway: GatewayTarget, http: httpx.Client, image_host: ImageHost, case: str, code: str
) -> None:
    url = {
        "not-an-image": data_url(b"plain text, not an image"),
        "private-address": image_host.url("/red.png"),  # loopback: not on this gateway's allow-list
        "file-url": "file:///etc/passwd",
        "decompression-bomb": data_url(bomb_png()),
        "not-base64": "data:image/png;base64,@@@",
    }[case]
    # The image is the third part of the second message.
    messages = [
        SYSTEM,
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look:"}, {"type": "text", "text": "here"}, image_part(url)],
        },
    ]
    error = _error(http.post("/v1/chat/completions", json={"model": gateway.model, "messages": messages}))
    assert error["param"] == "messages[1].content[2].image_url.url"
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"


def test_too_many_images(gateway: GatewayTarget, http: httpx.Client) -> None:
    urls = [data_url(red_png())] * 17  # default GATEWAY_IMAGES_MAX_PER_REQUEST is 16
    error = _error(http.post("/v1/chat/completions", json=_body(gateway, *urls)))
    assert error["code"] == "too_many_images" and error["param"] == "messages"


# --- the model card's multimodal example -------------------------------------------------------------------
@NEEDS_CURL
def test_model_card_multimodal_example_with_data_url(gateway: GatewayTarget, tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    body = json.loads(json.dumps(CARD_MULTIMODAL))
    body["model"] = gateway.model
    body["messages"][1]["content"][1]["image_url"]["url"] = data_url(noise_jpeg(), "image/jpeg")
    path = tmp_path / "body.json"
    path.write_text(json.dumps(body))
    args = [curl, "-sS", "--max-time", "600", f"{gateway.url}/v1/chat/completions"]
    args += ["-H", "Content-Type: application/json", "-d", f"@{path}"]
    if gateway.api_key:
        args += ["-H", f"Authorization: Bearer {gateway.api_key}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=620).stdout
    events = [block.removeprefix("data: ") for block in out.split("\n\n") if block.strip()]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks[-1]
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]) == 1


def test_model_card_multimodal_example_unreachable_url(gateway: GatewayTarget, http: httpx.Client) -> None:
    # example.com cannot be reached from the test machine (or, elsewhere, serves HTML): a 400 naming the url.
    body = {**CARD_MULTIMODAL, "model": gateway.model}
    error = _error(http.post("/v1/chat/completions", json=body))
    assert error["param"] == "messages[1].content[1].image_url.url"


# --- does it see? ------------------------------------------------------------------------------------
PHOTO = Path(__file__).resolve().parent / "data" / "chelsea-cat.jpg"  # CC0, see tests/data/README.md


def test_names_what_the_photograph_shows(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    gpu_model("the CPU target's vision tower is random (synthetic weights), so it cannot recognise a photo")
    completion = greedy(
        sdk,
        gateway.model,
        ask(
            data_url(PHOTO.read_bytes(), "image/jpeg"),
            text="What animal is in this photo? Answer in one word.",
        ),
        max_tokens=16,
    )
    answer = (completion.choices[0].message.content or "").lower()
    assert any(word in answer for word in ("cat", "kitten", "feline", "tabby")), answer
