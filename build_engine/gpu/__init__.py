"""The `gpu` target: Gemma 3 27B GPTQ INT4 → TensorRT-LLM engine + vision engine + Triton repository.

Every stage runs inside NVIDIA's `tritonserver:<yy.mm>-trtllm-python-py3` image (pinned once in
`settings.TRITON_IMAGE_TAG`); on a machine without TensorRT-LLM only the pure-Python parts (inspect, convert,
plan, render, `--dry-run`) run. Stages: download → inspect → convert → build → vision → repository, plus
`verify` (fidelity against Hugging Face transformers) and `all`.
"""
