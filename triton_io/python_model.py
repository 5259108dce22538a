"""Helpers for Triton Python models: reading request tensors and model parameters.

Imported only inside Triton (it needs `triton_python_backend_utils`, which the backend stub provides).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


def param(config: dict, key: str, default: str | None = None) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    if value is None or value == "":
        if default is None:
            raise ValueError(f"model parameter {key!r} is not set")
        return default
    return value


def tensor(request: Any, name: str) -> np.ndarray | None:
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def scalar(request: Any, name: str) -> Any:
    arr = tensor(request, name)
    if arr is None or arr.size == 0:
        raise ValueError(f"missing required input {name}")
    return arr.reshape(-1)[0]


def optional_scalar(request: Any, name: str, default: Any = None) -> Any:
    arr = tensor(request, name)
    return default if arr is None or arr.size == 0 else arr.reshape(-1)[0].item()


def _text(item: Any) -> str:
    return item.decode("utf-8") if isinstance(item, bytes) else str(item)


def strings(request: Any, name: str) -> list[str]:
    arr = tensor(request, name)
    if arr is None:
        raise ValueError(f"missing required input {name}")
    return [_text(x) for x in arr.reshape(-1)]


def optional_strings(request: Any, name: str) -> list[str]:
    arr = tensor(request, name)
    return [] if arr is None else [s for s in map(_text, arr.reshape(-1)) if s]


def optional_blobs(request: Any, name: str) -> list[bytes]:
    """BYTES elements as raw bytes (encoded images are not text)."""
    arr = tensor(request, name)
    return [] if arr is None else [bytes(x) for x in arr.reshape(-1) if len(x)]
