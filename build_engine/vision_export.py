"""Vision encoder → ONNX → TensorRT engine, for the GPU build's `vision` stage.

The exported graph is `Gemma3VisionEncoder.forward`: SigLIP + projector + the √hidden compensation, so the
engine's `image_embeds` rows go straight into TensorRT-LLM's prompt table.

Export: the dynamo exporter (opset 18, which TensorRT 10 parses; the TorchScript exporter is deprecated
since torch 2.9) with the TorchScript exporter (opset 17) as fallback when dynamo fails or `onnxscript` is
missing. Either graph is checked against torch in onnxruntime when onnxruntime is importable.

Engine: built with the TensorRT Python API (the `tensorrt` wheel TensorRT-LLM depends on), not `trtexec`,
which NVIDIA's Triton TensorRT-LLM image does not put on PATH: ONNX parser, one optimization profile over
the image batch, BF16 with LayerNorm and softmax kept in FP32, and a timing cache reused across builds.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma3_core.vision import ENGINE_FILE, INPUT_NAME, OUTPUT_NAME, Gemma3VisionEncoder

ONNX_FILE = "vision_encoder.onnx"
TIMING_CACHE_FILE = "timing.cache"
DYNAMO_OPSET = 18
TORCHSCRIPT_OPSET = 17
EXPORTERS = ("auto", "dynamo", "torchscript")


def log(msg: str) -> None:
    print(f"[vision_export] {msg}", file=sys.stderr, flush=True)


class MissingPackage(RuntimeError):
    """A package the stage needs is not importable; nothing is installed behind the user's back."""


def require(*modules: str, purpose: str) -> None:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingPackage(
            f"{purpose} needs {', '.join(missing)}, which this image does not provide; use the pinned "
            "TensorRT-LLM image (it ships them) or install them into it. The builder installs nothing."
        )


