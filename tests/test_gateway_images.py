"""Images in chat requests (gateway/images.py) against a scripted Triton stand-in: the images tensor, 400s
naming the part, the pixel limit preprocessing shares, the allow-list setting, a stalled image server."""

from __future__ import annotations

import asyncio
import base64
import io
import math
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from gateway.settings import GatewaySettings
from gemma3_core.images import DEFAULT_MAX_PIXELS, ImageError, probe_image
from tests.fixtures.asgi import admission as _admission
from tests.fixtures.asgi import engine_client as client
from tests.fixtures.asgi import gateway_client as _client
from tests.fixtures.backends import MODEL, USER, Engine, Scripted
from tests.fixtures.backends import ticks as _ticks


def png(color: tuple[int, int, int] = (1, 2, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def image_message(*urls: str) -> list[dict[str, Any]]:
    parts = [
        {"type": "text", "text": "What?"},
        *({"type": "image_url", "image_url": {"url": u}} for u in urls),
    ]
    return [{"role": "user", "content": parts}]


async def test_images_sent_in_order() -> None:
    first, second = png(), png((200, 0, 0))
    urls = [f"data:image/png;base64,{base64.b64encode(d).decode()}" for d in (first, second)]
    engine = Engine()
    async with client(engine) as c:
        response = await c.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": image_message(*urls)}
        )
    assert response.status_code == 200, response.text
    prompt, values = engine.calls[0]
    assert prompt.count("<start_of_image>") == 2
    images = values["images"]
    assert images.shape == (1, 2) and images.dtype == object
    assert images[0, 0] == first and images[0, 1] == second


async def test_images_errors() -> None:
    async with client(Engine(), images_max_per_request=1) as c:
        url = f"data:image/png;base64,{base64.b64encode(png()).decode()}"
        response = await c.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": image_message(url, url)}
        )
        assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_images"
        bad = "data:image/png;base64," + base64.b64encode(b"nope").decode()
        response = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": image_message(bad)})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "messages[0].content[1].image_url.url"
    async with client(Engine(), images_enabled=False) as c:
        response = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": image_message(url)})
        assert response.status_code == 400 and response.json()["error"]["code"] == "unsupported_content"


async def test_image_above_the_preprocessing_pixel_limit_is_a_400() -> None:
    """The gateway refuses what preprocessing would (a 400 naming the part): no such image reaches Triton."""
    side = math.isqrt(DEFAULT_MAX_PIXELS) + 1
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")  # a few KB: one bit per pixel, all zero
    with pytest.raises(ImageError, match="too large"):
        probe_image(buf.getvalue())  # what preprocessing checks (with its default, the same limit)
    url = f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"
    engine = Engine()
    async with client(engine) as c:
        response = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": image_message(url)})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "image_too_large" and error["param"] == "messages[0].content[1].image_url.url"
    assert engine.calls == []
    with pytest.raises(ValidationError):  # the gateway may not accept more than preprocessing does
        GatewaySettings(images_max_pixels=DEFAULT_MAX_PIXELS + 1)


def test_images_allow_list_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_IMAGES_ALLOW_LIST", "127.0.0.1, 10.0.0.0/8,*.corp.example")
    from gateway.images import policy_from_settings

    policy = policy_from_settings(GatewaySettings())
    assert policy.allow_list == ("127.0.0.1", "10.0.0.0/8", "*.corp.example")
    assert policy.host_allowed("img.corp.example")


async def test_stalled_image_server_times_out_while_others_proceed() -> None:
    stalled: list[asyncio.StreamWriter] = []

    async def accept_and_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.append(writer)  # read nothing, answer nothing: the connection just hangs

    server = await asyncio.start_server(accept_and_stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = Scripted(_ticks(3), delay=0.01)
    client, app = _client(
        backend, images_enabled=True, images_allow_list=["127.0.0.1"], images_fetch_timeout_s=1.0
    )
    image = {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{port}/cat.png"}}
    with_image = {"model": MODEL, "messages": [{"role": "user", "content": [image]}]}
    try:
        async with client:
            started = asyncio.get_running_loop().time()
            slow = asyncio.create_task(client.post("/v1/chat/completions", json=with_image))
            others = [
                await client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER})
                for _ in range(5)
            ]
            others_done = asyncio.get_running_loop().time() - started
            r = await slow
            elapsed = asyncio.get_running_loop().time() - started
    finally:
        for writer in stalled:
            writer.close()
        server.close()
    assert all(o.status_code == 200 for o in others) and others_done < 1.0  # not blocked by the stall
    assert r.status_code in (400, 504), r.text
    assert r.json()["error"]["code"] == "image_timeout"
    assert 0.9 <= elapsed < 3.0, elapsed
    assert _admission(app).active == 0  # fetches happen before admission: a stall holds no engine slot
