"""Exponential backoff: the one rule for how long the monitor waits before trying again."""
from __future__ import annotations


class Backoff:
    """Delays that double from `start` up to `cap`; reset() once things work again."""

    def __init__(self, start: float, cap: float):
        self.start = float(start)
        self.cap = max(float(cap), self.start)
        self.delay = self.start  # the wait before the next try

    def next(self) -> float:
        """The wait before this try; the following one waits twice as long, up to the cap."""
        delay = self.delay
        self.delay = min(delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.start
