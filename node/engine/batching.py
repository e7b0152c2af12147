"""Continuous batching: which waiting steps a stage runs together in its next forward pass.

Decoding reads every weight once per step whatever the rows, so a stage runs the decode
steps of all its requests as one batch; requests join and leave it between steps. A long
prompt would hold that batch up for its whole prefill, so it goes in chunks: each pass takes
at most `chunk` prompt positions next to the decodes. The decision is a pure function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocol.wire import Piece

if TYPE_CHECKING:  # the CLI reads PREFILL_CHUNK without importing torch
    import torch

PREFILL_CHUNK = 256  # prompt positions a stage computes a pass, by default (--prefill-chunk)


@dataclass(frozen=True)
class Work:
    """A request's positions waiting at a stage, as a FORWARD's piece brought them."""

    piece: Piece
    x: torch.Tensor  # token ids [count] or hidden states [count, dim]
    epoch: int

    @property
    def req(self) -> str:
        return self.piece.req

    @property
    def count(self) -> int:
        return self.piece.count

    def split(self, n: int) -> tuple[Work, Work]:
        """The first n positions, and the rest (which waits for a later pass); the fields
        that open a request go with the first."""
        p = self.piece
        head = Work(dataclasses.replace(p, count=n), self.x[:n], self.epoch)
        rest = dataclasses.replace(
            p, start=p.start + n, count=p.count - n, body={"requester": p.requester}
        )
        return head, Work(rest, self.x[n:], self.epoch)


def next_batch(waiting: list[Work], chunk: int) -> tuple[list[Work], list[Work]]:
    """(what runs in the next pass, what keeps waiting, in arrival order).

    Every waiting one-position step runs; prompt positions fill up to `chunk` in arrival
    order, the last prompt taken cut to fit. A request runs at most once a pass: a later
    chunk of it waits for the earlier one.
    """
    batch: list[Work] = []
    rest: list[Work] = []
    taken: set[str] = set()
    budget = chunk
    for w in waiting:
        if w.req in taken:
            rest.append(w)
        elif w.count == 1:
            batch.append(w)
        elif w.count <= budget:
            batch.append(w)
            budget -= w.count
        elif budget > 0:
            head, tail = w.split(budget)
            batch.append(head)
            rest.append(tail)
            budget = 0
        else:
            rest.append(w)
        taken.add(w.req)
    return batch, rest
