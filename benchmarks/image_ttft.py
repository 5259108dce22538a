"""Time to first token with and without one image, through a running gateway (e.g. `make serve`).

    python benchmarks/image_ttft.py --gateway-url http://127.0.0.1:8080 [--model gemma-3-270m] [--runs 5]

Sends the same short prompt N times text-only and N times with one 640x480 photo-like PNG (data URL),
streaming, max_tokens 4, and prints p50/min TTFT (first content delta) for both and the difference, which
is the image's cost: decoding + preprocessing, the vision encoder and 256+ more prompt tokens of prefill.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time

import httpx
import numpy as np
from PIL import Image


def photo_png(width: int = 640, height: int = 480, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def ttft(client: httpx.Client, model: str, content: object) -> float:
    body = {
        "model": model,
        "stream": True,
        "max_tokens": 4,
        "temperature": 0,
        "messages": [{"role": "user", "content": content}],
    }
    start = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                return time.perf_counter() - start
    return time.perf_counter() - start  # the model stopped before any text: time to the end


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway-url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = "data:image/png;base64," + base64.b64encode(photo_png()).decode()
    text = "Describe the picture in one word."
    with_image = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    with httpx.Client(base_url=args.gateway_url, headers=headers, timeout=600) as client:
        ttft(client, args.model, text)  # warm-up (first request loads lazily initialised pieces)
        ttft(client, args.model, with_image)
        plain = [ttft(client, args.model, text) for _ in range(args.runs)]
        image = [ttft(client, args.model, with_image) for _ in range(args.runs)]
    p50_plain, p50_image = statistics.median(plain), statistics.median(image)
    for label, runs in (("text only", plain), ("one image", image)):
        p50 = statistics.median(runs)
        print(f"TTFT {label} : p50 {p50 * 1000:8.1f} ms  min {min(runs) * 1000:8.1f} ms  ({args.runs} runs)")
    print(f"image cost     : {(p50_image - p50_plain) * 1000:8.1f} ms at p50 ({p50_image / p50_plain:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
