"""The Triton side of the stack: the tensor contract (pure Python) and the Python-backend helpers."""
