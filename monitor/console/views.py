"""What the console's pages show: plain data and text from the store's records."""
from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, urlencode

PLACEHOLDER = "/static/placeholder.svg"


class ConsoleError(Exception):
    """A request the console refuses or cannot serve: shown as a one-line message page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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


def file_jpeg_size(path: Path) -> tuple[int, int] | None:
    with path.open("rb") as handle:
        return jpeg_size(handle.read(1 << 16))


def parse_time(text: str | None, name: str) -> float | None:
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


def as_box(value) -> list[int] | None:
    if isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
        box = [int(v) for v in value]
        return box if box[2] > 0 and box[3] > 0 else None
    return None


def crop_view(box: list[int], size: tuple[int, int]) -> str:
    """An SVG viewBox around a box, with a margin of context, kept inside the image."""
    width, height = size
    pad = max(8, max(box[2], box[3]) // 2)
    x0, y0 = max(0, box[0] - pad), max(0, box[1] - pad)
    x1, y1 = min(width, box[0] + box[2] + pad), min(height, box[1] + box[3] + pad)
    return f"{x0} {y0} {max(1, x1 - x0)} {max(1, y1 - y0)}"


def sample_evenly(items: list, count: int) -> list:
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
                     "before_flagged": over_threshold(before_score, tau_before), "after_flagged": over_threshold(after_score, tau)})
    return {"label": label.get("label"), "user": label.get("user"), "ts": label.get("ts"),
            "version_before": outcome.get("version_before"), "version_after": outcome.get("version_after"),
            "tau": format_score(tau), "tau_before": format_score(tau_before),
            "tau_changed": tau_before != tau, "rows": rows, "message": outcome.get("message")}


def over_threshold(score, tau) -> bool | None:
    if not isinstance(score, (int, float)) or not isinstance(tau, (int, float)):
        return None
    return score > tau


def csv_cell(value):
    """Text a spreadsheet would run as a formula is quoted out."""
    if isinstance(value, str) and value[:1] in ("=", "+", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


BLANK_TILE = {"camera": "", "scene": "", "status": "waiting", "status_text": "waiting for data", "detail": "",
               "fps": "0.0 fps", "drops": "0 dropped", "score": "no score yet", "down": True, "image": PLACEHOLDER,
               "last_event_url": "/events", "last_event_text": "none yet"}
BLANK_EVENT = {"event_id": "", "url": "/events", "camera": "", "scene": "", "start_ts": 0, "start": "",
                "duration": "", "peak": "", "ratio": "", "frames": 0, "review": "unreviewed", "state": "", "thumb": None}
