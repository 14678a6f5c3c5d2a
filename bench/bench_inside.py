#!/usr/bin/env python3
"""Clawdspace inside-a-space benchmark: files, terminal and stats through the API vs the engine.

    python bench/bench_inside.py [--size-mb 200] [--rounds 3] [--cat-mb 100] [--keys 50]
                                 [--stats-calls 20] [--trace]

One run starts its own service (``Service`` from bench_api.py: loopback port, random key, data
directory and name prefix), creates one space through the API and measures, against the same
container reached directly through the docker SDK:

* files: a ``--size-mb`` file uploaded with ``PUT .../file?path=`` (raw
  ``application/octet-stream`` body streamed from a temp file) vs ``APIClient.put_archive`` with
  a tar streamed from the same file; downloaded with ``GET .../file?path=&raw=true`` (streamed
  to a temp file) vs ``APIClient.get_archive`` streamed and un-tarred to a file. Every download
  is checked by sha256. While the API transfers run, a thread samples the service's VmRSS every
  50 ms (and reads VmHWM) to find its peak memory growth. A 4 KiB file each way shows the fixed
  cost of one transfer.
* terminal: ``cat`` of a ``--cat-mb`` file through ``GET .../terminal`` (websocket) vs a direct
  ``docker exec`` TTY socket running the same shell, counting bytes until a sentinel; and the
  keystroke echo round trip (one byte out, its echo back) on both.
* stats: ``GET .../stats`` vs the engine's ``stats(stream=False)`` and ``stats(one_shot=True)``.

It prints one table per part, the CPU time each party (service, dockerd, the container's shim,
this process) spent per transfer and ``cat``, a target line and the api/direct ratios;
``--trace`` adds the service's own per-request breakdown (bench_api.py's timing wrappers).
Every container, volume and temp file it made is removed at the end, also on Ctrl-C, SIGTERM
or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import os
import secrets
import shutil
import signal
import socket
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import docker
import docker.errors
import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_api import (  # noqa: E402 - bench/ is not a package
    LABEL,
    WORKSPACE,
    BenchError,
    Service,
    Stop,
    engine_and_user,
    environment,
    fmt,
    median,
    p90,
    signals_ignored,
    signals_raise,
    sweep,
)

MiB = 1 << 20
CHUNK = 1 << 20  # client-side read/write size for files
SMALL_BYTES = 4096
SMALL_SAMPLES = 10
SPACE = "io"
SPACE_MEMORY = "1g"  # room for the page cache of the test files; the limit is not under test
RSS_LIMIT_MIB = 64.0
STATS_LIMIT_MS = 100.0
SAMPLE_SECONDS = 0.05
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CPU_OWNERS = ("service", "dockerd", "shim", "client")
TERMINAL_COLS, TERMINAL_ROWS = 200, 50
SHELL = ["bash", "-l"]  # what the service runs in the sandbox image (it has bash)
TERM_ENV = {"TERM": "xterm-256color"}
KEY_WARMUP = 5  # untimed keystrokes before the echo samples
READ_TIMEOUT = 120.0
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
INTERRUPTS: list[str] = []  # signals received while the terminal part's event loop runs
TRACE_NAMES = {  # bench_api's span names, as they read for these routes
    "exec output stream (reader thread)": "Engine.stream (put_archive; raw reads; exec output)",
    "docker _stat_blocking": "docker HEAD archive (stat, path resolution)",
    "docker _open_exec": "docker exec create+start (internal exec: mv)",
}


# ###########################################################################
# Measurements
# ###########################################################################

@dataclass
class Pair:
    """One measured quantity, sampled through the API and directly."""

    label: str
    unit: str  # "ms", "s" or "MiB/s"
    api: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)  # the service's own time, when logged

    def ratio(self) -> float:
        """api/direct of the medians, as time: a throughput ratio is inverted."""
        api, direct = median(self.api), median(self.direct)
        return direct / api if self.unit == "MiB/s" else api / direct


def slow_tail(samples: list[float], unit: str) -> float:
    """p90 of times; for a throughput the same tail is its 10th percentile."""
    if unit != "MiB/s":
        return p90(samples)
    if len(samples) < 2:
        return samples[0] if samples else float("nan")
    return statistics.quantiles(samples, n=10, method="inclusive")[0]


def print_pairs(title: str, pairs: list[Pair], note: str = "") -> None:
    width = max(len(p.label) for p in pairs + [Pair(title, "")]) + 2
    head = (f"{title:<{width}}{'unit':>6}{'api med':>9}{'api p90':>9}{'srv med':>9}"
            f"{'dir med':>9}{'dir p90':>9}{'api/dir':>9}{'n':>4}")
    print(head)
    print("-" * len(head))
    for p in pairs:
        print(f"{p.label:<{width}}{p.unit:>6}{fmt(median(p.api)):>9}"
              f"{fmt(slow_tail(p.api, p.unit)):>9}{fmt(median(p.server)):>9}"
              f"{fmt(median(p.direct)):>9}{fmt(slow_tail(p.direct, p.unit)):>9}"
              f"{ratio_text(p.ratio()):>9}{len(p.api):>4}")
    if note:
        print(note)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time of a process (all its threads) so far, plus that of its reaped
    children if asked; NaN when unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = [int(f) for f in stat.read().rpartition(")")[2].split()[11:15]]
    except (OSError, ValueError):
        return float("nan")
    return sum(fields if children else fields[:2]) / CLOCK_TICKS


def engine_pids(container_id: str) -> dict[str, int]:
    """Host pids of dockerd and of the container's containerd shim, where /proc shows them."""
    found: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
            program = os.path.basename(argv[0]).decode(errors="replace")
            if program == "dockerd":
                found["dockerd"] = int(entry)
            elif program.startswith("containerd-shim") and container_id.encode() in argv:
                found["shim"] = int(entry)
    return found


