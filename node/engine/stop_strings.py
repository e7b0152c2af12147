"""Stop strings: text that ends a generation, cut from what the client sees.

Text streams out piece by piece, and a stop string may span pieces, so text that could
still become the start of one is held back until the next piece says whether it did.
"""

from __future__ import annotations


class StopStrings:
    """Feed generated text with `push`; it returns what may be shown now. `hit` turns true
    once a stop string appears: the text before it was returned, the rest is dropped."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False
        self.which = ""  # the stop string that was hit

    def push(self, piece: str) -> str:
        if self.hit or not self.stops:
            return "" if self.hit else piece
        text = self.held + piece
        found = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if found:
            cut, self.which = min(found)
            self.hit, self.held = True, ""
            return text[:cut]
        keep = max((overlap(text, s) for s in self.stops), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back, once generation ended without a stop string."""
        text, self.held = self.held, ""
        return text


def overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that begins `stop` (shorter than `stop`)."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
