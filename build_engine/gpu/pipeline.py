"""The GPU build as small named stages: each knows its inputs, outputs, commands and files, so a run can
skip stages whose output was made from the same inputs (a stamp file) and `--dry-run` can print all of it.

    download → inspect → convert → build → vision → tokenizer-info → repository      (`all`)
    verify (fidelity vs Hugging Face; not part of `all`, needs the engines and a GPU)
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from build_engine import render
from build_engine.gpu import build as gpu_build
from build_engine.gpu import checkpoint as ckpt
from build_engine.gpu import repository
from build_engine.gpu.settings import TRITON_IMAGE, BuildSettings
from gemma3_core import constants as C

STAMP_PREFIX = ".build_engine-"
TRTEXEC_FALLBACK = "/usr/src/tensorrt/bin/trtexec"


def log(msg: str) -> None:
    print(f"[build_engine gpu] {msg}", file=sys.stderr, flush=True)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _file_sha(path: Path) -> str:
    return _sha(path.read_bytes()) if path.exists() else "missing"


@dataclass
class Action:
    """One step of a stage: an external command (argv) or an in-process Python call, and what it writes."""

    description: str
    command: list[str] | None = None
    call: Callable[[], object] | None = None
    writes: list[Path] = field(default_factory=list)
    # For --dry-run: the content the step would write, when it is cheap to compute (rendered configs).
    preview: Callable[[], str] | None = None

    def show(self) -> str:
        lines = [f"    - {self.description}"]
        if self.command:
            lines.append(f"      $ {shlex.join(self.command)}")
        lines.extend(f"      writes {p}" for p in self.writes)
        if self.preview is not None:
            lines.append(self.preview())
        return "\n".join(lines)


@dataclass
class Stage:
    name: str
    output: Path
    inputs: dict[str, object]
    actions: list[Action]
    always: bool = False  # verify: never skipped

    @property
    def stamp(self) -> Path:
        return self.output / f"{STAMP_PREFIX}{self.name}.json"

    def stamp_text(self) -> str:
        return json.dumps(self.inputs, indent=2, sort_keys=True, default=str)

    def up_to_date(self) -> bool:
        if self.always:
            return False
        try:
            return self.stamp.read_text() == self.stamp_text()
        except OSError:
            return False


# --- stage definitions ------------------------------------------------------------------------------
def stage_download(s: BuildSettings) -> Stage:
    def call() -> None:
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

    def call() -> None:
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

    def call() -> None:
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

    onnx_path = s.vision_dir / "onnx" / vision_export.ONNX_FILE
    engine_path = s.vision_dir / vision.ENGINE_FILE
    max_batch = s.profile.vision_max_batch_size
    trtexec = vision_export.trtexec_command(
        onnx_path, engine_path, max_batch=max_batch, image_size=C.IMAGE_SIZE
    )
    state: dict[str, list[str]] = {}

    def export() -> None:
        enc = vision.Gemma3VisionEncoder.from_hf_checkpoint_dir(s.checkpoint_dir, llm_dtype=s.dtype)
        _, state["argv"] = vision_export.export_for_gpu(enc, s.vision_dir, max_batch=max_batch)

    def run_trtexec() -> None:
        argv = list(state.get("argv") or trtexec)
        # trtexec ships with TensorRT but is not always on PATH in the Triton image.
        if shutil.which(argv[0]) is None and Path(TRTEXEC_FALLBACK).exists():
            argv[0] = TRTEXEC_FALLBACK
        _run(argv)

    return Stage(
        "vision",
        s.vision_dir,
        {
            "checkpoint": ckpt.checkpoint_fingerprint(s.checkpoint_dir),
            "max_batch": max_batch,
            "dtype": s.dtype,
            "image": TRITON_IMAGE,
            "export_module": _file_sha(Path(vision_export.__file__)),
            "vision_module": _file_sha(Path(vision.__file__)),
        },
        [
            Action(
                "SigLIP + Gemma 3 projector (÷√hidden) → ONNX with a dynamic image batch, "
                "checked in onnxruntime",
                call=export,
                writes=[s.vision_dir / vision.CONFIG_FILE, s.vision_dir / vision.WEIGHTS_FILE, onnx_path],
            ),
            Action(
                "TensorRT engine for the vision encoder",
                command=trtexec,
                call=run_trtexec,
                writes=[engine_path],
            ),
        ],
    )


def stage_tokenizer_info(s: BuildSettings) -> Stage:
    out = s.tokenizer_info_dir / repository.XGRAMMAR_INFO_FILE

    def call() -> None:
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

    def call() -> None:
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


def _run(argv: list[str]) -> None:
    log(f"$ {shlex.join(argv)}")
    subprocess.run(argv, check=True)


def run_stage(stage: Stage, *, dry_run: bool = False, force: bool = False) -> str:
    """Run (or describe) one stage. Returns "skipped", "ran" or "planned"."""
    if not force and stage.up_to_date():
        log(f"{stage.name}: up to date ({stage.output})")
        if dry_run:
            print(f"[{stage.name}] up to date, would skip ({stage.stamp})")
        return "skipped"
    if dry_run:
        print(f"[{stage.name}] would run → {stage.output}")
        for action in stage.actions:
            print(action.show())
        print(f"    writes {stage.stamp}")
        return "planned"
    t0 = time.monotonic()
    log(f"{stage.name}: running ({len(stage.actions)} step(s)) → {stage.output}")
    stage.stamp.unlink(missing_ok=True)
    for i, action in enumerate(stage.actions, 1):
        log(f"{stage.name} [{i}/{len(stage.actions)}] {action.description}")
        if action.call is not None:
            action.call()
        elif action.command is not None:
            _run(action.command)
    stage.output.mkdir(parents=True, exist_ok=True)
    if not stage.always:
        stage.stamp.write_text(stage.stamp_text())
    log(f"{stage.name}: done in {time.monotonic() - t0:.1f}s")
    return "ran"


def run(names: list[str], s: BuildSettings, *, dry_run: bool = False, force: bool = False) -> dict[str, str]:
    """Run stages in order. Stage definitions are made lazily so each sees its predecessors' outputs."""
    if dry_run:
        print(f"# settings\n{s.to_json()}")
    results: dict[str, str] = {}
    for name in names:
        stage = STAGES[name](s)
        # In a dry run nothing upstream changes on disk, so once a stage would run, every later one would too.
        later_force = force or (dry_run and "planned" in results.values())
        results[name] = run_stage(stage, dry_run=dry_run, force=later_force)
    return results
