"""tests/fixtures/skips.py: a skipped test fails the run unless it is marked gpu or optional(reason=...)."""

from __future__ import annotations

import pytest

MARKERS = """
[pytest]
markers =
    gpu: needs an NVIDIA GPU
    optional(reason): may skip
"""


def _run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makeini(MARKERS)
    pytester.makepyfile(test_sample=source)
    return pytester.runpytest_inprocess("-p", "tests.fixtures.skips", *args)


def test_a_plain_skip_fails_the_run(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
import pytest

def test_passes():
    pass

def test_skips():
    pytest.skip("no server")
""",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skips that make this run fail*", "*test_skips*no server*"])


def test_a_skip_in_a_fixture_fails_the_run(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
import pytest

@pytest.fixture
def server():
    pytest.skip("cannot start")

def test_uses(server):
    pass
""",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_an_import_time_skip_fails_the_run(pytester: pytest.Pytester) -> None:
    result = _run(pytester, "import pytest\nmissing = pytest.importorskip('no_such_module_here')\n")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skipped while collecting*"])


def test_gpu_and_explained_optional_skips_pass(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
import pytest

@pytest.mark.gpu
def test_gpu():
    pytest.skip("no GPU")

@pytest.mark.optional(reason="needs the curl CLI")
def test_curl():
    pytest.skip("curl not installed")

def test_passes():
    pass
""",
    )
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=2)


def test_optional_without_a_reason_fails_the_run(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
import pytest

@pytest.mark.optional
def test_vague():
    pytest.skip("whatever")
""",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*optional without a reason*"])


def test_deselected_is_not_skipped(pytester: pytest.Pytester) -> None:
    source = """
import pytest

@pytest.mark.slow
def test_would_skip():
    pytest.skip("not here")

def test_passes():
    pass
"""
    assert _run(pytester, source, "-k", "passes").ret == pytest.ExitCode.OK
    assert _run(pytester, source, "-m", "not slow").ret == pytest.ExitCode.OK


def test_a_skip_naming_an_e2e_target_reason_passes(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
import pytest

def test_remote_only():
    pytest.skip("local_covered: made locally by other tests")
""",
    )
    assert result.ret == pytest.ExitCode.OK


def test_an_unknown_reason_prefix_still_fails(pytester: pytest.Pytester) -> None:
    result = _run(pytester, "import pytest\n\ndef test_x():\n    pytest.skip('remote: something')\n")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
