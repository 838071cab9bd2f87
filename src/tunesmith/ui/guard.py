"""What stands between the web UI and a hostile web page or network, decided before any route runs.

The UI starts processes and writes files, and a browser will send requests to it from any page it
opens: a page on another origin (another port of localhost included), a page whose name was made to
resolve to 127.0.0.1 (DNS rebinding), or an HTML file opened from a run. So, for every request
(``Guard``, a plain ASGI middleware, so none of this depends on FastAPI's own request handling):

- Host: only the loopback names and the bound host (any IP literal when bound to every address,
  since a name is what a rebinding attack needs); anything else is a 400.
- Origin: a request that changes anything (every method but GET and HEAD) must come from the
  page's own origin: an ``Origin`` other than ``http://HOST`` of the request, or a browser's
  ``Sec-Fetch-Site`` of cross-site or same-site, is a 403.
- Token: every ``/api/`` request carries the per-launch token (``X-Tunesmith-Token``; a GET may
  put it in ``?token=`` instead, for links and images), compared in constant time; else a 401.
  The page reads it once from its address (``tunesmith ui`` prints it there). A custom header
  cannot be sent across origins without a CORS preflight, which this server never grants.
- Headers on every response: a Content-Security-Policy that allows the page's own scripts and
  nothing inline, nosniff, no framing, no referrer (the page's address holds the token).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from urllib.parse import parse_qs

TOKEN_HEADER = "x-tunesmith-token"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
               "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
SAFE_METHODS = ("GET", "HEAD")
COMMON_HEADERS = [(b"content-security-policy", PAGE_POLICY.encode()), (b"x-content-type-options", b"nosniff"),
                  (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
                  (b"cache-control", b"no-store")]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:7860`` -> ``::1``."""
    if header.startswith("["):
        return header[1:].partition("]")[0].lower()
    return header.rpartition(":")[0].lower() if header.count(":") == 1 else header.lower()


def _ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Guard:
    """ASGI middleware: Host, Origin and token checks, and the security headers on every response."""

    def __init__(self, app, bound_host: str, token: str | None):
        self.app = app
        self.token = hashlib.sha256(token.encode()).digest() if token else None
        self.bound = bound_host.strip("[]").lower()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            status, message = refusal
            return await _send_json(send, status, {"error": message})

        async def with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *[h for h in COMMON_HEADERS if h[0] not in present]]}
            await send(message)

        await self.app(scope, receive, with_headers)

    def refusal(self, scope, headers: dict) -> tuple[int, str] | None:
        """(status, message) for a request to refuse, None for one to serve."""
        host = headers.get("host", "")
        if not self.allowed_host(host_name(host)):
            return 400, f"Host {host!r} is not this server's: open it by its own address (e.g. 127.0.0.1)"
        if scope["method"] not in SAFE_METHODS and not self.same_origin(scope, headers, host):
            return 403, "this request came from another web page's origin; only the tunesmith page may change things"
        if scope["path"].startswith("/api/") and not self.authorized(scope, headers):
            return 401, ("missing or wrong token: open the address `tunesmith ui` printed (it ends in ?token=...), "
                         "or send the header X-Tunesmith-Token")
        return None

    def allowed_host(self, name: str) -> bool:
        if name in LOOPBACK or name == self.bound:
            return True
        return self.bound in WILDCARD and _ip_literal(name)

    @staticmethod
    def same_origin(scope, headers: dict, host: str) -> bool:
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return False
        origin = headers.get("origin")
        # No Origin: not a browser's cross-origin request (browsers send it on every one); the token decides.
        return origin is None or origin.lower() == f"{scope.get('scheme', 'http')}://{host}".lower()

    def authorized(self, scope, headers: dict) -> bool:
        if self.token is None:
            return True
        given = headers.get(TOKEN_HEADER)
        if given is None and scope["method"] in SAFE_METHODS:
            given = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [None])[0]
        # Digests of equal length: the comparison's time says nothing of the token or its length.
        return given is not None and hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self.token)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *COMMON_HEADERS]})
    await send({"type": "http.response.body", "body": data})
