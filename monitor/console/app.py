"""The console's web layer: pages, live updates, review feedback, media, and their security.

Pages are rendered on the server (Jinja2, autoescaped); console.js only opens the server-sent
event stream of the camera grid and writes what it receives as text. Every route sits behind
one ASGI guard that adds the security headers and, when credentials are configured, HTTP Basic
auth; every POST carries a CSRF token bound to the browser's cookie.
"""
from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from engine.errors import SpadeError
from monitor.console.security import ConsoleGuard
from monitor.console.store import LABELS, REVIEW_STATES, FolderStore
from monitor.console.views import (
    BLANK_EVENT,
    BLANK_TILE,
    ConsoleError,
    as_box,
    crop_view,
    csv_cell,
    event_fields,
    event_url,
    file_jpeg_size,
    format_duration,
    format_score,
    format_time,
    jpeg_size,
    media_url,
    outcome_view,
    parse_time,
    sample_evenly,
    tile_fields,
    timeline_chart,
)
from monitor.frames import is_safe_name

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
EVENTS_PER_PAGE = 50
LATEST_EVENTS = 10  # on the camera grid
FILMSTRIP_FRAMES = 40
HEARTBEAT_S = 5.0  # the grid's stream resends every tile this often: "online for", "down" move with time
CSRF_COOKIE = "spade_console_csrf"


# --- the app ---------------------------------------------------------------------------------------

