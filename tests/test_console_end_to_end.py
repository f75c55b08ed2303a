"""The operator's loop end to end: `spade-monitor run` replays a clip with the console on; a
real browser sees the camera live, opens the event, sees its evidence and marks it "not an
anomaly"; the bank gets a new version, and the engine, having reloaded it, no longer flags
those frames when the clip comes round again."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from test_console_browser import _wait_for

from engine.bank import ReferenceBank
from engine.datasets import iter_video_frames
from engine.versions import BankHistory

FPS = 5


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _http(url: str, data: bytes | None = None, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0  # not listening (yet)


def _config(tmp_path: Path, video: Path, bank: Path, port: int) -> Path:
    text = f"""
cameras:
  cam: {{source: {video}, scene: plaza, fps: {FPS}, loop: true, realtime: true}}
scenes:
  plaza: {{bank: {bank}}}
engine: {{device: cpu, max_batch: 4, threads: 1}}
events: {{open_after: 2, window: 3, close_after: 3}}  # the clip's normal stretch is short: let events end
outputs: {{dir: {tmp_path / "out"}}}
metrics: {{port: 0}}
console: {{enabled: true, port: {port}}}
"""
    path = tmp_path / "monitor.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def browser():
    from test_console_browser import browser as make  # the same headless Chromium, never downloaded

    yield from make.__wrapped__()


@pytest.mark.slow
def test_not_an_anomaly_in_the_browser_changes_the_bank_and_the_engine_stops_flagging(
        scene, scene_bank, tmp_path, browser):
    from selenium.webdriver.common.by import By

    bank = tmp_path / "plaza.bank"
    shutil.copyfile(scene_bank, bank)
    video = scene.test_videos[0]
    loop_s = sum(1 for _ in iter_video_frames(video)) / scene.fps
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", "run", "--config",
                             str(_config(tmp_path, video, bank, port))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert _wait_for(lambda: _http(base + "/") == 200, timeout=60), "the console never came up"
        browser.get(base + "/")
        tile = browser.find_element(By.ID, "tile-cam")
        assert _wait_for(lambda: tile.find_element(By.CSS_SELECTOR, ".status").text.startswith("online"), 30)
        assert _wait_for(lambda: tile.find_element(By.CSS_SELECTOR, ".fps").text != "0.0 fps", 10)
        row = _wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#latest-events .event-row"), 60)
        assert row, "no event reached the open page"
        event_id = row[0].get_attribute("data-event-id")

        # Review it once it has ended, so every flagged frame of it is marked.
        def ended():
            browser.get(f"{base}/events/{event_id}")
            return browser.find_element(By.ID, "event-state").text == "ended"
        assert _wait_for(ended, timeout=30, interval=1.0)
        for image in ("evidence-frame", "evidence-reference"):
            assert browser.execute_script("return arguments[0].naturalWidth", browser.find_element(By.ID, image)) > 0

        # A state change without the form's CSRF token is refused.
        assert _http(f"{base}/events/{event_id}/feedback", data=b"label=not_anomaly") == 403
        assert BankHistory(bank).current() == 1

        browser.find_element(By.ID, "not-anomaly-button").click()
        outcome = _wait_for(lambda: browser.find_elements(By.ID, "outcome"), timeout=120, interval=0.5)
        assert outcome, "no outcome shown"
        marked_at = time.time()
        assert browser.find_element(By.ID, "version-before").text == "1"
        assert browser.find_element(By.ID, "version-after").text == "2"
        after = browser.find_elements(By.CSS_SELECTOR, "#outcome tbody td:nth-child(3)")
        assert after and all("under" in td.get_attribute("class").split() for td in after)  # each below tau
        assert BankHistory(bank).current() == 2

        # Where the clip comes round again after the engine reloaded the bank, those frames pass:
        # those whose smoothing window (the frame and the ones before it) lies within the marked ones.
        marked = {int(td.text) for td in browser.find_elements(By.CSS_SELECTOR, "#outcome tbody td:nth-child(1)")}
        window = ReferenceBank.load(bank).stored_config.get("temporal_window", 1)
        results = {r["seq"]: r for r in _lines(out / "results.jsonl")}
        positions = {round((results[s]["source_ts"] % loop_s) * FPS) for s in marked
                     if all(s - k in marked for k in range(window))}
        assert positions

        def replayed():
            later = [r for r in _lines(out / "results.jsonl") if r["published_ts"] > marked_at + 6
                     and round((r["source_ts"] % loop_s) * FPS) in positions]
            return later if len(later) >= len(positions) else None
        later = _wait_for(replayed, timeout=3 * loop_s + 20, interval=1.0)
        assert later, "the marked frames did not come round again"
        still_flagged = [r["seq"] for r in later if r["flagged"]]
        assert not still_flagged, (still_flagged, len(later))
    finally:
        proc.terminate()
        output = proc.communicate(timeout=60)[0]
    assert "Traceback" not in output, output[-3000:]
    assert "password" not in output.lower()


def test_the_console_off_loopback_needs_credentials_and_refuses_anonymous_requests(scene, scene_bank, tmp_path):
    port = free_port()
    config = _config(tmp_path, scene.test_videos[0], scene_bank, port)
    (tmp_path / "out").mkdir()
    cmd = [sys.executable, "-m", "monitor.cli", "console", "--config", str(config), "--address", "0.0.0.0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPADE_CONSOLE_")}
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "SPADE_CONSOLE_USER" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1

    env.update(SPADE_CONSOLE_USER="ops", SPADE_CONSOLE_PASSWORD="s3cret-pass")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        assert _wait_for(lambda: _http(base + "/") == 401, timeout=60)
        import base64

        good = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret-pass").decode()}
        wrong = {"Authorization": "Basic " + base64.b64encode(b"ops:guess").decode()}
        assert _http(base + "/", headers=good) == 200 and _http(base + "/events", headers=wrong) == 401
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "s3cret-pass" not in output and "Traceback" not in output
