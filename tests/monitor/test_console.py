"""The operator's console: FolderStore's tailing, bounds and media checks; the web app's pages,
review feedback, CSRF, auth, escaping and speed (FastAPI's TestClient; the live stream over a
real loopback server). The browser test is tests/test_console_browser.py."""
from __future__ import annotations

import base64
import json
import os
import re
import statistics
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from test_console_browser import FakeFeedback, OutputFolder, jpeg_bytes

from engine.errors import ConfigError
from monitor.console.app import create_app
from monitor.console.security import console_auth_from_env
from monitor.console.service import start_in_thread
from monitor.console.store import FolderStore
from monitor.console.views import jpeg_size


@pytest.fixture
def folder(tmp_path) -> OutputFolder:
    return OutputFolder(tmp_path / "out")


def _client(folder: OutputFolder, cameras=None, **kwargs) -> tuple[TestClient, FolderStore]:
    store = FolderStore(folder.root)
    store.poll()
    app = create_app(store, cameras=cameras or {}, **kwargs)
    return TestClient(app, follow_redirects=False), store


def _csrf(client: TestClient, url: str) -> str:
    """The form token of a page (and, in the client's jar, its cookie)."""
    page = client.get(url)
    assert page.status_code == 200, page.text
    return re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text).group(1)


# --- the store ------------------------------------------------------------------------------------

def test_tailing_reads_appended_lines_and_a_half_written_line_only_once_complete(folder):
    store = FolderStore(folder.root)
    assert store.poll() is False  # no file yet: nothing, no error
    first = folder.result("cam1", 0, write=False)
    second = folder.result("cam1", 1, write=False)
    line = json.dumps(second) + "\n"
    with (folder.root / "results.jsonl").open("a") as handle:
        handle.write(json.dumps(first) + "\n" + line[:25])
    assert store.poll() is True
    assert store.tile("cam1")["seq"] == 0
    with (folder.root / "results.jsonl").open("a") as handle:
        handle.write(line[25:])
    assert store.poll() is True
    assert store.tile("cam1")["seq"] == 1
    assert store.poll() is False  # nothing new: no re-read
    assert [p.seq for p in store._cameras["cam1"].ring] == [0, 1]

    # A line an interrupted writer left without its end (the publisher ends it on reopen) is skipped.
    with (folder.root / "results.jsonl").open("a") as handle:
        handle.write('{"camera": "cam1", "seq": 2, "ima\n')
    folder.result("cam1", 3)
    store.poll()
    assert [p.seq for p in store._cameras["cam1"].ring] == [0, 1, 3]


def test_a_long_results_file_is_read_from_its_recent_end(folder):
    folder.append("results.jsonl", [folder.result("cam1", seq, write=False) for seq in range(100)])
    line_bytes = (folder.root / "results.jsonl").stat().st_size // 100
    store = FolderStore(folder.root, results_backlog_bytes=int(line_bytes * 10.5))
    store.poll()
    assert [p.seq for p in store._cameras["cam1"].ring] == list(range(90, 100))  # from a line start
    folder.result("cam1", 100)
    store.poll()
    assert store.tile("cam1")["seq"] == 100


