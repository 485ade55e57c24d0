"""The HTTP server of ``gradwise serve``: uvicorn, with the limits it lacks.

uvicorn (0.3x-0.5x) times out only idle kept-alive connections and limits neither header sizes
(with httptools) nor open connections, so a handful of slow or greedy clients can hold a server:
1,100 connections that send their headers one byte at a time exhaust its file descriptors.
:class:`LimitedProtocol` extends uvicorn's httptools protocol with :class:`ServerLimits`: a
deadline for the request headers and one for the body (408), a header size limit (431), and a cap
on open connections at which a new connection closes the one that has waited longest without a
request in progress (idle, or slow to send its headers), so slow clients cannot starve others.

Shutdown answers every request that has been received: :class:`GracefulServer` lets the event loop
accept the connections waiting in the listen queue before it closes the listening socket, and
:meth:`LimitedProtocol.shutdown` keeps a connection whose request has arrived (even in part, or
still in the socket) open until it is answered, where uvicorn would close it (a reset).
"""

from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gradwise.errors import ConfigError

logger = logging.getLogger("gradwise.serve")


@dataclass(frozen=True)
class ServerLimits:
    """What one connection may take of the server; uvicorn enforces none of these."""

    header_timeout: float = 10.0
    """Seconds from a new connection (or the first byte of the next request on a kept-alive one)
    to the end of the request headers; then 408 and the connection is closed."""
    body_timeout: float = 30.0
    """Seconds from the end of the headers to the end of the body; then 408."""
    max_connections: int = 1000
    """Open connections per worker process; at the cap, a new connection closes the one that has
    waited longest without a request in progress (idle, or still sending headers), or gets 503."""
    max_header_bytes: int = 32 * 1024
    """Request line and headers; more: 431."""
    linger: float = 1.0
    """Seconds a rejected connection is read and discarded after the answer, so that the client
    reads the answer instead of a reset."""

    def __post_init__(self) -> None:
        for field in ("header_timeout", "body_timeout", "linger"):
            if not getattr(self, field) > 0:
                raise ConfigError(field, getattr(self, field), "a positive number of seconds")
        for field in ("max_connections", "max_header_bytes"):
            if not getattr(self, field) >= 1:
                raise ConfigError(field, getattr(self, field), "a positive integer")


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`ServerLimits` and a graceful shutdown that
    answers a request that has arrived (even in part) instead of closing its connection.

    The parser's callbacks only note where a request is (headers, body); after each read,
    :meth:`data_received` starts the deadline of the part still missing, so a request that
    arrives in one read, the usual case, starts no timer at all.
    """

    def __init__(self, *args: Any, limits: ServerLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._timer: asyncio.TimerHandle | None = None
        self._timer_for: str | None = None  # "headers" or "body"
        self._in_headers = False
        self._in_body = False
        self._header_bytes = 0
        self._rejected = False  # answered with an error: what the client still sends is dropped
        self._draining = False
        self._waiting_since = time.monotonic()

    # -- connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            _warn_once(f"{self.limits.max_connections} connections are busy: refusing new ones")
            self._reject(503, "the server is at its connection limit; retry later", linger=False)
            return
        self._deadline("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _waiting(self) -> bool:
        """No request in progress: idle between requests, or still sending headers."""
        return not self.transport.is_closing() and (
            self.cycle is None or self.cycle.response_complete
        )

    def _make_room(self) -> bool:
        """Close the connection (other than this one) that has waited longest without a request
        in progress, rejected ones first; False when every connection is busy."""
        waiting = [
            p
            for p in self.connections
            if p is not self and isinstance(p, LimitedProtocol) and p._waiting()
        ]
        if not waiting:
            return False
        victim = min(waiting, key=lambda p: (not p._rejected, p._waiting_since))
        victim._cancel()
        victim._rejected = True
        victim.transport.close()
        return True

    # -- the parser's events

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        super().data_received(data)
        if self._rejected or self.transport.is_closing():
            return
        if self._in_headers:
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                kib = self.limits.max_header_bytes / 1024
                self._reject(431, f"the request line and headers are larger than {kib:g} KiB")
            else:
                self._deadline("headers")
        elif self._in_body:
            self._deadline("body")
        elif self.cycle is None or self.cycle.response_complete:
            self._deadline("headers")  # bytes but no request yet (uvicorn stopped its idle timer)
        else:
            self._cancel()  # a whole request: the app has it

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers, self._header_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._in_headers, self._in_body = False, True
        super().on_headers_complete()
        if self._draining:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._waiting_since = time.monotonic()
        super().on_response_complete()

    def shutdown(self) -> None:
        """Close the connection if it is idle; answer a request that has arrived first."""
        self._draining = True
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self._rejected and (self._in_headers or self._unread()):
            return  # its request is answered with Connection: close
        super().shutdown()

    def _unread(self) -> bool:
        """Whether bytes (a request, or the client's close) wait in the socket."""
        sock = self.transport.get_extra_info("socket")
        try:
            return bool(sock is not None and select.select([sock.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    # -- deadlines and rejections

    def _deadline(self, part: str) -> None:
        """Start the deadline for the request's ``part`` (headers or body), unless it runs."""
        if self._timer_for != part:
            self._cancel()
            seconds = self.limits.header_timeout if part == "headers" else self.limits.body_timeout
            self._timer = self.loop.call_later(seconds, self._late)
            self._timer_for = part

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_for = None

    def _late(self) -> None:
        part, self._timer, self._timer_for = self._timer_for, None, None
        seconds = self.limits.header_timeout if part == "headers" else self.limits.body_timeout
        if self._in_headers or self._in_body:
            what = "headers" if self._in_headers else "body"
            self._reject(408, f"the request {what} did not arrive within {seconds:g} s")
        elif not self.transport.is_closing():  # a connection that never sent a request
            self.transport.close()

    def _reject(self, status: int, detail: str, linger: bool = True) -> None:
        """Answer ``status`` with Connection: close, then read and drop what the client still
        sends for ``limits.linger`` seconds, so it sees the answer instead of a reset."""
        self._rejected = True
        self._cancel()
        self._unset_keepalive_if_required()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() returns http.disconnect
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        body = json.dumps({"detail": detail}).encode()
        head = [STATUS_LINE[status]]
        head += [b"%s: %s\r\n" % (name, value) for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        if linger and self.transport.can_write_eof():
            self.transport.write_eof()
            self._timer = self.loop.call_later(self.limits.linger, self.transport.close)
            self._timer_for = "linger"
        else:
            self.transport.close()


_last_warning = 0.0


def _warn_once(message: str, every: float = 10.0) -> None:
    """Log ``message`` at most once per ``every`` seconds (a flood would flood the log)."""
    global _last_warning
    if time.monotonic() - _last_warning > every:
        _last_warning = time.monotonic()
        logger.warning(message)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, whose shutdown first lets the event loop accept the connections waiting
    in the listen queue: closing the listening socket would reset them, requests and all. Their
    requests are answered like the others (with Connection: close)."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        fds = [s.fileno() for s in sockets or []]
        deadline = time.monotonic() + 1.0
        while fds and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the loop accepts what is waiting
            if not select.select(fds, [], [], 0)[0]:
                break
        await super().shutdown(sockets)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a port in use is a clear error before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(
            "port", port, "a free port on this host", f"{host}:{port}: {e.strerror}"
        ) from None
    sock.set_inheritable(True)
    return sock


def within_file_limit(limits: ServerLimits) -> ServerLimits:
    """``limits`` with ``max_connections`` the process can open: the soft limit on open files is
    raised towards the hard one when needed, else the cap is lowered (with a warning)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return limits
    spare = 64  # files, ONNX Runtime, the listening socket, logs
    need = limits.max_connections + spare
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
        if soft < need:
            cap = max(1, soft - spare)
            logger.warning(
                "max_connections %d is more than this process may open (%d files): using %d",
                limits.max_connections, soft, cap,
            )  # fmt: skip
            limits = ServerLimits(**{**asdict(limits), "max_connections": cap})
    return limits
