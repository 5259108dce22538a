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
    EngineRequestError,
    GenerationRequest,
    ReferenceEngine,
    Sampling,
    load_model,
)
from cpu_engine.lora_hooks import LoraHooks
from gemma3_core.triton_io import optional_scalar, param, tensor
from gemma3_core.words import from_word_list

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        threads = int(os.environ.get("REFERENCE_ENGINE_THREADS", "0")) or None
        model = load_model(param(config, "hf_model_dir"), threads=threads)
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
        ids = tensor(request, "input_ids")
        if ids is None:
            raise EngineRequestError("input_ids is required")
        ids = ids.reshape(-1).astype(np.int64)
        if ids.size == 0:
            raise EngineRequestError("input_ids is empty")
        if optional_scalar(request, "beam_width", 1) != 1:
            raise EngineRequestError("the reference engine supports beam_width 1 only")
        max_new = int(optional_scalar(request, "request_output_len", 0))
        if max_new <= 0:
            raise EngineRequestError(f"request_output_len must be at least 1, got {max_new}")
        if ids.size >= self.max_seq_len:
            raise EngineRequestError(
                f"prompt has {ids.size} tokens; the context is {self.max_seq_len} tokens"
            )
        max_new = min(max_new, self.max_seq_len - int(ids.size))

        streaming = bool(optional_scalar(request, "streaming", False))
        exclude_input = bool(
            optional_scalar(request, "exclude_input_in_output", self.parameters.exclude_input_in_output)
        )
        sampling = Sampling(
            temperature=float(optional_scalar(request, "temperature", 1.0)),
            top_k=int(optional_scalar(request, "runtime_top_k", 0)),
            top_p=float(optional_scalar(request, "runtime_top_p", 0.0)),
            repetition_penalty=float(optional_scalar(request, "repetition_penalty", 1.0)),
            presence_penalty=float(optional_scalar(request, "presence_penalty", 0.0)),
            frequency_penalty=float(optional_scalar(request, "frequency_penalty", 0.0)),
            seed=optional_scalar(request, "seed"),
        )
        if sampling.repetition_penalty <= 0:
            raise EngineRequestError("repetition_penalty must be > 0")
        stop = tensor(request, "stop_words_list")
        bad = tensor(request, "bad_words_list")
        table = tensor(request, "prompt_embedding_table")
        prompt_table = None
        if table is not None and table.size:
            prompt_table = torch.from_numpy(table.reshape(-1, table.shape[-1]).astype(np.float32))

        lora = None
        task_id = optional_scalar(request, "lora_task_id")
        if task_id is not None:
            weights, lcfg = tensor(request, "lora_weights"), tensor(request, "lora_config")
            if weights is not None and lcfg is not None:
                weights, lcfg = weights.reshape(-1, weights.shape[-1]), lcfg.reshape(-1, 3)
            lora = self.lora_hooks.resolve(
                int(task_id), weights, lcfg
            )  # cache miss -> TensorRT-LLM's message

        guided = None
        guide_type = tensor(request, "guided_decoding_guide_type")
        if guide_type is not None and guide_type.size:
            guided = self._guided(request, guide_type)

        prompt = ids.tolist()
        n_in = len(prompt)

        def sink(new_ids: list[int], final: bool, error: str | None) -> None:
            flags = FINAL if final else 0
            if error is not None:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)), flags=FINAL)
                return
            out_ids = new_ids if streaming or exclude_input else prompt + new_ids
            arr = np.asarray(out_ids, dtype=np.int32).reshape(1, 1, -1)
            tensors = [
                pb_utils.Tensor("output_ids", arr),
                pb_utils.Tensor("sequence_length", np.array([[arr.shape[-1]]], dtype=np.int32)),
            ]
            # Counts are always produced (cheap), whatever return_num_*_tokens says: the ensemble maps them.
            tensors.append(pb_utils.Tensor("num_input_tokens", np.array([[n_in]], dtype=np.int32)))
            tensors.append(pb_utils.Tensor("num_output_tokens", np.array([[len(new_ids)]], dtype=np.int32)))
            sender.send(pb_utils.InferenceResponse(tensors), flags=flags)

        return GenerationRequest(
            input_ids=prompt,
            max_new_tokens=max_new,
            sink=sink,
            end_id=int(optional_scalar(request, "end_id", 1)),
            min_tokens=int(optional_scalar(request, "min_tokens", 0)),
            streaming=streaming,
            sampling=sampling,
            stop_words=from_word_list(stop) if stop is not None and stop.size else [],
            bad_words=from_word_list(bad) if bad is not None and bad.size else [],
            prompt_table=prompt_table,
            lora=lora,
            guided=guided,
            is_cancelled=sender.is_cancelled,
            request_id=request.request_id(),
        )

    def _guided(self, request: Any, guide_type: np.ndarray) -> Any:
        from cpu_engine.guided import GuidedDecoder, tokenizer_info_from_tokenizer_json

        kind = guide_type.reshape(-1)[0]
        guide = tensor(request, "guided_decoding_guide")
        text = guide.reshape(-1)[0] if guide is not None and guide.size else b""
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        text = text.decode() if isinstance(text, bytes) else str(text)
        from gemma3_core.tokenizer import load_tokenizer

        # xgrammar needs room for every tokenizer entry: the 270M's logits (262144) stop short of the
        # added <image_soft_token> (262144); masking handles the narrower logits.
        width = max(
            self.vocab_size, load_tokenizer(self.tokenizer_dir).get_vocab_size(with_added_tokens=True)
        )
        info = tokenizer_info_from_tokenizer_json(os.path.join(self.tokenizer_dir, "tokenizer.json"), width)
        return GuidedDecoder.create(kind, text, info)
