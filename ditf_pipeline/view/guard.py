"""What stands between `ditf view` and the other web pages a user visits: an ASGI middleware.

A page on another origin can make the browser send requests to 127.0.0.1: classic CSRF (a form
or a ``text/plain`` POST needs no preflight) and DNS rebinding (a name of the attacker's that
resolves to 127.0.0.1 makes the browser treat the app as same-origin, so it can read answers).
Three checks, before the app sees a request, as Jupyter's server makes them:

* the ``Host`` header must name the bound address or a loopback name (a rebound name never
  does, so nothing is served to it, reads included);
* every state-changing request (anything but GET / HEAD / OPTIONS) carries the per-run token
  in the ``X-Ditf-Token`` header: the token is printed in the URL only, and a custom header
  cannot be sent cross-origin without a preflight the app never grants;
* request bodies are bounded per route (read up to the limit, 413 beyond it), so a huge body
  costs at most the limit in memory.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: the header the page sends the token in
TOKEN_HEADER = "x-ditf-token"
#: names a browser on this machine uses for a loopback server
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: body limit of every route not named in `body_limits` (a click is a few hundred bytes)
DEFAULT_BODY_LIMIT = 64 * 1024
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def new_token() -> str:
    """A fresh per-run token (128 random bits, URL-safe)."""
    return secrets.token_urlsafe(16)


def host_name(header: str) -> str:
    """The host part of a Host header value, lower case, without port or IPv6 brackets."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def allowed_hosts(bound: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The Host names to serve: the bound address, the loopback names and any the user added."""
    return frozenset(host_name(h) for h in (bound, *LOOPBACK_HOSTS, *extra) if h and host_name(h) not in ("0.0.0.0", "::"))


class Guard:
    """ASGI middleware applying the Host allow-list, the token and the body limits (module docstring)."""

    def __init__(self, app: ASGIApp, token: str, hosts: Iterable[str], body_limits: Mapping[str, int] | None = None,
                 default_limit: int = DEFAULT_BODY_LIMIT) -> None:
        self.app = app
        self.token = token
        self.hosts = frozenset(hosts)
        self.body_limits = dict(body_limits or {})
        self.default_limit = default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = host_name(headers.get("host", ""))
        if host not in self.hosts:
            await _reply(send, 403, f"host {host or '(none)'!r} is not served here: open the URL `ditf view` printed "
                                    "(or start it with --allow-host NAME)")
            return
        if scope["method"] not in _SAFE_METHODS and not secrets.compare_digest(
                headers.get(TOKEN_HEADER, "").encode(), self.token.encode()):
            await _reply(send, 403, "missing or wrong token: open the URL `ditf view` printed (it carries ?token=...)")
            return
        limit = self.body_limits.get(scope["path"], self.default_limit)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _reply(send, 413, f"request body too large: the limit of {scope['path']} is {limit} bytes")
            return
        if scope["method"] in _SAFE_METHODS and declared is None and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await _reply(send, 413, f"request body too large: the limit of {scope['path']} is {limit} bytes")
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reply(send: Send, status: int, message: str) -> None:
    payload = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
