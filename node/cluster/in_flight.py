"""A cap on the handler tasks one connection keeps in flight.

The transport runs each message as its own task (a FORWARD waits for compute, a GENERATE
for its whole generation) so that the socket keeps being read; without a cap, a peer that
sends faster than its messages finish grows the daemon's tasks and memory without end.
"""

from __future__ import annotations

from protocol.wire import MAX_PARTS

# A legitimate burst from one connection: a last stage answers a whole batch (up to MAX_PARTS
# requests) with one RESULT each, to one requester, in one go.
PER_CONNECTION = 2 * MAX_PARTS


class InFlight:
    """Tasks in flight per connection (its ROUTER identity), each admitted or not."""

    def __init__(self, cap: int = PER_CONNECTION) -> None:
        self.cap = cap
        self.counts: dict[bytes, int] = {}

    def take(self, who: bytes) -> bool:
        """Whether another task may run for `who`; counted if so (then `release` it)."""
        n = self.counts.get(who, 0)
        if n >= self.cap:
            return False
        self.counts[who] = n + 1
        return True

    def release(self, who: bytes) -> None:
        n = self.counts.pop(who, 0) - 1
        if n > 0:
            self.counts[who] = n
