"""Gemma 3 image preprocessing, numerically identical to HF `Gemma3ImageProcessor` (PIL backend).

Pipeline (HF `load_image` for bytes/URLs + `Gemma3ImageProcessorPil.preprocess`):
decode → EXIF transpose → `convert("RGB")` → optional pan-and-scan crops → resize to 896×896 bilinear
(aspect ratio ignored) → ×1/255 (float64, then float32) → (x − 0.5) / 0.5 (float32) → CHW.

Also the prompt-side helpers: the text HF's processor substitutes for one image (with crops), the content
hash used as TensorRT-LLM `prompt_table_extra_ids`, and the expansion of `<image_soft_token>` runs to
prompt-table ids.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from gemma3_core.constants import (
    FULL_IMAGE_SEQUENCE,
    IMAGE_MEAN,
    IMAGE_SIZE,
    IMAGE_SOFT_TOKEN_ID,
    IMAGE_STD,
    MM_TOKENS_PER_IMAGE,
    PAN_AND_SCAN_MAX_NUM_CROPS,
    PAN_AND_SCAN_MIN_CROP_SIZE,
    PAN_AND_SCAN_MIN_RATIO_TO_ACTIVATE,
    RESCALE_FACTOR,
)

# 40 megapixels: a 4000×3000 photo (12 MP) and 8K frames (33 MP) pass; bombs (e.g. 1e5×1e5 PNG) do not.
DEFAULT_MAX_PIXELS = 40_000_000

# PIL format names we decode (Image.open's `formats=`): nothing else gets parsed, which keeps exotic
# decoders (EPS → Ghostscript, etc.) out of reach of untrusted bytes.
SUPPORTED_FORMATS: dict[str, str] = {
    "png": "PNG",
    "jpeg": "JPEG",
    "gif": "GIF",
    "webp": "WEBP",
    "bmp": "BMP",
    "tiff": "TIFF",
}
MEDIA_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
}

AlphaMode = Literal["drop", "white"]


class ImageError(ValueError):
    """The bytes are not an acceptable image (unknown format, corrupt, too many pixels)."""


# --- sniffing / hashing ----------------------------------------------------------------------------
def sniff_image_type(data: bytes) -> str | None:
    """Image type from magic bytes: 'png', 'jpeg', 'gif', 'webp', 'bmp', 'tiff' or None."""
    head = bytes(data[:16])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM") and len(head) >= 14:
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    return None


def image_content_hash(data: bytes, variant: bytes | str = b"") -> int:
    """63-bit content hash in [1, 2**63 - 1] for TensorRT-LLM `prompt_table_extra_ids`.

    KV-cache block reuse keys prompt-table tokens by (fake id, extra id); fake ids restart at `vocab_size`
    in every request, so the extra id must identify the image content or two requests with different images
    at the same position would share cached blocks. 0 is reserved for "text token"; 63 bits keep the value
    representable as a signed int64 too. `variant` separates views of the same bytes (pan-and-scan crop k).
    """
    h = hashlib.blake2b(bytes(data), digest_size=8, person=b"gemma3-img")
    if variant:
        h.update(b"\x00variant\x00")
        h.update(variant.encode() if isinstance(variant, str) else variant)
    value = int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)
    return value or 1


# --- decoding --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageInfo:
    format: str  # key of SUPPORTED_FORMATS
    width: int
    height: int
    mode: str  # PIL mode before RGB conversion


def _open_checked(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    kind = sniff_image_type(data)
    if kind is None:
        raise ImageError("unsupported image format (expected PNG, JPEG, GIF, WebP, BMP or TIFF)")
    try:
        with warnings.catch_warnings():
            # PIL warns (DecompressionBombWarning) above its own limit; ours is checked explicitly below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[SUPPORTED_FORMATS[kind]])
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from None
    except Exception as e:  # untrusted bytes: PIL plugins raise many types (struct.error, IndexError, ...)
        raise ImageError(f"cannot decode {kind} image: {e}") from None
    width, height = img.size
    # Checked on the header before any pixel is decoded: this is what stops decompression bombs.
    if width <= 0 or height <= 0:
        raise ImageError(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} = {width * height} pixels exceeds {max_pixels}")
    return img, kind


def _load(img: Image.Image, kind: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from None
    except Exception as e:
        raise ImageError(f"cannot decode {kind} image: {e}") from None


def probe_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, full_decode: bool = True) -> ImageInfo:
    """Validate bytes as an acceptable image; `full_decode` also decodes the pixels (catches truncation)."""
    img, kind = _open_checked(data, max_pixels)
    with img:
        if full_decode:
            _load(img, kind)
        return ImageInfo(format=kind, width=img.width, height=img.height, mode=img.mode)


def to_rgb(img: Image.Image, alpha: AlphaMode = "drop") -> Image.Image:
    """RGB the way HF does it.

    "drop" (default) reproduces what HF does with URLs/base64/bytes (the gateway's case): `load_image`
    runs a plain `convert("RGB")` (an alpha channel is discarded; P/L/LA/CMYK/I;16 use PIL's converters),
    then the processor's `convert_to_rgb` composites onto white whatever still carries transparency. After
    `convert("RGB")` that is only a colour-key `transparency` (tRNS of P/L/RGB PNGs, GIF transparent
    index), which PIL keeps in `info`: pixels of exactly that colour turn white.
    "white": the processor handed the PIL object directly (transformers 5 `convert_to_rgb`): any alpha or
    transparency is composited onto white.
    """
    if alpha == "drop":
        img = img.convert("RGB")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if alpha == "drop" else img.convert("RGB")


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    alpha: AlphaMode = "drop",
    exif_transpose: bool = True,
) -> Image.Image:
    """Bytes → upright RGB PIL image (HF `load_image` semantics), refusing bombs with `ImageError`."""
    img, kind = _open_checked(data, max_pixels)
    with img:
        _load(img, kind)
        try:
            # HF load_image applies the EXIF orientation (phone photos are stored sideways).
            upright = ImageOps.exif_transpose(img) if exif_transpose else img
            rgb = to_rgb(upright, alpha)
        except Exception as e:
            raise ImageError(f"cannot convert {kind} image to RGB: {e}") from None
    return rgb


# --- pixel values ----------------------------------------------------------------------------------
def _normalize_lut() -> npt.NDArray[np.float32]:
    # Same arithmetic as HF: rescale in float64 then cast to float32, then (x - mean) / std in float32.
    # Applied to the 256 possible uint8 values once, so a lookup table is bit-identical and much faster.
    values = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
    lut = np.empty((3, 256), dtype=np.float32)
    for c in range(3):
        lut[c] = (values - np.float32(IMAGE_MEAN[c])) / np.float32(IMAGE_STD[c])
    return lut


_LUT = _normalize_lut()


def pixel_values_from_rgb(img: Image.Image, size: int = IMAGE_SIZE) -> npt.NDArray[np.float32]:
    """One RGB image → float32 CHW [3, size, size] in [-1, 1]."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode!r}")
    resized = img if img.size == (size, size) else img.resize((size, size), Image.Resampling.BILINEAR)
    hwc = np.asarray(resized, dtype=np.uint8)
    out = np.empty((3, size, size), dtype=np.float32)
    for c in range(3):
        np.take(_LUT[c], hwc[:, :, c], out=out[c])
    return out


def pan_and_scan_boxes(
    width: int,
    height: int,
    *,
    min_crop_size: int = PAN_AND_SCAN_MIN_CROP_SIZE,
    max_num_crops: int = PAN_AND_SCAN_MAX_NUM_CROPS,
    min_ratio_to_activate: float = PAN_AND_SCAN_MIN_RATIO_TO_ACTIVATE,
) -> list[tuple[int, int, int, int]]:
    """PIL crop boxes (left, top, right, bottom) of HF's pan-and-scan; [] when it does not apply."""
    if width >= height:
        if width / height < min_ratio_to_activate:
            return []
        # Crops along the long side: about one per aspect-ratio unit, each at least min_crop_size wide.
        n_w = min(math.floor(width / height + 0.5), width // min_crop_size)
        n_w = min(max_num_crops, max(2, n_w))
        n_h = 1
    else:
        if height / width < min_ratio_to_activate:
            return []
        n_h = min(math.floor(height / width + 0.5), height // min_crop_size)
        n_h = min(max_num_crops, max(2, n_h))
        n_w = 1
    crop_w = math.ceil(width / n_w)
    crop_h = math.ceil(height / n_h)
    if min(crop_w, crop_h) < min_crop_size:
        return []
    # HF slices a numpy array, so the last crop is clipped at the border (PIL's crop would pad instead).
    return [
        (x, y, min(x + crop_w, width), min(y + crop_h, height))
        for y in range(0, n_h * crop_h, crop_h)
        for x in range(0, n_w * crop_w, crop_w)
    ]


def pan_and_scan_crops(
    img: Image.Image,
    *,
    min_crop_size: int = PAN_AND_SCAN_MIN_CROP_SIZE,
    max_num_crops: int = PAN_AND_SCAN_MAX_NUM_CROPS,
    min_ratio_to_activate: float = PAN_AND_SCAN_MIN_RATIO_TO_ACTIVATE,
) -> list[Image.Image]:
    """The crops HF's pan-and-scan would produce for `img` (original not included)."""
    boxes = pan_and_scan_boxes(
        img.width,
        img.height,
        min_crop_size=min_crop_size,
        max_num_crops=max_num_crops,
        min_ratio_to_activate=min_ratio_to_activate,
    )
    return [img.crop(box) for box in boxes]


@dataclass(frozen=True)
class PreprocessedImage:
    pixel_values: npt.NDArray[np.float32]  # [1 + num_crops, 3, 896, 896]: the original first, then the crops
    num_crops: int
    width: int
    height: int


def preprocess_rgb(
    img: Image.Image,
    *,
    do_pan_and_scan: bool = False,
    min_crop_size: int = PAN_AND_SCAN_MIN_CROP_SIZE,
    max_num_crops: int = PAN_AND_SCAN_MAX_NUM_CROPS,
    min_ratio_to_activate: float = PAN_AND_SCAN_MIN_RATIO_TO_ACTIVATE,
) -> PreprocessedImage:
    views = [img]
    if do_pan_and_scan:
        views += pan_and_scan_crops(
            img,
            min_crop_size=min_crop_size,
            max_num_crops=max_num_crops,
            min_ratio_to_activate=min_ratio_to_activate,
        )
    pixels = np.stack([pixel_values_from_rgb(v) for v in views])
    return PreprocessedImage(
        pixel_values=pixels, num_crops=len(views) - 1, width=img.width, height=img.height
    )


def preprocess_image_bytes(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    alpha: AlphaMode = "drop",
    do_pan_and_scan: bool = False,
    min_crop_size: int = PAN_AND_SCAN_MIN_CROP_SIZE,
    max_num_crops: int = PAN_AND_SCAN_MAX_NUM_CROPS,
    min_ratio_to_activate: float = PAN_AND_SCAN_MIN_RATIO_TO_ACTIVATE,
) -> PreprocessedImage:
    """Encoded image bytes → pixel values exactly as HF (`load_image` + `Gemma3ImageProcessor`)."""
    rgb = decode_image(data, max_pixels=max_pixels, alpha=alpha)
    return preprocess_rgb(
        rgb,
        do_pan_and_scan=do_pan_and_scan,
        min_crop_size=min_crop_size,
        max_num_crops=max_num_crops,
        min_ratio_to_activate=min_ratio_to_activate,
    )


# --- prompt side -----------------------------------------------------------------------------------
def image_prompt_text(num_crops: int = 0) -> str:
    """What HF's Gemma3Processor puts in place of one `<start_of_image>` for an image with `num_crops` crops.

    Each of the 1 + num_crops `FULL_IMAGE_SEQUENCE`s holds 256 soft tokens (one prompt-table image each).
    """
    if num_crops < 0:
        raise ValueError("num_crops must be >= 0")
    if num_crops == 0:
        return FULL_IMAGE_SEQUENCE
    return (
        f"Here is the original image {FULL_IMAGE_SEQUENCE} and here are some crops to help you see better "
        + " ".join([FULL_IMAGE_SEQUENCE] * num_crops)
    )


def expand_image_placeholders(
    input_ids: Sequence[int],
    vocab_size: int,
    image_hashes: Sequence[int],
    *,
    image_token_id: int = IMAGE_SOFT_TOKEN_ID,
    tokens_per_image: int = MM_TOKENS_PER_IMAGE,
) -> tuple[list[int], list[int]]:
    """Replace `<image_soft_token>` ids by prompt-table ids and build `prompt_table_extra_ids`.

    The j-th soft token of the prompt (counting across images) becomes `vocab_size + j`, so image k
    (a pan-and-scan crop counts as an image) uses `vocab_size + k*256 ...`, matching row k*256 + i of the
    flattened [num_images*256, hidden] prompt table. `image_hashes[k]` (see `image_content_hash`) is the
    extra id of image k's tokens; text tokens get 0. Raises ValueError when the soft tokens do not form
    exactly `len(image_hashes)` complete blocks of `tokens_per_image`.
    """
    ids = list(input_ids)
    n_soft = sum(1 for t in ids if t == image_token_id)
    if n_soft != tokens_per_image * len(image_hashes):
        raise ValueError(
            f"prompt has {n_soft} image soft tokens but {len(image_hashes)} image(s) need "
            f"{tokens_per_image * len(image_hashes)}"
        )
    for h in image_hashes:
        if not 0 < int(h) < (1 << 64):
            raise ValueError(f"image hash must be in [1, 2**64): {h}")
    out: list[int] = []
    extra: list[int] = []
    j = 0
    run = 0  # length of the current soft-token run: images are contiguous blocks that never straddle text
    for t in ids:
        if t == image_token_id:
            out.append(vocab_size + j)
            extra.append(int(image_hashes[j // tokens_per_image]))
            j += 1
            run += 1
        else:
            _check_run(run, tokens_per_image)
            run = 0
            out.append(t)
            extra.append(0)
    _check_run(run, tokens_per_image)
    return out, extra


def _check_run(run: int, tokens_per_image: int) -> None:
    if run % tokens_per_image:
        raise ValueError(f"image soft-token run of length {run} is not a multiple of {tokens_per_image}")
