"""One parser for TensorRT-LLM's engine request, shared by the CPU reference engine and the fast double.

Both implement `tensorrt_llm`'s request contract (triton_io.contract.ENGINE), so they read it the same way
and refuse the same requests with the same messages. Imported only inside Triton (see python_model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gemma3_core.words import from_word_list
from triton_io.contract import Engine
from triton_io.python_model import optional_scalar, tensor
from triton_io.sampling import Sampling


class EngineRequestError(ValueError):
    """A request the engine refuses; the message goes back to the client."""


@dataclass(frozen=True)
class EngineRequest:
    input_ids: list[int]
    max_new_tokens: int  # request_output_len, clamped to what the context leaves
    end_id: int = 1
    min_tokens: int = 0
    streaming: bool = False
    exclude_input: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    stop_words: list[list[int]] = field(default_factory=list)
    bad_words: list[list[int]] = field(default_factory=list)
    prompt_table: np.ndarray | None = None  # [rows, hidden], as sent (FP16 or BF16 as the deployment)
    lora_task_id: int | None = None
    lora_weights: np.ndarray | None = None  # [modules, size], given with lora_config on first use
    lora_config: np.ndarray | None = None  # [modules, 3]
    guide: tuple[str, str] | None = None  # (guide type, guide)
    embedding_bias: np.ndarray | None = None  # float32 [vocab rows], added to the logits
    return_log_probs: bool = False
    return_perf_metrics: bool = False

    @classmethod
    def from_triton(
        cls, request: Any, *, max_seq_len: int, engine: str, exclude_input_default: bool = False
    ) -> EngineRequest:
        """Read one Triton request; `engine` names the implementation in refusals it alone makes;
        `exclude_input_default` is the deployment's `exclude_input_in_output` parameter."""
        ids = tensor(request, Engine.INPUT_IDS)
        if ids is None:
            raise EngineRequestError("input_ids is required")
        ids = ids.reshape(-1)
        if ids.size == 0:
            raise EngineRequestError("input_ids is empty")
        if optional_scalar(request, Engine.BEAM_WIDTH, 1) != 1:
            raise EngineRequestError(f"{engine} supports beam_width 1 only")
        max_new = int(optional_scalar(request, Engine.REQUEST_OUTPUT_LEN, 0))
        if max_new <= 0:
            raise EngineRequestError(f"request_output_len must be at least 1, got {max_new}")
        if ids.size >= max_seq_len:
            raise EngineRequestError(f"prompt has {ids.size} tokens; the context is {max_seq_len} tokens")
        sampling = Sampling(
            temperature=float(optional_scalar(request, Engine.TEMPERATURE, 1.0)),
            top_k=int(optional_scalar(request, Engine.RUNTIME_TOP_K, 0)),
            top_p=float(optional_scalar(request, Engine.RUNTIME_TOP_P, 0.0)),
            repetition_penalty=float(optional_scalar(request, Engine.REPETITION_PENALTY, 1.0)),
            presence_penalty=float(optional_scalar(request, Engine.PRESENCE_PENALTY, 0.0)),
            frequency_penalty=float(optional_scalar(request, Engine.FREQUENCY_PENALTY, 0.0)),
            seed=optional_scalar(request, Engine.SEED),
        )
        if sampling.repetition_penalty <= 0:
            raise EngineRequestError("repetition_penalty must be > 0")
        table = tensor(request, Engine.PROMPT_EMBEDDING_TABLE)
        task_id = optional_scalar(request, Engine.LORA_TASK_ID)
        weights, config = tensor(request, Engine.LORA_WEIGHTS), tensor(request, Engine.LORA_CONFIG)
        if weights is not None and config is not None:
            weights, config = weights.reshape(-1, weights.shape[-1]), config.reshape(-1, 3)
        return cls(
            input_ids=ids.astype(np.int64).tolist(),
            max_new_tokens=min(max_new, max_seq_len - int(ids.size)),
            end_id=int(optional_scalar(request, Engine.END_ID, 1)),
            min_tokens=int(optional_scalar(request, Engine.MIN_TOKENS, 0)),
            streaming=bool(optional_scalar(request, Engine.STREAMING, False)),
            exclude_input=bool(
                optional_scalar(request, Engine.EXCLUDE_INPUT_IN_OUTPUT, exclude_input_default)
            ),
            sampling=sampling,
            stop_words=_word_list(tensor(request, Engine.STOP_WORDS_LIST)),
            bad_words=_word_list(tensor(request, Engine.BAD_WORDS_LIST)),
            prompt_table=table.reshape(-1, table.shape[-1]) if table is not None and table.size else None,
            lora_task_id=None if task_id is None else int(task_id),
            lora_weights=weights if task_id is not None else None,
            lora_config=config if task_id is not None else None,
            guide=_guide(request),
            embedding_bias=_embedding_bias(tensor(request, Engine.EMBEDDING_BIAS)),
            return_log_probs=bool(optional_scalar(request, Engine.RETURN_LOG_PROBS, False)),
            return_perf_metrics=bool(optional_scalar(request, Engine.RETURN_PERF_METRICS, False)),
        )


def _word_list(arr: np.ndarray | None) -> list[list[int]]:
    return from_word_list(arr) if arr is not None and arr.size else []


def _embedding_bias(arr: np.ndarray | None) -> np.ndarray | None:
    if arr is None or not arr.size:
        return None
    bias = arr.reshape(-1).astype(np.float32)
    if not np.isfinite(bias).all():
        raise EngineRequestError("embedding_bias must be finite")
    return bias


def _text(item: Any) -> str:
    return item.decode() if isinstance(item, bytes) else str(item)


def _guide(request: Any) -> tuple[str, str] | None:
    guide_type = tensor(request, Engine.GUIDE_TYPE)
    if guide_type is None or not guide_type.size:
        return None
    guide = tensor(request, Engine.GUIDE)
    text = guide.reshape(-1)[0] if guide is not None and guide.size else b""
    return _text(guide_type.reshape(-1)[0]), _text(text)