class Watch:
    """One timed operation: wall time, the CPU time of the service, dockerd, the shim and this
    process, and the service's peak RSS growth (VmRSS every 50 ms in a thread, plus VmHWM)."""

    def __init__(self, service_pid: int, engine: dict[str, int]) -> None:
        self.pids = {"service": service_pid, **engine}
        self.base = self.peak = self.hwm_before = self.hwm_after = 0
        self.samples = 0
        self.wall = 0.0
        self.cpu: dict[str, float] = {}
        self._started = 0.0
        self._cpu_before: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, proc_status(self.pids["service"])["VmRSS"])
                self.samples += 1

    def __enter__(self) -> Watch:
        start = proc_status(self.pids["service"])
        self.base = self.peak = start["VmRSS"]
        self.hwm_before = start["VmHWM"]
        self._cpu_before = {name: cpu_seconds(pid, name == "dockerd")
                            for name, pid in self.pids.items()}
        self._cpu_before["client"] = time.process_time()
        self._thread.start()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._started
        self.cpu = {name: cpu_seconds(pid, name == "dockerd") - self._cpu_before[name]
                    for name, pid in self.pids.items()}
        self.cpu["client"] = time.process_time() - self._cpu_before["client"]
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError, KeyError):
            end = proc_status(self.pids["service"])
            self.peak = max(self.peak, end["VmRSS"])
            self.hwm_after = end["VmHWM"]

    @property
    def growth(self) -> int:
        """Bytes above the RSS at the start; a VmHWM that rose counts too (a peak between
        samples)."""
        hwm = self.hwm_after if self.hwm_after > self.hwm_before else 0
        return max(self.peak, hwm) - self.base


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def make_random_file(path: str, size: int) -> str:
    """``size`` random bytes at ``path``; returns their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        left = size
        while left > 0:
            chunk = os.urandom(min(CHUNK, left))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


# ###########################################################################
# Files: raw API transfers vs the engine's archive calls
# ###########################################################################

def tar_of_file(source: str, name: str, uid: int, gid: int) -> Iterator[bytes]:
    """A one-member tar of ``source``, streamed in 1 MiB pieces (never the whole file)."""
    size = os.path.getsize(source)
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid = size, 0o644, uid, gid
    info.mtime = int(time.time())
    yield info.tobuf(format=tarfile.PAX_FORMAT)
    with open(source, "rb") as body:
        while chunk := body.read(CHUNK):
            yield chunk
    yield b"\0" * ((512 - size % 512) % 512) + b"\0" * 1024


class ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks, for tarfile's streaming mode."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.left = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.left:
            self.left = memoryview(next(self.chunks, b""))
        size = min(len(buffer), len(self.left))
        buffer[:size] = self.left[:size]
        self.left = self.left[size:]
        return size


Watches = dict[str, list[Watch]]  # "upload api", "cat direct", ...: one Watch per run


class Transfers:
    def __init__(self, svc: Service, api: docker.APIClient, cid: str, uid: int, gid: int,
                 source: str, digest: str, work: str, watch: Callable[[], Watch]) -> None:
        self.svc, self.api, self.cid = svc, api, cid
        self.uid, self.gid = uid, gid
        self.source, self.digest, self.work = source, digest, work
        self.watch = watch
        self.size = os.path.getsize(source)
        self.url = f"{svc.base}/api/spaces/{SPACE}/file"

    def api_upload(self, source: str, name: str) -> None:
        size = os.path.getsize(source)
        with open(source, "rb") as body:  # requests sends Content-Length from fstat
            reply = self.svc.session.put(
                self.url, params={"path": name}, data=body, timeout=600,
                headers={"Content-Type": "application/octet-stream"})
        if reply.status_code != 200 or reply.json().get("bytes") != size:
            raise BenchError(f"raw PUT: HTTP {reply.status_code}: {reply.text[:300]}")

    def api_download(self, name: str, target: str) -> None:
        with self.svc.session.get(self.url, params={"path": name, "raw": "true"},
                                  stream=True, timeout=600) as reply:
            if reply.status_code != 200:
                raise BenchError(f"raw GET: HTTP {reply.status_code}: {reply.text[:300]}")
            with open(target, "wb") as out:
                for chunk in reply.iter_content(CHUNK):
                    out.write(chunk)

    def direct_upload(self, source: str, name: str) -> None:
        self.api.put_archive(self.cid, WORKSPACE, tar_of_file(source, name, self.uid, self.gid))

    def direct_download(self, name: str, target: str) -> None:
        chunks, _ = self.api.get_archive(self.cid, f"{WORKSPACE}/{name}", chunk_size=CHUNK)
        with tarfile.open(fileobj=ChunkReader(iter(chunks)), mode="r|") as archive:
            member = archive.next()
            reader = archive.extractfile(member) if member is not None else None
            if reader is None:
                raise BenchError("get_archive: no regular file in the tar")
            with open(target, "wb") as out:
                while chunk := reader.read(CHUNK):
                    out.write(chunk)
        for _ in chunks:  # the tar's end blocks: the connection goes back to the pool clean
            pass

    @staticmethod
    def check(path: str, digest: str, side: str) -> None:
        got = file_sha256(path)
        os.remove(path)
        if got != digest:
            raise BenchError(f"{side} download: sha256 {got[:16]} != {digest[:16]}")

    def run(self, rounds: int, watches: Watches) -> tuple[Pair, Pair]:
        mib = self.size / MiB
        up = Pair(f"upload {mib:g} MiB (PUT raw vs put_archive)", "MiB/s")
        down = Pair(f"download {mib:g} MiB (GET raw vs get_archive)", "MiB/s")
        target = os.path.join(self.work, "download.bin")

        def run(key: str, samples: list[float], fn: Callable[[], None]) -> None:
            with self.watch() as watch:
                fn()
            samples.append(mib / watch.wall)
            watches.setdefault(key, []).append(watch)

        def api_up() -> None:
            run("upload api", up.api, lambda: self.api_upload(self.source, "big.bin"))

        def direct_up() -> None:
            run("upload direct", up.direct, lambda: self.direct_upload(self.source, "direct.bin"))

        def api_down() -> None:
            run("download api", down.api, lambda: self.api_download("big.bin", target))
            self.check(target, self.digest, "API")

        def direct_down() -> None:
            run("download direct", down.direct, lambda: self.direct_download("direct.bin", target))
            self.check(target, self.digest, "direct")

        for i in range(rounds):
            print(f"  round {i + 1}/{rounds}", flush=True)
            first, second = (api_up, direct_up) if i % 2 == 0 else (direct_up, api_up)
            first()
            second()
            first, second = (api_down, direct_down) if i % 2 == 0 else (direct_down, api_down)
            first()
            second()
        return up, down

    def small(self, samples: int) -> tuple[Pair, Pair]:
        """The fixed cost of one transfer: a 4 KiB file each way, in milliseconds."""
        source = os.path.join(self.work, "small.bin")
        digest = make_random_file(source, SMALL_BYTES)
        target = os.path.join(self.work, "small-download.bin")
        up = Pair("upload 4 KiB (fixed cost) [ctx]", "ms")
        down = Pair("download 4 KiB (fixed cost) [ctx]", "ms")
        self.api_upload(source, "small.bin")  # warm-up (the service caches the owner ids)
        self.direct_upload(source, "small-direct.bin")
        for i in range(samples):
            sides: list[tuple[list[float], Callable[[], None]]] = [
                (up.api, lambda: self.api_upload(source, "small.bin")),
                (up.direct, lambda: self.direct_upload(source, "small-direct.bin"))]
            for samples_of, fn in sides if i % 2 == 0 else sides[::-1]:
                samples_of.append(seconds(fn) * 1000)
            for side, name, fetch, samples_of in (
                    ("API", "small.bin", self.api_download, down.api),
                    ("direct", "small-direct.bin", self.direct_download, down.direct)):
                samples_of.append(seconds(lambda: fetch(name, target)) * 1000)  # noqa: B023
                self.check(target, digest, side)
        os.remove(source)
        return up, down


def seconds(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# ###########################################################################
# Terminal: the websocket vs a direct docker exec TTY socket
# ###########################################################################

class Term(Protocol):
    reads: int  # frames (websocket) or recv calls (socket) so far
    received: int  # bytes so far
    ended: str  # why recv returned b""

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...  # b"" at the end


class WsTerm:
    """``GET /api/spaces/<n>/terminal``: binary frames both ways."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.reads = self.received = 0
        self.ended = ""

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def recv(self) -> bytes:
        while True:
            message = await self.ws.receive()
            if message.type == aiohttp.WSMsgType.BINARY:
                self.reads += 1
                self.received += len(message.data)
                return bytes(message.data)
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                self.ended = (f"websocket {message.type.name}: {message.data!r} "
                              f"{message.extra or ''} {self.ws.exception() or ''}".strip())
                return b""


