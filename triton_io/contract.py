"""The Triton tensor contract: every input and output of the models in `model_repository/`.

Names and dtypes follow NVIDIA's tensorrtllm_backend `inflight_batcher_llm` (the GPU target runs its C++
backend unchanged), so the same clients work on the CPU and GPU deployments. This module is the one place
that names them; it is pure Python (no Triton import) so the gateway, the Triton Python models and the tests
share it. `tests/test_contract.py` pins it against the rendered `config.pbtxt` files and against the
contract section of docs/architecture.md (regenerate that with `python -m triton_io.contract`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from gemma3_core.constants import IMAGE_SIZE

# Triton wire datatypes (`config.pbtxt` writes TYPE_STRING for BYTES).
BYTES: Final = "BYTES"
BOOL: Final = "BOOL"
INT32: Final = "INT32"
UINT64: Final = "UINT64"
FP16: Final = "FP16"
BF16: Final = "BF16"
FP32: Final = "FP32"
# The engine's weight dtype, chosen per deployment (FP16 on the CPU reference, BF16 for the GPU engine):
# TensorRT-LLM rejects a prompt table or LoRA weights of another dtype.
WEIGHT_DTYPES: Final = (FP16, BF16)


@dataclass(frozen=True)
class Tensor:
    name: str
    dtypes: tuple[str, ...]  # wire datatype; more than one: the deployment picks (WEIGHT_DTYPES)
    dims: tuple[int, ...]  # as config.pbtxt writes them: without the batch dimension, -1 = any
    optional: bool = False  # inputs: may be left out; outputs: absent from some responses

    @property
    def dtype(self) -> str:
        return "|".join(self.dtypes)


@dataclass(frozen=True)
class ModelContract:
    template: str  # directory under model_repository/
    model: str  # the model's name in the rendered repository
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    extensible: bool = False  # the deployed config may declare more (NVIDIA's backend has many more)

    @property
    def input_names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.inputs)


def _t(name: str, dtype: str | tuple[str, ...], *dims: int, optional: bool = False) -> Tensor:
    return Tensor(name, dtype if isinstance(dtype, tuple) else (dtype,), dims, optional)


class Ensemble:
    """`ensemble` tensor names: what clients (perf_analyzer, genai-perf, the gateway) send and read."""

    TEXT_INPUT: Final = "text_input"
    MAX_TOKENS: Final = "max_tokens"
    BAD_WORDS: Final = "bad_words"
    STOP_WORDS: Final = "stop_words"
    END_ID: Final = "end_id"
    PAD_ID: Final = "pad_id"
    TOP_K: Final = "top_k"
    TOP_P: Final = "top_p"
    TEMPERATURE: Final = "temperature"
    REPETITION_PENALTY: Final = "repetition_penalty"
    PRESENCE_PENALTY: Final = "presence_penalty"
    FREQUENCY_PENALTY: Final = "frequency_penalty"
    MIN_TOKENS: Final = "min_tokens"
    SEED: Final = "seed"
    BEAM_WIDTH: Final = "beam_width"
    STREAM: Final = "stream"
    EXCLUDE_INPUT_IN_OUTPUT: Final = "exclude_input_in_output"
    RETURN_NUM_INPUT_TOKENS: Final = "return_num_input_tokens"
    RETURN_NUM_OUTPUT_TOKENS: Final = "return_num_output_tokens"
    IMAGES: Final = "images"
    LORA_TASK_ID: Final = "lora_task_id"
    LORA_WEIGHTS: Final = "lora_weights"
    LORA_CONFIG: Final = "lora_config"
    GUIDE_TYPE: Final = "guided_decoding_guide_type"
    GUIDE: Final = "guided_decoding_guide"
    RETURN_LOG_PROBS: Final = "return_log_probs"
    RETURN_PERF_METRICS: Final = "return_perf_metrics"
    # logit_bias as token ids and weights; preprocessing turns them into the engine's dense embedding_bias
    # (upstream's ensemble takes words here, `embedding_bias_words`; ids are exact for an OpenAI logit_bias).
    EMBEDDING_BIAS_IDS: Final = "embedding_bias_ids"
    EMBEDDING_BIAS_WEIGHTS: Final = "embedding_bias_weights"
    TEXT_OUTPUT: Final = "text_output"
    NUM_INPUT_TOKENS: Final = "num_input_tokens"
    NUM_OUTPUT_TOKENS: Final = "num_output_tokens"


class Preprocessing:
    """`preprocessing` tensor names (upstream's upper-case ones)."""

    QUERY: Final = "QUERY"
    REQUEST_OUTPUT_LEN: Final = "REQUEST_OUTPUT_LEN"
    BAD_WORDS_DICT: Final = "BAD_WORDS_DICT"
    STOP_WORDS_DICT: Final = "STOP_WORDS_DICT"
    END_ID: Final = "END_ID"
    PAD_ID: Final = "PAD_ID"
    IMAGES: Final = "IMAGES"
    EMBEDDING_BIAS_IDS: Final = "EMBEDDING_BIAS_IDS"
    EMBEDDING_BIAS_WEIGHTS: Final = "EMBEDDING_BIAS_WEIGHTS"
    INPUT_ID: Final = "INPUT_ID"
    REQUEST_INPUT_LEN: Final = "REQUEST_INPUT_LEN"
    BAD_WORDS_IDS: Final = "BAD_WORDS_IDS"
    STOP_WORDS_IDS: Final = "STOP_WORDS_IDS"
    OUT_END_ID: Final = "OUT_END_ID"
    OUT_PAD_ID: Final = "OUT_PAD_ID"
    OUT_PROMPT_EMBEDDING_TABLE: Final = "OUT_PROMPT_EMBEDDING_TABLE"
    OUT_PROMPT_VOCAB_SIZE: Final = "OUT_PROMPT_VOCAB_SIZE"
    OUT_PROMPT_TABLE_EXTRA_IDS: Final = "OUT_PROMPT_TABLE_EXTRA_IDS"
    EMBEDDING_BIAS: Final = "EMBEDDING_BIAS"


class VisionEncoder:
    """`vision_encoder` tensor names (preprocessing calls it through BLS)."""

    MODEL: Final = "vision_encoder"
    PIXEL_VALUES: Final = "pixel_values"
    PROMPT_EMBEDDING_TABLE: Final = "prompt_embedding_table"
    PROMPT_VOCAB_SIZE: Final = "prompt_vocab_size"


class Engine:
    """`tensorrt_llm` tensor names: TensorRT-LLM's backend, the CPU reference engine and the fast double."""

    INPUT_IDS: Final = "input_ids"
    INPUT_LENGTHS: Final = "input_lengths"
    REQUEST_OUTPUT_LEN: Final = "request_output_len"
    END_ID: Final = "end_id"
    PAD_ID: Final = "pad_id"
    STREAMING: Final = "streaming"
    BEAM_WIDTH: Final = "beam_width"
    RUNTIME_TOP_K: Final = "runtime_top_k"
    RUNTIME_TOP_P: Final = "runtime_top_p"
    TEMPERATURE: Final = "temperature"
    REPETITION_PENALTY: Final = "repetition_penalty"
    PRESENCE_PENALTY: Final = "presence_penalty"
    FREQUENCY_PENALTY: Final = "frequency_penalty"
    MIN_TOKENS: Final = "min_tokens"
    SEED: Final = "seed"
    STOP_WORDS_LIST: Final = "stop_words_list"
    BAD_WORDS_LIST: Final = "bad_words_list"
    EXCLUDE_INPUT_IN_OUTPUT: Final = "exclude_input_in_output"
    RETURN_NUM_INPUT_TOKENS: Final = "return_num_input_tokens"
    RETURN_NUM_OUTPUT_TOKENS: Final = "return_num_output_tokens"
    PROMPT_EMBEDDING_TABLE: Final = "prompt_embedding_table"
    PROMPT_VOCAB_SIZE: Final = "prompt_vocab_size"
    PROMPT_TABLE_EXTRA_IDS: Final = "prompt_table_extra_ids"
    LORA_TASK_ID: Final = "lora_task_id"
    LORA_WEIGHTS: Final = "lora_weights"
    LORA_CONFIG: Final = "lora_config"
    GUIDE_TYPE: Final = "guided_decoding_guide_type"
    GUIDE: Final = "guided_decoding_guide"
    EMBEDDING_BIAS: Final = "embedding_bias"
    RETURN_LOG_PROBS: Final = "return_log_probs"
    RETURN_PERF_METRICS: Final = "return_perf_metrics"
    OUTPUT_IDS: Final = "output_ids"
    SEQUENCE_LENGTH: Final = "sequence_length"
    NUM_INPUT_TOKENS: Final = "num_input_tokens"
    NUM_OUTPUT_TOKENS: Final = "num_output_tokens"
    OUTPUT_LOG_PROBS: Final = "output_log_probs"
    KV_CACHE_REUSED_BLOCKS: Final = "kv_cache_reused_blocks"
    # This stack's extension, not TensorRT-LLM's (its backend has no top-k log-prob output): the
    # TOP_LOG_PROBS_K most likely tokens at each generated position, sent with output_log_probs.
    TOP_LOG_PROB_IDS: Final = "ext_top_log_prob_ids"
    TOP_LOG_PROBS: Final = "ext_top_log_probs"


TOP_LOG_PROBS_K: Final = 20  # OpenAI's largest top_logprobs


class Postprocessing:
    """`postprocessing` tensor names."""

    TOKENS_BATCH: Final = "TOKENS_BATCH"
    SEQUENCE_LENGTH: Final = "SEQUENCE_LENGTH"
    OUTPUT: Final = "OUTPUT"


ENSEMBLE = ModelContract(
    "ensemble",
    "ensemble",
    inputs=(
        _t(Ensemble.TEXT_INPUT, BYTES, 1),  # the rendered prompt, starting with <bos>
        _t(Ensemble.MAX_TOKENS, INT32, 1),
        _t(Ensemble.BAD_WORDS, BYTES, -1, optional=True),
        _t(Ensemble.STOP_WORDS, BYTES, -1, optional=True),
        _t(Ensemble.END_ID, INT32, 1, optional=True),
        _t(Ensemble.PAD_ID, INT32, 1, optional=True),
        _t(Ensemble.TOP_K, INT32, 1, optional=True),
        _t(Ensemble.TOP_P, FP32, 1, optional=True),
        _t(Ensemble.TEMPERATURE, FP32, 1, optional=True),
        _t(Ensemble.REPETITION_PENALTY, FP32, 1, optional=True),
        _t(Ensemble.PRESENCE_PENALTY, FP32, 1, optional=True),
        _t(Ensemble.FREQUENCY_PENALTY, FP32, 1, optional=True),
        _t(Ensemble.MIN_TOKENS, INT32, 1, optional=True),
        _t(Ensemble.SEED, UINT64, 1, optional=True),
        _t(Ensemble.BEAM_WIDTH, INT32, 1, optional=True),
        _t(Ensemble.STREAM, BOOL, 1, optional=True),
        _t(Ensemble.EXCLUDE_INPUT_IN_OUTPUT, BOOL, 1, optional=True),
        _t(Ensemble.RETURN_NUM_INPUT_TOKENS, BOOL, 1, optional=True),
        _t(Ensemble.RETURN_NUM_OUTPUT_TOKENS, BOOL, 1, optional=True),
        _t(Ensemble.IMAGES, BYTES, -1, optional=True),  # encoded image files, one per <start_of_image>
        _t(Ensemble.LORA_TASK_ID, UINT64, 1, optional=True),
        _t(Ensemble.LORA_WEIGHTS, WEIGHT_DTYPES, -1, -1, optional=True),
        _t(Ensemble.LORA_CONFIG, INT32, -1, 3, optional=True),
        _t(Ensemble.GUIDE_TYPE, BYTES, 1, optional=True),
        _t(Ensemble.GUIDE, BYTES, 1, optional=True),
        _t(Ensemble.RETURN_LOG_PROBS, BOOL, 1, optional=True),
        _t(Ensemble.RETURN_PERF_METRICS, BOOL, 1, optional=True),
        _t(Ensemble.EMBEDDING_BIAS_IDS, INT32, -1, optional=True),
        _t(Ensemble.EMBEDDING_BIAS_WEIGHTS, FP32, -1, optional=True),
    ),
    outputs=(
        _t(Ensemble.TEXT_OUTPUT, BYTES, -1),  # the exact bytes of this response's tokens
        _t(Ensemble.NUM_INPUT_TOKENS, INT32, 1),
        _t(Ensemble.NUM_OUTPUT_TOKENS, INT32, 1),
    ),
)

PREPROCESSING = ModelContract(
    "preprocessing",
    "preprocessing",
    inputs=(
        _t(Preprocessing.QUERY, BYTES, 1),
        _t(Preprocessing.REQUEST_OUTPUT_LEN, INT32, 1),
        _t(Preprocessing.BAD_WORDS_DICT, BYTES, -1, optional=True),
        _t(Preprocessing.STOP_WORDS_DICT, BYTES, -1, optional=True),
        _t(Preprocessing.END_ID, INT32, 1, optional=True),
        _t(Preprocessing.PAD_ID, INT32, 1, optional=True),
        _t(Preprocessing.IMAGES, BYTES, -1, optional=True),
        _t(Preprocessing.EMBEDDING_BIAS_IDS, INT32, -1, optional=True),
        _t(Preprocessing.EMBEDDING_BIAS_WEIGHTS, FP32, -1, optional=True),
    ),
    outputs=(
        _t(Preprocessing.INPUT_ID, INT32, -1),
        _t(Preprocessing.REQUEST_INPUT_LEN, INT32, 1),
        _t(Preprocessing.BAD_WORDS_IDS, INT32, 2, -1),
        _t(Preprocessing.STOP_WORDS_IDS, INT32, 2, -1),
        _t(Preprocessing.REQUEST_OUTPUT_LEN, INT32, 1),
        _t(Preprocessing.OUT_END_ID, INT32, 1),
        _t(Preprocessing.OUT_PAD_ID, INT32, 1),
        # Only for requests with images (text-only requests make no encoder call).
        _t(Preprocessing.OUT_PROMPT_EMBEDDING_TABLE, WEIGHT_DTYPES, -1, -1, optional=True),
        _t(Preprocessing.OUT_PROMPT_VOCAB_SIZE, INT32, 1, optional=True),
        _t(Preprocessing.OUT_PROMPT_TABLE_EXTRA_IDS, UINT64, -1, optional=True),
        # Only for requests with a logit_bias: one FP32 per engine vocab row (engine_vocab_size).
        _t(Preprocessing.EMBEDDING_BIAS, FP32, -1, optional=True),
    ),
)

VISION_ENCODER = ModelContract(
    "vision_encoder",
    VisionEncoder.MODEL,
    inputs=(
        _t(VisionEncoder.PIXEL_VALUES, FP32, -1, 3, IMAGE_SIZE, IMAGE_SIZE),
    ),  # one request's images and crops
    outputs=(
        _t(VisionEncoder.PROMPT_EMBEDDING_TABLE, WEIGHT_DTYPES, -1, -1),  # image k owns 256 consecutive rows
        _t(VisionEncoder.PROMPT_VOCAB_SIZE, INT32, 1),
    ),
)

_ENGINE_BASE_OUTPUTS = (
    _t(Engine.OUTPUT_IDS, INT32, -1, -1),  # [beams, tokens]; streaming responses carry only the new tokens
    _t(Engine.SEQUENCE_LENGTH, INT32, -1),
    _t(Engine.NUM_INPUT_TOKENS, INT32, 1),
    _t(Engine.NUM_OUTPUT_TOKENS, INT32, 1),
)
_ENGINE_LOG_PROB_OUTPUTS = (
    _t(Engine.OUTPUT_LOG_PROBS, FP32, -1, -1, optional=True),  # [beams, tokens], with return_log_probs
    _t(Engine.KV_CACHE_REUSED_BLOCKS, INT32, 1, optional=True),  # with return_perf_metrics
)

_ENGINE_TOP_LOG_PROB_OUTPUTS = (
    # [tokens, TOP_LOG_PROBS_K] each, with output_log_probs (this stack's extension)
    _t(Engine.TOP_LOG_PROB_IDS, INT32, -1, -1, optional=True),
    _t(Engine.TOP_LOG_PROBS, FP32, -1, -1, optional=True),
)

ENGINE = ModelContract(
    "tensorrt_llm_reference",
    "tensorrt_llm",
    inputs=(
        _t(Engine.INPUT_IDS, INT32, -1, optional=True),  # optional upstream too (encoder-decoder models)
        _t(Engine.INPUT_LENGTHS, INT32, 1),
        _t(Engine.REQUEST_OUTPUT_LEN, INT32, 1),
        _t(Engine.END_ID, INT32, 1, optional=True),
        _t(Engine.PAD_ID, INT32, 1, optional=True),
        _t(Engine.STREAMING, BOOL, 1, optional=True),
        _t(Engine.BEAM_WIDTH, INT32, 1, optional=True),
        _t(Engine.RUNTIME_TOP_K, INT32, 1, optional=True),
        _t(Engine.RUNTIME_TOP_P, FP32, 1, optional=True),
        _t(Engine.TEMPERATURE, FP32, 1, optional=True),
        _t(Engine.REPETITION_PENALTY, FP32, 1, optional=True),
        _t(Engine.PRESENCE_PENALTY, FP32, 1, optional=True),
        _t(Engine.FREQUENCY_PENALTY, FP32, 1, optional=True),
        _t(Engine.MIN_TOKENS, INT32, 1, optional=True),
        _t(Engine.SEED, UINT64, 1, optional=True),
        _t(Engine.STOP_WORDS_LIST, INT32, 2, -1, optional=True),
        _t(Engine.BAD_WORDS_LIST, INT32, 2, -1, optional=True),
        _t(Engine.EXCLUDE_INPUT_IN_OUTPUT, BOOL, 1, optional=True),
        _t(Engine.RETURN_NUM_INPUT_TOKENS, BOOL, 1, optional=True),
        _t(Engine.RETURN_NUM_OUTPUT_TOKENS, BOOL, 1, optional=True),
        _t(Engine.PROMPT_EMBEDDING_TABLE, WEIGHT_DTYPES, -1, -1, optional=True),
        _t(Engine.PROMPT_VOCAB_SIZE, INT32, 1, optional=True),
        _t(Engine.PROMPT_TABLE_EXTRA_IDS, UINT64, -1, optional=True),
        _t(Engine.LORA_TASK_ID, UINT64, 1, optional=True),
        _t(Engine.LORA_WEIGHTS, WEIGHT_DTYPES, -1, -1, optional=True),
        _t(Engine.LORA_CONFIG, INT32, -1, 3, optional=True),
        _t(Engine.GUIDE_TYPE, BYTES, 1, optional=True),
        _t(Engine.GUIDE, BYTES, 1, optional=True),
        _t(Engine.EMBEDDING_BIAS, FP32, -1, optional=True),  # added to the logits before sampling
        _t(Engine.RETURN_LOG_PROBS, BOOL, 1, optional=True),
        _t(Engine.RETURN_PERF_METRICS, BOOL, 1, optional=True),
    ),
    outputs=(
        *_ENGINE_BASE_OUTPUTS,
        *_ENGINE_LOG_PROB_OUTPUTS,
        *_ENGINE_TOP_LOG_PROB_OUTPUTS,
    ),
)
# The same contract under the other implementations' templates: the fast test double, and NVIDIA's C++
# backend on the GPU, which declares more tensors than the stack uses.
# The double returns made-up log probs but no reuse statistics; TensorRT-LLM lacks the top-k extension.
FAST_DOUBLE = ModelContract(
    "tensorrt_llm_fast_double",
    "tensorrt_llm",
    ENGINE.inputs,
    (*_ENGINE_BASE_OUTPUTS, _ENGINE_LOG_PROB_OUTPUTS[0], *_ENGINE_TOP_LOG_PROB_OUTPUTS),
)
TENSORRT_LLM = ModelContract(
    "tensorrt_llm",
    "tensorrt_llm",
    ENGINE.inputs,
    _ENGINE_BASE_OUTPUTS + _ENGINE_LOG_PROB_OUTPUTS,
    extensible=True,
)

POSTPROCESSING = ModelContract(
    "postprocessing",
    "postprocessing",
    inputs=(_t(Postprocessing.TOKENS_BATCH, INT32, -1, -1), _t(Postprocessing.SEQUENCE_LENGTH, INT32, -1)),
    outputs=(_t(Postprocessing.OUTPUT, BYTES, -1),),  # one response's ids as their exact bytes
)

# Per template directory under model_repository/.
MODELS: Final = {
    m.template: m
    for m in (ENSEMBLE, PREPROCESSING, VISION_ENCODER, ENGINE, FAST_DOUBLE, TENSORRT_LLM, POSTPROCESSING)
}

# What the gateway needs to know about the ensemble's inputs.
REQUIRED_INPUTS: Final = tuple(t.name for t in ENSEMBLE.inputs if not t.optional)
LIST_INPUTS: Final = frozenset({Ensemble.STOP_WORDS, Ensemble.BAD_WORDS})  # a list of strings, not one value
# Inputs that change what a request means: if the deployed ensemble lacks one, dropping it would silently
# serve a different request (no image, base model instead of the adapter, unconstrained JSON, no log
# probs, no logit bias).
ESSENTIAL_INPUTS: Final = frozenset(
    {
        Ensemble.IMAGES,
        Ensemble.LORA_TASK_ID,
        Ensemble.LORA_WEIGHTS,
        Ensemble.LORA_CONFIG,
        Ensemble.GUIDE_TYPE,
        Ensemble.GUIDE,
        Ensemble.RETURN_LOG_PROBS,
        Ensemble.EMBEDDING_BIAS_IDS,
        Ensemble.EMBEDDING_BIAS_WEIGHTS,
    }
)

DOC_BEGIN: Final = (
    "<!-- contract: generated by `python -m triton_io.contract`; tests/test_contract.py checks it -->"
)
DOC_END: Final = "<!-- contract: end -->"


def _dims(dims: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def markdown() -> str:
    """The contract as the tables in docs/architecture.md (between DOC_BEGIN and DOC_END)."""
    sections = [
        (ENSEMBLE, "entry point of clients; the gateway runs its steps itself"),
        (PREPROCESSING, "unary"),
        (VISION_ENCODER, "called by preprocessing through BLS, only for requests with images"),
        (ENGINE, "decoupled; the GPU's `tensorrt_llm` declares these and more"),
        (POSTPROCESSING, "stateless"),
    ]
    lines: list[str] = []
    for m, note in sections:
        lines += [
            f"`{m.model}` ({note}):",
            "",
            "| tensor | in/out | dtype | dims | optional |",
            "|---|---|---|---|---|",
        ]
        for kind, tensors in (("in", m.inputs), ("out", m.outputs)):
            lines += [
                f"| `{t.name}` | {kind} | {t.dtype} | {_dims(t.dims)} | {'yes' if t.optional else ''} |"
                for t in tensors
            ]
        lines.append("")
    return "\n".join(lines).rstrip("\n")


if __name__ == "__main__":
    print(f"{DOC_BEGIN}\n{markdown()}\n{DOC_END}")
