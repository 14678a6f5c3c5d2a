#!/usr/bin/env python3
"""A TCP listener for network tests: it records every connection and what was sent on it.

    listener.py PORT LOG

Each connection is logged as it is accepted (``{"event": "connect", "peer": ...}``) and again with
what the client sent (``{"event": "data", "peer": ..., "data": "<latin-1 text>"}``), one JSON line
each.
It answers like an HTTP server that wants credentials (401 + ``WWW-Authenticate: Basic``), so a
client that would hand out a token (git through a proxy, say) sends it here and the log shows it.
A plain ``curl`` sees a complete HTTP answer and exits 0.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading

REPLY = (b"HTTP/1.0 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"cst\"\r\n"
         b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: close\r\n\r\n"
         b"cst-listener\n")


def serve(port: int, log_path: str) -> None:
    lock = threading.Lock()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))  # noqa: S104 - inside a test network namespace
    server.listen(64)

    def record(event: dict[str, str]) -> None:
        with lock, open(log_path, "a", encoding="utf-8") as log:
            log.write(json.dumps(event) + "\n")

    def handle(conn: socket.socket, peer: tuple[str, int]) -> None:
        record({"event": "connect", "peer": peer[0]})
        data = b""
        conn.settimeout(2)
        try:
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        record({"event": "data", "peer": peer[0], "data": data.decode("latin-1")})
        with contextlib.suppress(OSError):
            conn.sendall(REPLY)
        conn.close()

    while True:
        conn, peer = server.accept()
        threading.Thread(target=handle, args=(conn, peer), daemon=True).start()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