class SockTerm:
    """The hijacked socket of ``exec_start(socket=True, tty=True)``: raw TTY bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.reads = self.received = 0
        self.ended = "the exec socket closed"

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def recv(self) -> bytes:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 256 << 10)
        self.reads += 1
        self.received += len(data)
        return data


async def read_until(term: Term, marker: bytes, timeout: float = READ_TIMEOUT) -> int:
    """Bytes received up to and including ``marker``."""
    count = 0
    tail = b""

    async def scan() -> int:
        nonlocal count, tail
        while True:
            data = await term.recv()
            if INTERRUPTS:  # a signal arrived; do not count on the cancellation getting here
                raise asyncio.CancelledError(INTERRUPTS[0])
            if not data:
                raise BenchError(f"terminal closed before {marker!r} ({term.ended}; "
                                 f"{count} bytes read)")
            count += len(data)
            window = tail + data
            if marker in window:
                return count
            tail = window[-len(marker):]

    return await asyncio.wait_for(scan(), timeout)


async def sync(term: Term) -> None:
    """Run a command whose output differs from its typed echo, and wait for it: everything
    printed before (prompt, earlier output) is consumed."""
    token = secrets.token_hex(4)
    await term.send(f"\x15echo S_$((6*7))_{token}\r".encode())
    await read_until(term, f"S_42_{token}".encode(), 30)


async def run_cat(term: Term, path: str) -> None:
    """``cat path`` in the shell, until the sentinel printed after it has arrived."""
    token = secrets.token_hex(4)
    await term.send(f"cat {path}; echo E_$((6*7))_{token}\r".encode())
    await read_until(term, f"E_42_{token}".encode())


async def settle(term: Term, quiet: float = 0.1, limit: float = 2.0) -> None:
    """Read until the shell has printed nothing for ``quiet`` seconds (its prompt is in)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            data = await asyncio.wait_for(term.recv(), quiet)
        except asyncio.TimeoutError:
            return
        if not data:
            raise BenchError(f"terminal closed ({term.ended})")


