"""The console's guard: loopback unless credentials are set, HTTP Basic, security headers."""
from __future__ import annotations

import hmac
import ipaddress
import os
import time
from base64 import b64decode

from fastapi.responses import Response

from engine.errors import ConfigError

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


class ConsoleGuard:
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
