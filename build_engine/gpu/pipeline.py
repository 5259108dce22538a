"""The GPU build as small named stages: each knows its inputs, outputs, commands and files, so a run can
skip stages whose output was made from the same inputs (a stamp file) and `--dry-run` can print all of it.

    download → inspect → convert → build → vision → tokenizer-info → repository      (`all`)
    verify (fidelity vs Hugging Face; not part of `all`, needs the engines and a GPU)
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from build_engine import render
from build_engine.gpu import build as gpu_build
from build_engine.gpu import checkpoint as ckpt
from build_engine.gpu import repository
from build_engine.gpu.settings import TRITON_IMAGE, BuildSettings
from build_engine.stages import Action, Stage, run_stage, run_stages
from gemma3_core import constants as C

__all__ = ["ALL", "STAGES", "Action", "Stage", "run", "run_stage"]


def log(msg: str) -> None:
    print(f"[build_engine gpu] {msg}", file=sys.stderr, flush=True)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _file_sha(path: Path) -> str:
    return _sha(path.read_bytes()) if path.exists() else "missing"


# --- stage definitions ------------------------------------------------------------------------------
def stage_download(s: BuildSettings) -> Stage:
    def call(_out: Path) -> None:
        ckpt.download(s.model_id, s.checkpoint_dir, revision=s.revision)

    return Stage(
        "download",
        s.checkpoint_dir,
        {"model_id": s.model_id, "revision": s.revision, "patterns": list(ckpt.DOWNLOAD_PATTERNS)},
        [
            Action(
                f"huggingface_hub.snapshot_download({s.model_id!r}, revision={s.revision!r}) "
                "[token from $HF_TOKEN; resumes partial files]",
                call=call,
                writes=[
                    s.checkpoint_dir / "config.json",
                    s.checkpoint_dir / "*.safetensors",
                    s.checkpoint_dir / "tokenizer.json",
                ],
            )
        ],
    )


def stage_inspect(s: BuildSettings) -> Stage:
    report = s.inspect_dir / "checkpoint.json"

    def call(_out: Path) -> None:
        info = ckpt.inspect_checkpoint(s.checkpoint_dir, expected=ckpt.expected_arch_for(s.model_id))
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(info.to_json(), indent=2) + "\n")
        log(
            f"checkpoint OK: {info.architecture}, {info.text.num_layers} layers, int{info.quant.num_bits} "
            f"group {info.quant.group_size} symmetric, actorder {info.quant.actorder}, "
            f"prefix {info.lm_prefix!r}"
        )

    return Stage(
        "inspect",
        s.inspect_dir,
        {"checkpoint": ckpt.checkpoint_fingerprint(s.checkpoint_dir), "model_id": s.model_id},
        [
            Action(
                "check config.json quantization_config and tensor names (fails fast)",
                call=call,
                writes=[report],
            )
        ],
    )


def stage_convert(s: BuildSettings) -> Stage:
    from build_engine.gpu import convert

    def call(_out: Path) -> None:
        info = ckpt.inspect_checkpoint(s.checkpoint_dir, expected=ckpt.expected_arch_for(s.model_id))
        convert.convert(
            s.checkpoint_dir, s.trtllm_checkpoint_dir, tp_size=s.tp_size, dtype=s.dtype, info=info
        )

    return Stage(
        "convert",
        s.trtllm_checkpoint_dir,
        {
            "checkpoint": ckpt.checkpoint_fingerprint(s.checkpoint_dir),
            "converter": convert.CONVERTER_VERSION,
            "tp_size": s.tp_size,
            "dtype": s.dtype,
        },
        [
            Action(
                f"compressed-tensors int4 → TensorRT-LLM {convert.QUANT_ALGO} checkpoint, "
                f"tp_size={s.tp_size}",
                call=call,
                writes=[s.trtllm_checkpoint_dir / "config.json"]
                + [s.trtllm_checkpoint_dir / f"rank{r}.safetensors" for r in range(s.tp_size)],
            )
        ],
    )


def stage_build(s: BuildSettings) -> Stage:
    cmd = gpu_build.trtllm_build_command(s)
    return Stage(
        "build",
        s.engine_dir,
        {
            "checkpoint": _file_sha(s.trtllm_checkpoint_dir / "config.json"),
            "conversion": _file_sha(s.trtllm_checkpoint_dir / "conversion.json"),
            "fixes_module": _file_sha(gpu_build.FIXES_MODULE),
            "image": TRITON_IMAGE,
            "command": cmd,
        },
        [
            Action(
                f"trtllm-build, profile {s.profile.name} (Gemma 3 fidelity fixes via --model_cls_file)",
                command=cmd,
                writes=[s.engine_dir / "config.json"]
                + [s.engine_dir / f"rank{r}.engine" for r in range(s.tp_size)],
            )
        ],
    )


def stage_vision(s: BuildSettings) -> Stage:
    from build_engine import vision_export
    from gemma3_core import vision

    max_batch = s.profile.vision_max_batch_size
    spec = vision_export.engine_spec(s.vision_dir, max_batch=max_batch, image_size=C.IMAGE_SIZE)
    state: dict[str, object] = {}

    def encoder() -> vision.Gemma3VisionEncoder:
        if "encoder" not in state:
            state["encoder"] = vision.Gemma3VisionEncoder.from_hf_checkpoint_dir(
                s.checkpoint_dir, llm_dtype=s.dtype
            )
        return state["encoder"]  # type: ignore[return-value]

    def export(_out: Path) -> None:
        # Fail before the long export when the image lacks what the engine build needs.
        vision_export.require("onnx", "tensorrt", purpose="the vision stage")
        vision_export.export_for_gpu(encoder(), s.vision_dir, max_batch=max_batch)

    def build(_out: Path) -> None:
        vision_export.build_engine(spec)

    def check(_out: Path) -> None:
        result = vision_export.check_engine(s.vision_dir, encoder())
        log(f"vision engine vs torch: max|diff| {result.max_abs_diff:.2e} ({result.rel_diff:.1e} relative)")

    return Stage(
        "vision",
        s.vision_dir,
        {
            "checkpoint": ckpt.checkpoint_fingerprint(s.checkpoint_dir),
            "max_batch": max_batch,
            "dtype": s.dtype,
            "image": TRITON_IMAGE,
            "engine": spec.describe(),
            "export_module": _file_sha(Path(vision_export.__file__)),
            "vision_module": _file_sha(Path(vision.__file__)),
        },
        [
            Action(
                "SigLIP + Gemma 3 projector (÷√hidden) → ONNX with a dynamic image batch (dynamo exporter, "
                "opset 18; TorchScript fallback), checked in onnxruntime when it is importable",
                call=export,
                writes=[
                    s.vision_dir / vision.CONFIG_FILE,
                    s.vision_dir / vision.WEIGHTS_FILE,
                    spec.onnx_path,
                ],
            ),
            Action(
                spec.describe(), call=build, writes=[spec.engine_path, spec.timing_cache or spec.engine_path]
            ),
            Action("the engine against torch on random pixels (relative max|diff| ≤ 3e-2)", call=check),
        ],
    )


def stage_tokenizer_info(s: BuildSettings) -> Stage:
    out = s.tokenizer_info_dir / repository.XGRAMMAR_INFO_FILE

    def call(_out: Path) -> None:
        # One writer for the file (gemma3_core.guided): both Gemma stop ids, special tokens blanked.
        from gemma3_core.guided import write_xgrammar_tokenizer_info

        write_xgrammar_tokenizer_info(s.tokenizer_dir / "tokenizer.json", out, C.DEFAULT_STOP_IDS)

    actions = (
        [Action("xgrammar tokenizer info for guided decoding (C++ backend)", call=call, writes=[out])]
        if s.guided_decoding
        else []
    )
    return Stage(
        "tokenizer-info",
        s.tokenizer_info_dir,
        {
            "tokenizer": _file_sha(s.tokenizer_dir / "tokenizer.json"),
            "stop_ids": list(C.DEFAULT_STOP_IDS),
            "enabled": s.guided_decoding,
        },
        actions,
    )


def stage_repository(s: BuildSettings) -> Stage:
    values = repository.repository_values(s)
    templates = {
        src: _file_sha(render.TEMPLATES_DIR / src / "config.pbtxt") for src, _ in render.TARGET_MODELS["gpu"]
    }

    def call(_out: Path) -> None:
        render.render("gpu", s.repository_dir, values)

    def preview() -> str:
        try:
            files = render.plan("gpu", s.repository_dir, values)
        except render.RenderError as exc:
            return f"      (cannot render yet: {exc})"
        return "\n".join(f"      --- {f.path}\n{f.text}" for f in files)

    writes = [s.repository_dir / dst / "config.pbtxt" for _, dst in render.TARGET_MODELS["gpu"]]
    return Stage(
        "repository",
        s.repository_dir,
        {"values": values, "templates": templates},
        [Action("render the GPU Triton model repository", call=call, writes=writes, preview=preview)],
    )


def stage_verify(s: BuildSettings, extra_args: list[str] | None = None) -> Stage:
    argv = [
        sys.executable,
        "-m",
        "build_engine.gpu.verify",
        f"--work-dir={s.work_dir}",
        f"--profile={s.profile.name}",
        f"--tp-size={s.tp_size}",
        f"--model-id={s.model_id}",
        *(extra_args or []),
    ]
    return Stage(
        "verify",
        s.work_dir / "verify",
        {},
        [
            Action(
                "engine vs Hugging Face logits / greedy tokens (needs a GPU)",
                command=argv,
                writes=[s.work_dir / "verify" / "report.json"],
            )
        ],
        always=True,
    )


STAGES: dict[str, Callable[[BuildSettings], Stage]] = {
    "download": stage_download,
    "inspect": stage_inspect,
    "convert": stage_convert,
    "build": stage_build,
    "vision": stage_vision,
    "tokenizer-info": stage_tokenizer_info,
    "repository": stage_repository,
}
ALL = tuple(STAGES)


def run(names: list[str], s: BuildSettings, *, dry_run: bool = False, force: bool = False) -> dict[str, str]:
    """Run stages in order (see build_engine.stages)."""
    if dry_run:
        print(f"# settings\n{s.to_json()}")

    def maker(name: str) -> Callable[[], Stage]:
        return lambda: STAGES[name](s)

    return run_stages([maker(n) for n in names], dry_run=dry_run, force=force)
