"""Vision encoder → ONNX → TensorRT (trtexec), for the GPU build's `vision` stage.

The exported graph is `Gemma3VisionEncoder.forward`: SigLIP + projector + the √hidden compensation, so the
engine's `image_embeds` rows go straight into TensorRT-LLM's prompt table. Export uses the TorchScript
exporter (`dynamo=False`): it emits opset 17 directly (the dynamo exporter emits ≥ 18 and fails to
down-convert), which TensorRT parses with native LayerNormalization.
"""

from __future__ import annotations

import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gemma3_core.vision import ENGINE_FILE, INPUT_NAME, OUTPUT_NAME, Gemma3VisionEncoder

ONNX_FILE = "vision_encoder.onnx"
DEFAULT_OPSET = 17


def export_onnx(
    encoder: Gemma3VisionEncoder,
    path: str | Path,
    *,
    dtype: str = "float32",
    opset: int = DEFAULT_OPSET,
    example_batch: int = 2,
) -> Path:
    """Export with a dynamic image batch: `pixel_values` [B,3,S,S] → `image_embeds` [B,256,hidden].

    `dtype="float16"` exports a half-precision graph (input and output fp16); the default float32 graph
    is what `trtexec --fp16` expects (TensorRT picks fp16 kernels itself, keeping norms accurate).
    The 27B tower (423 M params) is 1.7 GB in float32: under protobuf's 2 GB single-file limit.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    tdtype = torch.float32 if dtype == "float32" else torch.float16
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Export a copy in eager attention: a plain MatMul/Softmax graph that any TensorRT parses.
    model = _export_copy(encoder).to(tdtype).eval()
    size = encoder.image_size
    example = torch.zeros(example_batch, 3, size, size, dtype=tdtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation + tracer warnings
        torch.onnx.export(
            model,
            (example,),
            str(out),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return out


def _export_copy(encoder: Gemma3VisionEncoder) -> Gemma3VisionEncoder:
    copy = Gemma3VisionEncoder(encoder.config, attn_implementation="eager")
    copy.load_state_dict(encoder.state_dict())
    return copy.to(next(encoder.parameters()).dtype)


@dataclass(frozen=True)
class OnnxCheck:
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    max_abs_ref: float
    seconds: float

    @property
    def rel_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_ref, 1e-12)


def check_onnx(
    onnx_path: str | Path,
    encoder: Gemma3VisionEncoder,
    *,
    batch_sizes: tuple[int, ...] = (1, 3),
    seed: int = 0,
    atol: float | None = None,
    rtol: float = 1e-3,
) -> OnnxCheck:
    """Run the ONNX graph in onnxruntime (CPU) and torch on the same random pixels; raise if they differ.

    Tolerance: `atol` if given, else `rtol` × max|torch output| (fp16 graphs: pass a looser rtol, ~2e-2).
    """
    import onnxruntime as ort

    start = time.perf_counter()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    in_type = sess.get_inputs()[0].type
    np_dtype = np.float16 if "float16" in in_type else np.float32
    gen = torch.Generator().manual_seed(seed)
    size = encoder.image_size
    worst = 0.0
    ref_max = 0.0
    for b in batch_sizes:
        x = torch.rand(b, 3, size, size, generator=gen) * 2 - 1
        with torch.no_grad():
            ref = encoder(x.to(next(encoder.parameters()).dtype)).float().numpy()
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy().astype(np_dtype)})[0].astype(np.float32)
        if got.shape != ref.shape:
            raise AssertionError(f"batch {b}: onnx shape {got.shape} != torch shape {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
        ref_max = max(ref_max, float(np.abs(ref).max()))
    result = OnnxCheck(tuple(batch_sizes), worst, ref_max, time.perf_counter() - start)
    limit = atol if atol is not None else rtol * ref_max
    if worst > limit:
        raise AssertionError(
            f"onnxruntime vs torch: max|diff| {worst:.3e} > {limit:.3e} (max|ref| {ref_max:.3e})"
        )
    return result


def trtexec_command(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    max_batch: int = 4,
    opt_batch: int | None = None,
    min_batch: int = 1,
    image_size: int = 896,
    fp16: bool = True,
    workspace_mib: int = 4096,
    trtexec: str = "trtexec",
    timing_cache: str | Path | None = None,
) -> list[str]:
    """The `trtexec` argv building the vision engine (run inside NVIDIA's TensorRT/Triton container).

    Shapes cover `min_batch..max_batch` images per execution (the Triton model chunks larger requests);
    opt defaults to max/2 rounded up, like TensorRT-LLM's multimodal builder.
    """
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= max_batch, got {min_batch}, {max_batch}")
    opt = opt_batch if opt_batch is not None else max(min_batch, (max_batch + 1) // 2)
    if not min_batch <= opt <= max_batch:
        raise ValueError(f"opt_batch {opt} outside [{min_batch}, {max_batch}]")

    def shape(b: int) -> str:
        return f"{INPUT_NAME}:{b}x3x{image_size}x{image_size}"

    cmd = [
        trtexec,
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--minShapes={shape(min_batch)}",
        f"--optShapes={shape(opt)}",
        f"--maxShapes={shape(max_batch)}",
        f"--memPoolSize=workspace:{workspace_mib}M",
        "--skipInference",  # build only; the Triton model and check_engine exercise it
    ]
    if fp16:
        cmd.append("--fp16")
    if timing_cache is not None:
        cmd.append(f"--timingCacheFile={timing_cache}")
    return cmd


def trtexec_command_string(*args: object, **kwargs: object) -> str:
    return shlex.join(trtexec_command(*args, **kwargs))  # type: ignore[arg-type]


def export_for_gpu(
    encoder: Gemma3VisionEncoder,
    out_dir: str | Path,
    *,
    max_batch: int = 4,
    check: bool = True,
) -> tuple[Path, list[str]]:
    """Save the encoder dir (config + weights, read by the Triton model), export ONNX, and return
    (onnx path, trtexec argv) whose engine lands at `out_dir/vision_encoder.engine`."""
    d = Path(out_dir)
    encoder.save_encoder(d)
    onnx_path = export_onnx(encoder, d / "onnx" / ONNX_FILE)
    if check:
        check_onnx(onnx_path, encoder, batch_sizes=(1, 2))
    return onnx_path, trtexec_command(
        onnx_path, d / ENGINE_FILE, max_batch=max_batch, image_size=encoder.image_size
    )
