"""Progress of long steps: a bar on a terminal, log lines everywhere else.

A bar drawn into a pipe or a log file is invisible until the step ends, so without a terminal
the step logs done/total and rate every few seconds instead (CI, nohup, docker logs).
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0


class Progress:
    """Counts the units of one step; `enabled=False` makes it silent (the CLI's --quiet)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "frame", enabled: bool = True,
                 interval_s: float = LOG_INTERVAL_S, tty: bool | None = None):
        self.desc, self.total, self.unit = desc, total, unit
        self.done = 0
        self._interval = interval_s
        self._start = self._last = time.monotonic()
        self._closed = False
        self._bar = None
        self._lines = False
        if enabled:
            if sys.stderr.isatty() if tty is None else tty:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
            else:
                self._lines = True

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines and time.monotonic() - self._last >= self._interval:
            self._last = time.monotonic()
            log.info("%s: %s", self.desc, self._status())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._lines:
            log.info("%s: %s, done in %.0f s", self.desc, self._status(), time.monotonic() - self._start)

    def _status(self) -> str:
        rate = self.done / max(time.monotonic() - self._start, 1e-9)
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"{count} {self.unit}s{pct}, {rate:.1f} {self.unit}s/s"

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
