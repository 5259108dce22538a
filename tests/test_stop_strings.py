"""Stop strings (gateway/stop_strings.py): hold-back of partial stops, false alarms, earliest stop."""

from __future__ import annotations

from gateway.stop_strings import StopMatcher


def test_stop_matcher_holds_back_partial_stops() -> None:
    m = StopMatcher(["END"])
    assert m.feed("Hello E") == "Hello "  # "E" might start "END"
    assert m.feed("N") == ""
    assert m.feed("Dgame") == ""
    assert m.stopped


def test_stop_matcher_releases_false_alarms_and_flushes() -> None:
    m = StopMatcher(["END", "\n\n"])
    assert m.feed("EN") == ""
    assert m.feed("x") == "ENx"
    assert m.feed("a\n") == "a"
    assert m.flush() == "\n"
    assert not m.stopped


def test_stop_matcher_earliest_stop_wins() -> None:
    m = StopMatcher(["world", "o"])
    assert m.feed("hello world") == "hell"


def test_stop_matcher_without_stops_is_transparent() -> None:
    m = StopMatcher([])
    assert m.feed("abc") == "abc" and m.flush() == ""
