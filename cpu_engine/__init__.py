"""The CPU reference engine: TensorRT-LLM's `tensorrt_llm` request contract run with PyTorch/transformers."""
