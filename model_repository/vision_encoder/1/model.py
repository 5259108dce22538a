"""Triton Python model `vision_encoder`: pixel_values [1,N,3,896,896] FP32 → prompt_embedding_table FP16.

Output rows: [1, N * 256, text hidden], image k at rows k*256 .. k*256+255, and prompt_vocab_size [1, 1].
`preprocessing` calls it through BLS, only for requests that carry images.

Thin on purpose: the encoder and both runners (torch on CPU, TensorRT on GPU) live in `gemma3_core.vision`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from gemma3_core.vision import load_vision_runner
from triton_io.contract import VisionEncoder


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        backend = params.get("vision_backend", "torch")
        self.bf16 = params.get("output_data_type", "TYPE_FP16") == "TYPE_BF16"
        kwargs: dict[str, Any] = {}
        if backend == "tensorrt":
            kwargs["device_id"] = int(args.get("model_instance_device_id") or 0)
        self.runner = load_vision_runner(params["vision_encoder_dir"], backend, **kwargs)
        self.logger = pb_utils.Logger
        self.logger.log_info(
            f"vision_encoder: backend={backend} hidden={self.runner.hidden_size} "
            f"dir={params['vision_encoder_dir']}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                pixels = pb_utils.get_input_tensor_by_name(request, VisionEncoder.PIXEL_VALUES).as_numpy()
                table = self.runner(np.asarray(pixels.reshape(-1, *pixels.shape[-3:]), dtype=np.float32))
                rows = np.asarray(table, dtype=np.float32).reshape(1, -1, table.shape[-1])
                out = [
                    self._table_tensor(rows),
                    pb_utils.Tensor(
                        VisionEncoder.PROMPT_VOCAB_SIZE, np.array([[rows.shape[1]]], dtype=np.int32)
                    ),
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=out))
            except Exception as e:  # one bad request must not fail the others in the batch
                error = pb_utils.TritonError(f"vision_encoder: {e}")
                responses.append(pb_utils.InferenceResponse(error=error))
        return responses

    def _table_tensor(self, rows: np.ndarray) -> Any:
        if not self.bf16:
            return pb_utils.Tensor(VisionEncoder.PROMPT_EMBEDDING_TABLE, rows.astype(np.float16))
        import torch  # numpy has no bfloat16: hand the tensor over through DLPack

        table = torch.from_numpy(rows).to(torch.bfloat16).contiguous()
        return pb_utils.Tensor.from_dlpack(
            VisionEncoder.PROMPT_EMBEDDING_TABLE, torch.utils.dlpack.to_dlpack(table)
        )

    def finalize(self) -> None:
        self.runner = None
