"""Serving the app: bind first (so the printed URL is the one bound), and time out slow headers.

uvicorn closes idle keep-alive connections but waits for ever on a connection that never
finishes its request headers, so a few thousand such connections exhaust the server.
`HeaderTimeoutH11` closes any connection whose request headers are not complete within
`HEADER_TIMEOUT` seconds of its first byte (or of opening it); `limit_concurrency` bounds the
connections served at once (uvicorn answers 503 beyond it).
"""

from __future__ import annotations

import asyncio
import socket

from ..core.errors import DitfError

#: seconds a client has to send a request's headers
HEADER_TIMEOUT = 10.0
#: connections and requests served at once
CONCURRENCY = 64
#: largest request head (request line + headers) h11 buffers, in bytes
MAX_HEAD_BYTES = 16 * 1024


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 picks a free one. One error line when taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise DitfError(f"cannot serve on {host}: the address does not resolve ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT port is free; a listening one is not
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        why = "the port is in use (pick another with --port, or --port 0 for a free one)" if exc.errno in (98, 48) \
            else (exc.strerror or str(exc))
        raise DitfError(f"cannot serve on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    """The base URL of a bound socket (the port actually bound, brackets around IPv6)."""
    port = sock.getsockname()[1]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def header_timeout_protocol(timeout: float = HEADER_TIMEOUT):
    """uvicorn's h11 protocol with a deadline for request headers (module docstring)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # headers not complete yet (or a next request begins)
                if self._deadline is None:
                    self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()

    return HeaderTimeoutH11


def server_config(app, header_timeout: float = HEADER_TIMEOUT):
    """The uvicorn configuration `ditf view` serves with (tests use it too)."""
    import uvicorn

    return uvicorn.Config(app, log_level="warning", http=header_timeout_protocol(header_timeout),
                          limit_concurrency=CONCURRENCY, timeout_keep_alive=5,
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES)
