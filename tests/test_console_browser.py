"""The operator's console in a real browser (headless Chromium through Selenium): live updates
without reload, the evidence images, and a review click.

Also home of the helpers that write a realistic output folder (OutputFolder) and a fake
feedback service (FakeFeedback), shared with tests/monitor/test_console.py.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from monitor.events import Event

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
RUN = "0123abcd4567ef89"


def jpeg_bytes(size=(96, 128), value=90) -> bytes:
    """A small JPEG (height, width) with a bright square, so its natural size is known."""
    image = np.full((*size, 3), value, np.uint8)
    image[size[0] // 4: size[0] // 2, size[1] // 4: size[1] // 2] = 230
    ok, buf = cv2.imencode(".jpg", image)
    assert ok
    return buf.tobytes()


class OutputFolder:
    """Writes outputs.dir as monitor/publish.py's DirectoryPublisher does: JSON Lines, JPEGs."""

    def __init__(self, root: Path, run_id: str = RUN):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id

    def append(self, name: str, records: list[dict]) -> None:
        with (self.root / name).open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in records))

    def image(self, ref: str, size=(96, 128)) -> str:
        path = self.root / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(size))
        return ref

    def result(self, camera: str, seq: int, *, score: float = 0.5, tau: float = 1.0, scene: str = "lobby",
               ts: float | None = None, media: bool = False, dropped: int = 0, write: bool = True) -> dict:
        ts = time.time() if ts is None else ts
        flagged = score > tau
        name = f"{self.run_id[:8]}-{seq}"
        record = {
            "camera": camera, "run_id": self.run_id, "seq": seq, "source_ts": seq / 5.0, "capture_ts": ts,
            "published_ts": ts + 0.05, "scene": scene, "image_score": score, "tau": tau, "flagged": flagged,
            "escalated": flagged, "max_pixel_score": score * 2 if flagged else None, "theta": 0.8,
            "anomalous_area": 0.01 if flagged else None, "boxes": [[32, 24, 32, 24]] if flagged else [],
            "overlay_ref": None, "late": False, "dropped": dropped, "frame_ref": None, "previous_ref": None,
            "evidence": None,
        }
        if media:
            record["overlay_ref"] = self.image(f"overlays/{camera}/{name}.jpg")
            record["frame_ref"] = self.image(f"frames/{camera}/{name}.jpg")
            record["previous_ref"] = self.image(f"frames/{camera}/{name}-prev.jpg")
            record["evidence"] = {"ref_index": 3, "ref_box": [40, 16, 16, 16], "box": [32, 24, 16, 16],
                                  "distance": 1.75, "level": "s8", "bank_version": 1}
        if write:
            self.append("results.jsonl", [record])
        return record

    def event(self, camera: str, start_seq: int, kind: str = "start", *, end_seq: int | None = None,
              peak_seq: int | None = None, peak_score: float = 2.0, start_ts: float | None = None,
              frames: int = 3, write: bool = True) -> dict:
        start_ts = time.time() if start_ts is None else start_ts
        peak_seq = start_seq if peak_seq is None else peak_seq
        ended = kind == "end"
        record = Event(event_id=f"{camera}-{self.run_id[:8]}-{start_seq}", camera=camera, kind=kind,
                       start_seq=start_seq, start_ts=start_ts, end_seq=end_seq if ended else None,
                       end_ts=start_ts + 2.0 if ended else None, peak_score=peak_score, peak_seq=peak_seq,
                       duration_s=2.0, frames_flagged=frames,
                       best_overlay_ref=f"overlays/{camera}/{self.run_id[:8]}-{peak_seq}.jpg").to_json()
        if write:
            self.append("events.jsonl", [record])
        return record

    def status(self, camera: str, status: str, detail: str = "", ts: float | None = None) -> None:
        self.append("status.jsonl", [{"camera": camera, "status": status, "detail": detail,
                                      "ts": time.time() if ts is None else ts}])

    def camera_with_event(self, camera: str, *, n: int = 40, flagged: range = range(20, 30), fps: float = 5.0,
                          now: float | None = None, scene: str = "lobby", close: bool = True) -> str:
        """n results at `fps` ending now, the `flagged` ones with media, and their event; its id."""
        now = time.time() if now is None else now
        records = []
        for seq in range(n):
            hot = seq in flagged
            records.append(self.result(camera, seq, score=2.0 + seq / 100 if hot else 0.4, scene=scene,
                                       ts=now - (n - seq) / fps, media=hot, write=False))
        self.append("results.jsonl", records)
        start, peak = flagged[0], flagged[-1]
        start_ts = records[start]["capture_ts"]
        self.event(camera, start, "start", peak_seq=start, peak_score=records[start]["image_score"], start_ts=start_ts)
        if close:
            self.event(camera, start, "end", end_seq=flagged[-1], peak_seq=peak,
                       peak_score=records[peak]["image_score"], start_ts=start_ts, frames=len(flagged))
        self.status(camera, "online", ts=now - n / fps)
        return f"{camera}-{self.run_id[:8]}-{start}"


