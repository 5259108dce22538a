"""Write a `.safetensors` file one tensor at a time, so the converter holds one layer, not a whole rank.

`safetensors.torch.save_file` needs every tensor in memory at once. The format is simple enough to stream:
an 8-byte little-endian header length, a JSON header (name → dtype, shape, byte offsets; padded to 8 bytes),
then the raw bytes. Tensor bytes go to a side file as they come; `close()` writes the header and appends
the side file, so peak memory is one piece plus a copy buffer.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from types import TracebackType

import torch

_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}


class SafetensorsWriter:
    def __init__(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = self._data_path.open("wb")
        self._header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"tensor {name} written twice")
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors code")
        t = tensor.detach().cpu().contiguous()
        if t.numel():
            self._data.write(t.reshape(-1).view(torch.uint8).numpy().data)
        size = t.numel() * t.element_size()
        self._header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self._offset, self._offset + size],
        }
        self._offset += size

    def close(self) -> Path:
        self._data.close()
        header = json.dumps(self._header, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with self.path.open("wb") as out, self._data_path.open("rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, length=64 * 2**20)
        self._data_path.unlink()
        return self.path

    def abort(self) -> None:
        self._data.close()
        self._data_path.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
