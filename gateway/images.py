"""Images in chat requests: `image_url` parts → validated bytes for the ensemble's `images` input.

The fetching and SSRF policy live in `gateway/images_fetch.py`; this module maps the gateway settings onto
that policy, owns the process-wide fetcher and turns fetch failures into 400s naming the part
(`messages[1].content[2].image_url.url`). The template gets `{"type": "image"}` per part (gateway/prompt.py),
i.e. one `<start_of_image>` marker per image, in order; Triton's preprocessing expands the markers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.errors import bad_request
from gateway.images_fetch import ImageFetcher, ImageFetchError, ImageFetchPolicy, image_refs
from gateway.settings import GatewaySettings

# The ensemble input the images go to: BYTES [1, N], one encoded file per marker.


def policy_from_settings(settings: GatewaySettings) -> ImageFetchPolicy:
    return ImageFetchPolicy(
        max_bytes=settings.images_max_bytes,
        connect_timeout_s=settings.images_connect_timeout_s,
        read_timeout_s=settings.images_read_timeout_s,
        total_timeout_s=settings.images_fetch_timeout_s,
        max_pixels=settings.images_max_pixels,
        max_images=settings.images_max_per_request,
        allow_list=tuple(settings.images_allow_list),
    )


def images_tensor(images: Sequence[bytes]) -> npt.NDArray[np.object_]:
    # An object array: numpy's fixed-width bytes dtype would strip trailing NUL bytes of image files.
    out = np.empty((1, len(images)), dtype=object)
    for i, data in enumerate(images):
        out[0, i] = data
    return out


class ImageService:
    """One shared fetcher (its httpx client) per process; `aclose()` at shutdown."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.policy = policy_from_settings(settings)
        self._fetcher: ImageFetcher | None = None

    @property
    def fetcher(self) -> ImageFetcher:
        if self._fetcher is None:
            self._fetcher = ImageFetcher(self.policy)
        return self._fetcher

    async def fetch(self, messages: Sequence[Mapping[str, Any]]) -> list[bytes]:
        """The bytes of every image part, in prompt order (fetched concurrently); 400 on any bad part."""
        try:
            refs = image_refs(messages)
            if not refs:
                return []
            fetched = await self.fetcher.fetch_all(refs)
        except ImageFetchError as exc:
            raise bad_request(exc.message, exc.param, exc.code) from None
        return [image.data for image in fetched]

    async def aclose(self) -> None:
        if self._fetcher is not None:
            await self._fetcher.aclose()
            self._fetcher = None
