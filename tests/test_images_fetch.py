"""gateway.images_fetch: data URLs, SSRF refusals, redirects, size/time limits, against a local server."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import ipaddress
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from PIL import Image

from gateway.images import policy_from_settings
from gateway.images_fetch import (
    FetchedImage,
    ImageFetcher,
    ImageFetchError,
    ImageFetchPolicy,
    ImageRef,
    blocked_reason,
    image_refs,
)
from gateway.settings import GatewaySettings

DEFAULT_POLICY = policy_from_settings(GatewaySettings(model_aliases=[]))


def fetch_policy(**overrides: Any) -> ImageFetchPolicy:
    """The deployment's default fetch policy with some fields changed."""
    return dataclasses.replace(DEFAULT_POLICY, **overrides)


async def fetch_images(refs: list[ImageRef], policy: ImageFetchPolicy) -> list[FetchedImage]:
    async with ImageFetcher(policy) as fetcher:
        return await fetcher.fetch_all(refs)


def make_png(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


PNG = make_png()


class Handler(BaseHTTPRequestHandler):
    hosts_seen: list[str] = []  # noqa: RUF012 - class-level record shared with the tests

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _send(
        self, status: int, body: bytes, ctype: str = "application/octet-stream", **headers: str
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        Handler.hosts_seen.append(self.headers.get("Host", ""))
        url = urlparse(self.path)
        q = parse_qs(url.query)
        if url.path == "/img.png":
            self._send(200, PNG, "text/plain")  # wrong header on purpose: the type is sniffed
        elif url.path == "/redirect":
            self._send(302, b"", Location=q["to"][0])
        elif url.path == "/loop":
            self._send(302, b"", Location="/loop")
        elif url.path == "/big":
            self._send(200, PNG + b"\x00" * 200_000, "image/png")
        elif url.path == "/big-undeclared":  # no Content-Length: the stream cap must stop it
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\x00" * 16_384)
            except OSError:
                pass
        elif url.path == "/slow":
            time.sleep(2.0)
            self._send(200, PNG, "image/png")
        elif url.path == "/drip":  # headers at once, then a byte every 0.2 s: only the total timeout stops it
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            try:
                for b in PNG[:20]:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif url.path == "/text":
            self._send(200, b"<html>not an image</html>", "image/png")
        else:
            self._send(404, b"nope", "text/plain")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


LOCAL = fetch_policy(allow_list=("127.0.0.1",), max_bytes=100_000, read_timeout_s=0.5, total_timeout_s=3.0)


async def fetch_one(url: str, policy: ImageFetchPolicy = LOCAL, **kw: object) -> object:
    async with ImageFetcher(policy, **kw) as f:  # type: ignore[arg-type]
        return await f.fetch(url, "messages[0].content[1].image_url.url")


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


# --- data URLs -------------------------------------------------------------------------------------
async def test_data_url_good() -> None:
    img = await fetch_one(data_url(PNG))
    assert img.data == PNG and img.format == "png" and (img.width, img.height) == (64, 48)
    assert img.source == "data"
    # declared type is only checked for being an image type; the real format comes from the bytes
    img = await fetch_one(data_url(PNG, "image/jpeg"))
    assert img.format == "png" and img.media_type == "image/png"
    # line-wrapped base64 is tolerated
    b64 = base64.encodebytes(PNG).decode()
    assert (await fetch_one(f"data:image/png;base64,{b64}")).data == PNG


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("data:image/png;base64,!!!notbase64!!!", "base64"),
        ("data:image/png," + "abc", "base64-encoded"),
        ("data:text/plain;base64," + base64.b64encode(PNG).decode(), "media type"),
        ("data:;base64," + base64.b64encode(PNG).decode(), "media type"),
        ("data:image/svg+xml;base64," + base64.b64encode(b"<svg/>").decode(), "media type"),
        ("data:image/png;base64," + base64.b64encode(b"just some text").decode(), "not a supported image"),
        ("data:image/gif;base64," + base64.b64encode(b"GIF89a but not really").decode(), "cannot decode"),
        ("data:image/png;base64", "malformed"),
        ("data:image/png;base64," + base64.b64encode(PNG[:100]).decode(), "cannot decode"),
    ],
)
async def test_data_url_bad(url: str, match: str) -> None:
    with pytest.raises(ImageFetchError, match=match) as e:
        await fetch_one(url)
    assert e.value.param == "messages[0].content[1].image_url.url"  # the gateway answers it with a 400


async def test_data_url_oversize_and_bomb() -> None:
    big = make_png(400, 400)  # ~480 kB of noise > 100 kB cap
    with pytest.raises(ImageFetchError, match="maximum size") as e:
        await fetch_one(data_url(big))
    assert e.value.code == "image_too_large"
    small_policy = fetch_policy(max_pixels=1000)
    with pytest.raises(ImageFetchError, match="too large") as e:
        await fetch_one(data_url(PNG), small_policy)
    assert e.value.code == "image_too_large"


