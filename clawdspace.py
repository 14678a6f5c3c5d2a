#!/usr/bin/env python3
"""Clawdspace: sandboxed Linux spaces on your own machines, over HTTP.

One service per machine ("node"). Each space is a Docker container plus a persistent named
volume mounted on ``/workspace``. Clients (agents, scripts, people) talk to the node over HTTP
with a bearer token: create, exec, pause, resume and destroy spaces; every action lands in an
append-only JSON Lines audit log.

Run it
------
    python3 clawdspace.py serve            # foreground; reads the environment below
    python3 clawdspace.py --help

Environment (read once at start)
--------------------------------
CLAWDSPACE_API_KEY          Bearer key clients must present (``API_KEY`` is an alias). Required
                            unless auth is disabled; there is no default key.
CLAWDSPACE_AUTH_DISABLED    ``true`` turns authentication off (development only; logged loudly).
CLAWDSPACE_HOST             Address to bind. Default ``0.0.0.0``.
CLAWDSPACE_PORT             Port to bind. Default ``7777``.
CLAWDSPACE_DATA_DIR         Directory the service owns: the audit log and small cursors.
                            Default ``/var/lib/clawdspace``.
CLAWDSPACE_TEMPLATES_DIR    User template directory. Default ``$CLAWDSPACE_DATA_DIR/templates``.
CLAWDSPACE_IMAGE            Default space image. Default ``clawdspace:latest``.
CLAWDSPACE_GPU_IMAGE        Default image for GPU spaces. Default: ``$CLAWDSPACE_IMAGE``.
CLAWDSPACE_PREFIX           Container/volume name prefix, so several instances can share one
                            engine. Default ``clawdspace-``.
CLAWDSPACE_IDLE_TIMEOUT     Seconds of inactivity before a space is paused. Default ``600``.
CLAWDSPACE_NODES            Static node list ``name=url,...`` (instead of Tailscale discovery).
CLAWDSPACE_EXEC_TIMEOUT     Default exec timeout in seconds. Default ``600``.
CLAWDSPACE_EXEC_MAX_TIMEOUT Largest exec timeout a client may ask for. Default ``86400``.
CLAWDSPACE_EXEC_OUTPUT_LIMIT  Bytes kept per exec stream (stdout, stderr). Default ``1048576``.
CLAWDSPACE_MAX_BODY_BYTES   Largest request body accepted. Default ``8388608``.
CLAWDSPACE_PIDS_LIMIT       Process limit per space. Default ``1024``.
CLAWDSPACE_AUDIT_MAX_BYTES  Audit file size that triggers rotation. Default ``52428800``.
CLAWDSPACE_AUDIT_KEEP       Rotated audit files kept. Default ``5``.
CLAWDSPACE_NVIDIA_SMI       nvidia-smi command used to detect GPUs. Default ``nvidia-smi``.
DOCKER_HOST                 Honoured through the docker SDK (default: the local socket).

Constraints
-----------
* Docker is the database: everything the service knows about a space is a ``clawdspace.*``
  label on its container. The service may be killed at any moment and restarted.
* The docker SDK is synchronous: every call runs on an executor thread, exec streams on their
  own threads, so the event loop never blocks.
* A container's HostConfig is built only from server-side rules; request fields are validated
  values, never passed through. No bind mounts, no privileged, no devices except GPUs.
* Errors are JSON ``{"error": "...", "code": "..."}`` with a 4xx status; a 500 is a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypedDict, TypeVar

import docker
import docker.errors
import requests.exceptions
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

VERSION = "2.0.0"
log = logging.getLogger("clawdspace")
T = TypeVar("T")


# ###########################################################################
# Constants & config
# ###########################################################################

WORKSPACE = "/workspace"
LABEL = "clawdspace"  # label namespace: clawdspace.<key>
SPACE_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
MEMORY_RE = re.compile(r"^(\d+)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
IMAGE_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$")
MEMORY_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MIN_MEMORY_BYTES = 16 << 20
# The Podman default set: Docker's 14 minus NET_RAW, MKNOD, AUDIT_WRITE and SYS_CHROOT.
SPACE_CAPABILITIES = [
    "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID",
]
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


def env_flag(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {value}")
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the service reads from its environment, once, at start."""

    api_key: str | None = None
    auth_disabled: bool = False
    host: str = "0.0.0.0"  # noqa: S104 - a node serves its tailnet; the key guards it
    port: int = 7777
    data_dir: str = "/var/lib/clawdspace"
    templates_dir: str = ""
    image: str = "clawdspace:latest"
    gpu_image: str = ""
    prefix: str = "clawdspace-"
    idle_timeout: int = 600
    nodes: str = ""
    exec_timeout: int = 600
    exec_max_timeout: int = 86400
    exec_output_limit: int = 1 << 20
    max_body_bytes: int = 8 << 20
    pids_limit: int = 1024
    audit_max_bytes: int = 50 << 20
    audit_keep: int = 5
    nvidia_smi: str = "nvidia-smi"

    @classmethod
    def from_env(cls) -> Config:
        data_dir = os.environ.get("CLAWDSPACE_DATA_DIR", cls.data_dir)
        image = os.environ.get("CLAWDSPACE_IMAGE", cls.image)
        return cls(
            api_key=os.environ.get("CLAWDSPACE_API_KEY") or os.environ.get("API_KEY") or None,
            auth_disabled=env_flag("CLAWDSPACE_AUTH_DISABLED"),
            host=os.environ.get("CLAWDSPACE_HOST", cls.host),
            port=env_int("CLAWDSPACE_PORT", cls.port, minimum=0),
            data_dir=data_dir,
            templates_dir=os.environ.get(
                "CLAWDSPACE_TEMPLATES_DIR", os.path.join(data_dir, "templates")),
            image=image,
            gpu_image=os.environ.get("CLAWDSPACE_GPU_IMAGE", "") or image,
            prefix=os.environ.get("CLAWDSPACE_PREFIX", cls.prefix),
            idle_timeout=env_int("CLAWDSPACE_IDLE_TIMEOUT", cls.idle_timeout),
            nodes=os.environ.get("CLAWDSPACE_NODES", ""),
            exec_timeout=env_int("CLAWDSPACE_EXEC_TIMEOUT", cls.exec_timeout, minimum=1),
            exec_max_timeout=env_int(
                "CLAWDSPACE_EXEC_MAX_TIMEOUT", cls.exec_max_timeout, minimum=1),
            exec_output_limit=env_int(
                "CLAWDSPACE_EXEC_OUTPUT_LIMIT", cls.exec_output_limit, minimum=1024),
            max_body_bytes=env_int("CLAWDSPACE_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1024),
            pids_limit=env_int("CLAWDSPACE_PIDS_LIMIT", cls.pids_limit, minimum=16),
            audit_max_bytes=env_int(
                "CLAWDSPACE_AUDIT_MAX_BYTES", cls.audit_max_bytes, minimum=4096),
            audit_keep=env_int("CLAWDSPACE_AUDIT_KEEP", cls.audit_keep, minimum=1),
            nvidia_smi=os.environ.get("CLAWDSPACE_NVIDIA_SMI", cls.nvidia_smi),
        )

    def check(self) -> None:
        """Refuse configurations that cannot work, with a one-line reason."""
        if not self.auth_disabled and not self.api_key:
            raise ConfigError(
                "no API key: set CLAWDSPACE_API_KEY (or CLAWDSPACE_AUTH_DISABLED=true for a "
                "development node)")
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,30}", self.prefix):
            raise ConfigError(f"CLAWDSPACE_PREFIX {self.prefix!r} is not a valid name prefix")


# ###########################################################################
# Errors
# ###########################################################################