async def echo_ms(term: Term, keys: int) -> list[float]:
    """One printable byte out, wait for readline to echo it; the line is cleared with ^U."""
    samples = []
    for index in range(KEY_WARMUP + keys):
        if index % 40 == 0:  # keep the line short: no wrapping, no redraws
            await sync(term)
            await settle(term)  # so that no letter of the prompt passes for an echo
        key = b"abcdefghijklmnopqrstuvwxyz"[index % 26:index % 26 + 1]
        started = time.perf_counter()
        await term.send(key)
        await read_until(term, key, 10)
        if index >= KEY_WARMUP:
            samples.append((time.perf_counter() - started) * 1000)
    await sync(term)
    return samples


class Terminals:
    def __init__(self, svc: Service, api: docker.APIClient, cid: str, user: str,
                 cat_path: str, cat_size: int, watch: Callable[[], Watch]) -> None:
        self.svc, self.api, self.cid, self.user = svc, api, cid, user
        self.cat_path, self.cat_size = cat_path, cat_size
        self.watch = watch
        self.chunks: dict[str, list[float]] = {}  # mean bytes per frame / recv, per side
        self.direct_sock: Any = None

    def open_direct(self) -> SockTerm:
        exec_id = self.api.exec_create(
            self.cid, SHELL, stdin=True, tty=True, stdout=True, stderr=True,
            environment=TERM_ENV, workdir=WORKSPACE, user=self.user)["Id"]
        self.direct_sock = self.api.exec_start(exec_id, socket=True, tty=True)
        self.api.exec_resize(exec_id, height=TERMINAL_ROWS, width=TERMINAL_COLS)
        return SockTerm(getattr(self.direct_sock, "_sock", self.direct_sock))

    def close_direct(self) -> None:
        wrapper, self.direct_sock = self.direct_sock, None
        if wrapper is None:
            return
        raw = getattr(wrapper, "_sock", wrapper)
        with contextlib.suppress(OSError):
            raw.setblocking(True)
            raw.sendall(b"\x15exit\r")
        response = getattr(wrapper, "_response", None)
        for closable in (response, wrapper, raw):
            with contextlib.suppress(Exception):
                if closable is not None:
                    closable.close()

    async def cat(self, key: str, term: Term, samples: list[float], watches: Watches) -> None:
        await sync(term)
        reads, received = term.reads, term.received
        with self.watch() as watch:
            await run_cat(term, self.cat_path)
        samples.append(self.cat_size / MiB / watch.wall)
        watches.setdefault(key, []).append(watch)
        self.chunks.setdefault(key, []).append(
            (term.received - received) / max(term.reads - reads, 1))

    async def run(self, rounds: int, keys: int, watches: Watches) -> tuple[Pair, Pair]:
        cat = Pair(f"cat {self.cat_size / MiB:g} MiB (websocket vs exec socket)", "MiB/s")
        echo = Pair("keystroke echo (websocket vs exec socket)", "ms")
        url = (f"ws://{self.svc.host}:{self.svc.port}/api/spaces/{SPACE}/terminal"
               f"?cols={TERMINAL_COLS}&rows={TERMINAL_ROWS}")
        headers = {"Authorization": f"Bearer {self.svc.key}"}
        async with aiohttp.ClientSession(trust_env=False) as http, http.ws_connect(
                url, headers=headers, max_msg_size=0, autoping=True) as ws:
            api_term = WsTerm(ws)
            direct_term = await asyncio.get_running_loop().run_in_executor(
                None, self.open_direct)
            try:
                for i in range(rounds):
                    print(f"  cat round {i + 1}/{rounds}", flush=True)
                    if i % 2 == 0:
                        await self.cat("cat api", api_term, cat.api, watches)
                        await self.cat("cat direct", direct_term, cat.direct, watches)
                    else:
                        await self.cat("cat direct", direct_term, cat.direct, watches)
                        await self.cat("cat api", api_term, cat.api, watches)
                print(f"  {keys} keystrokes each", flush=True)
                half = keys // 2
                echo.api += await echo_ms(api_term, half)
                echo.direct += await echo_ms(direct_term, half)
                echo.direct += await echo_ms(direct_term, keys - half)
                echo.api += await echo_ms(api_term, keys - half)
                await ws.send_bytes(b"\x15exit\r")
            finally:
                self.close_direct()
        return cat, echo


