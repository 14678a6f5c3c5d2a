"""Stand-ins for the world around a node: HTTP peers on loopback, and the host programs the
service runs (``tailscale``, ``nvidia-smi``, ``nvidia-ctk``).

A :class:`FakePeer` is an HTTP server on its own thread (so it answers even while the test's
event loop waits, and a service process can reach it), bound to one loopback address. It records
every request (method, path with query, headers) and answers from a table of routes.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A route answers one request: a canned (status, headers, body), or a function that writes the
# answer itself (it gets the handler and the peer's stop event).
Answer = tuple[int, dict[str, str], bytes]
Behaviour = Callable[[http.server.BaseHTTPRequestHandler, threading.Event], None]
Route = Answer | Behaviour


def json_answer(value: Any, status: int = 200) -> Answer:
    return status, {"Content-Type": "application/json"}, json.dumps(value).encode()


NOT_FOUND = json_answer({"message": "Not Found"}, 404)
# What a clawdspace node says on /api/health (the probe looks for "status" and "version").
CLAWDSPACE_HEALTH = json_answer({"status": "ok", "version": "0.0.0-fake",
                                 "docker": {"ok": True}})


def redirect(location: str, status: int = 302) -> Answer:
    return status, {"Location": location, "Content-Type": "text/plain"}, b"moved\n"


def hang(handler: http.server.BaseHTTPRequestHandler, stop: threading.Event) -> None:
    """Read the request, then never answer, until the client hangs up (or the peer closes)."""
    conn = handler.connection
    deadline = time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < deadline:
        readable, _, _ = select.select([conn], [], [], 0.05)
        if readable:
            try:
                if not conn.recv(1, socket.MSG_PEEK):
                    return  # the client closed its end
            except OSError:
                return


def trickle(handler: http.server.BaseHTTPRequestHandler, stop: threading.Event) -> None:
    """Promise a large JSON answer, then send it one byte a second."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    handler.wfile.write(b'{"status": "ok", "version": "')
    handler.wfile.flush()
    while not stop.wait(1):
        try:
            handler.wfile.write(b"x")
            handler.wfile.flush()
        except OSError:
            return


def in_pieces(value: Any, piece: int = 1000, pause: float = 0.3) -> Behaviour:
    """A JSON answer that arrives in several TCP writes with pauses between them, as a long
    answer does over a real network (a tailnet's MTU is 1280)."""
    body = json.dumps(value).encode()

    def send(handler: http.server.BaseHTTPRequestHandler, stop: threading.Event) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.flush()
        for start in range(0, len(body), piece):
            handler.wfile.write(body[start:start + piece])
            handler.wfile.flush()
            if stop.wait(pause):
                return

    return send


@dataclasses.dataclass
class Seen:
    """One request a fake peer received."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]

    @property
    def route(self) -> str:
        return self.path.split("?", 1)[0]


class FakePeer:
    """``FakePeer(host, port, routes)``: an HTTP/1.1 server on a thread; ``close()`` stops it."""

    def __init__(self, host: str, port: int, routes: dict[str, Route] | None = None,
                 default: Route = NOT_FOUND) -> None:
        self.host, self.port = host, port
        self.routes = dict(routes or {})
        self.default = default
        self.seen: list[Seen] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        peer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base name
                pass

            def _handle(self) -> None:
                with peer.lock:
                    peer.seen.append(Seen(self.command, self.path, dict(self.headers.items())))
                    peer.active += 1
                    peer.max_active = max(peer.max_active, peer.active)
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    if length:
                        self.rfile.read(length)
                    route = peer.routes.get(self.path.split("?", 1)[0], peer.default)
                    if callable(route):
                        route(self, peer.stop)
                        self.close_connection = True
                        return
                    status, headers, body = route
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    self.close_connection = True
                finally:
                    with peer.lock:
                        peer.active -= 1

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 128  # many probes may connect at once
            daemon_threads = True

        self.server = Server((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def requests(self) -> list[Seen]:
        with self.lock:
            return list(self.seen)

    def routes_seen(self) -> set[str]:
        return {seen.route for seen in self.requests()}

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def __enter__(self) -> FakePeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(check: Callable[[], object], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Host programs
# ---------------------------------------------------------------------------------------------

def executable(path: Path, script: str) -> str:
    """Write a ``#!/bin/sh`` script to ``path`` (mode 755); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def fake_tailscale(directory: Path, status: dict[str, Any] | None, sleep: float = 0) -> str:
    """A ``tailscale`` that answers ``status --json`` with ``status`` (written beside it) and
    logs every call's arguments and pid to ``calls.log``; ``sleep`` makes it hang first."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "status.json"
    data.write_text(json.dumps(status) if status is not None else "not json at all")
    log = shlex.quote(str(directory / "calls.log"))
    body = f'echo "$$ $*" >> {log}\n'
    if sleep:
        body += f"exec sleep {sleep:g}\n"
    body += ('[ "$1 $2" = "status --json" ] || { echo "unexpected arguments: $*" >&2; exit 2; }\n'
             f"exec cat {shlex.quote(str(data))}\n")
    return executable(directory / "tailscale", body)


def tailscale_calls(directory: Path) -> list[tuple[int, str]]:
    """(pid, arguments) of each call of the fake tailscale in ``directory``."""
    log = directory / "calls.log"
    if not log.exists():
        return []
    calls = []
    for line in log.read_text().splitlines():
        pid, _, args = line.partition(" ")
        calls.append((int(pid), args))
    return calls


GPU_QUERY_ARGS = ("--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu "
                  "--format=csv,noheader,nounits")


def nvidia_smi_script(directory: Path, rows: list[str], exit_code: int = 0) -> str:
    """An ``nvidia-smi`` that prints ``rows`` for the service's exact query (and fails with
    exit 2 for any other arguments, so a changed query shows up as "no GPU")."""
    lines = "".join(f"echo {shlex.quote(row)}\n" for row in rows)
    body = (f'[ "$*" = {shlex.quote(GPU_QUERY_ARGS)} ] || '
            '{ echo "unexpected arguments: $*" >&2; exit 2; }\n'
            f"{lines}exit {exit_code}\n")
    return executable(directory / "nvidia-smi", body)


def gpu_row(index: int, uuid: str, name: str = "NVIDIA H100 80GB HBM3", total: str = "81559",
            used: str = "0", util: str = "0") -> str:
    """One line of ``nvidia-smi --query-gpu=<GPU_QUERY> --format=csv,noheader,nounits``."""
    return f"{index}, {uuid}, {name}, {total}, {used}, {util}"


def toolkit_dir(directory: Path) -> str:
    """A directory holding a stand-in ``nvidia-ctk`` (the NVIDIA Container Toolkit's CLI), to
    put on a service's PATH: the service then believes Docker can pass GPUs."""
    executable(directory / "nvidia-ctk", 'echo "NVIDIA Container Toolkit CLI version 0.0-fake"\n')
    return str(directory)