class ClawdError(Exception):
    """Base of every error the API answers with; carries an HTTP status and a code."""

    status = 500
    code = "internal"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class ConfigError(ClawdError):
    """The service cannot start with this configuration."""


class BadRequest(ClawdError):
    """The request is malformed or names something invalid (400)."""

    status, code = 400, "invalid"


class Unauthorized(ClawdError):
    """No valid API key was presented (401)."""

    status, code = 401, "unauthorized"


class Forbidden(ClawdError):
    """The caller may not do this (403)."""

    status, code = 403, "forbidden"


class NotFound(ClawdError):
    """The named object does not exist (404)."""

    status, code = 404, "not_found"


class Conflict(ClawdError):
    """The object's state forbids the action, or the name is taken (409)."""

    status, code = 409, "conflict"


class TooLarge(ClawdError):
    """The request body is over the limit (413)."""

    status, code = 413, "too_large"


class Unavailable(ClawdError):
    """A dependency (the Docker engine, the disk) is not answering (503)."""

    status, code = 503, "unavailable"


# ###########################################################################
# Models
# ###########################################################################

class SpaceVolume(TypedDict):
    name: str
    mountpoint: str


class SpaceInfo(TypedDict):
    name: str
    id: str
    status: str
    created: str
    started: str | None
    image: str
    memory: int
    cpus: float
    gpu: bool
    template: str | None
    network: str
    user: str
    lastActivity: str
    volume: SpaceVolume


class ExecResult(TypedDict):
    stdout: str
    stderr: str
    exitCode: int
    durationMs: int
    timedOut: bool
    stdoutTruncated: bool
    stderrTruncated: bool


@dataclasses.dataclass(frozen=True)
class Actor:
    """Who made a request, for the audit log: a key id (never the key) and an address."""

    key_id: str | None
    addr: str | None


SYSTEM_ACTOR = Actor(key_id=None, addr=None)  # the service's own housekeeping


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def epoch_to_iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def key_id(key: str) -> str:
    """A short, stable, non-reversible id for an API key, for logs and labels."""
    return "k-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:10]


# ###########################################################################
# Audit log
# ###########################################################################

# Token shapes that must never reach the audit log or a response, wherever they appear.
SECRET_PATTERNS = [
    re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"(?i)(authorization:\s*(?:bearer|basic|token)\s+)[^\s'\"]+"),
    re.compile(r"(?i)(://[^/\s:@]+:)[^@\s/]+(@)"),
    re.compile(r"(?i)\b((?:[a-z0-9_]*_)?(?:token|secret|password|passwd|api_?key)\s*[=:]\s*)"
               r"['\"]?[^\s'\"&]+"),
]
AUDIT_TEXT_LIMIT = 4096