def run_terminals(terminals: Terminals, rounds: int, keys: int, watches: Watches
                  ) -> tuple[Pair, Pair]:
    """``Terminals.run`` in an event loop whose signal handlers cancel it; a Ctrl-C or SIGTERM
    then unwinds like anywhere else (KeyboardInterrupt / Stop), so cleanup runs."""
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}

    async def guarded() -> tuple[Pair, Pair]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def interrupted(name: str) -> None:
            INTERRUPTS.append(name)
            if task is not None:
                task.cancel()

        for sig in SIGNALS:
            loop.add_signal_handler(sig, interrupted, sig.name)
        return await terminals.run(rounds, keys, watches)

    try:
        return asyncio.run(guarded())
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if INTERRUPTS:
            if INTERRUPTS[0] == "SIGINT":
                raise KeyboardInterrupt
            raise Stop(INTERRUPTS[0])


# ###########################################################################
# Stats
# ###########################################################################

def bench_stats(svc: Service, api: docker.APIClient, cid: str, calls: int
                ) -> tuple[list[Pair], float]:
    path = f"/api/spaces/{SPACE}/stats"
    cold = seconds(lambda: svc.call("GET", path, 200)) * 1000  # also the warm-up
    api.stats(cid, stream=False)
    api.stats(cid, stream=False, one_shot=True)
    full = Pair("GET stats vs stats(stream=False)", "ms")
    one = Pair("GET stats vs stats(one_shot=True)", "ms")
    offset = svc.log_offset()
    for i in range(calls):
        sides: list[Callable[[], None]] = [
            lambda: full.api.append(seconds(lambda: svc.call("GET", path, 200)) * 1000),
            lambda: full.direct.append(seconds(lambda: api.stats(cid, stream=False)) * 1000),
            lambda: one.direct.append(seconds(
                lambda: api.stats(cid, stream=False, one_shot=True)) * 1000),
        ]
        for side in sides if i % 2 == 0 else sides[::-1]:
            side()
    one.api = full.api
    full.server = one.server = svc.access_times(offset, "GET", path, 200)
    return [full, one], cold


