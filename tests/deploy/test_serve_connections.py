"""Clients that misbehave on the wire: slow or huge headers, slow bodies, too many connections;
and a SIGTERM while requests are in flight. Raw sockets against a real server subprocess."""

from __future__ import annotations

import contextlib
import json
import select
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from .test_serve_limits import serving

REQUEST_HEAD = b"POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def status_and_detail(response: bytes) -> tuple[int, str]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["detail"]


def open_sockets(pid: int) -> int:
    return sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir() if "socket:" in str(fd.readlink()))


def wait_closed(socks: list[socket.socket], timeout: float) -> list[bytes | None]:
    """What each socket received until the server closed it; None for one still open after
    ``timeout`` seconds."""
    received: dict[socket.socket, bytes] = {sock: b"" for sock in socks}
    closed: set[socket.socket] = set()
    deadline = time.monotonic() + timeout
    while len(closed) < len(socks) and time.monotonic() < deadline:
        readable, _, _ = select.select([s for s in socks if s not in closed], [], [], 0.1)
        for sock in readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if chunk:
                received[sock] += chunk
            else:
                closed.add(sock)
    return [received[sock] if sock in closed else None for sock in socks]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="reads /proc")
def test_slow_clients_are_cut_off_and_do_not_starve_normal_ones(tabular) -> None:
    cap, header_timeout = 10, 1.0
    body = json.dumps({"instances": tabular["x"][:2].tolist()})
    with serving(
        tabular["dir"],
        "--header-timeout", str(header_timeout),
        "--max-connections", str(cap),
    ) as served:  # fmt: skip
        before = open_sockets(served.proc.pid)
        # 30 slow clients: a third send nothing, a third start a request and stop, a third
        # add a header byte every 0.2 s
        slow = [connect(served.port) for _ in range(30)]
        for sock in slow[1::3] + slow[2::3]:
            sock.sendall(REQUEST_HEAD + b"X-Slow: ")
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.2):
                for sock in slow[2::3]:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"a")

        trickler = threading.Thread(target=trickle)
        trickler.start()
        time.sleep(0.3)
        held = open_sockets(served.proc.pid) - before
        # meanwhile normal requests, each on a new connection, are served
        statuses = [
            httpx.post(
                f"{served.url}/v1/predict",
                content=body,
                headers={"Content-Type": "application/json"},
            ).status_code
            for _ in range(5)
        ]
        answers = wait_closed(slow, timeout=header_timeout + 2)
        stop.set()
        trickler.join()
        for sock in slow:
            sock.close()
    assert statuses == [200] * 5
    assert held <= cap, f"{held} connections held with a cap of {cap}"
    # every slow client was disconnected within the header timeout: the ones beyond the cap at
    # once, the others after the timeout, with a 408 if they had started a request
    assert None not in answers, f"{answers.count(None)} slow clients still connected"
    late = [a for a in answers if a]
    assert late and all(a.startswith(b"HTTP/1.1 408 ") for a in late), late[:3]
    assert "did not arrive within 1 s" in status_and_detail(late[0])[1]


def test_headers_beyond_the_limit_get_431_and_a_slow_body_408(tabular) -> None:
    with serving(tabular["dir"], "--body-timeout", "1") as served:
        sock = connect(served.port)
        sock.sendall(REQUEST_HEAD + b"X-Big: " + b"a" * 40_000)  # and it never ends
        status, detail = status_and_detail(read_until_closed(sock, timeout=10))
        assert status == 431 and "larger than 32 KiB" in detail

        sock = connect(served.port)
        start = time.monotonic()
        sock.sendall(REQUEST_HEAD + b"Content-Length: 1000\r\n\r\n" + b'{"instances": ')
        status, detail = status_and_detail(read_until_closed(sock, timeout=10))
        assert status == 408 and "request body did not arrive within 1 s" in detail
        assert time.monotonic() - start < 5

        r = httpx.post(f"{served.url}/v1/predict", json={"instances": tabular["x"][:1].tolist()})
        assert r.status_code == 200  # still serving
        metrics = httpx.get(f"{served.url}/metrics").text
    assert 'gradwise_errors_total{endpoint="/v1/predict",reason="client_closed"} 1.0' in metrics


@pytest.mark.slow
def test_sigterm_answers_every_request_already_sent_and_exits_0(tabular) -> None:
    rows = [tabular["x"][i % len(tabular["x"])] for i in range(1000)]
    body = json.dumps({"instances": [r.tolist() for r in rows]}).encode()
    request = REQUEST_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body
    with serving(tabular["dir"], stop=signal.SIGTERM) as served:
        socks = [connect(served.port) for _ in range(32)]
        sent = threading.Barrier(33)
        answers: list[bytes | str] = [b""] * 32

        def client(i: int) -> None:
            try:
                socks[i].sendall(request)
                sent.wait()
                answers[i] = read_until_closed_or_answered(socks[i])
            except OSError as e:
                answers[i] = repr(e)
            finally:
                socks[i].close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        sent.wait()  # every request has been sent, few have been answered
        served.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        exit_code = served.proc.wait(timeout=60)
    statuses = [a[9:12] if isinstance(a, bytes) else a for a in answers]
    assert all(s in (b"200", b"503") for s in statuses), statuses  # no reset, no silence
    assert statuses.count(b"200") >= 1
    assert exit_code == 0, served.output


def read_until_closed_or_answered(sock: socket.socket) -> bytes:
    """One HTTP response: the head, then Content-Length bytes of body."""
    sock.settimeout(60)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body
