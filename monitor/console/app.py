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
import ipaddress
import json
import logging
import math
import os
import secrets
import threading
import time
from base64 import b64decode
from collections import OrderedDict
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from engine.errors import ConfigError, SpadeError
from monitor.console.store import LABELS, REVIEW_STATES, FolderStore
from monitor.frames import is_safe_name

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
EVENTS_PER_PAGE = 50
LATEST_EVENTS = 10  # on the camera grid
FILMSTRIP_FRAMES = 40
HEARTBEAT_S = 5.0  # the grid's stream resends every tile this often: "online for", "down" move with time
CSRF_COOKIE = "spade_console_csrf"
PLACEHOLDER = "/static/placeholder.svg"
USER_ENV, PASSWORD_ENV = "SPADE_CONSOLE_USER", "SPADE_CONSOLE_PASSWORD"

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    # Only our own scripts, styles and images; no inline script, no framing, forms post home only.
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_RAW_SECURITY_HEADERS = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]


class ConsoleError(Exception):
    """A request the console refuses or cannot serve: shown as a one-line message page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --- auth ------------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def console_auth_from_env(host: str, environ=None) -> tuple[str, str] | None:
    """Credentials for a console bound to `host`: required (from SPADE_CONSOLE_USER and
    SPADE_CONSOLE_PASSWORD) unless it listens on loopback only, where they are optional."""
    environ = os.environ if environ is None else environ
    user, password = environ.get(USER_ENV, ""), environ.get(PASSWORD_ENV, "")
    if user and password:
        return user, password
    if is_loopback(host):
        if user or password:
            raise ConfigError(f"console: set both {USER_ENV} and {PASSWORD_ENV}, or neither")
        return None
    raise ConfigError(f"console on {host} is reachable from other machines: set {USER_ENV} and "
                      f"{PASSWORD_ENV} to require a login, or bind it to 127.0.0.1")


class _Guard:
    """ASGI middleware: HTTP Basic auth on every route (when configured) and security headers
    (plus Server-Timing: how long the app took to start answering) on every response."""

    def __init__(self, app, auth: tuple[str, str] | None):
        self.app = app
        self.auth = None if auth is None else (auth[0].encode(), auth[1].encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                timing = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
                message["headers"] = [*message.get("headers", []), *_RAW_SECURITY_HEADERS,
                                      (b"server-timing", timing.encode())]
            await send(message)

        if self.auth is not None:
            user = self._user(dict(scope["headers"]).get(b"authorization", b""))
            if user is None:
                response = Response("login required\n", status_code=401, media_type="text/plain",
                                    headers={"WWW-Authenticate": 'Basic realm="spade-monitor console", charset="UTF-8"'})
                await response(scope, receive, send_with_headers)
                return
            scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send_with_headers)

    def _user(self, header: bytes) -> str | None:
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            user, sep, password = b64decode(encoded.strip(), validate=True).partition(b":")
        except ValueError:
            return None
        if self.auth is None:
            return None
        # Both compared, in constant time, whatever the first says.
        ok = hmac.compare_digest(user, self.auth[0]) & hmac.compare_digest(password, self.auth[1])
        return user.decode("utf-8", "replace") if ok and sep else None


# --- formatting ------------------------------------------------------------------------------------

def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def format_time(ts) -> str:
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return "—"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def format_score(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def media_url(ref: str | None) -> str | None:
    return None if not ref else "/media/" + quote(ref)


def event_url(event_id: str) -> str:
    return "/events/" + quote(event_id, safe="")


def tile_fields(tile: dict, now: float) -> dict:
    """A tile as the page and the stream show it: the same strings in both."""
    status, since = tile["status"], tile["status_since"]
    if status == "waiting":
        status_text = "waiting for data"
    elif since is not None:
        status_text = f"{status} for {format_duration(now - since)}"
    else:
        status_text = status
    last = tile["last_event"]
    if tile["score"] is None:
        score_text = "no score yet"
    else:
        score_text = f"score {format_score(tile['score'])} / τ {format_score(tile['tau'])}"
    return {
        "camera": tile["camera"],
        "scene": tile["scene"] or "",
        "status": status,
        "status_text": status_text,
        "detail": tile["detail"],
        "fps": f"{tile['fps']:.1f} fps",
        "drops": f"{tile['drops']} dropped",
        "score": score_text,
        "down": tile["down"],
        "image": media_url(tile["image_ref"]) or PLACEHOLDER,
        "last_event_url": event_url(last["event_id"]) if last else "/events?" + urlencode({"camera": tile["camera"]}),
        "last_event_text": (f"{format_time(last['start_ts'])} · peak {format_score(last['peak_score'])}"
                            f"{' · open' if last['open'] else ''}") if last else "none yet",
    }


def event_fields(event: dict) -> dict:
    """An event row as the lists and the stream show it."""
    ratio = event["peak_over_tau"]
    return {
        "event_id": event["event_id"],
        "url": event_url(event["event_id"]),
        "camera": event["camera"],
        "scene": event["scene"] or "",
        "start_ts": event["start_ts"],
        "start": format_time(event["start_ts"]),
        "duration": format_duration(event["duration_s"]),
        "peak": format_score(event["peak_score"]),
        "ratio": "—" if ratio is None else f"{ratio:.2f}× τ",
        "frames": event["frames_flagged"],
        "review": event["review"],
        "state": "open" if event["open"] else "ended",
        "thumb": media_url(event["best_overlay_ref"]),
    }


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, without decoding it."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            return (width, height) if width and height else None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _file_jpeg_size(path: Path) -> tuple[int, int] | None:
    with path.open("rb") as handle:
        return jpeg_size(handle.read(1 << 16))


def _parse_time(text: str | None, name: str) -> float | None:
    """Unix seconds, or an ISO date-time (a datetime-local input's) in the server's time zone."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ConsoleError(400, f"bad '{name}' time {text!r}: use YYYY-MM-DDTHH:MM or unix seconds") from None


def _box(value) -> list[int] | None:
    if isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
        box = [int(v) for v in value]
        return box if box[2] > 0 and box[3] > 0 else None
    return None


def _crop_view(box: list[int], size: tuple[int, int]) -> str:
    """An SVG viewBox around a box, with a margin of context, kept inside the image."""
    width, height = size
    pad = max(8, max(box[2], box[3]) // 2)
    x0, y0 = max(0, box[0] - pad), max(0, box[1] - pad)
    x1, y1 = min(width, box[0] + box[2] + pad), min(height, box[1] + box[3] + pad)
    return f"{x0} {y0} {max(1, x1 - x0)} {max(1, y1 - y0)}"


def _sample_evenly(items: list, count: int) -> list:
    if len(items) <= count:
        return items
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def timeline_chart(timeline: dict | None, width: int = 800, height: int = 180) -> dict | None:
    """Coordinates of the score chart (drawn as inline SVG by the template)."""
    if not timeline or not timeline["points"]:
        return None
    points, tau = timeline["points"], timeline["tau"]
    pad_x, pad_y = 40, 12
    seqs = [p[0] for p in points]
    lo, hi = min(seqs + [timeline["start_seq"]]), max(seqs + [timeline["end_seq"]])
    top = max([p[1] for p in points] + [tau or 0.0]) * 1.1 or 1.0
    span = max(1, hi - lo)

    def x(seq):
        return pad_x + (seq - lo) / span * (width - 2 * pad_x)

    def y(score):
        return height - pad_y - max(0.0, score) / top * (height - 2 * pad_y)

    return {
        "width": width, "height": height,
        "line": " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v, _ in points),
        "flagged": [(round(x(s), 1), round(y(v), 1)) for s, v, f in points if f][:2000],
        "tau_y": None if tau is None else round(y(tau), 1), "tau": format_score(tau),
        "span_x": round(x(timeline["start_seq"]), 1),
        "span_w": round(max(2.0, x(timeline["end_seq"]) - x(timeline["start_seq"])), 1),
        "top": format_score(top), "lo": lo, "hi": hi, "axis_y": height - pad_y, "left": pad_x,
        "right": width - pad_x,
    }


# --- the app ---------------------------------------------------------------------------------------

def create_app(store: FolderStore, *, cameras: dict[str, str] | None = None, feedback=None,
               auth: tuple[str, str] | None = None, secret: bytes | None = None) -> FastAPI:
    """The console over `store`. cameras: configured camera id -> scene id (shown before any data);
    feedback: the bank-feedback service (not_anomaly, confirm, reference_image) or None;
    auth: (user, password) for HTTP Basic on every route; secret: the CSRF key (random if None)."""
    cameras = dict(cameras or {})
    store.configure_cameras(cameras)
    secret = secret or secrets.token_bytes(32)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(duration=format_duration, time=format_time, score=format_score, media=media_url)
    references = _ReferenceCache(feedback)

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
    closing = app.state.closing = threading.Event()  # set by serve()'s server as it shuts down
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(_Guard, auth=auth)

    # --- helpers over the request ---

    def csrf_tokens(request: Request) -> tuple[str, str, bool]:
        """(cookie token, form token = HMAC of it, whether the cookie is new)."""
        token = request.cookies.get(CSRF_COOKIE, "")
        fresh = len(token) < 32
        if fresh:
            token = secrets.token_urlsafe(32)
        return token, hmac.new(secret, token.encode(), hashlib.sha256).hexdigest(), fresh

    def render(request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
        token, form_token, fresh = csrf_tokens(request)
        html = env.get_template(template).render(csrf_token=form_token, **context)
        response = HTMLResponse(html, status_code=status)
        if fresh:
            response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    def check_csrf(request: Request, form_token) -> None:
        token = request.cookies.get(CSRF_COOKIE, "")
        expected = hmac.new(secret, token.encode(), hashlib.sha256).hexdigest()
        if not token or not isinstance(form_token, str) or not hmac.compare_digest(expected, form_token):
            raise ConsoleError(403, "the form's security token is missing or stale: reload the page and try again")

    def filters_from(request: Request) -> dict:
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
                "since": _parse_time(query.get("from"), "from"), "until": _parse_time(query.get("to"), "to")}

    def query_events(filters: dict) -> tuple[int, list[dict]]:
        return store.query_events(camera=filters["camera"], scene=filters["scene"], since=filters["since"],
                                  until=filters["until"], review=filters["review"],
                                  offset=(filters["page"] - 1) * EVENTS_PER_PAGE, limit=EVENTS_PER_PAGE)

    def scenes() -> list[str]:
        return sorted({t["scene"] for t in store.tiles() if t["scene"]} | set(cameras.values()))

    # --- errors ---

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

    # --- pages ---

    @app.get("/", response_class=HTMLResponse)
    def grid(request: Request):
        now = time.time()
        version = store.version
        tiles = [tile_fields(t, now) for t in store.tiles(now)]
        _, latest = store.query_events(limit=LATEST_EVENTS)
        return render(request, "grid.html", tiles=tiles, events=[event_fields(e) for e in latest],
                      version=version, blank_tile=_BLANK_TILE, blank_event=_BLANK_EVENT)

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
                     for r in _sample_evenly(strip, FILMSTRIP_FRAMES)]
        labels = event.get("labels", [])
        outcome = next((label for label in reversed(labels) if label.get("outcome")), None)
        return render(request, "event.html", event=event, row=event_fields(event), filmstrip=filmstrip,
                      flagged_count=len(flagged), chart=timeline_chart(store.timeline(event_id)),
                      evidence=evidence_view(event, flagged), labels=list(reversed(labels)),
                      latest_label=labels[-1] if labels else None, outcome=outcome_view(outcome),
                      feedback_enabled=feedback is not None, post_url=event_url(event_id) + "/feedback")

    def evidence_view(event: dict, flagged: list[dict]) -> dict | None:
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
        path = store.media_path(ref)
        stored = peak.get("evidence")
        evidence: dict = stored if isinstance(stored, dict) else {}
        frame: dict[str, Any] = {"url": media_url(ref) if path else None, "size": _file_jpeg_size(path) if path else None,
                 "box": _box(evidence.get("box"))}
        scene = peak.get("scene") or event["scene"]
        reference: dict[str, Any] | None = None
        if evidence and isinstance(evidence.get("ref_index"), int) and is_safe_name(scene):
            size = references.size(scene, evidence["ref_index"])
            if size is not None:
                reference = {"url": f"/reference/{quote(scene)}/{evidence['ref_index']}.jpg", "size": size,
                             "box": _box(evidence.get("ref_box")), "index": evidence["ref_index"]}
        for image in (frame, reference):
            if image and image["size"] and image["box"]:
                image["crop"] = _crop_view(image["box"], image["size"])
        distance = evidence.get("distance")
        return {"seq": peak.get("seq"), "score": format_score(peak.get("image_score")), "frame": frame,
                "reference": reference, "distance": format_score(distance if isinstance(distance, float) else None),
                "has_evidence": bool(evidence)}

    def outcome_view(label: dict | None) -> dict | None:
        if label is None or not isinstance(label.get("outcome"), dict):
            return None
        outcome = label["outcome"]
        tau = outcome.get("tau")
        tau_before = outcome.get("tau_before", tau)  # a bank change may recalibrate τ
        after = {row.get("seq"): row.get("score") for row in outcome.get("after") or [] if isinstance(row, dict)}
        rows = []
        for row in outcome.get("before") or []:
            if not isinstance(row, dict):
                continue
            before_score, after_score = row.get("score"), after.get(row.get("seq"))
            rows.append({"seq": row.get("seq"), "before": format_score(before_score), "after": format_score(after_score),
                         "before_flagged": _over(before_score, tau_before), "after_flagged": _over(after_score, tau)})
        return {"label": label.get("label"), "user": label.get("user"), "ts": label.get("ts"),
                "version_before": outcome.get("version_before"), "version_after": outcome.get("version_after"),
                "tau": format_score(tau), "tau_before": format_score(tau_before),
                "tau_changed": tau_before != tau, "rows": rows, "message": outcome.get("message")}

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

    # --- media ---

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

    # --- JSON and export ---

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
            writer.writerow([_csv_cell(v) for v in (
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

    return app


def _over(score, tau) -> bool | None:
    if not isinstance(score, (int, float)) or not isinstance(tau, (int, float)):
        return None
    return score > tau


def _csv_cell(value):
    """Text a spreadsheet would run as a formula is quoted out."""
    if isinstance(value, str) and value[:1] in ("=", "+", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


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


_BLANK_TILE = {"camera": "", "scene": "", "status": "waiting", "status_text": "waiting for data", "detail": "",
               "fps": "0.0 fps", "drops": "0 dropped", "score": "no score yet", "down": True, "image": PLACEHOLDER,
               "last_event_url": "/events", "last_event_text": "none yet"}
_BLANK_EVENT = {"event_id": "", "url": "/events", "camera": "", "scene": "", "start_ts": 0, "start": "",
                "duration": "", "peak": "", "ratio": "", "frames": 0, "review": "unreviewed", "state": "", "thumb": None}


# --- serving ---------------------------------------------------------------------------------------

def _server(app, host: str, port: int):
    import uvicorn

    class ConsoleServer(uvicorn.Server):
        async def shutdown(self, *args, **kwargs):
            closing = getattr(getattr(app, "state", None), "closing", None)
            if closing is not None:
                closing.set()  # live streams end themselves, so connections close cleanly
            await super().shutdown(*args, **kwargs)

    # A short graceful shutdown all the same: a stream stuck elsewhere is cancelled after it.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=3, lifespan="on")
    return ConsoleServer(config)


def serve(app, host: str, port: int) -> None:
    """Serve in the foreground until interrupted."""
    _server(app, host, port).run()


def start_in_thread(app, host: str, port: int, timeout_s: float = 10.0):
    """Serve from a daemon thread; returns (server, thread). Stop: server.should_exit = True; thread.join()."""
    server = _server(app, host, port)
    thread = threading.Thread(target=server.run, name="console-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ConfigError(f"console could not start on {host}:{port} (is the port in use?)")
        time.sleep(0.02)
    return server, thread
