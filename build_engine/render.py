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


def values_for(target: str, values: Mapping[str, str]) -> dict[str, str]:
    """The subset of a shared values dict that `target`'s templates use (e.g. the CPU values for the
    `cpu-fast-double` target, which has no vision encoder): `plan` rejects unused values on purpose."""
    used: set[str] = set()
    for src_name, _ in TARGET_MODELS[target]:
        used |= placeholders((TEMPLATES_DIR / src_name / "config.pbtxt").read_text())
    return {k: v for k, v in values.items() if k in used}


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
    return files


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
            # native/: C++ sources; build_engine/fast_double.py compiles them into the version directory
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "config.pbtxt", "native"),
        )
    for f in files:
        f.path.parent.mkdir(parents=True, exist_ok=True)
        f.path.write_text(f.text)
        # Triton needs a version directory even without code (the ensemble); git keeps no empty dirs.
        (f.path.parent / "1").mkdir(parents=True, exist_ok=True)
    return [f.path for f in files]