class Redactor:
    """Replaces secrets (the node's API key and well-known token shapes) with a marker."""

    def __init__(self, extra_secrets: list[str]) -> None:
        self.literals = [s for s in extra_secrets if s and len(s) >= 4]

    def text(self, value: str) -> str:
        for literal in self.literals:
            value = value.replace(literal, "[REDACTED]")
        for pattern in SECRET_PATTERNS:
            value = pattern.sub(self._replacement, value)
        return value

    @staticmethod
    def _replacement(match: re.Match[str]) -> str:
        groups = [g for g in match.groups() if g is not None]
        if len(groups) == 2:
            return f"{groups[0]}[REDACTED]{groups[1]}"
        if len(groups) == 1:
            return f"{groups[0]}[REDACTED]"
        return "[REDACTED]"

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            text = self.text(value)
            if len(text) > AUDIT_TEXT_LIMIT:
                text = text[:AUDIT_TEXT_LIMIT] + "…[truncated]"
            return text
        if isinstance(value, dict):
            return {str(k): self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value


class AuditLog:
    """Append-only JSON Lines file with a single writer thread.

    One record is one ``os.write`` of one line on an ``O_APPEND`` descriptor, so concurrent
    readers never see half a record. A torn last line (a crash mid-write) is moved aside at
    start. The file rotates by size: ``audit.jsonl`` -> ``audit.jsonl.1`` -> ... ``.N``.
    """

    def __init__(self, data_dir: str, max_bytes: int, keep: int, redactor: Redactor) -> None:
        self.path = os.path.join(data_dir, "audit.jsonl")
        self.max_bytes = max_bytes
        self.keep = keep
        self.redactor = redactor
        self._fd: int | None = None
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="audit")

    def open(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self._repair_torn_tail()
        self._fd = self._open_fd()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open_fd(self) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(self.path, flags, 0o600)

    def _repair_torn_tail(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return
            tail_start = max(0, size - 65536)
            tail = os.pread(fd, size - tail_start, tail_start)
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            keep = tail_start + cut + 1 if cut >= 0 else tail_start
            if cut < 0 and tail_start > 0:
                return  # a 64 KiB line is no torn record; leave it for readers to skip
            torn = os.pread(fd, size - keep, keep)
            torn_path = f"{self.path}.torn-{int(time.time())}"
            with open(torn_path, "wb") as out:
                out.write(torn)
            os.ftruncate(fd, keep)
            log.warning("audit: moved a torn last line (%d bytes) to %s", len(torn), torn_path)
        finally:
            os.close(fd)

    async def record(self, type_: str, space: str | None = None,
                     meta: dict[str, Any] | None = None, actor: Actor = SYSTEM_ACTOR) -> None:
        event: dict[str, Any] = {"ts": now_iso(), "type": type_}
        if space is not None:
            event["space"] = space
        if meta:
            event["meta"] = self.redactor.value(meta)
        if actor.key_id:
            event["keyId"] = actor.key_id
        if actor.addr:
            event["clientAddr"] = actor.addr
        line = (json.dumps(event, ensure_ascii=True, separators=(",", ":")) + "\n").encode()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer, self._append, line)
        except OSError as err:
            log.error("audit: cannot write %s: %s", self.path, err)
            raise Unavailable("the audit log cannot be written", "audit_unavailable") from err

    def _append(self, line: bytes) -> None:
        if self._fd is None:
            raise OSError("audit log is closed")
        if os.fstat(self._fd).st_size + len(line) > self.max_bytes:
            self._rotate()
        before = os.fstat(self._fd).st_size
        written = os.write(self._fd, line)
        if written != len(line):
            os.ftruncate(self._fd, before)
            raise OSError(f"short write ({written} of {len(line)} bytes)")

    def _rotate(self) -> None:
        assert self._fd is not None  # noqa: S101 - guarded by _append
        os.close(self._fd)
        for index in range(self.keep - 1, 0, -1):
            older = f"{self.path}.{index}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{index + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._fd = self._open_fd()

    async def read(self, space: str | None, limit: int) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._read_tail, space, limit)

    def _read_tail(self, space: str | None, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` events (of one space, if given), oldest first, read backwards."""
        found: list[dict[str, Any]] = []
        paths = [self.path] + [f"{self.path}.{i}" for i in range(1, self.keep + 1)]
        for path in paths:
            for line in reversed_lines(path):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                if space is not None and event.get("space") != space:
                    continue
                found.append(event)
                if len(found) >= limit:
                    return found[::-1]
        return found[::-1]


def reversed_lines(path: str, block: int = 65536) -> Iterator[bytes]:
    """Complete lines of a file from last to first, reading fixed-size blocks from the end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        position = os.fstat(fd).st_size
        pending = b""
        before_last_newline = True  # bytes after the last newline are no complete record
        while position > 0:
            step = min(block, position)
            position -= step
            lines = (os.pread(fd, step, position) + pending).split(b"\n")
            pending, complete = lines[0], lines[1:]
            if before_last_newline and complete:
                before_last_newline = False
                complete = complete[:-1]
            for line in reversed(complete):
                if line:
                    yield line
        if pending and not before_last_newline:
            yield pending
    finally:
        os.close(fd)


# ###########################################################################
# Docker wrapper
# ###########################################################################

DOCKER_API_VERSION = "1.41"  # Engine 20.10+; pinned so building the client never blocks


class Engine:
    """The one door to the Docker engine.

    docker-py is synchronous, so every call goes through ``call`` onto a bounded thread pool;
    long streams (exec output) get threads of their own from a second pool, so 50 running
    execs never starve short calls such as ``inspect``.
    """

    def __init__(self) -> None:
        self.client = docker.DockerClient.from_env(
            version=DOCKER_API_VERSION, max_pool_size=64, timeout=60)
        self.api = self.client.api
        self.pool = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="docker")
        self.streams = concurrent.futures.ThreadPoolExecutor(512, thread_name_prefix="stream")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.streams.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))
        except docker.errors.APIError:
            raise
        except (docker.errors.DockerException, requests.exceptions.RequestException,
                ConnectionError) as err:
            raise Unavailable(f"the Docker engine is not answering: {err}",
                              "docker_unavailable") from err

    async def stream(self, fn: Callable[[], T]) -> T:
        """Run a long blocking reader on its own thread."""
        return await asyncio.get_running_loop().run_in_executor(self.streams, fn)


def api_status(err: docker.errors.APIError) -> int:
    return int(err.status_code or 500)


def api_message(err: docker.errors.APIError) -> str:
    explanation = err.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode("utf-8", "replace")
    return str(explanation or err).strip()


def raw_socket(sock: Any) -> socket.socket:
    """The plain socket under docker-py's exec/attach socket wrapper."""
    return getattr(sock, "_sock", sock)  # type: ignore[no-any-return]


class DemuxReader:
    """Reads Docker's multiplexed stream (8-byte frame headers) from an exec socket.

    Keeps at most ``limit`` bytes per stream and drains the rest, so a process that prints
    gigabytes ends normally instead of blocking on a full pipe, and memory stays bounded.
    """

    HEADER = struct.Struct(">BxxxL")

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock = sock
        self.limit = limit
        self.out = {1: bytearray(), 2: bytearray()}
        self.truncated = {1: False, 2: False}

    def run(self) -> None:
        buffer = bytearray()
        frame_stream, frame_left = 0, 0
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while buffer:
                if frame_left == 0:
                    if len(buffer) < self.HEADER.size:
                        break
                    frame_stream, frame_left = self.HEADER.unpack_from(buffer)
                    del buffer[:self.HEADER.size]
                    continue
                take = min(frame_left, len(buffer))
                self._keep(frame_stream, bytes(buffer[:take]))
                del buffer[:take]
                frame_left -= take

    def _keep(self, stream: int, data: bytes) -> None:
        target = self.out.get(stream)
        if target is None:
            return
        room = self.limit - len(target)
        if room >= len(data):
            target += data
        else:
            target += data[:max(room, 0)]
            self.truncated[stream] = True

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


def decode_output(data: bytes | bytearray, truncated: bool) -> str:
    """UTF-8 text of collected output; a character cut by the size cap is dropped, not mangled.

    The whole buffer is decoded at once, so a character split across frames survives.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    return decoder.decode(bytes(data), final=not truncated)


def kill_exec_group(host_pid: int) -> int | None:
    """SIGKILL an exec's process group from the host; return its pid inside the container.

    runc makes every exec a session and group leader, so the group holds the whole command
    tree. Returns the in-container pid when the host kill is not permitted (a non-root
    service), so the caller can kill from inside instead; None when nothing is left to do.
    """
    try:
        with open(f"/proc/{host_pid}/status", encoding="ascii", errors="replace") as status:
            ns_pids = [line.split()[1:] for line in status if line.startswith("NSpid:")]
    except OSError:
        return None
    container_pid = int(ns_pids[0][-1]) if ns_pids and ns_pids[0] else None
    try:
        os.killpg(host_pid, signal.SIGKILL)
        return None
    except ProcessLookupError:
        return None
    except PermissionError:
        return container_pid


# ###########################################################################
# Spaces
# ###########################################################################

@dataclasses.dataclass(frozen=True)
class CreateRequest:
    """A validated ``POST /api/spaces`` body."""

    name: str
    memory: int
    cpus: float
    gpu: bool
    image: str
    template: str | None


@dataclasses.dataclass(frozen=True)
class ExecRequest:
    """A validated ``POST /api/spaces/:name/exec`` body."""

    argv: list[str]
    env: dict[str, str]
    workdir: str
    timeout: float


def check_space_name(name: Any) -> str:
    if not isinstance(name, str) or not SPACE_NAME_RE.match(name):
        raise BadRequest(
            "invalid space name: use 1-63 lowercase letters, digits and '-', starting and "
            "ending with a letter or digit", "invalid_name")
    return name


def parse_memory(value: Any) -> int:
    """``"512m"``, ``"2g"``, ``"1t"`` or a byte count; anything else is an error (no default)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadRequest("memory must be a byte count or a string like '512m' or '2g'",
                         "invalid_memory")
    if isinstance(value, int):
        amount = value
    else:
        match = MEMORY_RE.match(value.strip())
        if not match:
            raise BadRequest(f"memory {value!r} is not a size: use k, m, g or t, e.g. '2g'",
                             "invalid_memory")
        amount = int(match.group(1)) * MEMORY_UNITS[match.group(2).lower()]
    if amount < MIN_MEMORY_BYTES:
        raise BadRequest("memory must be at least 16m", "invalid_memory")
    total = host_memory_bytes()
    if total and amount > total:
        raise BadRequest(f"memory {value!r} is more than this node has ({format_bytes(total)})",
                         "invalid_memory")
    return amount


def parse_cpus(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise BadRequest("cpus must be a number, e.g. 1 or 0.5", "invalid_cpus")
    cores = os.cpu_count() or 1
    if not 0.01 <= value <= cores:
        raise BadRequest(f"cpus must be between 0.01 and this node's {cores} cores",
                         "invalid_cpus")
    return float(value)


def check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{field} must be true or false", f"invalid_{field}")
    return value


def check_image_ref(value: Any) -> str:
    if not isinstance(value, str) or not IMAGE_REF_RE.match(value):
        raise BadRequest("image must be an image reference such as 'clawdspace:latest'",
                         "invalid_image")
    return value


def check_workdir(value: Any) -> str:
    """An exec working directory: inside /workspace, normalised, never through /proc."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise BadRequest("workdir must be a path inside /workspace", "invalid_workdir")
    joined = value if value.startswith("/") else f"{WORKSPACE}/{value}"
    normal = os.path.normpath(joined)
    if normal != WORKSPACE and not normal.startswith(WORKSPACE + "/"):
        raise BadRequest("workdir must be inside /workspace", "invalid_workdir")
    return normal


def check_env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise BadRequest("env must be an object of string values", "invalid_env")
    env: dict[str, str] = {}
    for key, item in value.items():
        if not ENV_KEY_RE.match(key) or len(key) > 256:
            raise BadRequest(f"env key {key[:64]!r} is not a valid variable name", "invalid_env")
        if not isinstance(item, str) or "\x00" in item:
            raise BadRequest(f"env value of {key} must be a string without NUL bytes",
                             "invalid_env")
        env[key] = item
    return env


def check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}", "unknown_field")


def parse_create(body: dict[str, Any], config: Config) -> CreateRequest:
    check_fields(body, {"name", "memory", "cpus", "gpu", "image", "template"})
    if "name" not in body:
        raise BadRequest("name is required", "invalid_name")
    template = body.get("template")
    if template is not None and template != "default":
        if not isinstance(template, str):
            raise BadRequest("template must be a string", "invalid_template")
        raise BadRequest(f"unknown template {template[:64]!r}", "unknown_template")
    gpu = check_bool("gpu", body.get("gpu", False))
    image = body.get("image")
    if image is None:
        image = config.gpu_image if gpu else config.image
    return CreateRequest(
        name=check_space_name(body["name"]),
        memory=parse_memory(body.get("memory", "2g")),
        cpus=parse_cpus(body.get("cpus", 1)),
        gpu=gpu,
        image=check_image_ref(image),
        template=template,
    )


def parse_exec(body: dict[str, Any], config: Config) -> ExecRequest:
    check_fields(body, {"command", "env", "workdir", "timeout"})
    command = body.get("command")
    if isinstance(command, str):
        if not command.strip():
            raise BadRequest("command required", "invalid_command")
        argv = ["sh", "-c", command]
    elif isinstance(command, list) and command and all(isinstance(a, str) for a in command):
        if not command[0]:
            raise BadRequest("command[0] must name a program", "invalid_command")
        argv = list(command)
    else:
        raise BadRequest("command required: a string (run by sh -c) or a list of strings",
                         "invalid_command")
    if any("\x00" in arg for arg in argv):
        raise BadRequest("command must not contain NUL bytes", "invalid_command")
    timeout = body.get("timeout", config.exec_timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout != timeout:
        raise BadRequest("timeout must be a number of seconds", "invalid_timeout")
    if not 0 < timeout <= config.exec_max_timeout:
        raise BadRequest(f"timeout must be between 0 and {config.exec_max_timeout} seconds",
                         "invalid_timeout")
    return ExecRequest(
        argv=argv,
        env=check_env(body.get("env", {})),
        workdir=check_workdir(body.get("workdir", WORKSPACE)),
        timeout=float(timeout),
    )


def space_status(state: str) -> str:
    if state == "paused":
        return "paused"
    if state in ("running", "restarting"):
        return "running"
    return "stopped"


class Spaces:
    """Spaces are containers named ``<prefix><name>`` labelled ``clawdspace.instance=<prefix>``.

    Nothing about a space lives in this process except caches that can be rebuilt from the
    engine (start times) and activity times.
    """

    def __init__(self, config: Config, engine: Engine, audit: AuditLog) -> None:
        self.config = config
        self.engine = engine
        self.audit = audit
        self.last_activity: dict[str, float] = {}
        self.running_execs: dict[str, int] = {}
        self.started_at: dict[str, str | None] = {}  # container id -> StartedAt

    # -- names and labels ---------------------------------------------------------------

    def container_name(self, name: str) -> str:
        return f"{self.config.prefix}{name}"

    def volume_name(self, name: str) -> str:
        return f"{self.config.prefix}vol-{name}"

    def owner_labels(self, name: str) -> dict[str, str]:
        return {f"{LABEL}.instance": self.config.prefix, f"{LABEL}.space": name}

    def is_ours(self, labels: dict[str, str] | None, name: str) -> bool:
        labels = labels or {}
        return all(labels.get(k) == v for k, v in self.owner_labels(name).items())

    # -- views ----------------------------------------------------------------------------

    def view(self, container_id: str, labels: dict[str, str], state: str) -> SpaceInfo:
        name = labels.get(f"{LABEL}.space", "")
        started = self.started_at.get(container_id)
        activity = self.last_activity.get(name)
        created = labels.get(f"{LABEL}.created-at", "")
        return {
            "name": name,
            "id": container_id[:12],
            "status": space_status(state),
            "created": created,
            "started": started,
            "image": labels.get(f"{LABEL}.image", ""),
            "memory": int(labels.get(f"{LABEL}.memory", "0") or 0),
            "cpus": float(labels.get(f"{LABEL}.cpus", "0") or 0),
            "gpu": labels.get(f"{LABEL}.gpu") == "true",
            "template": labels.get(f"{LABEL}.template") or None,
            "network": labels.get(f"{LABEL}.network", "internet"),
            "user": labels.get(f"{LABEL}.user", ""),
            "lastActivity": epoch_to_iso(activity) if activity else (started or created),
            "volume": {"name": labels.get(f"{LABEL}.volume", self.volume_name(name)),
                       "mountpoint": WORKSPACE},
        }

    def view_inspected(self, info: dict[str, Any]) -> SpaceInfo:
        state = info.get("State") or {}
        started = state.get("StartedAt") or None
        if started and started.startswith("0001-"):
            started = None
        self.started_at[info["Id"]] = started
        status = "paused" if state.get("Paused") else str(state.get("Status", "exited"))
        return self.view(info["Id"], (info.get("Config") or {}).get("Labels") or {}, status)

    # -- lookups --------------------------------------------------------------------------

    async def inspect(self, name: str) -> dict[str, Any]:
        check_space_name(name)
        try:
            info = await self.engine.call(self.engine.api.inspect_container,
                                          self.container_name(name))
        except docker.errors.NotFound:
            raise NotFound("Space not found") from None
        if not self.is_ours((info.get("Config") or {}).get("Labels"), name):
            raise NotFound("Space not found")
        return info  # type: ignore[no-any-return]

    async def get(self, name: str) -> SpaceInfo:
        return self.view_inspected(await self.inspect(name))

    async def list_all(self) -> list[SpaceInfo]:
        """All spaces of this instance, from a single engine call."""
        filters = {"label": [f"{LABEL}.instance={self.config.prefix}", f"{LABEL}.kind=space"]}
        rows = await self.engine.call(self.engine.api.containers, all=True, filters=filters)
        missing = [row["Id"] for row in rows if row["Id"] not in self.started_at]
        if missing:
            # Start times are not in the list answer; learn them once, off the request path.
            asyncio.get_running_loop().create_task(self._learn_start_times(missing))
        spaces = [self.view(row["Id"], row.get("Labels") or {}, row.get("State", ""))
                  for row in rows]
        return sorted(spaces, key=lambda s: s["name"])

    async def _learn_start_times(self, container_ids: list[str]) -> None:
        for container_id in container_ids:
            with contextlib.suppress(ClawdError, docker.errors.APIError):
                info = await self.engine.call(self.engine.api.inspect_container, container_id)
                self.view_inspected(info)

    def touch(self, name: str) -> None:
        self.last_activity[name] = time.time()

    # -- lifecycle ------------------------------------------------------------------------

    async def create(self, req: CreateRequest, actor: Actor) -> SpaceInfo:
        api = self.engine.api
        try:
            image = await self.engine.call(api.inspect_image, req.image)
        except docker.errors.NotFound:
            raise BadRequest(f"image {req.image!r} is not present on this node; build or load "
                             "it first", "image_not_found") from None
        except docker.errors.APIError as err:
            raise BadRequest(f"image {req.image!r}: {api_message(err)}", "invalid_image") from None
        if req.gpu and not (await gpu_inventory(self.config)):
            raise BadRequest("this node has no NVIDIA GPU (nvidia-smi found none)", "no_gpu")
        user = str((image.get("Config") or {}).get("User") or "")
        volume, volume_created = await self._claim_volume(req.name)
        labels = {
            **self.owner_labels(req.name),
            f"{LABEL}.kind": "space",
            f"{LABEL}.schema": "1",
            f"{LABEL}.volume": volume,
            f"{LABEL}.image": req.image,
            f"{LABEL}.memory": str(req.memory),
            f"{LABEL}.cpus": repr(req.cpus),
            f"{LABEL}.gpu": "true" if req.gpu else "false",
            f"{LABEL}.network": "internet",
            f"{LABEL}.template": req.template or "",
            f"{LABEL}.user": user,
            f"{LABEL}.created-at": now_iso(),
            f"{LABEL}.created-by": actor.key_id or "",
        }
        container_id: str | None = None
        try:
            created = await self.engine.call(
                api.create_container, req.image,
                name=self.container_name(req.name),
                hostname=req.name,
                user=user,
                working_dir=WORKSPACE,
                entrypoint=["sleep", "infinity"],
                command=[],
                labels=labels,
                host_config=self._host_config(req, volume),
            )
            container_id = created["Id"]
            await self.engine.call(api.start, container_id)
            info = await self.engine.call(api.inspect_container, container_id)
        except BaseException as err:
            await self._undo_create(container_id, volume if volume_created else None)
            if isinstance(err, docker.errors.APIError):
                if api_status(err) == 409 and container_id is None:
                    raise Conflict("Space already exists", "space_exists") from None
                raise BadRequest(f"the space could not be created: {api_message(err)}",
                                 "create_failed") from None
            raise
        self.touch(req.name)
        await self.audit.record("space.create", req.name, {
            "memory": req.memory, "cpus": req.cpus, "gpu": req.gpu, "image": req.image,
            "template": req.template, "volumeReused": not volume_created}, actor)
        return self.view_inspected(info)

    def _host_config(self, req: CreateRequest, volume: str) -> dict[str, Any]:
        """The whole HostConfig, from server-side rules only."""
        api = self.engine.api
        device_requests = None
        if req.gpu:
            device_requests = [docker.types.DeviceRequest(
                driver="nvidia", count=1, capabilities=[["gpu"]])]
        return api.create_host_config(  # type: ignore[no-any-return]
            mem_limit=req.memory,
            memswap_limit=req.memory,  # no swap beyond the memory limit
            nano_cpus=int(req.cpus * 1e9),
            cap_drop=["ALL"],
            cap_add=SPACE_CAPABILITIES,
            security_opt=["no-new-privileges:true"],
            pids_limit=self.config.pids_limit,
            init=True,
            # No core dumps; nofile stays the engine's (raising it fails where dockerd's own
            # hard limit is lower).
            ulimits=[docker.types.Ulimit(name="core", soft=0, hard=0)],
            restart_policy={"Name": "unless-stopped"},
            log_config=docker.types.LogConfig(
                type="json-file", config={"max-size": "10m", "max-file": "3"}),
            mounts=[docker.types.Mount(target=WORKSPACE, source=volume, type="volume")],
            network_mode="bridge",
            device_requests=device_requests,
            privileged=False,
            read_only=False,
        )

    async def _claim_volume(self, name: str) -> tuple[str, bool]:
        """The space's volume: reused when it is ours (kept data), created otherwise."""
        api = self.engine.api
        volume = self.volume_name(name)
        try:
            existing = await self.engine.call(api.inspect_volume, volume)
        except docker.errors.NotFound:
            existing = None
        if existing is not None:
            if not self.is_ours(existing.get("Labels"), name):
                raise Conflict(f"volume {volume} exists and is not a clawdspace volume of this "
                               "node; remove or rename it first", "volume_conflict")
            return volume, False
        labels = {**self.owner_labels(name), f"{LABEL}.kind": "space-volume"}
        await self.engine.call(api.create_volume, volume, labels=labels)
        return volume, True

    async def _undo_create(self, container_id: str | None, volume: str | None) -> None:
        """Remove what a failed create made; what it did not make is left alone."""
        api = self.engine.api
        if container_id:
            with contextlib.suppress(Exception):
                await self.engine.call(api.remove_container, container_id, force=True)
        if volume:
            with contextlib.suppress(Exception):
                await self.engine.call(api.remove_volume, volume)

    async def destroy(self, name: str, remove_volume: bool, actor: Actor) -> None:
        api = self.engine.api
        volume = self.volume_name(name)
        try:
            info = await self.inspect(name)
        except NotFound:
            if not remove_volume or not await self._volume_is_ours(name):
                raise
            info = None
        if info is not None:
            try:
                await self.engine.call(api.remove_container, info["Id"], force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as err:
                if api_status(err) != 409:  # 409: removal already in progress
                    raise
            self.started_at.pop(info["Id"], None)
        if remove_volume:
            await self._remove_volume(volume)
        self.last_activity.pop(name, None)
        await self.audit.record("space.destroy", name, {"removeVolume": remove_volume}, actor)

    async def _volume_is_ours(self, name: str) -> bool:
        try:
            existing = await self.engine.call(self.engine.api.inspect_volume,
                                              self.volume_name(name))
        except docker.errors.NotFound:
            return False
        return self.is_ours(existing.get("Labels"), name)

    async def _remove_volume(self, volume: str) -> None:
        for attempt in range(10):
            try:
                await self.engine.call(self.engine.api.remove_volume, volume)
                return
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as err:
                # A just-removed container can hold the volume for a moment.
                if api_status(err) != 409 or attempt == 9:
                    raise Conflict(f"volume {volume} could not be removed: {api_message(err)}",
                                   "volume_in_use") from None
                await asyncio.sleep(0.2)

    async def pause(self, name: str, actor: Actor, reason: str | None = None) -> None:
        info = await self.inspect(name)
        state = info["State"]
        if state.get("Paused"):
            return
        if not state.get("Running"):
            raise Conflict("Space is stopped; start it first", "space_stopped")
        try:
            await self.engine.call(self.engine.api.pause, info["Id"])
        except docker.errors.APIError as err:
            raise Conflict(f"Space could not be paused: {api_message(err)}") from None
        await self.audit.record("space.pause", name, {"reason": reason} if reason else None,
                                actor)

    async def start(self, name: str, actor: Actor, reason: str | None = None) -> None:
        info = await self.inspect(name)
        await self._bring_up(name, info, actor, reason)

    async def _bring_up(self, name: str, info: dict[str, Any], actor: Actor,
                        reason: str | None) -> dict[str, Any]:
        """Unpause a paused space, start a stopped one; returns fresh inspect data."""
        api = self.engine.api
        state = info["State"]
        try:
            if state.get("Paused"):
                await self.engine.call(api.unpause, info["Id"])
            elif not state.get("Running"):
                await self.engine.call(api.start, info["Id"])
            else:
                return info
        except docker.errors.APIError as err:
            raise Conflict(f"Space could not be started: {api_message(err)}",
                           "start_failed") from None
        self.touch(name)
        await self.audit.record("space.start", name, {"reason": reason} if reason else None,
                                actor)
        fresh = await self.engine.call(api.inspect_container, info["Id"])
        self.view_inspected(fresh)
        return fresh  # type: ignore[no-any-return]

    async def running(self, name: str, actor: Actor) -> dict[str, Any]:
        """Inspect data of a space ready for work: a paused space is resumed first."""
        info = await self.inspect(name)
        if info["State"].get("Paused"):
            info = await self._bring_up(name, info, actor, "auto")
        elif not info["State"].get("Running"):
            raise Conflict("Space is stopped; start it with POST /api/spaces/"
                           f"{name}/start", "space_stopped")
        return info

    # -- exec -----------------------------------------------------------------------------

    async def exec(self, name: str, req: ExecRequest, actor: Actor) -> ExecResult:
        info = await self.running(name, actor)
        user = (info.get("Config") or {}).get("User") or ""
        await self.audit.record("space.exec", name, {
            "command": req.argv[2] if req.argv[:2] == ["sh", "-c"] else req.argv,
            "envKeys": sorted(req.env), "workdir": req.workdir, "timeout": req.timeout}, actor)
        self.running_execs[name] = self.running_execs.get(name, 0) + 1
        self.touch(name)
        try:
            return await self._run_exec(info["Id"], user, req)
        finally:
            self.running_execs[name] -= 1
            if not self.running_execs[name]:
                del self.running_execs[name]
            self.touch(name)

    async def _run_exec(self, container_id: str, user: str, req: ExecRequest) -> ExecResult:
        api = self.engine.api
        started = time.monotonic()
        try:
            exec_id = (await self.engine.call(
                api.exec_create, container_id, req.argv, stdout=True, stderr=True,
                stdin=False, tty=False, environment=req.env or None, workdir=req.workdir,
                user=user))["Id"]
            sock = raw_socket(await self.engine.call(api.exec_start, exec_id, socket=True))
        except docker.errors.APIError as err:
            raise Conflict(f"exec could not start: {api_message(err)}", "exec_failed") from None
        sock.settimeout(None)
        reader = DemuxReader(sock, self.config.exec_output_limit)
        task = asyncio.ensure_future(self.engine.stream(reader.run))
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.shield(task), req.timeout)
        except asyncio.TimeoutError:
            timed_out = True
            await self._kill_exec(container_id, exec_id)
            try:
                await asyncio.wait_for(asyncio.shield(task), 5)
            except asyncio.TimeoutError:
                reader.abort()  # something escaped the process group and holds the pipe
                await task
        finally:
            if not task.done():
                reader.abort()
            with contextlib.suppress(OSError):
                sock.close()
        details = await self.engine.call(api.exec_inspect, exec_id)
        exit_code = details.get("ExitCode")
        if exit_code is None:
            exit_code = 137 if timed_out else -1
        return {
            "stdout": decode_output(reader.out[1], reader.truncated[1]),
            "stderr": decode_output(reader.out[2], reader.truncated[2]),
            "exitCode": int(exit_code),
            "durationMs": int((time.monotonic() - started) * 1000),
            "timedOut": timed_out,
            "stdoutTruncated": reader.truncated[1],
            "stderrTruncated": reader.truncated[2],
        }

    async def _kill_exec(self, container_id: str, exec_id: str) -> None:
        api = self.engine.api
        details = await self.engine.call(api.exec_inspect, exec_id)
        host_pid = details.get("Pid") or 0
        if not details.get("Running") or host_pid <= 0:
            return
        container_pid = kill_exec_group(host_pid)
        if container_pid is None:
            return
        with contextlib.suppress(docker.errors.APIError):
            killer = await self.engine.call(
                api.exec_create, container_id, ["kill", "-s", "KILL", "--", f"-{container_pid}"],
                user="0")
            await self.engine.call(api.exec_start, killer["Id"])


# ###########################################################################
# System and GPUs
# ###########################################################################

class GpuInfo(TypedDict):
    index: int
    name: str
    memoryMiB: int
    uuid: str


GPU_CACHE_SECONDS = 60.0
_gpu_cache: dict[str, tuple[float, list[GpuInfo]]] = {}


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Rows of ``--query-gpu=index,name,memory.total,uuid --format=csv,noheader,nounits``."""
    gpus: list[GpuInfo] = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        memory = parts[-2]
        gpus.append({
            "index": int(parts[0]),
            "name": ",".join(parts[1:-2]),  # a GPU name may itself hold a comma
            "memoryMiB": int(float(memory)) if re.fullmatch(r"\d+(\.\d+)?", memory) else 0,
            "uuid": parts[-1],
        })
    return gpus


async def gpu_inventory(config: Config) -> list[GpuInfo]:
    """The node's NVIDIA GPUs from nvidia-smi (cached a minute); empty where there is none."""
    command = config.nvidia_smi
    cached = _gpu_cache.get(command)
    if cached and time.monotonic() - cached[0] < GPU_CACHE_SECONDS:
        return cached[1]
    gpus: list[GpuInfo] = []
    executable = shutil.which(command)
    if executable:
        try:
            process = await asyncio.create_subprocess_exec(
                executable, "--query-gpu=index,name,memory.total,uuid",
                "--format=csv,noheader,nounits",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            try:
                output, _ = await asyncio.wait_for(process.communicate(), 5)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
                output = b""
            if process.returncode == 0:
                gpus = parse_nvidia_smi(output.decode("utf-8", "replace"))
        except OSError as err:
            log.warning("nvidia-smi could not run: %s", err)
    _gpu_cache[command] = (time.monotonic(), gpus)
    return gpus


def node_arch() -> str:
    """The architecture in the earlier implementation's words (Node's os.arch())."""
    machine = platform.machine().lower()
    return {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "armv7l": "arm"}.get(
        machine, machine)


def meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as source:
        for line in source:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                values[key] = int(fields[0]) * 1024
    return values


def host_memory_bytes() -> int:
    return meminfo().get("MemTotal", 0)


def format_bytes(amount: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(amount) < 1024 or unit == "TB":
            return f"{amount:.1f} {unit}" if unit != "B" else f"{int(amount)} B"
        amount /= 1024
    return f"{amount:.1f} TB"


def format_uptime(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 1440}d {minutes // 60 % 24}h {minutes % 60}m"


async def capabilities(config: Config) -> dict[str, Any]:
    gpus = await gpu_inventory(config)
    return {
        "gpu": bool(gpus),
        "gpuName": gpus[0]["name"] if gpus else None,
        "gpuMemory": f"{gpus[0]['memoryMiB']} MiB" if gpus else None,
        "gpuCount": len(gpus),
        "gpus": gpus,
        "arch": node_arch(),
        "platform": sys.platform,
        "cpus": os.cpu_count() or 1,
        "memory": host_memory_bytes(),
    }


def host_snapshot() -> dict[str, Any]:
    """Blocking reads of /proc and the root file system, for an executor."""
    memory = meminfo()
    total = memory.get("MemTotal", 0)
    free = memory.get("MemAvailable", memory.get("MemFree", 0))
    used = total - free
    disk: dict[str, str] | None = None
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage("/")
        disk = {"total": format_bytes(usage.total), "used": format_bytes(usage.used),
                "available": format_bytes(usage.free),
                "percentage": f"{usage.used / usage.total * 100:.1f}%" if usage.total else "0%"}
    uptime = 0.0
    with contextlib.suppress(OSError, ValueError), open("/proc/uptime", encoding="ascii") as up:
        uptime = float(up.read().split()[0])
    return {
        "hostname": socket.gethostname(),
        "platform": sys.platform,
        "arch": node_arch(),
        "cpus": os.cpu_count() or 1,
        "loadAverage": list(os.getloadavg()),
        "memory": {"total": format_bytes(total), "free": format_bytes(free),
                   "used": format_bytes(used),
                   "percentage": f"{used / total * 100:.1f}%" if total else "0%"},
        "disk": disk,
        "uptime": format_uptime(uptime),
    }


async def system_info(config: Config, engine: Engine) -> dict[str, Any]:
    snapshot, caps = await asyncio.gather(
        asyncio.get_running_loop().run_in_executor(None, host_snapshot), capabilities(config))
    docker_info: dict[str, Any] | None
    try:
        info = await asyncio.wait_for(engine.call(engine.api.info), 5)
        docker_info = {
            "version": info.get("ServerVersion"),
            "containers": info.get("Containers", 0),
            "containersRunning": info.get("ContainersRunning", 0),
            "containersPaused": info.get("ContainersPaused", 0),
            "images": info.get("Images", 0),
        }
    except (ClawdError, docker.errors.APIError, asyncio.TimeoutError):
        docker_info = None
    return {**snapshot, "docker": docker_info, "capabilities": {
        k: caps[k] for k in ("gpu", "gpuName", "gpuMemory", "gpuCount", "gpus", "arch",
                             "platform")}}


# ###########################################################################
# Auth and errors (middlewares)
# ###########################################################################

CONFIG_KEY = web.AppKey("config", Config)
ENGINE_KEY = web.AppKey("engine", Engine)
AUDIT_KEY = web.AppKey("audit", AuditLog)
SPACES_KEY = web.AppKey("spaces", Spaces)
PUBLIC_PATHS = frozenset({"/api/health", "/api/openapi.json"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str, code: str,
               headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status, headers=headers)


def presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.query.get("key") or None


def make_auth_middleware(config: Config) -> Any:
    expected = (config.api_key or "").encode("utf-8", "surrogateescape")

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Deny by default: every path but the public ones needs the key."""
        if config.auth_disabled or (
                request.path in PUBLIC_PATHS and request.method in ("GET", "HEAD")):
            return await handler(request)
        key = presented_key(request)
        if key is None or not hmac.compare_digest(
                key.encode("utf-8", "surrogateescape"), expected):
            log.warning("auth: rejected %s %s from %s (%s)", request.method, request.path,
                        request.remote, "no key" if key is None else "wrong key")
            raise Unauthorized("Unauthorized")
        return await handler(request)

    return authenticate


HTTP_CODES = {400: "invalid", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
              415: "unsupported_media_type"}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes ``{"error", "code"}`` JSON with the right status."""
    try:
        return await handler(request)
    except ClawdError as err:
        return json_error(err.status, err.message, err.code)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        headers = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else None
        message = {404: "no such route", 413: "request body too large"}.get(err.status,
                                                                         err.reason)
        return json_error(err.status, message, HTTP_CODES.get(err.status, "http_error"), headers)
    except docker.errors.APIError as err:
        log.warning("docker: %s %s: %s", request.method, request.path, api_message(err))
        if api_status(err) == 404:
            return json_error(404, api_message(err), "not_found")
        if api_status(err) == 409:
            return json_error(409, api_message(err), "conflict")
        return json_error(503, f"the Docker engine refused: {api_message(err)}", "docker_error")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return json_error(500, "internal error (see the service log)", "internal")


class RedactingAccessLogger(AbstractAccessLogger):
    """Access log lines without query strings, so a ``?key=`` never reaches the log."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %d %.1fms", request.remote, request.method, request.path,
                         response.status, time * 1000)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


# ###########################################################################
# Handlers
# ###########################################################################

def actor(request: web.Request) -> Actor:
    """Who is calling: the id of the key they presented (the middleware checked it)."""
    key = presented_key(request)
    return Actor(key_id=key_id(key) if key else None, addr=request.remote)


async def json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        raise BadRequest("a JSON object body is required", "invalid_json")
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest("the body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", "invalid_json")
    return body


def query_bool(request: web.Request, name: str, default: bool = False) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise BadRequest(f"{name} must be true or false", f"invalid_{name}")


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer", f"invalid_{name}") from None
    if value < low:
        raise BadRequest(f"{name} must be at least {low}", f"invalid_{name}")
    return min(value, high)


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    try:
        await asyncio.wait_for(engine.call(engine.api.ping), 2)
        docker_state: dict[str, Any] = {"ok": True}
    except (ClawdError, docker.errors.APIError, asyncio.TimeoutError) as err:
        message = err.message if isinstance(err, ClawdError) else "no answer within 2 s"
        docker_state = {"ok": False, "error": message}
    ok = bool(docker_state["ok"])
    return web.json_response(
        {"status": "ok" if ok else "degraded", "version": VERSION, "docker": docker_state},
        status=200 if ok else 503)


async def get_system(request: web.Request) -> web.Response:
    return web.json_response(await system_info(request.app[CONFIG_KEY], request.app[ENGINE_KEY]))


async def get_capabilities(request: web.Request) -> web.Response:
    return web.json_response(await capabilities(request.app[CONFIG_KEY]))


async def list_spaces(request: web.Request) -> web.Response:
    return web.json_response({"spaces": await request.app[SPACES_KEY].list_all()})


async def create_space(request: web.Request) -> web.Response:
    req = parse_create(await json_body(request), request.app[CONFIG_KEY])
    space = await request.app[SPACES_KEY].create(req, actor(request))
    return web.json_response({"space": space}, status=201)


async def get_space(request: web.Request) -> web.Response:
    return web.json_response({"space": await request.app[SPACES_KEY].get(
        request.match_info["name"])})


async def delete_space(request: web.Request) -> web.Response:
    remove_volume = query_bool(request, "removeVolume")
    await request.app[SPACES_KEY].destroy(request.match_info["name"], remove_volume,
                                          actor(request))
    return web.json_response({"message": "Space destroyed"})


async def stop_space(request: web.Request) -> web.Response:
    await request.app[SPACES_KEY].pause(request.match_info["name"], actor(request))
    return web.json_response({"message": "Space paused"})


async def start_space(request: web.Request) -> web.Response:
    await request.app[SPACES_KEY].start(request.match_info["name"], actor(request))
    return web.json_response({"message": "Space started"})


async def exec_space(request: web.Request) -> web.Response:
    name = check_space_name(request.match_info["name"])
    req = parse_exec(await json_body(request), request.app[CONFIG_KEY])
    return web.json_response(await request.app[SPACES_KEY].exec(name, req, actor(request)))


async def get_audit(request: web.Request) -> web.Response:
    space = request.query.get("space") or None
    limit = query_int(request, "limit", 200, 1, 1000)
    events = await request.app[AUDIT_KEY].read(space, limit)
    return web.json_response({"events": events})


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


# ###########################################################################
# OpenAPI document
# ###########################################################################

def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    words = {400: "Invalid input", 401: "Missing or wrong API key", 404: "Not found",
             409: "Conflict with the space's state", 413: "Body too large",
             503: "The Docker engine or the audit log is unavailable"}
    return {str(s): _json(_ref("Error"), words[s]) for s in statuses}


NAME_PARAM = {"name": "name", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": SPACE_NAME_RE.pattern, "maxLength": 63}}
MESSAGE = {"type": "object", "required": ["message"],
           "properties": {"message": {"type": "string"}}}


def _operation(summary: str, ok: dict[str, Any], *errors: int, body: dict[str, Any] | None = None,
               params: list[dict[str, Any]] | None = None, public: bool = False,
               ok_status: str = "200") -> dict[str, Any]:
    statuses = set(errors) | ({503} if not public else set())
    if not public:
        statuses.add(401)
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {ok_status: ok, **_errors(*sorted(statuses))},
    }
    if params:
        operation["parameters"] = params
    if body is not None:
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": body}}}
        operation["responses"].update(_errors(400, 413))
    if public:
        operation["security"] = []
    return operation


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 description of every route; tests check it against the router."""
    space_op = {"parameters": [NAME_PARAM]}
    schemas: dict[str, Any] = {
        "Error": {"type": "object", "required": ["error", "code"],
                  "properties": {"error": {"type": "string"}, "code": {"type": "string"}}},
        "Space": {
            "type": "object",
            "required": ["name", "id", "status", "created", "started", "image", "memory", "cpus",
                         "gpu", "template", "network", "user", "lastActivity", "volume"],
            "properties": {
                "name": {"type": "string"}, "id": {"type": "string"},
                "status": {"enum": ["running", "paused", "stopped"]},
                "created": {"type": "string"}, "started": {"type": ["string", "null"]},
                "image": {"type": "string"}, "memory": {"type": "integer"},
                "cpus": {"type": "number"}, "gpu": {"type": "boolean"},
                "template": {"type": ["string", "null"]}, "network": {"type": "string"},
                "user": {"type": "string"}, "lastActivity": {"type": "string"},
                "volume": {"type": "object", "required": ["name", "mountpoint"],
                           "properties": {"name": {"type": "string"},
                                          "mountpoint": {"type": "string"}}},
            },
        },
        "CreateSpace": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": SPACE_NAME_RE.pattern, "maxLength": 63},
                "memory": {"oneOf": [{"type": "string", "examples": ["512m", "2g"]},
                                     {"type": "integer", "minimum": MIN_MEMORY_BYTES}]},
                "cpus": {"type": "number", "exclusiveMinimum": 0},
                "gpu": {"type": "boolean"},
                "image": {"type": "string"},
                "template": {"type": "string"},
            },
        },
        "Exec": {
            "type": "object", "required": ["command"], "additionalProperties": False,
            "properties": {
                "command": {"oneOf": [{"type": "string", "minLength": 1},
                                      {"type": "array", "minItems": 1,
                                       "items": {"type": "string"}}]},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "workdir": {"type": "string"},
                "timeout": {"type": "number", "exclusiveMinimum": 0},
            },
        },
        "ExecResult": {
            "type": "object",
            "required": ["stdout", "stderr", "exitCode", "durationMs", "timedOut",
                         "stdoutTruncated", "stderrTruncated"],
            "properties": {"stdout": {"type": "string"}, "stderr": {"type": "string"},
                           "exitCode": {"type": "integer"}, "durationMs": {"type": "integer"},
                           "timedOut": {"type": "boolean"},
                           "stdoutTruncated": {"type": "boolean"},
                           "stderrTruncated": {"type": "boolean"}},
        },
        "AuditEvent": {
            "type": "object", "required": ["ts", "type"],
            "properties": {"ts": {"type": "string"}, "type": {"type": "string"},
                           "space": {"type": "string"}, "meta": {"type": "object"},
                           "keyId": {"type": "string"}, "clientAddr": {"type": "string"}},
        },
        "Capabilities": {
            "type": "object",
            "required": ["gpu", "gpuName", "gpuMemory", "gpuCount", "gpus", "arch", "platform"],
            "properties": {
                "gpu": {"type": "boolean"}, "gpuName": {"type": ["string", "null"]},
                "gpuMemory": {"type": ["string", "null"]}, "gpuCount": {"type": "integer"},
                "gpus": {"type": "array", "items": {"type": "object"}},
                "arch": {"type": "string"}, "platform": {"type": "string"},
                "cpus": {"type": "integer"}, "memory": {"type": "integer"},
            },
        },
    }
    space_response = _json({"type": "object", "required": ["space"],
                            "properties": {"space": _ref("Space")}}, "The space")
    paths: dict[str, Any] = {
        "/api/health": {"get": _operation(
            "Liveness and Docker engine reachability", _json({
                "type": "object", "required": ["status", "version", "docker"],
                "properties": {"status": {"enum": ["ok", "degraded"]},
                               "version": {"type": "string"},
                               "docker": {"type": "object"}}}, "Healthy"),
            public=True) | {"responses": {
                "200": _json({"type": "object"}, "Healthy"),
                "503": _json({"type": "object"}, "The Docker engine does not answer")}}},
        "/api/openapi.json": {"get": _operation(
            "This document", _json({"type": "object"}, "OpenAPI 3.1"), public=True)},
        "/api/system": {"get": _operation("Host facts, Docker counts and capabilities", _json(
            {"type": "object", "required": ["hostname", "cpus", "memory", "docker",
                                            "capabilities"]}, "System"))},
        "/api/system/capabilities": {"get": _operation(
            "GPU, CPU and memory of this node", _json(_ref("Capabilities"), "Capabilities"))},
        "/api/spaces": {
            "get": _operation("List spaces", _json(
                {"type": "object", "required": ["spaces"],
                 "properties": {"spaces": {"type": "array", "items": _ref("Space")}}},
                "Spaces")),
            "post": _operation("Create a space", space_response, 409,
                               body=_ref("CreateSpace"), ok_status="201"),
        },
        "/api/spaces/{name}": space_op | {
            "get": _operation("Get a space", space_response, 400, 404),
            "delete": _operation("Destroy a space", _json(MESSAGE, "Destroyed"), 400, 404, 409,
                                 params=[{"name": "removeVolume", "in": "query",
                                          "schema": {"type": "boolean"}}]),
        },
        "/api/spaces/{name}/stop": space_op | {
            "post": _operation("Pause a space", _json(MESSAGE, "Paused"), 400, 404, 409)},
        "/api/spaces/{name}/start": space_op | {
            "post": _operation("Resume or start a space", _json(MESSAGE, "Started"),
                               400, 404, 409)},
        "/api/spaces/{name}/exec": space_op | {
            "post": _operation("Run a command", _json(_ref("ExecResult"), "Finished"),
                               404, 409, body=_ref("Exec"))},
        "/api/audit": {"get": _operation("Audit events, oldest first", _json(
            {"type": "object", "required": ["events"],
             "properties": {"events": {"type": "array", "items": _ref("AuditEvent")}}},
            "Events"), 400, params=[
                {"name": "space", "in": "query", "schema": {"type": "string"}},
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}])},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Clawdspace", "version": VERSION,
                 "description": "Sandboxed Linux spaces on your own machines."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"queryKey": []}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "queryKey": {"type": "apiKey", "in": "query", "name": "key"},
            },
        },
        "paths": paths,
    }


# ###########################################################################
# App factory
# ###########################################################################

ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/api/health", health),
    ("GET", "/api/openapi.json", get_openapi),
    ("GET", "/api/system", get_system),
    ("GET", "/api/system/capabilities", get_capabilities),
    ("GET", "/api/spaces", list_spaces),
    ("POST", "/api/spaces", create_space),
    ("GET", "/api/spaces/{name}", get_space),
    ("DELETE", "/api/spaces/{name}", delete_space),
    ("POST", "/api/spaces/{name}/stop", stop_space),
    ("POST", "/api/spaces/{name}/start", start_space),
    ("POST", "/api/spaces/{name}/exec", exec_space),
    ("GET", "/api/audit", get_audit),
]


async def service_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Open what the service owns at start; close it at shutdown."""
    audit = app[AUDIT_KEY]
    audit.open()
    yield
    audit.close()
    app[ENGINE_KEY].close()


def create_app(config: Config) -> web.Application:
    """The aiohttp application for ``config``; tests build it directly."""
    config.check()
    if config.auth_disabled:
        log.warning("AUTHENTICATION IS DISABLED (CLAWDSPACE_AUTH_DISABLED=true): anyone who "
                    "can reach this port controls every space. Use only on a trusted dev box.")
    app = web.Application(
        middlewares=[error_middleware, make_auth_middleware(config)],
        client_max_size=config.max_body_bytes,
    )
    engine = Engine()
    audit = AuditLog(config.data_dir, config.audit_max_bytes, config.audit_keep,
                     Redactor([config.api_key or ""]))
    app[CONFIG_KEY] = config
    app[ENGINE_KEY] = engine
    app[AUDIT_KEY] = audit
    app[SPACES_KEY] = Spaces(config, engine, audit)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.cleanup_ctx.append(service_lifecycle)
    return app


# ###########################################################################
# CLI / main
# ###########################################################################

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clawdspace.py", description="Sandboxed Linux spaces on your own machines.",
        epilog="Configuration comes from CLAWDSPACE_* environment variables; see the module "
               "docstring or the README.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the service in the foreground")
    serve.add_argument("--host", help="bind address (default: $CLAWDSPACE_HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (default: $CLAWDSPACE_PORT or 7777)")
    commands.add_parser("version", help="print the version")
    args = parser.parse_args(argv)
    if args.command == "version":
        print(VERSION)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    try:
        config = Config.from_env()
        if args.host:
            config = dataclasses.replace(config, host=args.host)
        if args.port is not None:
            config = dataclasses.replace(config, port=args.port)
        app = create_app(config)
    except ConfigError as err:
        print(f"ERROR: {err.message}", file=sys.stderr)
        return 2
    log.info("clawdspace %s listening on %s:%d (prefix %r, data %s)", VERSION, config.host,
             config.port, config.prefix, config.data_dir)
    web.run_app(app, host=config.host, port=config.port, access_log_class=RedactingAccessLogger,
                print=None, shutdown_timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
