"""One cycle of the chaos check (tests/chaos.py): engine kill -9, Redis kill -9 with a backlog,
and a frozen engine, with real processes; every sampled frame is published or counted dropped."""
import shutil

import pytest
from chaos import run_chaos


def test_engine_and_redis_crashes_lose_nothing_uncounted(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    rows = run_chaos(tmp_path, seconds=1, cameras=2, say=lambda line: None)
    total = rows[-1]
    assert total["published"] > 0
    assert total["dropped"].get("lost", 0) > 0  # the Redis crash took frames, and they were counted
    assert total["dropped"].get("engine_behind", 0) > 0  # the frozen engine made its cameras shed
    for row in rows:
        assert row["lost uncounted"] == 0, row
