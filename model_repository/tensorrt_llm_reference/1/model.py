"""Triton `tensorrt_llm` on CPU: marshals TensorRT-LLM's tensors to cpu_engine (decoupled)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from cpu_engine.deployment import EngineParameters
from cpu_engine.engine import (
    DEFAULT_WEIGHT_DTYPE,
    GenerationRequest,
    ReferenceEngine,
    TokenLogProbs,
    available_cores,
    load_off_thread,
)
from cpu_engine.lora_hooks import LoraHooks
from triton_io.contract import TOP_LOG_PROBS_K, Engine
from triton_io.engine_request import EngineRequest
from triton_io.python_model import param

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        threads = int(os.environ.get("REFERENCE_ENGINE_THREADS", "0")) or available_cores()
        # This thread only marshals tensors from here on: the engine thread computes (load_off_thread).
        model = load_off_thread(
            param(config, "hf_model_dir"),
            threads=threads,
            weight_dtype=param(config, "weight_dtype", DEFAULT_WEIGHT_DTYPE),
        )
        self.max_seq_len = int(param(config, "max_seq_len"))
        self.parameters = EngineParameters.from_model_config(config)
        self.lora_hooks = LoraHooks(model)
        self.tokenizer_dir = param(config, "tokenizer_dir")
        self.vocab_size = int(param(config, "engine_vocab_size"))
        self.engine = ReferenceEngine(
            model,
            vocab_size=self.vocab_size,
            max_active=int(param(config, "max_active_requests", "8")),
            lora_hooks=self.lora_hooks,
            prefill_chunk=int(param(config, "prefill_chunk_tokens", "256")),
            gather_ms=float(param(config, "prefill_gather_ms", "0")),
            threads=threads,
        )

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.engine.submit(self._parse(request, sender))
            except Exception as exc:  # bad input: a clean Triton error, never a hung stream
                sender.send(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"tensorrt_llm: {exc}")),
                    flags=FINAL,
                )
        return None

    def finalize(self) -> None:
        self.engine.shutdown()

    def _parse(self, request: Any, sender: Any) -> GenerationRequest:
        parsed = EngineRequest.from_triton(
            request,
            max_seq_len=self.max_seq_len,
            engine="the reference engine",
            exclude_input_default=self.parameters.exclude_input_in_output,
        )
        prompt_table = None
        if parsed.prompt_table is not None:
            prompt_table = torch.from_numpy(parsed.prompt_table.astype(np.float32))
        lora = None
        if parsed.lora_task_id is not None:  # cache miss -> TensorRT-LLM's message
            lora = self.lora_hooks.resolve(parsed.lora_task_id, parsed.lora_weights, parsed.lora_config)
        guided = None if parsed.guide is None else self._guided(*parsed.guide)

        prompt = parsed.input_ids
        n_in = len(prompt)
        streaming, exclude_input = parsed.streaming, parsed.exclude_input
        # The reference engine keeps no prefix cache: nothing of a prompt is ever reused.
        perf_pending = [parsed.return_perf_metrics]

        def sink(
            new_ids: list[int], final: bool, error: str | None, log_probs: TokenLogProbs | None = None
        ) -> None:
            flags = FINAL if final else 0
            if error is not None:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)), flags=FINAL)
                return
            out_ids = new_ids if streaming or exclude_input else prompt + new_ids
            arr = np.asarray(out_ids, dtype=np.int32).reshape(1, 1, -1)
            tensors = [
                pb_utils.Tensor(Engine.OUTPUT_IDS, arr),
                pb_utils.Tensor(Engine.SEQUENCE_LENGTH, np.array([[arr.shape[-1]]], dtype=np.int32)),
            ]
            # Counts are always produced (cheap), whatever return_num_*_tokens says: the ensemble maps them.
            tensors.append(pb_utils.Tensor(Engine.NUM_INPUT_TOKENS, np.array([[n_in]], dtype=np.int32)))
            tensors.append(
                pb_utils.Tensor(Engine.NUM_OUTPUT_TOKENS, np.array([[len(new_ids)]], dtype=np.int32))
            )
            if log_probs is not None:
                tensors += _log_prob_tensors(log_probs, len(out_ids) - len(new_ids))
            if perf_pending[0]:
                perf_pending[0] = False
                tensors.append(pb_utils.Tensor(Engine.KV_CACHE_REUSED_BLOCKS, np.zeros((1, 1), np.int32)))
            sender.send(pb_utils.InferenceResponse(tensors), flags=flags)

        return GenerationRequest(
            input_ids=prompt,
            max_new_tokens=parsed.max_new_tokens,
            sink=sink,
            end_id=parsed.end_id,
            min_tokens=parsed.min_tokens,
            streaming=streaming,
            sampling=parsed.sampling,
            stop_words=parsed.stop_words,
            bad_words=parsed.bad_words,
            prompt_table=prompt_table,
            lora=lora,
            guided=guided,
            is_cancelled=sender.is_cancelled,
            request_id=request.request_id(),
            embedding_bias=None if parsed.embedding_bias is None else torch.from_numpy(parsed.embedding_bias),
            return_log_probs=parsed.return_log_probs,
            top_log_probs=TOP_LOG_PROBS_K,
        )

    def _guided(self, kind: str, text: str) -> Any:
        from cpu_engine.guided import GuidedDecoder, tokenizer_info_from_tokenizer_json
        from gemma3_core.tokenizer import load_tokenizer

        # xgrammar needs room for every tokenizer entry: the 270M's logits (262144) stop short of the
        # added <image_soft_token> (262144); masking handles the narrower logits.
        width = max(
            self.vocab_size, load_tokenizer(self.tokenizer_dir).get_vocab_size(with_added_tokens=True)
        )
        info = tokenizer_info_from_tokenizer_json(os.path.join(self.tokenizer_dir, "tokenizer.json"), width)
        return GuidedDecoder.create(kind, text, info)


def _log_prob_tensors(log_probs: TokenLogProbs, prompt_len: int) -> list:
    """`output_log_probs` [1, beams, tokens] (0 for echoed prompt tokens, as TensorRT-LLM leaves them)
    and the top-k extension [1, tokens, k]."""
    values = np.asarray([0.0] * prompt_len + log_probs.values, dtype=np.float32).reshape(1, 1, -1)
    k = max((len(t) for t in log_probs.top_ids), default=0)
    ids = np.zeros((1, len(log_probs.top_ids), k), dtype=np.int32)
    top = np.full((1, len(log_probs.top_ids), k), -np.inf, dtype=np.float32)
    for i, (row_ids, row_values) in enumerate(zip(log_probs.top_ids, log_probs.top_values, strict=True)):
        ids[0, i, : len(row_ids)] = row_ids
        top[0, i, : len(row_values)] = row_values
    return [
        pb_utils.Tensor(Engine.OUTPUT_LOG_PROBS, values),
        pb_utils.Tensor(Engine.TOP_LOG_PROB_IDS, ids),
        pb_utils.Tensor(Engine.TOP_LOG_PROBS, top),
    ]
