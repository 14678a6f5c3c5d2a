"""A test host in a network namespace of our own: the only place network tests send traffic to.

The namespace ``cst-<hex>`` is joined to the host by a veth pair: the host side holds
``10.213.X.1/24``, the namespace side ``10.213.X.2/24`` (default route back through ``.1``).
It also holds a link-local address (``169.254.X.77``, a cloud-metadata stand-in) and a CGNAT one
(``100.64.X.77``, a tailnet stand-in), routed to it from the host. Servers run inside with
``ip netns exec``. Everything is removed by :meth:`NetnsHost.close`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SUPPORT = Path(__file__).resolve().parent


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a host command (fixed argv, no shell)."""
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def used_third_octets() -> set[int]:
    routes = sh("ip", "-4", "route", "show").stdout + sh("ip", "-4", "addr", "show").stdout
    used = set()
    for word in routes.split():
        for prefix in ("10.213.", "169.254.", "100.64."):
            if word.startswith(prefix):
                with contextlib.suppress(ValueError, IndexError):
                    used.add(int(word[len(prefix):].split(".")[0].split("/")[0]))
    return used


@dataclasses.dataclass
class Listener:
    """A TCP listener in the namespace that logs each connection (tests/support/listener.py)."""

    host: NetnsHost
    port: int
    log: Path

    def events(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def connections(self) -> int:
        return sum(1 for event in self.events() if event.get("event") == "connect")

    def received(self, since: int = 0) -> str:
        """What clients sent, from event number ``since`` on."""
        return "".join(str(e.get("data", "")) for e in self.events()[since:]
                       if e.get("event") == "data")


def probe_logged(events: list[dict[str, Any]]) -> bool:
    """Has every connection so far been logged whole (a connect line and its data line)?"""
    kinds = [event.get("event") for event in events]
    return kinds.count("connect") >= 1 and kinds.count("connect") == kinds.count("data")


@dataclasses.dataclass
class NetnsHost:
    ns: str
    veth: str
    octet: int
    workdir: Path
    processes: list[subprocess.Popen[bytes]] = dataclasses.field(default_factory=list)
    next_port: int = 18000

    @property
    def subnet(self) -> str:
        return f"10.213.{self.octet}.0/24"

    @property
    def gateway(self) -> str:
        """The host's own side of the veth (an address of the host, not of the test host)."""
        return f"10.213.{self.octet}.1"

    @property
    def ip(self) -> str:
        return f"10.213.{self.octet}.2"

    @property
    def link_local(self) -> str:
        return f"169.254.{self.octet}.77"

    @property
    def cgnat(self) -> str:
        return f"100.64.{self.octet}.77"

    @classmethod
    def create(cls, workdir: Path) -> NetnsHost:
        used = used_third_octets()
        octet = random.choice([n for n in range(10, 250) if n not in used])
        tag = secrets.token_hex(3)
        host = cls(ns=f"cst-{tag}", veth=f"vcs{tag}", octet=octet, workdir=workdir)
        inner = f"vcn{tag}"
        try:
            sh("ip", "netns", "add", host.ns)
            sh("ip", "link", "add", host.veth, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", host.ns)
            sh("ip", "addr", "add", f"{host.gateway}/24", "dev", host.veth)
            sh("ip", "link", "set", host.veth, "up")
            for argv in (["ip", "link", "set", "lo", "up"],
                         ["ip", "addr", "add", f"{host.ip}/24", "dev", inner],
                         ["ip", "link", "set", inner, "up"],
                         ["ip", "route", "add", "default", "via", host.gateway],
                         ["ip", "addr", "add", f"{host.link_local}/32", "dev", "lo"],
                         ["ip", "addr", "add", f"{host.cgnat}/32", "dev", "lo"]):
                sh("ip", "netns", "exec", host.ns, *argv)
            for address in (host.link_local, host.cgnat):
                sh("ip", "route", "add", f"{address}/32", "via", host.ip, "dev", host.veth)
        except BaseException:
            host.close()
            raise
        return host

    def port(self) -> int:
        self.next_port += 1
        return self.next_port

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """A process inside the namespace; stopped by close()."""
        log = open(self.workdir / f"proc-{len(self.processes)}.log", "wb")  # noqa: SIM115
        with log:
            process = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv],
                                       env={**os.environ, **(env or {})}, stdout=log,
                                       stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def wait_port(self, port: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((self.ip, port), 0.5):
                return
            time.sleep(0.05)
        raise AssertionError(f"nothing listens on {self.ip}:{port} in {self.ns}")

    def listener(self) -> Listener:
        """A fresh connection-logging listener on a port of its own.

        Note: waiting for it to listen connects once from the host; that connection is not
        in the log, because the log starts empty only after the wait.
        """
        port = self.port()
        log = self.workdir / f"listener-{port}.jsonl"
        listener = Listener(self, port, log)
        self.start([sys.executable, str(SUPPORT / "listener.py"), str(port), str(log)])
        self.wait_port(port)
        # The readiness probe's own lines (connect, then data once it hung up) land first.
        deadline = time.monotonic() + 30
        while not probe_logged(listener.events()):
            if time.monotonic() > deadline:
                raise AssertionError(f"the listener never logged its readiness probe: {log}")
            time.sleep(0.05)
        log.unlink()
        return listener

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()
        # Deleting the namespace deletes the veth pair and with it the routes through it.
        sh("ip", "link", "del", self.veth, check=False)
        sh("ip", "netns", "del", self.ns, check=False)
