#!/usr/bin/env python3
"""A small smart-HTTP git server for tests: ``git http-backend`` as CGI behind basic auth.

    CST_GIT_PASSWORD=TOKEN gitserver.py --root DIR --port PORT --log FILE
                 [--private PREFIX] [--slow PREFIX --gate FILE]

Repositories are the bare repositories under DIR (``DIR/<name>.git``). Pushes (receive-pack)
always need the password; fetches need it for repositories whose name starts with ``--private``.
A wrong or missing password gets ``401`` with ``WWW-Authenticate: Basic``, so git asks its
credential helper. Authorized requests to repositories whose name starts with ``--slow`` are
answered only once the file ``--gate`` exists (the test writes it when it has watched the push
run long enough).

The password comes from the environment, so it is in no process's argv.
Every request is logged to FILE as one JSON line: method, path, query, whether an Authorization
header came and whether it was right, the status. The password itself is never written.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class GitHandler(BaseHTTPRequestHandler):
    server_version = "cst-gitserver/1"
    options: argparse.Namespace
    log_lock = threading.Lock()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        return  # the JSON log below is the only log

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self.handle_git()

    def do_POST(self) -> None:  # noqa: N802
        self.handle_git()

    def record(self, **event: object) -> None:
        with self.log_lock, open(self.options.log, "a", encoding="utf-8") as log:
            log.write(json.dumps(event) + "\n")

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def check_auth(self) -> tuple[str, str]:
        """(``none`` | ``ok`` | ``bad``, user)."""
        header = self.headers.get("Authorization")
        if not header:
            return "none", ""
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return "bad", ""
        try:
            user, _, password = base64.b64decode(encoded.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return "bad", ""
        ok = hmac.compare_digest(password.encode(), self.options.password.encode())
        return ("ok" if ok else "bad"), user

    def handle_git(self) -> None:
        path, _, query = self.path.partition("?")
        repo = path.lstrip("/").split("/", 1)[0]
        push = path.endswith("/git-receive-pack") or "service=git-receive-pack" in query
        needs_auth = push or bool(self.options.private and repo.startswith(self.options.private))
        auth, user = self.check_auth()
        if needs_auth and auth != "ok":
            body = self.read_body()
            self.record(method=self.command, path=path, query=query, auth=auth, status=401,
                        bytes=len(body))
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="cst-git"')
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "13")
            self.end_headers()
            self.wfile.write(b"unauthorized\n")
            return
        if self.options.slow and repo.startswith(self.options.slow):
            while not os.path.exists(self.options.gate):
                time.sleep(0.05)
        body = self.read_body()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": self.options.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": user,
            "REMOTE_ADDR": self.client_address[0],
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": self.options.root,
        }
        result = subprocess.run(["git", "http-backend"], input=body, env=env,  # noqa: S607
                                capture_output=True, check=False)
        head, sep, payload = result.stdout.partition(b"\r\n\r\n")
        if not sep:
            head, sep, payload = result.stdout.partition(b"\n\n")
        status = 200
        headers: list[tuple[str, str]] = []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.record(method=self.command, path=path, query=query, auth=auth, status=status,
                    bytes=len(body), backendExit=result.returncode)
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--private", default="")
    parser.add_argument("--slow", default="")
    parser.add_argument("--gate", default="")
    options = parser.parse_args()
    if options.slow and not options.gate:
        parser.error("--slow needs --gate")
    options.password = os.environ["CST_GIT_PASSWORD"]
    GitHandler.options = options
    server = ThreadingHTTPServer(("0.0.0.0", options.port), GitHandler)  # noqa: S104 - test netns
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