def create_app(store: FolderStore, *, cameras: dict[str, str] | None = None, feedback=None,
               auth: tuple[str, str] | None = None, secret: bytes | None = None) -> FastAPI:
    """The console over `store`. cameras: configured camera id -> scene id (shown before any data);
    feedback: the bank-feedback service (not_anomaly, confirm, reference_image) or None;
    auth: (user, password) for HTTP Basic on every route; secret: the CSRF key (random if None)."""
    console = _Console(store, dict(cameras or {}), feedback, secret or secrets.token_bytes(32))
    store.configure_cameras(console.cameras)

    @asynccontextmanager
    async def lifespan(app):
        app.state.closing.clear()
        owned = not store.running
        if owned:
            store.start()
        yield
        if owned:
            store.stop()

    app = FastAPI(title="SPADE Monitor console", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.closing = console.closing
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(ConsoleGuard, auth=auth)
    for add_routes in (_errors_routes, _pages_routes, _feedback_routes, _media_routes, _api_routes, _stream_routes):
        add_routes(app, console)
    return app


class _Console:
    """What the routes share: the store, the feedback service, the templates and the CSRF key."""

    def __init__(self, store: FolderStore, cameras: dict[str, str], feedback, secret: bytes):
        self.store, self.cameras, self.feedback, self.secret = store, cameras, feedback, secret
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                      trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(duration=format_duration, time=format_time, score=format_score, media=media_url)
        self.references = _ReferenceCache(feedback)
        self.closing = threading.Event()  # set by serve()'s server as it shuts down

    def csrf_tokens(self, request: Request) -> tuple[str, str, bool]:
        """(cookie token, form token = HMAC of it, whether the cookie is new)."""
        token = request.cookies.get(CSRF_COOKIE, "")
        fresh = len(token) < 32
        if fresh:
            token = secrets.token_urlsafe(32)
        return token, hmac.new(self.secret, token.encode(), hashlib.sha256).hexdigest(), fresh

    def render(self, request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
        token, form_token, fresh = self.csrf_tokens(request)
        html = self.env.get_template(template).render(csrf_token=form_token, **context)
        response = HTMLResponse(html, status_code=status)
        if fresh:
            response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    def check_csrf(self, request: Request, form_token) -> None:
        token = request.cookies.get(CSRF_COOKIE, "")
        expected = hmac.new(self.secret, token.encode(), hashlib.sha256).hexdigest()
        if not token or not isinstance(form_token, str) or not hmac.compare_digest(expected, form_token):
            raise ConsoleError(403, "the form's security token is missing or stale: reload the page and try again")

    def filters_from(self, request: Request) -> dict:
        query = request.query_params
        camera, scene, review = query.get("camera") or None, query.get("scene") or None, query.get("review") or None
        if review is not None and review not in REVIEW_STATES:
            raise ConsoleError(400, f"bad review state {review!r}: use one of {', '.join(REVIEW_STATES)}")
        try:
            page = max(1, int(query.get("page") or 1))
        except ValueError:
            raise ConsoleError(400, "bad page number") from None
        return {"camera": camera, "scene": scene, "review": review, "page": page,
                "from": query.get("from") or "", "to": query.get("to") or "",
                "since": parse_time(query.get("from"), "from"), "until": parse_time(query.get("to"), "to")}

    def query_events(self, filters: dict) -> tuple[int, list[dict]]:
        return self.store.query_events(camera=filters["camera"], scene=filters["scene"], since=filters["since"],
                                       until=filters["until"], review=filters["review"],
                                       offset=(filters["page"] - 1) * EVENTS_PER_PAGE, limit=EVENTS_PER_PAGE)

    def scenes(self) -> list[str]:
        return sorted({t["scene"] for t in self.store.tiles() if t["scene"]} | set(self.cameras.values()))

    def evidence_view(self, event: dict, flagged: list[dict]) -> dict | None:
        """The peak frame with its evidence box next to the nearest reference frame with its box."""
        with_evidence = [r for r in flagged if isinstance(r.get("evidence"), dict)]
        peak = next((r for r in with_evidence if r.get("seq") == event["peak_seq"]), None)
        if peak is None and with_evidence:
            peak = max(with_evidence, key=lambda r: r.get("image_score") or 0.0)
        if peak is None:
            peak = next((r for r in flagged if r.get("seq") == event["peak_seq"]), None)
        if peak is None:
            return None
        ref = peak.get("frame_ref") or peak.get("overlay_ref")
        path = self.store.media_path(ref)
        stored = peak.get("evidence")
        evidence: dict = stored if isinstance(stored, dict) else {}
        frame: dict[str, Any] = {"url": media_url(ref) if path else None,
                                 "size": file_jpeg_size(path) if path else None, "box": as_box(evidence.get("box"))}
        scene = peak.get("scene") or event["scene"]
        reference: dict[str, Any] | None = None
        if evidence and isinstance(evidence.get("ref_index"), int) and is_safe_name(scene):
            size = self.references.size(scene, evidence["ref_index"])
            if size is not None:
                reference = {"url": f"/reference/{quote(scene)}/{evidence['ref_index']}.jpg", "size": size,
                             "box": as_box(evidence.get("ref_box")), "index": evidence["ref_index"]}
        for image in (frame, reference):
            if image and image["size"] and image["box"]:
                image["crop"] = crop_view(image["box"], image["size"])
        distance = evidence.get("distance")
        return {"seq": peak.get("seq"), "score": format_score(peak.get("image_score")), "frame": frame,
                "reference": reference, "distance": format_score(distance if isinstance(distance, float) else None),
                "has_evidence": bool(evidence)}


def _errors_routes(app: FastAPI, console: _Console) -> None:
    """One-line error pages (JSON under /api/)."""
    render = console.render

    @app.exception_handler(ConsoleError)
    async def console_error(request: Request, exc: ConsoleError):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        return render(request, "error.html", status=exc.status, message=exc.message)

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return await console_error(request, ConsoleError(404, "not found"))

    @app.exception_handler(405)
    async def bad_method(request: Request, exc):
        return await console_error(request, ConsoleError(405, "method not allowed"))


def _pages_routes(app: FastAPI, console: _Console) -> None:
    """The camera grid, the event list and an event's page."""
    store, feedback, render = console.store, console.feedback, console.render
    filters_from, query_events, scenes = console.filters_from, console.query_events, console.scenes
    evidence_view = console.evidence_view

    @app.get("/", response_class=HTMLResponse)
    def grid(request: Request):
        now = time.time()
        version = store.version
        tiles = [tile_fields(t, now) for t in store.tiles(now)]
        _, latest = store.query_events(limit=LATEST_EVENTS)
        return render(request, "grid.html", tiles=tiles, events=[event_fields(e) for e in latest],
                      version=version, blank_tile=BLANK_TILE, blank_event=BLANK_EVENT)

    @app.get("/events", response_class=HTMLResponse)
    def events_page(request: Request):
        filters = filters_from(request)
        total, page = query_events(filters)
        pages = max(1, math.ceil(total / EVENTS_PER_PAGE))
        base = {k: filters[k] for k in ("camera", "scene", "review", "from", "to") if filters[k]}

        def page_url(number):
            return "/events?" + urlencode({**base, "page": number})

        return render(request, "events.html", events=[event_fields(e) for e in page], total=total,
                      filters=filters, cameras=store.camera_ids(), scenes=scenes(), reviews=REVIEW_STATES,
                      page=filters["page"], pages=pages,
                      prev_url=page_url(filters["page"] - 1) if filters["page"] > 1 else None,
                      next_url=page_url(filters["page"] + 1) if filters["page"] < pages else None)

    @app.get("/events/{event_id}", response_class=HTMLResponse)
    def event_page(request: Request, event_id: str):
        event = store.event(event_id)
        if event is None:
            raise ConsoleError(404, f"no event {event_id!r} (it may be older than what the console keeps)")
        flagged = store.event_results(event_id)
        strip = [r for r in flagged if r.get("overlay_ref") or r.get("frame_ref")]
        filmstrip = [{"seq": r["seq"], "score": format_score(r.get("image_score")),
                      "url": media_url(r.get("overlay_ref") or r.get("frame_ref"))}
                     for r in sample_evenly(strip, FILMSTRIP_FRAMES)]
        labels = event.get("labels", [])
        outcome = next((label for label in reversed(labels) if label.get("outcome")), None)
        return render(request, "event.html", event=event, row=event_fields(event), filmstrip=filmstrip,
                      flagged_count=len(flagged), chart=timeline_chart(store.timeline(event_id)),
                      evidence=evidence_view(event, flagged), labels=list(reversed(labels)),
                      latest_label=labels[-1] if labels else None, outcome=outcome_view(outcome),
                      feedback_enabled=feedback is not None, post_url=event_url(event_id) + "/feedback")


def _feedback_routes(app: FastAPI, console: _Console) -> None:
    """"Not an anomaly" and "confirmed" on an event or one of its frames."""
    store, feedback, check_csrf = console.store, console.feedback, console.check_csrf

    @app.post("/events/{event_id}/feedback")
    async def feedback_post(request: Request, event_id: str):
        form = await request.form()
        check_csrf(request, form.get("csrf_token"))
        label = form.get("label")
        if label not in LABELS:
            raise ConsoleError(400, f"bad label {label!r}: use one of {', '.join(LABELS)}")
        event = store.event(event_id)
        if event is None:
            raise ConsoleError(404, f"no event {event_id!r}")
        seq_field = form.get("seq") or ""
        if not isinstance(seq_field, str):
            raise ConsoleError(400, "bad seq: a frame number, not a file")
        seq_text = seq_field.strip()
        if seq_text:
            if not seq_text.isdigit():
                raise ConsoleError(400, f"bad frame number {seq_text!r}")
            results = [r for r in await run_in_threadpool(store.event_results, event_id, flagged_only=False)
                       if r.get("seq") == int(seq_text)]
            if not results:
                raise ConsoleError(404, f"frame {seq_text} of event {event_id} is no longer in the console's memory")
        else:
            results = await run_in_threadpool(store.event_results, event_id)
        if label == "not_anomaly" and not results:
            raise ConsoleError(409, "the frames of this event are no longer in the console's memory; "
                                    "nothing can be added to the reference bank")
        user = getattr(request.state, "user", None) or "operator"
        record = dict(event["record"])
        record.update(scene=event["scene"], tau=event["tau"])
        outcome = None
        if feedback is not None:
            call = feedback.not_anomaly if label == "not_anomaly" else feedback.confirm
            try:
                outcome = await run_in_threadpool(call, record, results, user)
            except Exception as exc:  # noqa: BLE001 - shown as one line, never as a traceback
                raise _feedback_error(exc) from None
        await run_in_threadpool(store.add_label, {
            "event_id": event_id, "camera": event["camera"], "scene": event["scene"], "label": label, "user": user,
            "ts": time.time(), "seq": int(seq_text) if seq_text else None,
            "frames": [r.get("seq") for r in results], "outcome": outcome if isinstance(outcome, dict) else None,
        })
        return RedirectResponse(event_url(event_id), status_code=303)


def _media_routes(app: FastAPI, console: _Console) -> None:
    """Stills and overlays the publisher wrote; reference frames from the banks."""
    store, references = console.store, console.references

    @app.get("/media/{ref:path}")
    def media(ref: str):
        path = store.media_path(ref)
        if path is None:
            raise ConsoleError(404, "not found")
        # Revalidate: a path can be rewritten by a later run of the same camera.
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    @app.get("/reference/{scene}/{name}")
    def reference(scene: str, name: str):
        index = name[:-4] if name.endswith(".jpg") else ""
        if not is_safe_name(scene) or not index.isdigit():
            raise ConsoleError(404, "not found")
        data = references.jpeg(scene, int(index))
        if data is None:
            raise ConsoleError(404, "not found")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})


