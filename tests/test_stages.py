"""The one stage runner both build targets use: stamps, atomic output, dry run."""

from __future__ import annotations

from pathlib import Path

import pytest

from build_engine.stages import Action, Stage, run_stage, run_stages


def _atomic(out: Path, inputs: dict[str, object], make: object) -> Stage:
    return Stage("demo", out, inputs, [Action("make", call=make, writes=[out])], atomic=True)  # type: ignore[arg-type]


def test_atomic_stage_builds_in_partial_then_renames(tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen: list[Path] = []

    def make(d: Path) -> None:
        seen.append(d)
        assert d.name == "out.partial" and d.is_dir()
        (d / "file.txt").write_text("v1")

    assert run_stage(_atomic(out, {"v": 1}, make)) == "ran"
    assert seen == [tmp_path / "out.partial"] and not seen[0].exists()
    assert (out / "file.txt").read_text() == "v1" and (out / ".build_engine-demo.json").exists()
    assert run_stage(_atomic(out, {"v": 1}, make)) == "skipped"
    assert run_stage(_atomic(out, {"v": 2}, make)) == "ran" and len(seen) == 2


def test_failed_atomic_stage_keeps_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_stage(_atomic(out, {"v": 1}, lambda d: (d / "file.txt").write_text("good")))

    def boom(d: Path) -> None:
        (d / "file.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        run_stage(_atomic(out, {"v": 2}, boom))
    assert (out / "file.txt").read_text() == "good"  # the old output is untouched ...
    assert run_stage(_atomic(out, {"v": 1}, boom)) == "skipped"  # ... and still valid for its inputs


def test_custom_stamp_name_and_json_equality(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".stamp.json").write_text('{"b": "2", "a": "1"}')  # a stamp written by older code, other key order
    stage = Stage("x", out, {"a": "1", "b": "2"}, [], atomic=True, stamp_name=".stamp.json")
    assert stage.up_to_date()


def test_dry_run_changes_nothing_and_plans_every_later_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "a"
    run_stage(_atomic(out, {"v": 1}, lambda d: None))
    makers = [
        lambda: Stage("first", tmp_path / "first", {}, [Action("one", command=["echo", "1"])]),
        lambda: _atomic(out, {"v": 1}, lambda d: None),  # up to date, but after a planned stage
    ]
    assert run_stages(makers, dry_run=True) == {"first": "planned", "demo": "planned"}
    text = capsys.readouterr().out
    assert "$ echo 1" in text and "a.partial, then renamed to" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_cpu_dry_run_prints_the_plan_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from build_engine.__main__ import main

    cache, out = tmp_path / "cache", tmp_path / "repo"
    assert main(["cpu", "--dry-run", f"--cache-dir={cache}", f"--out={out}"]) == 0
    text = capsys.readouterr().out
    for name in ("assemble GGUF", "convert to Hugging Face", "synthetic vision encoder"):
        assert f"[{name}] would run" in text, name
    assert f"{cache / 'hf' / 'gemma-3-270m.partial'}, then renamed to {cache / 'hf' / 'gemma-3-270m'}" in text
    assert "would write" in text and "config.pbtxt" in text
    assert not cache.exists() and not out.exists()
