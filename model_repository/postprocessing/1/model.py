"""Triton `postprocessing`: token ids -> their exact bytes (stateless; see docs/architecture.md)."""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from gemma3_core.detokenize import ByteDetokenizer
from gemma3_core.tokenizer import load_tokenizer
from triton_io.contract import Postprocessing
from triton_io.python_model import param


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.detok = ByteDetokenizer(load_tokenizer(param(config, "tokenizer_dir")))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, Postprocessing.TOKENS_BATCH).as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, Postprocessing.SEQUENCE_LENGTH).as_numpy()
            batch = tokens.shape[0]
            # [batch, beams, len]; no -1 for beams: a final response may carry zero tokens (end_id, cancel)
            tokens = tokens.reshape(batch, lengths.size // batch, tokens.shape[-1])
            lengths = lengths.reshape(batch, -1)
            text = np.empty(lengths.shape, dtype=object)
            for b in range(tokens.shape[0]):
                for k in range(tokens.shape[1]):
                    text[b, k] = self.detok.token_bytes(tokens[b, k, : int(lengths[b, k])])
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(Postprocessing.OUTPUT, text)]))
        return responses
