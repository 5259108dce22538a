"""Text-level stop strings with OpenAI semantics: the stop sequence and everything after it are not returned.

The engine also stops on the stop words' token ids, but a stop string can end up inside a token (or
across a token boundary the engine's id match does not see), so the gateway matches the text itself.
While streaming it holds back a tail that could still become a stop string, so a stop sequence never
reaches the client in pieces.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add generated text; return what can be sent now. Sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        keep = self._partial_suffix(buffer)
        cut = self._first_stop(buffer)
        # A stop found, unless a longer one that starts earlier may still complete (stops "a" and " aa" on
        # " a"): then wait for more text, so the cut is where the whole text's earliest stop starts,
        # whatever the chunking.
        if cut >= 0 and (keep == 0 or len(buffer) - keep >= cut):
            self.stopped = True
            self._held = ""
            return buffer[:cut]
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """The held-back tail at the end of generation, cut at a stop string it holds."""
        held, self._held = self._held, ""
        if self.stopped:
            return ""
        cut = self._first_stop(held)
        self.stopped = cut >= 0
        return held[:cut] if cut >= 0 else held

    def _first_stop(self, buffer: str) -> int:
        return min((i for i in (buffer.find(s) for s in self._stops) if i >= 0), default=-1)

    def _partial_suffix(self, buffer: str) -> int:
        # Longest buffer suffix that is a proper prefix of some stop string.
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:k]):
                    best = k
                    break
        return best
