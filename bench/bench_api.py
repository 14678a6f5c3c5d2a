#!/usr/bin/env python3
"""Clawdspace API overhead benchmark: each operation through the HTTP API vs the docker SDK.

    python bench/bench_api.py [--rounds N] [--spaces 50] [--warmup 1] [--trace]

One run starts its own service (``python clawdspace.py serve``) on a free loopback port with a
random key, data directory and name prefix, then times every operation both ways, interleaving
API and direct samples (alternating which side goes first) so that load drift hits both equally:

* create: ``POST /api/spaces`` vs ``create_volume`` + ``create_container`` + ``start`` with the
  HostConfig the service builds (``space_host_config``), through ``docker.APIClient``.
* exec: ``POST /api/spaces/<n>/exec {"command": "true"}`` vs ``exec_create`` + ``exec_start``
  + ``exec_inspect`` (output and exit code, what a client needs), in the same container.
* pause / resume: ``POST .../stop`` / ``POST .../start`` vs ``pause`` / ``unpause``.
* list with N spaces: ``GET /api/spaces`` vs one ``APIClient.containers`` call (plus docker-py's
  high-level ``client.containers.list`` as a context row).

It prints a table of median and p90 milliseconds per side, the ratio api/direct, the
service-side handling time (from the service's access log), a breakdown of where the API's
extra time goes, and a target line. ``--trace`` runs the same service with timing wrappers
(see ``traced_serve``) and adds a measured per-request breakdown. Every container and volume
it made is removed at the end, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import docker
import docker.errors
import docker.types
import requests
from aiohttp import web

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICE = os.path.join(ROOT, "clawdspace.py")
IMAGE = "clawdspace:latest"
DOCKER_API_VERSION = "1.41"  # what the service pins (clawdspace.DOCKER_API_VERSION)
LABEL = "clawdspace"
WORKSPACE = "/workspace"
MEMORY = "256m"
MEMORY_BYTES = 256 << 20
CPUS = 1.0  # the service's default
PIDS_LIMIT = 1024  # the service's default (CLAWDSPACE_PIDS_LIMIT)
EXEC_ARGV = ["sh", "-c", "true"]  # what the service runs for {"command": "true"}
TARGETS = {"create": 1.2, "exec": 1.2, "list": 2.0}
TRACED_SERVE = "_traced-serve"  # hidden first argument: run the service with timing wrappers
# What the direct side does too, per operation; every other service-side span is API-only work.
DIRECT_SPANS = {
    "create": {"docker create_volume", "docker create_container", "docker start"},
    "exec": {"docker exec_create", "docker exec_start", "exec output stream (reader thread)",
             "docker exec_inspect"},
    "pause": {"docker pause"},
    "resume": {"docker unpause"},
    "get": {"docker inspect_container"},
    "list": {"docker containers"},
}
ROUTE_OF = {
    "create": "POST /api/spaces", "exec": "POST /api/spaces/{name}/exec",
    "pause": "POST /api/spaces/{name}/stop", "resume": "POST /api/spaces/{name}/start",
    "get": "GET /api/spaces/{name}", "list": "GET /api/spaces",
}
ACCESS_RE = re.compile(r" (GET|POST|DELETE) (\S+) (\d{3}) ([0-9.]+)ms$")


class BenchError(Exception):
    """A step of the benchmark failed; the message says which."""


class Stop(BaseException):
    """SIGTERM/SIGHUP: unwind like Ctrl-C so that cleanup runs."""


# ###########################################################################
# Statistics and output
# ###########################################################################

def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def p90(samples: list[float]) -> float:
    if len(samples) < 2:
        return samples[0] if samples else float("nan")
    return statistics.quantiles(samples, n=10, method="inclusive")[8]


@dataclass
class Row:
    """One table row: an operation timed through the API and directly."""

    label: str
    key: str = ""  # short name for the target line and the breakdown
    api: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)  # service-side handling time
    spans: list[dict[str, float]] = field(default_factory=list)  # --trace: per-request spans

    @property
    def ratio(self) -> float:
        return median(self.api) / median(self.direct)


def fmt(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"


def print_table(rows: list[Row]) -> None:
    width = max(len(r.label) for r in rows) + 2
    head = (f"{'operation':<{width}}{'api med':>9}{'api p90':>9}{'srv med':>9}"
            f"{'dir med':>9}{'dir p90':>9}{'api/dir':>9}{'n':>4}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.label:<{width}}{fmt(median(r.api)):>9}{fmt(p90(r.api)):>9}"
              f"{fmt(median(r.server)):>9}{fmt(median(r.direct)):>9}{fmt(p90(r.direct)):>9}"
              f"{r.ratio:>8.2f}x{len(r.api):>4}")


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# ###########################################################################
# The service under test
# ###########################################################################

class Service:
    """``clawdspace.py serve`` as a subprocess on a loopback port, and a keep-alive session."""

    def __init__(self, prefix: str, data_dir: str, trace: bool = False,
                 extra_env: dict[str, str] | None = None) -> None:
        self.extra_env = extra_env or {}  # more settings for the service's environment
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.key = secrets.token_urlsafe(24)
        self.prefix = prefix
        self.data_dir = data_dir
        self.base = f"http://{self.host}:{self.port}"
        self.log_path = os.path.join(data_dir, "service.log")
        self.trace_path = os.path.join(data_dir, "trace.jsonl") if trace else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.session = self.new_session()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("the service is not running")
        return self.proc.pid

    def new_session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # no proxy from the environment: loopback traffic only
        session.headers["Authorization"] = f"Bearer {self.key}"
        return session

    def start(self) -> None:
        env = dict(os.environ)
        for name in list(env):  # only the settings below, whatever the caller's shell has
            if name.startswith("CLAWDSPACE_") or name == "API_KEY":
                del env[name]
        env.update({
            "CLAWDSPACE_API_KEY": self.key,
            "CLAWDSPACE_DATA_DIR": self.data_dir,
            "CLAWDSPACE_HOST": self.host,
            "CLAWDSPACE_PORT": str(self.port),
            "CLAWDSPACE_PREFIX": self.prefix,
            "CLAWDSPACE_IMAGE": IMAGE,
            # Background housekeeping is no API overhead: no auto-sleep in the middle of a
            # sample, no shell-history ingestion (file reads in every space) while timing.
            "CLAWDSPACE_IDLE_TIMEOUT": "86400",
            "CLAWDSPACE_HISTORY_INTERVAL": "0",
            **self.extra_env,
        })
        command = [sys.executable, SERVICE, "serve"]
        if self.trace_path:  # the same service, with timing wrappers (see traced_serve)
            command = [sys.executable, os.path.abspath(__file__), TRACED_SERVE, self.trace_path]
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(  # noqa: S603 - fixed argv: this interpreter, our files
                command, env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the service exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                reply = self.session.get(f"{self.base}/api/health", timeout=2)
                if reply.status_code == 200:
                    return
            time.sleep(0.1)
        raise BenchError(f"GET /api/health did not answer 200 within 30 s:\n{self.log_tail()}")

    def stop(self) -> None:
        self.session.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as log_file:
            return "".join(log_file.readlines()[-lines:])
        return "(no service log)"

    def log_offset(self) -> int:
        return os.path.getsize(self.log_path)

    def trace_offset(self) -> int:
        return os.path.getsize(self.trace_path) if self.trace_path else 0

    def traced(self, offset: int, route: str) -> list[dict[str, float]]:
        """Span totals (ms by name, plus "handler") of successful ``route`` requests."""
        if not self.trace_path:
            return []
        time.sleep(0.05)
        found = []
        with open(self.trace_path, "rb") as trace:
            trace.seek(offset)
            for line in trace:
                event = json.loads(line)
                if event["route"] != route or not event["ok"]:
                    continue
                spans: dict[str, float] = {"handler": event["ms"]}
                for name, ms in event["spans"]:
                    spans[name] = spans.get(name, 0.0) + ms
                found.append(spans)
        return found

    def access_times(self, offset: int, method: str, path: str, status: int) -> list[float]:
        """Service-side milliseconds of matching requests logged after ``offset``."""
        time.sleep(0.05)  # the access line is written just after the response
        with open(self.log_path, "rb") as log_file:
            log_file.seek(offset)
            text = log_file.read().decode("utf-8", "replace")
        found = []
        for line in text.splitlines():
            match = ACCESS_RE.search(line)
            if match and match[1] == method and match[2] == path and int(match[3]) == status:
                found.append(float(match[4]))
        return found

    def call(self, method: str, path: str, expect: int, body: dict[str, Any] | None = None,
             session: requests.Session | None = None) -> Any:
        reply = (session or self.session).request(method, self.base + path, json=body,
                                                  timeout=120)
        if reply.status_code != expect:
            raise BenchError(f"{method} {path}: HTTP {reply.status_code}, expected {expect}: "
                             f"{reply.text[:300]}")
        return reply.json()


# ###########################################################################
# The direct side: what the service does, with the docker SDK and nothing between
# ###########################################################################

class Direct:
    def __init__(self, client: docker.DockerClient, prefix: str, user: str) -> None:
        self.client = client
        self.api: docker.APIClient = client.api
        self.prefix = prefix
        self.user = user

    def labels(self, name: str, volume: str) -> dict[str, str]:
        """The labels ``Spaces.create`` puts on a space."""
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        return {
            f"{LABEL}.instance": self.prefix, f"{LABEL}.space": name,
            f"{LABEL}.kind": "space", f"{LABEL}.schema": "1", f"{LABEL}.volume": volume,
            f"{LABEL}.image": IMAGE, f"{LABEL}.memory": str(MEMORY_BYTES),
            f"{LABEL}.cpus": repr(CPUS), f"{LABEL}.gpu": "false",
            f"{LABEL}.network": "internet", f"{LABEL}.template": "", f"{LABEL}.user": self.user,
            f"{LABEL}.created-at": created.replace("+00:00", "Z"), f"{LABEL}.created-by": "",
        }

    def host_config(self, volume: str) -> dict[str, Any]:
        """Exactly what ``space_host_config`` builds for a 256m, 1-CPU internet space (the
        service's own function, so the two sides can never drift apart)."""
        sys.path.insert(0, ROOT)
        import clawdspace

        request = clawdspace.CreateRequest(name="bench", memory=MEMORY_BYTES, cpus=CPUS,
                                           gpu=False, image=IMAGE, template="default")
        # The bridge the service puts internet spaces on (made by the first API create).
        return clawdspace.space_host_config(clawdspace.Config(pids_limit=PIDS_LIMIT), request,
                                            volume, f"{self.prefix}net", [])

    def create(self, name: str) -> str:
        volume = f"{self.prefix}vol-{name}"
        self.api.create_volume(volume, labels={
            f"{LABEL}.instance": self.prefix, f"{LABEL}.space": name,
            f"{LABEL}.kind": "space-volume"})
        created = self.api.create_container(
            IMAGE, name=f"{self.prefix}{name}", hostname=name, user=self.user,
            working_dir=WORKSPACE, entrypoint=["sleep", "infinity"], command=[],
            labels=self.labels(name, volume), host_config=self.host_config(volume))
        self.api.start(created["Id"])
        return str(created["Id"])

    def destroy(self, container_id: str, name: str) -> None:
        self.api.remove_container(container_id, force=True)
        volume = f"{self.prefix}vol-{name}"
        for attempt in range(10):  # a just-removed container can hold the volume briefly
            try:
                self.api.remove_volume(volume)
                return
            except docker.errors.NotFound:
                return
            except docker.errors.APIError:
                if attempt == 9:
                    raise
                time.sleep(0.2)

    def exec(self, container_id: str) -> tuple[bytes | None, bytes | None, int]:
        exec_id = self.api.exec_create(
            container_id, EXEC_ARGV, stdout=True, stderr=True, stdin=False, tty=False,
            workdir=WORKSPACE, user=self.user)["Id"]
        stdout, stderr = self.api.exec_start(exec_id, demux=True)
        code = self.api.exec_inspect(exec_id)["ExitCode"]
        if code != 0:
            raise BenchError(f"direct exec exited {code}")
        return stdout, stderr, int(code)


# ###########################################################################
# Cleanup
# ###########################################################################

def engine_and_user(timeout: int,
                    max_pool_size: int = 10) -> tuple[docker.DockerClient, str] | None:
    """The engine client and the sandbox image's user; None, after saying why, when missing."""
    try:
        client = docker.from_env(version=DOCKER_API_VERSION, timeout=timeout,
                                 max_pool_size=max_pool_size)
        client.ping()
    except docker.errors.DockerException as err:
        print(f"error: no Docker engine answers: {err}", file=sys.stderr)
        return None
    try:
        image = client.api.inspect_image(IMAGE)
    except docker.errors.ImageNotFound:
        print(f"error: image {IMAGE} is missing; build it with: "
              f"bash tests/build-image.sh --tag {IMAGE}",
              file=sys.stderr)
        return None
    return client, str((image.get("Config") or {}).get("User") or "")


def sweep(client: docker.DockerClient, prefix: str) -> tuple[int, int]:
    """Remove every container and volume labelled with our instance and named with our prefix."""
    api = client.api
    label = {"label": [f"{LABEL}.instance={prefix}"]}
    containers = 0
    for row in api.containers(all=True, filters=label):
        if any(n.lstrip("/").startswith(prefix) for n in row.get("Names") or []):
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_container(row["Id"], force=True)
                containers += 1
    volumes = 0
    for volume in api.volumes(filters=label).get("Volumes") or []:
        if volume["Name"].startswith(prefix):
            for attempt in range(10):
                try:
                    api.remove_volume(volume["Name"])
                    volumes += 1
                    break
                except docker.errors.NotFound:
                    break
                except docker.errors.APIError:
                    if attempt == 9:
                        print(f"warning: could not remove volume {volume['Name']}",
                              file=sys.stderr)
                    time.sleep(0.3)
    # The service's bridge networks and their firewall rules go with the instance.
    subprocess.run([sys.executable, SERVICE, "remove-networks"],  # noqa: S603 - our own program
                   env={**os.environ, "CLAWDSPACE_PREFIX": prefix}, check=False,
                   stdout=subprocess.DEVNULL)
    return containers, volumes


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind the stack (like Ctrl-C), so ``finally`` blocks run."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Stop(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Cleanup is not interrupted by a second Ctrl-C."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


# ###########################################################################
# The benchmark
# ###########################################################################

def interleave(round_no: int, api_fn: Callable[[], Any], direct_fn: Callable[[], Any],
               row: Row) -> None:
    """One sample each; the side that goes first alternates by round."""
    if round_no % 2 == 0:
        row.api.append(timed(api_fn))
        row.direct.append(timed(direct_fn))
    else:
        row.direct.append(timed(direct_fn))
        row.api.append(timed(api_fn))


class Bench:
    def __init__(self, args: argparse.Namespace, client: docker.DockerClient, svc: Service,
                 direct: Direct) -> None:
        self.rounds: int = args.rounds
        self.warmup: int = args.warmup
        self.spaces: int = args.spaces
        self.client = client
        self.svc = svc
        self.direct = direct
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="setup")
        self.extra: dict[str, float] = {}

    def keep(self, round_no: int) -> bool:
        return round_no >= self.warmup

    def bench_create(self) -> Row:
        row = Row("create (POST vs vol+create+start)", "create")
        # The first API create makes the service's network and firewall rules, once per node:
        # not part of either side's figure.
        self.svc.call("POST", "/api/spaces", 201, {"name": "net-up", "memory": MEMORY})
        self.svc.call("DELETE", "/api/spaces/net-up?removeVolume=true", 200)
        offset, trace_offset = self.svc.log_offset(), self.svc.trace_offset()
        for i in range(self.warmup + self.rounds):
            api_name, direct_name = f"c{i}", f"d{i}"
            made: dict[str, str] = {}

            def via_api(name: str = api_name) -> None:
                self.svc.call("POST", "/api/spaces", 201, {"name": name, "memory": MEMORY})

            def via_docker(name: str = direct_name, ids: dict[str, str] = made) -> None:
                ids[name] = self.direct.create(name)

            sample = Row(row.label)
            interleave(i, via_api, via_docker, sample)
            if self.keep(i):
                row.api += sample.api
                row.direct += sample.direct
            self.svc.call("DELETE", f"/api/spaces/{api_name}?removeVolume=true", 200)
            self.direct.destroy(made[direct_name], direct_name)
        row.server = self.svc.access_times(offset, "POST", "/api/spaces", 201)[self.warmup:]
        row.spans = self.svc.traced(trace_offset, ROUTE_OF["create"])[self.warmup:]
        return row

    def bench_exec_pause(self) -> list[Row]:
        self.svc.call("POST", "/api/spaces", 201, {"name": "x", "memory": MEMORY})
        cid = self.client.api.inspect_container(f"{self.svc.prefix}x")["Id"]
        exec_row = Row('exec ("true", output+exit code)', "exec")
        pause_row = Row("pause (POST stop vs pause)", "pause")
        resume_row = Row("resume (POST start vs unpause)", "resume")
        inspect_row = Row("get (GET space vs inspect) [ctx]", "get")
        floor = Row("http floor (GET bad name, 400)")

        def api_exec() -> None:
            result = self.svc.call("POST", "/api/spaces/x/exec", 200, {"command": "true"})
            if result["exitCode"] != 0:
                raise BenchError(f"API exec exited {result['exitCode']}")

        offset, trace_offset = self.svc.log_offset(), self.svc.trace_offset()
        for i in range(self.warmup + self.rounds):
            sample = [Row(r.label) for r in (exec_row, pause_row, resume_row, inspect_row)]
            interleave(i, api_exec, lambda: self.direct.exec(cid), sample[0])
            if i % 2 == 0:
                sample[1].api.append(timed(lambda: self.svc.call(
                    "POST", "/api/spaces/x/stop", 200)))
                sample[2].api.append(timed(lambda: self.svc.call(
                    "POST", "/api/spaces/x/start", 200)))
                sample[1].direct.append(timed(lambda: self.client.api.pause(cid)))
                sample[2].direct.append(timed(lambda: self.client.api.unpause(cid)))
            else:
                sample[1].direct.append(timed(lambda: self.client.api.pause(cid)))
                sample[2].direct.append(timed(lambda: self.client.api.unpause(cid)))
                sample[1].api.append(timed(lambda: self.svc.call(
                    "POST", "/api/spaces/x/stop", 200)))
                sample[2].api.append(timed(lambda: self.svc.call(
                    "POST", "/api/spaces/x/start", 200)))
            interleave(i, lambda: self.svc.call("GET", "/api/spaces/x", 200),
                       lambda: self.client.api.inspect_container(cid), sample[3])
            floor.api.append(timed(lambda: self.svc.call("GET", "/api/spaces/Bad_Name", 400)))
            if self.keep(i):
                for target, got in zip((exec_row, pause_row, resume_row, inspect_row), sample,
                                       strict=True):
                    target.api += got.api
                    target.direct += got.direct
        floor.api = floor.api[self.warmup:]
        exec_row.server = self.svc.access_times(
            offset, "POST", "/api/spaces/x/exec", 200)[self.warmup:]
        pause_row.server = self.svc.access_times(
            offset, "POST", "/api/spaces/x/stop", 200)[self.warmup:]
        resume_row.server = self.svc.access_times(
            offset, "POST", "/api/spaces/x/start", 200)[self.warmup:]
        inspect_row.server = self.svc.access_times(
            offset, "GET", "/api/spaces/x", 200)[self.warmup:]
        floor.server = self.svc.access_times(
            offset, "GET", "/api/spaces/Bad_Name", 400)[self.warmup:]
        for row in (exec_row, pause_row, resume_row, inspect_row):
            row.spans = self.svc.traced(trace_offset, ROUTE_OF[row.key])[self.warmup:]
        self.extra["http_floor"] = median(floor.api)
        self.extra["http_floor_server"] = median(floor.server)
        self.svc.call("DELETE", "/api/spaces/x?removeVolume=true", 200)
        return [exec_row, pause_row, resume_row, inspect_row]

    def bench_list(self) -> list[Row]:
        n = self.spaces
        print(f"creating {n} spaces through the API (8 in parallel, not timed) ...", flush=True)
        local = threading.local()  # one session per setup thread: Session is not thread-safe
        sessions: list[requests.Session] = []

        def make(index: int) -> None:
            if not hasattr(local, "session"):
                local.session = self.svc.new_session()
                sessions.append(local.session)
            self.svc.call("POST", "/api/spaces", 201, {"name": f"l{index}", "memory": MEMORY},
                          session=local.session)

        try:
            for future in [self.pool.submit(make, i) for i in range(n)]:
                future.result()
        finally:
            for session in sessions:
                session.close()
        filters = {"label": [f"{LABEL}.instance={self.svc.prefix}", f"{LABEL}.kind=space"]}
        low = Row(f"list {n} (GET vs APIClient.containers)", "list")
        high = Row(f"list {n} (GET vs containers.list) [ctx]")

        def api_list() -> None:
            got = len(self.svc.call("GET", "/api/spaces", 200)["spaces"])
            if got != n:
                raise BenchError(f"GET /api/spaces returned {got} spaces, expected {n}")

        def low_list() -> None:
            if len(self.client.api.containers(all=True, filters=filters)) != n:
                raise BenchError("APIClient.containers count mismatch")

        def high_list() -> None:
            if len(self.client.containers.list(all=True, filters=filters)) != n:
                raise BenchError("containers.list count mismatch")

        offset, trace_offset = self.svc.log_offset(), self.svc.trace_offset()
        for i in range(self.warmup + self.rounds):
            sample = Row(low.label)
            interleave(i, api_list, low_list, sample)
            extra = Row(high.label)
            interleave(i + 1, api_list, high_list, extra)
            if self.keep(i):
                low.api += sample.api
                low.direct += sample.direct
                high.api += extra.api
                high.direct += extra.direct
        server = self.svc.access_times(offset, "GET", "/api/spaces", 200)
        low.server = server[2 * self.warmup:]
        high.server = low.server
        low.spans = self.svc.traced(trace_offset, ROUTE_OF["list"])[2 * self.warmup:]
        return [low, high]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# ###########################################################################
