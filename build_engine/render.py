"""Render the Triton model repository for a target from the templates in `model_repository/`.

Like tensorrtllm_backend's `fill_template.py`, each `config.pbtxt` is a `string.Template`; unlike it, an
unfilled `${...}` is an error (Triton would otherwise fail later, or worse, parse a literal placeholder)
and so is a value no template uses (a typo in a setting name must not pass silently).
"""

from __future__ import annotations

import re
import shutil
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = REPO_ROOT / "model_repository"
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")

# target -> (template directory, name in the rendered repository)
TARGET_MODELS: dict[str, tuple[tuple[str, str], ...]] = {
    "cpu": (
        ("preprocessing", "preprocessing"),
        ("vision_encoder", "vision_encoder"),
        ("tensorrt_llm_reference", "tensorrt_llm"),
        ("postprocessing", "postprocessing"),
        ("ensemble", "ensemble"),
    ),
    # TEST DOUBLE in place of the engine, for overhead/load measurement only (benchmarks/, `make bench`);
    # no vision encoder: image requests are not what it measures. Needs two extra values (its pacing).
    "cpu-fast-double": (
        ("preprocessing", "preprocessing"),
        ("tensorrt_llm_fast_double", "tensorrt_llm"),
        ("postprocessing", "postprocessing"),
        ("ensemble", "ensemble"),
    ),
    "gpu": (
        ("preprocessing", "preprocessing"),
        ("vision_encoder", "vision_encoder"),
        ("tensorrt_llm", "tensorrt_llm"),
        ("postprocessing", "postprocessing"),
        ("ensemble", "ensemble"),
    ),
}


class RenderError(ValueError):
    pass


@dataclass(frozen=True)
class RenderedFile:
    path: Path
    text: str


def placeholders(text: str) -> set[str]:
    return set(PLACEHOLDER.findall(text))


def fill(text: str, values: Mapping[str, str], *, where: str) -> str:
    missing = sorted(placeholders(text) - values.keys())
    if missing:
        raise RenderError(f"{where}: no value for {', '.join('${' + m + '}' for m in missing)}")
    return string.Template(text).substitute({k: str(v) for k, v in values.items()})


def plan(target: str, out_dir: Path, values: Mapping[str, str]) -> list[RenderedFile]:
    """Every config file the target's repository gets, filled; raises on any missing or unused value."""
    if target not in TARGET_MODELS:
        raise RenderError(f"unknown target {target!r}; choose one of {sorted(TARGET_MODELS)}")
    used: set[str] = set()
    files: list[RenderedFile] = []
    for src_name, dst_name in TARGET_MODELS[target]:
        template = (TEMPLATES_DIR / src_name / "config.pbtxt").read_text()
        used |= placeholders(template)
        text = fill(template, {**values, "model_name": dst_name}, where=f"{src_name}/config.pbtxt")
        files.append(RenderedFile(out_dir / dst_name / "config.pbtxt", text))
    unused = sorted(set(values) - used)
    if unused:
        raise RenderError(f"values not used by any {target} template: {', '.join(unused)}")
    ensemble = next((f for f in files if f.path.parent.name == "ensemble"), None)
    if ensemble is not None:
        files.append(
            RenderedFile(out_dir / IDS_ENSEMBLE / "config.pbtxt", derive_ids_ensemble(ensemble.text))
        )
    return files


IDS_ENSEMBLE = "ensemble_ids"


def derive_ids_ensemble(ensemble_text: str) -> str:
    """`ensemble_ids`: the ensemble without its postprocessing step, streaming token ids.

    The gateway detokenizes itself (gemma3_core.detokenize, incrementally), which saves a Python-backend
    hop per streamed token (measured ~90 µs/token, docs/benchmarks.md); `ensemble` stays the entry point
    for perf_analyzer, genai-perf and text clients. Derived through Triton's own schema so the two can
    never drift apart.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    cfg = text_format.Parse(ensemble_text, pb.ModelConfig())
    steps = cfg.ensemble_scheduling.step
    post = next(s for s in steps if s.model_name == "postprocessing")
    renamed = {
        post.input_map["TOKENS_BATCH"]: "output_ids",
        post.input_map["SEQUENCE_LENGTH"]: "sequence_length",
    }
    steps.remove(post)
    for step in steps:
        for key, tensor in list(step.output_map.items()):
            step.output_map[key] = renamed.get(tensor, tensor)
    kept = [o for o in cfg.output if o.name != "text_output"]
    del cfg.output[:]
    cfg.output.add(name="output_ids", data_type=pb.TYPE_INT32, dims=[-1, -1])
    cfg.output.add(name="sequence_length", data_type=pb.TYPE_INT32, dims=[-1])
    cfg.output.extend(kept)
    cfg.name = IDS_ENSEMBLE
    header = (
        "# Derived from ensemble/config.pbtxt by build_engine/render.py (derive_ids_ensemble): do not edit.\n"
    )
    return header + text_format.MessageToString(cfg)


def render(target: str, out_dir: Path, values: Mapping[str, str], *, dry_run: bool = False) -> list[Path]:
    """Write the repository (model code copied, configs filled) and return the written config paths."""
    files = plan(target, out_dir, values)
    if dry_run:
        for f in files:
            print(f"--- would write {f.path}\n{f.text}")
        return [f.path for f in files]
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for src_name, dst_name in TARGET_MODELS[target]:
        shutil.copytree(
            TEMPLATES_DIR / src_name,
            out_dir / dst_name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "config.pbtxt"),
        )
    for f in files:
        f.path.parent.mkdir(parents=True, exist_ok=True)
        f.path.write_text(f.text)
        # Triton needs a version directory even without code (the ensemble); git keeps no empty dirs.
        (f.path.parent / "1").mkdir(parents=True, exist_ok=True)
    return [f.path for f in files]
