"""Resolve OpenAI `image_url` parts to validated image bytes (data: URLs and http(s) URLs).

Server-side request forgery is the risk here: a client-supplied URL makes the gateway connect somewhere.
So every hop (the URL and each redirect) is resolved with the event loop's `getaddrinfo`, *all* resolved
addresses must be public (not loopback/private/link-local/multicast/reserved/unspecified, IPv4-mapped and
6to4 embeddings included) unless the policy's allow-list permits them, and the connection goes to the
vetted address itself (Host header and TLS SNI keep the name), so a second DNS answer cannot redirect
it (DNS rebinding). Bodies are streamed with a byte cap; the format is sniffed from the bytes, never the
Content-Type header; decoding/validation runs in a worker thread (`gemma3_core.images`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from gemma3_core.images import (
    MEDIA_TYPES,
    ImageError,
    probe_image,
    sniff_image_type,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Declared data-URL media types we accept (the real format is sniffed from the bytes).
DATA_URL_MEDIA_TYPES = frozenset(
    {*MEDIA_TYPES.values(), "image/jpg", "image/pjpeg", "image/x-ms-bmp", "image/x-png"}
)
MAX_URL_LENGTH = 8192
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# 6to4 (2002::/16) carries an IPv4 address in bits 16..48; NAT64 (64:ff9b::/96) in the last 32 bits.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class ImageFetchError(Exception):
    """A problem with one image part, worded for the client; `param` names the part in OpenAI's style.

    HTTP-agnostic: the gateway glue (gateway/images.py) answers it with a 400.
    """

    def __init__(self, message: str, param: str | None = None, *, code: str = "invalid_image_url"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ImageFetchPolicy:
    """What one fetch may cost; built from the gateway settings (`images_*`, gateway/images.py)."""

    max_bytes: int
    connect_timeout_s: float
    read_timeout_s: float
    total_timeout_s: float  # whole fetch incl. redirects: a slow-drip server beats read timeouts
    max_pixels: int
    max_images: int
    # Hosts ("images.internal", "*.corp.example") or IPs/CIDRs ("10.0.0.0/8", "::1") that may be fetched
    # even though they resolve to non-public addresses. Public addresses never need an entry.
    allow_list: tuple[str, ...]
    max_redirects: int = 3
    max_concurrency: int = 8
    allow_http: bool = True  # plain http:// (https:// is always allowed)
    user_agent: str = "gemma3-gateway-image-fetch/1"
    _hosts: frozenset[str] = field(init=False, repr=False, compare=False)
    _suffixes: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        hosts: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        for raw in self.allow_list:
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if entry.startswith("*."):
                suffixes.append(entry[1:])  # ".corp.example"
            else:
                hosts.add(entry)
        object.__setattr__(self, "_hosts", frozenset(hosts))
        object.__setattr__(self, "_suffixes", tuple(suffixes))
        object.__setattr__(self, "_networks", tuple(networks))

    def host_allowed(self, host: str) -> bool:
        h = host.lower().rstrip(".")
        return h in self._hosts or any(h.endswith(s) for s in self._suffixes)

    def address_allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == n.version and ip in n for n in self._networks)


@dataclass(frozen=True)
class FetchedImage:
    data: bytes
    format: str  # sniffed: png, jpeg, gif, webp, bmp, tiff
    width: int
    height: int
    source: str  # "data" or the final URL fetched

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


@dataclass(frozen=True)
class ImageRef:
    url: str
    param: str  # e.g. "messages[1].content[2].image_url.url"


def image_refs(messages: Sequence[Mapping[str, Any]]) -> list[ImageRef]:
    """The `image_url` parts of OpenAI chat messages, in order, with their OpenAI-style `param` paths."""
    refs: list[ImageRef] = []
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "image_url":
                continue
            image_url = part.get("image_url")
            param = f"messages[{i}].content[{j}].image_url"
            if isinstance(image_url, Mapping):
                url, param = image_url.get("url"), param + ".url"
            else:
                url = image_url  # some clients send the URL string directly
            if not isinstance(url, str) or not url:
                raise ImageFetchError("image_url.url must be a non-empty string", param)
            refs.append(ImageRef(url, param))
    return refs


# --- address policy --------------------------------------------------------------------------------
def blocked_reason(ip: IPAddress) -> str | None:
    """Why connecting to `ip` is refused by default, or None for a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv4-mapped (::ffff:a.b.c.d) and NAT64 (64:ff9b::a.b.c.d, DNS64 on IPv6-only hosts) reach the
        # embedded IPv4 address: judge that one. 6to4 (2002:a.b.c.d::) must pass both checks.
        if ip.ipv4_mapped is not None or ip in _NAT64:
            embedded = ip.ipv4_mapped or ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            inner = blocked_reason(embedded)
            return f"{inner} (embedded in {ip})" if inner else None
        if ip.sixtofour is not None:
            inner = blocked_reason(ip.sixtofour)
            if inner:
                return f"{inner} (embedded in {ip})"
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("non-global", not ip.is_global),
    )
    for name, hit in checks:
        if hit:
            return f"{name} address"
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    """All addresses of `host`, via the event loop's getaddrinfo (runs in the default executor)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    out: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        addr = str(sockaddr[0])
        if addr not in out:
            out.append(addr)
    return out


# --- the fetcher -----------------------------------------------------------------------------------
class ImageFetcher:
    """Fetch + validate images under a policy. One per process; `aclose()` at shutdown."""

    def __init__(
        self,
        policy: ImageFetchPolicy,
        *,
        client: httpx.AsyncClient | None = None,
        resolver: Resolver | None = None,
    ):
        self.policy = policy
        self._resolver = resolver or system_resolver
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,  # an env proxy would do its own DNS and void the address checks
            # No keep-alive: connections are keyed by IP, and a pooled TLS connection made for one SNI
            # name must never carry a request for another name served from the same address.
            limits=httpx.Limits(max_connections=max(1, policy.max_concurrency), max_keepalive_connections=0),
        )
        self._timeout = httpx.Timeout(
            connect=policy.connect_timeout_s,
            read=policy.read_timeout_s,
            write=policy.read_timeout_s,
            pool=policy.connect_timeout_s,
        )

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> ImageFetcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def fetch_all(self, refs: Sequence[ImageRef]) -> list[FetchedImage]:
        """Fetch concurrently (bounded); the first failure cancels the rest and is raised."""
        if len(refs) > self.policy.max_images:
            raise ImageFetchError(
                f"too many images: {len(refs)} (at most {self.policy.max_images} per request)",
                "messages",
                code="too_many_images",
            )
        if not refs:
            return []
        sem = asyncio.Semaphore(max(1, self.policy.max_concurrency))

        async def one(ref: ImageRef) -> FetchedImage:
            async with sem:
                return await self.fetch(ref.url, ref.param)

        tasks = [asyncio.ensure_future(one(r)) for r in refs]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in tasks:  # raise the first failure in request order among those that finished
                if t in done and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def fetch(self, url: str, param: str) -> FetchedImage:
        if url[:5].lower() == "data:":
            # base64 decoding of megabytes + the pixel decode: keep both off the event loop.
            return await asyncio.to_thread(self._from_data_url, url, param)
        try:
            data, final_url = await asyncio.wait_for(
                self._fetch_http(url, param), self.policy.total_timeout_s
            )
        except asyncio.TimeoutError:
            raise ImageFetchError(
                f"timed out fetching the image after {self.policy.total_timeout_s:g} s",
                param,
                code="image_timeout",
            ) from None
        return await asyncio.to_thread(self._validate, data, param, final_url)

    # --- data: URLs ---
    def _from_data_url(self, url: str, param: str) -> FetchedImage:
        header, sep, payload = url[5:].partition(",")
        if not sep:
            raise ImageFetchError("malformed data URL (no ',')", param)
        fields = [f.strip().lower() for f in header.split(";")]
        media_type, params = fields[0], fields[1:]
        if "base64" not in params:
            raise ImageFetchError("data URLs must be base64-encoded (data:image/png;base64,...)", param)
        if media_type not in DATA_URL_MEDIA_TYPES:
            raise ImageFetchError(
                f"unsupported data URL media type {media_type or '(none)'!r}; "
                "expected image/png, image/jpeg, image/gif, image/webp, image/bmp or image/tiff",
                param,
                code="invalid_image_format",
            )
        compact = "".join(payload.split())  # tolerate line-wrapped base64
        if len(compact) * 3 // 4 > self.policy.max_bytes + 3:
            raise self._too_large(param)
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise ImageFetchError("data URL payload is not valid base64", param) from None
        if len(data) > self.policy.max_bytes:
            raise self._too_large(param)
        return self._validate(data, param, "data")

    # --- http(s) ---
    async def _fetch_http(self, url: str, param: str) -> tuple[bytes, str]:
        current = self._parse(url, param)
        for hop in range(self.policy.max_redirects + 1):
            addresses = await self._vetted_addresses(current, param)
            status, location, body = await self._get(current, addresses, param)
            if status in _REDIRECTS and location:
                if hop == self.policy.max_redirects:
                    raise ImageFetchError(
                        f"too many redirects (more than {self.policy.max_redirects})",
                        param,
                        code="image_fetch_failed",
                    )
                try:
                    nxt = current.join(location)
                except (httpx.InvalidURL, ValueError):
                    raise ImageFetchError("image URL redirected to an invalid URL", param) from None
                current = self._parse(str(nxt), param, redirected=True)
                continue
            if not 200 <= status < 300:
                raise ImageFetchError(f"image URL returned HTTP {status}", param, code="image_fetch_failed")
            return body, str(current)
        raise AssertionError("unreachable")

    def _parse(self, url: str, param: str, *, redirected: bool = False) -> httpx.URL:
        what = "image URL redirected to" if redirected else "image URL"
        if len(url) > MAX_URL_LENGTH:
            raise ImageFetchError(f"{what} a URL longer than {MAX_URL_LENGTH} characters", param)
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError):
            raise ImageFetchError(f"{what} an invalid URL", param) from None
        scheme = parsed.scheme.lower()
        allowed = ("https", "http") if self.policy.allow_http else ("https",)
        if scheme not in allowed:
            shown = scheme or "(none)"
            raise ImageFetchError(
                f"{what} a URL with unsupported scheme {shown!r}; use {' or '.join(allowed)} or a data: URL",
                param,
                code="invalid_image_url",
            )
        if not parsed.host:
            raise ImageFetchError(f"{what} a URL without a host", param)
        if parsed.userinfo:
            raise ImageFetchError("credentials in image URLs are not allowed", param)
        return parsed

    async def _vetted_addresses(self, url: httpx.URL, param: str) -> list[IPAddress]:
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            raw = [str(literal)]
        else:
            try:
                raw = await self._resolver(host, port)
            except (socket.gaierror, UnicodeError, OSError) as e:
                raise ImageFetchError(
                    f"cannot resolve image host {host!r}: {e}", param, code="image_fetch_failed"
                ) from None
        addresses: list[IPAddress] = []
        for a in raw:
            try:
                addresses.append(ipaddress.ip_address(a))
            except ValueError:
                continue
        if not addresses:
            raise ImageFetchError(
                f"image host {host!r} has no usable address", param, code="image_fetch_failed"
            )
        host_ok = self.policy.host_allowed(host)
        for ip in addresses:
            reason = blocked_reason(ip)
            # Every address must pass: one public + one private answer would still let the attacker pick.
            if reason and not (host_ok or self.policy.address_allowed(ip)):
                raise ImageFetchError(
                    f"image URL host {host!r} resolves to a {reason}, which is not allowed",
                    param,
                    code="image_url_forbidden",
                )
        return addresses

    async def _get(
        self, url: httpx.URL, addresses: list[IPAddress], param: str
    ) -> tuple[int, str | None, bytes]:
        host_header = url.netloc.decode("ascii")
        last_error: Exception | None = None
        for ip in addresses:
            target = url.copy_with(host=str(ip), fragment=None)
            extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
            headers = {
                "Host": host_header,
                "User-Agent": self.policy.user_agent,
                "Accept": "image/*",
                "Accept-Encoding": "identity",  # ask for no compression (the cap applies to decoded bytes)
            }
            try:
                async with self._client.stream(
                    "GET",
                    target,
                    headers=headers,
                    extensions=extensions,
                    timeout=self._timeout,
                    follow_redirects=False,
                ) as resp:
                    if resp.status_code in _REDIRECTS:
                        return resp.status_code, resp.headers.get("location"), b""
                    if not 200 <= resp.status_code < 300:
                        return resp.status_code, None, b""
                    return resp.status_code, None, await self._read_capped(resp, param)
            except httpx.ConnectError as e:  # try the host's next vetted address
                last_error = e
                continue
            except httpx.TimeoutException:
                raise ImageFetchError("timed out fetching the image", param, code="image_timeout") from None
            except httpx.HTTPError as e:
                raise ImageFetchError(
                    f"error fetching the image: {type(e).__name__}", param, code="image_fetch_failed"
                ) from None
        raise ImageFetchError(
            f"cannot connect to image host {url.host!r}: {last_error}", param, code="image_fetch_failed"
        )

    async def _read_capped(self, resp: httpx.Response, param: str) -> bytes:
        limit = self.policy.max_bytes
        declared = resp.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise self._too_large(param)
        buf = bytearray()
        async for chunk in resp.aiter_bytes():
            buf += chunk
            if len(buf) > limit:
                raise self._too_large(param)  # leaving the `stream` block closes the connection
        return bytes(buf)

    # --- shared ---
    def _too_large(self, param: str) -> ImageFetchError:
        return ImageFetchError(
            f"image exceeds the maximum size of {self.policy.max_bytes} bytes", param, code="image_too_large"
        )

    def _validate(self, data: bytes, param: str, source: str) -> FetchedImage:
        kind = sniff_image_type(data)
        if kind is None:
            raise ImageFetchError(
                "content is not a supported image (PNG, JPEG, GIF, WebP, BMP or TIFF)",
                param,
                code="invalid_image_format",
            )
        try:
            info = probe_image(data, max_pixels=self.policy.max_pixels)
        except ImageError as e:
            code = "image_too_large" if "too large" in str(e) else "invalid_image"
            raise ImageFetchError(str(e), param, code=code) from None
        return FetchedImage(
            data=data,
            format=info.format,
            width=info.width,
            height=info.height,
            source=source,
        )