# --trace: the same service, with timing wrappers around its seams
# ###########################################################################

def traced_serve(trace_path: str) -> int:
    """Run ``clawdspace.main(["serve"])`` with every route handler, docker call, audit record
    and exec stream timed; one JSON line per request goes to ``trace_path``.

    Nothing in clawdspace.py changes: the wrappers replace attributes of the imported module
    before ``create_app`` reads them. Each adds two ``perf_counter`` calls (microseconds).
    """
    sys.dont_write_bytecode = True  # no __pycache__ beside clawdspace.py
    sys.path.insert(0, ROOT)
    import clawdspace as cs

    spans: contextvars.ContextVar[list[tuple[str, float]] | None] = contextvars.ContextVar(
        "bench_spans", default=None)
    out = open(trace_path, "a", buffering=1, encoding="utf-8")  # open for the process

    def note(name: str, started: float, ended: float | None = None) -> None:
        found = spans.get()
        if found is not None:
            found.append((name, ((ended or time.perf_counter()) - started) * 1000))

    original_call = cs.Engine.call
    original_stream = cs.Engine.stream
    original_record = cs.AuditLog.record

    async def call(self: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        ran: list[float] = []

        def timed_fn(*a: Any, **k: Any) -> Any:
            ran.append(time.perf_counter())
            try:
                return fn(*a, **k)
            finally:
                ran.append(time.perf_counter())

        try:
            return await original_call(self, timed_fn, *args, **kwargs)
        finally:
            ended = time.perf_counter()
            if len(ran) == 2:
                note(f"docker {getattr(fn, '__name__', 'call')}", ran[0], ran[1])
                found = spans.get()
                if found is not None:  # time to reach the pool thread and come back
                    found.append(("executor hand-offs", ((ran[0] - started) + (ended - ran[1]))
                                  * 1000))

    async def stream(self: Any, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            return await original_stream(self, fn)
        finally:
            note("exec output stream (reader thread)", started)

    async def record(self: Any, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        try:
            await original_record(self, *args, **kwargs)
        finally:
            note("audit record", started)

    def wrap(method: str, path: str, handler: cs.Handler) -> cs.Handler:
        async def traced_handler(request: web.Request) -> web.StreamResponse:
            token = spans.set([])
            started = time.perf_counter()
            ok = False
            try:
                response = await handler(request)
                ok = True
                return response
            finally:
                event = {"route": f"{method} {path}", "ok": ok,
                         "ms": (time.perf_counter() - started) * 1000, "spans": spans.get()}
                spans.reset(token)
                out.write(json.dumps(event) + "\n")

        return traced_handler

    cs.Engine.call = call  # type: ignore[method-assign]
    cs.Engine.stream = stream  # type: ignore[method-assign]
    cs.AuditLog.record = record  # type: ignore[method-assign]
    for table in ("API_ROUTES", "E2B_REST_ROUTES", "ENVD_ROUTES"):
        setattr(cs, table, tuple(dataclasses.replace(r, handler=wrap(r.method, r.path, r.handler))
                                 for r in getattr(cs, table)))
    return cs.main(["serve"])


def print_trace(rows: list[Row]) -> None:
    """Where each API request's time goes, from the traced service (medians per request)."""
    print()
    print("service-side breakdown (--trace): median ms per request and share of the API time; "
          "* = work the direct side does not do")
    for row in rows:
        if not row.key or not row.spans:
            continue
        api = median(row.api)
        handler = median([s["handler"] for s in row.spans])
        names = sorted({n for s in row.spans for n in s if n != "handler"},
                       key=lambda n: -median([s.get(n, 0.0) for s in row.spans]))
        parts: list[tuple[str, float, bool]] = []
        for name in names:
            parts.append((name, median([s.get(name, 0.0) for s in row.spans]),
                          name not in DIRECT_SPANS[row.key]))
        inside = median([s["handler"] - sum(v for k, v in s.items() if k != "handler")
                         for s in row.spans])
        parts.append(("rest of the handler (validation, JSON, awaits)", inside, True))
        parts.append(("HTTP + aiohttp + middlewares + client (api - handler)", api - handler,
                      True))
        api_only = sum(value for _, value, only in parts if only)
        print(f"  {row.key}: api {api:.1f} (handler {handler:.1f}), direct "
              f"{median(row.direct):.1f}, measured gap {api - median(row.direct):.1f}; "
              f"API-only work {api_only:.1f} = {100 * api_only / api:.0f}% of api")
        for name, value, only in parts:
            print(f"    {'*' if only else ' '} {name:<54}{value:>7.2f} {100 * value / api:5.1f}%")


def audit_record_ms(rounds: int) -> float:
    """Median cost of one real ``AuditLog.record`` (from clawdspace.py), in isolation."""
    sys.dont_write_bytecode = True  # no __pycache__ beside clawdspace.py
    sys.path.insert(0, ROOT)
    try:
        import clawdspace  # optional: only for the breakdown
    except ImportError:
        return float("nan")
    finally:
        sys.path.remove(ROOT)

    async def run(directory: str) -> list[float]:
        audit = clawdspace.AuditLog(directory, 50 << 20, 5, clawdspace.Redactor(["k"]))
        audit.open()
        actor = clawdspace.Actor(key_id="abcd", addr="127.0.0.1")
        meta = {"command": "true", "envKeys": [], "workdir": WORKSPACE, "timeout": 600.0}
        samples = []
        try:
            for _ in range(max(rounds, 20) + 5):
                started = time.perf_counter()
                await audit.record("space.exec", "x", meta, actor)
                samples.append((time.perf_counter() - started) * 1000)
        finally:
            audit.close()
        return samples[5:]

    with tempfile.TemporaryDirectory(prefix="bench-audit-") as directory:
        return median(asyncio.run(run(directory)))


def environment(client: docker.DockerClient) -> None:
    version = client.version()
    info = client.info()
    image = client.api.inspect_image(IMAGE)
    print(f"docker engine {version.get('Version')} (API {version.get('ApiVersion')}), "
          f"storage {info.get('Driver')}, cgroup {info.get('CgroupVersion', '?')}, "
          f"{info.get('Containers')} containers on the engine")
    print(f"host {platform.node()}: {platform.system()} {platform.release()}, "
          f"{os.cpu_count()} cores, {info.get('MemTotal', 0) / 2**30:.1f} GiB; "
          f"python {platform.python_version()}, docker-py {docker.__version__}, "
          f"requests {importlib.metadata.version('requests')}")
    print(f"image {IMAGE} {image['Id'][7:19]}, user {image['Config'].get('User') or 'root'!r}")


def report(rows: list[Row], extra: dict[str, float], audit_ms: float) -> None:
    print()
    print_table(rows)
    print()
    print("api = client-observed HTTP round trip (keep-alive session); srv = the service's own "
          "handling time from its access log; dir = the docker SDK call(s) in this process.")
    by_name = {r.key: r for r in rows if r.key}
    exec_row, get_row = by_name["exec"], by_name["get"]
    gap = median(exec_row.api) - median(exec_row.direct)
    inspect_ms = median(get_row.direct)
    floor = extra["http_floor"]
    parts = [("HTTP round trip + auth + routing (GET bad name, 400)", floor),
             ("inspect_container before exec (Spaces.running)", inspect_ms),
             ("audit record (AuditLog.record, measured in isolation)", audit_ms)]
    rest = gap - sum(v for _, v in parts if v == v)
    api = median(exec_row.api)
    print()
    print(f"exec overhead: api {api:.1f} ms - direct {median(exec_row.direct):.1f} ms = "
          f"{gap:.1f} ms extra; estimated parts (--trace measures them inside the service):")
    print(f"  {'':<56}{'ms':>7} {'of api':>7} {'of gap':>7}")
    for name, value in parts + [("rest (executor hops, reader thread, JSON)", rest)]:
        known = value == value
        of_api = f"{100 * value / api:6.1f}%" if known else "      -"
        of_gap = f"{100 * value / gap:6.0f}%" if gap > 0 and known else "      -"
        print(f"  {name:<56}{fmt(value):>7} {of_api} {of_gap}")
    print(f"  (service-side handling of the bad-name request: "
          f"{fmt(extra['http_floor_server'])} ms)")
    print()
    marks = []
    for op, limit in TARGETS.items():
        ratio = by_name[op].ratio
        marks.append(f"{op} <= {limit:g}x: {ratio:.2f}x {'✓' if ratio <= limit else '✗'}")
    print("targets: " + "   ".join(marks))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [TRACED_SERVE] and len(argv) == 2:
        return traced_serve(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=10, help="samples per side (default 10)")
    parser.add_argument("--spaces", type=int, default=50,
                        help="spaces present while timing list (default 50)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds before each operation (default 1)")
    parser.add_argument("--trace", action="store_true",
                        help="run the service with timing wrappers and print where each API "
                             "request's time goes (adds microseconds per request)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.spaces < 1 or args.warmup < 0:
        parser.error("--rounds and --spaces must be >= 1, --warmup >= 0")

    found = engine_and_user(timeout=120, max_pool_size=16)
    if found is None:
        return 2
    client, user = found

    prefix = f"bench{secrets.token_hex(2)}-"
    data_dir = tempfile.mkdtemp(prefix="clawdspace-bench-")
    svc = Service(prefix, data_dir, trace=args.trace)
    bench: Bench | None = None
    code = 1
    environment(client)
    print(f"service {svc.base}, prefix {prefix!r}, data {data_dir}; rounds {args.rounds} "
          f"(+{args.warmup} warm-up), {args.spaces} spaces for list", flush=True)
    try:
        with signals_raise():
            svc.start()
            bench = Bench(args, client, svc, Direct(client, prefix, user))
            rows: list[Row] = []
            print("timing create ...", flush=True)
            rows.append(bench.bench_create())
            print("timing exec, pause, resume, get ...", flush=True)
            rows += bench.bench_exec_pause()
            rows += bench.bench_list()
            print("timing audit record ...", flush=True)
            audit_ms = audit_record_ms(args.rounds)
            report(rows, bench.extra, audit_ms)
            if args.trace:
                print_trace(rows)
            code = 0
    except (KeyboardInterrupt, Stop) as err:
        print(f"\ninterrupted ({type(err).__name__} {err}); cleaning up", file=sys.stderr)
        code = 130
    except (BenchError, docker.errors.DockerException, requests.RequestException) as err:
        print(f"\nerror: {err}\n--- service log tail ---\n{svc.log_tail()}", file=sys.stderr)
    finally:
        with signals_ignored():
            if bench is not None:
                bench.close()
            svc.stop()
            containers, volumes = sweep(client, prefix)
            time.sleep(0.5)  # a create the service had in flight when it stopped
            more = sweep(client, prefix)
            containers, volumes = containers + more[0], volumes + more[1]
            shutil.rmtree(data_dir, ignore_errors=True)
            sys.stdout.flush()
            print(f"cleanup: removed {containers} containers and {volumes} volumes "
                  f"(prefix {prefix}), stopped the service", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