# --- SSRF ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://127.1/x.png",
        "http://2130706433/x.png",  # 127.0.0.1 as one decimal number (resolver parses it)
        "http://[::1]/x.png",
        "http://10.1.2.3/x.png",
        "http://192.168.0.10/x.png",
        "http://172.16.5.4/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://[::ffff:169.254.169.254]/x.png",
        "http://[fe80::1]/x.png",
        "http://[fd00::1]/x.png",
        "http://0.0.0.0/x.png",
        "http://224.0.0.1/x.png",
        "http://100.64.0.1/x.png",
        "https://localhost/x.png",
        "http://LocalHost/x.png",
    ],
)
async def test_private_destinations_refused(url: str) -> None:
    with pytest.raises(ImageFetchError, match="not allowed") as e:
        await fetch_one(url, fetch_policy())
    assert e.value.code == "image_url_forbidden"
    assert e.value.param == "messages[0].content[1].image_url.url"


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("file:///etc/passwd", "scheme 'file'"),
        ("ftp://example.com/x.png", "scheme 'ftp'"),
        ("gopher://example.com/", "scheme"),
        ("javascript:alert(1)", "scheme"),
        ("/relative/path.png", "scheme"),
        ("http:///nohost.png", "without a host"),
        ("http://user:pw@example.com/x.png", "credentials"),
    ],
)
async def test_bad_urls_refused(url: str, match: str) -> None:
    with pytest.raises(ImageFetchError, match=match):
        await fetch_one(url, fetch_policy())


async def test_https_only_policy() -> None:
    with pytest.raises(ImageFetchError, match="scheme 'http'"):
        await fetch_one("http://example.com/x.png", fetch_policy(allow_http=False))


def test_blocked_reason_table() -> None:
    blocked = [
        "127.0.0.1", "::1", "10.0.0.1", "169.254.169.254", "::ffff:10.0.0.1",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "0.0.0.0", "::", "255.255.255.255", "ff02::1", "fc00::1", "198.18.0.1",
    ]  # fmt: skip
    for a in blocked:
        assert blocked_reason(ipaddress.ip_address(a)) is not None, a
    public = [
        "8.8.8.8",
        "1.1.1.1",
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "93.184.216.34",
    ]
    for a in public:
        assert blocked_reason(ipaddress.ip_address(a)) is None, a


async def test_all_resolved_addresses_must_be_public() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.7"]  # one public, one private answer

    with pytest.raises(ImageFetchError, match="not allowed"):
        await fetch_one("http://mixed.example/x.png", fetch_policy(), resolver=resolver)


async def test_allow_list_by_host_cidr_and_wildcard() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return ["10.1.2.3"]

    for allow in (("cam.internal",), ("10.0.0.0/8",), ("*.internal",)):
        fetcher = ImageFetcher(fetch_policy(allow_list=allow), resolver=resolver)
        from httpx import URL

        addrs = await fetcher._vetted_addresses(URL("http://cam.internal/x.png"), "p")
        assert [str(a) for a in addrs] == ["10.1.2.3"]
        await fetcher.aclose()
    with pytest.raises(ImageFetchError, match="not allowed"):
        await fetch_one(
            "http://cam.internal/x.png", fetch_policy(allow_list=("other.internal",)), resolver=resolver
        )


async def test_unresolvable_host() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        import socket

        raise socket.gaierror(-2, "Name or service not known")

    with pytest.raises(ImageFetchError, match="cannot resolve"):
        await fetch_one("http://no-such-host.invalid/x.png", fetch_policy(), resolver=resolver)


# --- real HTTP against the local server (allow-listed) ---------------------------------------------
async def test_fetch_png_from_allow_listed_server(server: str) -> None:
    img = await fetch_one(f"{server}/img.png")
    assert img.data == PNG and img.format == "png" and img.source == f"{server}/img.png"


async def test_connects_to_vetted_address_with_original_host(server: str) -> None:
    """The name is resolved once by us; httpx gets the IP (a real DNS lookup of the name would fail)."""
    port = server.rsplit(":", 1)[1]

    async def resolver(host: str, _port: int) -> list[str]:
        assert host == "images.test"
        return ["127.0.0.1"]

    Handler.hosts_seen.clear()
    img = await fetch_one(f"http://images.test:{port}/img.png", resolver=resolver)
    assert img.data == PNG
    assert Handler.hosts_seen == [f"images.test:{port}"]


