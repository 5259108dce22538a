"""gemma3_core.images vs HF's Gemma3 image processor (PIL backend), plus the prompt-side helpers."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import load_image
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

from gemma3_core import images as gi
from gemma3_core.constants import (
    BOI_ID,
    EOI_ID,
    FULL_IMAGE_SEQUENCE,
    IMAGE_SOFT_TOKEN_ID,
    MM_TOKENS_PER_IMAGE,
)

TOL = 1 / 127.5  # one uint8 step after normalisation; we expect (and get) exact equality


@pytest.fixture(scope="module")
def hf() -> Gemma3ImageProcessorPil:
    # gemma-3-*-it preprocessor_config.json values
    return Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896},
        resample=2,
        rescale_factor=1 / 255,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth gradients + texture + sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)
    g = x * 255 / max(w - 1, 1)
    b = y * 255 / max(h - 1, 1)
    img = np.stack([r, g, b], -1) + rng.normal(0, 12, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def hf_pixels(hf: Gemma3ImageProcessorPil, data: bytes, **kw: object) -> tuple[np.ndarray, list[int]]:
    # HF's path for encoded bytes: load_image(base64) (EXIF transpose + convert("RGB")) then the processor.
    out = hf(load_image(base64.b64encode(data).decode()), return_tensors="np", **kw)
    return np.asarray(out["pixel_values"]), list(out["num_crops"])


def _rgba(w: int, h: int) -> Image.Image:
    alpha = Image.fromarray(np.random.default_rng(1).integers(0, 256, (h, w), dtype=np.uint8))
    return Image.merge("RGBA", [*photo(w, h).split(), alpha])


CASES = {
    "jpeg_photo": lambda: encode(photo(640, 480), "JPEG", quality=90),
    "tiny_1x1": lambda: encode(photo(1, 1), "PNG"),
    "portrait": lambda: encode(photo(300, 1000), "PNG"),
    "wide_odd": lambda: encode(photo(1001, 77), "PNG"),
    "rgba": lambda: encode(_rgba(500, 400), "PNG"),
    "palette_P": lambda: encode(photo(333, 222).quantize(64), "PNG"),
    "palette_P_transparency": lambda: encode(photo(333, 222).quantize(64), "PNG", transparency=3),
    "grayscale_L": lambda: encode(photo(257, 259).convert("L"), "PNG"),
    "LA": lambda: encode(photo(120, 90).convert("LA"), "PNG"),
    "cmyk_jpeg": lambda: encode(photo(400, 300).convert("CMYK"), "JPEG"),
    "gif_transparent": lambda: encode(photo(200, 150).quantize(32), "GIF", transparency=0),
    "webp": lambda: encode(photo(320, 200), "WEBP", quality=80),
    "bmp": lambda: encode(photo(64, 48), "BMP"),
    "tiff": lambda: encode(photo(64, 48), "TIFF"),
    "exact_896": lambda: encode(photo(896, 896), "PNG"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_hf(hf: Gemma3ImageProcessorPil, name: str) -> None:
    data = CASES[name]()
    ours = gi.preprocess_image_bytes(data)
    ref, crops = hf_pixels(hf, data)
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == ref.shape == (1, 3, 896, 896)
    assert ours.num_crops == 0 and crops == [0]
    assert np.abs(ours.pixel_values - ref).max() <= TOL
    assert np.array_equal(ours.pixel_values, ref)  # bit-exact in practice
    assert ours.pixel_values.min() >= -1.0 and ours.pixel_values.max() <= 1.0


def test_huge_photo_equals_hf(hf: Gemma3ImageProcessorPil) -> None:
    data = encode(photo(4000, 3000, seed=3), "JPEG", quality=85)
    ours = gi.preprocess_image_bytes(data)
    ref, _ = hf_pixels(hf, data)
    assert np.abs(ours.pixel_values - ref).max() <= TOL


def test_exif_orientation_applied_like_hf(hf: Gemma3ImageProcessorPil) -> None:
    img = photo(300, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display
    data = encode(img, "JPEG", exif=exif.tobytes())
    rgb = gi.decode_image(data)
    assert rgb.size == (200, 300)
    ref, _ = hf_pixels(hf, data)
    assert np.array_equal(gi.preprocess_rgb(rgb).pixel_values, ref)


def test_white_mode_matches_hf_given_pil_object(hf: Gemma3ImageProcessorPil) -> None:
    data = encode(_rgba(250, 180), "PNG")
    ours = gi.preprocess_rgb(gi.decode_image(data, alpha="white", exif_transpose=False)).pixel_values
    ref = np.asarray(hf(Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"])
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize(
    "size",
    [(1200, 400), (400, 1300), (2000, 500), (900, 800), (600, 300), (1000, 260), (1025, 500), (3000, 300)],
)
def test_pan_and_scan_equals_hf(hf: Gemma3ImageProcessorPil, size: tuple[int, int]) -> None:
    data = encode(photo(*size, seed=5), "PNG")
    ours = gi.preprocess_image_bytes(data, do_pan_and_scan=True)
    ref, crops = hf_pixels(
        hf,
        data,
        do_pan_and_scan=True,
        pan_and_scan_min_crop_size=256,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    assert [ours.num_crops] == crops
    assert ours.pixel_values.shape == ref.shape
    assert np.array_equal(ours.pixel_values, ref)


def test_pan_and_scan_boxes() -> None:
    assert gi.pan_and_scan_boxes(900, 800) == []  # ratio < 1.2
    assert gi.pan_and_scan_boxes(1025, 500) == [(0, 0, 513, 500), (513, 0, 1025, 500)]  # last crop clipped
    assert len(gi.pan_and_scan_boxes(10000, 1000)) == 4  # capped at max_num_crops
    assert gi.pan_and_scan_boxes(500, 200) == []  # 2 crops of 250 < min crop 256
    img = photo(1200, 400)
    crops = gi.pan_and_scan_crops(img)
    assert [c.size for c in crops] == [(400, 400)] * 3


def test_prompt_text_matches_hf_processor() -> None:
    stub = SimpleNamespace(full_image_sequence=FULL_IMAGE_SEQUENCE)
    for n in range(5):
        expected = Gemma3Processor.replace_image_token(stub, {"num_crops": [n]}, 0)  # type: ignore[arg-type]
        assert gi.image_prompt_text(n) == expected
    assert gi.image_prompt_text(0).count("<image_soft_token>") == 256
    assert gi.image_prompt_text(3).count("<start_of_image>") == 4


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused() -> None:
    bomb = _png_header_only(100_000, 100_000)
    assert len(bomb) < 200
    with pytest.raises(gi.ImageError, match="too large"):
        gi.decode_image(bomb)
    with pytest.raises(gi.ImageError, match="too large"):
        gi.probe_image(bomb)
    # our limit is configurable below PIL's own
    with pytest.raises(gi.ImageError, match="too large"):
        gi.decode_image(encode(photo(100, 100), "PNG"), max_pixels=9_999)


def test_bad_bytes_refused() -> None:
    with pytest.raises(gi.ImageError, match="unsupported"):
        gi.decode_image(b"hello world, not an image")
    png = encode(photo(64, 64), "PNG")
    with pytest.raises(gi.ImageError):
        gi.decode_image(png[: len(png) // 2])  # truncated
    with pytest.raises(gi.ImageError):
        gi.decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)


def test_sniff() -> None:
    assert gi.sniff_image_type(encode(photo(4, 4), "PNG")) == "png"
    assert gi.sniff_image_type(encode(photo(4, 4), "JPEG")) == "jpeg"
    assert gi.sniff_image_type(encode(photo(4, 4), "GIF")) == "gif"
    assert gi.sniff_image_type(encode(photo(4, 4), "WEBP")) == "webp"
    assert gi.sniff_image_type(encode(photo(4, 4), "BMP")) == "bmp"
    assert gi.sniff_image_type(encode(photo(4, 4), "TIFF")) == "tiff"
    assert gi.sniff_image_type(b"<svg xmlns=...>") is None
    assert gi.sniff_image_type(b"") is None
    assert gi.sniff_image_type(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None


def test_content_hash() -> None:
    a, b = encode(photo(8, 8, 1), "PNG"), encode(photo(8, 8, 2), "PNG")
    ha = gi.image_content_hash(a)
    assert ha == gi.image_content_hash(bytes(a)) and ha != gi.image_content_hash(b)
    assert 1 <= ha < 2**63
    assert gi.image_content_hash(a, "crop1") != ha != gi.image_content_hash(a, "crop2")


def test_expand_image_placeholders() -> None:
    vocab = 262208
    img = [BOI_ID, *[IMAGE_SOFT_TOKEN_ID] * MM_TOKENS_PER_IMAGE, EOI_ID]
    ids = [2, 10, *img, 20, *img, 30]
    out, extra = gi.expand_image_placeholders(ids, vocab, [111, 222])
    assert len(out) == len(ids) == len(extra)
    first = ids.index(IMAGE_SOFT_TOKEN_ID)
    second = first + MM_TOKENS_PER_IMAGE + 3
    assert out[first : first + 256] == list(range(vocab, vocab + 256))
    assert out[second : second + 256] == list(range(vocab + 256, vocab + 512))
    assert extra[first : first + 256] == [111] * 256 and extra[second : second + 256] == [222] * 256
    assert [t for t, e in zip(out, extra, strict=True) if e == 0] == [
        2,
        10,
        BOI_ID,
        EOI_ID,
        20,
        BOI_ID,
        EOI_ID,
        30,
    ]
    assert IMAGE_SOFT_TOKEN_ID not in out
    # text only
    assert gi.expand_image_placeholders([2, 3, 4], vocab, []) == ([2, 3, 4], [0, 0, 0])
    with pytest.raises(ValueError, match="need"):
        gi.expand_image_placeholders(ids, vocab, [111])
    with pytest.raises(ValueError, match="multiple"):
        gi.expand_image_placeholders(
            [*[IMAGE_SOFT_TOKEN_ID] * 100, 5, *[IMAGE_SOFT_TOKEN_ID] * 156], vocab, [1]
        )
    with pytest.raises(ValueError, match="hash"):
        gi.expand_image_placeholders(img, vocab, [0])
