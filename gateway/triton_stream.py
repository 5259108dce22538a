"""Old import path of the names the chat layer uses; they live in `gateway.triton` now.

Kept only until gateway/chat.py, gateway/lora.py and gateway/app.py import from `gateway.triton.*`.
"""

from gateway.triton.client import GenerationBackend, TritonStreamClient
from gateway.triton.errors import TritonError
from gateway.triton.tensors import TritonResponse

__all__ = ["GenerationBackend", "TritonError", "TritonResponse", "TritonStreamClient"]