def _api_routes(app: FastAPI, console: _Console) -> None:
    """JSON and label exports."""
    store, filters_from, query_events = console.store, console.filters_from, console.query_events

    @app.get("/api/cameras")
    def api_cameras():
        now = time.time()
        return {"cameras": [tile_fields(t, now) | {"raw": t} for t in store.tiles(now)]}

    @app.get("/api/events")
    def api_events(request: Request):
        filters = filters_from(request)
        total, page = query_events(filters)
        events = []
        for event in page:
            event = dict(event)
            event.pop("record")
            events.append(event)
        return {"total": total, "page": filters["page"], "per_page": EVENTS_PER_PAGE, "events": events}

    @app.get("/api/labels.csv")
    def labels_csv():
        columns = ["ts", "time", "event_id", "camera", "scene", "label", "user", "seq", "frames",
                   "version_before", "version_after"]
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        for label in store.label_records():
            outcome = label.get("outcome") if isinstance(label.get("outcome"), dict) else {}
            ts = label.get("ts") if isinstance(label.get("ts"), (int, float)) else None
            writer.writerow([csv_cell(v) for v in (
                ts, format_time(ts), label.get("event_id"), label.get("camera"), label.get("scene"),
                label.get("label"), label.get("user"), label.get("seq"),
                " ".join(str(s) for s in label.get("frames") or []),
                outcome.get("version_before"), outcome.get("version_after"))])
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="labels.csv"'})

    @app.get("/api/labels.jsonl")
    def labels_jsonl():
        body = "".join(json.dumps(label) + "\n" for label in store.label_records())
        return Response(body, media_type="application/x-ndjson",
                        headers={"Content-Disposition": 'attachment; filename="labels.jsonl"'})