async def test_redirects(server: str) -> None:
    img = await fetch_one(f"{server}/redirect?to=/img.png")
    assert img.data == PNG and img.source.endswith("/img.png")
    for target in ("http://10.0.0.1/x.png", "http://169.254.169.254/latest/meta-data/", "http://[::1]/x"):
        with pytest.raises(ImageFetchError, match="not allowed"):
            await fetch_one(f"{server}/redirect?to={target}")
    with pytest.raises(ImageFetchError, match="scheme 'file'"):
        await fetch_one(f"{server}/redirect?to=file:///etc/passwd")
    with pytest.raises(ImageFetchError, match="too many redirects"):
        await fetch_one(f"{server}/loop")


async def test_http_errors_and_limits(server: str) -> None:
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        await fetch_one(f"{server}/missing.png")
    with pytest.raises(ImageFetchError, match="maximum size"):
        await fetch_one(f"{server}/big")
    with pytest.raises(ImageFetchError, match="maximum size"):
        await fetch_one(f"{server}/big-undeclared")
    with pytest.raises(ImageFetchError, match="not a supported image"):
        await fetch_one(f"{server}/text")


async def test_slow_server_times_out(server: str) -> None:
    start = time.monotonic()
    with pytest.raises(ImageFetchError, match="timed out") as e:
        await fetch_one(f"{server}/slow")  # read timeout 0.5 s
    assert e.value.code == "image_timeout"
    start2 = time.monotonic()
    with pytest.raises(ImageFetchError, match="timed out"):
        await fetch_one(f"{server}/drip", fetch_policy(allow_list=("127.0.0.1",), total_timeout_s=1.0))
    end = time.monotonic()
    assert start2 - start < 1.5 and end - start2 < 2.0


async def test_fetch_all_concurrent_and_ordered(server: str) -> None:
    other = make_png(10, 20, seed=7)
    refs = [
        ImageRef(f"{server}/slow", "messages[0].content[0].image_url.url"),
        ImageRef(data_url(other), "messages[0].content[1].image_url.url"),
        ImageRef(f"{server}/img.png", "messages[1].content[0].image_url.url"),
    ]
    policy = fetch_policy(allow_list=("127.0.0.1",), read_timeout_s=5.0)
    start = time.monotonic()
    got = await fetch_images(refs, policy)
    assert [g.data for g in got] == [PNG, other, PNG]
    assert time.monotonic() - start < 3.5  # the slow one did not serialise the others
    # the first failure wins and carries its own param
    bad = [refs[2], ImageRef("http://10.0.0.1/x", "messages[2].content[3].image_url.url")]
    with pytest.raises(ImageFetchError) as e:
        await fetch_images(bad, policy)
    assert e.value.param == "messages[2].content[3].image_url.url"
    with pytest.raises(ImageFetchError, match="too many images"):
        await fetch_images([refs[1]] * 3, fetch_policy(max_images=2))


async def test_decoding_does_not_block_event_loop() -> None:
    """While a big image validates in a worker thread, the loop keeps ticking."""
    big = make_png(2000, 1500, seed=2)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    t = asyncio.ensure_future(ticker())
    try:
        await fetch_one(data_url(big), fetch_policy())
    finally:
        t.cancel()
    assert ticks >= 3


def test_image_refs() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "auto"}},
                {"type": "image_url", "image_url": "https://x/b.png"},
            ],
        },
    ]
    assert image_refs(messages) == [
        ImageRef("https://x/a.png", "messages[1].content[1].image_url.url"),
        ImageRef("https://x/b.png", "messages[1].content[2].image_url"),
    ]
    with pytest.raises(ImageFetchError) as e:
        image_refs([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert e.value.param == "messages[0].content[0].image_url.url"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """HTTPS on 127.0.0.1 with a self-signed certificate for `images.test` (openssl CLI)."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    d = tmp_path_factory.mktemp("tls")
    key, cert = str(d / "key.pem"), str(d / "cert.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=images.test",
         "-addext", "subjectAltName=DNS:images.test", "-keyout", key, "-out", cert],
        check=True,
        capture_output=True,
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield str(httpd.server_address[1]), str(d / "cert.pem")
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.optional(reason="makes its certificate with the openssl CLI, which the suite does not install")
async def test_https_sni_and_certificate_checked_against_name(tls_server: tuple[str, str]) -> None:
    import ssl

    import httpx

    port, cert = tls_server

    async def resolver(host: str, _port: int) -> list[str]:
        return ["127.0.0.1"]

    client = httpx.AsyncClient(verify=ssl.create_default_context(cafile=cert), trust_env=False)
    try:
        img = await fetch_one(f"https://images.test:{port}/img.png", resolver=resolver, client=client)
        assert img.data == PNG
        # same IP, another name: the certificate (for images.test) must not be accepted for it
        with pytest.raises(ImageFetchError, match="CERTIFICATE_VERIFY_FAILED"):
            await fetch_one(f"https://evil.test:{port}/img.png", resolver=resolver, client=client)
    finally:
        await client.aclose()