def test_store_keeps_status_fps_drops_and_event_state(folder):
    now = time.time()
    folder.status("cam1", "online", ts=now - 120)
    folder.status("cam1", "online", ts=now - 1)  # a heartbeat does not move "since"
    for seq in range(20):
        folder.result("cam1", seq, ts=now - (20 - seq) * 0.2, dropped=seq // 5)
    event_id = folder.event("cam1", 12)["event_id"]
    store = FolderStore(folder.root, clock=lambda: now)
    store.poll()
    tile = store.tile("cam1")
    assert tile["status"] == "online" and tile["status_since"] == pytest.approx(now - 120)
    assert tile["fps"] == pytest.approx(5.0, rel=0.01)
    assert tile["drops"] == 3
    assert not tile["down"]
    assert tile["last_event"]["event_id"] == event_id and tile["last_event"]["open"]
    folder.event("cam1", 12, "end", end_seq=14)
    store.poll()
    assert store.event(event_id)["open"] is False
    assert store.query_events()[0] == 1  # several records, one event

    later = FolderStore(folder.root, clock=lambda: now + 60)
    later.poll()
    assert later.tile("cam1")["down"] and later.tile("cam1")["fps"] == 0.0  # no result for a minute


def test_media_path_serves_only_published_jpegs_inside_the_folder(folder, tmp_path):
    record = folder.result("cam1", 7, score=2.0, media=True)
    store = FolderStore(folder.root)
    assert store.media_path(record["overlay_ref"]) == (folder.root / record["overlay_ref"]).resolve()
    assert store.media_path(record["previous_ref"]) is not None
    folder.image("overlays/cam1/12.jpg")  # the older name, without the run
    assert store.media_path("overlays/cam1/12.jpg") is not None

    outside = tmp_path / "secret.jpg"
    outside.write_bytes(jpeg_bytes())
    (folder.root / "overlays" / "cam1" / "99.jpg").symlink_to(outside)
    (folder.root / "notes.jpg").write_bytes(jpeg_bytes())
    refused = ["../secret.jpg", "overlays/../secret.jpg", "overlays/cam1/../../../secret.jpg", str(outside),
               "/overlays/cam1/12.jpg", "overlays/cam1/99.jpg", "overlays/bad name/1.jpg", "overlays/..cam/1.jpg",
               "overlays/.hidden/1.jpg", "overlays/cam1/12.png", "overlays/cam1/12.jpg.txt", "notes.jpg",
               "results.jsonl", "other/cam1/12.jpg", "overlays/cam1/sub/12.jpg", "overlays/cam1/404.jpg",
               "overlays/cam1/１２.jpg", "overlays/cam1/12.jpg\n", None, 12]
    for ref in refused:
        assert store.media_path(ref) is None, ref

    client, _ = _client(folder)
    ok = client.get("/media/" + record["frame_ref"])
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"
    assert jpeg_size(ok.content) == (128, 96)
    for ref in ("overlays/cam1/99.jpg", "..%2Fsecret.jpg", "overlays/cam1/..%2F..%2F..%2Fsecret.jpg", "notes.jpg"):
        assert client.get("/media/" + ref).status_code == 404, ref


def test_labels_are_written_once_and_give_the_review_state(folder):
    event_id = folder.camera_with_event("cam1")
    store = FolderStore(folder.root)
    store.poll()
    assert store.event(event_id)["review"] == "unreviewed"
    store.add_label({"event_id": event_id, "camera": "cam1", "label": "not_anomaly", "user": "ana",
                     "outcome": {"score": float("nan")}})
    assert store.event(event_id)["review"] == "not_anomaly"
    assert len(store.event(event_id)["labels"]) == 1
    store.poll()
    assert len(store.event(event_id)["labels"]) == 1  # the tail does not apply it twice
    reopened = FolderStore(folder.root)
    reopened.poll()
    assert reopened.event(event_id)["review"] == "not_anomaly"
    with pytest.raises(ValueError):
        store.add_label({"event_id": event_id, "label": "maybe"})


# --- the pages -----------------------------------------------------------------------------------

def test_grid_shows_every_configured_camera_and_escapes_data(folder):
    folder.camera_with_event("cam1")
    folder.status("cam2", "offline", "<script>alert(1)</script>")
    client, _ = _client(folder, cameras={"cam1": "lobby", "cam2": "lobby", "cam3": "yard"})
    page = client.get("/")
    assert page.status_code == 200
    html = page.text
    for camera in ("cam1", "cam2", "cam3"):
        assert f'id="tile-{camera}"' in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert" not in html
    assert re.search(r'class="tile down" id="tile-cam2"', html)  # offline
    assert re.search(r'class="tile down" id="tile-cam3"', html)  # configured, never published
    assert re.search(r'class="tile" id="tile-cam1"', html)
    assert "waiting for data" in html
    assert 'class="event-row" data-event-id="cam1-' in html
    assert "<script" not in html.replace('<script src="/static/console.js" defer></script>', "")  # no inline script
    assert page.headers["x-content-type-options"] == "nosniff"
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    cameras = client.get("/api/cameras").json()["cameras"]
    assert {c["camera"] for c in cameras} == {"cam1", "cam2", "cam3"}
    assert client.get("/static/console.js").status_code == 200


def test_events_list_filters_by_camera_scene_time_and_review(folder):
    ids = {camera: folder.camera_with_event(camera, scene=scene)
           for camera, scene in (("cam1", "lobby"), ("cam2", "lobby"), ("cam3", "yard"))}
    client, store = _client(folder)
    store.add_label({"event_id": ids["cam2"], "camera": "cam2", "label": "not_anomaly", "user": "ana"})

    def listed(query: str) -> set[str]:
        response = client.get("/events" + query)
        assert response.status_code == 200, response.text
        return set(re.findall(r'<tr class="event-row" data-event-id="([^"]+)"', response.text))

    assert listed("") == set(ids.values())
    assert listed("?camera=cam1") == {ids["cam1"]}
    assert listed("?scene=lobby") == {ids["cam1"], ids["cam2"]}
    assert listed("?review=not_anomaly") == {ids["cam2"]}
    assert listed("?review=unreviewed") == {ids["cam1"], ids["cam3"]}
    assert listed("?review=confirmed") == set()
    assert listed(f"?from={time.time() + 3600:.0f}") == set()
    assert listed("?from=2000-01-01T00:00&to=2999-01-01T00:00") == set(ids.values())
    assert client.get("/events?from=yesterday").status_code == 400
    assert client.get("/events?review=maybe").status_code == 400
    api = client.get("/api/events?camera=cam3").json()
    assert api["total"] == 1 and api["events"][0]["scene"] == "yard"


def test_event_page_shows_evidence_timeline_and_filmstrip(folder):
    event_id = folder.camera_with_event("cam1", flagged=range(10, 80), n=100)
    client, _ = _client(folder, feedback=FakeFeedback())
    page = client.get(f"/events/{event_id}")
    assert page.status_code == 200
    html = page.text
    assert 'id="evidence-frame" class="evidence-image" src="/media/frames/cam1/' in html
    assert 'id="evidence-reference" class="evidence-image" src="/reference/lobby/3.jpg"' in html
    assert 'viewBox="0 0 128 96"' in html  # boxes drawn in the images' own pixels
    assert html.count('class="crop"') == 2
    assert html.count('class="strip-frame"') == 40  # 70 flagged frames, sampled evenly
    assert '<polyline class="score-line"' in html and 'class="tau"' in html
    reference = client.get("/reference/lobby/3.jpg")
    assert reference.status_code == 200 and jpeg_size(reference.content) == (128, 96)
    for bad in ("/reference/lobby/999.jpg", "/reference/lobby/x.jpg", "/reference/..lobby/3.jpg",
                "/events/nope", "/media/nothing"):
        assert client.get(bad).status_code == 404, bad


def test_feedback_needs_a_csrf_token_and_shows_the_outcome(folder):
    event_id = folder.camera_with_event("cam1")
    feedback = FakeFeedback()
    client, store = _client(folder, feedback=feedback)
    url = f"/events/{event_id}/feedback"
    assert client.post(url, data={"label": "not_anomaly"}).status_code == 403
    token = _csrf(client, f"/events/{event_id}")
    assert client.post(url, data={"label": "not_anomaly", "csrf_token": "0" * 64}).status_code == 403
    stranger = TestClient(client.app, follow_redirects=False)  # a token without its cookie
    assert stranger.post(url, data={"label": "not_anomaly", "csrf_token": token}).status_code == 403
    assert feedback.calls == []

    done = client.post(url, data={"label": "not_anomaly", "csrf_token": token})
    assert done.status_code == 303 and done.headers["location"] == f"/events/{event_id}"
    kind, event, results, user = feedback.calls[0]
    assert kind == "not_anomaly" and event["event_id"] == event_id and user == "operator"
    assert [r["seq"] for r in results] == list(range(20, 30)) and all(r["flagged"] for r in results)
    html = client.get(f"/events/{event_id}").text
    assert 'id="review-state" data-review="not_anomaly"' in html
    assert '<span id="version-before">1</span> → <span id="version-after">2</span>' in html
    assert "&gt; τ" in html and "≤ τ" in html  # the scores before and after, against τ
    assert 'τ 1 → <span id="outcome-tau">1.1</span>' in html  # recalibrated by the bank change

    single = client.post(url, data={"label": "confirmed", "csrf_token": token, "seq": "25"})
    assert single.status_code == 303
    assert [r["seq"] for r in feedback.calls[1][2]] == [25]
    assert store.event(event_id)["review"] == "confirmed"
    csv_text = client.get("/api/labels.csv").text.splitlines()
    assert csv_text[0].startswith("ts,time,event_id") and len(csv_text) == 3
    assert "not_anomaly" in csv_text[1] and ",25," in csv_text[2]


def test_feedback_failure_is_one_line_without_traceback(folder):
    event_id = folder.camera_with_event("cam1")
    client, store = _client(folder, feedback=FakeFeedback(ValueError("the bank of lobby is locked by another edit")))
    token = _csrf(client, f"/events/{event_id}")
    response = client.post(f"/events/{event_id}/feedback", data={"label": "not_anomaly", "csrf_token": token})
    assert response.status_code == 400
    assert "the bank of lobby is locked by another edit" in response.text
    assert "Traceback" not in response.text
    assert store.event(event_id)["review"] == "unreviewed"  # nothing recorded

    # A file where the frame number belongs: refused in one line, not a crash.
    upload = client.post(f"/events/{event_id}/feedback", data={"label": "confirmed", "csrf_token": token},
                         files={"seq": ("seq.txt", b"25")})
    assert upload.status_code == 400 and "not a file" in upload.text

    client, _ = _client(folder, feedback=FakeFeedback(RuntimeError("boom at /secret/path")))
    token = _csrf(client, f"/events/{event_id}")
    response = client.post(f"/events/{event_id}/feedback", data={"label": "not_anomaly", "csrf_token": token})
    assert response.status_code == 500 and "/secret/path" not in response.text


def test_auth_guards_every_route(folder):
    folder.camera_with_event("cam1")
    client, _ = _client(folder, auth=("ana", "s3cret-pass"))
    for path in ("/", "/events", "/api/cameras", "/static/console.css", "/api/labels.csv", "/nowhere"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Basic")
    assert client.get("/", auth=("ana", "wrong")).status_code == 401
    assert client.get("/", auth=("bob", "s3cret-pass")).status_code == 401
    garbage = {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}
    assert client.get("/", headers=garbage).status_code == 401
    page = client.get("/", auth=("ana", "s3cret-pass"))
    assert page.status_code == 200 and "s3cret-pass" not in page.text


def test_console_auth_from_env():
    with pytest.raises(ConfigError, match="SPADE_CONSOLE_USER"):
        console_auth_from_env("0.0.0.0", environ={})
    with pytest.raises(ConfigError):
        console_auth_from_env("192.168.1.20", environ={"SPADE_CONSOLE_USER": "ana"})
    assert console_auth_from_env("127.0.0.1", environ={}) is None
    assert console_auth_from_env("localhost", environ={}) is None
    assert console_auth_from_env("::1", environ={}) is None
    creds = {"SPADE_CONSOLE_USER": "ana", "SPADE_CONSOLE_PASSWORD": "pw"}
    assert console_auth_from_env("0.0.0.0", environ=creds) == ("ana", "pw")
    saved = {k: os.environ.pop(k, None) for k in creds}
    try:
        with pytest.raises(ConfigError):
            console_auth_from_env("0.0.0.0")
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def test_no_response_carries_a_camera_url_or_password(folder):
    event_id = folder.camera_with_event("cam1")
    client, _ = _client(folder, cameras={"cam1": "lobby"}, feedback=FakeFeedback(), auth=("ana", "pw-9f2k"))
    for path in ("/", "/events", f"/events/{event_id}", "/api/cameras", "/api/events", "/api/labels.csv",
                 "/api/labels.jsonl"):
        response = client.get(path, auth=("ana", "pw-9f2k"))
        assert response.status_code == 200, path
        assert "rtsp://" not in response.text and "pw-9f2k" not in response.text, path


# --- the live stream ------------------------------------------------------------------------------

def test_stream_sends_tiles_then_new_events(folder):
    folder.camera_with_event("cam1")
    store = FolderStore(folder.root)
    app = create_app(store, cameras={"cam1": "lobby"})
    port = _free_port()
    server, thread = start_in_thread(app, "127.0.0.1", port)
    try:
        with httpx.Client(timeout=10) as http:
            with http.stream("GET", f"http://127.0.0.1:{port}/api/stream") as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                messages = _sse_messages(response)
                first = next(messages)
                assert [t["camera"] for t in first["tiles"]] == ["cam1"]
                assert first["events"][0]["camera"] == "cam1"
                new_id = folder.event("cam1", 60, "start")["event_id"]
                started = time.monotonic()
                for message in messages:
                    if any(e["event_id"] == new_id for e in message["events"]):
                        break
                print(f"\nnew event streamed {time.monotonic() - started:.2f} s after it was written")
                assert time.monotonic() - started < 3
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive() and not store.running


def _sse_messages(response):
    data = []
    for line in response.iter_lines():
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            yield json.loads("\n".join(data))
            data = []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- speed ---------------------------------------------------------------------------------------

def test_pages_stay_fast_with_16_cameras_and_10000_events(folder):
    """The lead's target is 300 ms p95 server-side; asserted loosely (shared CI machines), printed."""
    now = time.time()
    cameras = [f"cam{i:02d}" for i in range(16)]
    results, events = [], []
    for i, camera in enumerate(cameras):
        for seq in range(300):
            results.append(folder.result(camera, seq, score=0.4, ts=now - (300 - seq) * 0.2, write=False))
        folder.status(camera, "online", ts=now - 3600)
    for n in range(10_000):
        camera = cameras[n % 16]
        start_ts = now - 86400 + n * 8
        for kind in ("start", "end"):
            events.append(folder.event(camera, 1000 + n, kind, end_seq=1003 + n, start_ts=start_ts, write=False))
    folder.append("results.jsonl", results)
    folder.append("events.jsonl", events)
    client, store = _client(folder, cameras=dict.fromkeys(cameras, "lobby"))
    assert store.query_events()[0] == 10_000

    figures = {}
    for path in ("/", "/events", "/events?camera=cam05&page=3", "/events?review=unreviewed&page=100"):
        server_ms, wall_ms = [], []
        for _ in range(25):
            started = time.perf_counter()
            response = client.get(path)
            wall_ms.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
            server_ms.append(float(response.headers["server-timing"].split("dur=")[1]))
        figures[path] = (statistics.quantiles(server_ms, n=20)[-1], statistics.quantiles(wall_ms, n=20)[-1])
    print()
    for path, (server_p95, wall_p95) in figures.items():
        print(f"p95 {path}: {server_p95:.1f} ms server-side, {wall_p95:.1f} ms through the test client")
    assert all(server_p95 <= 1000 for server_p95, _ in figures.values())
