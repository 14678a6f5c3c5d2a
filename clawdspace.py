#!/usr/bin/env python3
"""Clawdspace: sandboxed Linux spaces on your own machines, over HTTP.

One service per machine ("node"). Each space is a Docker container plus a persistent named
volume mounted on ``/workspace``. Clients (agents, scripts, people) talk to the node over HTTP
with a bearer token; every action lands in an append-only JSON Lines audit log.

What it serves (``/api/openapi.json`` describes the ``/api`` part)
------------------------------------------------------------------
* Spaces: create (from YAML templates), exec, pause/resume, destroy; files under /workspace;
  a websocket terminal; stats and observability; auto-sleep of idle spaces; shell history
  ingested into the audit log; clone on create and a server-side git push.
* Network policy: "internet" spaces sit on a bridge of ours whose firewall rules keep them off
  the LAN, the tailnet, cloud metadata and this node; "none" spaces have no network.
* Nodes: discovery through Tailscale (or a static list), one view over the cluster, and any
  request forwarded to another node with ``?node=NAME``. NVIDIA GPUs assigned by UUID.
* E2B compatibility: E2B's REST control plane and its in-sandbox daemon protocol, so the
  official ``e2b`` SDK works unchanged with ``api_url`` and ``sandbox_url`` set to this node.
  A sandbox runs as ``user`` with its volume as ``/home/user`` (and ``/workspace``); ``sudo``
  works only where a template sets ``security.sudo: true``.

Run it
------
    python3 clawdspace.py serve            # foreground; reads the environment below
    python3 clawdspace.py remove-networks  # drop this instance's networks and firewall rules
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
CLAWDSPACE_NODES_REFRESH    Seconds between node discovery refreshes. Default ``30``.
CLAWDSPACE_NODE_NAME        This node's name. Default: its Tailscale host name, else hostname.
CLAWDSPACE_URL              This node's URL as peers reach it. Default: from Tailscale (MagicDNS
                            name, else Tailscale IPv4) and the port, else http://<hostname>:port.
CLAWDSPACE_TAILSCALE        The tailscale command. Default ``tailscale``.
CLAWDSPACE_TAILSCALE_TAG    Only peers carrying this ACL tag (e.g. ``tag:clawdspace``) are nodes.
CLAWDSPACE_EXEC_TIMEOUT     Default exec timeout in seconds. Default ``600``.
CLAWDSPACE_EXEC_MAX_TIMEOUT Largest exec timeout a client may ask for. Default ``86400``.
CLAWDSPACE_EXEC_OUTPUT_LIMIT  Bytes kept per exec stream (stdout, stderr). Default ``1048576``.
CLAWDSPACE_MAX_PROCESSES    Client processes (execs, terminals, E2B commands) one space may run
                            at once; more are refused with 429. Default ``64``.
CLAWDSPACE_PROCESS_RETENTION  Seconds a finished process stays listed. Default ``600``.
CLAWDSPACE_PROCESS_OUTPUT_BYTES  Output kept per background or streamed process for readers that
                            come later (a ring on disk, in the data directory). Default ``1048576``.
CLAWDSPACE_MAX_BODY_BYTES   Largest request body accepted. Default ``8388608``.
CLAWDSPACE_BODY_TIMEOUT     Seconds a request body may go without sending a byte before the
                            request is dropped with 408. Default ``60``.
CLAWDSPACE_PIDS_LIMIT       Process limit per space. Default ``1024``.
CLAWDSPACE_AUDIT_MAX_BYTES  Audit file size that triggers rotation. Default ``52428800``.
CLAWDSPACE_AUDIT_KEEP       Rotated audit files kept. Default ``5``.
CLAWDSPACE_NVIDIA_SMI       nvidia-smi command used to detect GPUs. Default ``nvidia-smi``.
CLAWDSPACE_HISTORY_INTERVAL Seconds between shell history ingestions (0: off). Default ``15``.
CLAWDSPACE_ALLOWED_ORIGINS  Extra browser origins allowed to open terminals, comma-separated.
CLAWDSPACE_TRUSTED_PROXIES  Reverse proxies (addresses or CIDRs, comma-separated) whose
                            X-Forwarded-Host and X-Forwarded-Proto name the page's origin.
CLAWDSPACE_FILE_READ_LIMIT  Largest JSON (base64) file read, in bytes. Default ``8388608``.
CLAWDSPACE_SHIPPED_TEMPLATES_DIR  Templates shipped with the program. Default: ``templates/``
                            beside clawdspace.py. Templates written through the API go to
                            $CLAWDSPACE_TEMPLATES_DIR and win over shipped ones of the same name.
CLAWDSPACE_FIREWALL         ``false`` lets internet spaces run without the egress firewall
                            (they are refused while it cannot be installed). Default ``true``.
CLAWDSPACE_GIT_TOKEN_HOSTS  Hosts a clone/push token may be sent to. Default ``github.com``.
CLAWDSPACE_GIT_HTTP_HOSTS   host[:port] list allowed over plain http:// (tests). Default: none.
CLAWDSPACE_USE_GH_TOKEN     Use the node's ``gh auth token`` for github.com. Default ``true``.
CLAWDSPACE_GIT_TIMEOUT      Seconds a clone or push may take. Default ``600``.
CLAWDSPACE_DNS_SERVERS      DNS servers internet spaces may reach on port 53 (comma-separated).
                            Default: the node's resolv.conf nameservers (what Docker uses).
DOCKER_HOST                 Honoured through the docker SDK (default: the local socket).

Constraints
-----------
* Docker is the database: everything the service knows about a space is a ``clawdspace.*``
  label on its container (labels are anyone's to write: a malformed one reads as a default).
  The service may be killed at any moment and restarted: creates under way are journalled in
  the data directory and undone at start, exec timeouts are enforced inside the space too,
  background processes write their output to files in their space and are recorded (in
  ``processes/``) before they start, so a restarted service takes them up again, and the
  service's own files are written atomically, one writer at a time.
* Authentication is decided by route (the route table names the credential), never by which
  header a request carries. Every state-changing action is audited before it is done; when the
  audit log cannot be written, the action is refused with 503.
* File calls run as the space's user, in processes that open paths themselves.
* The docker SDK is synchronous: every call runs on an executor thread, exec streams on their
  own threads, so the event loop never blocks.
* A container's HostConfig is built only from server-side rules; request fields are validated
  values, never passed through. No bind mounts, no privileged, no devices except GPUs.
* Errors are JSON ``{"error": "...", "code": "..."}`` with a 4xx status; a 500 is a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import errno
import functools
import hashlib
import hmac
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import struct
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import IO, Any, TypedDict, TypeVar, cast

import aiohttp
import docker
import docker.errors
import requests.exceptions
import yaml
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

VERSION = "2.0.0"
log = logging.getLogger("clawdspace")
T = TypeVar("T")


###############################################################################
# Errors ######################################################################
###############################################################################

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


class NoGpu(Conflict):
    """A GPU was asked of a node that has none (409)."""

    code = "no_gpu"


class TooManyProcesses(ClawdError):
    """A space already runs as many client processes as it may (429)."""

    status, code = 429, "too_many_processes"


class PayloadTooLarge(ClawdError):
    """A streamed body past its cap."""

    status, code = 413, "too_large"


class InsufficientStorage(ClawdError):
    """The space's disk is full (507)."""

    status, code = 507, "no_space"


class BodyTimeout(ClawdError):
    """The client stopped sending the request body (408)."""

    status, code = 408, "body_timeout"


class LengthRequired(ClawdError):
    """A streamed upload did not say how long it is (411)."""

    status, code = 411, "length_required"


class Unavailable(ClawdError):
    """A dependency (the Docker engine, the disk) is not answering (503)."""

    status, code = 503, "unavailable"


class NotServed(ClawdError):
    """A feature this node does not offer (501), said plainly."""

    status, code = 501, "not_implemented"


class BadGateway(ClawdError):
    """Another node could not be reached (502)."""

    status, code = 502, "node_unreachable"


class GatewayTimeout(ClawdError):
    """Another node did not answer in time (504)."""

    status, code = 504, "node_timeout"


###############################################################################
# Constants & config ##########################################################
###############################################################################

WORKSPACE = "/workspace"
CGROUP_ROOT = "/sys/fs/cgroup"
LABEL = "clawdspace"  # label namespace: clawdspace.<key>
# Space names: what the earlier server accepted (letters of either case, digits, _ and -),
# up to 128 characters. The engine's names are case-sensitive, so names that differ only by
# case (or _ and -) never collide; the hostname is derived (``space_hostname``).
SPACE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
MEMORY_RE = re.compile(r"^(\d+)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
IMAGE_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$")
MEMORY_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MIN_MEMORY_BYTES = 16 << 20
NETWORK_MODES = ("none", "internet")
# What the earlier server's "lan" mode opens: the private IPv4 ranges (never the tailnet, the
# metadata service or the node itself, which stay fenced).
LAN_CIDRS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
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


def env_set(name: str, default: frozenset[str]) -> frozenset[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return frozenset(item.strip().lower() for item in raw.split(",") if item.strip())


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


def env_networks(name: str) -> tuple[str, ...]:
    """A comma-separated list of addresses or CIDRs (empty: none)."""
    found = []
    for part in os.environ.get(name, "").split(","):
        if part.strip():
            try:
                found.append(str(ipaddress.ip_network(part.strip(), strict=False)))
            except ValueError:
                raise ConfigError(f"{name}: {part.strip()!r} is not an address or CIDR") \
                    from None
    return tuple(found)


def parse_nodes_setting(text: str) -> list[tuple[str, str]]:
    """``name=url,name2=url2``; a URL may itself contain ``=`` (only the first one splits)."""
    nodes = []
    for item in text.split(","):
        name, sep, url = item.strip().partition("=")
        name, url = name.strip(), url.strip().rstrip("/")
        if not sep or not name or not url:
            continue
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ConfigError(f"CLAWDSPACE_NODES: {name} needs an http:// or https:// URL")
        nodes.append((name, url))
    return nodes


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
    max_processes: int = 64
    process_retention: int = 600
    process_output_bytes: int = 1 << 20
    max_body_bytes: int = 8 << 20
    body_timeout: int = 60
    pids_limit: int = 1024
    audit_max_bytes: int = 50 << 20
    audit_keep: int = 5
    nvidia_smi: str = "nvidia-smi"
    history_interval: int = 15
    allowed_origins: frozenset[str] = frozenset()
    trusted_proxies: tuple[str, ...] = ()  # peers whose X-Forwarded-Host/-Proto are believed
    file_read_limit: int = 8 << 20
    shipped_templates_dir: str = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                              "templates")
    firewall: bool = True
    git_token_hosts: frozenset[str] = frozenset({"github.com"})
    git_http_hosts: frozenset[str] = frozenset()
    use_gh_token: bool = True
    git_timeout: int = 600
    dns_servers: frozenset[str] = frozenset()
    node_name: str = ""
    public_url: str = ""
    tailscale: str = "tailscale"
    tailscale_tag: str | None = None
    nodes_refresh: int = 30

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
            max_processes=env_int("CLAWDSPACE_MAX_PROCESSES", cls.max_processes, minimum=1),
            process_retention=env_int(
                "CLAWDSPACE_PROCESS_RETENTION", cls.process_retention, minimum=0),
            process_output_bytes=env_int(
                "CLAWDSPACE_PROCESS_OUTPUT_BYTES", cls.process_output_bytes, minimum=65536),
            max_body_bytes=env_int("CLAWDSPACE_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1024),
            body_timeout=env_int("CLAWDSPACE_BODY_TIMEOUT", cls.body_timeout, minimum=1),
            pids_limit=env_int("CLAWDSPACE_PIDS_LIMIT", cls.pids_limit, minimum=16),
            audit_max_bytes=env_int(
                "CLAWDSPACE_AUDIT_MAX_BYTES", cls.audit_max_bytes, minimum=4096),
            audit_keep=env_int("CLAWDSPACE_AUDIT_KEEP", cls.audit_keep, minimum=1),
            nvidia_smi=os.environ.get("CLAWDSPACE_NVIDIA_SMI", cls.nvidia_smi),
            history_interval=env_int("CLAWDSPACE_HISTORY_INTERVAL", cls.history_interval),
            allowed_origins=frozenset(
                o.strip().rstrip("/") for o in
                os.environ.get("CLAWDSPACE_ALLOWED_ORIGINS", "").split(",") if o.strip()),
            trusted_proxies=env_networks("CLAWDSPACE_TRUSTED_PROXIES"),
            file_read_limit=env_int(
                "CLAWDSPACE_FILE_READ_LIMIT", cls.file_read_limit, minimum=1024),
            shipped_templates_dir=os.environ.get(
                "CLAWDSPACE_SHIPPED_TEMPLATES_DIR", cls.shipped_templates_dir),
            firewall=env_flag("CLAWDSPACE_FIREWALL", True),
            git_token_hosts=env_set("CLAWDSPACE_GIT_TOKEN_HOSTS", cls.git_token_hosts),
            git_http_hosts=env_set("CLAWDSPACE_GIT_HTTP_HOSTS", cls.git_http_hosts),
            use_gh_token=env_flag("CLAWDSPACE_USE_GH_TOKEN", True),
            git_timeout=env_int("CLAWDSPACE_GIT_TIMEOUT", cls.git_timeout, minimum=1),
            dns_servers=env_set("CLAWDSPACE_DNS_SERVERS", cls.dns_servers),
            node_name=os.environ.get("CLAWDSPACE_NODE_NAME", ""),
            public_url=os.environ.get("CLAWDSPACE_URL", "").rstrip("/"),
            tailscale=os.environ.get("CLAWDSPACE_TAILSCALE", cls.tailscale),
            tailscale_tag=os.environ.get("CLAWDSPACE_TAILSCALE_TAG") or None,
            nodes_refresh=env_int("CLAWDSPACE_NODES_REFRESH", cls.nodes_refresh, minimum=1),
        )

    def check(self) -> None:
        """Refuse configurations that cannot work, with a one-line reason."""
        if not self.auth_disabled and not self.api_key:
            raise ConfigError(
                "no API key: set CLAWDSPACE_API_KEY (or CLAWDSPACE_AUTH_DISABLED=true for a "
                "development node)")
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,30}", self.prefix):
            raise ConfigError(f"CLAWDSPACE_PREFIX {self.prefix!r} is not a valid name prefix")
        parse_nodes_setting(self.nodes)


###############################################################################
# Models ######################################################################
###############################################################################

class ExecResult(TypedDict):
    stdout: str
    stderr: str
    exitCode: int
    durationMs: int
    timedOut: bool
    oomKilled: bool
    stdoutTruncated: bool
    stderrTruncated: bool


@dataclasses.dataclass(frozen=True)
class Actor:
    """Who made a request, for the audit log: a key id (never the key) or the E2B sandbox
    whose daemon token was presented, and an address."""

    key_id: str | None
    addr: str | None
    sandbox: str | None = None


SYSTEM_ACTOR = Actor(key_id=None, addr=None)  # the service's own housekeeping


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def plain_number(value: float) -> float:
    """A number as JSON shows it best: ``1``, not ``1.0`` (the earlier server's clients read
    CPU counts that way)."""
    return int(value) if float(value).is_integer() else float(value)


def epoch_to_iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def key_id(key: str) -> str:
    """A short, stable, non-reversible id for an API key, for logs and labels."""
    return "k-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:10]


def load_json(raw: str | bytes, what: str, code: str = "invalid_json") -> Any:
    """Parse JSON from a client or a label; any malformed input (including nesting too deep
    for the parser, or numbers too long to convert) is a 400 naming ``what``."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest(f"{what} is not valid JSON", code) from None


def json_object(value: Any, what: str, code: str = "invalid_argument") -> dict[str, Any]:
    """A field that must be a JSON object (absent or null: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be an object", code)
    return value


# Files the service writes in its data directory: one writer at a time per file, each write to
# a temporary name of its own, fsynced, then renamed over the old file; a crash leaves the old
# file or the new one and at worst a temporary file, which ``remove_temp_files`` sweeps at start.
TEMP_INFIX = ".tmp-"
_write_locks: dict[str, Any] = {}
_write_locks_guard = threading.Lock()


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically (blocking; run it on an executor thread)."""
    with _write_locks_guard:
        lock = _write_locks.setdefault(path, threading.Lock())
    directory, base = os.path.split(path)
    with lock:
        temp = os.path.join(directory, f".{base}{TEMP_INFIX}{os.urandom(6).hex()}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise


def remove_temp_files(directory: str) -> int:
    """Remove what interrupted ``write_atomic`` calls left in ``directory``; how many."""
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name.startswith(".") and TEMP_INFIX in entry.name and entry.is_file(
                    follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def write_json_atomic(path: str, value: Any) -> None:
    write_atomic(path, json.dumps(value, separators=(",", ":")).encode())


def read_json_file(path: str) -> Any:
    """A small JSON file of the service's; None when it is absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as source:
            return json.load(source)
    except (OSError, ValueError):
        return None


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


###############################################################################
# Background work #############################################################
###############################################################################

BACKOFF_LIMIT = 60.0  # seconds: the longest a failing loop waits before its next round


async def supervise(name: str, work: Callable[[], Awaitable[Any]],
                    every: float | None = None, delay: float = 0.0) -> None:
    """The one policy for work nobody waits on: run ``work`` once, or every ``every`` seconds
    (after ``delay``) for the life of the service. A failure is logged with its traceback and
    the loop goes on, each failure in a row doubling the wait before the next round (up to
    BACKOFF_LIMIT); only cancellation stops it."""
    if delay:
        await asyncio.sleep(delay)
    failures = 0
    while True:
        try:
            await work()
            failures = 0
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - background work must never die of one bad round
            failures += 1
            log.exception("%s failed (%d in a row); it goes on", name, failures)
        if every is None:
            return
        wait = every if not failures else min(BACKOFF_LIMIT, max(every, 1.0) * 2 ** failures)
        await asyncio.sleep(wait)


class Tasks:
    """Background tasks of one service, kept referenced, and cancelled together at close."""

    def __init__(self) -> None:
        self.running: set[asyncio.Task[None]] = set()

    def spawn(self, name: str, work: Callable[[], Awaitable[Any]], every: float | None = None,
              delay: float = 0.0) -> None:
        task = asyncio.ensure_future(supervise(name, work, every, delay))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def close(self) -> None:
        tasks = list(self.running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


###############################################################################
# Input validation ############################################################
###############################################################################

TEMPLATE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
REPO_DEST_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")


def check_space_name(name: Any) -> str:
    if not isinstance(name, str) or not SPACE_NAME_RE.fullmatch(name):
        raise BadRequest("invalid space name: use 1-128 letters, digits, '_' and '-'",
                         "invalid_name")
    return name


def space_hostname(name: str) -> str:
    """A DNS-safe hostname for a space: lowercase, '_' as '-', at most 63 characters."""
    return re.sub(r"[^a-z0-9-]", "-", name.lower())[:63].strip("-") or "space"


def parse_memory(value: Any, check_host: bool = True) -> int:
    """``"512m"``, ``"2g"``, ``"1t"`` or a byte count; anything else is an error (no default)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadRequest("memory must be a byte count or a string like '512m' or '2g'",
                         "invalid_memory")
    if isinstance(value, int):
        amount = value
    else:
        match = MEMORY_RE.fullmatch(value.strip())
        if not match:
            raise BadRequest(f"memory {value!r} is not a size: use k, m, g or t, e.g. '2g'",
                             "invalid_memory")
        amount = int(match.group(1)) * MEMORY_UNITS[match.group(2).lower()]
    if amount < MIN_MEMORY_BYTES:
        raise BadRequest("memory must be at least 16m", "invalid_memory")
    total = host_memory_bytes() if check_host else 0
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
    return plain_number(value)


def check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{field} must be true or false", f"invalid_{field}")
    return value


def check_image_ref(value: Any) -> str:
    if not isinstance(value, str) or not IMAGE_REF_RE.fullmatch(value):
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
        if not ENV_KEY_RE.fullmatch(key) or len(key) > 256:
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


def workspace_rel(raw: str | None) -> str:
    """A client path (relative to /workspace) in normal form ``/a/b``; ``..`` may not climb out."""
    if raw is None or raw == "":
        return "/"
    if "\x00" in raw or len(raw) > 4096:
        raise BadRequest("path must be at most 4096 characters without NUL", "invalid_path")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("path must be valid UTF-8", "invalid_path") from None
    parts: list[str] = []
    for component in raw.split("/"):
        if component in ("", "."):
            continue
        if component == "..":
            if not parts:
                raise Forbidden("path leads outside /workspace", "outside_workspace")
            parts.pop()
        else:
            parts.append(component)
    return "/" + "/".join(parts)


def check_template_name(name: Any) -> str:
    if not isinstance(name, str) or not TEMPLATE_NAME_RE.fullmatch(name):
        raise BadRequest("invalid template name: 1-64 of a-z, 0-9, '.', '_', '-', starting "
                         "with a letter or digit", "invalid_template")
    return name


def check_repo_dest(value: Any, field: str = "repoDest") -> str:
    if not isinstance(value, str) or len(value) > 200 or not REPO_DEST_RE.fullmatch(value) or any(
            part in (".", "..") for part in value.split("/")):
        raise BadRequest(f"{field} must be a relative path inside /workspace such as 'repo' or "
                         "'src/app'", f"invalid_{field}")
    return value


def check_cidr(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a CIDR string such as '10.1.2.0/24'", "invalid_template")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise BadRequest(f"{field}: {value[:64]!r} is not a CIDR", "invalid_template") from None


def decode_base64(value: Any, field: str, code: str) -> bytes:
    """A base64 string of a request (strict: no stray characters)."""
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a base64 string", code)
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise BadRequest(f"{field} is not valid base64", code) from None


def check_choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise BadRequest(f"{field} must be one of {', '.join(choices)}", f"invalid_{field}")
    return str(value)


###############################################################################
# Audit log ###################################################################
###############################################################################

# Token shapes that must never reach the audit log or a response, wherever they appear.
SECRET_PATTERNS = [
    # Token shapes, wherever they stand.
    re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
    re.compile(r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{10,}"),  # Stripe
    re.compile(r"\bAIza[0-9A-Za-z_-]{30,}"),  # Google API keys
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # JWTs
    # Secrets by their context: keep the context, drop the value.
    re.compile(r"(?i)((?:proxy-)?authorization:\s*)[^'\"\r\n]+"),
    re.compile(r"(?i)((?:x-api-key|x-auth-token|private-token|cookie|set-cookie):\s*)"
               r"[^'\"\r\n]+"),
    re.compile(r"(?i)(://[^/\s:@]+:)[^@\s/]+(@)"),
    re.compile(r"(://)[A-Za-z0-9_.~%+-]{20,}(@)"),  # a URL whose user part is a bare token
    re.compile(r"(?i)(\b(?:sshpass|(?:docker|podman|buildah|helm|oras)\s+(?:registry\s+)?"
               r"login)\b[^\n;|&]*?\s(?:-p|--password)[= ]?\s*)['\"]?[^\s'\"]+"),
    re.compile(r"(?i)((?:^|\s)(?:-u|--user)[= ]?\s*['\"]?[^\s:'\"]+:)[^\s'\"]+"),  # curl -u
    re.compile(r"(?i)(\bmysql(?:dump|admin|sh)?\b[^\n;|&]*?\s-p)(?!\s)['\"]?[^\s'\"]+"),
    re.compile(r"(?i)(--pass(?:word|wd)?[= ]\s*)['\"]?[^\s'\"]+"),
    re.compile(r"(?i)\b([a-z0-9_]*(?:token|secret|password|passwd|api_?key|access_?key|_key)"
               r"[a-z0-9_]*\s*[=:]\s*)['\"]?[^\s'\"&]+"),
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
            return self._argv(list(value))
        return value

    def _argv(self, items: list[Any]) -> list[Any]:
        """A list, each string also read in the context of the one before it: an argv such
        as ``["curl", "-u", "bob:pw"]`` or ``["mysql", "--password", "pw"]`` splits a secret
        from the word that marks it."""
        clean = [self.value(v) for v in items]
        for index in range(1, len(items)):
            before, item = items[max(0, index - 2):index], items[index]
            if not all(isinstance(v, str) for v in (*before, item)):
                continue
            head = self.text(" ".join(before)) + " "
            joined = self.text(" ".join([*before, item]))
            if joined != head + self.text(item):
                clean[index] = joined[len(head):] if joined.startswith(head) else "[REDACTED]"
        return clean


class JsonlFile:
    """One append-only JSON Lines file and its rotations (blocking; the audit writer thread).

    One record is one ``os.write`` of one line on an ``O_APPEND`` descriptor, so concurrent
    readers never see half a record. A torn last line (a crash mid-write) is moved aside at
    start. The file rotates by size: ``NAME.jsonl`` -> ``NAME.jsonl.1`` -> ... ``.N``.
    """

    def __init__(self, path: str, max_bytes: int, keep: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._fd: int | None = None

    def open(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self._repair_torn_tail()
        self._fd = self._open_fd()

    def close(self) -> None:
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

    def append(self, line: bytes) -> None:
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
        assert self._fd is not None  # noqa: S101 - guarded by append
        os.close(self._fd)
        for index in range(self.keep - 1, 0, -1):
            older = f"{self.path}.{index}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{index + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._fd = self._open_fd()

    def read_tail(self, space: str | None, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` events (of one space, if given), oldest first, read backwards."""
        found: list[dict[str, Any]] = []
        paths = [self.path] + [f"{self.path}.{i}" for i in range(1, self.keep + 1)]
        for path in paths:
            for line in reversed_lines(path):
                try:
                    event = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if not isinstance(event, dict):
                    continue
                if space is not None and event.get("space") != space:
                    continue
                found.append(event)
                if len(found) >= limit:
                    return found[::-1]
        return found[::-1]


class AuditLog:
    """The audit trail: ``audit.jsonl`` for every action, and ``shell.jsonl`` beside it for
    the shell history ingested from spaces, each rotating on its own. A space that floods its
    history can so push out only history, never the record of what was done to spaces. Both
    are written by a single writer thread; reads merge them by time.
    """

    SHELL_TYPES = ("space.shell",)

    def __init__(self, data_dir: str, max_bytes: int, keep: int, redactor: Redactor) -> None:
        self.main = JsonlFile(os.path.join(data_dir, "audit.jsonl"), max_bytes, keep)
        self.shell = JsonlFile(os.path.join(data_dir, "shell.jsonl"), max_bytes, keep)
        self.path = self.main.path
        self.redactor = redactor
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="audit")

    def open(self) -> None:
        self.main.open()
        self.shell.open()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self.main.close()
        self.shell.close()

    async def record(self, type_: str, space: str | None = None,
                     meta: dict[str, Any] | None = None, actor: Actor = SYSTEM_ACTOR,
                     ts: str | None = None) -> None:
        event: dict[str, Any] = {"ts": ts or now_iso(), "type": type_}
        if space is not None:
            event["space"] = space
        if meta:
            event["meta"] = self.redactor.value(meta)
        if actor.key_id:
            event["keyId"] = actor.key_id
        if actor.sandbox:
            event["actor"] = f"sandbox:{actor.sandbox}"
        if actor.addr:
            event["clientAddr"] = actor.addr
        line = (json.dumps(event, ensure_ascii=True, separators=(",", ":")) + "\n").encode()
        loop = asyncio.get_running_loop()
        target = self.shell if type_ in self.SHELL_TYPES else self.main
        try:
            await loop.run_in_executor(self._writer, target.append, line)
        except OSError as err:
            log.error("audit: cannot write %s: %s", target.path, err)
            raise Unavailable("the audit log cannot be written", "audit_unavailable") from err

    @contextlib.asynccontextmanager
    async def action(self, type_: str, space: str | None = None,
                     meta: dict[str, Any] | None = None,
                     actor: Actor = SYSTEM_ACTOR) -> AsyncIterator[None]:
        """Audit an action before it is done: when the record cannot be written (a full disk,
        a file-size limit, a read-only file system) this raises 503 and nothing is done. An
        action that then fails adds ``<type>.failed`` with the error (best effort)."""
        await self.record(type_, space, meta, actor)
        try:
            yield
        except Exception as err:
            detail = err.message if isinstance(err, ClawdError) else type(err).__name__
            with contextlib.suppress(ClawdError):
                await self.record(f"{type_}.failed", space, {"error": detail}, actor)
            raise

    async def read(self, space: str | None, limit: int) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._read_tail, space, limit)

    def _read_tail(self, space: str | None, limit: int) -> list[dict[str, Any]]:
        merged = self.main.read_tail(space, limit) + self.shell.read_tail(space, limit)
        merged.sort(key=lambda event: str(event.get("ts", "")))
        return merged[-limit:]


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


###############################################################################
# Docker engine ###############################################################
###############################################################################

DOCKER_API_VERSION = "1.41"  # Engine 20.10+; pinned so building the client never blocks
BUILD_STALL = 600  # seconds an image build may go without a line of output


class EngineError(Exception):
    """The engine refused a call: its HTTP status and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class EngineNotFound(EngineError):
    """The engine has no such object (404)."""


class ExecSocket:
    """The hijacked connection of an exec stream: its socket and the HTTP response that owns
    it, closed together (or the engine connection leaks)."""

    def __init__(self, response: requests.Response) -> None:
        self.response = response
        connection = response.raw.connection
        if connection is None or connection.sock is None:
            response.close()
            raise Unavailable("the Docker engine dropped an exec connection",
                              "docker_unavailable")
        self.sock: socket.socket = connection.sock
        self.sock.settimeout(None)

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shutdown(self, how: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(how)

    def close(self) -> None:
        self.response.close()
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    """docker-py's exceptions as the service's: EngineNotFound, EngineError, Unavailable."""
    try:
        yield
    except docker.errors.NotFound as err:
        raise EngineNotFound(404, engine_message(err)) from err
    except docker.errors.APIError as err:
        raise EngineError(int(err.status_code or 500), engine_message(err)) from err
    except (docker.errors.DockerException, requests.exceptions.RequestException,
            ConnectionError) as err:
        raise Unavailable(f"the Docker engine is not answering: {err}",
                          "docker_unavailable") from err


class Engine:
    """The one door to the Docker engine: a named method for each thing the service asks of
    it. Engine refusals arrive as EngineError (EngineNotFound for a missing object, which
    lookups answer as None); an engine that does not answer is Unavailable.

    docker-py is synchronous, so every call runs on a bounded thread pool; long streams (exec
    output) get threads of their own from a second pool, so 50 running execs never starve
    short calls such as ``inspect_container``.
    """

    def __init__(self) -> None:
        self.client = docker.DockerClient.from_env(
            version=DOCKER_API_VERSION, max_pool_size=64, timeout=60)
        self.api = self.client.api
        self.pool = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="docker")
        self.streams = concurrent.futures.ThreadPoolExecutor(512, thread_name_prefix="stream")

    async def close(self) -> None:
        """Let short calls finish (off the loop), drop stream readers, close the client."""
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.pool.shutdown(wait=True, cancel_futures=True))
        self.streams.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        with engine_errors():
            return await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    async def _lookup(self, fn: Callable[..., T], *args: Any) -> T | None:
        try:
            return await self.call(fn, *args)
        except EngineNotFound:
            return None

    async def stream(self, fn: Callable[[], T]) -> T:
        """Run a long blocking reader or writer (an exec's stream) on a thread of its own."""
        return await asyncio.get_running_loop().run_in_executor(self.streams, fn)

    # -- the engine -----------------------------------------------------------------------

    async def ping(self) -> None:
        await self.call(self.api.ping)

    async def info(self) -> dict[str, Any]:
        return await self.call(self.api.info)

    # -- images and containers ------------------------------------------------------------

    async def inspect_image(self, ref: str) -> dict[str, Any] | None:
        return await self._lookup(self.api.inspect_image, ref)

    async def inspect_container(self, ref: str) -> dict[str, Any] | None:
        return await self._lookup(self.api.inspect_container, ref)

    async def containers(self, labels: list[str]) -> list[dict[str, Any]]:
        """Every container (running or not) that carries all of ``labels`` (``k=v`` or ``k``)."""
        return await self.call(
            self.api.containers, all=True, filters={"label": labels})

    async def create_container(self, image: str, name: str, hostname: str, user: str,
                               labels: dict[str, str], environment: dict[str, str],
                               host_config: dict[str, Any], working_dir: str = WORKSPACE,
                               ) -> str:
        """A container that only sleeps: everything a space runs is an exec."""
        created = await self.call(
            self.api.create_container, image, name=name, hostname=hostname,
            user=user, working_dir=working_dir, entrypoint=["sleep", "infinity"], command=[],
            environment=environment or None, labels=labels, host_config=host_config)
        return str(created["Id"])

    async def start(self, container_id: str) -> None:
        await self.call(self.api.start, container_id)

    async def pause(self, container_id: str) -> None:
        await self.call(self.api.pause, container_id)

    async def unpause(self, container_id: str) -> None:
        await self.call(self.api.unpause, container_id)

    async def remove_container(self, container_id: str) -> None:
        """Remove a container, running or not; one that is already gone is no error."""
        with contextlib.suppress(EngineNotFound):
            await self.call(self.api.remove_container, container_id, force=True)

    async def stats(self, container_id: str) -> dict[str, Any]:
        return await self.call(
            self.api.stats, container_id, stream=False)

    def _archive_stat(self, container_id: str, path: str) -> dict[str, Any] | None:
        url = self._endpoint(f"/containers/{urllib.parse.quote(container_id, safe='')}/archive")
        response = self.api.head(url, params={"path": path})
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise EngineError(response.status_code, f"cannot stat {path}")
        header = response.headers.get("X-Docker-Container-Path-Stat", "")
        stat: dict[str, Any] | None = json.loads(base64.b64decode(header)) if header else None
        return stat

    async def archive_stat(self, container_id: str, path: str) -> dict[str, Any] | None:
        """The engine's stat of a path inside a container (symlinks resolved by the engine,
        metadata only); None when it does not exist."""
        return await self.call(self._archive_stat, container_id, path)

    # -- volumes and networks -------------------------------------------------------------

    async def inspect_volume(self, name: str) -> dict[str, Any] | None:
        return await self._lookup(self.api.inspect_volume, name)

    async def create_volume(self, name: str, labels: dict[str, str]) -> None:
        await self.call(self.api.create_volume, name, labels=labels)

    async def build_image(self, context: IO[bytes], tag: str, memory: int | None,
                          nocache: bool, each: Callable[[dict[str, Any]], None]) -> None:
        """Build an image from a tar context, with no network and nothing pulled; every
        line of the engine's output goes to ``each`` (on the reading thread). A build whose
        output stops for BUILD_STALL seconds is cut off (the engine cancels it)."""
        limits = {"memory": memory, "memswap": memory} if memory else None

        def run() -> None:
            for chunk in self.api.build(
                    fileobj=context, custom_context=True, tag=tag, rm=True, forcerm=True,
                    pull=False, network_mode="none", nocache=nocache, decode=True,
                    container_limits=limits, timeout=BUILD_STALL):
                each(chunk)

        with engine_errors():
            await self.stream(run)

    async def remove_image(self, ref: str) -> None:
        """Remove an image (not forced: one a container uses stays, EngineError 409)."""
        with contextlib.suppress(EngineNotFound):
            await self.call(self.api.remove_image, ref)

    async def remove_volume(self, name: str) -> None:
        """Remove a volume; one that is already gone is no error (in use: EngineError 409)."""
        with contextlib.suppress(EngineNotFound):
            await self.call(self.api.remove_volume, name)

    async def inspect_network(self, ref: str) -> dict[str, Any] | None:
        return await self._lookup(self.api.inspect_network, ref)

    async def networks(self, labels: list[str]) -> list[dict[str, Any]]:
        return await self.call(
            self.api.networks, filters={"label": labels})

    async def create_network(self, name: str, options: dict[str, str],
                             labels: dict[str, str]) -> None:
        await self.call(self.api.create_network, name, driver="bridge", check_duplicate=True,
                         options=options, labels=labels)

    async def remove_network(self, name: str) -> None:
        with contextlib.suppress(EngineNotFound):
            await self.call(self.api.remove_network, name)

    # -- execs ----------------------------------------------------------------------------

    def _endpoint(self, path: str) -> str:
        return f"{self.api.base_url}/v{self.api.api_version}{path}"

    def _exec_create(self, container_id: str, argv: list[str], user: str,
                     env: dict[str, str], workdir: str, stdin: bool, tty: bool) -> str:
        exec_id: str = self.api.exec_create(
            container_id, argv, stdout=True, stderr=True, stdin=stdin, tty=tty,
            environment=env or None, workdir=workdir, user=user)["Id"]
        return exec_id

    def _exec_attach(self, exec_id: str, tty: bool) -> ExecSocket:
        """Start an exec and take over its connection (Docker's ``Upgrade: tcp``)."""
        response = self.api.post(
            self._endpoint(f"/exec/{urllib.parse.quote(exec_id, safe='')}/start"),
            json={"Detach": False, "Tty": tty},
            headers={"Connection": "Upgrade", "Upgrade": "tcp"}, stream=True,
            timeout=self.api.timeout)  # until the upgrade; the stream itself has none
        try:
            response.raise_for_status()
        except requests.exceptions.HTTPError as err:
            response.close()
            raise docker.errors.create_api_error_from_http_exception(err) from None
        return ExecSocket(response)

    def _exec_open(self, container_id: str, argv: list[str], user: str, env: dict[str, str],
                   workdir: str, stdin: bool, tty: bool) -> tuple[str, ExecSocket]:
        exec_id = self._exec_create(container_id, argv, user, env, workdir, stdin, tty)
        return exec_id, self._exec_attach(exec_id, tty)

    async def exec_create(self, container_id: str, argv: list[str], user: str,
                          env: dict[str, str], workdir: str, stdin: bool = False,
                          tty: bool = False) -> str:
        return await self.call(self._exec_create, container_id, argv, user, env, workdir,
                                stdin, tty)

    async def exec_attach(self, exec_id: str, tty: bool = False) -> ExecSocket:
        return await self.call(self._exec_attach, exec_id, tty)

    async def exec_open(self, container_id: str, argv: list[str], user: str,
                        env: dict[str, str], workdir: str, stdin: bool = False,
                        tty: bool = False) -> tuple[str, ExecSocket]:
        """Create and start an exec in one pool job (the service's own, unaudited execs)."""
        return await self.call(self._exec_open, container_id, argv, user, env, workdir,
                                stdin, tty)

    async def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        return await self.call(self.api.exec_inspect, exec_id)

    async def exec_resize(self, exec_id: str, rows: int, cols: int) -> None:
        await self.call(self.api.exec_resize, exec_id, height=rows, width=cols)

    async def exec_run(self, container_id: str, argv: list[str], user: str) -> None:
        """Run a short command to its end, its output dropped."""
        exec_id = await self.exec_create(container_id, argv, user, {}, "/")
        await self.call(self.api.exec_start, exec_id)


def engine_message(err: docker.errors.APIError) -> str:
    explanation = err.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode("utf-8", "replace")
    return str(explanation or err).strip()


EXEC_FRAME = struct.Struct(">BxxxL")  # Docker's multiplexed stream: stream id, length


def socket_chunks(sock: ExecSocket, recv_size: int = 65536) -> Iterator[bytes]:
    """What an exec's connection delivers, until it ends (or fails)."""
    while True:
        try:
            chunk = sock.recv(recv_size)
        except OSError:
            return
        if not chunk:
            return
        yield chunk


def demux_frames(sock: ExecSocket, recv_size: int = 65536) -> Iterator[tuple[int, bytes]]:
    """(stream, bytes) pieces of an exec's multiplexed output, until the socket ends."""
    buffer = bytearray()
    stream, left = 0, 0
    for chunk in socket_chunks(sock, recv_size):
        buffer += chunk
        while buffer:
            if left == 0:
                if len(buffer) < EXEC_FRAME.size:
                    break
                stream, left = EXEC_FRAME.unpack_from(buffer)
                del buffer[:EXEC_FRAME.size]
                continue
            take = min(left, len(buffer))
            yield stream, bytes(buffer[:take])
            del buffer[:take]
            left -= take


def raw_pieces(sock: ExecSocket, recv_size: int = 65536) -> Iterator[tuple[int, bytes]]:
    """A TTY exec's output, all of it stdout, until the socket ends."""
    return ((1, chunk) for chunk in socket_chunks(sock, recv_size))


class DemuxReader:
    """Collects an exec's stdout and stderr from its socket.

    Keeps at most ``limit`` bytes per stream and drains the rest, so a process that prints
    gigabytes ends normally instead of blocking on a full pipe, and memory stays bounded.
    """

    def __init__(self, sock: ExecSocket, limit: int, raw: bool = False) -> None:
        self.sock = sock
        self.limit = limit
        self.raw = raw  # a TTY exec: one stream, not multiplexed
        self.out = {1: bytearray(), 2: bytearray()}
        self.truncated = {1: False, 2: False}
        self.counted = {1: 0, 2: 0}  # every byte of each stream, kept or not
        # When set, frames go here (streaming) instead of being collected.
        self.sink: Callable[[int, bytes], Any] | None = None

    def run(self) -> None:
        for stream, data in (raw_pieces(self.sock) if self.raw else demux_frames(self.sock)):
            if stream in self.counted:
                self.counted[stream] += len(data)
            self._keep(stream, data)

    def _keep(self, stream: int, data: bytes) -> None:
        if self.sink is not None:
            self.sink(stream, data)
            return
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
        self.sock.shutdown(socket.SHUT_RDWR)


class ExecStdout:
    """An exec's stdout as a blocking byte stream, for data that must not be collected whole
    (a file streamed out of a space); stderr is kept, capped, for the error message."""

    def __init__(self, sock: ExecSocket, recv_size: int) -> None:
        self.frames = demux_frames(sock, recv_size)
        self.pending = b""
        self.stderr = bytearray()

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of stdout; b"" once the exec's output has ended."""
        while not self.pending:
            piece = next(self.frames, None)
            if piece is None:
                return b""
            stream, data = piece
            if stream == 1:
                self.pending = data
            elif stream == 2 and len(self.stderr) < 65536:
                self.stderr += data[:65536 - len(self.stderr)]
        data, self.pending = self.pending[:size], self.pending[size:]
        return data

    def read_line(self, limit: int) -> bytes | None:
        """One line of stdout (without its newline); None when the output ends first."""
        line = b""
        while len(line) <= limit:
            data = self.read(limit + 1 - len(line))
            if not data:
                return None
            cut = data.find(b"\n")
            if cut >= 0:
                self.pending = data[cut + 1:] + self.pending
                return line + data[:cut]
            line += data
        return None


def decode_output(data: bytes | bytearray, truncated: bool) -> str:
    """UTF-8 text of collected output; a character cut by the size cap is dropped, not mangled.

    The whole buffer is decoded at once, so a character split across frames survives.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    return decoder.decode(bytes(data), final=not truncated)


def oom_kill_count(container_id: str) -> int | None:
    """How many processes the kernel's OOM killer has killed in a container's memory cgroup
    (cgroup v2 or v1, systemd or cgroupfs driver); None where this host cannot see it."""
    for path, key in (
            (f"{CGROUP_ROOT}/system.slice/docker-{container_id}.scope/memory.events", "oom_kill"),
            (f"{CGROUP_ROOT}/docker/{container_id}/memory.events", "oom_kill"),
            (f"{CGROUP_ROOT}/memory/docker/{container_id}/memory.oom_control", "oom_kill"),
            (f"{CGROUP_ROOT}/memory/system.slice/docker-{container_id}.scope/"
             "memory.oom_control", "oom_kill")):
        try:
            with open(path, encoding="ascii") as source:
                for line in source:
                    name, _, value = line.partition(" ")
                    if name == key and value.strip().isdigit():
                        return int(value)
        except OSError:
            continue
    return None


def container_pid_of(host_pid: int, container_id: str) -> int | None:
    """The pid inside its container of a host process of that container (None: not one of
    its processes, or this host cannot see it)."""
    try:
        with open(f"/proc/{host_pid}/cgroup", encoding="ascii", errors="replace") as cgroup:
            if container_id not in cgroup.read():
                return None
        with open(f"/proc/{host_pid}/status", encoding="ascii", errors="replace") as status:
            ns_pids = [line.split()[1:] for line in status if line.startswith("NSpid:")]
    except OSError:
        return None
    return int(ns_pids[0][-1]) if ns_pids and ns_pids[0] else None


def kill_exec_group(host_pid: int, container_id: str,
                    sig: signal.Signals = signal.SIGKILL) -> int | None:
    """Signal an exec's process group from the host; return its pid inside the container.

    runc makes every exec a session and group leader, so the group holds the whole command
    tree. Returns the in-container pid when the host kill is not permitted (no CAP_KILL), so
    the caller can kill from inside instead; None when nothing is left to do. The process
    must be the container's (its cgroup names the container): where the engine's pids are
    not this host's (a remote engine), nothing is killed here.
    """
    container_pid = container_pid_of(host_pid, container_id)
    if container_pid is None:
        return None
    try:
        os.killpg(host_pid, sig)
        return None
    except ProcessLookupError:
        return None
    except PermissionError:
        return container_pid


###############################################################################
# Space attributes and labels #################################################
###############################################################################

# A space's attributes live in labels of its container, ``clawdspace.<key>``; this section is
# the one place that names them. SPACE_ATTRIBUTES declares each attribute once: its field in
# the view, its label, its JSON schema, its default, how its label is read and written, how a
# create request gives it and which template field sets it. Labels are anyone's to write: a
# malformed one reads as its default and is reported, never fatal.
LABEL_SCHEMA = 1  # the label layout this version writes (clawdspace.schema)
# Upgrades of older label layouts: LABEL_MIGRATIONS[n] turns schema n into schema n + 1.
LABEL_MIGRATIONS: dict[int, Callable[[dict[str, str]], dict[str, str]]] = {}


def label_key(name: str) -> str:
    return f"{LABEL}.{name}"


INSTANCE_LABEL = label_key("instance")  # which service instance (its prefix) owns it
KIND_LABEL = label_key("kind")  # space, space-volume or network
SPACE_LABEL = label_key("space")  # the space's name
SCHEMA_LABEL = label_key("schema")
VOLUME_LABEL = label_key("volume")
E2B_TEMPLATE_LABEL = label_key("e2b-template")
E2B_METADATA_LABEL = label_key("e2b-metadata")


class SpaceVolume(TypedDict):
    name: str
    mountpoint: str


class SpaceInfo(TypedDict):
    name: str
    id: str
    status: str
    created: str
    createdBy: str | None
    started: str | None
    image: str
    memory: int
    cpus: float
    gpu: bool
    gpus: list[str]
    template: str | None
    network: str
    writableRootfs: bool
    sudo: bool
    idleTimeout: int | None
    user: str
    lastActivity: str
    volume: SpaceVolume


def read_integer(text: str) -> int:
    """A count such as a byte size: ASCII digits only."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(text)
    return int(text)


def read_number(text: str) -> float:
    value = float(text) if text.isascii() else math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return plain_number(value)


def read_flag(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError(text)
    return text == "true"


def read_seconds(text: str) -> int | None:
    return read_integer(text) if text else None


def write_flag(value: bool) -> str:
    return "true" if value else "false"


def write_optional(value: Any) -> str:
    return "" if value is None else str(value)


@dataclasses.dataclass(frozen=True)
class SpaceAttribute:
    """One attribute of a space, declared once."""

    field: str  # its name in the space view, the create body and the OpenAPI schema
    key: str  # its label: clawdspace.<key>
    schema: dict[str, Any]  # JSON schema of its value in the view
    default: Any  # what an absent or malformed label reads as
    read: Callable[[str], Any] = str  # label -> value; ValueError: malformed
    write: Callable[[Any], str] = str  # value -> label
    parse: Callable[[Any], Any] | None = None  # create body value -> value (None: not asked)
    template: str | None = None  # the Template field that gives its default, if any
    request_schema: dict[str, Any] | None = None  # JSON schema in a create body

    @property
    def label(self) -> str:
        return label_key(self.key)


SPACE_ATTRIBUTES: tuple[SpaceAttribute, ...] = (
    SpaceAttribute("image", "image", {"type": "string"}, "", parse=check_image_ref,
                   template="image", request_schema={"type": "string"}),
    SpaceAttribute("memory", "memory", {"type": "integer"}, 0, read_integer, parse=parse_memory,
                   template="memory", request_schema={"oneOf": [
                       {"type": "string", "examples": ["512m", "2g"]},
                       {"type": "integer", "minimum": MIN_MEMORY_BYTES}]}),
    SpaceAttribute("cpus", "cpus", {"type": "number"}, 0.0, read_number, repr,
                   parse=parse_cpus, template="cpus",
                   request_schema={"type": "number", "exclusiveMinimum": 0}),
    SpaceAttribute("gpu", "gpu", {"type": "boolean"}, False, read_flag, write_flag,
                   parse=functools.partial(check_bool, "gpu"), template="gpu",
                   request_schema={"type": "boolean"}),
    SpaceAttribute("gpus", "gpus", {"type": "array", "items": {"type": "string"}}, [],
                   lambda text: [g for g in text.split(",") if g], ",".join),
    SpaceAttribute("template", "template", {"type": ["string", "null"]}, None,
                   lambda text: text or None, write_optional, request_schema={"type": "string"}),
    SpaceAttribute("network", "network", {"type": "string"}, "internet",
                   parse=lambda value: check_choice("network", value, NETWORK_MODES),
                   template="network", request_schema={"enum": list(NETWORK_MODES)}),
    SpaceAttribute("writableRootfs", "writable-rootfs", {"type": "boolean"}, True, read_flag,
                   write_flag, parse=functools.partial(check_bool, "writableRootfs"),
                   template="writable_rootfs", request_schema={"type": "boolean"}),
    SpaceAttribute("sudo", "sudo", {"type": "boolean"}, False, read_flag, write_flag,
                   parse=functools.partial(check_bool, "sudo"), template="sudo",
                   request_schema={"type": "boolean"}),
    SpaceAttribute("idleTimeout", "idle-timeout", {"type": ["integer", "null"]}, None,
                   read_seconds, write_optional, template="idle_timeout"),
    SpaceAttribute("user", "user", {"type": "string"}, ""),
    SpaceAttribute("created", "created-at", {"type": "string"}, ""),
    SpaceAttribute("createdBy", "created-by", {"type": ["string", "null"]}, None,
                   lambda text: text or None, write_optional),
)
ATTRIBUTES_BY_FIELD = {attribute.field: attribute for attribute in SPACE_ATTRIBUTES}


def encode_labels(values: dict[str, Any]) -> dict[str, str]:
    """Labels for the attributes in ``values``, with the schema version they are written in."""
    labels = {SCHEMA_LABEL: str(LABEL_SCHEMA)}
    for field, value in values.items():
        attribute = ATTRIBUTES_BY_FIELD[field]
        labels[attribute.label] = attribute.write(value)
    return labels


def decode_labels(labels: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Every attribute from a container's labels, and what was wrong with them: a malformed
    label reads as its attribute's default; an older layout is migrated first."""
    problems: list[str] = []
    raw = labels.get(SCHEMA_LABEL)
    version = int(raw) if raw is not None and raw.isascii() and raw.isdigit() else None
    if version is None:
        problems.append(f"{SCHEMA_LABEL} is {raw!r}, not a schema version; read as "
                        f"schema {LABEL_SCHEMA}")
    elif version > LABEL_SCHEMA:
        problems.append(f"labels of schema {version}, newer than this version's "
                        f"{LABEL_SCHEMA}; read as schema {LABEL_SCHEMA}")
    else:
        for step in range(version, LABEL_SCHEMA):
            if step not in LABEL_MIGRATIONS:
                problems.append(f"no migration from label schema {step}; read as is")
                break
            labels = LABEL_MIGRATIONS[step](labels)
    values: dict[str, Any] = {}
    for attribute in SPACE_ATTRIBUTES:
        text = labels.get(attribute.label)
        values[attribute.field] = attribute.default
        if text is None:
            continue
        try:
            values[attribute.field] = attribute.read(text)
        except (ValueError, OverflowError):
            problems.append(f"{attribute.label}={text[:64]!r} is malformed; read as "
                            f"{attribute.default!r}")
    return values, problems


def space_status(state: str) -> str:
    if state == "paused":
        return "paused"
    if state in ("running", "restarting"):
        return "running"
    return "stopped"


def space_view(container_id: str, labels: dict[str, str], state: str, started: str | None,
               last_activity: float | None, default_volume: str,
               ) -> tuple[SpaceInfo, list[str]]:
    """The API's view of a space, from its container's labels and state; and the problems
    its labels have."""
    values, problems = decode_labels(labels)
    view: dict[str, Any] = {
        "name": labels.get(SPACE_LABEL, ""), "id": container_id[:12],
        "status": space_status(state), "started": started, **values,
        "lastActivity": epoch_to_iso(last_activity) if last_activity
        else (started or values["created"]),
        "volume": {"name": labels.get(VOLUME_LABEL, default_volume), "mountpoint": WORKSPACE},
    }
    return cast(SpaceInfo, view), problems


def space_schema() -> dict[str, Any]:
    """The JSON schema of the space view (OpenAPI ``Space``)."""
    fixed: dict[str, Any] = {
        "name": {"type": "string"}, "id": {"type": "string"},
        "status": {"enum": ["running", "paused", "stopped"]},
        "started": {"type": ["string", "null"]}, "lastActivity": {"type": "string"},
        "volume": {"type": "object", "required": ["name", "mountpoint"],
                   "properties": {"name": {"type": "string"}, "mountpoint": {"type": "string"}}},
    }
    properties = {**fixed, **{a.field: a.schema for a in SPACE_ATTRIBUTES}}
    return {"type": "object", "required": list(properties),
            "properties": {**properties, "node": {"type": "string"}}}


###############################################################################
# Templates ###################################################################
###############################################################################

TEMPLATE_MAX_BYTES = 64 << 10
TEMPLATE_KEYS: dict[str, Any] = {
    "name": None, "description": None, "idleTimeout": None,
    "resources": {"memory", "cpus", "gpu", "image"},
    "network": {"mode", "allowCidrs", "blockCidrs"},
    "security": {"writableRootfs", "sudo"},
    "managed": None,
    "workspace": {"defaultRepoDest"},
}


@dataclasses.dataclass(frozen=True)
class Template:
    """A validated template: defaults and a network/rootfs posture for new spaces."""

    name: str
    description: str = ""
    memory: int | None = None
    cpus: float | None = None
    gpu: bool = False
    image: str | None = None
    network: str = "internet"
    allow_cidrs: tuple[str, ...] = ()
    block_cidrs: tuple[str, ...] = ()  # refused even where allowCidrs would open them
    writable_rootfs: bool = True
    sudo: bool = False  # setuid programs (sudo) work: no-new-privileges is off
    idle_timeout: int | None = None
    default_repo_dest: str = "repo"
    source: str = "builtin"
    managed: bool = False  # the earlier server's flag (its boot rewrote such templates)

    def fence(self) -> tuple[str, ...]:
        """The network's CIDR rules: allowed ranges, then refused ones marked with '!'."""
        return self.allow_cidrs + tuple(f"!{cidr}" for cidr in self.block_cidrs)

    def as_dict(self) -> dict[str, Any]:
        resources: dict[str, Any] = {"gpu": self.gpu}
        if self.memory is not None:
            resources["memory"] = self.memory
        if self.cpus is not None:
            resources["cpus"] = self.cpus
        if self.image is not None:
            resources["image"] = self.image
        return {
            "name": self.name, "description": self.description, "resources": resources,
            "network": {"mode": self.network, "allowCidrs": list(self.allow_cidrs),
                        "blockCidrs": list(self.block_cidrs)},
            "managed": self.managed,
            "security": {"writableRootfs": self.writable_rootfs, "sudo": self.sudo},
            "idleTimeout": self.idle_timeout,
            "workspace": {"defaultRepoDest": self.default_repo_dest},
            "source": self.source,
        }


BUILTIN_DEFAULT = Template(name="default", description="Internet access; LAN, tailnet, "
                           "cloud metadata and this node blocked")


def template_mapping(text: str) -> dict[str, Any]:
    """A template's YAML (safe_load), checked against the closed schema TEMPLATE_KEYS."""
    if len(text.encode("utf-8", "surrogatepass")) > TEMPLATE_MAX_BYTES:
        raise BadRequest("template YAML is larger than 64 KiB", "invalid_template")
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        # ValueError: an int too long to convert; RecursionError: nesting too deep.
        raise BadRequest(f"template YAML does not parse: {str(err)[:300]}",
                         "invalid_template") from None
    if not isinstance(data, dict):
        raise BadRequest("a template is a YAML mapping with at least 'name'", "invalid_template")
    for key, value in data.items():
        if key not in TEMPLATE_KEYS:
            raise BadRequest(f"unknown template field {str(key)[:64]!r}", "invalid_template")
        allowed = TEMPLATE_KEYS[key]
        if allowed is None:
            continue
        if not isinstance(value, dict):
            raise BadRequest(f"{key} must be a mapping", "invalid_template")
        unknown = [sub for sub in value if sub not in allowed]
        if unknown:
            raise BadRequest(f"unknown template field {key}.{str(unknown[0])[:64]}",
                             "invalid_template")
    return data


def parse_template(text: str, source: str = "user") -> Template:
    """A template from YAML against a closed schema; every error names its field."""
    data = template_mapping(text)

    def field(section: str, key: str) -> Any:
        return (data.get(section) or {}).get(key)

    def named(error: BadRequest, name: str) -> BadRequest:
        return BadRequest(f"{name}: {error.message}", "invalid_template")

    name = check_template_name(data.get("name"))
    description = data.get("description", "")
    if not isinstance(description, str) or len(description) > 200:
        raise BadRequest("description must be a string of at most 200 characters",
                         "invalid_template")
    memory = field("resources", "memory")
    cpus = field("resources", "cpus")
    try:
        memory_bytes = parse_memory(memory, check_host=False) if memory is not None else None
    except BadRequest as err:
        raise named(err, "resources.memory") from None
    if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, (int, float))
                             or not 0 < cpus <= 1024):
        raise BadRequest("resources.cpus must be a number above 0", "invalid_template")
    gpu = field("resources", "gpu")
    if gpu is not None and not isinstance(gpu, bool):
        raise BadRequest("resources.gpu must be true or false", "invalid_template")
    image = field("resources", "image")
    if image is not None:
        try:
            check_image_ref(image)
        except BadRequest as err:
            raise named(err, "resources.image") from None
    mode = field("network", "mode") or "internet"
    if mode not in (*NETWORK_MODES, "lan"):
        raise BadRequest(f"network.mode must be one of {', '.join(NETWORK_MODES)} (or the "
                         "earlier server's lan)", "invalid_template")

    def cidr_list(key: str) -> set[str]:
        cidrs = field("network", key) or []
        if not isinstance(cidrs, list) or len(cidrs) > 32:
            raise BadRequest(f"network.{key} must be a list of at most 32 CIDRs",
                             "invalid_template")
        return {check_cidr(c, f"network.{key}") for c in cidrs}

    opened = cidr_list("allowCidrs")
    if mode == "lan":  # the earlier server's "internet and LAN": the private ranges open
        mode, opened = "internet", opened | set(LAN_CIDRS)
    allow = tuple(sorted(opened))
    block = tuple(sorted(cidr_list("blockCidrs")))
    managed = data.get("managed", False)
    if not isinstance(managed, bool):
        raise BadRequest("managed must be true or false", "invalid_template")
    writable = field("security", "writableRootfs")
    if writable is not None and not isinstance(writable, bool):
        raise BadRequest("security.writableRootfs must be true or false", "invalid_template")
    sudo = field("security", "sudo")
    if sudo is not None and not isinstance(sudo, bool):
        raise BadRequest("security.sudo must be true or false", "invalid_template")
    idle = data.get("idleTimeout")
    if idle is not None and (isinstance(idle, bool) or not isinstance(idle, int) or idle < 0):
        raise BadRequest("idleTimeout must be a whole number of seconds (0: never)",
                         "invalid_template")
    dest = field("workspace", "defaultRepoDest")
    return Template(
        name=name, description=description, memory=memory_bytes,
        cpus=plain_number(cpus) if cpus is not None else None, gpu=bool(gpu), image=image,
        network=mode, allow_cidrs=allow, block_cidrs=block, managed=managed,
        writable_rootfs=writable is not False, sudo=sudo is True,
        idle_timeout=idle,
        default_repo_dest=check_repo_dest(dest, "workspace.defaultRepoDest")
        if dest is not None else "repo",
        source=source)


class Templates:
    """Shipped templates (beside the program) overlaid by the user's (in the data directory).

    A name is checked against a strict pattern before it touches the file system, so it can
    never leave the templates directory. The user's file always wins, and upgrades only ever
    replace shipped files.
    """

    def __init__(self, shipped_dir: str, user_dir: str, audit: AuditLog) -> None:
        self.shipped_dir = shipped_dir
        self.user_dir = user_dir
        self.audit = audit

    def _path(self, directory: str, name: str) -> str:
        return os.path.join(directory, f"{check_template_name(name)}.yaml")

    def _read(self, name: str) -> tuple[str, str] | None:
        """(yaml, source) of a template; the user's copy first."""
        for directory, source in ((self.user_dir, "user"), (self.shipped_dir, "shipped")):
            try:
                with open(self._path(directory, name), encoding="utf-8") as handle:
                    return handle.read(TEMPLATE_MAX_BYTES + 1), source
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as err:
                log.warning("template %s in %s: %s", name, directory, err)
        return None

    def _names(self) -> list[str]:
        names: set[str] = set()
        for directory in (self.shipped_dir, self.user_dir):
            with contextlib.suppress(OSError):
                for entry in os.listdir(directory):
                    stem, dot, ext = entry.rpartition(".")
                    if dot and ext == "yaml" and TEMPLATE_NAME_RE.fullmatch(stem):
                        names.add(stem)
        return sorted(names)

    def _load(self, name: str) -> tuple[Template, str] | None:
        found = self._read(name)
        if found is None:
            return (BUILTIN_DEFAULT, yaml.safe_dump(BUILTIN_DEFAULT.as_dict(), sort_keys=False)) \
                if name == "default" else None
        text, source = found
        template = parse_template(text, source)
        if template.name != name:
            raise BadRequest(f"template file {name}.yaml names itself {template.name!r}",
                             "invalid_template")
        return template, text

    async def get(self, name: str) -> tuple[Template, str]:
        check_template_name(name)
        loaded = await asyncio.get_running_loop().run_in_executor(None, self._load, name)
        if loaded is None:
            raise NotFound(f"Template not found: {name}")
        return loaded

    async def for_space(self, name: Any) -> Template:
        """The template a create names; 400 (not 404) when it does not exist."""
        if not isinstance(name, str):
            raise BadRequest("template must be a template name", "invalid_template")
        if not TEMPLATE_NAME_RE.fullmatch(name):
            raise BadRequest(f"unknown template {name[:64]!r}", "unknown_template")
        try:
            return (await self.get(name))[0]
        except NotFound:
            raise BadRequest(f"unknown template {name!r}", "unknown_template") from None

    async def list_all(self) -> list[dict[str, Any]]:
        def collect() -> list[dict[str, Any]]:
            rows = []
            for name in self._names():
                try:
                    loaded = self._load(name)
                except BadRequest as err:
                    log.warning("template %s is invalid: %s", name, err.message)
                    continue
                if loaded:
                    rows.append({"name": name, "description": loaded[0].description,
                                 "source": loaded[0].source})
            if "default" not in self._names():
                rows.insert(0, {"name": "default", "description": BUILTIN_DEFAULT.description,
                                "source": "builtin"})
            return rows

        return await asyncio.get_running_loop().run_in_executor(None, collect)

    async def put(self, text: Any, actor: Actor) -> Template:
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("yaml required", "invalid_template")
        template = parse_template(text, "user")

        def store() -> None:
            os.makedirs(self.user_dir, mode=0o700, exist_ok=True)
            write_atomic(self._path(self.user_dir, template.name),
                         text.encode("utf-8", "surrogatepass"), 0o644)

        async with self.audit.action("template.upsert", meta={"template": template.name},
                                     actor=actor):
            try:
                await asyncio.get_running_loop().run_in_executor(None, store)
            except OSError as err:
                log.error("templates: cannot write %s: %s", template.name, err)
                raise Unavailable(f"the template could not be stored: {err.strerror or err}",
                                  "disk_unavailable") from None
        return template

    async def delete(self, name: str, actor: Actor) -> None:
        check_template_name(name)
        path = self._path(self.user_dir, name)
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, os.path.lexists, path):
            if await loop.run_in_executor(None, os.path.exists,
                                          self._path(self.shipped_dir, name)):
                raise Conflict(f"{name} is a shipped template; it cannot be deleted, only "
                               "overridden with PUT", "shipped_template")
            raise NotFound(f"Template not found: {name}")
        async with self.audit.action("template.delete", meta={"template": name}, actor=actor):
            with contextlib.suppress(FileNotFoundError):  # a concurrent delete won
                await loop.run_in_executor(None, os.unlink, path)


###############################################################################
# Network policy (bridge networks and firewall) ###############################
###############################################################################

# Where an "internet" space may not go: private ranges, the tailnet, link-local/cloud
# metadata. The node's own addresses are refused separately (INPUT), the API port included.
BLOCKED_V4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
              "169.254.0.0/16")
BLOCKED_V6 = ("fd7a:115c:a1e0::/48", "fc00::/7", "fe80::/10")
# Docker's embedded DNS forwards a space's queries from inside the space's network namespace,
# so the node's upstream resolvers (often on the LAN, or Tailscale's 100.100.100.100) must stay
# reachable on port 53, and only there.
RESOLV_CONF_FILES = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")
ALLOW_LABEL = label_key("allow")  # a network's allow-list


def upstream_resolvers(configured: frozenset[str]) -> tuple[str, ...]:
    """The DNS servers Docker forwards to: configured ones, else the node's resolv.conf."""
    if configured:
        return tuple(sorted(configured))
    found: set[str] = set()
    for path in RESOLV_CONF_FILES:
        with contextlib.suppress(OSError), open(path, encoding="utf-8") as source:
            for line in source:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    with contextlib.suppress(ValueError):
                        address = ipaddress.ip_address(fields[1].split("%")[0])
                        if not address.is_loopback:
                            found.add(str(address))
    return tuple(sorted(found))


async def run_command(argv: list[str], timeout: float = 10,
                      stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run a host program without a shell; (exit code, stdout, stderr). 127: not found."""
    executable = shutil.which(argv[0])
    if executable is None:
        return 127, "", f"{argv[0]}: not found"
    try:
        process = await asyncio.create_subprocess_exec(
            executable, *argv[1:], stdin=asyncio.subprocess.PIPE if stdin is not None
            else asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except OSError as error:
        return 126, "", str(error)
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        return 124, "", f"{argv[0]}: no answer within {timeout:g} s"
    return (process.returncode if process.returncode is not None else -1,
            out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


class Firewall:
    """Bridge networks for "internet" spaces, and the iptables rules that fence them in.

    Each allow-list (a template's ``network.allowCidrs``, with its ``blockCidrs`` as entries
    marked '!', refused before anything is allowed) gets its own bridge network with
    inter-container traffic off. Rules of ours, matched on that bridge's interface only,
    sit in DOCKER-USER (forwarded traffic: private ranges, tailnet, metadata are refused) and
    in INPUT (anything addressed to the node itself is refused). Other containers on the host
    are untouched. Rules are rebuilt idempotently at start and re-checked by the housekeeper.
    """

    def __init__(self, config: Config, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.lock = asyncio.Lock()
        self.active = False
        self.error: str | None = "not checked yet"
        self.bridges: dict[str, tuple[str, ...]] = {}  # bridge interface -> allowed CIDRs
        self.installed: set[str] = set()  # bridges whose rules this process has put in place

    def network_name(self, allow: tuple[str, ...]) -> str:
        if not allow:
            return f"{self.config.prefix}net"
        digest = hashlib.sha256(",".join(allow).encode()).hexdigest()[:8]
        return f"{self.config.prefix}net-{digest}"

    @staticmethod
    def bridge_name(network: str) -> str:
        return "cs" + hashlib.sha256(network.encode()).hexdigest()[:12]  # <= 15 characters

    @staticmethod
    def chains(bridge: str) -> tuple[str, str]:
        tag = bridge[2:].upper()
        return f"CLAWDSPACE-{tag}-OUT", f"CLAWDSPACE-{tag}-IN"

    def status(self) -> dict[str, Any]:
        return {"enabled": self.config.firewall, "active": self.active, "error": self.error}

    async def network_for(self, mode: str, allow: tuple[str, ...]) -> str:
        """The Docker network mode of a new space; 503 when its fence cannot be guaranteed."""
        if mode == "none":
            return "none"
        name = self.network_name(allow)
        async with self.lock:
            bridge = await self._ensure_network(name, allow)
            if self.config.firewall and bridge not in self.installed:
                await self._install(bridge, allow)
        return name

    async def _ensure_network(self, name: str, allow: tuple[str, ...]) -> str:
        bridge = self.bridge_name(name)
        if await self.engine.inspect_network(name) is None:
            try:
                await self.engine.create_network(
                    name, options={"com.docker.network.bridge.enable_icc": "false",
                                   "com.docker.network.bridge.name": bridge},
                    labels={INSTANCE_LABEL: self.config.prefix, KIND_LABEL: "network",
                            ALLOW_LABEL: ",".join(allow)})
            except EngineError as err:
                if err.status != 409:
                    raise Unavailable(f"network {name} could not be created: {err.message}",
                                      "network_failed") from None
        self.bridges[bridge] = allow
        return bridge

    async def _iptables(self, family: str, *args: str) -> tuple[int, str]:
        code, _, err = await run_command([family, "-w", "5", *args])
        return code, err.strip()

    async def _install(self, bridge: str, allow: tuple[str, ...]) -> None:
        """(Re)build both chains of one bridge and hook them in, once each."""
        out_chain, in_chain = self.chains(bridge)
        resolvers = upstream_resolvers(self.config.dns_servers)
        plans = [("iptables", "DOCKER-USER", BLOCKED_V4, "icmp-admin-prohibited", False),
                 ("ip6tables", "FORWARD", BLOCKED_V6, "icmp6-adm-prohibited", True)]
        for family, hook, blocked, reject, six in plans:
            rules = [["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"]]
            rules += [["-d", server, "-p", proto, "--dport", "53", "-j", "RETURN"]
                      for server in resolvers if (":" in server) == six
                      for proto in ("udp", "tcp")]
            refused = [c[1:] for c in allow if c.startswith("!") and (":" in c) == six]
            rules += [["-d", cidr, "-j", "REJECT", "--reject-with", reject] for cidr in refused]
            rules += [["-d", cidr, "-j", "RETURN"] for cidr in allow
                      if not cidr.startswith("!") and (":" in cidr) == six]
            rules += [["-d", cidr, "-j", "REJECT", "--reject-with", reject] for cidr in blocked]
            rules.append(["-j", "RETURN"])
            input_rules = [
                ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"],
                ["-j", "REJECT", "--reject-with", reject]]
            # One iptables-restore replaces both chains at once: no moment without rules.
            script = ["*filter", f":{out_chain} - [0:0]", f":{in_chain} - [0:0]"]
            script += [" ".join(["-A", out_chain, *rule]) for rule in rules]
            script += [" ".join(["-A", in_chain, *rule]) for rule in input_rules]
            script.append("COMMIT\n")
            code, _, err = await run_command([f"{family}-restore", "-w", "5", "--noflush"],
                                             stdin="\n".join(script).encode())
            for chain, parent in ((out_chain, hook), (in_chain, "INPUT")):
                jump = ["-i", bridge, "-j", chain]
                if code == 0 and (await self._iptables(family, "-C", parent, *jump))[0] != 0:
                    code, err = await self._iptables(family, "-I", parent, "1", *jump)
            if code != 0:
                if family == "ip6tables":
                    log.info("ip6tables unavailable (%s); spaces have no IPv6 here", err.strip())
                    continue
                self.active, self.error = False, f"{family}: {err.strip() or 'failed'}"
                raise Unavailable(
                    f"the egress firewall could not be installed ({self.error}); internet "
                    "spaces are refused until it works (or set CLAWDSPACE_FIREWALL=false)",
                    "firewall_unavailable")
        self.installed.add(bridge)
        self.active, self.error = True, None

    async def remove_network(self, name: str) -> None:
        """Take a network of ours down with its rules (the engine refuses while it is in use)."""
        bridge = self.bridge_name(name)
        out_chain, in_chain = self.chains(bridge)
        for family, hook in (("iptables", "DOCKER-USER"), ("ip6tables", "FORWARD")):
            for parent, chain in ((hook, out_chain), ("INPUT", in_chain)):
                while (await self._iptables(family, "-D", parent, "-i", bridge, "-j",
                                            chain))[0] == 0:
                    pass
                await self._iptables(family, "-F", chain)
                await self._iptables(family, "-X", chain)
        await self.engine.remove_network(name)
        self.bridges.pop(bridge, None)
        self.installed.discard(bridge)

    async def our_networks(self) -> list[dict[str, Any]]:
        return await self.engine.networks([f"{INSTANCE_LABEL}={self.config.prefix}",
                                           f"{KIND_LABEL}=network"])

    async def prune(self, min_age: float = 120.0) -> None:
        """Remove networks of ours that no space uses (and are not brand new)."""
        async with self.lock:
            for network in await self.our_networks():
                with contextlib.suppress(EngineError, ValueError):
                    detail = await self.engine.inspect_network(network["Id"])
                    if detail is None:
                        continue
                    created = dt.datetime.fromisoformat(str(detail.get("Created"))[:19])
                    age = time.time() - created.replace(tzinfo=dt.timezone.utc).timestamp()
                    if not detail.get("Containers") and age > min_age:
                        log.info("removing unused network %s", detail["Name"])
                        await self.remove_network(detail["Name"])

    async def check(self) -> bool:
        """Are our jumps in place for every known bridge? Reinstall when not."""
        if not self.config.firewall:
            self.active, self.error = False, "disabled (CLAWDSPACE_FIREWALL=false)"
            return False
        try:
            await self.prune()
            networks = await self.our_networks()
        except (ClawdError, EngineError) as error:
            self.error = str(error)
            return False
        code, err = await self._iptables("iptables", "-S", "DOCKER-USER")
        if code != 0:
            self.active, self.error = False, f"iptables: {err or 'no DOCKER-USER chain'}"
            return False
        async with self.lock:
            for network in networks:
                name = network["Name"]
                allow_label = (network.get("Labels") or {}).get(ALLOW_LABEL, "")
                allow = tuple(c for c in allow_label.split(",") if c)
                bridge = self.bridge_name(name)
                out_chain, in_chain = self.chains(bridge)
                hooked = all([
                    (await self._iptables("iptables", "-C", "DOCKER-USER", "-i", bridge, "-j",
                                          out_chain))[0] == 0,
                    (await self._iptables("iptables", "-C", "INPUT", "-i", bridge, "-j",
                                          in_chain))[0] == 0])
                if not hooked or bridge not in self.installed:
                    if bridge in self.installed:
                        log.warning("firewall rules of %s missing; reinstalling", name)
                    self.installed.discard(bridge)
                    with contextlib.suppress(ClawdError):
                        await self._install(bridge, allow)
                self.bridges[bridge] = allow
        self.active, self.error = True, None
        return True


###############################################################################
# Git: repository URLs, refs and credentials ##################################
###############################################################################

GIT_REF_RE = re.compile(r"^[A-Za-z0-9._/-]{1,200}$")
GIT_REMOTE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A credential helper that answers only for the one host the token is meant for; the token
# itself comes from this exec's environment, never from argv or a file.
GIT_CREDENTIAL_HELPER = (
    '!f() { test "$1" = get || exit 0; h=; while IFS= read -r l; do '
    'test -z "$l" && break; case "$l" in host=*) h=${l#host=};; esac; done; '
    'test "$h" = "$CLAWDSPACE_GIT_HOST" || exit 0; echo username=x-access-token; '
    'echo "password=$CLAWDSPACE_GIT_TOKEN"; }; f')
# Push from a bare copy made with --no-local, so none of the repository's own hooks or config
# (core.fsmonitor, credential.helper, url.*.insteadOf, http.proxy, include.path) is read by the
# git that holds the token.
GIT_PUSH_SCRIPT = (
    'set -e; tmp=$(mktemp -d /tmp/clawdspace-push.XXXXXX); '
    'trap \'rm -rf "$tmp"\' EXIT; '
    # git honours safe.directory only from a global file, so the copy gets one of its own
    'printf "[safe]\\n\\tdirectory = *\\n" > "$tmp/config"; '
    'GIT_CONFIG_GLOBAL="$tmp/config" git -c core.fsmonitor=false -c core.hooksPath=/dev/null '
    'clone -q --no-local --bare -- "$1" "$tmp/repo"; '
    'cd "$tmp/repo"; shift; git "$@"')
# No configuration of the space's user (~/.gitconfig, XDG, includes) reaches our git.
GIT_CLEAN_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
                 "HOME": "/nonexistent", "XDG_CONFIG_HOME": "/nonexistent",
                 "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "", "SSH_ASKPASS": ""}


@dataclasses.dataclass(frozen=True)
class RepoUrl:
    url: str
    netloc: str
    scheme: str


def check_repo_url(value: Any, config: Config) -> RepoUrl:
    """Only https:// (and http:// to hosts named in CLAWDSPACE_GIT_HTTP_HOSTS)."""
    if not isinstance(value, str) or not value or len(value) > 2048 or value.startswith("-") \
            or any(ord(c) < 33 or c == "\x7f" for c in value):
        raise BadRequest("repoUrl must be an https:// URL without spaces", "invalid_repo_url")
    parts = urllib.parse.urlsplit(value)
    scheme = parts.scheme.lower()
    allowed_http = scheme == "http" and parts.netloc.lower() in config.git_http_hosts
    if scheme != "https" and not allowed_http:
        raise BadRequest("Invalid repoUrl (only https:// URLs are accepted)",
                         "invalid_repo_url")
    if not parts.hostname or parts.username or parts.password:
        raise BadRequest("repoUrl must name a host and carry no credentials (pass the token "
                         "as env.GITHUB_TOKEN)", "invalid_repo_url")
    if not parts.path.strip("/"):
        raise BadRequest("repoUrl must name a repository", "invalid_repo_url")
    return RepoUrl(url=value, netloc=parts.netloc.lower(), scheme=scheme)


def check_ref(value: Any, field: str) -> str:
    if not isinstance(value, str) or not GIT_REF_RE.fullmatch(value) \
            or value.startswith(("-", "/")) or value.endswith(("/", ".lock", ".")) \
            or ".." in value or "//" in value or "@{" in value:
        raise BadRequest(f"Invalid {field}", f"invalid_{field}")
    return value


def check_remote(value: Any) -> str:
    if not isinstance(value, str) or not GIT_REMOTE_RE.fullmatch(value):
        raise BadRequest("Invalid remote (a remote name such as 'origin')", "invalid_remote")
    return value


async def node_github_token(config: Config) -> str | None:
    """The node's own ``gh auth token``, for github.com only."""
    if not config.use_gh_token:
        return None
    code, out, _ = await run_command(["gh", "auth", "token", "-h", "github.com"], timeout=5)
    token = out.strip()
    return token if code == 0 and token else None


def git_auth(repo: RepoUrl, token: str | None, config: Config) -> tuple[list[str], dict[str, str]]:
    """git ``-c`` options and exec environment for one network operation on ``repo``."""
    options = ["-c", "credential.helper=", "-c", "protocol.allow=never",
               "-c", f"protocol.{repo.scheme}.allow=always", "-c", "core.askPass=",
               "-c", "http.followRedirects=false"]
    env = dict(GIT_CLEAN_ENV)
    host = repo.netloc.rsplit("@", 1)[-1]
    if token and (host in config.git_token_hosts or repo.netloc in config.git_token_hosts):
        options += ["-c", f"credential.helper={GIT_CREDENTIAL_HELPER}"]
        env.update({"CLAWDSPACE_GIT_HOST": repo.netloc, "CLAWDSPACE_GIT_TOKEN": token})
    return options, env


###############################################################################
# System and GPUs #############################################################
###############################################################################

class GpuInfo(TypedDict):
    index: int
    uuid: str
    name: str
    memoryMiB: int
    memoryUsedMiB: int | None
    utilizationPercent: int | None


GPU_CACHE_SECONDS = 60.0
GPU_QUERY = "index,uuid,name,memory.total,memory.used,utilization.gpu"
_gpu_cache: dict[str, tuple[float, list[GpuInfo]]] = {}


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Rows of ``nvidia-smi --query-gpu=<GPU_QUERY> --format=csv,noheader,nounits``."""

    def number(value: str) -> int | None:  # "[N/A]" on some boards
        return int(float(value)) if re.fullmatch(r"\d+(\.\d+)?", value) else None

    gpus: list[GpuInfo] = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(", ")]
        if len(parts) < 6 or not parts[0].isdigit():
            continue
        gpus.append({
            "index": int(parts[0]),
            "uuid": parts[1],
            "name": ", ".join(parts[2:-3]),  # a GPU name may itself hold ", "
            "memoryMiB": number(parts[-3]) or 0,
            "memoryUsedMiB": number(parts[-2]),
            "utilizationPercent": number(parts[-1]),
        })
    return gpus


async def gpu_inventory(config: Config, fresh: bool = False) -> list[GpuInfo]:
    """The node's NVIDIA GPUs from nvidia-smi (cached a minute); empty where there is none."""
    cached = _gpu_cache.get(config.nvidia_smi)
    if cached and not fresh and time.monotonic() - cached[0] < GPU_CACHE_SECONDS:
        return cached[1]
    code, out, err = await run_command(
        [config.nvidia_smi, f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"], 10)
    if code not in (0, 127):
        log.warning("nvidia-smi failed (%d): %s", code, err.strip()[:200])
    gpus = parse_nvidia_smi(out) if code == 0 else []
    _gpu_cache[config.nvidia_smi] = (time.monotonic(), gpus)
    return gpus


async def gpu_support(engine: Engine) -> dict[str, bool]:
    """Can this engine hand GPUs to containers (NVIDIA runtime, toolkit hook or CDI)?"""
    try:
        info = await engine.info()
    except (ClawdError, EngineError):
        info = {}
    runtimes = info.get("Runtimes") or {}
    return {
        "nvidiaRuntime": "nvidia" in runtimes,
        "nvidiaToolkit": any(shutil.which(tool) for tool in (
            "nvidia-container-cli", "nvidia-container-runtime-hook", "nvidia-ctk")),
        "cdi": bool(info.get("CDISpecDirs")),
    }


def node_arch() -> str:
    """The architecture in the words clients already parse: x64, arm64, arm (the names
    Node.js uses), else the machine's own."""
    machine = platform.machine().lower()
    return {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "armv7l": "arm"}.get(
        machine, machine)


def format_uptime(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 1440}d {minutes // 60 % 24}h {minutes % 60}m"


async def capabilities(config: Config, engine: Engine) -> dict[str, Any]:
    gpus = await gpu_inventory(config)
    return {
        "gpu": bool(gpus),
        "gpuName": gpus[0]["name"] if gpus else None,
        "gpuMemory": f"{gpus[0]['memoryMiB']} MiB" if gpus else None,
        "gpuCount": len(gpus),
        "gpus": gpus,
        "gpuSupport": await gpu_support(engine) if gpus else None,
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
        asyncio.get_running_loop().run_in_executor(None, host_snapshot),
        capabilities(config, engine))
    docker_info: dict[str, Any] | None
    try:
        info = await asyncio.wait_for(engine.info(), 5)
        docker_info = {
            "version": info.get("ServerVersion"),
            "containers": info.get("Containers", 0),
            "containersRunning": info.get("ContainersRunning", 0),
            "containersPaused": info.get("ContainersPaused", 0),
            "images": info.get("Images", 0),
        }
    except (ClawdError, EngineError, asyncio.TimeoutError):
        docker_info = None
    return {**snapshot, "docker": docker_info, "capabilities": {
        k: caps[k] for k in ("gpu", "gpuName", "gpuMemory", "gpuCount", "gpus", "arch",
                             "platform")}}


###############################################################################
# Activity: last use, work in progress, start times ###########################
###############################################################################

class Activity:
    """When each space was last used, what is running in it now (execs, terminals, file
    calls), and when its container started: what auto-sleep decides on and the view shows.

    Last-use times survive restarts in a small file of the data directory, so a restart
    neither pauses every space at once nor forgets who was idle. The clock is wall-clock
    seconds, replaceable for tests.
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._last: dict[str, float] = {}
        self._busy: dict[str, int] = {}
        self._started: dict[str, str | None] = {}  # container id -> StartedAt
        self._saved: dict[str, float] = {}

    def load(self) -> None:
        saved = read_json_file(self.path)
        for name, when in (saved.items() if isinstance(saved, dict) else ()):
            if isinstance(when, (int, float)) and not isinstance(when, bool):
                self._last.setdefault(str(name), float(when))

    async def save(self) -> None:
        """Write the last-use times when they changed since the last save."""
        current = dict(self._last)
        if current != self._saved:
            await asyncio.get_running_loop().run_in_executor(
                None, write_json_atomic, self.path, current)
            self._saved = current

    def touch(self, name: str) -> None:
        self._last[name] = self.clock()

    def last(self, name: str) -> float | None:
        return self._last.get(name)

    def first_sight(self, name: str) -> bool:
        """Start the idle clock of a space seen for the first time; whether it was new."""
        if name in self._last:
            return False
        self._last[name] = self.clock()
        return True

    def forget(self, name: str) -> None:
        self._last.pop(name, None)

    @contextlib.contextmanager
    def busy(self, name: str) -> Iterator[None]:
        """While inside, the space is in use (auto-sleep leaves it alone)."""
        self._busy[name] = self._busy.get(name, 0) + 1
        self.touch(name)
        try:
            yield
        finally:
            self._busy[name] -= 1
            if not self._busy[name]:
                del self._busy[name]
            self.touch(name)

    def is_busy(self, name: str) -> bool:
        return self._busy.get(name, 0) > 0

    def started(self, container_id: str) -> str | None:
        return self._started.get(container_id)

    def knows_start(self, container_id: str) -> bool:
        return container_id in self._started

    def set_started(self, container_id: str, started: str | None) -> None:
        self._started[container_id] = started

    def forget_container(self, container_id: str) -> None:
        self._started.pop(container_id, None)


###############################################################################
# Spaces ######################################################################
###############################################################################

@dataclasses.dataclass(frozen=True)
class CreateRequest:
    """A validated ``POST /api/spaces`` body, merged with its template."""

    name: str
    memory: int
    cpus: float
    gpu: bool
    image: str
    template: str
    gpus: int = 0  # GPUs to assign; -1: all of the node's
    network: str = "internet"
    fence: tuple[str, ...] = ()  # the template's CIDR rules (Template.fence)
    writable_rootfs: bool = True
    sudo: bool = False
    idle_timeout: int | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    env_file: tuple[str, bytes] | None = dataclasses.field(default=None, repr=False)
    repo: RepoUrl | None = None
    repo_branch: str | None = None
    repo_dest: str = "repo"
    git_token: str | None = dataclasses.field(default=None, repr=False)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)  # extra, e.g. E2B's
    user: str | None = None  # the account the space runs as; None: the image's
    home: str | None = None  # a second mount point of the volume, and the working directory


TOKEN_ENV_KEYS = ("GITHUB_TOKEN", "GH_TOKEN")  # used for the clone, never stored in the space
ENV_FILE_MAX_BYTES = 1 << 20


def parse_env_file(body: dict[str, Any]) -> tuple[str, bytes] | None:
    text, encoded = body.get("envFileText"), body.get("envFileBase64")
    path = body.get("envFilePath")
    if text is None and encoded is None:
        if path is not None:
            raise BadRequest("envFilePath needs envFileText or envFileBase64", "invalid_env_file")
        return None
    if text is not None and encoded is not None:
        raise BadRequest("Provide only one of envFileBase64 or envFileText", "invalid_env_file")
    if text is not None:
        if not isinstance(text, str):
            raise BadRequest("envFileText must be a string", "invalid_env_file")
        content = text.encode("utf-8", "surrogatepass")
    else:
        content = decode_base64(encoded, "envFileBase64", "invalid_env_file")
    if len(content) > ENV_FILE_MAX_BYTES:
        raise BadRequest("the env file is larger than 1 MiB", "invalid_env_file")
    if path is None:
        path = "/.env"
    if not isinstance(path, str):
        raise BadRequest("envFilePath must be under /workspace", "invalid_env_file")
    if path.startswith(WORKSPACE + "/"):
        path = path[len(WORKSPACE):]
    elif path.startswith("/") and path != "/.env":
        raise BadRequest("envFilePath must be under /workspace", "invalid_env_file")
    rel = workspace_rel(path)
    if rel == "/":
        raise BadRequest("envFilePath must name a file under /workspace", "invalid_env_file")
    return rel, content


CREATE_FIELDS = {"name", "template", "gpus", "env", "envFileText", "envFileBase64", "envFilePath",
                 "repoUrl", "repoBranch", "repoDest",
                 *(a.field for a in SPACE_ATTRIBUTES if a.parse is not None)}


def parse_create(body: dict[str, Any], config: Config, template: Template) -> CreateRequest:
    """The request's fields over the template's; posture may be tightened, never loosened."""
    check_fields(body, CREATE_FIELDS)
    if "name" not in body:
        raise BadRequest("name is required", "invalid_name")
    name = check_space_name(body["name"])
    asked = {a.field: a.parse(body[a.field]) for a in SPACE_ATTRIBUTES
             if a.parse is not None and body.get(a.field) not in (None, "")
             and (a.field != "image" or body[a.field])}  # any false image: the default
    given = {a.field: getattr(template, a.template) for a in SPACE_ATTRIBUTES
             if a.template is not None and getattr(template, a.template) is not None}
    values = {**given, **asked}
    host_memory = host_memory_bytes() or 2 << 30
    memory = asked.get("memory") or min(given.get("memory") or 2 << 30, host_memory)
    cpus = asked.get("cpus") or plain_number(min(given.get("cpus") or 1.0,
                                                 float(os.cpu_count() or 1)))
    gpu, gpus = parse_gpus(body, values["gpu"])
    image = values.get("image") or ((config.gpu_image or config.image) if gpu else config.image)
    network, writable = values["network"], values["writableRootfs"]
    for field in ("memory", "cpus", "gpu", "network", "writableRootfs", "sudo"):
        check = ATTRIBUTES_BY_FIELD[field].parse
        if field in body and field not in asked and check is not None:
            check(body[field])  # null or "" is no value of these: the error says why
    if network == "internet" and template.network == "none":
        raise BadRequest(f"template {template.name!r} has no network; a request can tighten "
                         "the network, not loosen it", "network_loosening")
    if writable and not template.writable_rootfs:
        raise BadRequest(f"template {template.name!r} has a read-only root file system; a "
                         "request cannot make it writable", "rootfs_loosening")
    if values["sudo"] and not template.sudo:
        raise BadRequest(f"template {template.name!r} does not allow sudo; a request cannot "
                         "allow it", "sudo_loosening")
    env = check_env(body.get("env", {}))
    token = next((env[k].strip() for k in TOKEN_ENV_KEYS if env.get(k, "").strip()), None)
    env = {k: v for k, v in env.items() if k not in TOKEN_ENV_KEYS}
    repo, branch, dest = parse_repo(body, config, network, template.default_repo_dest)
    return CreateRequest(
        name=name, memory=memory, cpus=cpus, gpu=gpu, gpus=gpus, image=check_image_ref(image),
        template=template.name, network=network, fence=template.fence(),
        writable_rootfs=writable, sudo=values["sudo"], idle_timeout=template.idle_timeout,
        env=env,
        env_file=parse_env_file(body), repo=repo, repo_branch=branch, repo_dest=dest,
        git_token=token)


def parse_gpus(body: dict[str, Any], gpu: bool) -> tuple[bool, int]:
    """(a GPU space?, how many GPUs: -1 for all) from ``gpu`` and ``gpus``."""
    asked = body.get("gpus")
    if asked is None:
        return gpu, 1 if gpu else 0
    if asked != "all" and not (isinstance(asked, int) and not isinstance(asked, bool)
                               and 1 <= asked <= 64):
        raise BadRequest('gpus must be a number of GPUs (1-64) or "all"', "invalid_gpus")
    if body.get("gpu") is False:
        raise BadRequest("gpu: false contradicts gpus", "invalid_gpus")
    return True, -1 if asked == "all" else int(asked)


def parse_repo(body: dict[str, Any], config: Config, network: str,
               default_dest: str) -> tuple[RepoUrl | None, str | None, str]:
    """(repository to clone, branch, destination) of a create."""
    if body.get("repoUrl") is None:
        if body.get("repoBranch") is not None or body.get("repoDest") is not None:
            raise BadRequest("repoBranch and repoDest need repoUrl", "invalid_repo_url")
        return None, None, default_dest
    repo = check_repo_url(body["repoUrl"], config)
    if network == "none":
        raise BadRequest("Repo clone failed: selected template has network disabled",
                         "clone_needs_network")
    branch = check_ref(body["repoBranch"], "repoBranch") if body.get(
        "repoBranch") is not None else None
    dest = check_repo_dest(body["repoDest"]) if body.get("repoDest") is not None \
        else default_dest
    return repo, branch, dest


def space_host_config(config: Config, req: CreateRequest, volume: str, network_mode: str,
                      gpu_ids: list[str]) -> dict[str, Any]:
    """The whole HostConfig of a space, in the engine's own terms, from server-side rules
    only: no request field reaches it unvalidated."""
    host: dict[str, Any] = {
        "Memory": req.memory,
        "MemorySwap": req.memory,  # no swap beyond the memory limit
        "NanoCpus": int(req.cpus * 1e9),
        "CapDrop": ["ALL"],
        # sudo (a template's choice) needs setuid, and AUDIT_WRITE for its audit record;
        # every other space has setuid off.
        "CapAdd": [*SPACE_CAPABILITIES, "AUDIT_WRITE"] if req.sudo else SPACE_CAPABILITIES,
        "SecurityOpt": [] if req.sudo else ["no-new-privileges:true"],
        "PidsLimit": config.pids_limit,
        "Init": True,
        # No core dumps; nofile stays the engine's (raising it fails where dockerd's own hard
        # limit is lower).
        "Ulimits": [{"Name": "core", "Soft": 0, "Hard": 0}],
        "RestartPolicy": {"Name": "unless-stopped"},
        "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}},
        # The home (E2B's /home/user) is the same volume again, first: a fresh volume takes
        # the ownership and files of the image's directory at the first mount point.
        "Mounts": [{"Target": target, "Source": volume, "Type": "volume", "ReadOnly": False}
                   for target in (req.home, WORKSPACE) if target],
        "NetworkMode": network_mode,
        "ReadonlyRootfs": not req.writable_rootfs,
    }
    if gpu_ids:  # pinned by UUID, so a space keeps its GPU across restarts
        host["DeviceRequests"] = [{"Driver": "nvidia", "Count": 0, "DeviceIDs": gpu_ids,
                                   "Capabilities": [["gpu"]], "Options": {}}]
    if not req.writable_rootfs:  # a read-only root still needs scratch space where expected
        host["Tmpfs"] = {path: "rw,nosuid,nodev,size=256m"  # paths inside the space
                         for path in ("/tmp", "/var/tmp", "/run")}  # noqa: S108
    return host


REMOVED_KEPT = 1024


class Spaces:
    """Spaces are containers named ``<prefix><name>`` labelled ``clawdspace.instance=<prefix>``.

    Nothing about a space lives in this process but what can be rebuilt from the engine
    (container ids, start times) and its activity.
    """

    def __init__(self, config: Config, engine: Engine, audit: AuditLog, firewall: Firewall,
                 activity: Activity) -> None:
        self.config = config
        self.engine = engine
        self.audit = audit
        self.firewall = firewall
        self.activity = activity
        # name -> (container id, user): fixed for the life of a container, so an exec can go
        # straight to the engine without an inspect first.
        self.known: dict[str, tuple[str, str]] = {}
        self.gpu_lock = asyncio.Lock()  # GPU choice and container create, one at a time
        # Containers this service removed (the latest REMOVED_KEPT), so a command that ends
        # with its space is known to have been cut off, not to have exited.
        self.removed: dict[str, None] = {}
        self.tasks = Tasks()  # work nobody waits for (learning start times)
        self.reported: set[tuple[str, str]] = set()  # label problems already logged
        # Creates under way, on disk: what a create made before a crash is undone at start.
        self.pending_path = os.path.join(config.data_dir, "pending-creates.json")
        self.pending: dict[str, dict[str, Any]] = {}
        self.pending_lock = asyncio.Lock()

    async def startup(self) -> None:
        await supervise("undoing interrupted creates", self.recover)

    async def shutdown(self) -> None:
        await self.tasks.close()

    # -- names and labels ---------------------------------------------------------------

    def container_name(self, name: str) -> str:
        return f"{self.config.prefix}{name}"

    def volume_name(self, name: str) -> str:
        return f"{self.config.prefix}vol-{name}"

    def owner_labels(self, name: str) -> dict[str, str]:
        return {INSTANCE_LABEL: self.config.prefix, SPACE_LABEL: name}

    def is_ours(self, labels: dict[str, str] | None, name: str) -> bool:
        labels = labels or {}
        return all(labels.get(k) == v for k, v in self.owner_labels(name).items())

    def selector(self) -> list[str]:
        """The labels every space of this instance carries."""
        return [f"{INSTANCE_LABEL}={self.config.prefix}", f"{KIND_LABEL}=space"]

    # -- views ----------------------------------------------------------------------------

    def view(self, container_id: str, labels: dict[str, str], state: str) -> SpaceInfo:
        name = labels.get(SPACE_LABEL, "")
        space, problems = space_view(container_id, labels, state,
                                     self.activity.started(container_id),
                                     self.activity.last(name), self.volume_name(name))
        for problem in problems:
            if (container_id, problem) not in self.reported:
                self.reported.add((container_id, problem))
                log.warning("space %s (container %s): %s", name, container_id[:12], problem)
        return space

    def view_inspected(self, info: dict[str, Any]) -> SpaceInfo:
        state = info.get("State") or {}
        started = state.get("StartedAt") or None
        if started and started.startswith("0001-"):
            started = None
        self.activity.set_started(info["Id"], started)
        status = "paused" if state.get("Paused") else str(state.get("Status", "exited"))
        return self.view(info["Id"], (info.get("Config") or {}).get("Labels") or {}, status)

    # -- lookups --------------------------------------------------------------------------

    async def inspect(self, name: str) -> dict[str, Any]:
        check_space_name(name)
        info = await self.engine.inspect_container(self.container_name(name))
        config = (info or {}).get("Config") or {}
        if info is None or not self.is_ours(config.get("Labels"), name):
            raise NotFound("Space not found")
        self.known[name] = (info["Id"], str(config.get("User") or ""))
        return info

    async def incarnation(self, name: str) -> str | None:
        """The container id of a space of this node (cached), or None."""
        if name not in self.known:
            with contextlib.suppress(NotFound, BadRequest):
                await self.inspect(name)
        known = self.known.get(name)
        return known[0] if known else None

    def is_known(self, name: str) -> bool:
        """Whether this node has seen the space (without asking the engine)."""
        return name in self.known

    async def exec_target(self, name: str, actor: Actor) -> tuple[str, str]:
        """(container id, user) to run a command in: cached for the life of the container,
        else looked up (a paused space is resumed, a stopped one refused)."""
        if name not in self.known:
            await self.running(name, actor)
        return self.known[name]

    def forget(self, name: str) -> None:
        """Drop what is cached of a space's container (it was re-created, or is gone)."""
        self.known.pop(name, None)

    def user_of(self, container_id: str) -> str:
        return next((user for cid, user in self.known.values() if cid == container_id), "")

    async def get(self, name: str) -> SpaceInfo:
        return self.view_inspected(await self.inspect(name))

    async def rows(self, *labels: str) -> list[dict[str, Any]]:
        """The engine's list rows of this instance's spaces (that also carry ``labels``)."""
        return await self.engine.containers([*self.selector(), *labels])

    async def list_all(self) -> list[SpaceInfo]:
        """All spaces of this instance, from a single engine call."""
        rows = await self.rows()
        missing = [row["Id"] for row in rows if not self.activity.knows_start(row["Id"])]
        if missing:
            # Start times are not in the list answer; learn them once, off the request path.
            self.tasks.spawn("start-time learning",
                             functools.partial(self._learn_start_times, missing))
        spaces = [self.view(row["Id"], row.get("Labels") or {}, row.get("State", ""))
                  for row in rows]
        return sorted(spaces, key=lambda s: s["name"])

    async def _learn_start_times(self, container_ids: list[str]) -> None:
        for container_id in container_ids:
            try:
                info = await self.engine.inspect_container(container_id)
            except (ClawdError, EngineError) as err:
                log.info("start time of %s: %s", container_id[:12], err)
                continue
            if info is not None:
                self.view_inspected(info)

    # -- lifecycle ------------------------------------------------------------------------

    async def create(self, req: CreateRequest, actor: Actor,
                     provision: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
                     ) -> SpaceInfo:
        """Create and start a space; ``provision`` (env file, clone) runs before it counts.

        Anything that fails, provisioning included, removes what this call made.
        """
        try:
            image = await self.engine.inspect_image(req.image)
        except EngineError as err:
            raise BadRequest(f"image {req.image!r}: {err.message}", "invalid_image") from None
        if image is None:
            raise BadRequest(f"image {req.image!r} is not present on this node; build or load "
                             "it first", "image_not_found")
        user = req.user or str((image.get("Config") or {}).get("User") or "")
        async with self.gpu_lock if req.gpus else contextlib.nullcontext():
            gpu_ids = await self.assign_gpus(req.gpus) if req.gpus else []
            return await self._create(req, actor, provision, user, gpu_ids)

    async def assign_gpus(self, count: int) -> list[str]:
        """UUIDs of the GPUs for a new space: the ones with the fewest spaces on them."""
        inventory = await gpu_inventory(self.config)
        if not inventory:
            raise NoGpu("this node has no NVIDIA GPU (nvidia-smi found none)")
        if not any((await gpu_support(self.engine)).values()):
            raise Unavailable(
                "Docker on this node cannot pass GPUs to containers: install the NVIDIA "
                "Container Toolkit, run `nvidia-ctk runtime configure --runtime=docker` and "
                "restart Docker", "no_gpu_runtime")
        if count == -1:
            return [gpu["uuid"] for gpu in inventory]
        if count > len(inventory):
            raise Conflict(f"{count} GPUs asked; this node has {len(inventory)}",
                           "not_enough_gpus")
        load: dict[str, int] = {}
        for row in await self.rows():
            for uuid in self.view(row["Id"], row.get("Labels") or {}, "")["gpus"]:
                load[uuid] = load.get(uuid, 0) + 1
        ranked = sorted(inventory, key=lambda gpu: (load.get(gpu["uuid"], 0), gpu["index"]))
        return [gpu["uuid"] for gpu in ranked[:count]]

    async def _create(self, req: CreateRequest, actor: Actor,
                      provision: Callable[[dict[str, Any]], Awaitable[None]] | None,
                      user: str, gpu_ids: list[str]) -> SpaceInfo:
        async with self.audit.action("space.create", req.name, {
                "memory": req.memory, "cpus": req.cpus, "gpu": req.gpu, "image": req.image,
                "template": req.template, "network": req.network,
                "writableRootfs": req.writable_rootfs, "sudo": req.sudo,
                "envKeys": sorted(req.env),
                "repoUrl": req.repo.url if req.repo else None,
                "repoDest": req.repo_dest if req.repo else None}, actor):
            return await self._make(req, actor, provision, user, gpu_ids)

    async def _note_pending(self, key: str, entry: dict[str, Any] | None) -> None:
        """Record (or, with None, forget) a create under way, durably, before going on."""
        async with self.pending_lock:
            if entry is None:
                self.pending.pop(key, None)
            else:
                self.pending[key] = entry
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, write_json_atomic, self.pending_path, dict(self.pending))
            except OSError as err:
                log.error("cannot write %s: %s", self.pending_path, err)
                raise Unavailable(f"the data directory cannot be written: {err.strerror or err}",
                                  "disk_unavailable") from None

    async def recover(self) -> None:
        """At start: undo every create a crash interrupted (its container, and its volume if
        that create made it), so the client's retry finds the name free."""
        saved = await asyncio.get_running_loop().run_in_executor(
            None, read_json_file, self.pending_path)
        for key, entry in (saved.items() if isinstance(saved, dict) else ()):
            name = str(key).partition("/")[0]
            if not isinstance(entry, dict) or not SPACE_NAME_RE.fullmatch(name):
                continue
            info = await self.engine.inspect_container(self.container_name(name))
            if info is not None and self.is_ours((info.get("Config") or {}).get("Labels"),
                                                 name):
                await self.engine.remove_container(info["Id"])
            if entry.get("volumeCreated") and await self._volume_is_ours(name):
                await self._remove_volume(self.volume_name(name))
            log.warning("undid the create of %s that a restart interrupted", name)
            await self.audit.record("space.create.undone", name,
                                    {"reason": "the service stopped during the create"})
        await self._note_pending("", None)

    async def _make(self, req: CreateRequest, actor: Actor,
                    provision: Callable[[dict[str, Any]], Awaitable[None]] | None,
                    user: str, gpu_ids: list[str]) -> SpaceInfo:
        network_mode = await self.firewall.network_for(req.network, req.fence)
        volume, volume_created = await self._claim_volume(req.name)
        key = f"{req.name}/{os.urandom(4).hex()}"  # two creates of one name are two entries
        try:
            await self._note_pending(key, {"volumeCreated": volume_created})
            space = await self._make_container(req, actor, provision, user, gpu_ids,
                                               network_mode, volume, volume_created)
        except BaseException:
            with contextlib.suppress(Unavailable):
                await self._note_pending(key, None)
            if volume_created and key not in self.pending:
                await self._undo_create(None, volume)  # the journal could not be written
            raise
        try:
            await self._note_pending(key, None)
        except Unavailable:
            # The journal still says "under way": undo now, rather than leave a space that the
            # next start would remove after the client was told it exists.
            self.known.pop(req.name, None)
            await self._undo_create(space["id"], volume if volume_created else None)
            raise
        return space

    async def _make_container(self, req: CreateRequest, actor: Actor,
                              provision: Callable[[dict[str, Any]], Awaitable[None]] | None,
                              user: str, gpu_ids: list[str], network_mode: str, volume: str,
                              volume_created: bool) -> SpaceInfo:
        labels = {
            **self.owner_labels(req.name),
            KIND_LABEL: "space",
            VOLUME_LABEL: volume,
            **encode_labels({
                "image": req.image, "memory": req.memory, "cpus": req.cpus,
                "gpu": bool(gpu_ids), "gpus": gpu_ids, "network": req.network,
                "writableRootfs": req.writable_rootfs, "sudo": req.sudo,
                "idleTimeout": req.idle_timeout,
                "template": req.template, "user": user, "created": now_iso(),
                "createdBy": actor.key_id}),
            **req.labels,
        }
        container_id: str | None = None
        try:
            container_id = await self.engine.create_container(
                req.image, name=self.container_name(req.name),
                hostname=space_hostname(req.name), user=user,
                labels=labels, environment=req.env,
                host_config=space_host_config(self.config, req, volume, network_mode, gpu_ids),
                working_dir=req.home or WORKSPACE)
            await self.engine.start(container_id)
            info = await self.engine.inspect_container(container_id)
            if info is None:
                raise Conflict("the space's container vanished while it was being created",
                               "create_failed")
            if provision is not None:
                self.known[req.name] = (info["Id"], user)
                await provision(info)
        except BaseException as err:
            self.known.pop(req.name, None)
            await self._undo_create(container_id, volume if volume_created else None)
            if isinstance(err, EngineError):
                if err.status == 409 and container_id is None:
                    raise Conflict("Space already exists", "space_exists") from None
                if "unable to find user" in err.message:
                    raise BadRequest(f"image {req.image!r} has no account {user!r}; add it to "
                                     f"the image (useradd -m {user})", "invalid_image") from None
                if gpu_ids and "device driver" in err.message:
                    raise Unavailable(f"Docker could not attach the GPU: {err.message}; "
                                      "install and configure the NVIDIA Container Toolkit",
                                      "no_gpu_runtime") from None
                raise BadRequest(f"the space could not be created: {err.message}",
                                 "create_failed") from None
            raise
        self.activity.touch(req.name)
        return self.view_inspected(info)

    async def _claim_volume(self, name: str) -> tuple[str, bool]:
        """The space's volume: reused when it is ours (kept data), created otherwise."""
        volume = self.volume_name(name)
        existing = await self.engine.inspect_volume(volume)
        if existing is not None:
            if not self.is_ours(existing.get("Labels"), name):
                raise Conflict(f"volume {volume} exists and is not a clawdspace volume of this "
                               "node; remove or rename it first", "volume_conflict")
            return volume, False
        await self.engine.create_volume(volume, {**self.owner_labels(name),
                                                 KIND_LABEL: "space-volume"})
        return volume, True

    async def _undo_create(self, container_id: str | None, volume: str | None) -> None:
        """Remove what a failed create made; what it did not make is left alone, and what
        cannot be removed is logged (the create journal's sweep at start tries again)."""
        for what, remove in (("container", container_id and functools.partial(
                self.engine.remove_container, container_id)),
                ("volume", volume and functools.partial(self.engine.remove_volume, volume))):
            if not remove:
                continue
            try:
                await remove()
            except (ClawdError, EngineError) as err:
                log.error("a failed create left its %s %s: %s", what,
                          container_id if what == "container" else volume, err)

    async def destroy(self, name: str, remove_volume: bool, actor: Actor) -> None:
        volume = self.volume_name(name)
        try:
            info: dict[str, Any] | None = await self.inspect(name)
        except NotFound:
            if not remove_volume or not await self._volume_is_ours(name):
                raise
            info = None
        async with self.audit.action("space.destroy", name, {"removeVolume": remove_volume},
                                     actor):
            if info is not None:
                self.removed[info["Id"]] = None
                while len(self.removed) > REMOVED_KEPT:
                    self.removed.pop(next(iter(self.removed)))
                try:
                    await self.engine.remove_container(info["Id"])
                except EngineError as err:
                    if err.status != 409:  # 409: removal already in progress
                        raise
                self.activity.forget_container(info["Id"])
            self.known.pop(name, None)
            if remove_volume:
                await self._remove_volume(volume)
            self.activity.forget(name)

    async def _volume_is_ours(self, name: str) -> bool:
        existing = await self.engine.inspect_volume(self.volume_name(name))
        return existing is not None and self.is_ours(existing.get("Labels"), name)

    async def _remove_volume(self, volume: str) -> None:
        for attempt in range(10):
            try:
                await self.engine.remove_volume(volume)
                return
            except EngineError as err:
                # A just-removed container can hold the volume for a moment.
                if err.status != 409 or attempt == 9:
                    raise Conflict(f"volume {volume} could not be removed: {err.message}",
                                   "volume_in_use") from None
                await asyncio.sleep(0.2)

    async def pause(self, name: str, actor: Actor, reason: str | None = None) -> None:
        info = await self.inspect(name)
        state = info["State"]
        if state.get("Paused"):
            return
        if not state.get("Running"):
            raise Conflict("Space is stopped; start it first", "space_stopped")
        async with self.audit.action("space.pause", name,
                                     {"reason": reason} if reason else None, actor):
            try:
                await self.engine.pause(info["Id"])
            except EngineError as err:
                raise Conflict(f"Space could not be paused: {err.message}") from None

    async def start(self, name: str, actor: Actor, reason: str | None = None) -> None:
        info = await self.inspect(name)
        await self._bring_up(name, info, actor, reason)

    async def _bring_up(self, name: str, info: dict[str, Any], actor: Actor,
                        reason: str | None) -> dict[str, Any]:
        """Unpause a paused space, start a stopped one; returns fresh inspect data."""
        state = info["State"]
        if state.get("Running") and not state.get("Paused"):
            return info
        async with self.audit.action("space.start", name,
                                     {"reason": reason} if reason else None, actor):
            try:
                if state.get("Paused"):
                    await self.engine.unpause(info["Id"])
                else:
                    await self.engine.start(info["Id"])
            except EngineError as err:
                raise Conflict(f"Space could not be started: {err.message}",
                               "start_failed") from None
        self.activity.touch(name)
        if state.get("Paused"):  # unpausing changes nothing else the caller reads
            return {**info, "State": {**state, "Paused": False, "Status": "running"}}
        fresh = await self.inspect(name)
        self.view_inspected(fresh)
        return fresh

    async def running(self, name: str, actor: Actor) -> dict[str, Any]:
        """Inspect data of a space ready for work: a paused space is resumed first."""
        info = await self.inspect(name)
        if info["State"].get("Paused"):
            info = await self._bring_up(name, info, actor, "auto")
        elif not info["State"].get("Running"):
            raise Conflict("Space is stopped; start it with POST /api/spaces/"
                           f"{name}/start", "space_stopped")
        return info




###############################################################################
# Exec: commands in a space ###################################################
###############################################################################

@dataclasses.dataclass(frozen=True)
class ExecRequest:
    """A command to run in a space, built by ``exec_request`` (one set of rules for every
    client: the API, the terminal, E2B's daemon protocol)."""

    argv: list[str]
    env: dict[str, str]
    workdir: str
    timeout: float  # seconds; 0: none (terminals)
    # The tree the working directory must really be in, checked by the space's user after
    # entering it ("" for anywhere but /proc, /sys and /dev, as E2B's daemon allows).
    root: str = WORKSPACE
    tty: bool = False  # a terminal: stdin open, output as one stream
    source: str = "api"  # who asked, for the audit record: api, terminal, e2b
    stdin: bool = False  # stdin stays open for the client's writes
    pty: tuple[int, int] | None = None  # (rows, cols) of a command's pseudo-terminal


def exec_request(config: Config, argv: Any, env: Any, workdir: Any = WORKSPACE,
                 timeout: Any = None, root: str = WORKSPACE, tty: bool = False,
                 source: str = "api", unlimited: bool = False) -> ExecRequest:
    """The rules of a client's command, whoever asks: argv a list of strings without NUL,
    a valid environment, a working directory normalised (inside ``root``, where there is
    one) and a timeout within CLAWDSPACE_EXEC_MAX_TIMEOUT (none for a terminal; 0 for none
    where ``unlimited``: a command whose output streams)."""
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise BadRequest("command required: a string (run by sh -c) or a list of strings",
                         "invalid_command")
    if not argv[0]:
        raise BadRequest("command[0] must name a program", "invalid_command")
    if any("\x00" in arg for arg in argv):
        raise BadRequest("command must not contain NUL bytes", "invalid_command")
    if tty and source == "terminal":
        limit = 0.0
    else:
        limit = timeout
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit != limit:
            raise BadRequest("timeout must be a number of seconds", "invalid_timeout")
        if not (0 < limit <= config.exec_max_timeout or (unlimited and limit == 0)):
            raise BadRequest(f"timeout must be between 0 and {config.exec_max_timeout} "
                             f"seconds{' (0: none)' if unlimited else ''}", "invalid_timeout")
    if root:
        where = check_workdir(workdir)
    elif isinstance(workdir, str) and workdir.startswith("/") and "\x00" not in workdir:
        where = "/" + os.path.normpath(workdir).lstrip("/")
    else:
        raise BadRequest("cwd must be an absolute path outside /proc, /sys and /dev",
                         "invalid_argument")
    return ExecRequest(argv=list(argv), env=check_env(env),
                       workdir=where, timeout=float(limit), root=root, tty=tty, source=source)


def parse_exec(body: dict[str, Any], config: Config) -> tuple[ExecRequest, str]:
    """A ``POST /api/spaces/:name/exec`` body: the command, and how it is answered: ``wait``
    (the result when it ends), ``stream`` (events as output arrives) or ``background`` (the
    process at once)."""
    check_fields(body, {"command", "env", "workdir", "timeout", "stream", "background",
                        "stdin", "pty"})
    stream = check_bool("stream", body.get("stream", False))
    background = check_bool("background", body.get("background", False))
    stdin = check_bool("stdin", body.get("stdin", False))
    if stdin and not (stream or background):
        raise BadRequest("stdin needs stream or background (a command that waits for its "
                         "end cannot be written to)", "invalid_stdin")
    pty = None if body.get("pty") is None else check_pty(body["pty"])
    if pty and not (stream or background):
        raise BadRequest("pty needs stream or background", "invalid_pty")
    command = body.get("command")
    if isinstance(command, str):
        if not command.strip():
            raise BadRequest("command required", "invalid_command")
        command = ["sh", "-c", command]
    req = exec_request(config, command, body.get("env", {}), body.get("workdir", WORKSPACE),
                       body.get("timeout", config.exec_timeout),
                       unlimited=stream or background)
    mode = "background" if background else "stream" if stream else "wait"
    if pty:
        env = {"TERM": "xterm-256color", **req.env}
        return dataclasses.replace(req, stdin=True, tty=True, pty=pty, env=env), mode
    return dataclasses.replace(req, stdin=stdin), mode


def check_pty(value: Any) -> tuple[int, int]:
    """A pseudo-terminal size: ``{"cols": 1-500, "rows": 1-200}`` as (rows, cols)."""
    if not isinstance(value, dict) or set(value) - {"cols", "rows"} or not all(
            isinstance(value.get(k), int) and not isinstance(value.get(k), bool)
            for k in ("cols", "rows")) or not (1 <= value["cols"] <= 500
                                              and 1 <= value["rows"] <= 200):
        raise BadRequest('pty must be {"cols": 1-500, "rows": 1-200}', "invalid_pty")
    return value["rows"], value["cols"]


def command_of(argv: list[str]) -> Any:
    """A command as the audit log and listings show it: ``sh -c`` text, else the argv."""
    return argv[2] if argv[:2] == ["sh", "-c"] and len(argv) > 2 else argv


def exec_event(req: ExecRequest, process: str,
               background: bool = False) -> tuple[str, dict[str, Any]]:
    """The one audit record of a client's command: ``space.exec`` (``process.start`` for one
    that runs on its own; with ``source`` when it is not the API's own), or
    ``terminal.open`` for a terminal's shell; with the id of the process it becomes."""
    if req.source == "terminal":
        return "terminal.open", {"shell": req.argv[0]}
    meta: dict[str, Any] = {"process": process, "command": command_of(req.argv),
        "envKeys": sorted(req.env), "workdir": req.workdir, "timeout": req.timeout}
    if req.source != "api":
        meta["source"] = req.source
    return "process.start" if background else "space.exec", meta


# Every command a client runs starts through this script, as the command's own user:
# - the working directory is entered and checked where it really is before the command runs,
#   in the same process, so a space that swaps a directory for a link cannot send a command
#   elsewhere (the docker-level WorkingDir is only ever "/");
# - the command runs under coreutils' timeout (where the image has it), so its time limit
#   holds even when the service is killed or restarted while it runs. It fires a little after
#   the service's own timer, which normally ends the command first. A terminal has no limit;
#   a command on a pseudo-terminal stays in its foreground (--foreground: the service's timer
#   then ends its children), sized before it starts (CLAWDSPACE_TTY_SIZE, then unset);
# - a background command's output goes to files of its own in the space (``spool``), so that
#   it outlives the service's connection: the service follows them (SPOOL_READ_SCRIPT) and
#   can pick them up again after a restart. The engine's stderr stays open on fd 7, so the
#   exec's connection still ends when the command's process tree does.
WORKDIR_MARK = "clawdspace-workdir:"
WORKDIR_FAILED = 125
TIMEOUT_GRACE = 2
COMMAND_SCRIPT = r"""
cd -P -- "$1" 2>/dev/null || { echo "clawdspace-workdir: missing $1" >&2; exit 125; }
if [ "$1" != "$2" ]; then
    here=$(pwd -P)
    case $here in
        /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) here= ;;
        "$2"|"$2"/*) ;;
        *) here= ;;
    esac
    [ -n "$here" ] || { echo "clawdspace-workdir: outside $1" >&2; exit 125; }
fi
limit=$3
spool=$4
shift 4
if [ -n "$spool" ]; then
    (umask 077 && mkdir -p -- "$spool" && : >>"$spool/1" && : >>"$spool/2" &&
        echo $$ >"$spool/pid") 2>/dev/null || {
        echo "clawdspace-spool: cannot write $spool (is /tmp writable?)" >&2; exit 125; }
    exec 7>&2 >>"$spool/1" 2>>"$spool/2"
fi
if [ -n "${CLAWDSPACE_TTY_SIZE:-}" ]; then
    stty $CLAWDSPACE_TTY_SIZE 2>/dev/null
    unset CLAWDSPACE_TTY_SIZE
fi
if [ "$limit" != 0 ] && command -v timeout >/dev/null 2>&1; then
    [ -t 0 ] && exec timeout --foreground -s KILL "$limit" "$@"
    exec timeout -s KILL "$limit" "$@"
fi
exec "$@"
"""


def confined(req: ExecRequest, spool: str = "") -> ExecRequest:
    """``req`` as run through COMMAND_SCRIPT (its output to ``spool``, a directory in the
    space, where there is one)."""
    limit = str(math.ceil(req.timeout) + TIMEOUT_GRACE) if req.timeout else "0"
    return dataclasses.replace(req, workdir="/", argv=[
        "sh", "-c", COMMAND_SCRIPT, "sh", req.workdir, req.root, limit, spool, *req.argv])


# A background command's output files in its space, read as the space's user from byte
# offsets of the service's (1-based for tail): with "follow", as they grow (ending by
# themselves once the command's pid is gone, where tail knows --pid; the pid is the service's,
# else the one COMMAND_SCRIPT wrote); without, what is left. Which file a byte came from is
# which stream it is sent on; tail's own complaints go nowhere.
SPOOL_IN_SPACE = "/tmp/.clawdspace-processes"  # noqa: S108 - inside the space
SPOOL_READ_SCRIPT = r"""
(umask 077 && mkdir -p -- "$1" && : >>"$1/1" && : >>"$1/2") 2>/dev/null || exit 125
how=
if [ "$4" = follow ]; then
    how=-f
    pid=${5:-$(head -c 16 -- "$1/pid" 2>/dev/null)}
    case $pid in ''|*[!0-9]*) pid= ;; esac
    if [ -n "$pid" ] && tail --pid="$pid" -c 0 -- /dev/null 2>/dev/null; then
        how="-f --pid=$pid"
    fi
    tail -c "+$2" $how -- "$1/1" 2>/dev/null &
    exec tail -c "+$3" $how -- "$1/2" 3>&2 2>/dev/null >&3
fi
tail -c "+$2" -- "$1/1" 2>/dev/null; tail -c "+$3" -- "$1/2" 3>&2 2>/dev/null >&3
"""
SPOOL_SIZES_SCRIPT = r"""
for f in 1 2; do if [ -f "$1/$f" ]; then wc -c < "$1/$f"; else echo 0; fi; done
"""
# Bytes of a spool file already read are given back to the space's disk (a hole punched
# behind the reader) once this much more than the retained ring has been read.
SPOOL_PUNCH_STEP = 4 << 20
SPOOL_FINAL_READ = 30.0  # seconds for what is left of a command's files, once it has ended


def workdir_refusal(req: ExecRequest, result: ExecResult) -> BadRequest | None:
    """The error for an exec whose working directory could not be entered."""
    if result["exitCode"] != WORKDIR_FAILED or not result["stderr"].startswith(WORKDIR_MARK):
        return None
    if result["stderr"][len(WORKDIR_MARK):].startswith(" missing"):
        return BadRequest(f"workdir {req.workdir} does not exist or is not a directory the "
                          "space's user may enter", "invalid_workdir")
    return BadRequest(f"workdir {req.workdir} leads outside "
                      f"{req.root or 'the allowed directories'}", "invalid_workdir")


PROCESS_STATUSES = ("running", "paused", "exited", "killed", "timed-out")
PROCESS_SIGNALS = ("TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT")
PROCESSES_KEPT = 64  # finished processes listed per space, at most
STREAM_QUIET = 5.0  # seconds of quiet before a stream says it is alive
KILL_GRACE = 5.0  # seconds a kill waits to see its process end, before answering


@dataclasses.dataclass
class Process:
    """A client's command while it runs, and for a while after: what /processes shows."""

    id: str
    space: str
    container_id: str
    exec_id: str
    argv: list[str]
    cwd: str
    user: str
    env_keys: list[str]
    source: str
    started_at: float
    pty: dict[str, int] | None = None
    status: str = "running"
    exit_code: int | None = None
    signal: str | None = None  # the last signal a client sent it
    ended_at: float | None = None
    pid: int | None = None  # inside the space
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    timeout: float = 0.0  # seconds from started_at; 0: none
    tag: str | None = None  # a client's name for it (E2B's process tag)
    spooled: bool = False  # its output goes to files in the space (a background command)
    spool: OutputSpool | None = None  # its output, for readers that come later
    stdin: ExecSocket | None = None  # while the client may still write to it
    result: dict[str, Any] | None = None  # how it ended, as the exit event says
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # set once ended
    gone: bool = False  # its command has ended (its last output may still be coming in)

    def record(self) -> dict[str, Any]:
        """What the data directory keeps of it, so a restarted service takes it up again."""
        return {"id": self.id, "space": self.space, "containerId": self.container_id,
                "execId": self.exec_id, "argv": self.argv, "cwd": self.cwd, "user": self.user,
                "envKeys": self.env_keys, "source": self.source, "startedAt": self.started_at,
                "timeout": self.timeout, "pty": self.pty, "tag": self.tag,
                "spooled": self.spooled, "pid": self.pid,
                "ended": None if self.ended_at is None else {
                    "status": self.status, "exitCode": self.exit_code, "signal": self.signal,
                    "endedAt": self.ended_at, "stdoutBytes": self.stdout_bytes,
                    "stderrBytes": self.stderr_bytes, "result": self.result,
                    "output": None if self.spool is None else self.spool.state()}}

    @classmethod
    def from_record(cls, record: Any) -> Process | None:
        """A process back from its record (None for one that is not a valid record)."""
        def text(value: Any) -> bool:
            return isinstance(value, str) and 0 < len(value) <= 4096

        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not isinstance(record, dict) or not all(text(record.get(k)) for k in (
                "id", "space", "containerId", "execId", "cwd", "source")) or not all(
                number(record.get(k)) for k in ("startedAt", "timeout")) or not isinstance(
                record.get("user"), str) or not isinstance(record.get("argv"), list) or not all(
                isinstance(a, str) for a in record["argv"]) or not isinstance(
                record.get("envKeys"), list) or not re.fullmatch(r"p-[0-9a-f]{12}",
                                                                  record["id"]):
            return None
        pty = record.get("pty")
        if pty is not None and not (isinstance(pty, dict) and all(
                isinstance(pty.get(k), int) for k in ("cols", "rows"))):
            return None
        process = cls(record["id"], record["space"], record["containerId"], record["execId"],
                      record["argv"], record["cwd"], record["user"],
                      [str(k) for k in record["envKeys"]], record["source"],
                      float(record["startedAt"]), timeout=float(record["timeout"]),
                      pty={"cols": pty["cols"], "rows": pty["rows"]} if pty else None,
                      tag=record["tag"] if isinstance(record.get("tag"), str) else None,
                      spooled=record.get("spooled") is True,
                      pid=record["pid"] if isinstance(record.get("pid"), int) else None)
        ended = record.get("ended")
        if isinstance(ended, dict):
            process.status = ended["status"] if ended.get("status") in PROCESS_STATUSES \
                else "exited"
            code = ended.get("exitCode")
            process.exit_code = code if isinstance(code, int) else None
            process.signal = ended["signal"] if ended.get("signal") in PROCESS_SIGNALS \
                else None
            process.ended_at = float(ended["endedAt"]) if number(ended.get("endedAt")) \
                else process.started_at
            process.stdout_bytes = int(ended.get("stdoutBytes") or 0)
            process.stderr_bytes = int(ended.get("stderrBytes") or 0)
            process.result = ended["result"] if isinstance(ended.get("result"), dict) else None
            process.done.set()
        return process

    def view(self, paused: bool = False) -> dict[str, Any]:
        return {
            "id": self.id, "pid": self.pid, "argv": self.argv,
            "command": command if isinstance(command := command_of(self.argv), str)
            else shlex.join(command),
            "cwd": self.cwd, "user": self.user, "envKeys": self.env_keys, "pty": self.pty,
            "source": self.source,
            "status": "paused" if paused and self.status == "running" else self.status,
            "exitCode": self.exit_code, "signal": self.signal,
            "startedAt": epoch_to_iso(self.started_at),
            "endedAt": epoch_to_iso(self.ended_at) if self.ended_at else None,
            "stdoutBytes": self.stdout_bytes, "stderrBytes": self.stderr_bytes,
            "stdin": self.stdin is not None, "result": self.result,
            "output": None if self.spool is None else {
                "oldest": self.spool.oldest(), "next": self.spool.end},
        }


class OutputSpool:
    """A process's output for readers that come later: a ring file of ``capacity`` bytes in
    the data directory (so a hundred chatty processes cost disk, not memory), offsets counting
    every byte the process printed, and which stream each range came from. Readers wait on
    ``changed``; what the ring no longer holds is reported as the oldest offset."""

    def __init__(self, path: str, capacity: int, base: int = 0,
                 kept: dict[str, Any] | None = None) -> None:
        """A new ring whose first byte is at offset ``base``, or, with ``kept`` (a
        ``state()`` of before), the ring that file already holds."""
        self.path = path
        self.capacity = capacity
        self.base = base  # where its offsets begin (after a restart, not 0)
        self.end = base
        self.ranges: collections.deque[list[int]] = collections.deque()  # [start, end, stream]
        self.ended = False
        self.changed = asyncio.Condition()
        self.appending = asyncio.Lock()  # writers in turn: offsets follow the file
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        self.fd: int | None = os.open(path, flags | (0 if kept else os.O_TRUNC), 0o600)
        if kept:
            self.base, self.end, self.ended = int(kept["base"]), int(kept["end"]), True
            self.ranges.extend([int(a), int(b), int(c)] for a, b, c in kept["ranges"])

    @staticmethod
    def valid_state(kept: Any, capacity: int) -> bool:
        """Whether ``kept`` is a ``state()`` this ring's file can be read back with."""
        try:
            ranges = [(int(a), int(b), int(c)) for a, b, c in kept["ranges"]]
            base, end = int(kept["base"]), int(kept["end"])
        except (TypeError, ValueError, KeyError):
            return False
        return kept.get("capacity") == capacity and 0 <= base <= end and all(
            base <= a < b <= end and c in (1, 2) for a, b, c in ranges)

    def rebase(self, base: int) -> None:
        """Start offsets at ``base`` (only while nothing is in it)."""
        if self.end == self.base:
            self.base = self.end = base

    def state(self) -> dict[str, Any]:
        return {"base": self.base, "end": self.end, "capacity": self.capacity,
                "ranges": [list(r) for r in self.ranges]}

    def oldest(self) -> int:
        return max(self.base, self.end - self.capacity)

    def _write(self, data: bytes) -> None:
        """Write at the ring position of ``self.end`` (blocking, small)."""
        if self.fd is None:
            return
        view = memoryview(data)[-self.capacity:]
        position = (self.end + len(data) - len(view)) % self.capacity
        while view:
            room = self.capacity - position
            os.pwrite(self.fd, view[:room], position)
            view, position = view[room:], 0

    async def append(self, stream: int, data: bytes) -> None:
        async with self.appending:
            await asyncio.get_running_loop().run_in_executor(None, self._write, data)
            if self.ranges and self.ranges[-1][2] == stream and self.ranges[-1][1] == self.end:
                self.ranges[-1][1] += len(data)
            else:
                self.ranges.append([self.end, self.end + len(data), stream])
            self.end += len(data)
            while self.ranges and (self.ranges[0][1] <= self.oldest()
                                   or len(self.ranges) > 4096):
                self.ranges.popleft()
        async with self.changed:
            self.changed.notify_all()

    async def finish(self) -> None:
        self.ended = True
        async with self.changed:
            self.changed.notify_all()

    def _read(self, offset: int, size: int) -> bytes:
        if self.fd is None:
            return b""
        parts, position, left = [], offset % self.capacity, size
        while left > 0:
            piece = os.pread(self.fd, min(left, self.capacity - position), position)
            if not piece:
                break
            parts.append(piece)
            left -= len(piece)
            position = 0
        return b"".join(parts)

    async def read(self, offset: int, limit: int = 65536) -> list[tuple[int, int, bytes]]:
        """(offset, stream, bytes) pieces from ``offset`` (at least the oldest kept)."""
        pieces: list[tuple[int, int, bytes]] = []
        for start, end, stream in list(self.ranges):
            if end <= offset or limit <= 0:
                continue
            begin = max(start, offset, self.oldest())
            size = min(end - begin, limit)
            if size <= 0:
                continue
            data = await asyncio.get_running_loop().run_in_executor(
                None, self._read, begin, size)
            if begin < self.oldest() or not data:  # overwritten while read (the reader
                break  # retries), or the file is gone: nothing to show for it
            pieces.append((begin, stream, data))
            if len(data) < size:
                break  # the file is shorter than its ranges say (lost): what there is
            limit -= size
            offset = begin + size
        return pieces

    def remove(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@dataclasses.dataclass
class RunningExec:
    """A started client command: the exec, its hijacked connection, its process."""

    container_id: str
    exec_id: str
    sock: ExecSocket
    process: Process | None = None  # None for the service's own commands


class Execs:
    """Commands in spaces: the one way a client's command starts (``start_exec``; ``exec``
    runs one to its end), and the service's own commands (``run_internal``), with their
    output read on stream threads, their time limits enforced and their ends observed."""

    def __init__(self, config: Config, spaces: Spaces) -> None:
        self.config = config
        self.spaces = spaces
        self.engine = spaces.engine
        self.audit = spaces.audit
        self.activity = spaces.activity
        self.processes: dict[str, Process] = {}  # id -> process, oldest first
        self.tasks = Tasks()  # background processes' output, drained into their spools
        self.spool_dir = os.path.join(config.data_dir, "processes")
        self.closing = False  # the service is shutting down: readers stop

    # -- background processes and their records -------------------------------------------

    def _path(self, process: Process, kind: str) -> str:
        return os.path.join(self.spool_dir, f"{process.id}.{kind}")

    async def startup(self) -> None:
        """The processes of the last run come back from their records: those that ended are
        listed (with the output they kept) until their retention passes; those that still
        ran are followed again (``_take_up``)."""
        capacity = self.config.process_output_bytes
        for process, kept in await asyncio.get_running_loop().run_in_executor(
                None, self._load_records):
            self.processes[process.id] = process
            if process.ended_at is None:
                self.tasks.spawn(f"taking up {process.id}",
                                 functools.partial(self._take_up, process))
            elif OutputSpool.valid_state(kept, capacity):
                with contextlib.suppress(OSError):
                    process.spool = OutputSpool(self._path(process, "out"), capacity, kept=kept)

    def _load_records(self) -> list[tuple[Process, Any]]:
        """(process, its kept output's state) of every valid record, oldest first; invalid
        records and files no record names are removed (blocking)."""
        os.makedirs(self.spool_dir, mode=0o700, exist_ok=True)
        remove_temp_files(self.spool_dir)
        found: list[tuple[Process, Any]] = []
        for entry in os.scandir(self.spool_dir):
            if not entry.name.endswith(".json"):
                continue
            record = read_json_file(entry.path)
            try:
                process = Process.from_record(record)
            except (TypeError, ValueError, OverflowError):
                process = None
            if process is None or entry.name != f"{process.id}.json":
                log.warning("process record %s is not valid; it is removed", entry.name)
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            found.append((process, (record.get("ended") or {}).get("output")))
        known = {process.id for process, _ in found}
        for entry in os.scandir(self.spool_dir):
            if entry.name.partition(".")[0] not in known:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        return sorted(found, key=lambda pair: pair[0].started_at)

    async def _save(self, process: Process) -> None:
        """Write the process's record (before it starts, and once it has ended; not once it
        is forgotten)."""
        if process.ended_at is not None and process.id not in self.processes:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, write_json_atomic, self._path(process, "json"), process.record())
        except OSError as err:
            log.error("cannot record process %s: %s", process.id, err)
            raise Unavailable(f"the process cannot be recorded: {err.strerror or err}",
                              "disk_unavailable") from None

    def _forget(self, process: Process) -> None:
        with contextlib.suppress(OSError):  # the record first: no record names a lost ring
            os.unlink(self._path(process, "json"))
        if process.spool is not None:
            process.spool.remove()

    async def background(self, name: str, req: ExecRequest, actor: Actor,
                         tag: str | None = None) -> Process:
        """Start a command that runs on its own: recorded before it starts, its output kept in
        files in the space (on a pseudo-terminal: read from the terminal) and drained into a
        spool that any number of readers follow (``follow``); its stdin (if asked) takes
        ``write_stdin``. It outlives its clients, and the service's restarts."""
        stream = await self.stream(name, req, actor, background=True, tag=tag)
        process = stream.process
        try:
            process.spool = OutputSpool(self._path(process, "out"),
                                        self.config.process_output_bytes)
        except OSError as err:
            await stream.close()
            raise Unavailable(f"the process spool cannot be written: {err.strerror or err}",
                              "disk_unavailable") from None
        if req.stdin:
            process.stdin = stream.sock
        if req.pty is not None:
            await self.resize(process, *req.pty)
        spool = process.spool
        positions = {1: 0, 2: 0} if process.spooled else None
        self.tasks.spawn(f"output of {process.id}",
                         lambda: self._drain(stream, spool, positions))
        return process

    async def _take_up(self, process: Process) -> None:
        """A process the last run left running: if it still runs, its output files are
        followed again from the last ring's worth of each (what it printed while nobody read
        is kept), its timeout holds and the space stays in use; if it has ended, what it kept
        is read and its end recorded. A process on a pseudo-terminal ended with the last run's
        connection (its terminal): it is recorded as killed."""
        capacity = self.config.process_output_bytes
        try:
            spool = OutputSpool(self._path(process, "out"), capacity)
        except OSError as err:
            log.error("process %s: its spool cannot be written: %s", process.id, err)
            return
        process.spool = spool  # readers may come (and wait) while the space is paused
        sizes = {1: 0, 2: 0}
        if process.spooled and await self._wait_unpaused(process.container_id):
            with contextlib.suppress(EngineError, ClawdError):
                probe = await self.run_internal({"Id": process.container_id}, ExecRequest(
                    argv=["sh", "-c", SPOOL_SIZES_SCRIPT, "sh", spool_in_space(process)],
                    env={}, workdir="/", timeout=30), 1024, process.user)
                found = [int(n) for n in probe["stdout"].split()
                         if re.fullmatch(r"[0-9]{1,18}", n)]
                if len(found) == 2:
                    sizes = {1: found[0], 2: found[1]}
        try:
            alive = (await self.exec_state(process.exec_id))[0]
        except EngineError:
            alive = False  # gone with its container
        positions = {stream: size - min(size, capacity) for stream, size in sizes.items()}
        process.stdout_bytes, process.stderr_bytes = positions[1], positions[2]
        spool.rebase(sum(positions.values()))
        if not process.spooled and alive:
            with contextlib.suppress(EngineError, ClawdError):
                await self.kill_exec(process.container_id, process.exec_id)
        busy = contextlib.ExitStack()
        busy.enter_context(self.activity.busy(process.space))
        stream = ExecStream(self, process, None, busy, None, lost=not process.spooled)
        log.info("process %s of space %s taken up (%s)", process.id, process.space,
                 "running" if alive else "ended while the service was down")
        await self._drain(stream, spool, positions if process.spooled else None)

    async def _wait_unpaused(self, container_id: str) -> bool:
        """Wait while the container is paused; whether it runs."""
        while True:
            try:
                state = ((await self.engine.inspect_container(container_id)) or {}).get(
                    "State") or {}
            except EngineError:
                return False
            if not state:
                return False
            if not state.get("Paused"):
                return bool(state.get("Running"))
            await asyncio.sleep(2)

    async def resize(self, process: Process, rows: int, cols: int) -> None:
        with contextlib.suppress(EngineError, ClawdError):
            await self.engine.exec_resize(process.exec_id, rows, cols)
        process.pty = {"cols": cols, "rows": rows}

    async def resize_process(self, name: str, process_id: str, body: dict[str, Any]
                             ) -> dict[str, Any]:
        """A running process's new pseudo-terminal size."""
        rows, cols = check_pty(body)
        process = self._process(name, process_id)
        if process.pty is None or process.ended_at is not None:
            raise Conflict(f"process {process_id} has no terminal to resize (or ended)",
                           "no_pty")
        await self.resize(process, rows, cols)
        return process.view()

    async def append_output(self, process: Process, spool: OutputSpool, stream: int,
                            data: bytes) -> None:
        await spool.append(stream, data)
        if stream == 1:
            process.stdout_bytes += len(data)
        else:
            process.stderr_bytes += len(data)

    async def _drain(self, stream: ExecStream, spool: OutputSpool,
                     positions: dict[int, int] | None) -> None:
        """A background command's output into its spool until it ends: what the engine's
        connection carries (all of it on a pseudo-terminal; for a spooled command only what
        COMMAND_SCRIPT itself says) and its files in the space, followed from ``positions``
        and read to their end once it has ended. At the service's shutdown it is left
        running, as its record says, for the next start to take up."""
        process = stream.process
        follower = None if positions is None else SpoolFollower(self, process, spool,
                                                                positions)
        ended = False
        try:
            if follower is not None:
                await self.process_pid(process)  # (the follower ends with it)
                await follower.start()
            async for piece, data in stream.output(STREAM_QUIET):
                if piece in (1, 2):
                    await self.append_output(process, spool, piece, data)
            ended = True
        except asyncio.CancelledError:
            await asyncio.shield(self._abandon(stream, follower))
            raise
        finally:
            if not stream.abandoned:
                process.stdin = None
                try:
                    if follower is not None:
                        await (follower.finish() if ended else follower.stop())
                finally:
                    await stream.close()  # listed as ended from here on, all its output in
                    process.result = stream.result()
                    await spool.finish()
                    await self._save(process)
                if follower is not None:
                    await follower.remove()

    async def _abandon(self, stream: ExecStream, follower: SpoolFollower | None) -> None:
        if follower is not None:
            await follower.stop()
        await stream.abandon()

    def result(self, name: str, process_id: str) -> dict[str, Any] | None:
        """How a process ended (None while it runs), as its exit event says."""
        return self._process(name, process_id).result

    async def follow(self, name: str, process_id: str, offset: int, wait: bool,
                     quiet: float = STREAM_QUIET) -> AsyncIterator[tuple[int, int, bytes] | None]:
        """A process's output from ``offset`` (the oldest kept, if that is gone): (offset,
        stream, bytes) pieces, then, with ``wait``, live output until the process ends; None
        after STREAM_QUIET seconds of quiet."""
        process = self._process(name, process_id)
        spool = process.spool
        if spool is None:
            raise Conflict(f"process {process_id} keeps no output (start it with background "
                           "or stream)", "no_output")
        while not self.closing:
            pieces = await spool.read(max(offset, spool.oldest()))
            for piece in pieces:
                yield piece
                offset = piece[0] + len(piece[2])
            if pieces:
                continue
            if spool.ended or not wait:
                return
            async with spool.changed:
                if spool.end <= offset and not spool.ended and not self.closing:
                    try:
                        await asyncio.wait_for(spool.changed.wait(), quiet)
                    except asyncio.TimeoutError:
                        yield None

    async def write_stdin(self, name: str, process_id: str, data: bytes, eof: bool,
                          actor: Actor | None) -> dict[str, Any]:
        """Type ``data`` into a process's stdin; ``eof`` closes it. Audited per call, except
        for an attached client (``actor`` None: its attach was audited, not each key)."""
        process = self._process(name, process_id)
        sock = process.stdin
        if sock is None:
            raise Conflict(f"process {process_id} takes no input (started without stdin, "
                           "its stdin closed, it ended, or the service restarted since)",
                           "no_stdin")
        async with contextlib.AsyncExitStack() as audited:
            if actor is not None:
                await audited.enter_async_context(self.audit.action("process.stdin", name, {
                    "process": process_id, "bytes": len(data), "eof": eof}, actor))
            try:
                if data:
                    await self.engine.stream(lambda: sock.sendall(data))
            except OSError as err:
                raise Conflict(f"process {process_id} stopped reading: {err}",
                               "no_stdin") from None
            if eof:
                process.stdin = None
                sock.shutdown(socket.SHUT_WR)
        return process.view()

    async def attach(self, name: str, process_id: str, actor: Actor) -> Process:
        """A client attaches to a process (output, and its stdin if open): audited once."""
        process = self._process(name, process_id)
        if process.spool is None:
            raise Conflict(f"process {process_id} keeps no output to attach to (start it "
                           "with background or stream)", "no_output")
        await self.audit.record("process.attach", name, {"process": process_id}, actor)
        return process

    async def stop_following(self) -> None:
        """The service is going: readers of output stop now (they may resume from where they
        were with the next start), rather than hold the shutdown up."""
        self.closing = True
        for process in list(self.processes.values()):
            if process.spool is not None:
                async with process.spool.changed:
                    process.spool.changed.notify_all()

    async def shutdown(self) -> None:
        """The service stops: the commands it follows are followed no more (background ones
        run on, for the next start to take up)."""
        await self.tasks.close()

    async def start_exec(self, name: str, req: ExecRequest, actor: Actor,
                         background: bool = False, tag: str | None = None) -> RunningExec:
        """The one way a client's command starts (an API exec, a terminal, an E2B process):
        on the known container (inspecting only when that fails; a paused space is resumed,
        a stopped one refused), through COMMAND_SCRIPT, audited once between its creation
        and its start, so nothing runs that was not audited. It is listed as a process of the
        space until a while after it ends (``finish``). A ``background`` one is recorded
        before it starts, and its output (off a pseudo-terminal) goes to files in the space."""
        self.sweep()
        if sum(p.space == name and p.ended_at is None for p in self.processes.values()) >= \
                self.config.max_processes:
            raise TooManyProcesses(f"space {name} already runs {self.config.max_processes} "
                                   "processes (CLAWDSPACE_MAX_PROCESSES); end one first")
        process_id = f"p-{os.urandom(6).hex()}"
        event, meta = exec_event(req, process_id, background)
        spool = f"{SPOOL_IN_SPACE}/{process_id}" if background and not req.tty else ""
        confined_req = confined(req, spool)
        for _ in range(3):
            container_id, user = await self.spaces.exec_target(name, actor)
            try:
                env = req.env if req.pty is None else {
                    **req.env, "CLAWDSPACE_TTY_SIZE": f"rows {req.pty[0]} cols {req.pty[1]}"}
                exec_id = await self.engine.exec_create(
                    container_id, confined_req.argv, user, env, "/",
                    stdin=req.tty or req.stdin, tty=req.tty)
            except EngineError as err:
                if err.status == 404:
                    self.spaces.forget(name)  # re-created or gone: look again
                elif "paused" in err.message:
                    await self.spaces.running(name, actor)
                elif "not running" in err.message:
                    raise Conflict(f"Space is stopped; start it with POST /api/spaces/{name}"
                                   "/start", "space_stopped") from None
                else:
                    raise Conflict(f"exec could not start: {err.message}",
                                   "exec_failed") from None
                continue
            process = Process(process_id, name, container_id, exec_id, req.argv, req.workdir,
                              user, sorted(req.env), req.source, self.activity.clock(),
                              timeout=req.timeout, tag=tag, spooled=bool(spool))
            if background:  # before it starts: a crash from here on leaves it findable
                await self._save(process)
            try:
                async with self.audit.action(event, name, meta, actor):
                    try:
                        sock = await self.engine.exec_attach(exec_id, tty=req.tty)
                    except EngineError as err:
                        raise Conflict(f"exec could not start: {err.message}",
                                       "exec_failed") from None
            except BaseException:
                if background:
                    self._forget(process)
                raise
            self.processes[process_id] = process
            return RunningExec(container_id, exec_id, sock, process)
        raise Conflict("exec could not start: the space keeps changing state", "exec_failed")

    # -- processes ------------------------------------------------------------------------

    def finish(self, process: Process | None, exit_code: int | None, timed_out: bool = False,
               counted: dict[int, int] | None = None, stopped: bool = False) -> None:
        """A client's command has ended: how (``stopped``: with its space, or its terminal
        gone), and how much it printed."""
        if process is None or process.ended_at is not None:
            return
        process.done.set()
        process.ended_at = self.activity.clock()
        process.exit_code = exit_code
        process.status = "timed-out" if timed_out else "killed" if stopped or (
            process.signal in ("KILL", "TERM", "INT", "HUP", "QUIT") and exit_code is not None
            and (exit_code > 128 or exit_code < 0)) else "exited"
        if counted:
            process.stdout_bytes, process.stderr_bytes = counted.get(1, 0), counted.get(2, 0)

    def sweep(self) -> None:
        """Forget finished processes past CLAWDSPACE_PROCESS_RETENTION (and beyond the last
        PROCESSES_KEPT of a space)."""
        horizon = self.activity.clock() - self.config.process_retention
        kept: dict[str, int] = {}
        for process in sorted(self.processes.values(), key=lambda p: -(p.ended_at or 0)):
            if process.ended_at is None:
                continue
            kept[process.space] = kept.get(process.space, 0) + 1
            if process.ended_at < horizon or kept[process.space] > PROCESSES_KEPT:
                del self.processes[process.id]
                self._forget(process)

    async def process_pid(self, process: Process) -> int | None:
        """The process's pid inside its space (learnt once, from the engine's host pid)."""
        if process.pid is None and process.ended_at is None:
            with contextlib.suppress(EngineError, ClawdError):
                host_pid = await self._host_pid(process.exec_id)
                if host_pid > 0:
                    process.pid = await asyncio.get_running_loop().run_in_executor(
                        None, container_pid_of, host_pid, process.container_id)
        return process.pid

    async def processes_of(self, name: str) -> list[Process]:
        """The space's processes, running and recently ended, oldest first, pids learnt."""
        self.sweep()
        found = [p for p in self.processes.values() if p.space == name]
        for process in found:
            await self.process_pid(process)
        return found

    async def list_processes(self, name: str) -> list[dict[str, Any]]:
        info = await self.spaces.inspect(name)
        paused = bool((info.get("State") or {}).get("Paused"))
        return [p.view(paused) for p in await self.processes_of(name)]

    async def get_process(self, name: str, process_id: str) -> dict[str, Any]:
        process = self._process(name, process_id)
        info = await self.spaces.inspect(name)
        await self.process_pid(process)
        return process.view(bool((info.get("State") or {}).get("Paused")))

    def _process(self, name: str, process_id: str) -> Process:
        check_space_name(name)
        self.sweep()
        process = self.processes.get(process_id)
        if process is None or process.space != name:
            raise NotFound(f"process {process_id[:40]} not found in space {name}",
                           "process_not_found")
        return process

    async def signal_process(self, name: str, process_id: str, signal_name: Any,
                             actor: Actor) -> dict[str, Any]:
        """Signal a running process's whole group (a command's children too)."""
        if not isinstance(signal_name, str) or signal_name.upper().removeprefix(
                "SIG") not in PROCESS_SIGNALS:
            raise BadRequest(f"signal must be one of {', '.join(PROCESS_SIGNALS)}",
                             "invalid_signal")
        word = signal_name.upper().removeprefix("SIG")
        process = self._process(name, process_id)
        if process.ended_at is not None:
            raise Conflict(f"process {process_id} has ended ({process.status})",
                           "process_ended")
        async with self.audit.action("process.signal", name,
                                     {"process": process_id, "signal": word}, actor):
            process.signal = word
            await self.kill_exec(process.container_id, process.exec_id,
                                 signal.Signals[f"SIG{word}"])
        if word == "KILL":  # it cannot outlive this: answer once it is seen to have ended
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.done.wait(), KILL_GRACE)
        return process.view()

    async def stream(self, name: str, req: ExecRequest, actor: Actor,
                     background: bool = False, tag: str | None = None) -> ExecStream:
        """Start a command whose output is read as it comes (the caller iterates it)."""
        check_space_name(name)
        busy = contextlib.ExitStack()
        busy.enter_context(self.activity.busy(name))
        try:
            running = await self.start_exec(name, req, actor, background, tag)
            ooms = await asyncio.get_running_loop().run_in_executor(
                None, oom_kill_count, running.container_id)
        except BaseException:
            busy.close()
            raise
        return ExecStream(self, running.process, running.sock, busy, ooms,  # type: ignore[arg-type]
                          tty=req.tty)

    async def exec(self, name: str, req: ExecRequest, actor: Actor) -> ExecResult:
        """Run a command to its end; its output is collected (capped)."""
        check_space_name(name)
        with self.activity.busy(name):
            started = time.monotonic()
            loop = asyncio.get_running_loop()
            running = await self.start_exec(name, req, actor)
            ooms = await loop.run_in_executor(None, oom_kill_count, running.container_id)
            result = await self._collect(running, req.timeout, self.config.exec_output_limit,
                                         started)
            if result["exitCode"] == 137 and ooms is not None and not result["timedOut"]:
                # Killed (SIGKILL) while the cgroup's OOM killer struck: out of memory.
                after = await loop.run_in_executor(None, oom_kill_count, running.container_id)
                result["oomKilled"] = after is not None and after > ooms
                if result["oomKilled"]:
                    await self.audit.record("space.exec.oom", name,
                                            {"command": command_of(req.argv)}, actor)
        refusal = workdir_refusal(req, result)
        if refusal is not None:
            raise refusal
        return result

    # -- the service's own commands -------------------------------------------------------

    async def run_internal(self, info: dict[str, Any], req: ExecRequest,
                           output_limit: int, user: str | None = None,
                           stdin: Iterator[bytes] | None = None) -> ExecResult:
        """An exec of the service's own (files, probes): not audited, not activity.

        ``stdin``, a blocking iterator, is sent to the command (then end of file) while its
        output is collected; an error the iterator raises (a client's broken upload) is
        raised once the command has seen end of file and ended."""
        started = time.monotonic()
        running = await self.open_internal(info, req, user, stdin is not None)
        failure: list[BaseException] = []

        def feed(chunks: Iterator[bytes]) -> None:
            try:
                for chunk in chunks:
                    running.sock.sendall(chunk)
            except OSError:
                pass  # the command ended without reading it all; its exit code tells
            except Exception as err:  # noqa: BLE001 - handed to the caller below
                failure.append(err)
            finally:
                running.sock.shutdown(socket.SHUT_WR)

        feeding = None if stdin is None else asyncio.ensure_future(
            self.engine.stream(functools.partial(feed, stdin)))
        try:
            result = await self._collect(running, req.timeout, output_limit, started)
        finally:
            if feeding is not None:
                running.sock.shutdown(socket.SHUT_RDWR)
                await feeding
        if failure:
            raise failure[0]
        return result

    async def open_internal(self, info: dict[str, Any], req: ExecRequest,
                            user: str | None = None, stdin: bool = False) -> RunningExec:
        """Start a service exec, as the space's user unless told otherwise."""
        if user is None:
            user = str((info.get("Config") or {}).get("User") or "")
        try:
            exec_id, sock = await self.engine.exec_open(info["Id"], req.argv, user, req.env,
                                                        req.workdir, stdin=stdin)
        except EngineError as err:
            raise Conflict(f"exec could not start: {err.message}", "exec_failed") from None
        return RunningExec(info["Id"], exec_id, sock)

    async def _collect(self, running: RunningExec, timeout: float, output_limit: int,
                       started: float) -> ExecResult:
        """Read an exec's output (capped), enforce its timeout, and report how it ended."""
        reader = DemuxReader(running.sock, output_limit)
        task = asyncio.ensure_future(self.engine.stream(reader.run))
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            timed_out = True
            await self.kill_exec(running.container_id, running.exec_id)
            try:
                await asyncio.wait_for(asyncio.shield(task), 5)
            except asyncio.TimeoutError:
                reader.abort()  # something escaped the process group and holds the pipe
                await task
        finally:
            if not task.done():
                reader.abort()
            running.sock.close()
        exit_code = None
        try:
            exit_code = (await self.engine.exec_inspect(running.exec_id)).get("ExitCode")
        finally:
            self.finish(running.process, exit_code, timed_out, reader.counted)
        if exit_code is None:
            exit_code = 137 if timed_out else -1
        return {
            "stdout": decode_output(reader.out[1], reader.truncated[1]),
            "stderr": decode_output(reader.out[2], reader.truncated[2]),
            "exitCode": int(exit_code),
            "durationMs": int((time.monotonic() - started) * 1000),
            "timedOut": timed_out,
            "oomKilled": False,
            "stdoutTruncated": reader.truncated[1],
            "stderrTruncated": reader.truncated[2],
        }

    async def _host_pid(self, exec_id: str) -> int:
        """The host pid of a running exec; 0 once it has ended."""
        for attempt in range(60):  # a just-started exec reports Pid 0 for a moment
            details = await self.engine.exec_inspect(exec_id)
            if not details.get("Running"):
                return 0
            if int(details.get("Pid") or 0) > 0:
                return int(details["Pid"])
            await asyncio.sleep(min(0.05, 0.002 * 2 ** attempt))
        return 0

    async def exec_state(self, exec_id: str) -> tuple[bool, int | None]:
        """(still running?, exit code) of an exec."""
        details = await self.engine.exec_inspect(exec_id)
        code = details.get("ExitCode")
        return bool(details.get("Running")), None if code is None else int(code)

    async def container_running(self, container_id: str) -> bool:
        with contextlib.suppress(EngineError):
            info = await self.engine.inspect_container(container_id)
            return bool(((info or {}).get("State") or {}).get("Running"))
        return False

    async def kill_exec(self, container_id: str, exec_id: str,
                        sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal an exec's whole process group (a timeout, a closed terminal)."""
        host_pid = await self._host_pid(exec_id)
        if host_pid <= 0:
            return
        container_pid = kill_exec_group(host_pid, container_id, sig)
        if container_pid is None:
            return
        # From inside, as the space's user, who owns the processes (root in the space has no
        # capability over them).
        user = self.spaces.user_of(container_id)
        with contextlib.suppress(EngineError):
            await self.engine.exec_run(
                container_id,
                ["sh", "-c", f"kill -s {sig.name[3:]} -- -{int(container_pid)}"], user)


ADOPTED_POLL = 1.0  # seconds between asking the engine whether a taken-up command still runs
LIVE_POLL = 5.0  # the same for one whose connection is held (it ends with the command, mostly)


class ExecStream:
    """A client's command as it runs: what its engine connection carries, as (stream, bytes)
    pieces through a bounded queue (a consumer that stops reading stalls the command's
    output, never the service's memory), keepalive ticks while it is quiet, then how it
    ended. Its timeout (from its start) is kept by a timer of its own, whether or not anyone
    reads. A command taken up after a restart has no connection (``sock`` None): its end is
    learnt from the engine. The space is in use until it ends; the consumer must ``close``
    it (or ``abandon`` it, at shutdown, leaving the command running)."""

    def __init__(self, execs: Execs, process: Process, sock: ExecSocket | None,
                 busy: contextlib.ExitStack, ooms: int | None, tty: bool = False,
                 lost: bool = False) -> None:
        self.execs = execs
        self.process = process
        self.sock = sock
        self.busy = busy
        self.ooms = ooms
        self.lost = lost  # its output went over a connection that is gone (a terminal)
        elapsed = max(0.0, execs.activity.clock() - process.started_at)
        self.started = time.monotonic() - elapsed
        self.timed_out = False
        self.exit_code: int | None = None
        self.oom_killed = False
        self.space_stopped = False
        self.abandoned = False
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(16)
        self.reader = None if sock is None else DemuxReader(sock, 0, raw=tty)
        self.pump: asyncio.Future[None] | None = None
        self.watch: asyncio.Future[None] | None = None
        if self.reader is not None:
            self.reader.sink = lambda stream, data: asyncio.run_coroutine_threadsafe(
                self.queue.put((stream, data)), loop).result()
            self.pump = loop.run_in_executor(execs.engine.streams, self._pump, loop)
        if self.reader is None or process.spooled:
            # A spooled command's connection can outlive it (a daemon it started holds the
            # engine's stderr on fd 7): its end is also asked of the engine.
            self.watch = asyncio.ensure_future(self._watch(
                ADOPTED_POLL if self.reader is None else LIVE_POLL))
        self.timer = None if not process.timeout else loop.call_later(
            max(0.0, process.timeout - elapsed), self._time_out)
        self.killing: asyncio.Future[None] | None = None
        self.duration_ms: int | None = None

    def _pump(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self.reader.run()  # type: ignore[union-attr]
        except (RuntimeError, concurrent.futures.CancelledError):
            return  # the loop is gone (shutdown)
        except OSError as err:
            log.warning("process %s: its connection failed: %s", self.process.id, err)
        finally:
            with contextlib.suppress(RuntimeError, concurrent.futures.CancelledError):
                asyncio.run_coroutine_threadsafe(self.queue.put(None), loop).result()

    async def _watch(self, longest: float) -> None:
        wait = 0.05
        try:
            while not self.lost and (await self.execs.exec_state(self.process.exec_id))[0]:
                await asyncio.sleep(wait)
                wait = min(longest, wait * 2)
        except EngineError:
            pass  # gone with its container: ended
        await self.queue.put(None)

    def _time_out(self) -> None:
        self.timed_out = True
        self.killing = asyncio.ensure_future(self.execs.kill_exec(
            self.process.container_id, self.process.exec_id))

    async def output(self, ping_every: float) -> AsyncIterator[tuple[int, bytes]]:
        """(1 or 2, bytes) as the command prints them, and (0, b"") after ``ping_every``
        seconds of quiet; ends when the command's output does, and then how it ended is
        known."""
        while True:
            try:
                item = await asyncio.wait_for(self.queue.get(), ping_every)
            except asyncio.TimeoutError:
                yield 0, b""
                continue
            if item is None:
                break
            self.execs.activity.touch(self.process.space)
            yield item
        await self._ended()

    async def _ended(self) -> None:
        self.process.gone = True
        self.duration_ms = int((time.monotonic() - self.started) * 1000)
        if self.timer is not None:
            self.timer.cancel()  # what is left to do (reading the rest) is not its time
        if self.killing is not None:
            with contextlib.suppress(EngineError, ClawdError):
                await self.killing
        try:
            code = (await self.execs.exec_state(self.process.exec_id))[1]
        except EngineError:
            code = None
        self.exit_code = None if self.lost else code
        if not self.timed_out and code == 137 and self.process.timeout and (
                self.execs.activity.clock() - self.process.started_at >= self.process.timeout):
            self.timed_out = True  # past its time, killed: by the space's own timer
        if code is None or code >= 128 or self.lost:
            # Killed, or forgotten: by its space's end, its terminal's, or a signal?
            self.space_stopped = self.lost or self.process.container_id in \
                self.execs.spaces.removed or not await self.execs.container_running(
                    self.process.container_id)
        if code == 137 and self.ooms is not None and not self.timed_out:
            after = await asyncio.get_running_loop().run_in_executor(
                None, oom_kill_count, self.process.container_id)
            self.oom_killed = after is not None and after > self.ooms

    def result(self) -> dict[str, Any]:
        """How the command ended (after ``output`` has ended)."""
        result = {"exitCode": -1 if self.exit_code is None else self.exit_code,
                  "timedOut": self.timed_out, "oomKilled": self.oom_killed,
                  "durationMs": self.duration_ms if self.duration_ms is not None
                  else int((time.monotonic() - self.started) * 1000)}
        if self.lost:
            result["lost"] = True  # its terminal was the last run's connection
        elif self.space_stopped:
            result["spaceStopped"] = True
        return result

    async def close(self) -> None:
        """Stop reading and release the space; a command whose output is still coming is
        ended (its output has nowhere to go)."""
        if self.timer is not None:
            self.timer.cancel()
        if not self.process.gone:
            with contextlib.suppress(EngineError, ClawdError):
                await self.execs.kill_exec(self.process.container_id, self.process.exec_id)
        await self._stop_readers()
        if self.sock is not None:
            self.sock.close()
        if self.exit_code is None and self.process.ended_at is None and not self.lost:
            with contextlib.suppress(EngineError, ClawdError):
                self.exit_code = (await self.execs.exec_state(self.process.exec_id))[1]
        self.execs.finish(self.process, self.exit_code, self.timed_out,
                          stopped=self.space_stopped)
        self.busy.close()

    async def _stop_readers(self) -> None:
        """Stop reading the connection and asking the engine (each once it is done)."""
        if self.watch is not None:
            self.watch.cancel()
        if self.pump is not None and not self.pump.done():
            self.reader.abort()  # type: ignore[union-attr]
            while not self.pump.done():  # it may wait to put a piece nobody will take
                while not self.queue.empty():
                    self.queue.get_nowait()
                await asyncio.wait([self.pump], timeout=0.05)
        for task in (self.pump, self.watch):
            if task is None:
                continue
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - a reader's failure is only worth a line
                log.exception("process %s: its output reader failed", self.process.id)

    async def abandon(self) -> None:
        """The service stops: let go of the command without ending it."""
        self.abandoned = True
        if self.timer is not None:
            self.timer.cancel()
        await self._stop_readers()
        if self.sock is not None:
            self.sock.close()
        self.busy.close()


def spool_in_space(process: Process) -> str:
    return f"{SPOOL_IN_SPACE}/{process.id}"


class SpoolFollower:
    """A spooled command's output files, read into its spool: an exec of SPOOL_READ_SCRIPT
    following them from the service's positions (a thread of its own reads the connection,
    so a slow spool slows the reading, not the memory), holes punched behind it once well
    past the retained ring (so the space's disk holds a few MiB per command, not all it
    printed), and, once the command has ended, the rest read and the files removed. Bytes
    are counted per stream, so where to resume is always exact."""

    def __init__(self, execs: Execs, process: Process, spool: OutputSpool,
                 positions: dict[int, int]) -> None:
        self.execs = execs
        self.process = process
        self.spool = spool
        self.positions = dict(positions)  # stream -> next byte of its file
        self.punched = dict(positions)  # stream -> bytes of its file given back
        self.reading: tuple[RunningExec, asyncio.Future[None]] | None = None
        self.punching: asyncio.Future[None] | None = None

    async def _read(self, how: str) -> tuple[RunningExec, asyncio.Future[None]]:
        req = ExecRequest(argv=["sh", "-c", SPOOL_READ_SCRIPT, "sh", spool_in_space(
            self.process), str(self.positions[1] + 1), str(self.positions[2] + 1), how,
            str(self.process.pid or "")], env={}, workdir="/", timeout=0)
        running = await self.execs.open_internal({"Id": self.process.container_id}, req,
                                                 self.process.user)
        reader = DemuxReader(running.sock, 0)
        loop = asyncio.get_running_loop()
        reader.sink = lambda stream, data: asyncio.run_coroutine_threadsafe(
            self._take(stream, data), loop).result()

        def pump() -> None:
            try:
                reader.run()
            except (RuntimeError, concurrent.futures.CancelledError):
                pass  # the loop is gone (shutdown)
            except Exception as err:  # noqa: BLE001 - its spool cannot be written, or so
                log.warning("process %s: reading its output failed: %s", self.process.id, err)

        return running, loop.run_in_executor(self.execs.engine.streams, pump)

    async def _take(self, stream: int, data: bytes) -> None:
        if stream not in (1, 2):
            return
        await self.execs.append_output(self.process, self.spool, stream, data)
        self.positions[stream] += len(data)
        if self.punching is None or self.punching.done():
            self.punching = asyncio.ensure_future(self._punch())

    async def _punch(self) -> None:
        """Punch holes until both files are within a step of the ring (one exec at a time)."""
        while True:
            due = [(stream, self.positions[stream] - self.spool.capacity) for stream in (1, 2)
                   if self.positions[stream] - self.spool.capacity - self.punched[stream]
                   >= SPOOL_PUNCH_STEP]
            if not due:
                return
            stream, upto = due[0]
            try:
                await self.execs.run_internal({"Id": self.process.container_id}, ExecRequest(
                    argv=["sh", "-c", 'fallocate -p -o 0 -l "$2" -- "$1" 2>/dev/null || :',
                          "sh", f"{spool_in_space(self.process)}/{stream}", str(upto)],
                    env={}, workdir="/", timeout=30), 1024, self.process.user)
            except (EngineError, ClawdError):
                return  # paused or gone: the next output tries again
            self.punched[stream] = upto

    async def start(self) -> None:
        """Follow the files (a space that cannot be read now is read at the end)."""
        try:
            self.reading = await self._read("follow")
        except (EngineError, ClawdError) as err:
            log.warning("process %s: its output cannot be followed: %s", self.process.id, err)

    async def stop(self) -> None:
        """Stop following; every byte sent so far is counted."""
        reading, self.reading = self.reading, None
        if reading is not None:
            running, pump = reading
            if not pump.done():
                with contextlib.suppress(EngineError, ClawdError):
                    await self.execs.kill_exec(running.container_id, running.exec_id)
            try:
                await asyncio.wait_for(asyncio.shield(pump), 10)
            except asyncio.TimeoutError:
                running.sock.shutdown(socket.SHUT_RDWR)
                await pump
            finally:
                running.sock.close()
        if self.punching is not None:
            with contextlib.suppress(Exception):
                await self.punching

    async def remove(self) -> None:
        """Remove the files in the space (once the process's end is recorded)."""
        with contextlib.suppress(EngineError, ClawdError):
            await self.execs.run_internal({"Id": self.process.container_id}, ExecRequest(
                argv=["rm", "-rf", "--", spool_in_space(self.process)], env={}, workdir="/",
                timeout=30), 1024, self.process.user)

    async def finish(self) -> None:
        """The command has ended: read what is left of its files."""
        await self.stop()
        try:
            running, pump = await self._read("rest")
        except (EngineError, ClawdError):
            return  # its space is gone, and the files with it
        try:
            # Bounded: a space that swapped a file for /dev/zero or a FIFO gets no more time.
            await asyncio.wait_for(asyncio.shield(pump), SPOOL_FINAL_READ)
        except asyncio.TimeoutError:
            log.warning("process %s: its output files did not end; reading stopped",
                        self.process.id)
            with contextlib.suppress(EngineError, ClawdError):
                await self.execs.kill_exec(running.container_id, running.exec_id)
            running.sock.shutdown(socket.SHUT_RDWR)
            await pump
        finally:
            running.sock.close()


###############################################################################
# Stats and observability #####################################################
###############################################################################

class SpaceStats(TypedDict):
    cpuPercent: float
    memoryUsageBytes: int
    memoryLimitBytes: int
    pids: int
    networkRxBytes: int
    networkTxBytes: int
    blockReadBytes: int
    blockWriteBytes: int


CPU_SAMPLE_SECONDS = 0.04
CPU_SAMPLE_MAX_AGE = 60.0


@dataclasses.dataclass(frozen=True)
class CgroupSample:
    """Raw counters of one container, read from the host's cgroup files and /proc."""

    cpu_ns: int
    memory_usage: int
    memory_limit: int
    pids: int
    net_rx: int
    net_tx: int
    block_read: int
    block_write: int
    taken: float


def read_int(path: str, default: int = 0) -> int:
    try:
        with open(path, encoding="ascii") as source:
            text = source.read().strip()
    except OSError:
        return default
    return int(text) if text.isdigit() else default


def read_keyed(path: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, cpu.stat) as a dict."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError), open(path, encoding="ascii") as source:
        for line in source:
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                values[key] = int(value)
    return values


def cgroup_paths(pid: int) -> dict[str, str]:
    """Controller -> cgroup path of a process ('' is the cgroup v2 unified hierarchy)."""
    paths: dict[str, str] = {}
    with open(f"/proc/{pid}/cgroup", encoding="ascii") as source:
        for line in source:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(","):
                paths[controller] = path
    return paths


def v1_dir(controller: str, path: str) -> str:
    for mount in (controller, "cpu,cpuacct" if controller in ("cpu", "cpuacct") else controller):
        candidate = f"{CGROUP_ROOT}/{mount}{path}"
        if os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(f"no cgroup v1 {controller} directory for {path}")


def network_counters(pid: int) -> tuple[int, int]:
    rx = tx = 0
    with open(f"/proc/{pid}/net/dev", encoding="ascii") as source:
        for line in source:
            name, sep, rest = line.partition(":")
            if not sep or name.strip() == "lo":
                continue
            fields = rest.split()
            if len(fields) >= 9:
                rx += int(fields[0])
                tx += int(fields[8])
    return rx, tx


def read_cgroup_sample(pid: int, host_memory: int) -> CgroupSample:
    """Counters of the container whose init has host ``pid``; cgroup v1 and v2 alike."""
    paths = cgroup_paths(pid)
    unified = os.path.exists(f"{CGROUP_ROOT}/cgroup.controllers")
    read_bytes = write_bytes = 0
    if unified:
        base = f"{CGROUP_ROOT}{paths['']}"
        cpu_ns = read_keyed(f"{base}/cpu.stat").get("usage_usec", 0) * 1000
        usage = read_int(f"{base}/memory.current")
        inactive = read_keyed(f"{base}/memory.stat").get("inactive_file", 0)
        limit = read_int(f"{base}/memory.max", host_memory)
        pids = read_int(f"{base}/pids.current")
        with contextlib.suppress(OSError), open(f"{base}/io.stat", encoding="ascii") as io_stat:
            for line in io_stat:
                for field in line.split()[1:]:
                    key, _, value = field.partition("=")
                    if key == "rbytes" and value.isdigit():
                        read_bytes += int(value)
                    elif key == "wbytes" and value.isdigit():
                        write_bytes += int(value)
    else:
        cpu_ns = read_int(f"{v1_dir('cpuacct', paths['cpuacct'])}/cpuacct.usage")
        memory = v1_dir("memory", paths["memory"])
        usage = read_int(f"{memory}/memory.usage_in_bytes")
        inactive = read_keyed(f"{memory}/memory.stat").get("total_inactive_file", 0)
        limit = read_int(f"{memory}/memory.limit_in_bytes", host_memory)
        pids = read_int(f"{v1_dir('pids', paths['pids'])}/pids.current")
        blkio = v1_dir("blkio", paths["blkio"])
        for name in ("blkio.throttle.io_service_bytes_recursive",
                     "blkio.throttle.io_service_bytes"):
            with contextlib.suppress(OSError), open(f"{blkio}/{name}", encoding="ascii") as io:
                for line in io:
                    fields = line.split()
                    if len(fields) == 3 and fields[2].isdigit():
                        if fields[1].lower() == "read":
                            read_bytes += int(fields[2])
                        elif fields[1].lower() == "write":
                            write_bytes += int(fields[2])
                break
    rx, tx = network_counters(pid)
    if host_memory and (limit <= 0 or limit > host_memory):
        limit = host_memory
    return CgroupSample(cpu_ns=cpu_ns, memory_usage=max(usage - inactive, 0),
                        memory_limit=limit, pids=pids, net_rx=rx, net_tx=tx,
                        block_read=read_bytes, block_write=write_bytes, taken=time.monotonic())


def stats_from_docker(raw: dict[str, Any]) -> SpaceStats:
    """The engine's own stats answer (used when the cgroup files are not reachable)."""
    cpu, pre = raw.get("cpu_stats") or {}, raw.get("precpu_stats") or {}
    cpu_delta = (cpu.get("cpu_usage", {}).get("total_usage", 0)
                 - pre.get("cpu_usage", {}).get("total_usage", 0))
    system_delta = cpu.get("system_cpu_usage", 0) - pre.get("system_cpu_usage", 0)
    online = cpu.get("online_cpus") or 1
    memory = raw.get("memory_stats") or {}
    inner = memory.get("stats") or {}
    cache = inner.get("total_inactive_file", inner.get("inactive_file", 0))
    networks = (raw.get("networks") or {}).values()
    blkio = (raw.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []
    return {
        "cpuPercent": round(cpu_delta / system_delta * online * 100, 2)
        if system_delta > 0 and cpu_delta > 0 else 0.0,
        "memoryUsageBytes": max(int(memory.get("usage", 0)) - int(cache), 0),
        "memoryLimitBytes": int(memory.get("limit", 0)),
        "pids": int((raw.get("pids_stats") or {}).get("current", 0) or 0),
        "networkRxBytes": sum(int(n.get("rx_bytes", 0)) for n in networks),
        "networkTxBytes": sum(int(n.get("tx_bytes", 0)) for n in
                              (raw.get("networks") or {}).values()),
        "blockReadBytes": sum(int(e.get("value", 0)) for e in blkio
                              if str(e.get("op", "")).lower() == "read"),
        "blockWriteBytes": sum(int(e.get("value", 0)) for e in blkio
                               if str(e.get("op", "")).lower() == "write"),
    }


class StatsReader:
    """Stats in milliseconds: cgroup files on the host instead of the engine's 1-2 s call.

    CPU percent (100 = one core) is the usage since the previous call when that was recent,
    else over a short sampling window.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.previous: dict[str, CgroupSample] = {}

    async def read(self, container_id: str, pid: int) -> SpaceStats:
        loop = asyncio.get_running_loop()
        host_memory = host_memory_bytes()
        try:
            sample = await loop.run_in_executor(None, read_cgroup_sample, pid, host_memory)
        except (OSError, KeyError, ValueError):
            raw = await self.engine.stats(container_id)
            return stats_from_docker(raw)
        before = self.previous.get(container_id)
        if before is None or sample.taken - before.taken > CPU_SAMPLE_MAX_AGE:
            await asyncio.sleep(CPU_SAMPLE_SECONDS)
            before, sample = sample, await loop.run_in_executor(
                None, read_cgroup_sample, pid, host_memory)
        self.previous[container_id] = sample
        elapsed_ns = max(sample.taken - before.taken, 1e-6) * 1e9
        cpu = max(sample.cpu_ns - before.cpu_ns, 0) / elapsed_ns * 100
        return {
            "cpuPercent": round(cpu, 2),
            "memoryUsageBytes": sample.memory_usage,
            "memoryLimitBytes": sample.memory_limit,
            "pids": sample.pids,
            "networkRxBytes": sample.net_rx,
            "networkTxBytes": sample.net_tx,
            "blockReadBytes": sample.block_read,
            "blockWriteBytes": sample.block_write,
        }

    def forget(self, container_id: str) -> None:
        self.previous.pop(container_id, None)


OBSERVE_SEPARATOR = "----clawdspace----"
OBSERVE_DISK = "df -Pk /workspace 2>/dev/null | tail -n 1"
OBSERVE_SCRIPT = (
    OBSERVE_DISK + "; echo {sep}; "
    "du -sk /workspace 2>/dev/null | cut -f1; echo {sep}; "
    "ps -eo pid=,pcpu=,pmem=,etime=,comm= --sort=-pcpu 2>/dev/null | head -n {top}; "
    "echo {sep}; tail -n {lines} /workspace/.bash_history 2>/dev/null"
)


def parse_observation(text: str) -> dict[str, Any]:
    """The sections printed by OBSERVE_SCRIPT; a missing tool leaves its part empty."""
    parts = (text.split(OBSERVE_SEPARATOR + "\n") + ["", "", "", ""])[:4]
    disk_fields = parts[0].split()
    workspace_disk = None
    if len(disk_fields) >= 6 and all(f.isdigit() for f in disk_fields[1:4]):
        total, used, avail = (int(f) * 1024 for f in disk_fields[1:4])
        workspace_disk = {"path": WORKSPACE, "totalBytes": total, "usedBytes": used,
                          "availBytes": avail,
                          "usedPercent": round(used / total * 100, 1) if total else 0.0}
    size = parts[1].strip()
    top = []
    for line in parts[2].splitlines():
        fields = line.split(None, 4)
        if len(fields) == 5 and fields[0].isdigit():
            with contextlib.suppress(ValueError):
                top.append({"pid": int(fields[0]), "cpu": float(fields[1]),
                            "mem": float(fields[2]), "etime": fields[3],
                            "command": fields[4]})
    return {"workspaceDisk": workspace_disk,
            "workspaceSizeBytes": int(size) * 1024 if size.isdigit() else None,
            "top": top, "bashHistoryTail": parts[3] or None}


class Observer:
    """Stats and observability of a space. Neither wakes a paused space nor counts as activity."""

    def __init__(self, spaces: Spaces, execs: Execs) -> None:
        self.spaces = spaces
        self.execs = execs
        self.reader = StatsReader(spaces.engine)

    async def stats(self, info: dict[str, Any]) -> SpaceStats:
        state = info.get("State") or {}
        pid = int(state.get("Pid") or 0)
        if not state.get("Running") or pid <= 0:
            self.reader.forget(info["Id"])
            return {"cpuPercent": 0.0, "memoryUsageBytes": 0,
                    "memoryLimitBytes": int((info.get("HostConfig") or {}).get("Memory") or 0),
                    "pids": 0, "networkRxBytes": 0, "networkTxBytes": 0,
                    "blockReadBytes": 0, "blockWriteBytes": 0}
        return await self.reader.read(info["Id"], pid)

    async def disk(self, info: dict[str, Any]) -> dict[str, Any] | None:
        """The workspace volume's size and use (None while the space does not run): only
        df, not the rest of OBSERVE_SCRIPT (du walks the whole workspace)."""
        state = info.get("State") or {}
        if not state.get("Running") or state.get("Paused"):
            return None
        result = await self.execs.run_internal(info, ExecRequest(
            argv=["sh", "-c", OBSERVE_DISK], env={}, workdir=WORKSPACE, timeout=10), 4096)
        disk: dict[str, Any] | None = parse_observation(result["stdout"])["workspaceDisk"]
        return disk

    async def observe(self, name: str, top: int, history_lines: int) -> dict[str, Any]:
        info = await self.spaces.inspect(name)
        values, _ = decode_labels((info.get("Config") or {}).get("Labels") or {})
        host = info.get("HostConfig") or {}
        state = info.get("State") or {}
        observation: dict[str, Any] = {"workspaceDisk": None, "workspaceSizeBytes": None,
                                       "top": [], "bashHistoryTail": None}
        if state.get("Running") and not state.get("Paused"):
            script = OBSERVE_SCRIPT.format(sep=OBSERVE_SEPARATOR, top=top, lines=history_lines)
            result = await self.execs.run_internal(info, ExecRequest(
                argv=["sh", "-c", script], env={}, workdir=WORKSPACE, timeout=10), 1 << 20)
            observation = parse_observation(result["stdout"])
            if observation["bashHistoryTail"]:
                observation["bashHistoryTail"] = self.spaces.audit.redactor.text(
                    observation["bashHistoryTail"])
        return {
            "stats": await self.stats(info),
            **observation,
            # Processes the kernel killed for want of memory since the container started.
            "oomKills": await asyncio.get_running_loop().run_in_executor(
                None, oom_kill_count, info["Id"]),
            "status": "paused" if state.get("Paused") else space_status(
                str(state.get("Status", ""))),
            "settings": {
                "template": values["template"],
                "network": values["network"],
                "writableRootfs": not host.get("ReadonlyRootfs", False),
                # What the engine enforces, not what the labels say.
                "sudo": "no-new-privileges:true" not in (host.get("SecurityOpt") or []),
                "image": values["image"],
                "user": values["user"],
                "memory": int(host.get("Memory") or 0),
                "cpus": plain_number((host.get("NanoCpus") or 0) / 1e9),
                "pidsLimit": host.get("PidsLimit"),
                "gpu": values["gpu"],
            },
        }


###############################################################################
# Files #######################################################################
###############################################################################

# Go's os.FileMode type bits, as the engine's archive stat reports them.
MODE_DIR = 1 << 31
MODE_SYMLINK = 1 << 27
MODE_TYPE_MASK = (1 << 31) | (1 << 30) | (1 << 27) | (1 << 26) | (1 << 25) | (1 << 24) | \
    (1 << 21) | (1 << 19)
FILE_CHUNK = 256 << 10
LIST_OUTPUT_LIMIT = 8 << 20
TEMP_MARK = ".clawdspace-upload-"  # temporary files of writes; left ones are swept at start


class FileEntry(TypedDict):
    name: str
    path: str
    type: str
    size: int
    mtimeMs: int
    mode: int  # permission bits
    owner: str
    group: str
    target: str | None  # a symlink's target, as written


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Where a workspace path really lands inside the container, checked component by component.

    ``real`` is the absolute in-container path (symlinks resolved, always in the tree);
    ``stat`` is the engine's stat of it, or None when it does not exist; ``missing`` lists the
    components below the deepest existing directory ``parent`` that a write has to create.
    """

    rel: str
    real: str
    stat: dict[str, Any] | None
    parent: str
    missing: tuple[str, ...]


def mode_type(mode: int) -> str:
    if mode & MODE_DIR:
        return "dir"
    if mode & MODE_SYMLINK:
        return "symlink"
    if mode & MODE_TYPE_MASK:
        return "other"
    return "file"


# Every byte a file call moves goes through a process of the space's own user, which opens
# the path itself: the kernel then allows exactly what that user could do, whatever the space
# does to its tree meanwhile (there is no check-then-use as root). The scripts also hold the
# result to the tree of the call, $CLAWDSPACE_ROOT (/workspace unless set; "/" for E2B's
# daemon, where the container is the boundary): they check the directory they are in, or the
# file they opened, after opening it. POSIX sh and coreutils only (the image may have no
# python3 or bash).
INSIDE_ROOT = r"""
inside() {
    tree=${CLAWDSPACE_ROOT:-/workspace}
    [ "$tree" = / ] && return 0
    case $1 in "$tree"|"$tree"/*) return 0 ;; esac
    return 1
}
"""
USER_READ_SCRIPT = INSIDE_ROOT + r"""
[ -p "$1" ] && exit 103
exec <"$1" || exit 101
inside "$(readlink -f /proc/self/fd/0)" || exit 102
[ -f /proc/self/fd/0 ] || exit 103
stat -L -c %s /proc/self/fd/0 || exit 104
[ "$3" -gt 0 ] && head -c "$3" /proc/self/fd/0
[ "$2" -eq 0 ] && exec cat
exec tail -c "+$(($2 + 1))" /proc/self/fd/0
"""
USER_WRITE_SCRIPT = INSIDE_ROOT + r"""
mkdir -p -- "$1" || exit 101
cd -P -- "$1" || exit 101
inside "$(pwd -P)" || exit 102
[ "$6" = discard ] && exec rm -f -- "$3"
if [ "$6" = write ]; then
    set -C
    cat >"$3" || { rm -f -- "$3"; exit 105; }
    [ "$5" = - ] && exit 0  # its size is counted by the service, which then installs it
fi
[ "$(stat -c %s -- "$3")" = "$5" ] || { rm -f -- "$3"; exit 107; }
chmod "$4" -- "$3" || { rm -f -- "$3"; exit 105; }
if [ -d "$2" ] && [ ! -L "$2" ]; then rm -f -- "$3"; exit 103; fi
mv -fT -- "$3" "$2" || { rm -f -- "$3"; exit 106; }
"""
# A directory's entries (or, with $2, that one entry), LIST_FIELDS fields each, every field
# ended by NUL (names and link targets can hold anything else): type, size, mtime, mode,
# owner, group, link target, name. Without GNU find, stat gives the type as a hex mode and
# no link target.
USER_LIST_SCRIPT = INSIDE_ROOT + r"""
cd -P -- "$1" || exit 101
inside "$(pwd -P)" || exit 102
if find . -maxdepth 0 -printf '' 2>/dev/null; then
    fmt='%y\0%s\0%T@\0%m\0%u\0%g\0%l\0%f\0'
    [ -n "$2" ] && exec find "./$2" -maxdepth 0 -printf "$fmt"
    exec find . -mindepth 1 -maxdepth 1 -printf "$fmt"
fi
if [ -n "$2" ]; then set -- "$1" "$2"; else set -- "$1" * .[!.]* ..?*; fi
shift
for f in "$@"; do
    if [ -e "$f" ] || [ -L "$f" ]; then
        stat --printf '%f\0%s\0%Y\0%a\0%U\0%G\0\0%n\0' -- "$f"
    fi
done
"""
LIST_FIELDS = 8
USER_DELETE_SCRIPT = INSIDE_ROOT + r"""
cd -P -- "$1" || exit 101
inside "$(pwd -P)" || exit 102
case $3 in
    tree) exec rm -rf -- "$2" ;;
    dir) exec rmdir -- "$2" ;;
    *) exec rm -f -- "$2" ;;
esac
"""
NOT_WORKSPACE, NOT_REGULAR, SHORT_BODY = 102, 103, 107
FILE_OPEN_TIMEOUT = 30  # seconds for a file to open and say its size
FILE_READ_STALL = 60  # seconds a file being read may go without producing a byte
STAT_TYPES = {0o040000: "d", 0o100000: "f", 0o120000: "l"}
LIST_KINDS = {"f": "file", "d": "dir", "l": "symlink"}


def parse_listing(output: str, base: str) -> list[FileEntry]:
    """USER_LIST_SCRIPT's records as entries under ``base`` (malformed ones skipped)."""
    fields = output.split("\0")
    entries: list[FileEntry] = []
    for at in range(0, len(fields) - LIST_FIELDS + 1, LIST_FIELDS):
        kind, size, mtime, mode, owner, group, target, entry_name = fields[at:at + LIST_FIELDS]
        if not size.isdigit() or not re.fullmatch(r"[0-7]{1,6}", mode):
            continue
        if len(kind) > 1:  # stat's hex mode (the fallback without GNU find)
            kind = STAT_TYPES.get(int(kind, 16) & 0o170000, "o") if re.fullmatch(
                r"[0-9a-f]{1,8}", kind) else "o"
        with contextlib.suppress(ValueError):
            entries.append({"name": entry_name, "path": f"{base}/{entry_name}",
                            "type": LIST_KINDS.get(kind, "other"), "size": int(size),
                            "mtimeMs": int(float(mtime) * 1000), "mode": int(mode, 8),
                            "owner": owner, "group": group,
                            "target": target if kind == "l" and target else None})
    return entries


def user_file_error(rel: str, code: int | None, stderr: str) -> ClawdError:
    """What a file script's failure means for the client."""
    detail = stderr.strip().rpartition(": ")[2] or "failed"
    if code == NOT_WORKSPACE:
        return Forbidden(f"{rel} leads outside /workspace", "outside_workspace")
    if code == NOT_REGULAR:
        return BadRequest(f"{rel} is not a regular file", "not_a_file")
    if code == SHORT_BODY:
        return BadRequest("the body does not match its Content-Length", "invalid_body")
    if "Permission denied" in stderr or "Operation not permitted" in stderr:
        return Forbidden(f"{rel}: permission denied (the space's user may not do this)",
                         "permission_denied")
    if "No such file" in stderr:
        return NotFound(f"{rel}: no such file or directory")
    if "Not a directory" in stderr:
        return BadRequest(f"{rel}: a parent is not a directory", "not_a_dir")
    if "No space left" in stderr or "Disk quota" in stderr:
        return InsufficientStorage(f"{rel}: no space left in the space")
    return Conflict(f"{rel}: {detail}", "file_failed")


class UserFile:
    """A regular file of a space, open in a process of the space's user, streaming out."""

    def __init__(self, execs: Execs, running: RunningExec, rel: str) -> None:
        self.execs = execs
        self.running = running
        self.stdout = ExecStdout(running.sock, FILE_CHUNK)
        self.rel = rel
        self.size = 0
        self.closed = False
        self.exit_code: int | None = None

    async def start(self) -> None:
        """Read the size line the script prints once the file is open (or raise its error).

        Bounded: a space can swap a FIFO in for the file, whose open never returns."""
        try:
            line = await asyncio.wait_for(
                self.execs.engine.stream(lambda: self.stdout.read_line(32)), FILE_OPEN_TIMEOUT)
        except asyncio.TimeoutError:
            raise Conflict(f"{self.rel} could not be opened in {FILE_OPEN_TIMEOUT} s (a FIFO "
                           "or a hung file system?)", "file_changed") from None
        if line is None or not line.isdigit():
            code = await self.close()
            raise user_file_error(self.rel, code, self.stdout.stderr.decode("utf-8", "replace"))
        self.size = int(line)

    async def read(self, size: int) -> bytes:
        try:
            return await asyncio.wait_for(
                self.execs.engine.stream(lambda: self.stdout.read(size)), FILE_READ_STALL)
        except asyncio.TimeoutError:
            raise Conflict(f"{self.rel} stopped producing data for {FILE_READ_STALL} s",
                           "file_changed") from None

    async def read_exactly(self, size: int) -> bytes:
        """``size`` bytes (fewer only at the end of the output)."""
        parts: list[bytes] = []
        while size > 0:
            data = await self.read(min(size, FILE_CHUNK))
            if not data:
                break
            parts.append(data)
            size -= len(data)
        return b"".join(parts)

    async def close(self) -> int | None:
        """Close the stream and end the process; its exit code when it had ended by itself.
        Closing again answers the same without asking the engine."""
        if self.closed:
            return self.exit_code
        self.closed = True
        self.running.sock.close()
        running, self.exit_code = await self.execs.exec_state(self.running.exec_id)
        if running:
            await self.execs.kill_exec(self.running.container_id, self.running.exec_id)
            self.exit_code = None
        return self.exit_code


class FileStream:
    """A file on its way out of a space: its size, the bytes promised, then the bytes.

    ``short`` is set when the file shrank after its length was promised (the caller must not
    let the client take the short body for the whole file)."""

    def __init__(self, activity: Activity, name: str, rel: str, opened: UserFile,
                 length: int) -> None:
        self.activity = activity
        self.name = name
        self.rel = rel
        self.opened = opened
        self.size = opened.size
        self.length = length
        self.short = False

    async def chunks(self) -> AsyncIterator[bytes]:
        with self.activity.busy(self.name):
            left = self.length
            while left > 0:
                chunk = await self.opened.read(min(FILE_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                self.activity.touch(self.name)
                yield chunk
            if left > 0:
                log.warning("files: %s of %s shrank while being read; connection closed",
                            self.rel, self.name)
                self.short = True
            await self.opened.close()

    async def close(self) -> None:
        await self.opened.close()


def while_busy(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """A Files call keeps its space in use (auto-sleep waits) for as long as it runs."""

    @functools.wraps(method)
    async def wrapper(self: Files, name: str, *args: Any, **kwargs: Any) -> T:
        with self.spaces.activity.busy(name):
            return await method(self, name, *args, **kwargs)

    return wrapper


class Files:
    """The files API: everything under one tree of a space (``root``: /workspace for /api,
    ``/`` for E2B's daemon), through processes of the space's user.

    No host path of a volume is ever touched. A path is first resolved one component at a time
    with the engine's stat (metadata only, which resolves symlinks inside the container), and
    anything whose real location is outside the tree is refused with 403. The access itself,
    reading, writing, listing or deleting, is then done by a process of the space's user that
    opens the path itself and checks again where it landed, so a space racing its own tree
    gets at most what its user could read or write anyway.
    """

    def __init__(self, spaces: Spaces, execs: Execs, root: str = WORKSPACE) -> None:
        self.spaces = spaces
        self.execs = execs
        self.engine = spaces.engine
        self.root = root
        self.env = {"CLAWDSPACE_ROOT": root}  # the tree the file scripts hold to

    def rel_of(self, real: str) -> str:
        return real if self.root == "/" else real[len(self.root):] or "/"

    def inside(self, real: str) -> bool:
        return self.root == "/" or real == self.root or real.startswith(self.root + "/")

    async def stat(self, container_id: str, path: str) -> dict[str, Any] | None:
        """The engine's stat of a path in a space (metadata only); None: it does not exist."""
        try:
            return await self.engine.archive_stat(container_id, path)
        except EngineError as err:
            raise Conflict(f"cannot stat {self.rel_of(path)}: HTTP {err.status}",
                           "stat_failed") from None

    # -- resolution -----------------------------------------------------------------------

    async def resolve(self, container_id: str, raw_path: str | None,
                      follow_last: bool = True) -> Resolved:
        rel = workspace_rel(raw_path)
        components = [c for c in rel.split("/") if c]
        current = self.root
        # The root's own stat only when it is what was asked (the loop stats the rest).
        stat = None if components else await self.stat(container_id, self.root)
        for index, component in enumerate(components):
            last = index == len(components) - 1
            candidate = f"{current.rstrip('/')}/{component}"
            stat = await self.stat(container_id, candidate)
            if stat is None:
                return Resolved(rel, f"{current.rstrip('/')}/{'/'.join(components[index:])}",
                                None, current, tuple(components[index:]))
            if stat["mode"] & MODE_SYMLINK and (follow_last or not last):
                target = stat.get("linkTarget") or ""
                if not target.startswith("/") or not self.inside(target):
                    raise Forbidden(f"{rel} leads outside {self.root}", "outside_workspace")
                stat = await self.stat(container_id, target)
                if stat is None:
                    if not last:
                        raise NotFound(f"{rel}: no such file or directory")
                    parent, _, base = target.rpartition("/")
                    return Resolved(rel, target, None, parent or "/", (base,))
                candidate = target
            if not last and not stat["mode"] & MODE_DIR:
                raise BadRequest(f"{rel}: {self.rel_of(candidate)} is not a directory",
                                 "not_a_dir")
            current = candidate
        return Resolved(rel, current, stat, current.rpartition("/")[0] or "/", ())

    async def _resolved(self, name: str, raw_path: str | None, actor: Actor,
                        follow_last: bool = True) -> tuple[dict[str, Any], Resolved]:
        info = await self.spaces.running(name, actor)
        self.spaces.activity.touch(name)
        return info, await self.resolve(info["Id"], raw_path, follow_last)

    # -- list -----------------------------------------------------------------------------

    @while_busy
    async def list_dir(self, name: str, raw_path: str | None, limit: int,
                   actor: Actor) -> dict[str, Any]:
        info, where = await self._resolved(name, raw_path, actor)
        if where.stat is None:
            raise NotFound(f"{where.rel}: no such file or directory")
        if not where.stat["mode"] & MODE_DIR:
            raise BadRequest(f"{where.rel} is not a directory", "not_a_dir")
        result = await self.execs.run_internal(info, ExecRequest(
            argv=["sh", "-c", USER_LIST_SCRIPT, "sh", where.real], env=self.env,
            workdir=WORKSPACE, timeout=60), LIST_OUTPUT_LIMIT)
        if result["exitCode"] != 0:
            raise user_file_error(where.rel, result["exitCode"], result["stderr"])
        entries = parse_listing(result["stdout"], where.rel.rstrip("/"))
        entries.sort(key=lambda e: e["name"])
        return {"path": where.rel, "entries": entries[:limit], "truncated": len(entries) > limit}

    async def entry(self, name: str, raw_path: str | None, actor: Actor) -> FileEntry | None:
        """One path's entry, as a listing of its directory would show it (None: absent)."""
        info, where = await self._resolved(name, raw_path, actor, follow_last=False)
        if where.stat is None:
            return None
        parent, _, base = where.real.rpartition("/")
        if where.rel == "/":
            parent, base = self.root, "."
        result = await self.execs.run_internal(info, ExecRequest(
            argv=["sh", "-c", USER_LIST_SCRIPT, "sh", parent or "/", base], env=self.env,
            workdir=WORKSPACE, timeout=60), LIST_OUTPUT_LIMIT)
        if result["exitCode"] != 0:  # gone meanwhile (404), or not the user's to see (403)
            raise user_file_error(where.rel, result["exitCode"], result["stderr"])
        found = parse_listing(result["stdout"], where.rel.rpartition("/")[0])
        if not found:
            return None
        if base == ".":
            found[0]["name"] = self.root.rpartition("/")[2] or "/"
            found[0]["path"] = "/"
        return found[0]

    # -- read -----------------------------------------------------------------------------

    async def open_user_file(self, info: dict[str, Any], real: str, rel: str,
                             offset: int = 0, head: int = 0) -> UserFile:
        """Open a regular file as the space's user and learn its size; the caller closes it.

        The stream is ``head`` bytes from the start, then everything from ``offset``."""
        running = await self.execs.open_internal(info, ExecRequest(
            argv=["sh", "-c", USER_READ_SCRIPT, "sh", real, str(offset), str(head)],
            env=self.env, workdir=WORKSPACE, timeout=0))
        opened = UserFile(self.execs, running, rel)
        try:
            await opened.start()
        except BaseException:
            await asyncio.shield(opened.close())  # a client that gave up ends the process too
            raise
        return opened

    async def open_file(self, name: str, raw_path: str | None,
                        actor: Actor) -> tuple[Resolved, UserFile]:
        """Resolve and open a regular file of a space, as its user."""
        info, where = await self._resolved(name, raw_path, actor)
        if where.stat is None:
            raise NotFound(f"{where.rel}: no such file")
        if mode_type(where.stat["mode"]) != "file":
            raise BadRequest(f"{where.rel} is not a regular file", "not_a_file")
        return where, await self.open_user_file(info, where.real, where.rel)

    @while_busy
    async def read(self, name: str, raw_path: str | None, max_bytes: int,
                   actor: Actor) -> dict[str, Any]:
        where, opened = await self.open_file(name, raw_path, actor)
        try:
            data = await opened.read_exactly(min(max_bytes, opened.size))
        finally:
            await opened.close()
        if len(data) < min(max_bytes, opened.size):
            raise Conflict(f"{where.rel} changed while being read; read it again",
                           "file_changed")
        return {"path": where.rel, "contentBase64": base64.b64encode(data).decode("ascii"),
                "truncated": opened.size > len(data), "size": opened.size}

    async def open_stream(self, name: str, raw_path: str | None, max_bytes: int | None,
                          actor: Actor) -> FileStream:
        """A regular file of a space, open for streaming out (at most ``max_bytes``)."""
        with self.spaces.activity.busy(name):
            where, opened = await self.open_file(name, raw_path, actor)
        length = opened.size if max_bytes is None else min(opened.size, max_bytes)
        return FileStream(self.spaces.activity, name, where.rel, opened, length)

    # -- write ----------------------------------------------------------------------------

    @while_busy
    async def write(self, name: str, raw_path: str | None, size: int | None,
                    chunks: Iterator[bytes], actor: Actor, mode: int = 0o644) -> dict[str, Any]:
        """Write a file atomically, as the space's user: stream into a temporary name beside
        it, check its length, then rename it into place. A body of unknown size (chunked,
        or encoded) is counted as it passes, and installed by a second exec once it has
        arrived whole."""
        info, where = await self._resolved(name, raw_path, actor)
        if where.rel == "/":
            raise BadRequest(f"path must name a file inside {self.root}", "invalid_path")
        if where.stat is not None and mode_type(where.stat["mode"]) != "file":
            raise Conflict(f"{where.rel} exists and is not a regular file", "not_a_file")
        missing = list(where.missing) if where.stat is None else [where.real.rpartition("/")[2]]
        parent = where.parent if where.stat is None else where.real.rpartition("/")[0]
        directory = "/".join([parent, *missing[:-1]])
        final = missing[-1]
        temp = f"{TEMP_MARK}{os.urandom(6).hex()}"  # short: any legal name fits beside it
        counted = [0]

        def counting(pieces: Iterator[bytes]) -> Iterator[bytes]:
            for piece in pieces:
                counted[0] += len(piece)
                yield piece

        async with self.spaces.audit.action("space.file.write", name,
                                            {"path": where.rel, "bytes": size}, actor):
            def step(how: str, known: int | None) -> ExecRequest:
                return ExecRequest(argv=["sh", "-c", USER_WRITE_SCRIPT, "sh", directory, final,
                                         temp, f"{mode:o}", "-" if known is None else str(
                                             known), how], env=self.env, workdir=WORKSPACE,
                                   timeout=self.spaces.config.exec_max_timeout)

            try:
                result = await self.execs.run_internal(info, step("write", size), 65536,
                                                       stdin=counting(chunks))
            except BaseException:
                if size is None:  # what arrived of it stays nowhere
                    with contextlib.suppress(EngineError, ClawdError):
                        await self.execs.run_internal(info, step("discard", None), 4096)
                raise
            if size is None and result["exitCode"] == 0:
                size = counted[0]
                result = await self.execs.run_internal(info, step("install", size), 65536)
            if result["exitCode"] == NOT_REGULAR:
                raise Conflict(f"{where.rel} exists and is not a regular file", "not_a_file")
            if result["exitCode"] != 0:
                raise user_file_error(where.rel, result["exitCode"], result["stderr"])
        return {"message": "OK", "path": where.rel, "bytes": counted[0]}

    # -- delete ---------------------------------------------------------------------------

    @while_busy
    async def delete(self, name: str, raw_path: str | None, recursive: bool,
                     actor: Actor) -> dict[str, Any]:
        info, where = await self._resolved(name, raw_path, actor, follow_last=False)
        if where.rel == "/":
            raise BadRequest(f"{self.root} itself cannot be deleted", "invalid_path")
        if where.stat is None:
            raise NotFound(f"{where.rel}: no such file or directory")
        is_dir = mode_type(where.stat["mode"]) == "dir"
        parent, _, base = where.real.rpartition("/")
        argv = ["sh", "-c", USER_DELETE_SCRIPT, "sh", parent or "/", base,
                ("tree" if recursive else "dir") if is_dir else "file"]
        async with self.spaces.audit.action("space.file.delete", name,
                                            {"path": where.rel, "recursive": recursive}, actor):
            result = await self.execs.run_internal(info, ExecRequest(
                argv=argv, env=self.env, workdir=WORKSPACE, timeout=300), 65536)
            if result["exitCode"] == NOT_WORKSPACE:
                raise user_file_error(where.rel, NOT_WORKSPACE, result["stderr"])
            if result["exitCode"] != 0:
                detail = result["stderr"].strip() or "failed"
                if is_dir and not recursive:
                    raise Conflict(f"{where.rel} is a directory that is not empty; pass "
                                   "recursive=true", "dir_not_empty")
                raise Conflict(f"{where.rel} could not be deleted: {detail}", "delete_failed")
        return {"message": "OK", "path": where.rel}


###############################################################################
# Git in a space: create with a clone, server-side push #######################
###############################################################################

class GitOps:
    """Clone into a space at create time and push from it, with the token kept out of the
    space's config, its files, every argv, the answers and the audit log."""

    def __init__(self, config: Config, spaces: Spaces, execs: Execs, files: Files) -> None:
        self.config = config
        self.spaces = spaces
        self.execs = execs
        self.files = files

    async def create(self, req: CreateRequest, actor: Actor) -> SpaceInfo:
        """Create a space and provision it (its env file, its clone) before it counts."""

        async def provision(info: dict[str, Any]) -> None:
            if req.env_file is not None:
                path, content = req.env_file
                await self.files.write(req.name, path, len(content), iter([content]), actor,
                                       mode=0o600)
            if req.repo is not None:
                token = req.git_token
                if token is None and req.repo.netloc == "github.com":
                    token = await node_github_token(self.config)
                result = await self.clone(info, req.repo, req.repo_branch, req.repo_dest, token)
                if result["exitCode"] != 0:
                    detail = (result["stderr"] or result["stdout"]).strip() or "unknown error"
                    raise BadRequest(f"Repo clone failed: {detail[-2000:]}", "clone_failed")

        needs_provision = req.env_file is not None or req.repo is not None
        return await self.spaces.create(req, actor, provision if needs_provision else None)

    async def clone(self, info: dict[str, Any], repo: RepoUrl, branch: str | None, dest: str,
                    token: str | None) -> ExecResult:
        options, env = git_auth(repo, token, self.config)
        argv = ["git", *options, "clone", "--no-recurse-submodules"]
        if branch:
            argv += ["--branch", branch]
        argv += ["--", repo.url, f"{WORKSPACE}/{dest}"]
        result = await self.execs.run_internal(info, ExecRequest(
            argv=argv, env=env, workdir=WORKSPACE, timeout=self.config.git_timeout), 1 << 20)
        return self._redacted(result, token)

    def _redacted(self, result: ExecResult, token: str | None) -> ExecResult:
        redactor = Redactor([token or "", self.config.api_key or ""])
        clean = result.copy()
        clean["stdout"] = redactor.text(result["stdout"])
        clean["stderr"] = redactor.text(result["stderr"])
        return clean

    async def push(self, name: str, body: dict[str, Any], actor: Actor) -> ExecResult:
        check_fields(body, {"repoPath", "remote", "branch", "token"})
        remote = check_remote(body.get("remote", "origin"))
        branch = check_ref(body.get("branch", "main"), "branch")
        token = body.get("token")
        if token is not None and (not isinstance(token, str) or not token.strip()
                                  or len(token) > 4096 or "\n" in token):
            raise BadRequest("token must be a non-empty string", "invalid_token")
        repo_path = body.get("repoPath", "/repo")
        if not isinstance(repo_path, str):
            raise BadRequest("repoPath must be a path inside /workspace", "invalid_repo_path")
        if repo_path.startswith(WORKSPACE + "/"):
            repo_path = repo_path[len(WORKSPACE):]
        info = await self.spaces.running(name, actor)
        self.spaces.activity.touch(name)
        where = await self.files.resolve(info["Id"], repo_path)
        if where.stat is None or not where.stat["mode"] & MODE_DIR:
            raise BadRequest(f"repoPath {where.rel} is not a directory", "invalid_repo_path")
        # The URL is read as data (git config --get runs nothing) and then validated here.
        lookup = await self.execs.run_internal(info, ExecRequest(
            argv=["git", "-C", where.real, "config", "--get", f"remote.{remote}.url"],
            env=GIT_CLEAN_ENV, workdir=WORKSPACE, timeout=30), 65536)
        if lookup["exitCode"] != 0 or not lookup["stdout"].strip():
            raise BadRequest(f"remote {remote!r} is not configured in {where.rel}",
                             "invalid_remote")
        repo = check_repo_url(lookup["stdout"].strip(), self.config)
        if token is None and repo.netloc == "github.com":
            token = await node_github_token(self.config)
        options, env = git_auth(repo, token, self.config)
        refspec = f"refs/heads/{branch}:refs/heads/{branch}"
        argv = ["sh", "-c", GIT_PUSH_SCRIPT, "sh", where.real, *options,
                "-c", "core.hooksPath=/dev/null", "push", "--", repo.url, refspec]
        await self.spaces.audit.record("space.git.push.start", name, {
            "repoPath": where.rel, "remote": remote, "branch": branch}, actor)
        with self.spaces.activity.busy(name):
            # As the container's root, not the space user: code running in the space cannot
            # read this process's environment (the token) through /proc.
            result = await self.execs.run_internal(info, ExecRequest(
                argv=argv, env=env, workdir=WORKSPACE, timeout=self.config.git_timeout),
                1 << 20, user="0")
        result = self._redacted(result, token)
        await self.spaces.audit.record("space.git.push", name, {
            "repoPath": where.rel, "remote": remote, "branch": branch,
            "exitCode": result["exitCode"]}, actor)
        return result


###############################################################################
# Terminal ####################################################################
###############################################################################

TERMINAL_QUEUE_CHUNKS = 16  # x 64 KiB: the most output held per terminal for a slow client
TERMINAL_MAX_FRAME = 1 << 20
TERMINAL_MAX_COLS, TERMINAL_MAX_ROWS = 500, 200


class TerminalSession:
    """One open terminal: a TTY exec of the space's shell, its output read by a thread of its
    own into a bounded queue, so a client that stops reading stalls the shell (the kernel and
    the engine hold a little), never the service's memory. The space is in use while open."""

    def __init__(self, execs: Execs, name: str, running: RunningExec, actor: Actor) -> None:
        self.execs = execs
        self.name = name
        self.running = running
        self.actor = actor
        self.opened = time.monotonic()
        self.shutting_down = False  # ended by the service's shutdown, not the shell
        self.closed = False
        self.printed = 0
        self.busy = contextlib.ExitStack()
        self.busy.enter_context(execs.activity.busy(name))
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(TERMINAL_QUEUE_CHUNKS)
        self.reader = asyncio.get_running_loop().run_in_executor(
            execs.engine.streams, self._read_shell, asyncio.get_running_loop())

    def _read_shell(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while True:
                try:
                    data = self.running.sock.recv(65536)
                except OSError:
                    data = b""
                asyncio.run_coroutine_threadsafe(self.queue.put(data or None), loop).result()
                if not data:
                    return
        except (RuntimeError, concurrent.futures.CancelledError):
            return  # the loop is gone (shutdown)

    async def output(self) -> AsyncIterator[bytes]:
        """What the shell prints, until it exits (or the service shuts down)."""
        while not self.shutting_down and (data := await self.queue.get()) is not None:
            self.execs.activity.touch(self.name)
            self.printed += len(data)
            yield data

    def touch(self) -> None:
        self.execs.activity.touch(self.name)

    async def send(self, data: bytes) -> None:
        """Type ``data`` into the shell."""
        self.touch()
        with contextlib.suppress(OSError):
            await self.execs.engine.stream(lambda: self.running.sock.sendall(data))

    async def resize(self, rows: int, cols: int) -> None:
        rows, cols = min(max(rows, 1), TERMINAL_MAX_ROWS), min(max(cols, 1), TERMINAL_MAX_COLS)
        with contextlib.suppress(EngineError, ClawdError):
            await self.execs.engine.exec_resize(self.running.exec_id, rows, cols)
            if self.running.process is not None:
                self.running.process.pty = {"cols": cols, "rows": rows}

    async def close(self) -> None:
        """End the shell if it still runs (a dropped ssh session's hangup: SIGHUP, which bash
        passes on to its jobs, nohup'd ones live on; then SIGKILL for what is left of its
        group), release the engine connection and the space, and audit the close. Once only;
        what cannot be ended is logged, and the space is released all the same."""
        if self.closed:
            return
        self.closed = True
        try:
            if not self.reader.done():
                await self.execs.kill_exec(self.running.container_id, self.running.exec_id,
                                           signal.SIGHUP)
                self.running.sock.shutdown(socket.SHUT_WR)
                await asyncio.sleep(0.3)
                await self.execs.kill_exec(self.running.container_id, self.running.exec_id)
        except (EngineError, ClawdError) as err:
            log.error("terminal of %s: its shell could not be ended: %s", self.name, err)
        finally:
            await self._release()
        exit_code: int | None = None
        with contextlib.suppress(EngineError, ClawdError):
            exit_code = (await self.execs.exec_state(self.running.exec_id))[1]
        self.execs.finish(self.running.process, exit_code, counted={1: self.printed})
        await self.execs.audit.record("terminal.close", self.name, {
            "durationMs": int((time.monotonic() - self.opened) * 1000), "exitCode": exit_code},
            self.actor)

    async def _release(self) -> None:
        """Close the engine connection (which ends the reader) and stop counting as use."""
        self.running.sock.shutdown(socket.SHUT_RDWR)
        for _ in range(1000):  # unblock the reader if it waits on a full queue
            if self.reader.done():
                break
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            await asyncio.sleep(0.01)
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)  # the output's reader, if any, hears the end
        self.running.sock.close()
        self.busy.close()

    def stop(self) -> None:
        """The service is shutting down: end the output, so the client hears why (the
        caller then closes the session, which hangs up the shell)."""
        self.shutting_down = True
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)


class Terminals:
    """Terminals of spaces: ``bash -l`` (or ``sh -l`` where the image has no bash) on a TTY,
    started through the one exec entry point."""

    def __init__(self, spaces: Spaces, execs: Execs) -> None:
        self.spaces = spaces
        self.execs = execs
        self.sessions: set[TerminalSession] = set()
        self.shells: dict[str, list[str]] = {}

    async def shell(self, info: dict[str, Any]) -> list[str]:
        """``bash -l`` where the image has bash, else ``sh -l``."""
        if info["Id"] not in self.shells:
            probe = await self.execs.run_internal(info, ExecRequest(
                argv=["bash", "-c", "exit 0"], env={}, workdir=WORKSPACE, timeout=10), 1024)
            self.shells[info["Id"]] = ["bash", "-l"] if probe["exitCode"] == 0 else ["sh", "-l"]
        return self.shells[info["Id"]]

    async def open(self, name: str, rows: int, cols: int, actor: Actor) -> TerminalSession:
        """Start a terminal in a running space (a paused one is resumed); the caller closes it."""
        info = await self.spaces.running(name, actor)
        req = exec_request(self.spaces.config, await self.shell(info),
                           {"TERM": "xterm-256color"}, WORKSPACE, tty=True, source="terminal")
        session = TerminalSession(self.execs, name, await self.execs.start_exec(
            name, req, actor), actor)
        self.sessions.add(session)
        try:
            await session.resize(rows, cols)
        except BaseException:
            await asyncio.shield(self.close(session))
            raise
        return session

    async def close(self, session: TerminalSession) -> None:
        self.sessions.discard(session)
        await session.close()

    async def shutdown(self) -> None:
        """Tell every open terminal the service is going, and give them a moment to hang up
        their shells and audit their close while the audit log is still open."""
        for session in list(self.sessions):
            session.stop()
        for _ in range(200):
            if not self.sessions:
                return
            await asyncio.sleep(0.05)
        log.warning("%d terminals were still closing at shutdown", len(self.sessions))


###############################################################################
# Housekeeping: auto-sleep, shell history #####################################
###############################################################################

HISTORY_FILE = f"{WORKSPACE}/.bash_history"
# The budget of history ingestion, per tick: what one space may add to the audit trail, and
# what all spaces together may. What a space writes beyond its share is skipped (one summary
# event says how much); spaces over the node's share wait for the next tick, in turn.
HISTORY_READ_LIMIT = 64 << 10  # bytes read per space
HISTORY_LINES_PER_SPACE = 256  # commands recorded per space
HISTORY_NODE_BYTES = 1 << 20
HISTORY_NODE_LINES = 2048
HISTORY_SPACES_PER_TICK = 64


HISTORY_STAMP_RE = re.compile(r"#\d{9,12}")
# Terminal control characters (ESC sequences, bells, backspaces, C1) never reach the audit.
CONTROL_CHARS_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def parse_history(text: str) -> list[tuple[float | None, str]]:
    """Commands of a bash history chunk: ``#<epoch>`` lines stamp the command that follows.

    Control characters are removed, so a history line cannot drive a log viewer's terminal.
    """
    commands: list[tuple[float | None, str]] = []
    stamp: float | None = None
    lines: list[str] = []

    def flush() -> None:
        if lines:
            commands.append((stamp, "\n".join(lines)))
            lines.clear()

    for raw_line in text.split("\n"):
        line = CONTROL_CHARS_RE.sub("", raw_line)
        if HISTORY_STAMP_RE.fullmatch(line):
            flush()
            stamp = float(line[1:])
            continue
        if not line.strip():
            continue
        if stamp is None:
            commands.append((None, line))  # no timestamps: one line, one command
        else:
            lines.append(line)
    flush()
    return commands


class Housekeeper:
    """Background work of the node: auto-sleep of idle spaces, shell history ingestion, the
    firewall's check and saving activity times, each a supervised loop of its own.

    Neither counts as activity nor wakes a paused space. History read positions live in a
    small JSON file in the data directory, so a restart never emits a history line twice.
    """

    def __init__(self, config: Config, spaces: Spaces, files: Files) -> None:
        self.config = config
        self.spaces = spaces
        self.activity = spaces.activity
        self.files = files
        self.cursor_path = os.path.join(config.data_dir, "history-cursors.json")
        self.cursors: dict[str, dict[str, Any]] = {}
        self.history_turn = 0  # where the next tick's round of the spaces starts
        self.tasks = Tasks()
        self.job_lock = asyncio.Lock()

    async def startup(self) -> None:
        """Load what the last run saved and start the loops."""
        self.activity.load()
        cursors = read_json_file(self.cursor_path)
        if isinstance(cursors, dict):
            self.cursors = {str(k): v for k, v in cursors.items() if isinstance(v, dict)}
        # One job at a time (auto-sleep never pauses a space under a history read), each
        # looked up at its round, so a test can replace one.
        self.tasks.spawn("auto-sleep", lambda: self.one_at_a_time(self.sleep_idle),
                         every=min(30.0, max(0.5, (self.config.idle_timeout or 120) / 4)))
        if self.config.history_interval > 0:
            self.tasks.spawn("shell history", lambda: self.one_at_a_time(self.ingest_history),
                             every=float(self.config.history_interval))
        self.tasks.spawn("firewall check", lambda: self.one_at_a_time(
            self.spaces.firewall.check), every=60.0, delay=60.0)
        self.tasks.spawn("saving activity", self.activity.save, every=2.0)

    async def one_at_a_time(self, job: Callable[[], Awaitable[Any]]) -> None:
        async with self.job_lock:
            await job()

    async def shutdown(self) -> None:
        await self.tasks.close()
        try:
            await self.activity.save()
        except OSError as err:
            log.error("activity times could not be saved: %s", err)

    # -- auto-sleep -----------------------------------------------------------------------

    async def sleep_idle(self) -> None:
        now = self.activity.clock()
        for space in await self.spaces.list_all():
            name = space["name"]
            if space["status"] != "running" or self.activity.is_busy(name):
                continue
            if self.activity.first_sight(name):  # e.g. after an upgrade: its idle clock starts
                continue
            last = self.activity.last(name) or now
            timeout = space["idleTimeout"]
            if timeout is None:
                timeout = self.config.idle_timeout
            if timeout > 0 and now - last >= timeout:
                try:
                    await self.spaces.pause(name, SYSTEM_ACTOR, reason="idle")
                    log.info("paused %s after %.0f s idle", name, now - last)
                except ClawdError as err:
                    log.warning("auto-sleep could not pause %s: %s", name, err.message)

    # -- shell history --------------------------------------------------------------------

    async def ingest_history(self) -> None:
        """One tick: the running spaces in turn, from where the last tick stopped, until the
        node's budget is spent."""
        spaces = [s for s in await self.spaces.list_all() if s["status"] == "running"]
        start = self.history_turn % len(spaces) if spaces else 0
        budget = {"bytes": HISTORY_NODE_BYTES, "lines": HISTORY_NODE_LINES}
        done = 0
        for space in (spaces[start:] + spaces[:start])[:HISTORY_SPACES_PER_TICK]:
            if budget["bytes"] <= 0 or budget["lines"] <= 0:
                break
            try:
                await self._ingest_one(space, budget)
            except (ClawdError, EngineError) as err:
                log.warning("history of %s: %s", space["name"], err)
            except Exception:  # noqa: BLE001 - one space's history must not stop the others'
                log.exception("history of %s failed", space["name"])
            done += 1
        self.history_turn = start + done
        if spaces:
            await asyncio.get_running_loop().run_in_executor(
                None, write_json_atomic, self.cursor_path, self.cursors)

    async def _ingest_one(self, space: SpaceInfo, budget: dict[str, int]) -> None:
        name = space["name"]
        stat = await self.files.stat(space["id"], HISTORY_FILE)
        if stat is None or mode_type(stat["mode"]) != "file":
            return  # absent, or a symlink/FIFO planted to make us read something else
        cursor = self.cursors.get(name) or {}
        offset = int(cursor.get("offset", 0))
        size = int(stat["size"])
        if size == offset and cursor.get("mtime") == stat["mtime"]:
            return
        first, chunk = await self.read_history(space, offset)
        head_len = int(cursor.get("headLen", 0))
        if size < offset or hashlib.sha256(first[:head_len]).hexdigest() != cursor.get(
                "head", hashlib.sha256(b"").hexdigest()):
            offset = 0  # truncated or replaced: start again from the top
            first, chunk = await self.read_history(space, 0)
        if cursor.get("resync") and offset:
            # The last tick skipped ahead to the middle of a line: start at the next one.
            cut = chunk.find(b"\n")
            if cut < 0 and len(chunk) < HISTORY_READ_LIMIT:
                return
            cut = cut if cut >= 0 else len(chunk) - 1
            offset, chunk = offset + cut + 1, chunk[cut + 1:]
            await self.spaces.audit.record("space.shell.skipped", name, {
                "commands": 0, "bytes": cut + 1, "reason": "the rest of a skipped line"})
        full = len(chunk) >= HISTORY_READ_LIMIT  # more may follow than one read takes
        end = chunk.rfind(b"\n")
        if end < 0 and not full:
            return  # the last line is still being written
        complete = chunk[:end + 1] if end >= 0 else chunk
        lines = complete.split(b"\n")
        if end >= 0 and HISTORY_STAMP_RE.fullmatch(lines[-2].decode("ascii", "replace")):
            if full:
                complete = chunk  # the stamped command is longer than a read: take its start
            elif len(lines) < 3:
                return  # a timestamp waits for its command, so the command keeps its time
            else:
                complete = b"\n".join(lines[:-2]) + b"\n"
        truncated = full and not complete.endswith(b"\n")
        commands = parse_history(complete.decode("utf-8", "replace"))
        allowed = min(HISTORY_LINES_PER_SPACE, budget["lines"])
        for index, (stamp, command) in enumerate(commands[:allowed]):
            meta: dict[str, Any] = {"command": command, "source": "bash_history"}
            if truncated and index == len(commands) - 1:
                meta["truncated"] = True  # a line longer than one read: its start only
            # The space writes its own stamps: one from the future (which would sort ahead
            # of every real event) is recorded at the time of reading, with the claim kept.
            if stamp is not None and stamp > self.activity.clock() + 60:
                meta["claimedTime"] = str(int(stamp))[:20]
                stamp = None
            await self.spaces.audit.record("space.shell", name, meta,
                                           ts=epoch_to_iso(stamp) if stamp else None)
        budget["lines"] -= min(allowed, len(commands))
        budget["bytes"] -= len(complete)
        new_offset = offset + len(complete)
        # A backlog of more than one more read is skipped, to the last read's worth of the
        # file: ingestion never falls behind a space that writes faster than its budget, and
        # the newest commands are the ones kept.
        skipped_bytes = max(0, size - HISTORY_READ_LIMIT - new_offset)
        skipped_lines = max(0, len(commands) - allowed)
        if skipped_bytes or skipped_lines:
            new_offset += skipped_bytes
            await self.spaces.audit.record("space.shell.skipped", name, {
                "commands": skipped_lines, "bytes": skipped_bytes,
                "reason": "over the history budget of a space"})
        head_len = min(64, new_offset)
        self.cursors[name] = {"offset": new_offset, "mtime": stat["mtime"], "headLen": head_len,
                              "head": hashlib.sha256(first[:head_len]).hexdigest(),
                              "resync": bool(skipped_bytes)}

    async def read_history(self, space: SpaceInfo, offset: int) -> tuple[bytes, bytes]:
        """(the file's first 64 bytes, up to HISTORY_READ_LIMIT bytes from offset), read as the
        space's user, so a history swapped for a link reads nothing the user could not."""
        info = await self.spaces.inspect(space["name"])
        opened = await self.files.open_user_file(info, HISTORY_FILE, "/.bash_history",
                                                 offset, 64)
        try:
            first = await opened.read_exactly(min(64, opened.size))
            data = await opened.read_exactly(HISTORY_READ_LIMIT)
        finally:
            await opened.close()
        return first, data


###############################################################################
# Nodes: discovery and the cluster view #######################################
###############################################################################

NODE_PROBE_TIMEOUT = 3.0
NODE_ANSWER_LIMIT = 4 << 20  # bytes read from a peer's JSON answer


class NodeInfo(TypedDict, total=False):
    name: str
    url: str
    status: str
    latencyMs: int | None
    capabilities: dict[str, Any] | None
    self: bool
    error: str


def tailscale_targets(status: dict[str, Any], port: int, tag: str | None
                      ) -> tuple[dict[str, str] | None, list[tuple[str, str]]]:
    """(self as {name, url}, online peers as (name, url)) from ``tailscale status --json``.

    The URL uses the MagicDNS name when there is one (it survives IP changes), else the
    first Tailscale IPv4 address.
    """

    def entry(node: dict[str, Any]) -> tuple[str, str] | None:
        dns = str(node.get("DNSName") or "").rstrip(".")
        listed = node.get("TailscaleIPs")
        ips = [ip for ip in (listed if isinstance(listed, list) else []) if ":" not in str(ip)]
        host = dns or (str(ips[0]) if ips else "")
        name = str(node.get("HostName") or dns.split(".")[0] or host)
        if not host or not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
            return None
        return re.sub(r"[^A-Za-z0-9._-]", "-", name)[:63], f"http://{host}:{port}"

    if not isinstance(status, dict):
        return None, []
    own = status.get("Self")
    me = entry(own) if isinstance(own, dict) else None
    peer_map = status.get("Peer")
    peers = []
    for peer in (peer_map.values() if isinstance(peer_map, dict) else []):
        if not isinstance(peer, dict) or not peer.get("Online"):
            continue
        if tag and tag not in (peer.get("Tags") or []):
            continue
        found = entry(peer)
        if found:
            peers.append(found)
    return ({"name": me[0], "url": me[1]} if me else None), peers


class Nodes:
    """The nodes of the cluster, refreshed in the background and answered from a cache.

    A peer is first asked ``/api/health`` without a key; only one that answers as clawdspace
    is then asked for capabilities with the key, so the key never reaches a laptop or phone
    that happens to be on the tailnet.
    """

    def __init__(self, config: Config, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.nodes: list[NodeInfo] = []
        self.updated_ms = 0
        self.lock = asyncio.Lock()
        self.session: aiohttp.ClientSession | None = None  # from startup to shutdown
        self.tasks = Tasks()

    async def startup(self) -> None:
        """Open the client session peers are asked through, and start discovery."""
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=NODE_PROBE_TIMEOUT),
            trust_env=False)
        self.tasks.spawn("node discovery", self.refresh, every=float(self.config.nodes_refresh))

    async def shutdown(self) -> None:
        await self.tasks.close()
        if self.session is not None:
            await self.session.close()

    def client(self) -> aiohttp.ClientSession:
        if self.session is None:
            raise Unavailable("the node is not started", "not_started")
        return self.session

    def self_name(self) -> str:
        return self.config.node_name or socket.gethostname()

    async def targets(self) -> tuple[dict[str, str], list[tuple[str, str]]]:
        me = {"name": self.self_name(),
              "url": self.config.public_url or f"http://{socket.gethostname()}:{self.config.port}"}
        if self.config.nodes:
            peers = [(n, u) for n, u in parse_nodes_setting(self.config.nodes)
                     if n != me["name"] and u != me["url"]]
            return me, peers
        code, out, err = await run_command([self.config.tailscale, "status", "--json"], 5)
        if code != 0:
            if code != 127:
                log.warning("tailscale status failed (%d): %s", code, err.strip()[:200])
            return me, []
        try:
            status = json.loads(out)
        except ValueError:
            log.warning("tailscale status printed no JSON")
            return me, []
        ts_self, peers = tailscale_targets(status, self.config.port, self.config.tailscale_tag)
        if ts_self and not self.config.node_name:
            me["name"] = ts_self["name"]
        if ts_self and not self.config.public_url:
            me["url"] = ts_self["url"]
        return me, [(n, u) for n, u in peers if u != me["url"]]

    async def get_json(self, url: str, key: str | None) -> tuple[int, Any]:
        """(status, parsed JSON or None) of a GET to a peer (size-capped)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with self.client().get(url, headers=headers, allow_redirects=False) as response:
            body = bytearray()
            async for chunk in response.content.iter_chunked(65536):
                body += chunk
                if len(body) > NODE_ANSWER_LIMIT:
                    raise ValueError(f"{url}: answer larger than {NODE_ANSWER_LIMIT} bytes")
            try:
                return response.status, json.loads(body)
            except ValueError:
                return response.status, None

    async def probe(self, name: str, url: str) -> NodeInfo:
        started = time.monotonic()
        node: NodeInfo = {"name": name, "url": url, "status": "offline", "latencyMs": None,
                          "capabilities": None, "self": False}
        try:
            status, health = await asyncio.wait_for(self.get_json(f"{url}/api/health", None),
                                                    NODE_PROBE_TIMEOUT)
            node["latencyMs"] = int((time.monotonic() - started) * 1000)
            if not (isinstance(health, dict) and "version" in health and "status" in health):
                node["status"], node["error"] = "unknown", "not a clawdspace node"
                return node
            node["status"] = "online" if status == 200 else "degraded"
            status, caps = await asyncio.wait_for(
                self.get_json(f"{url}/api/system/capabilities", self.config.api_key),
                NODE_PROBE_TIMEOUT)
            if status == 200 and isinstance(caps, dict):
                node["capabilities"] = caps
            else:
                node["error"] = f"capabilities: HTTP {status}"
        except (asyncio.TimeoutError, OSError, ValueError) as err:
            node["error"] = str(err) or type(err).__name__
        except Exception as err:  # noqa: BLE001 - any client failure means "offline"
            node["error"] = f"{type(err).__name__}: {err}"
        return node

    async def refresh(self) -> None:
        """One refresh at a time; a caller that finds one running waits for it."""
        if self.lock.locked():
            async with self.lock:
                return
        async with self.lock:
            me, peers = await self.targets()
            limit = asyncio.Semaphore(16)

            async def bounded(name: str, url: str) -> NodeInfo:
                async with limit:
                    return await self.probe(name, url)

            found = await asyncio.gather(*(bounded(n, u) for n, u in peers))
            local: NodeInfo = {"name": me["name"], "url": me["url"], "status": "online",
                               "latencyMs": 0, "self": True,
                               "capabilities": await capabilities(self.config, self.engine)}
            self.nodes = [local, *sorted(found, key=lambda n: n["name"])]
            self.updated_ms = int(time.time() * 1000)

    async def recheck(self, node: NodeInfo) -> NodeInfo:
        """Probe one node now and update the cache with what it says."""
        fresh = await self.probe(node["name"], node["url"])
        self.nodes = [fresh if n["name"] == node["name"] else n for n in self.nodes]
        return fresh

    def find(self, name: str) -> NodeInfo:
        for node in self.nodes:
            if node["name"] == name:
                return node
        raise NotFound(f"unknown node {name!r} (see GET /api/nodes)", "unknown_node")

    def with_gpu(self) -> list[str]:
        return [n["name"] for n in self.nodes
                if not n.get("self") and (n.get("capabilities") or {}).get("gpu")]

    async def cluster_spaces(self, local: list[SpaceInfo]) -> dict[str, Any]:
        """Spaces of every online node, each marked with its node; failures listed apart."""
        me = self.self_name()
        spaces: list[dict[str, Any]] = [{**s, "node": me} for s in local]
        errors: list[dict[str, str]] = []
        peers = [n for n in self.nodes if not n.get("self") and n["status"] == "online"]

        async def fetch(node: NodeInfo) -> None:
            try:
                status, body = await asyncio.wait_for(
                    self.get_json(f"{node['url']}/api/spaces", self.config.api_key), 10)
                if status != 200 or not isinstance(body, dict):
                    raise ValueError(f"HTTP {status}")
                spaces.extend({**s, "node": node["name"]} for s in body.get("spaces", [])
                              if isinstance(s, dict))
            except Exception as err:  # noqa: BLE001 - one node down must not sink the view
                errors.append({"node": node["name"], "error": str(err) or type(err).__name__})

        await asyncio.gather(*(fetch(n) for n in peers))
        spaces.sort(key=lambda s: (str(s.get("node")), str(s.get("name"))))
        return {"spaces": spaces, "errors": errors}


###############################################################################
# E2B compatibility: sandboxes, their daemon, template builds #################
###############################################################################

# The daemon version sandboxes report: E2B's SDK enables features by the version it reads
# here, and 0.5.7 has every feature this node serves.
E2B_ENVD_VERSION = "0.5.7"
E2B_DEFAULT_TIMEOUT = 300
# E2B's base template's world: sandboxes run as `user`, whose home is the persistent volume
# (mounted at /workspace too, so the /api files and everything of the service see it there).
E2B_USER = "user"
E2B_HOME = "/home/user"
E2B_VOLUME_ROOTS = ("/", WORKSPACE, E2B_HOME)  # never removed or moved through envd
E2B_LIST_LIMIT = 10000  # entries of one ListDir, at any depth
WATCH_EVENTS = 10000  # events a watcher holds for its next GetWatcherEvents (oldest go)
WATCHERS_PER_SANDBOX = 32
WATCH_IDLE = 600.0  # seconds a watcher lives without being asked for its events
WATCH_INTERVAL = 0.5  # seconds between looks
WATCH_LIFETIME = 3600  # seconds one run of WATCH_SCRIPT lasts (then it is started again)
WATCH_READY = 30.0  # seconds a new run may take to say READY (a big recursive tree)
# A directory watched as the space's user, printing its events as "TYPE<TAB>name" lines:
# - with inotifywait in the image, from inotify (a rename is RENAME of the old name and CREATE
#   of the new, as envd's fsnotify reports it);
# - else by polling, in any image with GNU find: every WATCH_INTERVAL, a sorted listing (path,
#   type, mtime, size, mode) is joined with the last one (kept in the space, so a run that
#   follows another misses nothing) and the differences are printed (a rename shows as REMOVE
#   and CREATE; changes within one look merge).
# "READY" comes once the directory is being watched ("NOTE" lines before it say why not). A
# run ends after WATCH_LIFETIME seconds, so one left behind by a service that died stops by
# itself; the service starts the next.
WATCH_SCRIPT = INSIDE_ROOT + r"""
cd -P -- "$1" || exit 101
inside "$(pwd -P)" || exit 102
recursive=$2
state=$3
tab=$(printf '\t')
if command -v inotifywait >/dev/null 2>&1; then
    [ "$recursive" = 1 ] && r=-r || r=
    # A shell loop, not awk: mawk reads a pipe in blocks, so events would wait for 4 KiB more.
    timeout --foreground "$5" inotifywait -m $r --format "%e$tab%w%f" -e create -e modify \
        -e delete -e moved_from -e moved_to -e attrib . 2>&1 |
    while IFS="$tab" read -r event name; do
        case $event in "Watches established"*) echo READY; continue ;; esac
        [ -n "$name" ] || { printf 'NOTE\t%s\n' "$event"; continue; }
        case ${event%%,*} in
            CREATE|MOVED_TO) kind=CREATE ;;
            MODIFY) kind=WRITE ;;
            DELETE) kind=REMOVE ;;
            MOVED_FROM) kind=RENAME ;;
            ATTRIB) kind=CHMOD ;;
            *) continue ;;
        esac
        printf 'EVENT_TYPE_%s\t%s\n' "$kind" "${name#./}"
    done
    exit 0
fi
find . -maxdepth 0 -printf '' 2>/dev/null || { echo "no GNU find here" >&2; exit 125; }
(umask 077 && mkdir -p -- "${state%/*}") || exit 101
snap() {
    if [ "$recursive" = 1 ]; then find . -mindepth 1 -printf '%p\t%y %T@ %s %m\n'
    else find . -mindepth 1 -maxdepth 1 -printf '%p\t%y %T@ %s %m\n'; fi | LC_ALL=C sort
}
[ -f "$state" ] || snap >"$state"
echo READY
end=$(( $(date +%s) + $5 ))
while [ "$(date +%s)" -lt "$end" ]; do
    sleep "$4"
    snap >"$state.new"
    LC_ALL=C join -t "$tab" -a 1 -a 2 -e - -o 0,1.2,2.2 "$state" "$state.new" | awk -F "$tab" '
        $2 == $3 { next }
        { name = substr($1, 3) }
        $2 == "-" { print "EVENT_TYPE_CREATE\t" name; next }
        $3 == "-" { print "EVENT_TYPE_REMOVE\t" name; next }
        { split($2, a, " "); split($3, b, " ")
          if (a[1] == b[1] && a[2] == b[2] && a[3] == b[3]) print "EVENT_TYPE_CHMOD\t" name
          else print "EVENT_TYPE_WRITE\t" name }'
    mv -f -- "$state.new" "$state"
done
"""
ENVD_TOKEN_RE = re.compile(r"([0-9a-f]{12})\.([0-9a-f]{64})")


def e2b_home(user: str) -> str:
    """The home of a sandbox's user: E2B's /home/user for `user`; /workspace for a sandbox
    of another user (made before E2B's base world was served here)."""
    return E2B_HOME if user == E2B_USER else WORKSPACE


def e2b_path(home: str, path: Any) -> str:
    """An envd path, absolute or relative to the home, in normal form."""
    if not isinstance(path, str) or not path:
        raise BadRequest("path is required", "invalid_argument")
    if "\x00" in path:
        raise BadRequest("path must not contain NUL bytes", "invalid_argument")
    return "/" + os.path.normpath(os.path.join(home, path)).lstrip("/")


def envd_token(config: Config, sandbox_id: str, container_id: str) -> str:
    """The daemon token of one incarnation of a sandbox: derived, never stored.

    ``<container id>.<HMAC of sandbox id and container id under the API key>``: any node of
    the cluster (they share the key) can check it without state, and the node that holds the
    sandbox also checks that the container it names is still the sandbox's, so a killed
    sandbox's token is worth nothing, even if a sandbox of the same id were made again."""
    incarnation = container_id[:12]
    return f"{incarnation}.{node_mac(config, f'e2b-envd:{sandbox_id}:{incarnation}')}"


def node_mac(config: Config, text: str) -> str:
    """HMAC-SHA256 of ``text`` under the node's key (shared by the cluster), in hex."""
    secret = (config.api_key or "clawdspace-auth-disabled").encode("utf-8", "surrogateescape")
    return hmac.new(secret, text.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


def e2b_template(template_id: str) -> str:
    """The Clawdspace template an E2B template id names (E2B's ``base``: ``default``)."""
    return "default" if template_id == "base" else template_id


def envd_token_incarnation(config: Config, sandbox_id: str, token: str) -> str | None:
    """The container id (12 hex digits) a valid token of ``sandbox_id`` names; else None."""
    match = ENVD_TOKEN_RE.fullmatch(token)
    if match is None:
        return None
    expected = envd_token(config, sandbox_id, match.group(1))
    return match.group(1) if hmac.compare_digest(token.encode(), expected.encode()) else None


def e2b_time(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class E2bListQuery:
    """A sandbox list's filters and page: ``state`` (running, paused), ``metadata`` pairs,
    ``template``, a start-time window, ``order`` (asc or desc by start time) and ``limit``
    from the key (``after``) of the last sandbox of the page before."""

    states: frozenset[str] = frozenset({"running", "paused"})
    metadata: tuple[tuple[str, str], ...] = ()
    template: str | None = None
    started_after: str | None = None  # startedAt form: YYYY-MM-DDTHH:MM:SSZ
    started_before: str | None = None
    order: str = "desc"
    limit: int = 100
    after: tuple[str, str] | None = None

    def matches(self, sandbox: dict[str, Any]) -> bool:
        return sandbox["state"] in self.states and all(
            sandbox["metadata"].get(k) == v for k, v in self.metadata) and (
            self.template is None or sandbox["templateID"] == self.template) and (
            self.started_after is None or sandbox["startedAt"] >= self.started_after) and (
            self.started_before is None or sandbox["startedAt"] <= self.started_before)

    @staticmethod
    def key(sandbox: dict[str, Any]) -> tuple[str, str]:
        return sandbox["startedAt"], sandbox["sandboxID"]

    @staticmethod
    def token(sandbox: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(
            list(E2bListQuery.key(sandbox))).encode()).decode()

    @staticmethod
    def parse_token(text: str) -> tuple[str, str]:
        try:
            key = json.loads(base64.urlsafe_b64decode(text.encode("ascii")))
        except (ValueError, UnicodeError):
            key = None
        if not (isinstance(key, list) and len(key) == 2 and all(
                isinstance(k, str) for k in key)):
            raise BadRequest("nextToken is not one this server gave", "invalid_argument")
        return key[0], key[1]


@dataclasses.dataclass
class Watcher:
    """An envd directory watcher: WATCH_SCRIPT running in its sandbox, its events held (at most
    WATCH_EVENTS) until the client asks for them."""

    id: str
    sandbox: str
    container_id: str
    user: str
    real: str  # the directory, where it really is in the space
    recursive: bool
    polled: float  # when the client last asked for its events (or made it)
    events: collections.deque[dict[str, str]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=WATCH_EVENTS))
    running: RunningExec | None = None
    output: ExecStdout | None = None  # the running one's
    closed: bool = False

    def state_file(self) -> str:
        return f"/tmp/.clawdspace-watch/{self.id}"  # noqa: S108 - inside the space


class E2bStreamCut(Exception):
    """A process stream that must break off, as envd's does when its sandbox goes."""


class E2bRun:
    """An envd process stream (Start, or Connect to a running one) as the events the SDK
    reads: its start, output (``pty`` for a pseudo-terminal) and keepalives, its end, and the
    stream's trailer. The command itself is a background process of the space: a client that
    goes away stops only this stream."""

    def __init__(self, execs: Execs, sandbox: str, process_id: str, pid: int, offset: int,
                 pty: bool) -> None:
        self.execs = execs
        self.sandbox = sandbox
        self.process_id = process_id
        self.pid = pid
        self.offset = offset
        self.pty = pty

    async def events(self, ping_every: float) -> AsyncIterator[tuple[dict[str, Any], bool]]:
        """(message, is the trailer) pairs, to the end of the command."""
        yield {"event": {"start": {"pid": self.pid}}}, False
        async for piece in self.execs.follow(self.sandbox, self.process_id, self.offset, True,
                                             ping_every):
            if piece is None:
                yield {"event": {"keepalive": {}}}, False
                continue
            kind = "pty" if self.pty else "stdout" if piece[1] == 1 else "stderr"
            yield {"event": {"data": {kind: base64.b64encode(piece[2]).decode()}}}, False
        result = self.execs.result(self.sandbox, self.process_id)
        if result is None or result.get("spaceStopped") or result.get("lost"):
            # The sandbox was killed, its process lost, or this service is stopping: envd's
            # stream would break, not end.
            raise E2bStreamCut(f"the stream of process {self.pid} in {self.sandbox} ends "
                               "without its end")
        timed_out = bool(result.get("timedOut"))
        code = -1 if timed_out else int(result.get("exitCode", -1))
        yield {"event": {"end": {
            "exitCode": code, "exited": not timed_out,
            "status": "signal: killed" if timed_out else f"exit status {code}"}}}, False
        yield ({"error": {"code": "deadline_exceeded",
                          "message": "the command ran past its timeout"}}
               if timed_out else {}), True


class E2b:
    """E2B's REST control plane over spaces, and envd emulated with ``docker exec`` and the
    files API. A sandbox is a space named ``e2b-<hex>``, run as E2B_USER with its volume also
    at E2B_HOME; its metadata and template are labels, its timeout a deadline in the data
    directory (timeouts pause; nothing is deleted). ``files`` is rooted at ``/``: envd may
    reach whatever the sandbox's user may."""

    def __init__(self, config: Config, spaces: Spaces, execs: Execs, files: Files,
                 templates: Templates, nodes: Nodes, observer: Observer) -> None:
        self.config = config
        self.spaces = spaces
        self.execs = execs
        self.files = files
        self.observer = observer
        self.templates = templates
        self.nodes = nodes
        self.activity = spaces.activity
        self.deadline_path = os.path.join(config.data_dir, "e2b-deadlines.json")
        self.deadlines: dict[str, float] = {}
        self.save_lock = asyncio.Lock()
        self.deadlines_changed = asyncio.Event()  # the timeout loop looks again
        self.watchers: dict[str, Watcher] = {}
        self.tasks = Tasks()

    async def startup(self) -> None:
        """Load the sandbox deadlines and start pausing sandboxes past theirs."""
        saved = read_json_file(self.deadline_path)
        if isinstance(saved, dict):
            self.deadlines = {str(k): float(v) for k, v in saved.items()
                              if isinstance(v, (int, float))}
        self.tasks.spawn("e2b timeouts", self._timeouts, every=0.0)

    async def shutdown(self) -> None:
        await self.tasks.close()

    async def _save(self) -> None:
        self.deadlines_changed.set()
        async with self.save_lock:  # in order: a later snapshot never loses to an earlier one
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, write_json_atomic, self.deadline_path, dict(self.deadlines))
            except OSError as err:
                log.error("cannot write %s: %s", self.deadline_path, err)
                raise Unavailable("the sandbox deadlines cannot be stored: "
                                  f"{err.strerror or err}", "disk_unavailable") from None

    # -- control plane --------------------------------------------------------------------

    def _sandbox(self, space: SpaceInfo, labels: dict[str, str] | None = None,
                 with_token: bool = True) -> dict[str, Any]:
        """E2B's view of a sandbox. Lists leave the daemon token out (E2B's ListedSandbox
        does): a token is handed out only by create, connect and get, one sandbox at a time."""
        name = space["name"]
        try:
            created = dt.datetime.fromisoformat(space["created"].replace("Z", "+00:00"))
        except ValueError:  # absent or malformed (labels are anyone's to write)
            created = dt.datetime.now(dt.timezone.utc)
        try:
            metadata = json.loads((labels or {}).get(E2B_METADATA_LABEL) or "{}")
        except (ValueError, RecursionError):
            metadata = {}
        sandbox: dict[str, Any] = {
            "templateID": (labels or {}).get(E2B_TEMPLATE_LABEL) or space["template"]
            or "base",
            "sandboxID": name,
            "clientID": self.nodes.self_name(),
            "envdVersion": E2B_ENVD_VERSION,
            "domain": None,
            "startedAt": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "endAt": e2b_time(self.deadlines.get(name,
                                                 self.activity.clock() + E2B_DEFAULT_TIMEOUT)),
            "cpuCount": max(1, int(space["cpus"])),
            "memoryMB": space["memory"] >> 20,
            "diskSizeMB": 0,
            "state": "paused" if space["status"] == "paused" else "running",
            "metadata": metadata if isinstance(metadata, dict) else {},
        }
        if with_token:
            sandbox["envdAccessToken"] = envd_token(self.config, name, space["id"])
        return sandbox

    async def owner(self, sandbox_id: str) -> NodeInfo | None:
        """The other node that holds a sandbox this node does not have; None when local."""
        if self.spaces.is_known(sandbox_id):
            return None
        with contextlib.suppress(NotFound):
            await self._find(sandbox_id)
            return None
        for attempt in range(2):  # a node started since the last refresh is found on the second
            if attempt or not self.nodes.nodes:
                await self.nodes.refresh()
            for node in self.nodes.nodes:
                if node.get("self") or node["status"] != "online":
                    continue
                try:
                    status, _ = await asyncio.wait_for(self.nodes.get_json(
                        f"{node['url']}/sandboxes/{sandbox_id}", self.config.api_key),
                        NODE_PROBE_TIMEOUT)
                except (asyncio.TimeoutError, aiohttp.ClientError, OSError, ValueError,
                        RuntimeError) as err:
                    log.info("sandbox %s: node %s did not answer: %s", sandbox_id,
                             node["name"], err or type(err).__name__)
                    continue
                if status == 200:
                    return node
        return None

    async def is_incarnation(self, sandbox_id: str, incarnation: str) -> bool:
        """Whether the sandbox exists here and its container's id starts with
        ``incarnation``."""
        container_id = await self.spaces.incarnation(sandbox_id)
        return container_id is not None and container_id.startswith(incarnation)

    async def _find(self, sandbox_id: str) -> tuple[SpaceInfo, dict[str, str]]:
        info = await self._inspect(sandbox_id)
        return self.spaces.view_inspected(info), (info.get("Config") or {}).get("Labels") or {}

    async def _inspect(self, sandbox_id: str) -> dict[str, Any]:
        """A sandbox's container (NotFound for anything that is not one)."""
        if not SPACE_NAME_RE.fullmatch(sandbox_id) or not sandbox_id.startswith("e2b-"):
            raise NotFound(f"sandbox {sandbox_id[:80]} not found")
        try:
            return await self.spaces.inspect(sandbox_id)
        except (NotFound, BadRequest):
            raise NotFound(f"sandbox {sandbox_id} not found") from None

    async def metrics(self, sandbox_id: str) -> list[dict[str, Any]]:
        """A sandbox's metrics in E2B's shape: one sample, taken now (CPU and memory from its
        cgroup, disk of its home); a paused sandbox's is all zero but its limits."""
        info = await self._inspect(sandbox_id)
        stats = await self.observer.stats(info)
        disk = await self.observer.disk(info) or {}
        now = self.activity.clock()
        cpus = ((info.get("HostConfig") or {}).get("NanoCpus") or 0) / 1e9
        return [{"timestamp": e2b_time(now), "timestampUnix": int(now),
                 "cpuCount": max(1, int(cpus)),
                 "cpuUsedPct": round(float(stats["cpuPercent"]), 2),
                 "memUsed": int(stats["memoryUsageBytes"]),
                 "memTotal": int(stats["memoryLimitBytes"]) or host_memory_bytes(),
                 "memCache": 0, "diskUsed": int(disk.get("usedBytes") or 0),
                 "diskTotal": int(disk.get("totalBytes") or 0)}]

    async def is_running(self, sandbox_id: str) -> bool:
        try:
            space, _ = await self._find(sandbox_id)
        except NotFound:
            return False
        return space["status"] == "running"

    def _timeout(self, body: dict[str, Any], least: int = 1) -> int:
        timeout = body.get("timeout", E2B_DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not least <= timeout \
                <= 86400 * 30:
            raise BadRequest(f"timeout must be {least} to {86400 * 30} seconds",
                             "invalid_argument")
        return timeout

    async def create(self, body: dict[str, Any], actor: Actor) -> dict[str, Any]:
        template_id = body.get("templateID") or "base"
        if not isinstance(template_id, str):
            raise BadRequest("templateID must be a string", "invalid_argument")
        template = await self.templates.for_space(e2b_template(template_id))
        metadata = body.get("metadata") or {}
        env = body.get("envVars") or {}
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise BadRequest("metadata must map strings to strings", "invalid_argument")
        encoded = json.dumps(metadata, separators=(",", ":"))
        if len(encoded) > 8192:
            raise BadRequest("metadata is larger than 8 KiB", "invalid_argument")
        timeout = self._timeout(body)
        name = f"e2b-{os.urandom(8).hex()}"
        request = parse_create({"name": name, "env": env}, self.config, template)
        request = dataclasses.replace(request, user=E2B_USER, home=E2B_HOME, labels={
            E2B_TEMPLATE_LABEL: template_id, E2B_METADATA_LABEL: encoded})
        space = await self.spaces.create(request, actor)
        self.deadlines[name] = self.activity.clock() + timeout
        await self._save()
        return self._sandbox(space, request.labels)

    async def get(self, sandbox_id: str) -> dict[str, Any]:
        space, labels = await self._find(sandbox_id)
        return self._sandbox(space, labels)

    async def list_sandboxes(self, query: E2bListQuery) -> tuple[list[dict[str, Any]],
                                                                 str | None]:
        """One page of the sandboxes ``query`` asks for, ordered by start time (then id),
        and the token of the next page (None on the last)."""
        found = []
        for row in await self.spaces.rows(E2B_TEMPLATE_LABEL):
            labels = row.get("Labels") or {}
            sandbox = self._sandbox(self.spaces.view(row["Id"], labels, row.get("State", "")),
                                    labels, with_token=False)
            if query.matches(sandbox):
                found.append(sandbox)
        found.sort(key=E2bListQuery.key, reverse=query.order == "desc")
        if query.after is not None:
            found = [s for s in found if (E2bListQuery.key(s) < query.after
                                          if query.order == "desc"
                                          else E2bListQuery.key(s) > query.after)]
        page = found[:query.limit]
        more = len(found) > query.limit
        return page, E2bListQuery.token(page[-1]) if more else None

    async def kill(self, sandbox_id: str, actor: Actor) -> None:
        await self._find(sandbox_id)
        await self.spaces.destroy(sandbox_id, True, actor)
        self.deadlines.pop(sandbox_id, None)
        await self._save()

    async def set_timeout(self, sandbox_id: str, body: dict[str, Any]) -> None:
        await self._find(sandbox_id)
        # 0 is E2B's "now": the sandbox is paused at once.
        self.deadlines[sandbox_id] = self.activity.clock() + self._timeout(body, least=0)
        await self._save()

    async def pause(self, sandbox_id: str, actor: Actor) -> None:
        space, _ = await self._find(sandbox_id)
        if space["status"] == "paused":
            raise Conflict(f"sandbox {sandbox_id} is already paused")
        await self.spaces.pause(sandbox_id, actor)

    async def connect(self, sandbox_id: str, body: dict[str, Any],
                      actor: Actor) -> tuple[int, dict[str, Any]]:
        space, labels = await self._find(sandbox_id)
        resumed = space["status"] != "running"
        if resumed:
            await self.spaces.start(sandbox_id, actor, reason="e2b connect")
        # A connect only ever extends the end time (E2B's rule), never shortens it.
        self.deadlines[sandbox_id] = max(self.deadlines.get(sandbox_id, 0.0),
                                         self.activity.clock() + self._timeout(body))
        await self._save()
        space, labels = await self._find(sandbox_id)
        return (201 if resumed else 200), self._sandbox(space, labels)

    async def _timeouts(self) -> None:
        """One round of the timeout loop: pause what is due, then sleep until the next
        deadline or a change of them (so a timeout fires within a moment of its time)."""
        self.deadlines_changed.clear()
        wait = await self.expire()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.deadlines_changed.wait(), wait)

    async def expire(self) -> float:
        """Sandboxes past their timeout are paused (never deleted: /workspace survives), even
        while commands run in them (E2B ends a sandbox at its time; here they are frozen and
        resume with it); the seconds until the next deadline."""
        now = self.activity.clock()
        wait = 60.0
        for name, deadline in list(self.deadlines.items()):
            if deadline > now:
                wait = min(wait, deadline - now)
                continue
            if (self.activity.last(name) or 0) > deadline:
                continue  # used after its deadline (woken by a call): auto-sleep governs now
            try:
                space, _ = await self._find(name)
            except NotFound:
                self.deadlines.pop(name, None)
                continue
            if space["status"] != "running":
                continue
            with contextlib.suppress(ClawdError):
                await self.spaces.pause(name, SYSTEM_ACTOR, reason="e2b timeout")
        return max(0.01, wait)

    # -- envd: processes ------------------------------------------------------------------

    async def start_process(self, sandbox: str, message: dict[str, Any], timeout: float | None,
                            actor: Actor) -> E2bRun:
        """Start an envd ``Process/Start`` message's command; the caller relays its events."""
        process = json_object(message.get("process"), "process")
        cmd, args = process.get("cmd"), process.get("args") or []
        envs, cwd = process.get("envs") or {}, process.get("cwd") or "."
        cwd = e2b_path(await self.home(sandbox, actor), cwd)  # relative to the home, as in envd
        if not isinstance(cmd, str) or not cmd or not isinstance(args, list) or not all(
                isinstance(a, str) for a in args):
            raise BadRequest("process.cmd and args are required", "invalid_argument")
        limit = min(timeout, float(self.config.exec_max_timeout)) if timeout else None
        req = exec_request(self.config, [cmd, *args], envs, cwd,
                           limit or self.config.exec_max_timeout, root="", source="e2b")
        size = json_object(json_object(message.get("pty"), "pty").get("size"), "pty.size")
        if size:
            req = dataclasses.replace(req, tty=True, stdin=True, env={
                "TERM": "xterm-256color", **req.env}, pty=check_pty(
                    {"cols": size.get("cols"), "rows": size.get("rows")}))
        elif message.get("stdin") is True:
            req = dataclasses.replace(req, stdin=True)
        tag = message.get("tag") if isinstance(message.get("tag"), str) else None
        started = await self.execs.background(sandbox, req, actor, tag=tag)
        return E2bRun(self.execs, sandbox, started.id, await self.execs.process_pid(
            started) or 0, 0, req.tty)

    async def _selected(self, sandbox: str, body: dict[str, Any]) -> Process:
        """The process a request's ``ProcessSelector`` names (by its pid in the sandbox, or its
        tag): a running one before one that has ended, the newest first."""
        selector = json_object(body.get("process"), "process")
        pid, tag = selector.get("pid"), selector.get("tag")
        candidates = []
        for process in await self.execs.processes_of(sandbox):
            if (isinstance(pid, int) and not isinstance(pid, bool) and process.pid == pid) or (
                    isinstance(tag, str) and process.tag == tag):
                candidates.append(process)
        if not candidates:
            raise NotFound(f"process {str(selector)[:80]} not found")
        return max(candidates, key=lambda p: (not p.gone, p.started_at))

    async def connect_process(self, sandbox: str, body: dict[str, Any]) -> E2bRun:
        """Process/Connect: the rest of a command's output (from where its output is now),
        then its end."""
        process = await self._selected(sandbox, body)
        view = await self.execs.get_process(sandbox, process.id)
        return E2bRun(self.execs, sandbox, process.id, process.pid or 0,
                      (view["output"] or {}).get("next", 0), view["pty"] is not None)

    async def send_input(self, sandbox: str, body: dict[str, Any], actor: Actor,
                         eof: bool = False) -> dict[str, Any]:
        """Process/SendInput (``input.stdin`` or ``input.pty``, base64) and CloseStdin."""
        process = await self._selected(sandbox, body)
        data = b""
        if not eof:
            data = self.input_bytes(body.get("input"))
        await self.execs.write_stdin(sandbox, process.id, data, eof, actor)
        return {}

    @staticmethod
    def input_bytes(given: Any) -> bytes:
        """A ``ProcessInput``'s bytes (``stdin`` or ``pty``, base64)."""
        given = json_object(given, "input")
        return decode_base64(given.get("stdin", given.get("pty")), "input.stdin (or pty)",
                             "invalid_argument")

    async def stream_input(self, sandbox: str, messages: AsyncIterator[dict[str, Any]],
                           actor: Actor) -> dict[str, Any]:
        """Process/StreamInput: a ``start`` naming the process, then ``data`` events typed
        into it in order (``keepalive`` ones skipped), until the client's stream ends."""
        process: Process | None = None
        async for message in messages:
            if "start" in message:
                process = await self._selected(sandbox, json_object(
                    message["start"], "start"))
            elif "data" in message:
                if process is None:
                    raise BadRequest("StreamInput must start with a start event",
                                     "invalid_argument")
                data = self.input_bytes(json_object(message["data"], "data").get("input"))
                await self.execs.write_stdin(sandbox, process.id, data, False, actor)
            elif "keepalive" not in message:
                raise BadRequest("StreamInput events are start, data or keepalive",
                                 "invalid_argument")
        return {}

    async def update_process(self, sandbox: str, body: dict[str, Any]) -> dict[str, Any]:
        """Process/Update: a new pseudo-terminal size."""
        process = await self._selected(sandbox, body)
        size = json_object(json_object(body.get("pty"), "pty").get("size"), "pty.size")
        await self.execs.resize_process(sandbox, process.id, size)
        return {}

    async def list_processes(self, sandbox: str) -> dict[str, Any]:
        """The sandbox's running processes with their real pids (env values never shown)."""
        alive = []
        for process in await self.execs.processes_of(sandbox):
            if process.ended_at is not None or process.gone or process.pid is None or \
                    process.source == "terminal":
                continue
            entry: dict[str, Any] = {"config": {
                "cmd": process.argv[0], "args": process.argv[1:],
                "envs": dict.fromkeys(process.env_keys, ""), "cwd": process.cwd},
                "pid": process.pid}
            if process.tag:
                entry["tag"] = process.tag
            alive.append(entry)
        return {"processes": alive}

    async def signal(self, sandbox: str, body: dict[str, Any], actor: Actor) -> dict[str, Any]:
        """Process/SendSignal: SIGKILL or SIGTERM to the process's whole group."""
        process = await self._selected(sandbox, body)
        if process.ended_at is not None or process.gone:
            raise NotFound(f"process {process.pid} not found")
        given = body.get("signal", "SIGNAL_SIGKILL")
        words = {"SIGNAL_SIGKILL": "KILL", 9: "KILL", "SIGNAL_SIGTERM": "TERM", 15: "TERM"}
        if not isinstance(given, (str, int)) or isinstance(given, bool) or given not in words:
            raise BadRequest("signal must be SIGNAL_SIGKILL or SIGNAL_SIGTERM",
                             "invalid_argument")
        word = words[given]
        await self.execs.signal_process(sandbox, process.id, word, actor)
        return {}

    # -- envd: files ----------------------------------------------------------------------

    async def home(self, sandbox: str, actor: Actor) -> str:
        """The home of a sandbox's user (relative envd paths start there)."""
        _, user = await self.spaces.exec_target(sandbox, actor)
        return e2b_home(user)

    async def path(self, sandbox: str, given: Any, actor: Actor) -> str:
        """An envd path of a sandbox, absolute (``files`` is rooted at ``/``)."""
        if isinstance(given, str) and given.startswith("/"):
            return e2b_path("/", given)
        return e2b_path(await self.home(sandbox, actor), given)

    @staticmethod
    def entry(found: FileEntry) -> dict[str, Any]:
        """envd's EntryInfo of a listed entry: its real mode, owner, group and link target."""
        types = {"dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}
        real = found["path"]
        kind, mode = found["type"], found["mode"]
        answer = {"name": real.rpartition("/")[2] or "/", "path": real,
                  "type": types.get(kind, "FILE_TYPE_FILE"), "size": str(found["size"]),
                  "mode": mode, "permissions": {"dir": "d", "symlink": "l"}.get(kind, "-") +
                  "".join("rwx"[i % 3] if mode & (1 << (8 - i)) else "-" for i in range(9)),
                  "owner": found["owner"], "group": found["group"],
                  "modifiedTime": e2b_time(found["mtimeMs"] / 1000)}
        if found["target"] is not None:
            answer["symlinkTarget"] = found["target"]
        return answer

    async def _where(self, sandbox: str, info: dict[str, Any], given: Any, actor: Actor,
                     follow_last: bool = True) -> Resolved:
        """Where an envd path of a running sandbox really is."""
        return await self.files.resolve(info["Id"], await self.path(sandbox, given, actor),
                                        follow_last)

    async def _entry(self, sandbox: str, rel: str, actor: Actor) -> dict[str, Any]:
        found = await self.files.entry(sandbox, rel, actor)
        if found is None:
            raise NotFound(f"{rel}: no such file or directory")
        return {"entry": self.entry(found)}

    async def filesystem(self, method: str, sandbox: str, body: dict[str, Any],
                         actor: Actor) -> dict[str, Any]:
        """One envd ``filesystem.Filesystem`` call, as the space's user."""
        calls = {"Stat": self._fs_stat, "ListDir": self._fs_list, "MakeDir": self._fs_mkdir,
                 "Remove": self._fs_remove, "Move": self._fs_move,
                 "CreateWatcher": self._fs_watch, "GetWatcherEvents": self._fs_watch_events,
                 "RemoveWatcher": self._fs_unwatch}
        if method not in calls:
            raise NotFound(f"filesystem.Filesystem/{method[:40]} is not supported")
        info = await self.spaces.running(sandbox, actor)
        self.activity.touch(sandbox)
        return await calls[method](sandbox, info, body, actor)

    async def _fs_stat(self, sandbox: str, info: dict[str, Any], body: dict[str, Any],
                       actor: Actor) -> dict[str, Any]:
        return await self._entry(sandbox, await self.path(sandbox, body.get("path"), actor),
                                 actor)

    async def _fs_list(self, sandbox: str, info: dict[str, Any], body: dict[str, Any],
                       actor: Actor) -> dict[str, Any]:
        depth = body.get("depth", 1)
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 32:
            raise BadRequest("depth must be 1 to 32", "invalid_argument")
        entries: list[FileEntry] = []
        level = [await self.path(sandbox, body.get("path"), actor)]
        for _ in range(depth):  # breadth first, each directory as the space's user
            below = []
            for directory in level:
                listing = await self.files.list_dir(sandbox, directory, E2B_LIST_LIMIT,
                                                    actor)
                entries += listing["entries"]
                below += [e["path"] for e in listing["entries"] if e["type"] == "dir"]
                if len(entries) >= E2B_LIST_LIMIT:
                    break
            level = below
            if not level or len(entries) >= E2B_LIST_LIMIT:
                break
        return {"entries": [self.entry(e) for e in entries[:E2B_LIST_LIMIT]]}

    async def _fs_mkdir(self, sandbox: str, info: dict[str, Any], body: dict[str, Any],
                        actor: Actor) -> dict[str, Any]:
        where = await self._where(sandbox, info, body.get("path"), actor)
        if where.stat is not None:
            raise E2bExists(f"{where.rel} already exists")
        async with self.spaces.audit.action("space.file.mkdir", sandbox, {
                "path": where.rel, "source": "e2b"}, actor):
            await self._run(info, ["mkdir", "-p", "--", where.real])
        return await self._entry(sandbox, where.rel, actor)

    async def _fs_remove(self, sandbox: str, info: dict[str, Any], body: dict[str, Any],
                         actor: Actor) -> dict[str, Any]:
        where = await self._where(sandbox, info, body.get("path"), actor, follow_last=False)
        if where.real in E2B_VOLUME_ROOTS:
            raise BadRequest(f"{where.real} holds the sandbox's volume and cannot be removed",
                             "invalid_argument")
        if where.stat is None:
            return {}  # already gone: envd answers the same
        async with self.spaces.audit.action("space.file.delete", sandbox, {
                "path": where.rel, "recursive": True, "source": "e2b"}, actor):
            await self._run(info, ["rm", "-rf", "--", where.real])
        return {}

    async def _fs_move(self, sandbox: str, info: dict[str, Any], body: dict[str, Any],
                       actor: Actor) -> dict[str, Any]:
        source = await self._where(sandbox, info, body.get("source"), actor, follow_last=False)
        target = await self._where(sandbox, info, body.get("destination"), actor)
        if source.stat is None:
            raise NotFound(f"{source.rel}: no such file or directory")
        if source.real in E2B_VOLUME_ROOTS:
            raise BadRequest(f"{source.real} holds the sandbox's volume and cannot be moved",
                             "invalid_argument")
        async with self.spaces.audit.action("space.file.move", sandbox, {
                "path": source.rel, "destination": target.rel, "source": "e2b"}, actor):
            await self._run(info, ["mv", "-fT", "--", source.real, target.real])  # rename(2)
        return await self._entry(sandbox, target.rel, actor)

    # -- envd: directory watchers ---------------------------------------------------------

    async def _fs_watch(self, sandbox: str, info: dict[str, Any], body: dict[str, Any],
                        actor: Actor) -> dict[str, Any]:
        """CreateWatcher: a directory of the sandbox watched (``recursive`` or not) until
        RemoveWatcher, or until nobody asked for its events for WATCH_IDLE seconds."""
        self._sweep_watchers()
        if sum(w.sandbox == sandbox for w in self.watchers.values()) >= WATCHERS_PER_SANDBOX:
            raise TooManyProcesses(f"sandbox {sandbox} already has {WATCHERS_PER_SANDBOX} "
                                   "watchers; remove one first")
        recursive = body.get("recursive", False)
        if not isinstance(recursive, bool):
            raise BadRequest("recursive must be true or false", "invalid_argument")
        where = await self._where(sandbox, info, body.get("path"), actor)
        if where.stat is None or mode_type(int(where.stat.get("mode", 0))) != "dir":
            raise NotFound(f"{where.rel} is not a directory")
        user = str((info.get("Config") or {}).get("User") or "")
        watcher = Watcher(f"w-{os.urandom(8).hex()}", sandbox, info["Id"], user, where.real,
                          recursive, self.activity.clock())
        await self._start_watching(watcher)
        self.watchers[watcher.id] = watcher
        self.tasks.spawn(f"watcher {watcher.id}", functools.partial(self._watch, watcher))
        return {"watcherId": watcher.id}

    async def _start_watching(self, watcher: Watcher) -> None:
        """A run of WATCH_SCRIPT, once it watches (so nothing done after this is missed)."""
        running = await self.execs.open_internal(
            {"Id": watcher.container_id}, ExecRequest(argv=[
                "sh", "-c", WATCH_SCRIPT, "sh", watcher.real, "1" if watcher.recursive else "0",
                watcher.state_file(), str(WATCH_INTERVAL), str(WATCH_LIFETIME)],
                env=self.files.env,
                workdir="/", timeout=0), watcher.user)
        output = ExecStdout(running.sock, 65536)
        notes: list[bytes] = []

        def ready() -> bool:
            while len(notes) < 16 and (line := output.read_line(1024)) is not None:
                if line == b"READY":
                    return True
                notes.append(line.removeprefix(b"NOTE\t"))
            return False

        try:
            is_ready = await asyncio.wait_for(self.execs.engine.stream(ready), WATCH_READY)
        except asyncio.TimeoutError:
            is_ready = False
        except BaseException:  # cancelled: the run must not outlive the request
            await asyncio.shield(self._end_run(running))
            raise
        if not is_ready:
            await self._end_run(running)
            why = b"; ".join([*notes, bytes(output.stderr)]).decode(
                "utf-8", "replace").strip()[-300:]
            if "no GNU find" in why:
                raise NotServed("watching a directory needs inotifywait (inotify-tools) "
                                    "or GNU find in the sandbox's image")
            raise Conflict(f"{watcher.real} could not be watched: {why or 'no answer'}",
                           "watch_failed")
        watcher.running, watcher.output = running, output

    async def _watch(self, watcher: Watcher) -> None:
        """Read a watcher's events as they come; start it again when a run ends while it is
        still wanted."""
        loop = asyncio.get_running_loop()
        try:
            while watcher.running is not None and watcher.output is not None:

                def read(out: ExecStdout = watcher.output) -> None:
                    while (line := out.read_line(8192)) is not None:
                        kind, _, name = line.decode(errors="replace").partition("\t")
                        if kind.startswith("EVENT_TYPE_") and name:
                            loop.call_soon_threadsafe(watcher.events.append,
                                                      {"type": kind, "name": name})

                await self.execs.engine.stream(read)
                ended, watcher.running, watcher.output = watcher.running, None, None
                if ended is None:  # RemoveWatcher ended it
                    break
                await self._end_run(ended)  # (a line too long, too)
                if watcher.closed or self.activity.clock() - watcher.polled > WATCH_IDLE:
                    break
                await asyncio.sleep(WATCH_INTERVAL)
                try:
                    await self._start_watching(watcher)
                except (EngineError, ClawdError) as err:  # its sandbox is gone or stopped
                    log.info("watcher %s ends: %s", watcher.id, err)
                    break
        finally:
            await asyncio.shield(self._stop_watching(watcher))

    async def _stop_watching(self, watcher: Watcher) -> None:
        """The watcher's end: its run ended, its polling state removed from the space."""
        if watcher.closed and watcher.id not in self.watchers:
            return
        watcher.closed = True
        self.watchers.pop(watcher.id, None)
        running, watcher.running = watcher.running, None
        if running is not None:
            await self._end_run(running)
        with contextlib.suppress(EngineError, ClawdError):
            await self.execs.run_internal({"Id": watcher.container_id}, ExecRequest(
                argv=["rm", "-f", "--", watcher.state_file(), f"{watcher.state_file()}.new"],
                env={}, workdir="/", timeout=10), 4096, user=watcher.user)

    async def _end_run(self, running: RunningExec) -> None:
        """One run of WATCH_SCRIPT ended: its processes killed, its connection closed (its
        reader, if any, then returns)."""
        with contextlib.suppress(EngineError, ClawdError):
            await self.execs.kill_exec(running.container_id, running.exec_id)
        running.sock.shutdown(socket.SHUT_RDWR)
        running.sock.close()

    def _watcher(self, sandbox: str, body: dict[str, Any]) -> Watcher:
        watcher = self.watchers.get(str(body.get("watcherId") or body.get("watcher_id")))
        if watcher is None or watcher.sandbox != sandbox or watcher.closed:
            raise NotFound("watcher not found (removed, or not asked for its events for "
                           f"{int(WATCH_IDLE)} s)")
        return watcher

    def _sweep_watchers(self) -> None:
        horizon = self.activity.clock() - WATCH_IDLE
        for watcher in list(self.watchers.values()):
            if watcher.polled < horizon and watcher.running is not None:
                with contextlib.suppress(OSError):
                    watcher.running.sock.shutdown(socket.SHUT_RDWR)  # its reader stops it

    async def _fs_watch_events(self, sandbox: str, info: dict[str, Any],
                               body: dict[str, Any], actor: Actor) -> dict[str, Any]:
        """GetWatcherEvents: what happened since the last call."""
        self._sweep_watchers()
        watcher = self._watcher(sandbox, body)
        watcher.polled = self.activity.clock()
        events = list(watcher.events)
        watcher.events.clear()
        return {"events": events}

    async def _fs_unwatch(self, sandbox: str, info: dict[str, Any], body: dict[str, Any],
                          actor: Actor) -> dict[str, Any]:
        await self._stop_watching(self._watcher(sandbox, body))
        return {}

    async def _run(self, info: dict[str, Any], argv: list[str]) -> None:
        result = await self.execs.run_internal(info, ExecRequest(
            argv=argv, env={}, workdir=WORKSPACE, timeout=60), 65536)
        if result["exitCode"] != 0:
            raise Conflict(result["stderr"].strip() or f"{argv[0]} failed")

    async def upload(self, sandbox: str, path: Any, size: int | None, chunks: Iterator[bytes],
                     actor: Actor) -> dict[str, str]:
        """Write one uploaded file; its entry as envd's upload answers it."""
        where = await self.path(sandbox, path, actor)
        await self.files.write(sandbox, where, size, chunks, actor)
        return {"name": where.rpartition("/")[2], "type": "file", "path": where}

    async def download(self, sandbox: str, path: Any, actor: Actor) -> FileStream:
        return await self.files.open_stream(sandbox, await self.path(sandbox, path, actor),
                                            None, actor)


class E2bExists(Conflict):
    """An envd MakeDir on an existing path (the SDK answers False)."""

    code = "already_exists"

# E2B template builds: what the SDK's Template.build sends, built on this node from what it
# already has (a base image on the node, files the client uploads; nothing is pulled, and the
# build's RUN steps have no network), then served as a Clawdspace template of the same name.
E2B_BASE_IMAGE = "e2bdev/base"  # Template().from_base_image(): here, this node's sandbox image
E2B_BUILD_LOGS = 10000  # log entries one build keeps (the oldest go)
E2B_BUILD_PAGE = 100  # log entries one status call returns, as E2B's API
E2B_BUILDS_KEPT = 100  # finished builds remembered
E2B_BUILD_UPLOAD_MAX = 4 << 30  # bytes of one uploaded file archive
E2B_BUILD_LINK_TTL = 3600  # seconds an upload link works
E2B_BUILD_FILES_KEPT = 7 * 86400  # seconds an uploaded archive is kept after its last use
E2B_FILES_HASH_RE = re.compile(r"[0-9a-f]{64}")
E2B_BUILD_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}"
                               r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,63})?")  # user[:group]
# One COPY step, as root in the build: the uploaded archive (extracted by ADD into $1) holds
# the matches of the step's pattern $2 (relative paths); each goes to $3 (a directory when
# it ends with "/" or there is more than one match, as Docker's COPY), owned by $4, mode $5.
E2B_COPY_SCRIPT = r"""
set -e
cd "$1"
found=$(find . -path "./$2" -prune -print | sort)
[ -n "$found" ] || { echo "COPY $2: nothing in the upload matches" >&2; exit 1; }
count=$(printf '%s\n' "$found" | wc -l)
case $3 in */) into=1 ;; *) [ "$count" -gt 1 ] && into=1 || into= ;; esac
printf '%s\n' "$found" | while IFS= read -r match; do
    if [ -d "$match" ]; then target=$3; mkdir -p -- "$target"; cp -a -- "$match/." "$target"
    elif [ -n "$into" ]; then
        target=${3%/}/${match##*/}; mkdir -p -- "${3%/}"; cp -a -- "$match" "$target"
    else
        target=$3; mkdir -p -- "$(dirname -- "$target")"; cp -a -- "$match" "$target"
    fi
    [ -z "$4" ] || chown -R -- "$4" "$target"
    [ -z "$5" ] || chmod -R -- "$5" "$target"
done
rm -rf -- "$1"
"""


def dockerfile_quoted(value: str) -> str:
    """A value for inside a Dockerfile's double quotes (variables still expand, as Docker's)."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


@dataclasses.dataclass
class E2bBuild:
    """One template build: its steps' progress and log, and how it ended."""

    id: str
    template: str
    cpus: float | None
    memory: int | None
    status: str = "waiting"  # waiting, building, ready, error
    logs: collections.deque[dict[str, str]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=E2B_BUILD_LOGS))
    dropped: int = 0  # log entries that fell out of the front
    reason: dict[str, str] | None = None
    started: bool = False

    def log(self, message: str, level: str = "info", step: str | None = None) -> None:
        if len(self.logs) == self.logs.maxlen:
            self.dropped += 1
        entry = {"timestamp": now_iso(), "level": level, "message": message[:4096]}
        if step is not None:
            entry["step"] = step
        self.logs.append(entry)

    def fail(self, message: str, step: str | None = None) -> None:
        self.status = "error"
        self.reason = {"message": message, **({"step": step} if step else {})}
        self.log(message, "error", step)

    def view(self, offset: int) -> dict[str, Any]:
        """E2B's TemplateBuildInfo: up to E2B_BUILD_PAGE log entries from ``offset``."""
        start = max(0, offset - self.dropped)
        entries = list(itertools.islice(self.logs, start, start + E2B_BUILD_PAGE))
        answer: dict[str, Any] = {
            "templateID": self.template, "buildID": self.id, "status": self.status,
            "logEntries": entries, "logs": [e["message"] for e in entries]}
        if self.reason is not None:
            answer["reason"] = {**self.reason, "logEntries": list(self.logs)[-20:]}
        return answer


class E2bBuilds:
    """E2B's template build protocol over the engine's image builds: a build request names
    the template, the client uploads the files its COPY steps need (to links signed with the
    node's key), then starts the build with its steps; the image is built on this node (the
    base must be here already; the build has no network), and the template that names it is
    written as any Clawdspace template (resources from the request)."""

    def __init__(self, config: Config, engine: Engine, templates: Templates,
                 audit: AuditLog) -> None:
        self.config = config
        self.engine = engine
        self.templates = templates
        self.audit = audit
        self.files_dir = os.path.join(config.data_dir, "e2b-build-files")
        self.builds: dict[str, E2bBuild] = {}
        self.lock = asyncio.Lock()  # one build at a time on a node
        self.tasks = Tasks()

    async def shutdown(self) -> None:
        await self.tasks.close()

    def _build(self, template: str, build_id: str) -> E2bBuild:
        build = self.builds.get(build_id)
        if build is None or build.template != template:
            raise NotFound(f"build {build_id[:80]} of template {template[:80]} not found (a "
                           "build is remembered until the service restarts)")
        return build

    # -- request, files, start ------------------------------------------------------------

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v3/templates: a build of the template ``name`` (``name:tag``; the tag is
        kept in the answer only), with ``cpuCount`` and ``memoryMB`` for its sandboxes."""
        given = body.get("name") or body.get("alias")
        if not isinstance(given, str) or not given:
            raise BadRequest("name is required", "invalid_argument")
        name, _, tag = given.partition(":")
        try:
            name = check_template_name(name)
        except BadRequest as err:
            raise BadRequest(f"template name {name[:80]!r}: {err.message}",
                             "invalid_argument") from None
        cpus, memory_mb = body.get("cpuCount"), body.get("memoryMB")
        for field, value, most in (("cpuCount", cpus, 1024), ("memoryMB", memory_mb, 1 << 24)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= most):
                raise BadRequest(f"{field} must be a whole number from 1 to {most}",
                                 "invalid_argument")
        tags = body.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise BadRequest("tags must be a list of strings", "invalid_argument")
        if memory_mb is not None and memory_mb < MIN_MEMORY_BYTES >> 20:
            raise BadRequest(f"memoryMB must be at least {MIN_MEMORY_BYTES >> 20}",
                             "invalid_argument")
        digits = os.urandom(16).hex()  # a build id in E2B's form, a UUID
        build = E2bBuild("-".join((digits[:8], digits[8:12], digits[12:16], digits[16:20],
                                   digits[20:])), name, float(cpus) if cpus else None,
                         memory_mb << 20 if memory_mb else None)
        self.builds[build.id] = build
        idle = [b for b in self.builds.values()  # oldest first; none under way
                if not b.started or b.status in ("ready", "error")]
        for old in idle[:-E2B_BUILDS_KEPT]:
            self.builds.pop(old.id, None)
        return {"templateID": name, "buildID": build.id, "public": False, "names": [name],
                "aliases": [name], "tags": [tag or "latest", *tags]}

    def _file_path(self, files_hash: str) -> str:
        if not E2B_FILES_HASH_RE.fullmatch(files_hash):
            raise BadRequest("a files hash is 64 hex digits", "invalid_argument")
        return os.path.join(self.files_dir, f"{files_hash}.tar")

    def _link_mac(self, template: str, files_hash: str, expires: int) -> str:
        return node_mac(self.config, f"e2b-build-file:{template}:{files_hash}:{expires}")

    def file_link(self, template: str, files_hash: str, base_url: str) -> dict[str, Any]:
        """GET /templates/{id}/files/{hash}: present already, or where to upload it."""
        check_template_name(template)
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._file_path(files_hash))  # wanted: not pruned before its build
            return {"present": True}
        expires = int(time.time()) + E2B_BUILD_LINK_TTL
        query = urllib.parse.urlencode({"expires": expires, "signature": self._link_mac(
            template, files_hash, expires)})
        return {"present": False,
                "url": f"{base_url}/templates/{template}/files/{files_hash}?{query}"}

    def link_valid(self, template: str, files_hash: str, expires: str, signature: str) -> bool:
        """Whether an upload link is one this node signed, and has not expired."""
        if not expires.isdigit() or int(expires) < time.time():
            return False
        return hmac.compare_digest(signature.encode(), self._link_mac(
            template, files_hash, int(expires)).encode())

    async def store_file(self, template: str, files_hash: str, chunks: Iterator[bytes],
                         actor: Actor) -> int:
        """An uploaded file archive, written whole or not at all; its size."""
        path = self._file_path(files_hash)

        def store() -> int:
            os.makedirs(self.files_dir, mode=0o700, exist_ok=True)
            temp = os.path.join(self.files_dir, f".{files_hash}.tar{TEMP_INFIX}"
                                f"{os.urandom(6).hex()}")  # swept at start if left
            size = 0
            try:
                with open(temp, "xb") as out:
                    for chunk in chunks:
                        size += len(chunk)
                        if size > E2B_BUILD_UPLOAD_MAX:
                            raise PayloadTooLarge(f"a build's file archive is at most "
                                                  f"{E2B_BUILD_UPLOAD_MAX >> 20} MiB")
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            return size

        async with self.audit.action("template.upload", meta={
                "template": template, "filesHash": files_hash}, actor=actor):
            try:
                return await asyncio.get_running_loop().run_in_executor(None, store)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise InsufficientStorage("no space left for the build's files") from None
                raise Unavailable(f"the build's files could not be stored: "
                                  f"{err.strerror or err}", "disk_unavailable") from None


    async def start(self, template: str, build_id: str, body: dict[str, Any],
                    actor: Actor) -> None:
        """POST /v2/templates/{id}/builds/{build}: check the steps and the base, then build
        in the background (the client polls the status)."""
        build = self._build(template, build_id)
        if build.started:
            raise Conflict(f"build {build_id} was started already", "build_started")
        build.started = True  # before any await: a second start is refused meanwhile
        try:
            await self._start(build, body, actor)
        except BaseException:
            build.started = False
            raise

    def _prune_files(self) -> None:
        """Remove the uploaded archives no build used for E2B_BUILD_FILES_KEPT seconds."""
        horizon = time.time() - E2B_BUILD_FILES_KEPT
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.files_dir):
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False) and \
                            entry.stat().st_mtime < horizon:
                        os.unlink(entry.path)

    async def _start(self, build: E2bBuild, body: dict[str, Any], actor: Actor) -> None:
        """Check a build's template name, base and steps, record it, and start it."""
        await asyncio.get_running_loop().run_in_executor(None, self._prune_files)
        await self._previous(build.template)  # early: the same check is made at the end
        if body.get("fromImageRegistry"):
            raise BadRequest("this node pulls nothing, so registry credentials cannot be used: "
                             "docker pull (or load) the image on the node and build from it "
                             "by name", "invalid_argument")
        for field in ("startCmd", "readyCmd"):
            if body.get(field):
                raise BadRequest(f"{field} is not served by this node (a sandbox here starts "
                                 "with nothing running): start it with commands.run("
                                 "background=True) after create", "invalid_argument")
        base, default_user, image_user = await self._base(body)
        steps = body.get("steps") or []
        if not isinstance(steps, list) or len(steps) > 1000:
            raise BadRequest("steps must be a list of at most 1000", "invalid_argument")
        dockerfile, files, step_of = self._dockerfile(base, default_user, image_user, steps)
        await self.audit.record("template.build", meta={  # before anything is built
            "template": build.template, "buildId": build.id, "base": base,
            "steps": len(steps)}, actor=actor)
        self.tasks.spawn(f"e2b build {build.id}", functools.partial(
            self._run, build, base, dockerfile, files, step_of, body.get("force") is True,
            actor))

    async def _base(self, body: dict[str, Any]) -> tuple[str, str, str]:
        """(the image a build starts from, the user its steps run as by default, the image's
        own user): a local image, E2B's base (this node's sandbox image), or the image of a
        template."""
        image, from_template = body.get("fromImage"), body.get("fromTemplate")
        if from_template:
            if not isinstance(from_template, str):
                raise BadRequest("fromTemplate must be a template name", "invalid_argument")
            image = (await self.templates.for_space(
                e2b_template(from_template))).image \
                or self.config.image
        elif not isinstance(image, str) or not image:
            raise BadRequest("fromImage or fromTemplate is required", "invalid_argument")
        elif image.partition(":")[0] == E2B_BASE_IMAGE:
            image = self.config.image
        check_image_ref(image)
        found = await self.engine.inspect_image(image)
        if found is None:
            raise BadRequest(f"image {image!r} is not on this node, and this node pulls "
                             "nothing: docker pull (or load) it on the node first",
                             "invalid_argument")
        config = found.get("Config") or {}
        ours = (config.get("Labels") or {}).get("org.opencontainers.image.title") == \
            "clawdspace"
        user = str(config.get("User") or "root")
        return image, E2B_USER if ours else user, user

    @staticmethod
    def _dockerfile(base: str, default_user: str, image_user: str, steps: list[Any],
                    ) -> tuple[str, list[str], list[str]]:
        """The Dockerfile of a build's steps, the uploaded archives it needs, and which E2B
        step each Dockerfile instruction belongs to (for the log and a failure's step)."""
        lines = [f"FROM {base}"]
        step_of = ["base"]
        files: list[str] = []
        user = default_user

        def emit(line: str, step: int) -> None:
            lines.append(line)
            step_of.append(str(step))

        for number, step in enumerate(steps, 1):
            step = json_object(step, f"steps[{number - 1}]")
            kind, args = step.get("type"), step.get("args") or []
            one_line = args[1:] if kind == "RUN" else args  # a RUN's command is JSON-quoted
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args) or any(
                    "\n" in a or "\r" in a or "\x00" in a for a in one_line):
                raise BadRequest(f"step {number}: args must be strings on one line",
                                 "invalid_argument")
            if kind == "RUN" and args:
                run_as = args[1] if len(args) > 1 and args[1] else user
                if not E2B_BUILD_USER_RE.fullmatch(run_as):
                    raise BadRequest(f"step {number}: {run_as[:64]!r} is not a user name",
                                     "invalid_argument")
                emit(f"USER {run_as}", number)
                emit("RUN " + json.dumps(["/bin/sh", "-c", args[0]]), number)
            elif kind == "COPY" and len(args) >= 2:
                files_hash = step.get("filesHash")
                if not isinstance(files_hash, str) or not E2B_FILES_HASH_RE.fullmatch(
                        files_hash):
                    raise BadRequest(f"step {number}: COPY needs its filesHash",
                                     "invalid_argument")
                owner, mode = (args + ["", ""])[2:4]
                if owner and not E2B_BUILD_USER_RE.fullmatch(owner) or mode and not \
                        re.fullmatch(r"[0-7]{3,4}", mode):
                    raise BadRequest(f"step {number}: a COPY's user or mode is malformed",
                                     "invalid_argument")
                if not args[1].startswith("/"):
                    args[1] = f"{E2B_HOME}/{args[1]}"  # relative: to the home, as E2B's
                staging = f"/tmp/.e2b-build-{number}"  # noqa: S108 - inside the build
                files.append(files_hash)
                emit("USER root", number)
                emit(f"ADD files/{files_hash}.tar {staging}/", number)
                emit("RUN " + json.dumps(["/bin/sh", "-c", E2B_COPY_SCRIPT, "sh", staging,
                                          args[0], args[1], owner, mode]), number)
            elif kind == "ENV" and len(args) % 2 == 0 and args:
                pairs = list(zip(args[::2], args[1::2], strict=True))
                if not all(ENV_KEY_RE.fullmatch(k) for k, _ in pairs):
                    raise BadRequest(f"step {number}: an ENV name is not a variable name",
                                     "invalid_argument")
                emit("ENV " + " ".join(f'{k}="{dockerfile_quoted(v)}"' for k, v in pairs),
                     number)
            elif kind == "WORKDIR" and len(args) == 1 and args[0].startswith("/") and \
                    "\\" not in args[0]:  # a backslash would continue the line
                emit(f"WORKDIR {args[0]}", number)
            elif kind == "USER" and len(args) == 1 and E2B_BUILD_USER_RE.fullmatch(args[0]):
                user = args[0]
            else:
                raise BadRequest(f"step {number}: {str(kind)[:16]} with {len(args)} args is "
                                 "not a step this node builds (RUN, COPY, ENV, WORKDIR, USER)",
                                 "invalid_argument")
        emit(f"USER {image_user}", len(steps))  # spaces of the template run as the image's
        return "\n".join(lines) + "\n", files, step_of

    def _context(self, dockerfile: str, files: list[str]) -> IO[bytes]:
        """The build context, spooled to disk: the Dockerfile and the archives it adds."""
        out = tempfile.TemporaryFile()  # noqa: SIM115 - the caller closes it
        try:
            with tarfile.open(fileobj=out, mode="w") as tar:
                data = dockerfile.encode()
                entry = tarfile.TarInfo("Dockerfile")
                entry.size = len(data)
                tar.addfile(entry, io.BytesIO(data))
                for files_hash in sorted(set(files)):
                    tar.add(self._file_path(files_hash), arcname=f"files/{files_hash}.tar")
                    os.utime(self._file_path(files_hash))  # used: kept a while longer
            out.seek(0)
        except BaseException:
            out.close()
            raise
        return out

    async def _run(self, build: E2bBuild, base: str, dockerfile: str, files: list[str],
                   step_of: list[str], nocache: bool, actor: Actor) -> None:
        try:
            await self._build_image(build, base, dockerfile, files, step_of, nocache, actor)
        finally:
            if build.status in ("waiting", "building"):  # an error of ours, or a shutdown
                build.fail("the build stopped before its end (see the service's log)")
            if build.status == "error":
                with contextlib.suppress(ClawdError):
                    await self.audit.record("template.build.failed", meta={
                        "template": build.template, "buildId": build.id,
                        "error": (build.reason or {}).get("message", "")[:500]}, actor=actor)

    async def _build_image(self, build: E2bBuild, base: str, dockerfile: str,
                           files: list[str], step_of: list[str], nocache: bool,
                           actor: Actor) -> None:
        """Build the image (one build at a time), then write the template that names it."""
        loop = asyncio.get_running_loop()
        tag = f"{self.image_repo(build.template)}:{build.id[:12]}"
        async with self.lock:
            build.status = "building"
            build.log(f"building {build.template} from {base} (no network, nothing pulled)")
            missing = [h for h in files if not os.path.isfile(self._file_path(h))]
            if missing:
                build.fail(f"the files of a COPY step were not uploaded ({missing[0][:12]})")
                return
            default = await self.templates.for_space("default")
            # Held to the memory its sandboxes get (or a default sandbox's).
            limit = build.memory or default.memory or 2 << 30
            context = await loop.run_in_executor(None, self._context, dockerfile, files)
            step = ["base"]
            failure: list[str] = []

            def each(chunk: dict[str, Any]) -> None:
                text = str(chunk.get("stream") or chunk.get("status") or "")
                numbered = re.match(r"Step (\d+)/\d+ :", text)
                if numbered and int(numbered.group(1)) <= len(step_of):
                    step[0] = step_of[int(numbered.group(1)) - 1]
                if chunk.get("error"):
                    failure.append(str(chunk["error"]))
                for line in text.splitlines():
                    if line.strip():
                        loop.call_soon_threadsafe(build.log, line, "info", step[0])

            try:
                await self.engine.build_image(context, tag, limit, nocache, each)
            except (EngineError, ClawdError) as err:
                failure.append(getattr(err, "message", str(err)))
            finally:
                context.close()
            await asyncio.sleep(0)  # the log lines scheduled by the reader land first
            if failure:
                build.fail(f"step {step[0]} failed: {failure[-1].strip()}", step[0])
                return
            try:
                await self._install(build, tag, default, actor)
            except ClawdError as err:
                build.fail(f"the template could not be written: {err.message}")
                return
            build.status = "ready"
            build.log(f"built {tag}; Sandbox.create({build.template!r}) uses it")

    def image_repo(self, template: str) -> str:
        """The repository of a template's built images (tagged by build)."""
        return f"{self.config.prefix}e2b-{template}"

    async def _previous(self, template: str) -> Template | None:
        """The template a build replaces; Conflict when one of that name was not built."""
        try:
            previous = (await self.templates.get(template))[0]
        except NotFound:
            return None
        if not (previous.image or "").startswith(f"{self.image_repo(template)}:"):
            raise Conflict(f"template {template!r} exists and was not made by "
                           "Template.build; build under another name", "template_exists")
        return previous

    async def _install(self, build: E2bBuild, image: str, default: Template,
                       actor: Actor) -> None:
        """The template of a built image: the network posture of the node's default
        template, the request's resources; the image it replaces goes if nothing uses it."""
        previous = await self._previous(build.template)  # a PUT meanwhile is kept
        resources: dict[str, Any] = {"image": image}
        if build.cpus:
            resources["cpus"] = build.cpus
        if build.memory:
            resources["memory"] = build.memory
        await self.templates.put(yaml.safe_dump({
            "name": build.template,
            "description": f"E2B template, built {now_iso()[:19]}Z"[:200],
            "resources": resources,
            "network": {"mode": default.network, "allowCidrs": list(default.allow_cidrs),
                        "blockCidrs": list(default.block_cidrs)},
        }, sort_keys=False), actor)
        old = previous.image if previous is not None else None
        if old and old != image:
            try:
                await self.engine.remove_image(old)
            except EngineError as err:  # in use by a sandbox: it stays until removed by hand
                build.log(f"the previous image {old} stays: {err.message}", "warn")

    def status(self, template: str, build_id: str, offset: int) -> dict[str, Any]:
        return self._build(template, build_id).view(offset)

    async def alias(self, name: str) -> dict[str, Any]:
        """GET /templates/aliases/{alias}: a template of that name exists here."""
        await self.templates.get(check_template_name(name))
        return {"templateID": name, "public": False}


###############################################################################
# HTTP: requests, errors, surfaces, forwarding ################################
###############################################################################

def json_response(data: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer, compact (``{"gpu":true}``: the earlier server's CLI greps for that)."""
    return web.Response(text=json.dumps(data, separators=(",", ":")), status=status,
                        headers=headers, content_type="application/json")


CONFIG_KEY = web.AppKey("config", Config)
ENGINE_KEY = web.AppKey("engine", Engine)
AUDIT_KEY = web.AppKey("audit", AuditLog)
SPACES_KEY = web.AppKey("spaces", Spaces)
EXECS_KEY = web.AppKey("execs", Execs)
FILES_KEY = web.AppKey("files", Files)
TERMINALS_KEY = web.AppKey("terminals", Terminals)
OBSERVER_KEY = web.AppKey("observer", Observer)
HOUSEKEEPER_KEY = web.AppKey("housekeeper", Housekeeper)
TEMPLATES_KEY = web.AppKey("templates", Templates)
FIREWALL_KEY = web.AppKey("firewall", Firewall)
NODES_KEY = web.AppKey("nodes", Nodes)
E2B_KEY = web.AppKey("e2b", E2b)
BUILDS_KEY = web.AppKey("e2b_builds", E2bBuilds)
GIT_KEY = web.AppKey("git", GitOps)
OPENAPI_KEY = web.AppKey("openapi", dict)  # the document, built once per app
ACTOR_KEY = web.RequestKey("actor", Actor)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HEADER_LIMIT = 128 << 10
FORWARD_HEADER = "X-Clawdspace-Node"
FORWARDED_MARK = "X-Clawdspace-Forwarded"
HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "transfer-encoding", "upgrade", "host"})
# What a route accepts as credentials, fixed where the route is declared, never chosen by the
# headers a request happens to carry. A request no route matches (404, 405) needs the key.
PUBLIC = "public"  # nothing (GET and HEAD only)
NODE_KEY = "key"  # the node's API key
BUILD_LINK = "build-link"  # an upload link E2bBuilds signed (its query), for that file only
ENVD_TOKEN = "envd"  # noqa: S105 - a route kind; one E2B sandbox's daemon token, for that sandbox only


@dataclasses.dataclass(frozen=True)
class Route:
    """A route, declared once: what the router serves, who may call it, whether it is
    forwarded, and (for /api routes) what the OpenAPI document says of it."""

    method: str
    path: str
    handler: Handler
    auth: str = NODE_KEY
    summary: str = ""
    ok: dict[str, Any] | None = None  # the success response (OpenAPI response object)
    errors: tuple[int, ...] = ()  # 4xx statuses besides 401/503 (and 400/413 with a body)
    body: dict[str, Any] | None = None  # JSON request body schema
    params: tuple[dict[str, Any], ...] = ()
    ok_status: str = "200"
    node_local: bool = False  # answered by the node asked, never forwarded with ?node=
    doc: dict[str, Any] = dataclasses.field(default_factory=dict)  # operation overrides


ErrorShape = Callable[[int, str, str, "dict[str, str] | None"], web.Response]
ErrorShapeOf = Callable[[web.Request], ErrorShape]  # a surface's error shape for a request
Credentials = Callable[[web.Request], Actor]
ForwardRule = Callable[[web.Request, Route], Awaitable["web.StreamResponse | None"]]


@dataclasses.dataclass(frozen=True)
class Surface:
    """A group of routes with one rule each for error shapes, credentials and forwarding: the
    service's own /api, and E2B's protocols, which know nothing of each other."""

    name: str
    routes: tuple[Route, ...]
    error_shape: ErrorShapeOf
    credentials: dict[str, Credentials]  # route auth kind -> check (raises Unauthorized)
    forward: ForwardRule  # a response when the request is served elsewhere, else None
    # Whether a request no route matches is one of this surface's (its 404/405 then has the
    # surface's error shape).
    claims: Callable[[web.Request], bool] = lambda request: False


def json_error(status: int, message: str, code: str,
               headers: dict[str, str] | None = None) -> web.Response:
    """The service's error shape: ``{"error", "code"}``."""
    return json_response({"error": message, "code": code}, status=status, headers=headers)


HTTP_CODES = {400: "invalid", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
              415: "unsupported_media_type"}


async def answer_errors(request: web.Request, handler: Handler,
                        shape: ErrorShape) -> web.StreamResponse:
    """Every failure of ``handler`` as an error response of ``shape`` with the right status."""
    try:
        return await handler(request)
    except ClawdError as err:
        return shape(err.status, err.message, err.code, None)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        headers = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else None
        message = {404: "no such route", 413: "request body too large"}.get(err.status,
                                                                         err.reason)
        return shape(err.status, message, HTTP_CODES.get(err.status, "http_error"), headers)
    except EngineError as err:
        log.warning("docker: %s %s: %s", request.method, request.path, err.message)
        if err.status in (404, 409):
            return shape(err.status, err.message,
                         "not_found" if err.status == 404 else "conflict", None)
        return shape(503, f"the Docker engine refused: {err.message}", "docker_error", None)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return shape(500, "internal error (see the service log)", "internal", None)


def presented_key(request: web.Request) -> str | None:
    """Bearer header, ``?key=``, or X-API-Key (what E2B's SDK sends)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.query.get("key") or request.headers.get("X-API-Key") or None


def key_credentials(config: Config) -> dict[str, Credentials]:
    """The checks of the public and node-key route kinds."""
    expected = (config.api_key or "").encode("utf-8", "surrogateescape")

    def public(request: web.Request) -> Actor:
        if request.method not in ("GET", "HEAD"):
            return node_key(request)
        return Actor(key_id=None, addr=request.remote)

    def node_key(request: web.Request) -> Actor:
        if config.auth_disabled:
            return Actor(key_id=None, addr=request.remote)
        key = presented_key(request)
        if key is None or not hmac.compare_digest(
                key.encode("utf-8", "surrogateescape"), expected):
            log.warning("auth: rejected %s %s from %s (%s)", request.method, request.path,
                        request.remote, "no key" if key is None else "wrong key")
            raise Unauthorized("Unauthorized")
        return Actor(key_id=key_id(key), addr=request.remote)

    return {PUBLIC: public, NODE_KEY: node_key}


def surface_handler(surface: Surface, route: Route) -> Handler:
    """``route``'s handler inside its surface's rules: errors shaped, credentials checked,
    then forwarded or served here."""

    async def checked(request: web.Request) -> web.StreamResponse:
        request[ACTOR_KEY] = surface.credentials[route.auth](request)
        forwarded = await surface.forward(request, route)
        if forwarded is not None:
            return forwarded
        return await route.handler(request)

    async def serve(request: web.Request) -> web.StreamResponse:
        return await answer_errors(request, checked, surface.error_shape(request))

    return serve


def unmatched_middleware(config: Config, surfaces: tuple[Surface, ...]) -> Any:
    """A request no route matches: the key first (so the router's answers reveal nothing to
    a stranger), then the 404 or 405, in the error shape of the surface that claims the
    request (the service's own by default)."""
    check = key_credentials(config)[NODE_KEY]

    async def refuse(request: web.Request, handler: Handler) -> web.StreamResponse:
        check(request)
        return await handler(request)

    @web.middleware
    async def unmatched(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.http_exception is None:
            return await handler(request)
        owner = next((s for s in surfaces if s.claims(request)), None)
        shape = json_error if owner is None else owner.error_shape(request)
        return await answer_errors(request, functools.partial(refuse, handler=handler), shape)

    return unmatched


def actor(request: web.Request) -> Actor:
    """Who is calling, as the route's credentials check established it."""
    return request.get(ACTOR_KEY) or Actor(key_id=None, addr=request.remote)


async def read_body(request: web.Request) -> bytes:
    """The whole (size-capped) body; a client that stops sending it gets 408."""
    try:
        return await asyncio.wait_for(request.read(), request.app[CONFIG_KEY].body_timeout)
    except asyncio.TimeoutError:
        raise BodyTimeout("the request body stopped arriving") from None


async def json_body(request: web.Request) -> dict[str, Any]:
    raw = await read_body(request)
    if not raw.strip():
        raise BadRequest("a JSON object body is required", "invalid_json")
    body = load_json(raw, "the body")
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", "invalid_json")
    return body


async def optional_json_body(request: web.Request) -> dict[str, Any]:
    return await json_body(request) if request.can_read_body else {}


def body_chunks(request: web.Request,
                read: Callable[[], Awaitable[bytes]] | None = None) -> Iterator[bytes]:
    """The request body (or what ``read`` gives, a part of it) as a blocking iterator, for a
    writer thread; it pulls from the loop."""
    loop = asyncio.get_running_loop()
    timeout = request.app[CONFIG_KEY].body_timeout
    read = read or request.content.readany

    async def next_chunk() -> bytes:
        try:
            chunk = await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError:
            log.warning("upload from %s stalled for %d s; dropped", request.remote, timeout)
            raise BodyTimeout(f"the request body stopped arriving for {timeout} s") from None
        except (OSError, aiohttp.ClientError, aiohttp.http_exceptions.HttpProcessingError,
                ValueError) as err:
            # The client went away mid-body (a ConnectionResetError, which the writer would
            # take for the command's own end): never an end of the body.
            raise BadRequest(f"the request body was cut short: {err}",
                             "body_incomplete") from None
        if not chunk and (request.transport is None or request.transport.is_closing()):
            # The end of a body whose client is gone: cut short (aiohttp ends a chunked
            # body that stops midway as if it were whole).
            raise BadRequest("the request body was cut short", "body_incomplete")
        return bytes(chunk)

    def chunks() -> Iterator[bytes]:
        while True:
            chunk = asyncio.run_coroutine_threadsafe(next_chunk(), loop).result()
            if not chunk:
                return
            yield chunk

    return chunks()


def body_size(request: web.Request) -> int | None:
    """The size of the body as a handler reads it: Content-Length, unless the body is sent
    chunked or encoded (aiohttp decodes gzip, so the length on the wire is not its size)."""
    encoded = request.headers.get("Content-Encoding", "identity").strip().lower()
    return request.content_length if encoded in ("", "identity") else None


def sized_body(request: web.Request, what: str) -> tuple[int, Iterator[bytes]]:
    """(Content-Length, the body's chunks) of a streamed upload; 411 without a length."""
    size = body_size(request)
    if size is None:
        raise LengthRequired(f"{what} need a Content-Length header (and no Content-Encoding)")
    return size, body_chunks(request)


def query_bool(request: web.Request, name: str, default: bool = False) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS and word:  # ?flag= (empty) is a mistake, not a "false"
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


async def send_file(request: web.Request, stream: FileStream) -> web.StreamResponse:
    """Stream a file of a space as the response body, its length announced first."""
    try:
        answer = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream",
            "Content-Length": str(stream.length),
            "X-Clawdspace-Size": str(stream.size),
            "X-Clawdspace-Truncated": "true" if stream.length < stream.size else "false",
        })
        await answer.prepare(request)
        async for chunk in stream.chunks():
            await answer.write(chunk)
        if stream.short:
            # The file shrank after its length was promised: end the connection rather than
            # let the client take a short body for the whole file.
            if request.transport is not None:
                request.transport.abort()
            return answer
        await answer.write_eof()
        return answer
    finally:
        await stream.close()


async def forward_named(request: web.Request, nodes: Nodes,
                        route: Route) -> web.StreamResponse | None:
    """``?node=NAME`` (or the X-Clawdspace-Node header) sends the request to that node; None
    when it is for this one."""
    target = request.query.get("node") or request.headers.get(FORWARD_HEADER)
    if not target or request.headers.get(FORWARDED_MARK) or route.node_local \
            or target == nodes.self_name():
        return None
    if not nodes.nodes:
        await nodes.refresh()
    node = nodes.find(target)
    if node.get("self"):
        return None
    if node["status"] != "online":
        node = await nodes.recheck(node)  # the cache may be older than the node's start
    if node["status"] != "online":
        raise BadGateway(f"node {target} is {node['status']}"
                         f"{': ' + node['error'] if node.get('error') else ''}")
    return await forward_request(request, nodes, node)


async def forward_request(request: web.Request, nodes: Nodes,
                          node: NodeInfo) -> web.StreamResponse:
    """Send this request to another node with the same key, streaming both ways."""
    query = [(k, v) for k, v in request.query.items() if k not in ("node", "key")]
    target = f"{node['url']}{request.path}"
    headers = {k: v for k, v in request.headers.items()
               if k.lower() not in HOP_HEADERS and k != FORWARD_HEADER}
    headers[FORWARDED_MARK] = nodes.self_name()
    headers["Authorization"] = f"Bearer {presented_key(request) or ''}"
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await forward_websocket(request, nodes, node, target, query, headers)
    try:
        upstream = await nodes.client().request(
            request.method, target, params=query, headers=headers,
            data=request.content if request.body_exists else None, allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=NODE_PROBE_TIMEOUT,
                                          sock_read=nodes.config.exec_max_timeout + 60))
    except asyncio.TimeoutError:
        raise GatewayTimeout(f"node {node['name']} did not answer in time") from None
    except aiohttp.ClientError as err:
        raise BadGateway(f"node {node['name']} is unreachable: {err}") from None
    async with upstream:
        answer = web.StreamResponse(status=upstream.status, headers={
            k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS})
        await answer.prepare(request)
        async for chunk in upstream.content.iter_chunked(FILE_CHUNK):
            await answer.write(chunk)
        await answer.write_eof()
        return answer

async def forward_websocket(request: web.Request, nodes: Nodes, node: NodeInfo, target: str,
                            query: list[tuple[str, str]],
                            headers: dict[str, str]) -> web.StreamResponse:
    headers = {k: v for k, v in headers.items() if not k.lower().startswith("sec-websocket")}
    try:
        upstream = await nodes.client().ws_connect(
            target, params=query, headers=headers, heartbeat=30,
            max_msg_size=TERMINAL_MAX_FRAME,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10))
    except aiohttp.WSServerHandshakeError as err:
        return json_error(err.status, f"node {node['name']} refused the terminal: "
                          f"{err.message}", "upstream_refused")
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
        raise BadGateway(f"node {node['name']} is unreachable: {err}") from None
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=TERMINAL_MAX_FRAME)
    await ws.prepare(request)

    async def pipe(source: Any, sink: Any) -> None:
        async for message in source:
            if message.type == aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif message.type == aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
            else:
                break

    tasks = [asyncio.ensure_future(pipe(ws, upstream)),
             asyncio.ensure_future(pipe(upstream, ws))]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    code = upstream.close_code or 1000
    await upstream.close()
    await ws.close(code=code, message=b"upstream closed")
    return ws


class RedactingAccessLogger(AbstractAccessLogger):
    """Access log lines without query strings, so a ``?key=`` never reaches the log."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %d %.1fms", request.remote, request.method, request.path,
                         response.status, time * 1000)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


###############################################################################
# Handlers: the /api surface ##################################################
###############################################################################

def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """An OpenAPI response object with a JSON body."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


NAME_PARAM = {"name": "name", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": SPACE_NAME_RE.pattern, "maxLength": 128}}
TEMPLATE_PARAM = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
PROCESS_PARAM = {"name": "id", "in": "path", "required": True,
                 "schema": {"type": "string", "examples": ["p-0123456789ab"]}}
PATH_PARAM = {"name": "path", "in": "query", "required": True,
              "description": "Path relative to /workspace, e.g. /src/main.py",
              "schema": {"type": "string", "maxLength": 4096}}
MESSAGE = {"type": "object", "required": ["message"],
           "properties": {"message": {"type": "string"}}}
SPACE_RESPONSE = json_content({"type": "object", "required": ["space"],
                               "properties": {"space": ref("Space")}}, "The space")
BINARY = {"type": "string", "format": "binary"}
PROCESS_RESPONSE = json_content({"type": "object", "required": ["process"],
                                 "properties": {"process": ref("Process")}}, "The process")


def query_param(name: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", **extra, "schema": schema}


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    try:
        await asyncio.wait_for(engine.ping(), 2)
        docker_state: dict[str, Any] = {"ok": True}
    except (ClawdError, EngineError, asyncio.TimeoutError) as err:
        message = err.message if isinstance(err, (ClawdError, EngineError)) \
            else "no answer within 2 s"
        docker_state = {"ok": False, "error": message}
    ok = bool(docker_state["ok"])
    return json_response(
        {"status": "ok" if ok else "degraded", "version": VERSION, "docker": docker_state,
         "firewall": request.app[FIREWALL_KEY].status()},
        status=200 if ok else 503)


async def get_openapi(request: web.Request) -> web.Response:
    return json_response(request.app[OPENAPI_KEY])


async def get_system(request: web.Request) -> web.Response:
    return json_response(await system_info(request.app[CONFIG_KEY], request.app[ENGINE_KEY]))


async def get_capabilities(request: web.Request) -> web.Response:
    caps = await capabilities(request.app[CONFIG_KEY], request.app[ENGINE_KEY])
    return json_response({**caps, "firewall": request.app[FIREWALL_KEY].status()})


async def get_nodes(request: web.Request) -> web.Response:
    nodes = request.app[NODES_KEY]
    if query_bool(request, "refresh") or not nodes.nodes:
        await nodes.refresh()
    return json_response({"nodes": nodes.nodes, "lastUpdatedAt": nodes.updated_ms})


async def list_spaces(request: web.Request) -> web.Response:
    scope = request.query.get("scope", "node")
    if scope not in ("node", "cluster"):
        raise BadRequest("scope must be node or cluster", "invalid_scope")
    local = await request.app[SPACES_KEY].list_all()
    if scope == "node":
        return json_response({"spaces": local})
    nodes = request.app[NODES_KEY]
    if not nodes.nodes:
        await nodes.refresh()
    return json_response(await nodes.cluster_spaces(local))


async def create_space(request: web.Request) -> web.Response:
    body = await json_body(request)
    template = await request.app[TEMPLATES_KEY].for_space(body.get("template", "default"))
    req = parse_create(body, request.app[CONFIG_KEY], template)
    try:
        space = await request.app[GIT_KEY].create(req, actor(request))
    except NoGpu as err:
        others = request.app[NODES_KEY].with_gpu()
        if others:
            raise NoGpu(f"{err.message}; nodes with GPUs: {', '.join(others)} (create there, "
                        "or add ?node=NAME)") from None
        raise
    return json_response({"space": space}, status=201)


async def get_space(request: web.Request) -> web.Response:
    return json_response({"space": await request.app[SPACES_KEY].get(
        request.match_info["name"])})


async def delete_space(request: web.Request) -> web.Response:
    remove_volume = query_bool(request, "removeVolume")
    await request.app[SPACES_KEY].destroy(request.match_info["name"], remove_volume,
                                          actor(request))
    return json_response({"message": "Space destroyed"})


async def stop_space(request: web.Request) -> web.Response:
    await request.app[SPACES_KEY].pause(request.match_info["name"], actor(request))
    return json_response({"message": "Space paused"})


async def start_space(request: web.Request) -> web.Response:
    await request.app[SPACES_KEY].start(request.match_info["name"], actor(request))
    return json_response({"message": "Space started"})


async def exec_space(request: web.Request) -> web.StreamResponse:
    name = check_space_name(request.match_info["name"])
    req, mode = parse_exec(await json_body(request), request.app[CONFIG_KEY])
    execs = request.app[EXECS_KEY]
    if mode == "wait":
        return json_response(await execs.exec(name, req, actor(request)))
    process = await execs.background(name, req, actor(request))
    if mode == "background":
        return json_response({"process": process.view()}, status=202)
    return await send_output(request, execs, name, process.id, 0, True)


class OutputEvents:
    """A command's output as NDJSON events: UTF-8 text in ``data`` (a character split across
    pieces waits for its end), and ``b64`` for bytes that are no text."""

    def __init__(self) -> None:
        self.decoders = {stream: codecs.getincrementaldecoder("utf-8")() for stream in (1, 2)}
        self.pending = {1: b"", 2: b""}

    def events(self, stream: int, data: bytes, final: bool = False) -> list[dict[str, Any]]:
        kind = "stdout" if stream == 1 else "stderr"
        try:
            text = self.decoders[stream].decode(data, final)
        except UnicodeDecodeError:
            raw, self.pending[stream] = self.pending[stream] + data, b""
            self.decoders[stream].reset()
            return [{"type": kind, "b64": base64.b64encode(raw).decode()}]
        self.pending[stream] = self.decoders[stream].getstate()[0]
        return [{"type": kind, "data": text}] if text else []

    def held(self, stream: int) -> int:
        """Bytes of a character cut across pieces, waiting for the rest of it."""
        return len(self.pending[stream])

    def flush(self) -> list[dict[str, Any]]:
        """What is left at the end: a cut character, as bytes."""
        return [event for stream in (1, 2) if self.pending[stream]
                for event in self.events(stream, b"", final=True)]


async def send_output(request: web.Request, execs: Execs, name: str, process_id: str,
                      offset: int, wait: bool) -> web.StreamResponse:
    """A process's output as NDJSON, one event per line, flushed as it arrives: ``start``
    (with the offset it starts at and the oldest kept), ``stdout``/``stderr`` (``next`` is
    the offset to resume from), ``keepalive``, then ``exit`` once the process has ended (or
    ``more`` when not waiting for it). A client that goes away stops only its own reading."""
    process = await execs.get_process(name, process_id)
    answer = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                         "Cache-Control": "no-store"})
    await answer.prepare(request)

    async def send(event: dict[str, Any]) -> None:
        await answer.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")

    oldest = (process["output"] or {}).get("oldest", 0)
    await send({"type": "start", "id": process_id, "pid": process["pid"],
                "offset": max(offset, oldest), "oldest": oldest})
    text = OutputEvents()
    position = max(offset, oldest)
    try:
        async for piece in execs.follow(name, process_id, offset, wait):
            if piece is None:
                await send({"type": "keepalive"})
                continue
            start, stream, data = piece
            position = start + len(data)
            for event in text.events(stream, data):
                await send({**event, "next": position - text.held(stream)})
        for event in text.flush():
            await send({**event, "next": position})
        result = execs.result(name, process_id)
        if result is not None:
            await send({"type": "exit", **result})
        else:
            await send({"type": "more", "next": position})
        await answer.write_eof()
    except (ConnectionResetError, RuntimeError):
        pass  # the client went away; the process goes on
    return answer


async def process_output(request: web.Request) -> web.StreamResponse:
    name = check_space_name(request.match_info["name"])
    offset = query_int(request, "offset", 0, 0, 1 << 62)
    return await send_output(request, request.app[EXECS_KEY], name, request.match_info["id"],
                             offset, query_bool(request, "follow"))


async def process_stdin(request: web.Request) -> web.Response:
    name = check_space_name(request.match_info["name"])
    eof = False
    if request.content_type == "application/octet-stream":
        data = await read_body(request)
    else:
        body = await json_body(request)
        check_fields(body, {"data", "b64", "eof"})
        eof = check_bool("eof", body.get("eof", False))
        text, encoded = body.get("data"), body.get("b64")
        if text is not None and not isinstance(text, str) or encoded is not None and (
                not isinstance(encoded, str) or text is not None):
            raise BadRequest("give data (text) or b64 (bytes), not both", "invalid_stdin")
        data = decode_base64(encoded, "b64", "invalid_stdin") if encoded is not None \
            else (text or "").encode()
    return json_response({"process": await request.app[EXECS_KEY].write_stdin(
        name, request.match_info["id"], data, eof, actor(request))})


async def touch_space(request: web.Request) -> web.Response:
    name = check_space_name(request.match_info["name"])
    spaces = request.app[SPACES_KEY]
    await spaces.running(name, actor(request))
    spaces.activity.touch(name)
    return json_response({"message": "OK", "lastActivity": epoch_to_iso(
        spaces.activity.last(name) or spaces.activity.clock())})


async def list_processes(request: web.Request) -> web.Response:
    processes = await request.app[EXECS_KEY].list_processes(request.match_info["name"])
    return json_response({"processes": processes})


async def get_process(request: web.Request) -> web.Response:
    return json_response({"process": await request.app[EXECS_KEY].get_process(
        request.match_info["name"], request.match_info["id"])})


async def signal_process(request: web.Request) -> web.Response:
    body = await json_body(request)
    check_fields(body, {"signal"})
    return json_response({"process": await request.app[EXECS_KEY].signal_process(
        request.match_info["name"], request.match_info["id"], body.get("signal"),
        actor(request))})


async def resize_process(request: web.Request) -> web.Response:
    return json_response({"process": await request.app[EXECS_KEY].resize_process(
        request.match_info["name"], request.match_info["id"], await json_body(request))})


async def kill_process(request: web.Request) -> web.Response:
    return json_response({"process": await request.app[EXECS_KEY].signal_process(
        request.match_info["name"], request.match_info["id"], "KILL", actor(request))})


async def space_stats(request: web.Request) -> web.Response:
    info = await request.app[SPACES_KEY].inspect(request.match_info["name"])
    return json_response({"stats": await request.app[OBSERVER_KEY].stats(info)})


async def space_observability(request: web.Request) -> web.Response:
    top = query_int(request, "top", 8, 1, 25)
    lines = query_int(request, "historyLines", 50, 1, 500)
    observation = await request.app[OBSERVER_KEY].observe(request.match_info["name"], top, lines)
    return json_response({"observability": observation})


def wants_raw(request: web.Request) -> bool:
    if query_bool(request, "raw"):
        return True
    accept = request.headers.get("Accept", "")
    return accept.split(";")[0].strip() == "application/octet-stream"


def required_path(request: web.Request) -> str:
    path = request.query.get("path")
    if not path:
        raise BadRequest("path required", "invalid_path")
    return path


async def list_files(request: web.Request) -> web.Response:
    name = check_space_name(request.match_info["name"])
    limit = query_int(request, "limit", 1000, 1, 10000)
    listing = await request.app[FILES_KEY].list_dir(name, request.query.get("path"), limit,
                                                    actor(request))
    return json_response(listing)


async def read_file(request: web.Request) -> web.StreamResponse:
    name = check_space_name(request.match_info["name"])
    files, path = request.app[FILES_KEY], required_path(request)
    if wants_raw(request):
        max_bytes = (query_int(request, "maxBytes", 0, 0, 1 << 62)
                     if "maxBytes" in request.query else None)
        return await send_file(request, await files.open_stream(name, path, max_bytes,
                                                                actor(request)))
    max_bytes = query_int(request, "maxBytes", 262144, 0, request.app[CONFIG_KEY].file_read_limit)
    return json_response(await files.read(name, path, max_bytes, actor(request)))


async def write_file(request: web.Request) -> web.Response:
    name = check_space_name(request.match_info["name"])
    files, path = request.app[FILES_KEY], required_path(request)
    if request.content_type == "application/octet-stream":
        size, chunks = sized_body(request, "raw uploads")
        return json_response(await files.write(name, path, size, chunks, actor(request)))
    payload = await json_body(request)
    check_fields(payload, {"contentBase64"})
    encoded = payload.get("contentBase64")
    if not isinstance(encoded, str):
        raise BadRequest("contentBase64 required (a base64 string; empty for an empty file)",
                         "invalid_content")
    data = decode_base64(encoded, "contentBase64", "invalid_content")
    return json_response(await files.write(name, path, len(data), iter([data]),
                                               actor(request)))


async def delete_file(request: web.Request) -> web.Response:
    name = check_space_name(request.match_info["name"])
    path, recursive = required_path(request), query_bool(request, "recursive")
    return json_response(await request.app[FILES_KEY].delete(name, path, recursive,
                                                                 actor(request)))


def origin_allowed(request: web.Request, allowed: frozenset[str],
                   proxies: tuple[str, ...] = ()) -> bool:
    """Browsers send Origin on upgrades: only this node's own origin and configured ones pass.
    Behind a trusted reverse proxy that rewrites Host, the host the browser asked for is the
    proxy's X-Forwarded-Host (believed from those peers only)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser (curl, SDKs): the key is the guard
    if origin in allowed:
        return True
    hosts = {request.host, public_origin(request, proxies).partition("://")[2]}
    return any(origin in (f"http://{host}", f"https://{host}") for host in hosts)


def public_origin(request: web.Request, proxies: tuple[str, ...]) -> str:
    """``scheme://host`` as the client asked for it: a trusted proxy's X-Forwarded-Proto and
    X-Forwarded-Host (believed from those peers only), else the request's own."""
    scheme, host = request.scheme, request.host
    if peer_in(request.remote, proxies):
        host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip() or host
        scheme = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip() or scheme
    return f"{scheme}://{host}"


def peer_in(address: str | None, networks: tuple[str, ...]) -> bool:
    """Whether a peer address lies in one of ``networks``."""
    try:
        peer = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    return any(peer in ipaddress.ip_network(network) for network in networks)


async def terminal(request: web.Request) -> web.StreamResponse:
    name = check_space_name(request.match_info["name"])
    if not origin_allowed(request, request.app[CONFIG_KEY].allowed_origins,
                          request.app[CONFIG_KEY].trusted_proxies):
        log.warning("terminal: refused upgrade from origin %s", request.headers.get("Origin"))
        raise Forbidden("this Origin may not open terminals (see CLAWDSPACE_ALLOWED_ORIGINS)",
                        "bad_origin")
    cols = query_int(request, "cols", 80, 1, TERMINAL_MAX_COLS)
    rows = query_int(request, "rows", 24, 1, TERMINAL_MAX_ROWS)
    terminals = request.app[TERMINALS_KEY]
    session = await terminals.open(name, rows, cols, actor(request))
    pump: asyncio.Future[None] | None = None
    try:
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=TERMINAL_MAX_FRAME)
        await ws.prepare(request)
        pump = asyncio.ensure_future(terminal_output(ws, session))
        await terminal_input(ws, session)
        return ws
    finally:
        # Shielded: a cancelled handler (the client vanished) still ends the shell, closes
        # the engine connection and audits the close.
        await asyncio.shield(end_terminal(terminals, session, pump))


async def terminal_output(ws: web.WebSocketResponse, session: TerminalSession) -> None:
    """Shell output to binary frames, then the close, with why."""
    try:
        async for data in session.output():
            await ws.send_bytes(data)
        if session.shutting_down:
            await ws.close(code=1001, message=b"server shutting down")
        else:
            await ws.close(code=1000, message=b"shell exited")
    except (ConnectionResetError, RuntimeError):
        pass  # the client went away; the input side notices and the shell is ended


async def terminal_input(ws: web.WebSocketResponse, session: TerminalSession) -> None:
    """Binary frames are typed into the shell; text frames are JSON commands."""
    async for message in ws:
        session.touch()
        if message.type == web.WSMsgType.BINARY:
            await session.send(message.data)
        elif message.type == web.WSMsgType.TEXT:
            await terminal_command(ws, session, message.data)
        elif message.type == web.WSMsgType.ERROR:
            break


async def end_terminal(terminals: Terminals, session: TerminalSession,
                       pump: asyncio.Future[None] | None) -> None:
    await terminals.close(session)
    if pump is not None:
        try:
            await asyncio.wait_for(pump, 10)
        except asyncio.TimeoutError:
            log.error("terminal of %s: its output did not end after the shell", session.name)


async def terminal_command(ws: web.WebSocketResponse, session: TerminalSession,
                           text: str) -> None:
    try:
        command = json.loads(text)
    except ValueError:
        command = None
    if not isinstance(command, dict):
        await session.send(text.encode())  # plain text (no JSON command) is typed as it is
        return
    kind = command.get("type")
    if kind == "input" and isinstance(command.get("data"), str):
        await session.send(command["data"].encode())
    elif kind == "resize":
        cols, rows = command.get("cols"), command.get("rows")
        if not (isinstance(cols, int) and isinstance(rows, int)) or isinstance(
                cols, bool) or isinstance(rows, bool):
            await ws.send_json({"type": "error", "error": "resize needs integer cols and rows"})
            return
        await session.resize(rows, cols)
    elif kind == "ping":
        await ws.send_json({"type": "pong"})
    else:
        await ws.send_json({"type": "error", "error": f"unknown message type {kind!r}"})


async def process_attach(request: web.Request) -> web.StreamResponse:
    """A websocket onto a process: its output (from ``offset``, by default the oldest kept)
    as binary frames, then a text frame ``{"type": "exit", ...}`` and close 1000; binary
    frames and ``{"type": "input"}`` go to its stdin, ``eof``, ``resize`` and ``ping`` as the
    terminal's. Any number of clients may attach; one that leaves ends nothing."""
    name = check_space_name(request.match_info["name"])
    process_id = request.match_info["id"]
    if not origin_allowed(request, request.app[CONFIG_KEY].allowed_origins,
                          request.app[CONFIG_KEY].trusted_proxies):
        raise Forbidden("this Origin may not attach to processes (see "
                        "CLAWDSPACE_ALLOWED_ORIGINS)", "bad_origin")
    offset = query_int(request, "offset", 0, 0, 1 << 62)
    execs = request.app[EXECS_KEY]
    await execs.attach(name, process_id, actor(request))
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=TERMINAL_MAX_FRAME)
    await ws.prepare(request)
    pump = asyncio.ensure_future(attach_output(ws, execs, name, process_id, offset))
    try:
        async for message in ws:
            if message.type == web.WSMsgType.BINARY:
                await attach_command(ws, execs, name, process_id, {"data": message.data})
            elif message.type == web.WSMsgType.TEXT:
                try:
                    command = json.loads(message.data)
                except ValueError:
                    command = None
                await attach_command(ws, execs, name, process_id, command if isinstance(
                    command, dict) else {"data": message.data.encode()})
            elif message.type == web.WSMsgType.ERROR:
                break
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
    return ws


async def attach_output(ws: web.WebSocketResponse, execs: Execs, name: str, process_id: str,
                        offset: int) -> None:
    try:
        async for piece in execs.follow(name, process_id, offset, True):
            if piece is not None:  # quiet: the websocket's own heartbeat keeps it alive
                await ws.send_bytes(piece[2])
        result = execs.result(name, process_id)
        if result is None:
            await ws.close(code=1001, message=b"server shutting down")
        else:
            await ws.send_json({"type": "exit", **result})
            await ws.close(code=1000, message=b"process exited")
    except (ConnectionResetError, RuntimeError, ClawdError):
        pass  # the client went away (or the process was forgotten)


async def attach_command(ws: web.WebSocketResponse, execs: Execs, name: str, process_id: str,
                         command: dict[str, Any]) -> None:
    """One client frame of an attached process: bytes (``data``), or a JSON command."""
    kind = command.get("type", "input")
    try:
        if "data" in command and isinstance(command["data"], bytes):
            await execs.write_stdin(name, process_id, command["data"], False, None)
        elif kind == "input" and isinstance(command.get("data"), str):
            await execs.write_stdin(name, process_id, command["data"].encode(), False, None)
        elif kind == "eof":
            await execs.write_stdin(name, process_id, b"", True, None)
        elif kind == "resize":
            await execs.resize_process(name, process_id, {
                "cols": command.get("cols"), "rows": command.get("rows")})
        elif kind == "ping":
            await ws.send_json({"type": "pong"})
        else:
            await ws.send_json({"type": "error", "error": f"unknown message type {kind!r}"})
    except ClawdError as err:
        await ws.send_json({"type": "error", "error": err.message, "code": err.code})


async def git_push(request: web.Request) -> web.Response:
    name = check_space_name(request.match_info["name"])
    body = await json_body(request)
    return json_response(await request.app[GIT_KEY].push(name, body, actor(request)))


async def list_templates(request: web.Request) -> web.Response:
    return json_response({"templates": await request.app[TEMPLATES_KEY].list_all()})


async def get_template(request: web.Request) -> web.Response:
    template, text = await request.app[TEMPLATES_KEY].get(request.match_info["name"])
    return json_response({"name": template.name, "yaml": text,
                              "template": template.as_dict()})


async def put_template(request: web.Request) -> web.Response:
    body = await json_body(request)
    check_fields(body, {"yaml"})
    template = await request.app[TEMPLATES_KEY].put(body.get("yaml"), actor(request))
    return json_response({"template": template.as_dict()})


async def delete_template(request: web.Request) -> web.Response:
    await request.app[TEMPLATES_KEY].delete(request.match_info["name"], actor(request))
    return json_response({"message": "OK"})


async def get_audit(request: web.Request) -> web.Response:
    space = request.query.get("space") or None
    limit = query_int(request, "limit", 200, 1, 1000)
    events = await request.app[AUDIT_KEY].read(space, limit)
    return json_response({"events": events})


SPACE_LIST = {"type": "object", "required": ["spaces"],
              "properties": {"spaces": {"type": "array", "items": ref("Space")},
                             "errors": {"type": "array", "items": {"type": "object"}}}}
NODE_LIST = {"type": "object", "required": ["nodes", "lastUpdatedAt"], "properties": {
    "lastUpdatedAt": {"type": "integer"},
    "nodes": {"type": "array", "items": {
        "type": "object", "required": ["name", "url", "status"],
        "properties": {"name": {"type": "string"}, "url": {"type": "string"},
                       "status": {"enum": ["online", "offline", "degraded", "unknown"]},
                       "latencyMs": {"type": ["integer", "null"]},
                       "capabilities": {"type": ["object", "null"]}}}}}}
TEMPLATE_LIST = {"type": "object", "required": ["templates"], "properties": {"templates": {
    "type": "array", "items": {
        "type": "object", "required": ["name", "description", "source"],
        "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                       "source": {"enum": ["builtin", "shipped", "user"]}}}}}}
FILE_READ_RESPONSE = {**json_content(ref("FileContent"), "Content"), "content": {
    "application/json": {"schema": ref("FileContent")},
    "application/octet-stream": {"schema": BINARY}}}
FILE_WRITE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {
        "type": "object", "required": ["contentBase64"], "additionalProperties": False,
        "properties": {"contentBase64": {"type": "string", "contentEncoding": "base64"}}}},
    "application/octet-stream": {"schema": BINARY}}}}
GIT_PUSH_BODY = {"type": "object", "additionalProperties": False, "properties": {
    "repoPath": {"type": "string", "default": "/repo"},
    "remote": {"type": "string", "default": "origin"},
    "branch": {"type": "string", "default": "main"},
    "token": {"type": "string"}}}

# The service's own API: every route's method, path, handler, credential and document, once.
API_ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/health", health, PUBLIC, "Liveness and Docker engine reachability",
          json_content({"type": "object", "required": ["status", "version", "docker"],
                        "properties": {"status": {"enum": ["ok", "degraded"]},
                                       "version": {"type": "string"},
                                       "docker": {"type": "object"}}}, "Healthy"),
          node_local=True, doc={"responses": {
              "200": json_content({"type": "object"}, "Healthy"),
              "503": json_content({"type": "object"}, "The Docker engine does not answer")}}),
    Route("GET", "/api/openapi.json", get_openapi, PUBLIC, "This document",
          json_content({"type": "object"}, "OpenAPI 3.1"), node_local=True),
    Route("GET", "/api/system", get_system, NODE_KEY,
          "Host facts, Docker counts and capabilities", json_content(
              {"type": "object", "required": ["hostname", "cpus", "memory", "docker",
                                              "capabilities"]}, "System")),
    Route("GET", "/api/system/capabilities", get_capabilities, NODE_KEY,
          "GPU, CPU and memory of this node", json_content(ref("Capabilities"),
                                                           "Capabilities")),
    Route("GET", "/api/nodes", get_nodes, NODE_KEY,
          "Nodes of the cluster (refresh=true: probe now)", json_content(NODE_LIST, "Nodes"),
          (400,), params=(query_param("refresh", {"type": "boolean"}),), node_local=True),
    Route("GET", "/api/spaces", list_spaces, NODE_KEY,
          "List spaces (scope=cluster: every online node's)", json_content(SPACE_LIST, "Spaces"),
          (400,), params=(query_param("scope", {"enum": ["node", "cluster"]}),)),
    Route("POST", "/api/spaces", create_space, NODE_KEY, "Create a space", SPACE_RESPONSE,
          (409,), body=ref("CreateSpace"), ok_status="201"),
    Route("GET", "/api/spaces/{name}", get_space, NODE_KEY, "Get a space", SPACE_RESPONSE,
          (400, 404)),
    Route("DELETE", "/api/spaces/{name}", delete_space, NODE_KEY, "Destroy a space",
          json_content(MESSAGE, "Destroyed"), (400, 404, 409),
          params=(query_param("removeVolume", {"type": "boolean"}),)),
    Route("POST", "/api/spaces/{name}/stop", stop_space, NODE_KEY, "Pause a space",
          json_content(MESSAGE, "Paused"), (400, 404, 409)),
    Route("POST", "/api/spaces/{name}/start", start_space, NODE_KEY,
          "Resume or start a space", json_content(MESSAGE, "Started"), (400, 404, 409)),
    Route("POST", "/api/spaces/{name}/exec", exec_space, NODE_KEY,
          "Run a command (stream=true: NDJSON events as output arrives)",
          {**json_content(ref("ExecResult"), "Finished"), "content": {
              "application/json": {"schema": ref("ExecResult")},
              "application/x-ndjson": {"schema": ref("ExecEvent")}}},
          (404, 409, 429), body=ref("Exec")),
    Route("POST", "/api/spaces/{name}/touch", touch_space, NODE_KEY,
          "Mark a space active (resumes a paused one)", json_content(
              {"type": "object", "required": ["message", "lastActivity"],
               "properties": {"message": {"type": "string"},
                              "lastActivity": {"type": "string"}}}, "Touched"),
          (400, 404, 409)),
    Route("GET", "/api/spaces/{name}/processes", list_processes, NODE_KEY,
          "Processes of the space: running commands and shells, and recently ended ones",
          json_content({"type": "object", "required": ["processes"], "properties": {
              "processes": {"type": "array", "items": ref("Process")}}}, "Processes"),
          (400, 404)),
    Route("GET", "/api/spaces/{name}/processes/{id}", get_process, NODE_KEY, "One process",
          PROCESS_RESPONSE, (400, 404)),
    Route("POST", "/api/spaces/{name}/processes/{id}/signal", signal_process, NODE_KEY,
          "Signal a running process's group", PROCESS_RESPONSE, (404, 409),
          body={"type": "object", "required": ["signal"], "additionalProperties": False,
                "properties": {"signal": {"enum": list(PROCESS_SIGNALS)}}}),
    Route("GET", "/api/spaces/{name}/processes/{id}/output", process_output, NODE_KEY,
          "A background process's output from an offset (follow=true: then live, to its "
          "end), as NDJSON events", {"description": "Events", "content": {
              "application/x-ndjson": {"schema": ref("ExecEvent")}}}, (400, 404, 409),
          params=(query_param("offset", {"type": "integer", "minimum": 0}),
                  query_param("follow", {"type": "boolean"}))),
    Route("POST", "/api/spaces/{name}/processes/{id}/stdin", process_stdin, NODE_KEY,
          "Write to a process's stdin (raw bytes, or JSON data/b64; eof closes it)",
          PROCESS_RESPONSE, (400, 404, 409, 413), doc={"requestBody": {
              "required": True, "content": {
                  "application/json": {"schema": {
                      "type": "object", "additionalProperties": False, "properties": {
                          "data": {"type": "string"},
                          "b64": {"type": "string", "contentEncoding": "base64"},
                          "eof": {"type": "boolean"}}}},
                  "application/octet-stream": {"schema": BINARY}}}}),
    Route("POST", "/api/spaces/{name}/processes/{id}/resize", resize_process, NODE_KEY,
          "Resize a process's pseudo-terminal", PROCESS_RESPONSE, (404, 409),
          body={"type": "object", "required": ["cols", "rows"], "additionalProperties": False,
                "properties": {"cols": {"type": "integer", "minimum": 1, "maximum": 500},
                               "rows": {"type": "integer", "minimum": 1, "maximum": 200}}}),
    Route("GET", "/api/spaces/{name}/processes/{id}/attach", process_attach, NODE_KEY,
          "Websocket onto a process: binary frames are its output (from offset, default the "
          "oldest kept) and its stdin; text frames are JSON {type: input|eof|resize|ping}, "
          "and {type: exit} from the server at its end", {"description": "Switching protocols"},
          (400, 403, 404, 409), ok_status="101",
          params=(query_param("offset", {"type": "integer", "minimum": 0}),)),
    Route("DELETE", "/api/spaces/{name}/processes/{id}", kill_process, NODE_KEY,
          "Kill a running process's group (SIGKILL)", PROCESS_RESPONSE, (400, 404, 409)),
    Route("GET", "/api/spaces/{name}/stats", space_stats, NODE_KEY, "Resource usage now",
          json_content({"type": "object", "required": ["stats"],
                        "properties": {"stats": ref("Stats")}}, "Stats"), (400, 404)),
    Route("GET", "/api/spaces/{name}/observability", space_observability, NODE_KEY,
          "Stats, disk, top processes, history tail, settings", json_content(
              {"type": "object", "required": ["observability"],
               "properties": {"observability": ref("Observability")}}, "Observability"),
          (400, 404), params=(
              query_param("top", {"type": "integer", "minimum": 1, "maximum": 25}),
              query_param("historyLines", {"type": "integer", "minimum": 1, "maximum": 500}))),
    Route("GET", "/api/spaces/{name}/files", list_files, NODE_KEY,
          "List a directory of /workspace", json_content(ref("Listing"), "Entries"),
          (400, 403, 404, 409), params=(
              PATH_PARAM | {"required": False},
              query_param("limit", {"type": "integer", "minimum": 1, "maximum": 10000}))),
    Route("GET", "/api/spaces/{name}/file", read_file, NODE_KEY,
          "Read a file (JSON base64, or raw bytes with raw=true or Accept: "
          "application/octet-stream)", FILE_READ_RESPONSE, (400, 403, 404, 409), params=(
              PATH_PARAM, query_param("maxBytes", {"type": "integer", "minimum": 0}),
              query_param("raw", {"type": "boolean"}))),
    Route("PUT", "/api/spaces/{name}/file", write_file, NODE_KEY,
          "Write a file atomically (JSON base64, or a raw application/octet-stream "
          "body with Content-Length)", json_content(ref("FileWritten"), "Written"),
          (400, 403, 404, 409, 411, 413, 507), params=(PATH_PARAM,), doc=FILE_WRITE_BODY),
    Route("DELETE", "/api/spaces/{name}/file", delete_file, NODE_KEY,
          "Delete a file, or a directory with recursive=true", json_content(
              {"type": "object", "required": ["message", "path"],
               "properties": {"message": {"type": "string"}, "path": {"type": "string"}}},
              "Deleted"), (400, 403, 404, 409),
          params=(PATH_PARAM, query_param("recursive", {"type": "boolean"}))),
    Route("GET", "/api/spaces/{name}/terminal", terminal, NODE_KEY,
          "Websocket terminal (bash -l). Binary frames are stdin and output; text frames "
          "are JSON {type: input|resize|ping}", {"description": "Switching protocols"},
          (400, 403, 404, 409), ok_status="101", params=(
              query_param("cols", {"type": "integer", "minimum": 1,
                                   "maximum": TERMINAL_MAX_COLS}),
              query_param("rows", {"type": "integer", "minimum": 1,
                                   "maximum": TERMINAL_MAX_ROWS}))),
    Route("POST", "/api/spaces/{name}/git/push", git_push, NODE_KEY,
          "Push a branch from a repository in the space; the token only reaches git",
          json_content(ref("ExecResult"), "git push finished (see exitCode)"),
          (403, 404, 409), body=GIT_PUSH_BODY),
    Route("GET", "/api/templates", list_templates, NODE_KEY, "List templates",
          json_content(TEMPLATE_LIST, "Templates")),
    Route("PUT", "/api/templates", put_template, NODE_KEY,
          "Create or replace a template from YAML", json_content(
              {"type": "object", "required": ["template"],
               "properties": {"template": {"type": "object"}}}, "Stored"),
          body={"type": "object", "required": ["yaml"], "additionalProperties": False,
                "properties": {"yaml": {"type": "string"}}}),
    Route("GET", "/api/templates/{name}", get_template, NODE_KEY, "One template",
          json_content({"type": "object", "required": ["name", "yaml", "template"],
                        "properties": {"name": {"type": "string"}, "yaml": {"type": "string"},
                                       "template": {"type": "object"}}}, "Template"),
          (400, 404)),
    Route("DELETE", "/api/templates/{name}", delete_template, NODE_KEY,
          "Delete a user template (shipped ones can only be overridden)",
          json_content(MESSAGE, "Deleted"), (400, 404, 409)),
    Route("GET", "/api/audit", get_audit, NODE_KEY, "Audit events, oldest first", json_content(
        {"type": "object", "required": ["events"],
         "properties": {"events": {"type": "array", "items": ref("AuditEvent")}}}, "Events"),
          (400,), params=(
              query_param("space", {"type": "string"}),
              query_param("limit", {"type": "integer", "minimum": 1},
                          description="Default 200; values above 1000 are read as 1000"))),
)


def api_surface(config: Config, nodes: Nodes) -> Surface:
    """The /api routes: the service's error shape, the key, forwarding by ``?node=``."""

    async def forward(request: web.Request, route: Route) -> web.StreamResponse | None:
        return await forward_named(request, nodes, route)

    return Surface("api", API_ROUTES, lambda _: json_error, key_credentials(config), forward)


###############################################################################
# E2B surface: the control plane and the daemon protocol ######################
###############################################################################

# E2B's SDK talks two protocols to this node: the REST control plane (/sandboxes) with the
# node's key, and each sandbox's daemon ("envd": /files, Connect RPCs) with the sandbox's own
# token, the sandbox named by a header. Each is a surface of its own: its error shape, its
# credentials and its rule for requests about a sandbox another node holds.
E2B_ID_HEADER = "E2b-Sandbox-Id"
E2B_ENVD_PORT = "49983"
CONNECT_CODES = {400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied",
                 404: "not_found", 405: "unimplemented", 409: "failed_precondition",
                 501: "unimplemented",
                 411: "invalid_argument", 413: "resource_exhausted", 502: "unavailable",
                 503: "unavailable", 504: "deadline_exceeded", 507: "resource_exhausted"}
ENVD_INCARNATION_KEY = web.RequestKey("envd_incarnation", str)
ENVD_RPC_PATHS = ("/process.Process/", "/filesystem.Filesystem/")


def connect_envelope(message: dict[str, Any], end: bool = False) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">BI", 0x02 if end else 0x00, len(body)) + body


ENVD_MAX_MESSAGE = 4 << 20  # bytes of one message of a client stream


def read_envelope(raw: bytes) -> dict[str, Any]:
    if len(raw) < 5:
        raise BadRequest("empty Connect stream request", "invalid_argument")
    flags, size = struct.unpack(">BI", raw[:5])
    message = load_json(raw[5:5 + size], "the Connect message", "invalid_argument")
    if flags & 0x01 or not isinstance(message, dict):
        raise BadRequest("compressed or malformed Connect message", "invalid_argument")
    return message


def e2b_rest_error(status: int, message: str, code: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    """E2B's control-plane error: ``{"code": <status>, "message"}``, never to be retried."""
    return json_response({"code": status, "message": message}, status=status,
                             headers={**(headers or {}), "Should-Retry": "false"})


def connect_error(status: int, message: str, code: str,
                  headers: dict[str, str] | None = None) -> web.Response:
    """A Connect RPC error: ``{"code": <Connect code>, "message"}``."""
    connect = code if code in ("already_exists",) else CONNECT_CODES.get(status, "internal")
    return json_response({"code": connect, "message": message}, status=status,
                             headers=headers)


def envd_error_shape(request: web.Request) -> ErrorShape:
    """Connect errors for daemon calls; a request that names no sandbox is none, and gets
    the service's own shape."""
    return connect_error if E2B_ID_HEADER in request.headers else json_error


def envd_credentials(config: Config) -> dict[str, Credentials]:
    """The daemon routes take the token of the sandbox the request names, nothing else."""

    def token(request: web.Request) -> Actor:
        if config.auth_disabled:
            request[ENVD_INCARNATION_KEY] = ""
            return Actor(key_id=None, addr=request.remote)
        sandbox = request.headers.get(E2B_ID_HEADER, "")
        incarnation = envd_token_incarnation(config, sandbox,
                                             request.headers.get("X-Access-Token", ""))
        if incarnation is None:
            log.warning("auth: rejected envd %s %s from %s", request.method, request.path,
                        request.remote)
            raise Unauthorized("Unauthorized")
        request[ENVD_INCARNATION_KEY] = incarnation
        return Actor(key_id=None, addr=request.remote, sandbox=sandbox)

    return {PUBLIC: key_credentials(config)[PUBLIC], ENVD_TOKEN: token}


def forward_to_owner(nodes: Nodes, e2b: E2b,
                     sandbox_of: Callable[[web.Request], str | None]) -> ForwardRule:
    """A sandbox another node holds is served through this one (one URL for the whole
    cluster); ``?node=NAME`` still names a node outright."""

    async def forward(request: web.Request, route: Route) -> web.StreamResponse | None:
        named = await forward_named(request, nodes, route)
        if named is not None or request.query.get("node") or request.headers.get(
                FORWARD_HEADER) or request.headers.get(FORWARDED_MARK):
            return named
        sandbox = sandbox_of(request)
        if not sandbox or not SPACE_NAME_RE.fullmatch(sandbox) or route.node_local:
            return None
        node = await e2b.owner(sandbox)
        return None if node is None else await forward_request(request, nodes, node)

    return forward


async def e2b_create(request: web.Request) -> web.Response:
    body = await json_body(request)
    return json_response(await request.app[E2B_KEY].create(body, actor(request)), status=201)


async def e2b_list(request: web.Request) -> web.Response:
    """The sandbox list, a page at a time (``X-Next-Token`` names the next page)."""
    states = {state for given in request.query.getall("state", ["running,paused"])
              for state in given.split(",") if state}
    if not states <= {"running", "paused"}:
        raise BadRequest("state must be running and/or paused", "invalid_argument")
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("order must be asc or desc", "invalid_argument")
    token = request.query.get("nextToken")
    query = E2bListQuery(
        states=frozenset(states),
        metadata=tuple(urllib.parse.parse_qsl(request.query.get("metadata") or "")),
        template=request.query.get("template") or None,
        started_after=e2b_query_time(request, "startedAfter"),
        started_before=e2b_query_time(request, "startedBefore"), order=order,
        limit=query_int(request, "limit", 100, 1, 100),
        after=E2bListQuery.parse_token(token) if token else None)
    page, following = await request.app[E2B_KEY].list_sandboxes(query)
    return json_response(page, headers={"X-Next-Token": following} if following else None)


def e2b_query_time(request: web.Request, name: str) -> str | None:
    """An RFC 3339 time of the query, in E2B's startedAt form (UTC, whole seconds)."""
    text = request.query.get(name)
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name} must be an RFC 3339 time", "invalid_argument") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return e2b_time(when.timestamp())


async def e2b_get(request: web.Request) -> web.Response:
    return json_response(await request.app[E2B_KEY].get(request.match_info["id"]))


async def e2b_template_build(request: web.Request) -> web.Response:
    raise NotServed("this version of E2B's template build API is not served by this node: "
                    "use the SDK's Template.build (e2b 2.x), or build the image on the node "
                    "(docker build) and name it in a Clawdspace template's resources.image")


async def e2b_build_request(request: web.Request) -> web.Response:
    return json_response(request.app[BUILDS_KEY].request(await json_body(request)),
                         status=202)


async def e2b_build_file(request: web.Request) -> web.Response:
    base = public_origin(request, request.app[CONFIG_KEY].trusted_proxies)
    return json_response(request.app[BUILDS_KEY].file_link(
        request.match_info["template"], request.match_info["hash"], base), status=201)


async def e2b_build_upload(request: web.Request) -> web.Response:
    size = await request.app[BUILDS_KEY].store_file(
        request.match_info["template"], request.match_info["hash"], body_chunks(request),
        actor(request))
    return json_response({"bytes": size}, status=201)


async def e2b_build_start(request: web.Request) -> web.Response:
    await request.app[BUILDS_KEY].start(request.match_info["template"],
                                        request.match_info["build"], await json_body(request),
                                        actor(request))
    return web.Response(status=202)


async def e2b_build_status(request: web.Request) -> web.Response:
    offset = query_int(request, "logsOffset", 0, 0, 1 << 40)
    return json_response(request.app[BUILDS_KEY].status(
        request.match_info["template"], request.match_info["build"], offset))


async def e2b_template_alias(request: web.Request) -> web.Response:
    return json_response(await request.app[BUILDS_KEY].alias(request.match_info["alias"]))


async def e2b_metrics(request: web.Request) -> web.Response:
    return json_response(await request.app[E2B_KEY].metrics(request.match_info["id"]))


async def e2b_kill(request: web.Request) -> web.Response:
    await request.app[E2B_KEY].kill(request.match_info["id"], actor(request))
    return web.Response(status=204)


async def e2b_timeout(request: web.Request) -> web.Response:
    await request.app[E2B_KEY].set_timeout(request.match_info["id"], await json_body(request))
    return web.Response(status=204)


async def e2b_pause(request: web.Request) -> web.Response:
    await request.app[E2B_KEY].pause(request.match_info["id"], actor(request))
    return web.Response(status=204)


async def e2b_connect(request: web.Request) -> web.Response:
    status, sandbox = await request.app[E2B_KEY].connect(
        request.match_info["id"], await optional_json_body(request), actor(request))
    return json_response(sandbox, status=status)


def envd_target(request: web.Request) -> str:
    """The space an envd request is for (E2b-Sandbox-Id), on the daemon's port only."""
    sandbox = request.headers.get(E2B_ID_HEADER)
    if sandbox is None:
        raise NotFound("no such route")
    port = request.headers.get("E2b-Sandbox-Port", E2B_ENVD_PORT)
    if port != E2B_ENVD_PORT:
        raise BadGateway(f"port {port[:8]} of sandbox {sandbox[:80]} is not served here")
    if not SPACE_NAME_RE.fullmatch(sandbox):
        raise BadGateway(f"sandbox {sandbox[:80]} not found")
    return sandbox


async def envd_sandbox(request: web.Request) -> str:
    """The sandbox of an authenticated envd request, once its token's incarnation is known to
    be the sandbox's current container (the credentials check verified the signature)."""
    sandbox = envd_target(request)
    incarnation = request[ENVD_INCARNATION_KEY]
    if incarnation and not await request.app[E2B_KEY].is_incarnation(sandbox, incarnation):
        log.warning("auth: envd token of a gone sandbox %s from %s", sandbox, request.remote)
        raise Unauthorized("Unauthorized")
    return sandbox


async def envd_health(request: web.Request) -> web.Response:
    """204 for a running sandbox; 502 for a paused, killed or unknown one, as E2B's proxy
    answers (the SDK's ``is_running`` reads that)."""
    sandbox = envd_target(request)
    if not await request.app[E2B_KEY].is_running(sandbox):
        raise BadGateway(f"sandbox {sandbox} is not running", "sandbox_not_running")
    return web.Response(status=204)


async def envd_download(request: web.Request) -> web.StreamResponse:
    sandbox = await envd_sandbox(request)
    return await send_file(request, await request.app[E2B_KEY].download(
        sandbox, request.query.get("path"), actor(request)))


async def envd_upload(request: web.Request) -> web.Response:
    sandbox = await envd_sandbox(request)
    e2b, path, who = request.app[E2B_KEY], request.query.get("path"), actor(request)
    written = []
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, aiohttp.BodyPartReader) or part.name != "file":
                continue
            # Streamed, whatever its size (a file object comes chunked, with no length).
            written.append(await e2b.upload(sandbox, path or part.filename, None,
                                            body_chunks(request, part.read_chunk), who))
    else:
        written.append(await e2b.upload(sandbox, path, body_size(request),
                                        body_chunks(request), who))
    if not written:
        raise BadRequest("no file in the upload", "invalid_argument")
    return json_response(written)


async def envd_process(request: web.Request) -> web.StreamResponse:
    sandbox = await envd_sandbox(request)
    e2b, method = request.app[E2B_KEY], request.match_info["method"]
    if method in ("Start", "Connect"):
        return await envd_start(request, e2b, sandbox, method)
    if method == "StreamInput":
        return await envd_stream_input(request, e2b, sandbox)
    body = await optional_json_body(request)
    if method in ("SendInput", "CloseStdin"):
        return json_response(await e2b.send_input(sandbox, body, actor(request),
                                                      eof=method == "CloseStdin"))
    if method == "Update":
        return json_response(await e2b.update_process(sandbox, body))
    if method == "List":
        return json_response(await e2b.list_processes(sandbox))
    if method == "SendSignal":
        return json_response(await e2b.signal(sandbox, body, actor(request)))
    raise NotFound(f"process.Process/{method[:40]} is not supported by this node")


async def envd_start(request: web.Request, e2b: E2b, sandbox: str,
                     method: str) -> web.StreamResponse:
    """Process/Start or Connect: a Connect server stream of the command's events."""
    message = read_envelope(await read_body(request))
    timeout_ms = request.headers.get("Connect-Timeout-Ms", "")
    timeout = int(timeout_ms) / 1000 if re.fullmatch(r"[0-9]{1,12}", timeout_ms) else None
    keepalive = request.headers.get("Keepalive-Ping-Interval", "")
    ping_every = float(keepalive) if re.fullmatch(r"[0-9]{1,6}", keepalive) and int(
        keepalive) > 0 else 50.0
    if method == "Start":
        run = await e2b.start_process(sandbox, message, timeout, actor(request))
    else:
        run = await e2b.connect_process(sandbox, message)
    answer = web.StreamResponse(headers={"Content-Type": "application/connect+json"})

    try:
        async for event, last in run.events(ping_every):
            if not answer.prepared:
                await answer.prepare(request)
            await answer.write(connect_envelope(event, end=last))
            if last:
                await answer.write_eof()
    except (ConnectionResetError, RuntimeError):
        pass  # the client went away; the process runs on (a background process of the space)
    except E2bStreamCut as cut:
        log.info("envd stream cut: %s", cut)
        if request.transport is not None:
            request.transport.abort()
    return answer


async def envd_stream_input(request: web.Request, e2b: E2b, sandbox: str) -> web.Response:
    """Process/StreamInput: a client stream of envelopes, read as they arrive (one at a time,
    each bounded), answered once it ends."""
    async def messages() -> AsyncIterator[dict[str, Any]]:
        while True:
            try:
                head = await request.content.readexactly(5)
            except asyncio.IncompleteReadError as short:
                if short.partial:
                    raise BadRequest("a Connect envelope was cut short",
                                     "invalid_argument") from None
                return
            flags, size = struct.unpack(">BI", head)
            if size > ENVD_MAX_MESSAGE:
                raise BadRequest(f"a StreamInput message is over {ENVD_MAX_MESSAGE} bytes",
                                 "invalid_argument")
            try:
                body = await request.content.readexactly(size)
            except asyncio.IncompleteReadError:
                raise BadRequest("a Connect envelope was cut short",
                                 "invalid_argument") from None
            if flags & 0x02:
                return  # the client's end of stream
            yield read_envelope(head + body)

    result = await e2b.stream_input(sandbox, messages(), actor(request))
    return web.Response(body=connect_envelope(result) + connect_envelope({}, end=True),
                        content_type="application/connect+json")


async def envd_filesystem(request: web.Request) -> web.Response:
    sandbox = await envd_sandbox(request)
    return json_response(await request.app[E2B_KEY].filesystem(
        request.match_info["method"], sandbox, await optional_json_body(request),
        actor(request)))


# Paths of E2B's control plane: whatever this node does not serve under them is answered in
# E2B's error shape (the SDK raises its own exceptions, not KeyError).
E2B_REST_PATHS = ("/sandboxes", "/v2/sandboxes", "/templates", "/v2/templates",
                  "/v3/templates", "/snapshots", "/v2/snapshots", "/volumes", "/teams")
E2B_REST_ROUTES: tuple[Route, ...] = (
    Route("POST", "/sandboxes", e2b_create),
    Route("POST", "/v2/sandboxes", e2b_create),
    Route("GET", "/sandboxes", e2b_list),
    Route("GET", "/v2/sandboxes", e2b_list),
    Route("GET", "/sandboxes/{id}", e2b_get),
    Route("DELETE", "/sandboxes/{id}", e2b_kill),
    Route("POST", "/sandboxes/{id}/timeout", e2b_timeout),
    Route("POST", "/sandboxes/{id}/pause", e2b_pause),
    Route("GET", "/sandboxes/{id}/metrics", e2b_metrics),
    Route("POST", "/templates", e2b_template_build),
    Route("POST", "/v2/templates", e2b_template_build),
    Route("POST", "/v3/templates", e2b_build_request, node_local=True),
    Route("GET", "/templates/aliases/{alias}", e2b_template_alias, node_local=True),
    Route("GET", "/templates/{template}/files/{hash}", e2b_build_file, node_local=True),
    Route("PUT", "/templates/{template}/files/{hash}", e2b_build_upload, BUILD_LINK,
          node_local=True),
    Route("POST", "/v2/templates/{template}/builds/{build}", e2b_build_start,
          node_local=True),
    Route("GET", "/templates/{template}/builds/{build}/status", e2b_build_status,
          node_local=True),
    Route("POST", "/sandboxes/{id}/connect", e2b_connect),
    Route("POST", "/v2/sandboxes/{id}/connect", e2b_connect),
)
ENVD_ROUTES: tuple[Route, ...] = (
    Route("GET", "/health", envd_health, PUBLIC, node_local=True),
    Route("GET", "/files", envd_download, ENVD_TOKEN),
    Route("POST", "/files", envd_upload, ENVD_TOKEN),
    Route("POST", "/process.Process/{method}", envd_process, ENVD_TOKEN),
    Route("POST", "/filesystem.Filesystem/{method}", envd_filesystem, ENVD_TOKEN),
)


def build_link_credentials(builds: E2bBuilds) -> Credentials:
    """An upload route takes the link E2bBuilds signed for that template and file."""

    def link(request: web.Request) -> Actor:
        if not builds.link_valid(request.match_info.get("template", ""),
                                 request.match_info.get("hash", ""),
                                 request.query.get("expires", ""),
                                 request.query.get("signature", "")):
            log.warning("auth: rejected build upload %s from %s", request.path, request.remote)
            raise Unauthorized("Unauthorized (the upload link is wrong or has expired)")
        return Actor(key_id=None, addr=request.remote)

    return link


def e2b_surfaces(config: Config, nodes: Nodes, e2b: E2b,
                 builds: E2bBuilds) -> tuple[Surface, Surface]:
    """E2B's control plane (the node's key; uploads of build files their signed links) and
    the sandboxes' daemon (their tokens)."""
    rest = Surface("e2b", E2B_REST_ROUTES, lambda _: e2b_rest_error,
                   {NODE_KEY: key_credentials(config)[NODE_KEY],
                    BUILD_LINK: build_link_credentials(builds)},
                   forward_to_owner(nodes, e2b, lambda r: r.match_info.get("id")),
                   lambda r: r.path.startswith(E2B_REST_PATHS))
    envd = Surface("envd", ENVD_ROUTES, envd_error_shape, envd_credentials(config),
                   forward_to_owner(nodes, e2b, lambda r: r.headers.get(E2B_ID_HEADER)),
                   lambda r: E2B_ID_HEADER in r.headers and (
                       r.path in ("/health", "/files") or r.path.startswith(ENVD_RPC_PATHS)))
    return rest, envd


###############################################################################
# OpenAPI document ############################################################
###############################################################################

ERROR_WORDS = {400: "Invalid input", 401: "Missing or wrong API key",
               403: "Outside /workspace, or a foreign Origin", 404: "Not found",
               409: "Conflict with the space's state", 411: "Content-Length required",
               413: "Body too large", 429: "Too many processes in the space",
               507: "The space's disk is full",
               503: "The Docker engine or the audit log is unavailable"}


def error_responses(*statuses: int) -> dict[str, Any]:
    return {str(s): json_content(ref("Error"), ERROR_WORDS[s]) for s in statuses}


def operation(route: Route) -> dict[str, Any]:
    """The OpenAPI operation of a declared route."""
    public = route.auth == PUBLIC
    statuses = set(route.errors) | (set() if public else {401, 503})
    doc: dict[str, Any] = {
        "summary": route.summary,
        "responses": {route.ok_status: route.ok, **error_responses(*sorted(statuses))},
    }
    if route.params:
        doc["parameters"] = list(route.params)
    if route.body is not None:
        doc["requestBody"] = {"required": True,
                              "content": {"application/json": {"schema": route.body}}}
        doc["responses"].update(error_responses(400, 413))
    if public:
        doc["security"] = []
    return doc | route.doc


def component_schemas() -> dict[str, Any]:
    return {
        "Error": {"type": "object", "required": ["error", "code"],
                  "properties": {"error": {"type": "string"}, "code": {"type": "string"}}},
        "Space": space_schema(),
        "CreateSpace": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": SPACE_NAME_RE.pattern, "maxLength": 128},
                **{a.field: a.request_schema for a in SPACE_ATTRIBUTES
                   if a.request_schema is not None},
                "gpus": {"oneOf": [{"type": "integer", "minimum": 1, "maximum": 64},
                                   {"const": "all"}]},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "envFileText": {"type": "string"},
                "envFileBase64": {"type": "string", "contentEncoding": "base64"},
                "envFilePath": {"type": "string"},
                "repoUrl": {"type": "string", "format": "uri"},
                "repoBranch": {"type": "string"},
                "repoDest": {"type": "string"},
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
                "timeout": {"type": "number", "minimum": 0,
                            "description": "seconds; 0 (none) only with stream"},
                "stream": {"type": "boolean"}, "background": {"type": "boolean"},
                "stdin": {"type": "boolean"},
                "pty": {"type": "object", "required": ["cols", "rows"],
                        "additionalProperties": False, "properties": {
                            "cols": {"type": "integer", "minimum": 1, "maximum": 500},
                            "rows": {"type": "integer", "minimum": 1, "maximum": 200}}},
            },
        },
        "ExecEvent": {
            "type": "object", "required": ["type"],
            "properties": {"type": {"enum": ["start", "stdout", "stderr", "keepalive", "exit",
                                             "more"]},
                           "id": {"type": "string"}, "pid": {"type": ["integer", "null"]},
                           "offset": {"type": "integer"}, "oldest": {"type": "integer"},
                           "next": {"type": "integer"},
                           "data": {"type": "string"}, "b64": {"type": "string"},
                           "exitCode": {"type": "integer"}, "timedOut": {"type": "boolean"},
                           "oomKilled": {"type": "boolean"},
                           "durationMs": {"type": "integer"}},
        },
        "Process": {
            "type": "object",
            "required": ["id", "pid", "argv", "command", "cwd", "user", "envKeys", "pty",
                         "source", "status", "exitCode", "signal", "startedAt", "endedAt",
                         "stdoutBytes", "stderrBytes", "stdin", "result", "output"],
            "properties": {
                "id": {"type": "string"}, "pid": {"type": ["integer", "null"]},
                "argv": {"type": "array", "items": {"type": "string"}},
                "command": {"type": "string"}, "cwd": {"type": "string"},
                "user": {"type": "string"},
                "envKeys": {"type": "array", "items": {"type": "string"}},
                "pty": {"type": ["object", "null"]},
                "source": {"enum": ["api", "terminal", "e2b"]},
                "status": {"enum": list(PROCESS_STATUSES)},
                "exitCode": {"type": ["integer", "null"]},
                "signal": {"type": ["string", "null"]},
                "startedAt": {"type": "string"}, "endedAt": {"type": ["string", "null"]},
                "stdoutBytes": {"type": "integer"}, "stderrBytes": {"type": "integer"},
                "stdin": {"type": "boolean"}, "result": {"type": ["object", "null"]},
                "output": {"type": ["object", "null"]},
            },
        },
        "ExecResult": {
            "type": "object",
            "required": ["stdout", "stderr", "exitCode", "durationMs", "timedOut",
                         "oomKilled", "stdoutTruncated", "stderrTruncated"],
            "properties": {"stdout": {"type": "string"}, "stderr": {"type": "string"},
                           "exitCode": {"type": "integer"}, "durationMs": {"type": "integer"},
                           "timedOut": {"type": "boolean"},
                           "oomKilled": {"type": "boolean"},
                           "stdoutTruncated": {"type": "boolean"},
                           "stderrTruncated": {"type": "boolean"}},
        },
        "AuditEvent": {
            "type": "object", "required": ["ts", "type"],
            "properties": {"ts": {"type": "string"}, "type": {"type": "string"},
                           "space": {"type": "string"}, "meta": {"type": "object"},
                           "keyId": {"type": "string"}, "clientAddr": {"type": "string"}},
        },
        "Stats": {
            "type": "object",
            "required": ["cpuPercent", "memoryUsageBytes", "memoryLimitBytes", "pids",
                         "networkRxBytes", "networkTxBytes", "blockReadBytes",
                         "blockWriteBytes"],
            "properties": {"cpuPercent": {"type": "number"},
                           **{k: {"type": "integer"} for k in (
                               "memoryUsageBytes", "memoryLimitBytes", "pids", "networkRxBytes",
                               "networkTxBytes", "blockReadBytes", "blockWriteBytes")}},
        },
        "Observability": {
            "type": "object",
            "required": ["stats", "workspaceDisk", "workspaceSizeBytes", "top",
                         "bashHistoryTail", "oomKills", "status", "settings"],
            "properties": {
                "stats": ref("Stats"),
                "workspaceDisk": {"type": ["object", "null"]},
                "workspaceSizeBytes": {"type": ["integer", "null"]},
                "top": {"type": "array", "items": {"type": "object"}},
                "bashHistoryTail": {"type": ["string", "null"]},
                "oomKills": {"type": ["integer", "null"]},
                "status": {"type": "string"}, "settings": {"type": "object"},
            },
        },
        "Listing": {
            "type": "object", "required": ["path", "entries", "truncated"],
            "properties": {
                "path": {"type": "string"}, "truncated": {"type": "boolean"},
                "entries": {"type": "array", "items": {
                    "type": "object", "required": ["name", "path", "type", "size", "mtimeMs"],
                    "properties": {"name": {"type": "string"}, "path": {"type": "string"},
                                   "type": {"enum": ["file", "dir", "symlink", "other"]},
                                   "size": {"type": "integer"},
                                   "mtimeMs": {"type": "integer"},
                                   "mode": {"type": "integer"}, "owner": {"type": "string"},
                                   "group": {"type": "string"},
                                   "target": {"type": ["string", "null"]}}}},
            },
        },
        "FileContent": {
            "type": "object", "required": ["path", "contentBase64", "truncated", "size"],
            "properties": {"path": {"type": "string"}, "contentBase64": {"type": "string"},
                           "truncated": {"type": "boolean"}, "size": {"type": "integer"}},
        },
        "FileWritten": {
            "type": "object", "required": ["message", "path", "bytes"],
            "properties": {"message": {"type": "string"}, "path": {"type": "string"},
                           "bytes": {"type": "integer"}},
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


def openapi_document(routes: tuple[Route, ...] = API_ROUTES) -> dict[str, Any]:
    """OpenAPI 3.1 description of the /api routes, derived from their declarations."""
    paths: dict[str, Any] = {}
    for route in routes:
        item = paths.setdefault(route.path, {})
        if "{name}" in route.path and "parameters" not in item:
            item["parameters"] = [NAME_PARAM if route.path.startswith("/api/spaces/")
                                  else TEMPLATE_PARAM]
            if "{id}" in route.path:
                item["parameters"].append(PROCESS_PARAM)
        item[route.method.lower()] = operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Clawdspace", "version": VERSION,
                 "description": "Sandboxed Linux spaces on your own machines."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"queryKey": []}],
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "queryKey": {"type": "apiKey", "in": "query", "name": "key"},
            },
        },
        "paths": paths,
    }


###############################################################################
# App factory #################################################################
###############################################################################

def add_surface(app: web.Application, surface: Surface) -> None:
    for route in surface.routes:
        app.router.add_route(route.method, route.path, surface_handler(surface, route))


def create_app(config: Config) -> web.Application:
    """The aiohttp application for ``config``; tests build it directly."""
    config.check()
    if config.auth_disabled:
        log.warning("AUTHENTICATION IS DISABLED (CLAWDSPACE_AUTH_DISABLED=true): anyone who "
                    "can reach this port controls every space. Use only on a trusted dev box.")
    engine = Engine()
    audit = AuditLog(config.data_dir, config.audit_max_bytes, config.audit_keep,
                     Redactor([config.api_key or ""]))
    firewall = Firewall(config, engine)
    activity = Activity(os.path.join(config.data_dir, "activity.json"))
    spaces = Spaces(config, engine, audit, firewall, activity)
    execs = Execs(config, spaces)
    files = Files(spaces, execs)
    templates = Templates(config.shipped_templates_dir,
                          config.templates_dir or os.path.join(config.data_dir, "templates"),
                          audit)
    nodes = Nodes(config, engine)
    observer = Observer(spaces, execs)
    e2b = E2b(config, spaces, execs, Files(spaces, execs, root="/"), templates, nodes,
              observer)
    builds = E2bBuilds(config, engine, templates, audit)
    housekeeper = Housekeeper(config, spaces, files)
    terminals = Terminals(spaces, execs)
    surfaces = (api_surface(config, nodes), *e2b_surfaces(config, nodes, e2b, builds))
    app = web.Application(
        middlewares=[unmatched_middleware(config, surfaces)],
        client_max_size=config.max_body_bytes,
        # Long header lines (up to 128 KiB) get to the handlers (and a JSON 401/400), not
        # aiohttp's 8 KiB plain-text refusal; bounded in size and count, so what a client
        # sends before auth cannot grow the service (64 x 128 KiB at most per request).
        handler_args={"max_line_size": HEADER_LIMIT, "max_field_size": HEADER_LIMIT,
                      "max_headers": 64},
    )
    app[CONFIG_KEY] = config
    app[ENGINE_KEY] = engine
    app[AUDIT_KEY] = audit
    app[FIREWALL_KEY] = firewall
    app[SPACES_KEY] = spaces
    app[EXECS_KEY] = execs
    app[FILES_KEY] = files
    app[TEMPLATES_KEY] = templates
    app[NODES_KEY] = nodes
    app[E2B_KEY] = e2b
    app[BUILDS_KEY] = builds
    app[GIT_KEY] = GitOps(config, spaces, execs, files)
    app[TERMINALS_KEY] = terminals
    app[OBSERVER_KEY] = observer
    app[HOUSEKEEPER_KEY] = housekeeper
    app[OPENAPI_KEY] = openapi_document()
    for surface in surfaces:
        add_surface(app, surface)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        """Start the services in order at start; stop them in reverse at shutdown."""
        try:
            audit.open()
            for directory in (config.data_dir, templates.user_dir, builds.files_dir):
                if remove_temp_files(directory):
                    log.info("removed temporary files of interrupted writes in %s", directory)
            await spaces.startup()
            await execs.startup()
            if not await firewall.check():
                log.warning("egress firewall inactive: %s", firewall.error)
            await nodes.startup()
            await e2b.startup()
            await housekeeper.startup()
            yield
        finally:  # also after a failed start; each step whatever the one before did, and
            # the engine's sockets close last
            for step in (housekeeper.shutdown, execs.shutdown, builds.shutdown, e2b.shutdown,
                         nodes.shutdown, spaces.shutdown):
                try:
                    await step()
                except Exception:  # noqa: BLE001 - the rest must still be shut down
                    log.exception("shutdown: %s failed", getattr(step, "__qualname__", step))
            audit.close()
            await engine.close()

    async def end_terminals(app: web.Application) -> None:
        await execs.stop_following()
        await terminals.shutdown()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(end_terminals)
    return app




###############################################################################
# CLI / main ##################################################################
###############################################################################

async def remove_networks(config: Config) -> int:
    engine = Engine()
    firewall = Firewall(config, engine)
    try:
        for network in await firewall.our_networks():
            try:
                await firewall.remove_network(network["Name"])
                print(f"removed {network['Name']}")
            except EngineError as err:
                print(f"ERROR: {network['Name']}: {err.message}", file=sys.stderr)
                return 1
    except ClawdError as err:
        print(f"ERROR: {err.message}", file=sys.stderr)
        return 1
    finally:
        await engine.close()
    return 0


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
    commands.add_parser("remove-networks", help="remove this instance's bridge networks and "
                        "firewall rules (for uninstalling; spaces using them must be gone)")
    args = parser.parse_args(argv)
    if args.command == "version":
        print(VERSION)
        return 0
    if args.command == "remove-networks":
        return asyncio.run(remove_networks(Config.from_env()))
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
