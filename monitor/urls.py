"""Camera and Redis URLs: their scheme, whether a source is live, and hiding their credentials.

Camera URLs carry passwords. Everything the monitor shows (logs, errors, status entries,
metrics, pages) goes through redact_url or scrub, and only these rules decide what is secret.
"""
from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

# Network schemes are live: reconnected on loss, never paced or looped (FFmpeg reads them all).
LIVE_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "rtp", "srt", "tcp"})

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Greedy up to the last "@" before the path: an unencoded "@" in a password is still hidden.
_EMBEDDED_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")
_SECRET_PARAMS = ("password", "passwd", "pwd", "pass", "token", "access_token", "auth", "key",
                  "api_key", "apikey", "secret")
_SECRET_PARAM_RE = re.compile(r"([?&;](?:%s)=)[^&;#]*" % "|".join(_SECRET_PARAMS), re.IGNORECASE)
MIN_SCRUBBED_PASSWORD = 3  # shorter passwords would mangle ordinary words in a message


def scheme(url: str) -> str:
    """The URL's scheme in lower case, or "" for a plain path."""
    m = _SCHEME_RE.match(str(url))
    return m.group(1).lower() if m else ""


def is_live(source: str) -> bool:
    return scheme(str(source)) in LIVE_SCHEMES


def redact_url(url: str) -> str:
    """Hide userinfo (user:password@ or user@) and secret query parameters in a URL.

    Errs on hiding too much: everything up to the last '@' counts as userinfo, so a password
    with an unescaped '/', '?' or '@' is still hidden.
    """
    url = str(url)
    m = _SCHEME_RE.match(url)
    prefix = url[:m.end()] if m else ""
    rest = url[len(prefix):]
    at = rest.rfind("@")
    # Without a scheme only 'user:pass@host' counts, so a plain path such as cam@2.mp4 survives.
    if at >= 0 and (prefix or ":" in rest[:at]):
        rest = "***" + rest[at:]
    return prefix + _SECRET_PARAM_RE.sub(r"\1***", rest)


def _raw_password(url: str) -> str | None:
    """The password in the URL's userinfo as written (percent-encoded); None without one."""
    try:
        return urlsplit(str(url)).password or None
    except ValueError:
        return None


def url_password(url: str) -> str | None:
    """The password in the URL's userinfo, decoded; None without one."""
    raw = _raw_password(url)
    return unquote(raw) if raw else None


def scrub(text: str, url: str) -> str:
    """A message on one line, without url's credentials in any form (libraries echo URLs)."""
    text = str(text).replace(str(url), redact_url(url))
    text = _EMBEDDED_USERINFO_RE.sub(r"\g<scheme>***@", text)  # other URLs in it, or ours reformatted
    raw = _raw_password(url)
    if raw and len(unquote(raw)) >= MIN_SCRUBBED_PASSWORD:
        for form in {raw, unquote(raw)}:
            text = text.replace(form, "***")
    return " ".join(text.split())
