"""Triton `preprocessing`: marshals tensors around gemma3_core.preprocess.prepare_request."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from gemma3_core.preprocess import PrepError, prepare_request
from gemma3_core.tokenizer import load_tokenizer
from triton_io.contract import Preprocessing as P
from triton_io.contract import VisionEncoder
from triton_io.embedding_bias import dense_embedding_bias
from triton_io.python_model import (
    optional_blobs,
    optional_scalar,
    optional_strings,
    param,
    scalar,
    strings,
    tensor,
)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import json

        config = json.loads(args["model_config"])
        self.tok = load_tokenizer(param(config, "tokenizer_dir"))
        self.max_seq_len = int(param(config, "max_seq_len"))
        self.vocab_size = int(param(config, "engine_vocab_size"))
        self.vision_model = param(config, "vision_encoder_model")

    def execute(self, requests: list) -> list:
        return [self._one(r) for r in requests]

    def _one(self, request) -> pb_utils.InferenceResponse:
        try:
            query = strings(request, P.QUERY)
            if len(query) != 1:
                raise PrepError(f"send one prompt per request (batch size 1), got {len(query)}")
            p = prepare_request(
                self.tok,
                query[0],
                int(scalar(request, P.REQUEST_OUTPUT_LEN)),
                max_seq_len=self.max_seq_len,
                engine_vocab_size=self.vocab_size,
                stop_words=optional_strings(request, P.STOP_WORDS_DICT),
                bad_words=optional_strings(request, P.BAD_WORDS_DICT),
                end_id=optional_scalar(request, P.END_ID),
                pad_id=optional_scalar(request, P.PAD_ID),
                images=optional_blobs(request, P.IMAGES),
            )
            bias_ids = tensor(request, P.EMBEDDING_BIAS_IDS)
            bias = None
            if bias_ids is not None and bias_ids.size:
                weights = tensor(request, P.EMBEDDING_BIAS_WEIGHTS)
                bias = dense_embedding_bias(
                    bias_ids, weights if weights is not None else np.zeros(0), self.vocab_size
                )
        except ValueError as exc:  # PrepError, missing inputs, undecodable text
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocessing: {exc}"))
        i32 = np.int32
        out = [
            pb_utils.Tensor(P.INPUT_ID, p.input_ids[None, :]),
            pb_utils.Tensor(P.REQUEST_INPUT_LEN, np.array([[p.input_ids.size]], dtype=i32)),
            pb_utils.Tensor(P.REQUEST_OUTPUT_LEN, np.array([[p.output_len]], dtype=i32)),
            pb_utils.Tensor(P.STOP_WORDS_IDS, p.stop_words[None]),
            pb_utils.Tensor(P.BAD_WORDS_IDS, p.bad_words[None]),
            pb_utils.Tensor(P.OUT_END_ID, np.array([[p.end_id]], dtype=i32)),
            pb_utils.Tensor(P.OUT_PAD_ID, np.array([[p.pad_id]], dtype=i32)),
        ]
        if bias is not None:
            out.append(pb_utils.Tensor(P.EMBEDDING_BIAS, bias[None, :]))
        if p.pixel_values is not None and p.extra_ids is not None:
            encoded = pb_utils.InferenceRequest(
                model_name=self.vision_model,
                inputs=[pb_utils.Tensor(VisionEncoder.PIXEL_VALUES, p.pixel_values[None])],
                requested_output_names=[
                    VisionEncoder.PROMPT_EMBEDDING_TABLE,
                    VisionEncoder.PROMPT_VOCAB_SIZE,
                ],
            ).exec()
            if encoded.has_error():
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(encoded.error().message()))
            for name, out_name in (
                (VisionEncoder.PROMPT_EMBEDDING_TABLE, P.OUT_PROMPT_EMBEDDING_TABLE),
                (VisionEncoder.PROMPT_VOCAB_SIZE, P.OUT_PROMPT_VOCAB_SIZE),
            ):
                # via DLPack: the table may be BF16 (GPU engine), which numpy cannot hold
                out.append(
                    pb_utils.Tensor.from_dlpack(
                        out_name, pb_utils.get_output_tensor_by_name(encoded, name).to_dlpack()
                    )
                )
            out.append(pb_utils.Tensor(P.OUT_PROMPT_TABLE_EXTRA_IDS, p.extra_ids[None, :]))
        return pb_utils.InferenceResponse(out)