def _stream_routes(app: FastAPI, console: _Console) -> None:
    """The grid's server-sent events: changed tiles and events, everything every HEARTBEAT_S."""
    store, closing = console.store, console.closing

    @app.get("/api/stream")
    async def stream(request: Request):
        try:
            since = int(request.query_params.get("since") or -1)
        except ValueError:
            since = -1

        def snapshot(version: int, full: bool) -> tuple[int, dict]:
            version, changed_cameras, changed_events = store.changes_since(version)
            now = time.time()
            if full or changed_cameras is None:
                tiles = store.tiles(now)
            else:
                tiles = [t for t in (store.tile(c, now) for c in sorted(changed_cameras)) if t is not None]
            if changed_events is None:
                _, events = store.query_events(limit=LATEST_EVENTS)
            else:
                events = store.events_by_id(changed_events)
            return version, {"version": version, "tiles": [tile_fields(t, now) for t in tiles],
                             "events": [event_fields(e) for e in events]}

        async def messages():
            wake = store.subscribe()
            version, last_full = since, 0.0
            try:
                yield "retry: 2000\n\n"
                while True:
                    wake.clear()  # before reading, so a change during the read wakes the next round
                    full = time.monotonic() - last_full >= HEARTBEAT_S
                    version, message = await run_in_threadpool(snapshot, version, full)
                    if full:
                        last_full = time.monotonic()
                    if message["tiles"] or message["events"]:
                        yield f"event: update\ndata: {json.dumps(message, separators=(',', ':'))}\n\n"
                    # Wake at least every second: a client that left or a server shutting down ends
                    # the stream promptly instead of at the next write.
                    while not wake.is_set() and time.monotonic() - last_full < HEARTBEAT_S:
                        if closing.is_set() or await request.is_disconnected():
                            return
                        try:
                            await asyncio.wait_for(wake.wait(), 1.0)
                        except asyncio.TimeoutError:
                            pass
            finally:
                store.unsubscribe(wake)

        return StreamingResponse(messages(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _feedback_error(exc: Exception) -> ConsoleError:
    """What the operator is told when the feedback service refuses: its one line, no traceback."""
    message = getattr(exc, "user_message", None)
    if isinstance(message, str) and message:
        return ConsoleError(int(getattr(exc, "status", 400)), message)
    if isinstance(exc, (SpadeError, ValueError)):
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return ConsoleError(400, text)
    log.exception("console: feedback failed")
    return ConsoleError(500, f"feedback failed ({type(exc).__name__}); see the console's log")


class _ReferenceCache:
    """Reference frames from the feedback service, as JPEG bytes, the most recent few kept."""

    def __init__(self, feedback, size: int = 64):
        self.feedback = feedback
        self.size_limit = size
        self._items: OrderedDict[tuple[str, int], bytes | None] = OrderedDict()
        self._lock = threading.Lock()

    def jpeg(self, scene: str, index: int) -> bytes | None:
        key = (scene, index)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        data = self._load(scene, index)
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.size_limit:
                self._items.popitem(last=False)
        return data

    def size(self, scene: str, index: int) -> tuple[int, int] | None:
        data = self.jpeg(scene, index)
        return None if data is None else jpeg_size(data)

    def _load(self, scene: str, index: int) -> bytes | None:
        if self.feedback is None or not hasattr(self.feedback, "reference_image"):
            return None
        try:
            image = self.feedback.reference_image(scene, index)
        except Exception as exc:  # noqa: BLE001 - a missing frame is a 404, not a crash
            log.warning("console: no reference frame %s/%s: %s", scene, index, exc)
            return None
        if isinstance(image, (bytes, bytearray, memoryview)):
            return bytes(image)
        if image is None:
            return None
        import cv2
        import numpy as np

        array = np.asarray(image)
        if array.ndim == 3 and array.shape[2] == 3:
            array = array[:, :, ::-1]  # RGB, as the engine holds frames, to OpenCV's BGR
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(array.astype(np.uint8)))
        return buf.tobytes() if ok else None
