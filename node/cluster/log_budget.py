"""A budget of log lines: a flood of bad frames must not fill a disk or drown the log."""

from __future__ import annotations


class LogBudget:
    """At most `burst` lines per `window_s`; what is held back is counted and reported as
    one line when the next window opens."""

    def __init__(self, burst: int = 20, window_s: float = 10.0) -> None:
        self.burst, self.window_s = burst, window_s
        self.opened = float("-inf")
        self.used = self.held = 0

    def take(self, now: float) -> tuple[bool, int]:
        """(whether to log this line, how many lines were held back in the closed window)."""
        held = 0
        if now - self.opened >= self.window_s:
            held, self.opened, self.used, self.held = self.held, now, 0, 0
        self.used += 1
        if self.used > self.burst:
            self.held += 1
            return False, held
        return True, held
