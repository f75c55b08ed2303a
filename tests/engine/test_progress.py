"""Long steps report progress when nobody watches a terminal: CI logs, nohup, docker logs."""
from __future__ import annotations

import logging

from engine.progress import Progress


def test_without_a_terminal_progress_is_logged_with_done_total_and_rate(caplog):
    caplog.set_level(logging.INFO, logger="engine.progress")
    with Progress("reference frames", total=10, enabled=True, interval_s=0.0, tty=False) as bar:
        for _ in range(10):
            bar.update()
    lines = [r.getMessage() for r in caplog.records]
    assert "reference frames: 3/10 frames (30%)" in lines[2]
    assert lines[-1].startswith("reference frames: 10/10 frames (100%)") and "done in" in lines[-1]
    assert all("frames/s" in line for line in lines)


def test_lines_are_spaced_by_the_interval(caplog):
    caplog.set_level(logging.INFO, logger="engine.progress")
    with Progress("scoring", total=1000, interval_s=3600.0, tty=False) as bar:
        bar.update(1000)
    assert len(caplog.records) == 1  # only the closing line


def test_quiet_reports_nothing(caplog):
    caplog.set_level(logging.INFO, logger="engine.progress")
    with Progress("scoring", total=5, enabled=False, interval_s=0.0, tty=False) as bar:
        bar.update(5)
    assert not caplog.records
