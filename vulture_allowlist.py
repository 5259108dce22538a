"""Names that vulture sees defined and never used, but that a framework reads: `make lint` scans this file
with the code, and each name below counts as used. Only what a library calls or reads by name belongs here;
code that nothing calls is deleted, not listed. (FastAPI routes, pydantic validators and pytest fixtures are
recognised by their decorators, see [tool.vulture] in pyproject.toml.)"""

# ruff: noqa: B018, F821
# `_` is never defined: vulture only needs to see each name read.

# Triton's Python backend instantiates TritonPythonModel and calls these on it.
_.TritonPythonModel
_.initialize
_.execute
_.finalize

# torch.nn.Module.__call__ runs forward; attributes assigned on a Module register submodules by name.
_.forward
_.extra_repr  # printed in the module's repr
_.mlp
_.q_norm
_.k_norm
_.embed_tokens

# trtllm-build --model_cls_file build_engine/gpu/gemma3_fixes.py --model_cls_name loads this class by name.
_.Gemma3FidelityFixesForCausalLM

# transformers reads these from the model, its config, generation config and tokenizer.
_.hf_quantizer
_.eos_token_id
_.chat_template
_._attn_implementation

# pydantic reads a model's configuration from this class attribute.
_.model_config

# pytest reads these module globals.
_.pytestmark
_.pytest_plugins

# http.server calls the handler's do_GET/do_POST/log_message and reads the server's daemon_threads;
# uvicorn's Server polls should_exit.
_.do_GET
_.do_POST
_.log_message
_.daemon_threads
_.should_exit

# pytest calls these hooks by name on a registered plugin object and on a plugin module.
_.pytest_runtest_makereport
_.pytest_collectreport
_.pytest_sessionfinish
_.pytest_terminal_summary
_.pytest_configure

# llama.cpp reads these fields of the ctypes context-parameters struct we fill in.
_.n_ctx
_.n_ubatch
_.n_seq_max
_.n_threads
_.n_threads_batch

# dataclasses.asdict writes these report fields into the stage's JSON report.
_.hidden_activation
_.torch_dtype
_.first_max_abs
_.engine_text_tokens

# build_engine/vision_export.py reads tensorrt.LayerType members by name (FP32_LAYER_TYPES); the test's fake
# tensorrt module defines them.
_.NORMALIZATION
_.SOFTMAX
_.REDUCE

# uvicorn imports the worker app factory by its dotted name (`python -m gateway` with several workers).
_.create_worker_app