class FakeFeedback:
    """Stands in for the bank-feedback service: records calls, answers like the real one."""

    def __init__(self, fail_with: Exception | None = None):
        self.calls: list[tuple[str, dict, list[dict], str]] = []
        self.version = 1
        self.fail_with = fail_with

    def not_anomaly(self, event: dict, results: list[dict], user: str) -> dict:
        self.calls.append(("not_anomaly", event, results, user))
        if self.fail_with is not None:
            raise self.fail_with
        before = self.version
        self.version += 1
        return {"version_before": before, "version_after": self.version, "tau_before": 1.0, "tau": 1.1,
                "before": [{"seq": r["seq"], "score": r["image_score"]} for r in results],
                "after": [{"seq": r["seq"], "score": 0.4} for r in results]}

    def confirm(self, event: dict, results: list[dict], user: str) -> dict:
        self.calls.append(("confirmed", event, results, user))
        return {"version_before": self.version, "version_after": self.version, "tau": 1.0}

    def reference_image(self, scene: str, ref_index: int) -> bytes:
        if ref_index > 100:
            raise IndexError(f"bank of {scene} has no frame {ref_index}")
        return jpeg_bytes((96, 128), value=60)


# --- the browser test ------------------------------------------------------------------------------

@pytest.fixture
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(f"browser test needs Debian's chromium and chromium-driver: {', '.join(missing)} not found")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager (which downloads) never runs.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(condition, timeout: float = 3.0, interval: float = 0.05):
    """condition()'s first true value, or its last value at the timeout. An element that went
    stale (the page navigated, e.g. a form's redirect, between finding it and reading it) is
    looked up again on the next try."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(interval)


def _csp_complaints(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")
            if "Content Security Policy" in entry["message"] or "Refused" in entry["message"]]


def test_console_in_a_browser_updates_live_and_records_a_review(tmp_path, browser):
    from selenium.webdriver.common.by import By

    from monitor.console.app import create_app
    from monitor.console.service import start_in_thread
    from monitor.console.store import FolderStore

    folder = OutputFolder(tmp_path / "out")
    event_id = folder.camera_with_event("cam1")
    folder.status("cam2", "reconnecting", "camera unreachable")
    feedback = FakeFeedback()
    app = create_app(FolderStore(folder.root), cameras={"cam1": "lobby", "cam2": "lobby"}, feedback=feedback)
    port = _free_port()
    server, thread = start_in_thread(app, "127.0.0.1", port)
    base = f"http://127.0.0.1:{port}"
    try:
        browser.get(base + "/")
        assert browser.find_element(By.ID, "tile-cam1").find_element(By.CSS_SELECTOR, ".status").text.startswith("online")
        tile2 = browser.find_element(By.ID, "tile-cam2")
        assert "down" in tile2.get_attribute("class").split()
        assert _wait_for(lambda: browser.find_element(By.ID, "stream-state").text == "live"), "stream never opened"
        browser.execute_script("window.__notReloaded = true;")

        # cam2 comes back: results at 5 fps and a new event, appended while the page is open.
        now = time.time()
        folder.status("cam2", "online")
        folder.append("results.jsonl", [folder.result("cam2", seq, score=2.5 if seq >= 5 else 0.3,
                                                      ts=now - (10 - seq) / 5, write=False) for seq in range(10)])
        new_event = folder.event("cam2", 5, "start", start_ts=now)["event_id"]
        started = time.monotonic()
        row = _wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, f'#latest-events .event-row[data-event-id="{new_event}"]'))
        assert row, "the new event did not appear without a reload"
        assert _wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#tile-cam2 .fps").text != "0.0 fps")
        assert _wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#tile-cam2 .status").text.startswith("online"))
        assert _wait_for(lambda: "down" not in browser.find_element(By.ID, "tile-cam2").get_attribute("class").split())
        print(f"\nlive update reached the page in {time.monotonic() - started:.2f} s")
        assert browser.execute_script("return window.__notReloaded === true;")
        assert browser.find_element(By.CSS_SELECTOR, "#latest-events .event-row").get_attribute("data-event-id") == new_event

        # The event page: evidence images load; "Confirmed" records the label.
        browser.get(f"{base}/events/{event_id}")
        for image_id in ("evidence-frame", "evidence-reference"):
            width = _wait_for(lambda: browser.execute_script(
                "const i = document.getElementById(arguments[0]); return i.complete && i.naturalWidth;", image_id))
            assert width and width > 0, f"{image_id} did not load"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#filmstrip img")) == 10
        assert browser.find_elements(By.CSS_SELECTOR, "#timeline polyline")
        browser.find_element(By.ID, "confirm-button").click()
        assert _wait_for(lambda: browser.find_element(By.ID, "review-state").text == "confirmed")
        assert [call[0] for call in feedback.calls] == ["confirmed"]
        assert [r["seq"] for r in feedback.calls[0][2]] == list(range(20, 30))
        assert _csp_complaints(browser) == []
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()
