"""One stage runner for both build targets: named stages with inputs, a stamp, a dry run and atomic output.

A stage's output is up to date when its stamp file holds the same inputs; then it is skipped. An `atomic`
stage builds into `<output>.partial` (each action's `call` receives that directory) and is renamed into
place only when every action succeeded, so an interrupted build never leaves a half-written output that
looks finished. A non-atomic stage's actions write their own outputs (an external tool with a fixed output
path, or an action that does its own `.partial` rename) and the stamp, written last, marks completion.
`dry_run` prints each action's command, files and preview and changes nothing.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def log(prefix: str, msg: str) -> None:
    print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Action:
    """One step of a stage: an external command (argv) or an in-process call, and what it writes.

    `call(directory)` gets the directory to write into: `<output>.partial` for atomic stages, the output
    itself otherwise.
    """

    description: str
    command: list[str] | None = None
    call: Callable[[Path], object] | None = None
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
    always: bool = False  # never skipped, never stamped (checks such as verify)
    atomic: bool = False
    stamp_name: str | None = None  # default: .build_engine-<name>.json
    log_prefix: str = "build_engine"

    @property
    def stamp(self) -> Path:
        return self.output / (self.stamp_name or f".build_engine-{self.name}.json")

    @property
    def partial(self) -> Path:
        return self.output.with_name(self.output.name + ".partial")

    def stamp_text(self) -> str:
        return json.dumps(self.inputs, indent=2, sort_keys=True, default=str)

    def up_to_date(self) -> bool:
        if self.always:
            return False
        try:
            return json.loads(self.stamp.read_text()) == json.loads(self.stamp_text())
        except (OSError, ValueError):
            return False


def run_command(argv: list[str], prefix: str = "build_engine") -> None:
    log(prefix, f"$ {shlex.join(argv)}")
    subprocess.run(argv, check=True)


def run_stage(stage: Stage, *, dry_run: bool = False, force: bool = False) -> str:
    """Run (or describe) one stage. Returns "skipped", "ran" or "planned"."""
    say = stage.log_prefix
    if not force and stage.up_to_date():
        log(say, f"{stage.name}: up to date ({stage.output})")
        if dry_run:
            print(f"[{stage.name}] up to date, would skip ({stage.stamp})")
        return "skipped"
    if dry_run:
        where = f"{stage.partial}, then renamed to {stage.output}" if stage.atomic else str(stage.output)
        print(f"[{stage.name}] would run → {where}")
        for action in stage.actions:
            print(action.show())
        if not stage.always:
            print(f"    writes {stage.stamp}")
        return "planned"
    t0 = time.monotonic()
    log(say, f"{stage.name}: running ({len(stage.actions)} step(s)) → {stage.output}")
    target = stage.partial if stage.atomic else stage.output
    if stage.atomic:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
    else:
        stage.stamp.unlink(missing_ok=True)
    for i, action in enumerate(stage.actions, 1):
        log(say, f"{stage.name} [{i}/{len(stage.actions)}] {action.description}")
        if action.call is not None:
            action.call(target)
        elif action.command is not None:
            run_command(action.command, say)
    target.mkdir(parents=True, exist_ok=True)
    if not stage.always:
        (target / stage.stamp.name).write_text(stage.stamp_text())
    if stage.atomic:
        shutil.rmtree(stage.output, ignore_errors=True)
        target.rename(stage.output)
    log(say, f"{stage.name}: done in {time.monotonic() - t0:.1f}s")
    return "ran"


def run_stages(
    makers: list[Callable[[], Stage]], *, dry_run: bool = False, force: bool = False
) -> dict[str, str]:
    """Run stages in order. Stages are made lazily so each sees its predecessors' outputs; in a dry run
    nothing upstream changes on disk, so once a stage would run, every later one would too."""
    results: dict[str, str] = {}
    for make in makers:
        stage = make()
        later_force = force or (dry_run and "planned" in results.values())
        results[stage.name] = run_stage(stage, dry_run=dry_run, force=later_force)
    return results