# ###########################################################################
# Main
# ###########################################################################

def sweep_networks(client: docker.DockerClient, prefix: str) -> int:
    """Remove networks labelled with our instance and named with our prefix (there should be
    none: the space has no network)."""
    removed = 0
    label = {"label": [f"{LABEL}.instance={prefix}"]}
    with contextlib.suppress(docker.errors.APIError):
        for network in client.api.networks(filters=label):
            if network["Name"].startswith(prefix):
                with contextlib.suppress(docker.errors.APIError):
                    client.api.remove_network(network["Id"])
                    removed += 1
                    print(f"warning: removed network {network['Name']}; firewall chains the "
                          "service made for it may remain", file=sys.stderr)
    return removed


def space_ids(api: docker.APIClient, cid: str, user: str) -> tuple[int, int]:
    """uid and gid of the space user, as the service puts them on new files."""
    exec_id = api.exec_create(cid, ["sh", "-c", "id -u; id -g"], user=user)["Id"]
    out = api.exec_start(exec_id).decode().split()
    return int(out[0]), int(out[1])


def ratio_text(ratio: float) -> str:
    return f"{ratio:.3f}x" if ratio < 0.1 else f"{ratio:.2f}x"


def print_where(watches: Watches, chunks: dict[str, list[float]]) -> None:
    """Per run: wall time and the CPU each party used, as % of one core over that wall time."""
    print("where the time goes (median per run; CPU time as % of one core over the run; "
          "dockerd includes its docker-tar/untar children; client = this bench process)")
    head = (f"  {'run':<17}{'wall s':>8}" + "".join(f"{name:>9}" for name in CPU_OWNERS)
            + f"{'chunk KiB':>11}")
    print(head)
    for key, runs in watches.items():
        cells = "".join(
            f"{fmt(median([100 * w.cpu.get(name, float('nan')) / w.wall for w in runs])):>8}%"
            for name in CPU_OWNERS)
        chunk = fmt(median(chunks[key]) / 1024) if key in chunks else "-"
        print(f"  {key:<17}{median([w.wall for w in runs]):>8.2f}{cells}{chunk:>11}")
    print("  chunk = mean bytes per websocket frame (api) or per recv (direct) during cat")