def have(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    exporter: str  # "dynamo" | "torchscript"
    opset: int


def export_onnx(
    encoder: Gemma3VisionEncoder,
    path: str | Path,
    *,
    dtype: str = "float32",
    exporter: str = "auto",
    example_batch: int = 2,
) -> OnnxExport:
    """Export with a dynamic image batch: `pixel_values` [B,3,S,S] → `image_embeds` [B,256,hidden].

    `exporter="auto"` tries dynamo first and falls back to TorchScript. The default float32 graph is
    what the TensorRT build expects (it picks BF16 kernels itself and keeps norms in FP32); `float16`
    exports a half-precision graph. The 27B tower (423 M params) is 1.7 GB in float32, under protobuf's
    2 GB single-file limit.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    tdtype = torch.float32 if dtype == "float32" else torch.float16
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Export a copy in eager attention: a plain MatMul/Softmax graph that any TensorRT parses.
    model = _export_copy(encoder).to(tdtype).eval()
    size = encoder.image_size
    example = torch.zeros(example_batch, 3, size, size, dtype=tdtype)
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(model, example, out)
            return OnnxExport(out, "dynamo", DYNAMO_OPSET)
        except Exception as exc:
            if exporter == "dynamo":
                raise
            log(f"dynamo export failed ({type(exc).__name__}: {str(exc)[:300]}); using TorchScript")
    _export_torchscript(model, example, out)
    return OnnxExport(out, "torchscript", TORCHSCRIPT_OPSET)


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor, out: Path) -> None:
    require("onnxscript", purpose="the dynamo ONNX exporter")
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"pixel_values": {0: batch}},
            opset_version=DYNAMO_OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
    program.save(str(out))


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, out: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation + tracer warnings
        torch.onnx.export(
            model,
            (example,),
            str(out),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=TORCHSCRIPT_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


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

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run([OUTPUT_NAME], {INPUT_NAME: x.astype(np_dtype)})[0].astype(np.float32)

    return _compare(run, encoder, batch_sizes, seed, atol, rtol, start, "onnxruntime")


def _compare(
    run: Any,
    encoder: Gemma3VisionEncoder,
    batch_sizes: tuple[int, ...],
    seed: int,
    atol: float | None,
    rtol: float,
    start: float,
    what: str,
) -> OnnxCheck:
    gen = torch.Generator().manual_seed(seed)
    size = encoder.image_size
    worst = 0.0
    ref_max = 0.0
    for b in batch_sizes:
        x = torch.rand(b, 3, size, size, generator=gen) * 2 - 1
        with torch.no_grad():
            ref = encoder(x.to(next(encoder.parameters()).dtype)).float().numpy()
        got = np.asarray(run(x.numpy()), dtype=np.float32).reshape(ref.shape[0], -1, ref.shape[-1])
        if got.shape != ref.shape:
            raise AssertionError(f"batch {b}: {what} shape {got.shape} != torch shape {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
        ref_max = max(ref_max, float(np.abs(ref).max()))
    result = OnnxCheck(tuple(batch_sizes), worst, ref_max, time.perf_counter() - start)
    limit = atol if atol is not None else rtol * ref_max
    if worst > limit:
        raise AssertionError(f"{what} vs torch: max|diff| {worst:.3e} > {limit:.3e} (max|ref| {ref_max:.3e})")
    return result


# --- TensorRT engine (Python API) ----------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSpec:
    """Everything the engine build depends on (also printed by --dry-run and stamped)."""

    onnx_path: Path
    engine_path: Path
    image_size: int
    max_batch: int
    min_batch: int = 1
    opt_batch: int | None = None
    precision: str = "bf16"  # bf16 | fp16; LayerNorm and softmax stay FP32 either way
    workspace_mib: int = 4096
    timing_cache: Path | None = None

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        if not 1 <= self.min_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= max_batch, got {self.min_batch}, {self.max_batch}")
        # opt = max/2 rounded up, like TensorRT-LLM's multimodal builder.
        opt = self.opt_batch if self.opt_batch is not None else max(self.min_batch, (self.max_batch + 1) // 2)
        if not self.min_batch <= opt <= self.max_batch:
            raise ValueError(f"opt_batch {opt} outside [{self.min_batch}, {self.max_batch}]")
        if self.precision not in ("bf16", "fp16"):
            raise ValueError(f"precision must be bf16 or fp16, got {self.precision!r}")

        def shape(b: int) -> tuple[int, ...]:
            return (b, 3, self.image_size, self.image_size)

        return shape(self.min_batch), shape(opt), shape(self.max_batch)

    def describe(self) -> str:
        lo, opt, hi = self.shapes()
        return (
            f"TensorRT Python API: parse {self.onnx_path.name}, profile {INPUT_NAME} "
            f"min {lo} opt {opt} max {hi}, {self.precision.upper()} (LayerNorm/softmax FP32), "
            f"workspace {self.workspace_mib} MiB, timing cache {self.timing_cache}"
        )


# Layer types kept in FP32: reductions whose range or accumulation suffers in 16-bit.
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")


def build_engine(spec: EngineSpec, *, trt: Any = None) -> Path:
    """Build and write the serialized engine; returns its path. `trt`: the tensorrt module (tests inject)."""
    if trt is None:
        require("tensorrt", purpose="the vision engine build")
        trt = importlib.import_module("tensorrt")
    lo, opt, hi = spec.shapes()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files next to the model.
    if not parser.parse_from_file(str(spec.onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {spec.onnx_path}: " + "; ".join(errors or ["?"]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
    config.set_flag(trt.BuilderFlag.BF16 if spec.precision == "bf16" else trt.BuilderFlag.FP16)
    kept = _keep_fp32(network, trt)
    if kept:
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_bytes = b""
    if spec.timing_cache is not None and spec.timing_cache.exists():
        cache_bytes = spec.timing_cache.read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    t0 = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the vision engine (see the TensorRT log above)")
    _atomic_write(spec.engine_path, bytes(memoryview(serialized)))
    if spec.timing_cache is not None:
        _atomic_write(spec.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    log(f"engine {spec.engine_path} built in {time.monotonic() - t0:.0f}s ({kept} layers kept in FP32)")
    return spec.engine_path


def _keep_fp32(network: Any, trt: Any) -> int:
    types = {getattr(trt.LayerType, name) for name in FP32_LAYER_TYPES if hasattr(trt.LayerType, name)}
    kept = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in types:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            kept += 1
    return kept


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_engine(
    vision_dir: Path,
    encoder: Gemma3VisionEncoder,
    *,
    rtol: float = 3e-2,
    batch_sizes: tuple[int, ...] = (1, 2),
) -> OnnxCheck:
    """The built engine (on the GPU) against torch on the same pixels; raises beyond `rtol` × max|ref|."""
    from gemma3_core.vision import load_vision_runner

    runner = load_vision_runner(vision_dir, "tensorrt")
    return _compare(runner, encoder, batch_sizes, 0, None, rtol, time.perf_counter(), "TensorRT engine")


def export_for_gpu(
    encoder: Gemma3VisionEncoder,
    out_dir: str | Path,
    *,
    max_batch: int = 4,
    check: bool = True,
    exporter: str = "auto",
) -> tuple[OnnxExport, EngineSpec]:
    """Save the encoder dir (config + weights, read by the Triton model), export ONNX (checked in
    onnxruntime when it is importable), and return the export and the engine spec for `build_engine`."""
    d = Path(out_dir)
    encoder.save_encoder(d)
    exported = export_onnx(encoder, d / "onnx" / ONNX_FILE, exporter=exporter)
    log(f"ONNX exported with the {exported.exporter} exporter (opset {exported.opset})")
    if check and have("onnxruntime"):
        result = check_onnx(exported.path, encoder, batch_sizes=(1, 2))
        log(f"onnxruntime vs torch: max|diff| {result.max_abs_diff:.2e} ({result.rel_diff:.1e} relative)")
    elif check:
        log("onnxruntime not importable: the engine is checked against torch after the build instead")
    return exported, engine_spec(d, max_batch=max_batch, image_size=encoder.image_size)


def engine_spec(vision_dir: Path, *, max_batch: int, image_size: int) -> EngineSpec:
    return EngineSpec(
        onnx_path=vision_dir / "onnx" / ONNX_FILE,
        engine_path=vision_dir / ENGINE_FILE,
        image_size=image_size,
        max_batch=max_batch,
        timing_cache=vision_dir.parent / TIMING_CACHE_FILE,
    )
