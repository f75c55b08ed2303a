"""Frames that vanished without being counted: the engine's side of "nothing lost silently".

A camera's ingest run numbers its sampled frames 0, 1, 2... and the bus stamps each frame with
how many earlier frames of the run it dropped and counted (Frame.dropped_before). So among the
seqs from the first to the highest this engine has seen, every one is seen, counted as dropped,
or missing: the shortfall. A missing frame is in flight (pending at a dead engine, to be
claimed), shed after the frames that carry the count were stamped (under overload; it is counted
already), or lost (Redis died with it).

Only a Redis that lost data loses frames, and the bus notices that (a new run id, a vanished
group) and says since when. So the ledger keeps each run's shortfall over time, and when told
of a loss, counts as lost what the shortfall grew by from just before the loss to `grace_s`
later (time for claims to arrive). Whatever the shortfall held before, in flight or shed, is
left out.

What it cannot see: frames lost after the last one that arrives; frames another engine scores
(one camera, one engine); a loss during overload may be mis-counted by the frames shed around
it; a FLUSHALL that ingest notices before the engine does. A corrupt entry, whose seq is
unreadable, is counted as corrupt.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

RECENT_SEQS = 8192  # seqs remembered per run, so a frame delivered twice is counted once
HISTORY_EVERY_S = 1.0  # one shortfall sample a second...
HISTORY_SAMPLES = 600  # ...for ten minutes: longer than a loss takes to be noticed


@dataclass
class _Run:
    low: int  # the lowest seq seen
    low_dropped: int  # its stamp: drops before it, which the range does not cover
    top: int  # the highest seq seen
    dropped: int  # the highest stamp seen
    last_seen: float
    seen: int = 1
    lost: int = 0
    recent: dict = field(default_factory=dict)  # the last RECENT_SEQS seqs seen, oldest first
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY_SAMPLES))  # (time, shortfall)

    def shortfall(self) -> int:
        return (self.top - self.low + 1) - self.seen - (self.dropped - self.low_dropped) - self.lost

    def shortfall_at(self, when: float) -> int:
        """The shortfall as last sampled at or before `when` (0 before the run was seen)."""
        before = [short for t, short in self.history if t <= when]
        return before[-1] if before else 0


class SeqLedger:
    """Per camera run: which frames arrived; settle() says how many more are now lost."""

    def __init__(self, grace_s: float):
        self.grace_s = float(grace_s)
        self._runs: dict[tuple[str, str], _Run] = {}
        self._loss: tuple[float, float] | None = None  # (intact until, count at) of a loss not yet counted

    def note_data_loss(self, intact_until: float, now: float) -> bool:
        """Redis lost what it held after `intact_until` (a time of the `now` clock). False when
        this merges with a loss not yet counted (the same one noticed twice, or a second one)."""
        if self._loss is None:
            self._loss = (intact_until, now + self.grace_s)
            return True
        self._loss = (min(self._loss[0], intact_until), max(self._loss[1], now + self.grace_s))
        return False

    def observe(self, camera: str, run_id: str, seq: int, dropped_before: int, now: float) -> None:
        """A frame that has a result: published now, or found published already (a re-delivery)."""
        run = self._runs.get((camera, run_id))
        if run is None:
            run = self._runs[(camera, run_id)] = _Run(seq, dropped_before, seq, dropped_before, now)
            run.recent[seq] = None
            return
        if seq in run.recent:
            return
        run.recent[seq] = None
        if len(run.recent) > RECENT_SEQS:
            del run.recent[next(iter(run.recent))]
        run.seen += 1
        run.last_seen = now
        if seq < run.low:  # a late frame from before this engine's first: widen the range
            run.low, run.low_dropped = seq, dropped_before
        run.top = max(run.top, seq)
        run.dropped = max(run.dropped, dropped_before)

    def settle(self, now: float, final: bool = False) -> list[tuple[str, int]]:
        """(camera, newly lost frames), once a noted loss is grace_s old (at once if final).

        Runs not heard from for ten minutes are forgotten: their camera restarted or left."""
        out = []
        loss = self._loss
        count = loss is not None and (final or now >= loss[1])
        for key, run in list(self._runs.items()):
            short = run.shortfall()
            if count and loss is not None:
                grown = short - run.shortfall_at(loss[0])
                if grown > 0:
                    run.lost += grown
                    short -= grown
                    out.append((key[0], grown))
            if not run.history or now - run.history[-1][0] >= HISTORY_EVERY_S:
                run.history.append((now, short))
            if now - run.last_seen > HISTORY_EVERY_S * HISTORY_SAMPLES:
                del self._runs[key]
        if count:
            self._loss = None
        return out