def print_trace(svc: Service, marks: dict[str, int], rounds: int, size_mib: float) -> None:
    """--trace: median ms of each span inside the service, per request (bench_api's wrappers)."""
    put, get = "PUT /api/spaces/{name}/file", "GET /api/spaces/{name}/file"
    groups = [
        (f"upload {size_mib:g} MiB", put, marks["big"], slice(0, rounds)),
        (f"download {size_mib:g} MiB", get, marks["big"], slice(0, rounds)),
        ("upload 4 KiB", put, marks["small"], slice(1, None)),  # after its warm-up
        ("download 4 KiB", get, marks["small"], slice(0, None)),
        ("stats", "GET /api/spaces/{name}/stats", marks["stats"], slice(1, None)),
    ]
    print()
    print("service-side breakdown (--trace): median ms per request of each span; a span that "
          "runs n times per request is summed")
    for label, route, offset, part in groups:
        spans = svc.traced(offset, route)[part]
        if not spans:
            continue
        handler = median([s["handler"] for s in spans])
        names = sorted({n for s in spans for n in s if n != "handler"},
                       key=lambda n: -median([s.get(n, 0.0) for s in spans]))
        print(f"  {label}: handler {handler:.1f} ms (n={len(spans)})")
        for name in names:
            value = median([s.get(name, 0.0) for s in spans])
            shown = TRACE_NAMES.get(name, name)
            print(f"    {shown:<58}{value:>9.2f} {100 * value / handler:5.1f}%")
        rest = median([s["handler"] - sum(v for k, v in s.items() if k != "handler")
                       for s in spans])
        print(f"    {'rest of the handler (awaits, JSON, aiohttp writes)':<58}{rest:>9.2f} "
              f"{100 * rest / handler:5.1f}%")


