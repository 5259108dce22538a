"""Per-image preprocessing latency: gemma3_core.images vs HF Gemma3ImageProcessor (PIL backend).

Both sides start from the same encoded bytes and end at float32 [N, 3, 896, 896] pixel values (HF path:
`load_image(base64)` + processor, i.e. what HF does for a data URL). Prints median/p90 ms and the ratio.

    .venv/bin/python benchmarks/image_preprocess.py [--repeats 10] [--pan-and-scan]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma3_core.images import preprocess_image_bytes


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(x / 37) * np.cos(y / 23), x * 255 / w, y * 255 / h], -1)
    img += rng.normal(0, 12, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


INPUTS: dict[str, Callable[[], bytes]] = {
    "jpeg 640x480": lambda: encode(photo(640, 480), "JPEG", quality=90),
    "jpeg 1920x1080": lambda: encode(photo(1920, 1080), "JPEG", quality=90),
    "jpeg 4000x3000": lambda: encode(photo(4000, 3000), "JPEG", quality=85),
    "png rgba 1024x768": lambda: encode(photo(1024, 768).convert("RGBA"), "PNG"),
    "png 256x256": lambda: encode(photo(256, 256), "PNG"),
}


def timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[list[float], np.ndarray]:
    out = fn()  # warm-up (imports, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--pan-and-scan", action="store_true")
    args = ap.parse_args()

    from transformers.image_utils import load_image
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    hf = Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896},
        resample=2,
        rescale_factor=1 / 255,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    pas = {"do_pan_and_scan": args.pan_and_scan}
    if args.pan_and_scan:
        pas.update(
            pan_and_scan_min_crop_size=256,
            pan_and_scan_max_num_crops=4,
            pan_and_scan_min_ratio_to_activate=1.2,
        )

    print(f"{'input':<20} {'ours ms (p50/p90)':>18} {'HF ms (p50/p90)':>18} {'HF/ours':>8} {'max|diff|':>10}")
    ratios = []
    for name, make in INPUTS.items():
        data = make()
        b64 = base64.b64encode(data).decode()

        def ours(data: bytes = data) -> np.ndarray:
            return preprocess_image_bytes(data, do_pan_and_scan=args.pan_and_scan).pixel_values

        def theirs(b64: str = b64) -> np.ndarray:
            return np.asarray(hf(load_image(b64), return_tensors="np", **pas)["pixel_values"])

        t_ours, a = timed(ours, args.repeats)
        t_hf, b = timed(theirs, args.repeats)
        p50o, p50h = statistics.median(t_ours), statistics.median(t_hf)
        p90o = statistics.quantiles(t_ours, n=10)[-1] if len(t_ours) > 1 else p50o
        p90h = statistics.quantiles(t_hf, n=10)[-1] if len(t_hf) > 1 else p50h
        diff = float(np.abs(a - b).max()) if a.shape == b.shape else float("nan")
        ratios.append(p50h / p50o)
        cols = f"{p50o:>8.1f} / {p90o:>7.1f} {p50h:>8.1f} / {p90h:>7.1f}"
        print(f"{name:<20} {cols} {p50h / p50o:>7.2f}x {diff:>10.2e}")
    print(f"geometric-mean speed-up (HF time / ours): {statistics.geometric_mean(ratios):.2f}x")


if __name__ == "__main__":
    main()