def report(size_mib: float, files: list[Pair], cat: Pair, echo: Pair, stats: list[Pair],
           stats_cold: float, watches: Watches, chunks: dict[str, list[float]]) -> None:
    up, down = files[:2]
    up_rss, down_rss = watches["upload api"], watches["download api"]
    up_growth = max(r.growth for r in up_rss) / MiB
    down_growth = max(r.growth for r in down_rss) / MiB
    print()
    print_pairs("files", files,
                "  api/dir is the ratio of times (higher = the API is slower); p90 of a MiB/s row "
                "is its slow tail (10th percentile); every download matched the source's sha256.")
    for label, samplers in (("upload", up_rss), ("download", down_rss)):
        print(f"  service RSS growth during API {label}s: "
              + ", ".join(f"{r.growth / MiB:.1f}" for r in samplers)
              + f" MiB (start {min(r.base for r in samplers) / MiB:.1f}, peak VmRSS "
              f"{max(r.peak for r in samplers) / MiB:.1f}, VmHWM "
              f"{max(r.hwm_after for r in samplers) / MiB:.1f} MiB; "
              f"{sum(r.samples for r in samplers)} samples every {SAMPLE_SECONDS * 1000:.0f} ms)")
    print()
    print_pairs("terminal", [cat, echo],
                "  cat: MiB of the file per second, until a sentinel after it arrives; echo: one "
                "byte sent until it comes back.")
    print()
    print_pairs("stats", stats,
                f"  the first (cold) GET stats took {stats_cold:.1f} ms: a 40 ms CPU sampling "
                "window when the space's last stats call is over 60 s old.")
    print()
    print_where(watches, chunks)
    print()
    stats_p90 = p90(stats[0].api)
    marks = [
        f"upload RSS growth < {RSS_LIMIT_MIB:g} MiB: {up_growth:.1f} "
        f"{'✓' if up_growth < RSS_LIMIT_MIB else '✗'}",
        f"download RSS growth < {RSS_LIMIT_MIB:g} MiB: {down_growth:.1f} "
        f"{'✓' if down_growth < RSS_LIMIT_MIB else '✗'}",
        f"stats < {STATS_LIMIT_MS:g} ms: med {median(stats[0].api):.1f}, p90 {stats_p90:.1f} "
        f"{'✓' if stats_p90 < STATS_LIMIT_MS else '✗'} (cold first call {stats_cold:.1f} "
        f"{'✓' if stats_cold < STATS_LIMIT_MS else '✗'})",
    ]
    print("targets: " + "   ".join(marks))
    print(f"ratios (api/direct time): upload {ratio_text(up.ratio())}, download "
          f"{ratio_text(down.ratio())}, cat {ratio_text(cat.ratio())}, echo "
          f"{ratio_text(echo.ratio())}, stats vs stream=False {ratio_text(stats[0].ratio())}, "
          f"vs one_shot {ratio_text(stats[1].ratio())} ({size_mib:g} MiB files)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=200,
                        help="size of the uploaded/downloaded file in MiB (default 200)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="transfers and cat runs per side (default 3)")
    parser.add_argument("--cat-mb", type=int, default=100,
                        help="size of the file cat prints through the terminal (default 100)")
    parser.add_argument("--keys", type=int, default=50, help="keystrokes per side (default 50)")
    parser.add_argument("--stats-calls", type=int, default=20,
                        help="stats calls per side after one warm-up (default 20)")
    parser.add_argument("--trace", action="store_true",
                        help="run the service with bench_api.py's timing wrappers and print "
                             "where its time goes per request (adds microseconds per call)")
    args = parser.parse_args(argv)
    if min(args.size_mb, args.rounds, args.cat_mb, args.keys, args.stats_calls) < 1:
        parser.error("every option must be >= 1")

    found = engine_and_user(timeout=600)
    if found is None:
        return 2
    client, user = found

    prefix = f"bench{secrets.token_hex(2)}-"
    data_dir = tempfile.mkdtemp(prefix="clawdspace-bench-")
    work = tempfile.mkdtemp(prefix="clawdspace-bench-files-")
    svc = Service(prefix, data_dir, trace=args.trace)
    code = 1
    environment(client)
    print(f"service {svc.base}, prefix {prefix!r}, data {data_dir}; {args.size_mb} MiB files, "
          f"{args.rounds} rounds, cat {args.cat_mb} MiB, {args.keys} keys, "
          f"{args.stats_calls} stats calls; load average {os.getloadavg()[0]:.2f} "
          f"(other work on the host moves these figures)", flush=True)
    try:
        with signals_raise():
            svc.start()
            # network "none": nothing here needs one, and the service then creates no bridge
            # network and no firewall chains that would outlive the run.
            svc.call("POST", "/api/spaces", 201,
                     {"name": SPACE, "memory": SPACE_MEMORY, "network": "none"})
            api = client.api
            cid = str(api.inspect_container(f"{prefix}{SPACE}")["Id"])
            uid, gid = space_ids(api, cid, user)
            engine = engine_pids(cid)
            pid = svc.proc.pid if svc.proc is not None else 0

            def watch() -> Watch:
                return Watch(pid, engine)

            watches: Watches = {}
            marks = {"big": svc.trace_offset()}

            print(f"writing a {args.size_mb} MiB random file and a {args.cat_mb} MiB text "
                  "file (not timed) ...", flush=True)
            source = os.path.join(work, "source.bin")
            digest = make_random_file(source, args.size_mb * MiB)
            cat_size = args.cat_mb * MiB
            made = svc.call("POST", f"/api/spaces/{SPACE}/exec", 200, {
                "command": f"base64 -w 127 /dev/urandom | head -c {cat_size} > t.txt"})
            if made["exitCode"] != 0:
                raise BenchError(f"could not write t.txt: {made}")

            print("timing file transfers ...", flush=True)
            transfers = Transfers(svc, api, cid, uid, gid, source, digest, work, watch)
            up, down = transfers.run(args.rounds, watches)
            os.remove(source)
            marks["small"] = svc.trace_offset()
            small = transfers.small(SMALL_SAMPLES)
            print("timing the terminal ...", flush=True)
            terminals = Terminals(svc, api, cid, user, f"{WORKSPACE}/t.txt", cat_size, watch)
            cat, echo = run_terminals(terminals, args.rounds, args.keys, watches)
            print("timing stats (the engine's take 1-2 s each) ...", flush=True)
            marks["stats"] = svc.trace_offset()
            stats, cold = bench_stats(svc, api, cid, args.stats_calls)
            report(args.size_mb, [up, down, *small], cat, echo, stats, cold, watches,
                   terminals.chunks)
            if args.trace:
                print_trace(svc, marks, args.rounds, args.size_mb)
            code = 0
    except (KeyboardInterrupt, Stop) as err:
        print(f"\ninterrupted ({type(err).__name__} {err}); cleaning up", file=sys.stderr)
        code = 130
    except (BenchError, docker.errors.DockerException, requests.RequestException,
            OSError, asyncio.TimeoutError) as err:
        dead = svc.proc.poll() if svc.proc is not None else None
        print(f"\nerror: {type(err).__name__} {err}"
              + (f"\n(the service exited with {dead})" if dead is not None else "")
              + f"\n--- service log tail ---\n{svc.log_tail()}", file=sys.stderr)
    finally:
        with signals_ignored():
            svc.stop()
            containers, volumes = sweep(client, prefix)
            networks = sweep_networks(client, prefix)
            shutil.rmtree(data_dir, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
            sys.stdout.flush()
            print(f"cleanup: removed {containers} containers, {volumes} volumes and {networks} "
                  f"networks (prefix {prefix}), temp files, stopped the service", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
