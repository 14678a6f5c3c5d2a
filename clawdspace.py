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
CLAWDSPACE_MAX_BODY_BYTES   Largest request body accepted. Default ``8388608``.
CLAWDSPACE_BODY_TIMEOUT     Seconds a request body may go without sending a byte before the
                            request is dropped with 408. Default ``60``.
CLAWDSPACE_PIDS_LIMIT       Process limit per space. Default ``1024``.
CLAWDSPACE_AUDIT_MAX_BYTES  Audit file size that triggers rotation. Default ``52428800``.
CLAWDSPACE_AUDIT_KEEP       Rotated audit files kept. Default ``5``.
CLAWDSPACE_NVIDIA_SMI       nvidia-smi command used to detect GPUs. Default ``nvidia-smi``.
CLAWDSPACE_HISTORY_INTERVAL Seconds between shell history ingestions (0: off). Default ``15``.
CLAWDSPACE_ALLOWED_ORIGINS  Extra browser origins allowed to open terminals, comma-separated.
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
  the data directory and undone at start, exec timeouts are enforced inside the space too, and
  the service's own files are written atomically, one writer at a time.
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
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypedDict, TypeVar

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
# Constants & config ##########################################################
###############################################################################

WORKSPACE = "/workspace"
CGROUP_ROOT = "/sys/fs/cgroup"
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
    body_timeout: int = 60
    pids_limit: int = 1024
    audit_max_bytes: int = 50 << 20
    audit_keep: int = 5
    nvidia_smi: str = "nvidia-smi"
    history_interval: int = 15
    allowed_origins: frozenset[str] = frozenset()
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


class TooLarge(ClawdError):
    """The request body is over the limit (413)."""

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


class BadGateway(ClawdError):
    """Another node could not be reached (502)."""

    status, code = 502, "node_unreachable"


class GatewayTimeout(ClawdError):
    """Another node did not answer in time (504)."""

    status, code = 504, "node_timeout"


###############################################################################
# Models ######################################################################
###############################################################################

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
    gpus: list[str]
    template: str | None
    network: str
    writableRootfs: bool
    idleTimeout: int | None
    user: str
    lastActivity: str
    volume: SpaceVolume


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


def label_number(labels: dict[str, str], key: str, kind: Callable[[str], T], default: T) -> T:
    """A numeric label: labels are anyone's to write, so a malformed one reads as ``default``."""
    try:
        value = kind(labels.get(key) or "")
    except (ValueError, OverflowError):
        return default
    return value if not isinstance(value, float) or math.isfinite(value) else default


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


async def guarded(what: str, job: Callable[[], Awaitable[Any]]) -> None:
    """Run one round of a background job; whatever it raises is logged and the caller's loop
    goes on (expected failures as a line, anything else with its traceback)."""
    try:
        await job()
    except asyncio.CancelledError:
        raise
    except ClawdError as err:
        log.warning("%s: %s", what, err.message)
    except (docker.errors.APIError, OSError) as err:
        log.warning("%s: %s", what, err)
    except Exception:  # noqa: BLE001 - a background loop must never die of one bad round
        log.exception("%s failed unexpectedly; it goes on", what)


async def supervised(what: str, loop_forever: Callable[[], Awaitable[Any]]) -> None:
    """Run a background loop for the life of the service, restarting it if it ever ends."""
    while True:
        await guarded(what, loop_forever)
        log.error("%s stopped; restarting it in 1 s", what)
        await asyncio.sleep(1)


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
# Docker wrapper ##############################################################
###############################################################################

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

    async def close(self) -> None:
        """Let short calls finish (off the loop), drop stream readers, close the client."""
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.pool.shutdown(wait=True, cancel_futures=True))
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


class ExecSocket:
    """The hijacked socket of an exec stream, and the HTTP response that owns it.

    Both must be closed, or the engine connection leaks (docker-py keeps the response on the
    wrapper it returns from ``exec_start(socket=True)``).
    """

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper
        self.sock: ExecSocket = getattr(wrapper, "_sock", wrapper)
        self.sock.settimeout(None)

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shutdown(self, how: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(how)

    def close(self) -> None:
        response = getattr(self.wrapper, "_response", None)
        if response is not None:
            with contextlib.suppress(Exception):
                response.close()
        for closable in (self.wrapper, self.sock):
            with contextlib.suppress(OSError):
                closable.close()


EXEC_FRAME = struct.Struct(">BxxxL")  # Docker's multiplexed stream: stream id, length


def demux_frames(sock: ExecSocket, recv_size: int = 65536) -> Iterator[tuple[int, bytes]]:
    """(stream, bytes) pieces of an exec's multiplexed output, until the socket ends."""
    buffer = bytearray()
    stream, left = 0, 0
    while True:
        try:
            chunk = sock.recv(recv_size)
        except OSError:
            return
        if not chunk:
            return
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


class DemuxReader:
    """Collects an exec's stdout and stderr from its socket.

    Keeps at most ``limit`` bytes per stream and drains the rest, so a process that prints
    gigabytes ends normally instead of blocking on a full pipe, and memory stays bounded.
    """

    def __init__(self, sock: ExecSocket, limit: int) -> None:
        self.sock = sock
        self.limit = limit
        self.out = {1: bytearray(), 2: bytearray()}
        self.truncated = {1: False, 2: False}
        # When set, frames go here (streaming) instead of being collected.
        self.sink: Callable[[int, bytes], Any] | None = None

    def run(self) -> None:
        for stream, data in demux_frames(self.sock):
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


def kill_exec_group(host_pid: int, container_id: str,
                    sig: signal.Signals = signal.SIGKILL) -> int | None:
    """Signal an exec's process group from the host; return its pid inside the container.

    runc makes every exec a session and group leader, so the group holds the whole command
    tree. Returns the in-container pid when the host kill is not permitted (no CAP_KILL), so
    the caller can kill from inside instead; None when nothing is left to do. The process
    must be the container's (its cgroup names the container): where the engine's pids are
    not this host's (a remote engine), nothing is killed here.
    """
    try:
        with open(f"/proc/{host_pid}/cgroup", encoding="ascii", errors="replace") as cgroup:
            if container_id not in cgroup.read():
                return None
        with open(f"/proc/{host_pid}/status", encoding="ascii", errors="replace") as status:
            ns_pids = [line.split()[1:] for line in status if line.startswith("NSpid:")]
    except OSError:
        return None
    container_pid = int(ns_pids[0][-1]) if ns_pids and ns_pids[0] else None
    try:
        os.killpg(host_pid, sig)
        return None
    except ProcessLookupError:
        return None
    except PermissionError:
        return container_pid


###############################################################################
# Templates ###################################################################
###############################################################################

TEMPLATE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
REPO_DEST_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")
TEMPLATE_MAX_BYTES = 64 << 10
NETWORK_MODES = ("none", "internet")
TEMPLATE_KEYS: dict[str, Any] = {
    "name": None, "description": None, "idleTimeout": None,
    "resources": {"memory", "cpus", "gpu", "image"},
    "network": {"mode", "allowCidrs"},
    "security": {"writableRootfs"},
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
    writable_rootfs: bool = True
    idle_timeout: int | None = None
    default_repo_dest: str = "repo"
    source: str = "builtin"

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
            "network": {"mode": self.network, "allowCidrs": list(self.allow_cidrs)},
            "security": {"writableRootfs": self.writable_rootfs},
            "idleTimeout": self.idle_timeout,
            "workspace": {"defaultRepoDest": self.default_repo_dest},
            "source": self.source,
        }


BUILTIN_DEFAULT = Template(name="default", description="Internet access; LAN, tailnet, "
                           "cloud metadata and this node blocked")


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


def parse_template(text: str, source: str = "user") -> Template:
    """YAML (safe_load) against a closed schema; every error names its field."""
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
        if allowed is not None:
            if not isinstance(value, dict):
                raise BadRequest(f"{key} must be a mapping", "invalid_template")
            for sub in value:
                if sub not in allowed:
                    raise BadRequest(f"unknown template field {key}.{str(sub)[:64]}",
                                     "invalid_template")

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
    if mode not in NETWORK_MODES:
        raise BadRequest(f"network.mode must be one of {', '.join(NETWORK_MODES)}",
                         "invalid_template")
    cidrs = field("network", "allowCidrs") or []
    if not isinstance(cidrs, list) or len(cidrs) > 32:
        raise BadRequest("network.allowCidrs must be a list of at most 32 CIDRs",
                         "invalid_template")
    allow = tuple(sorted({check_cidr(c, "network.allowCidrs") for c in cidrs}))
    writable = field("security", "writableRootfs")
    if writable is not None and not isinstance(writable, bool):
        raise BadRequest("security.writableRootfs must be true or false", "invalid_template")
    idle = data.get("idleTimeout")
    if idle is not None and (isinstance(idle, bool) or not isinstance(idle, int) or idle < 0):
        raise BadRequest("idleTimeout must be a whole number of seconds (0: never)",
                         "invalid_template")
    dest = field("workspace", "defaultRepoDest")
    return Template(
        name=name, description=description, memory=memory_bytes,
        cpus=float(cpus) if cpus is not None else None, gpu=bool(gpu), image=image,
        network=mode, allow_cidrs=allow, writable_rootfs=writable is not False,
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

    Each allow-list (a template's ``network.allowCidrs``) gets its own bridge network with
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
        api = self.engine.api
        bridge = self.bridge_name(name)
        try:
            await self.engine.call(api.inspect_network, name)
        except docker.errors.NotFound:
            try:
                await self.engine.call(
                    api.create_network, name, driver="bridge", check_duplicate=True,
                    options={"com.docker.network.bridge.enable_icc": "false",
                             "com.docker.network.bridge.name": bridge},
                    labels={f"{LABEL}.instance": self.config.prefix,
                            f"{LABEL}.kind": "network", f"{LABEL}.allow": ",".join(allow)})
            except docker.errors.APIError as err:
                if api_status(err) != 409:
                    raise Unavailable(f"network {name} could not be created: "
                                      f"{api_message(err)}", "network_failed") from None
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
            rules += [["-d", cidr, "-j", "RETURN"] for cidr in allow if (":" in cidr) == six]
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
        with contextlib.suppress(docker.errors.NotFound):
            await self.engine.call(self.engine.api.remove_network, name)
        self.bridges.pop(bridge, None)
        self.installed.discard(bridge)

    async def our_networks(self) -> list[dict[str, Any]]:
        filters = {"label": [f"{LABEL}.instance={self.config.prefix}", f"{LABEL}.kind=network"]}
        networks: list[dict[str, Any]] = await self.engine.call(self.engine.api.networks,
                                                                filters=filters)
        return networks

    async def prune(self, min_age: float = 120.0) -> None:
        """Remove networks of ours that no space uses (and are not brand new)."""
        async with self.lock:
            for network in await self.our_networks():
                with contextlib.suppress(docker.errors.APIError, ValueError):
                    detail = await self.engine.call(self.engine.api.inspect_network,
                                                    network["Id"])
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
        except (ClawdError, docker.errors.APIError) as error:
            self.error = str(error)
            return False
        code, err = await self._iptables("iptables", "-S", "DOCKER-USER")
        if code != 0:
            self.active, self.error = False, f"iptables: {err or 'no DOCKER-USER chain'}"
            return False
        async with self.lock:
            for network in networks:
                name = network["Name"]
                allow_label = (network.get("Labels") or {}).get(f"{LABEL}.allow", "")
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
# Git: clone on create, server-side push ######################################
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


class GitOps:
    """Clone into a space at create time and push from it, with the token kept out of the
    space's config, its files, every argv, the answers and the audit log."""

    def __init__(self, config: Config, spaces: Spaces, files: Files) -> None:
        self.config = config
        self.spaces = spaces
        self.files = files

    async def clone(self, info: dict[str, Any], repo: RepoUrl, branch: str | None, dest: str,
                    token: str | None) -> ExecResult:
        options, env = git_auth(repo, token, self.config)
        argv = ["git", *options, "clone", "--no-recurse-submodules"]
        if branch:
            argv += ["--branch", branch]
        argv += ["--", repo.url, f"{WORKSPACE}/{dest}"]
        result = await self.spaces.run_internal(info, ExecRequest(
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
        self.spaces.touch(name)
        where = await self.files.resolve(info["Id"], repo_path)
        if where.stat is None or not where.stat["mode"] & MODE_DIR:
            raise BadRequest(f"repoPath {where.rel} is not a directory", "invalid_repo_path")
        # The URL is read as data (git config --get runs nothing) and then validated here.
        lookup = await self.spaces.run_internal(info, ExecRequest(
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
        with self.spaces.busy(name):
            # As the container's root, not the space user: code running in the space cannot
            # read this process's environment (the token) through /proc.
            result = await self.spaces.run_internal(info, ExecRequest(
                argv=argv, env=env, workdir=WORKSPACE, timeout=self.config.git_timeout),
                1 << 20, user="0")
        result = self._redacted(result, token)
        await self.spaces.audit.record("space.git.push", name, {
            "repoPath": where.rel, "remote": remote, "branch": branch,
            "exitCode": result["exitCode"]}, actor)
        return result


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
        info = await engine.call(engine.api.info)
    except (ClawdError, docker.errors.APIError):
        info = {}
    runtimes = info.get("Runtimes") or {}
    return {
        "nvidiaRuntime": "nvidia" in runtimes,
        "nvidiaToolkit": any(shutil.which(tool) for tool in (
            "nvidia-container-cli", "nvidia-container-runtime-hook", "nvidia-ctk")),
        "cdi": bool(info.get("CDISpecDirs")),
    }


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
    allow_cidrs: tuple[str, ...] = ()
    writable_rootfs: bool = True
    idle_timeout: int | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    env_file: tuple[str, bytes] | None = dataclasses.field(default=None, repr=False)
    repo: RepoUrl | None = None
    repo_branch: str | None = None
    repo_dest: str = "repo"
    git_token: str | None = dataclasses.field(default=None, repr=False)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)  # extra, e.g. E2B's


@dataclasses.dataclass(frozen=True)
class ExecRequest:
    """A validated ``POST /api/spaces/:name/exec`` body."""

    argv: list[str]
    env: dict[str, str]
    workdir: str
    timeout: float
    # The tree the working directory must really be in, checked by the space's user after
    # entering it ("" for anywhere but /proc, /sys and /dev, as E2B's daemon allows).
    root: str = WORKSPACE


def check_space_name(name: Any) -> str:
    if not isinstance(name, str) or not SPACE_NAME_RE.fullmatch(name):
        raise BadRequest(
            "invalid space name: use 1-63 lowercase letters, digits and '-', starting and "
            "ending with a letter or digit", "invalid_name")
    return name


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
    return float(value)


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


CREATE_FIELDS = {"name", "memory", "cpus", "gpu", "gpus", "image", "template", "network",
                 "writableRootfs", "env", "envFileText", "envFileBase64", "envFilePath",
                 "repoUrl", "repoBranch", "repoDest"}
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
        if not isinstance(encoded, str):
            raise BadRequest("envFileBase64 must be a base64 string", "invalid_env_file")
        try:
            content = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise BadRequest("Invalid envFileBase64", "invalid_env_file") from None
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


def parse_create(body: dict[str, Any], config: Config, template: Template) -> CreateRequest:
    """The request's fields over the template's; posture may be tightened, never loosened."""
    check_fields(body, CREATE_FIELDS)
    if "name" not in body:
        raise BadRequest("name is required", "invalid_name")
    name = check_space_name(body["name"])
    if "memory" in body:
        memory = parse_memory(body["memory"])
    else:
        memory = min(template.memory or 2 << 30, host_memory_bytes() or 2 << 30)
    if "cpus" in body:
        cpus = parse_cpus(body["cpus"])
    else:
        cpus = min(template.cpus or 1.0, float(os.cpu_count() or 1))
    gpu = check_bool("gpu", body["gpu"]) if "gpu" in body else template.gpu
    gpus = 1 if gpu else 0
    if body.get("gpus") is not None:
        asked = body["gpus"]
        if asked == "all":
            gpus = -1
        elif isinstance(asked, int) and not isinstance(asked, bool) and 1 <= asked <= 64:
            gpus = asked
        else:
            raise BadRequest('gpus must be a number of GPUs (1-64) or "all"', "invalid_gpus")
        if body.get("gpu") is False:
            raise BadRequest("gpu: false contradicts gpus", "invalid_gpus")
        gpu = True
    image = body.get("image") or template.image or (
        (config.gpu_image or config.image) if gpu else config.image)
    network = body.get("network", template.network)
    if network not in NETWORK_MODES:
        raise BadRequest(f"network must be one of {', '.join(NETWORK_MODES)}", "invalid_network")
    if network == "internet" and template.network == "none":
        raise BadRequest(f"template {template.name!r} has no network; a request can tighten "
                         "the network, not loosen it", "network_loosening")
    writable = body.get("writableRootfs", template.writable_rootfs)
    if not isinstance(writable, bool):
        raise BadRequest("writableRootfs must be true or false", "invalid_writableRootfs")
    if writable and not template.writable_rootfs:
        raise BadRequest(f"template {template.name!r} has a read-only root file system; a "
                         "request cannot make it writable", "rootfs_loosening")
    env = check_env(body.get("env", {}))
    token = next((env[k].strip() for k in TOKEN_ENV_KEYS if env.get(k, "").strip()), None)
    env = {k: v for k, v in env.items() if k not in TOKEN_ENV_KEYS}
    repo = branch = None
    dest = template.default_repo_dest
    if body.get("repoUrl") is not None:
        repo = check_repo_url(body["repoUrl"], config)
        if network == "none":
            raise BadRequest("Repo clone failed: selected template has network disabled",
                             "clone_needs_network")
        if body.get("repoBranch") is not None:
            branch = check_ref(body["repoBranch"], "repoBranch")
        if body.get("repoDest") is not None:
            dest = check_repo_dest(body["repoDest"])
    elif body.get("repoBranch") is not None or body.get("repoDest") is not None:
        raise BadRequest("repoBranch and repoDest need repoUrl", "invalid_repo_url")
    return CreateRequest(
        name=name, memory=memory, cpus=cpus, gpu=gpu, gpus=gpus, image=check_image_ref(image),
        template=template.name, network=network, allow_cidrs=template.allow_cidrs,
        writable_rootfs=writable, idle_timeout=template.idle_timeout, env=env,
        env_file=parse_env_file(body), repo=repo, repo_branch=branch, repo_dest=dest,
        git_token=token)


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


# Every command a client runs starts through this script, as the command's own user:
# - the working directory is entered and checked where it really is before the command runs,
#   in the same process, so a space that swaps a directory for a link cannot send a command
#   elsewhere (the docker-level WorkingDir is only ever "/");
# - the command runs under coreutils' timeout (where the image has it), so its time limit
#   holds even when the service is killed or restarted while it runs. It fires a little after
#   the service's own timer, which normally ends the command first.
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
shift 3
command -v timeout >/dev/null 2>&1 && exec timeout -s KILL "$limit" "$@"
exec "$@"
"""


def confined(req: ExecRequest) -> ExecRequest:
    """``req`` as run through COMMAND_SCRIPT."""
    limit = str(math.ceil(req.timeout) + TIMEOUT_GRACE)
    return dataclasses.replace(req, workdir="/", argv=[
        "sh", "-c", COMMAND_SCRIPT, "sh", req.workdir, req.root, limit, *req.argv])


def workdir_refusal(req: ExecRequest, result: ExecResult) -> BadRequest | None:
    """The error for an exec whose working directory could not be entered."""
    if result["exitCode"] != WORKDIR_FAILED or not result["stderr"].startswith(WORKDIR_MARK):
        return None
    if result["stderr"][len(WORKDIR_MARK):].startswith(" missing"):
        return BadRequest(f"workdir {req.workdir} does not exist or is not a directory the "
                          "space's user may enter", "invalid_workdir")
    return BadRequest(f"workdir {req.workdir} leads outside "
                      f"{req.root or 'the allowed directories'}", "invalid_workdir")


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

    def __init__(self, config: Config, engine: Engine, audit: AuditLog,
                 firewall: Firewall) -> None:
        self.config = config
        self.engine = engine
        self.audit = audit
        self.firewall = firewall
        # Wall-clock seconds for activity, auto-sleep and E2B deadlines; tests replace it.
        self.clock: Callable[[], float] = time.time
        self.last_activity: dict[str, float] = {}
        self.busy_count: dict[str, int] = {}  # running execs and open terminals
        self.started_at: dict[str, str | None] = {}  # container id -> StartedAt
        # name -> (container id, user): fixed for the life of a container, so an exec can go
        # straight to the engine without an inspect first.
        self.known: dict[str, tuple[str, str]] = {}
        self.gpu_lock = asyncio.Lock()  # GPU choice and container create, one at a time
        self.tasks: set[asyncio.Task[None]] = set()  # fire-and-forget work, kept referenced
        # Creates under way, on disk: what a create made before a crash is undone at start.
        self.pending_path = os.path.join(config.data_dir, "pending-creates.json")
        self.pending: dict[str, dict[str, Any]] = {}
        self.pending_lock = asyncio.Lock()

    def background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

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
            "memory": label_number(labels, f"{LABEL}.memory", int, 0),
            "cpus": label_number(labels, f"{LABEL}.cpus", float, 0.0),
            "gpu": labels.get(f"{LABEL}.gpu") == "true",
            "gpus": [g for g in labels.get(f"{LABEL}.gpus", "").split(",") if g],
            "template": labels.get(f"{LABEL}.template") or None,
            "network": labels.get(f"{LABEL}.network", "internet"),
            "writableRootfs": labels.get(f"{LABEL}.writable-rootfs", "true") == "true",
            "idleTimeout": label_number(labels, f"{LABEL}.idle-timeout", int, None)
            if labels.get(f"{LABEL}.idle-timeout", "").isdigit() else None,
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
        config = info.get("Config") or {}
        if not self.is_ours(config.get("Labels"), name):
            raise NotFound("Space not found")
        self.known[name] = (info["Id"], str(config.get("User") or ""))
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
            self.background(guarded("start-time learning",
                                    functools.partial(self._learn_start_times, missing)))
        spaces = [self.view(row["Id"], row.get("Labels") or {}, row.get("State", ""))
                  for row in rows]
        return sorted(spaces, key=lambda s: s["name"])

    async def _learn_start_times(self, container_ids: list[str]) -> None:
        for container_id in container_ids:
            with contextlib.suppress(ClawdError, docker.errors.APIError):
                info = await self.engine.call(self.engine.api.inspect_container, container_id)
                self.view_inspected(info)

    def touch(self, name: str) -> None:
        self.last_activity[name] = self.clock()

    @contextlib.contextmanager
    def busy(self, name: str) -> Iterator[None]:
        """While inside, the space is in use (auto-sleep leaves it alone)."""
        self.busy_count[name] = self.busy_count.get(name, 0) + 1
        self.touch(name)
        try:
            yield
        finally:
            self.busy_count[name] -= 1
            if not self.busy_count[name]:
                del self.busy_count[name]
            self.touch(name)

    def is_busy(self, name: str) -> bool:
        return self.busy_count.get(name, 0) > 0

    # -- lifecycle ------------------------------------------------------------------------

    async def create(self, req: CreateRequest, actor: Actor,
                     provision: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
                     ) -> SpaceInfo:
        """Create and start a space; ``provision`` (env file, clone) runs before it counts.

        Anything that fails, provisioning included, removes what this call made.
        """
        api = self.engine.api
        try:
            image = await self.engine.call(api.inspect_image, req.image)
        except docker.errors.NotFound:
            raise BadRequest(f"image {req.image!r} is not present on this node; build or load "
                             "it first", "image_not_found") from None
        except docker.errors.APIError as err:
            raise BadRequest(f"image {req.image!r}: {api_message(err)}", "invalid_image") from None
        user = str((image.get("Config") or {}).get("User") or "")
        async with self.gpu_lock if req.gpus else contextlib.nullcontext():
            gpu_ids = await self._assign_gpus(req.gpus) if req.gpus else []
            return await self._create(req, actor, provision, user, gpu_ids)

    async def _assign_gpus(self, count: int) -> list[str]:
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
        filters = {"label": [f"{LABEL}.instance={self.config.prefix}", f"{LABEL}.kind=space"]}
        rows = await self.engine.call(self.engine.api.containers, all=True, filters=filters)
        load: dict[str, int] = {}
        for row in rows:
            for uuid in ((row.get("Labels") or {}).get(f"{LABEL}.gpus") or "").split(","):
                if uuid:
                    load[uuid] = load.get(uuid, 0) + 1
        ranked = sorted(inventory, key=lambda gpu: (load.get(gpu["uuid"], 0), gpu["index"]))
        return [gpu["uuid"] for gpu in ranked[:count]]

    async def _create(self, req: CreateRequest, actor: Actor,
                      provision: Callable[[dict[str, Any]], Awaitable[None]] | None,
                      user: str, gpu_ids: list[str]) -> SpaceInfo:
        async with self.audit.action("space.create", req.name, {
                "memory": req.memory, "cpus": req.cpus, "gpu": req.gpu, "image": req.image,
                "template": req.template, "network": req.network,
                "writableRootfs": req.writable_rootfs, "envKeys": sorted(req.env),
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
            try:
                info = await self.engine.call(self.engine.api.inspect_container,
                                              self.container_name(name))
            except docker.errors.NotFound:
                info = None
            if info is not None and self.is_ours((info.get("Config") or {}).get("Labels"),
                                                 name):
                await self.engine.call(self.engine.api.remove_container, info["Id"],
                                       force=True)
            if entry.get("volumeCreated") and await self._volume_is_ours(name):
                await self._remove_volume(self.volume_name(name))
            log.warning("undid the create of %s that a restart interrupted", name)
            await self.audit.record("space.create.undone", name,
                                    {"reason": "the service stopped during the create"})
        await self._note_pending("", None)

    async def _make(self, req: CreateRequest, actor: Actor,
                    provision: Callable[[dict[str, Any]], Awaitable[None]] | None,
                    user: str, gpu_ids: list[str]) -> SpaceInfo:
        network_mode = await self.firewall.network_for(req.network, req.allow_cidrs)
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
                with contextlib.suppress(ClawdError, docker.errors.APIError):
                    await self._remove_volume(volume)  # the journal could not be written
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
        api = self.engine.api
        labels = {
            **self.owner_labels(req.name),
            f"{LABEL}.kind": "space",
            f"{LABEL}.schema": "1",
            f"{LABEL}.volume": volume,
            f"{LABEL}.image": req.image,
            f"{LABEL}.memory": str(req.memory),
            f"{LABEL}.cpus": repr(req.cpus),
            f"{LABEL}.gpu": "true" if gpu_ids else "false",
            f"{LABEL}.gpus": ",".join(gpu_ids),
            f"{LABEL}.network": req.network,
            f"{LABEL}.writable-rootfs": "true" if req.writable_rootfs else "false",
            f"{LABEL}.idle-timeout": "" if req.idle_timeout is None else str(req.idle_timeout),
            f"{LABEL}.template": req.template,
            f"{LABEL}.user": user,
            f"{LABEL}.created-at": now_iso(),
            f"{LABEL}.created-by": actor.key_id or "",
            **req.labels,
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
                environment=req.env or None,
                labels=labels,
                host_config=self._host_config(req, volume, network_mode, gpu_ids),
            )
            container_id = created["Id"]
            await self.engine.call(api.start, container_id)
            info = await self.engine.call(api.inspect_container, container_id)
            if provision is not None:
                self.known[req.name] = (info["Id"], user)
                await provision(info)
        except BaseException as err:
            self.known.pop(req.name, None)
            await self._undo_create(container_id, volume if volume_created else None)
            if isinstance(err, docker.errors.APIError):
                if api_status(err) == 409 and container_id is None:
                    raise Conflict("Space already exists", "space_exists") from None
                if gpu_ids and "device driver" in api_message(err):
                    raise Unavailable(f"Docker could not attach the GPU: {api_message(err)}; "
                                      "install and configure the NVIDIA Container Toolkit",
                                      "no_gpu_runtime") from None
                raise BadRequest(f"the space could not be created: {api_message(err)}",
                                 "create_failed") from None
            raise
        self.touch(req.name)
        return self.view_inspected(info)

    def _host_config(self, req: CreateRequest, volume: str, network_mode: str,
                     gpu_ids: list[str]) -> dict[str, Any]:
        """The whole HostConfig, from server-side rules only."""
        api = self.engine.api
        device_requests = None
        if gpu_ids:  # pinned by UUID, so a space keeps its GPU across restarts
            device_requests = [docker.types.DeviceRequest(
                driver="nvidia", device_ids=gpu_ids, capabilities=[["gpu"]])]
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
            network_mode=network_mode,
            device_requests=device_requests,
            privileged=False,
            read_only=not req.writable_rootfs,
            # A read-only root still needs scratch space where programs expect it.
            tmpfs=None if req.writable_rootfs else {  # paths inside the space, not the host
                path: "rw,nosuid,nodev,size=256m" for path in ("/tmp", "/var/tmp", "/run")},  # noqa: S108
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
        async with self.audit.action("space.destroy", name, {"removeVolume": remove_volume},
                                     actor):
            if info is not None:
                try:
                    await self.engine.call(api.remove_container, info["Id"], force=True)
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError as err:
                    if api_status(err) != 409:  # 409: removal already in progress
                        raise
                self.started_at.pop(info["Id"], None)
            self.known.pop(name, None)
            if remove_volume:
                await self._remove_volume(volume)
            self.last_activity.pop(name, None)

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
        async with self.audit.action("space.pause", name,
                                     {"reason": reason} if reason else None, actor):
            try:
                await self.engine.call(self.engine.api.pause, info["Id"])
            except docker.errors.APIError as err:
                raise Conflict(f"Space could not be paused: {api_message(err)}") from None

    async def start(self, name: str, actor: Actor, reason: str | None = None) -> None:
        info = await self.inspect(name)
        await self._bring_up(name, info, actor, reason)

    async def _bring_up(self, name: str, info: dict[str, Any], actor: Actor,
                        reason: str | None) -> dict[str, Any]:
        """Unpause a paused space, start a stopped one; returns fresh inspect data."""
        api = self.engine.api
        state = info["State"]
        if state.get("Running") and not state.get("Paused"):
            return info
        async with self.audit.action("space.start", name,
                                     {"reason": reason} if reason else None, actor):
            try:
                if state.get("Paused"):
                    await self.engine.call(api.unpause, info["Id"])
                else:
                    await self.engine.call(api.start, info["Id"])
            except docker.errors.APIError as err:
                raise Conflict(f"Space could not be started: {api_message(err)}",
                               "start_failed") from None
        self.touch(name)
        if state.get("Paused"):  # unpausing changes nothing else the caller reads
            return {**info, "State": {**state, "Paused": False, "Status": "running"}}
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
        """Run a command; a paused space is resumed first, a stopped one refused."""
        check_space_name(name)
        with self.busy(name):
            started = time.monotonic()
            loop = asyncio.get_running_loop()
            container_id, exec_id, sock = await self._start_exec(name, req, actor, {
                "command": req.argv[2] if req.argv[:2] == ["sh", "-c"] else req.argv,
                "envKeys": sorted(req.env), "workdir": req.workdir, "timeout": req.timeout})
            ooms = await loop.run_in_executor(None, oom_kill_count, container_id)
            result = await self._collect(container_id, exec_id, sock, req.timeout,
                                         self.config.exec_output_limit, started)
            if result["exitCode"] == 137 and ooms is not None and not result["timedOut"]:
                # Killed (SIGKILL) while the cgroup's OOM killer struck: out of memory.
                after = await loop.run_in_executor(None, oom_kill_count, container_id)
                result["oomKilled"] = after is not None and after > ooms
                if result["oomKilled"]:
                    await self.audit.record("space.exec.oom", name, {
                        "command": req.argv[2] if req.argv[:2] == ["sh", "-c"] else req.argv},
                        actor)
        refusal = workdir_refusal(req, result)
        if refusal is not None:
            raise refusal
        return result

    async def _start_exec(self, name: str, req: ExecRequest, actor: Actor,
                          event: dict[str, Any]) -> tuple[str, str, ExecSocket]:
        """Create an exec on the known container id (inspecting only when that fails), audit
        ``event`` (a space.exec record) and start it: nothing runs that was not audited."""
        for _ in range(3):
            if name not in self.known:
                await self.running(name, actor)
            container_id, user = self.known[name]
            try:
                exec_id = await self.engine.call(self._create_exec, container_id, user,
                                                 confined(req))
            except docker.errors.APIError as err:
                message = api_message(err)
                if api_status(err) == 404:
                    self.known.pop(name, None)  # re-created or gone: look again
                elif "paused" in message:
                    await self.running(name, actor)
                elif "not running" in message:
                    raise Conflict(f"Space is stopped; start it with POST /api/spaces/{name}"
                                   "/start", "space_stopped") from None
                else:
                    raise Conflict(f"exec could not start: {message}", "exec_failed") from None
                continue
            async with self.audit.action("space.exec", name, event, actor):
                try:
                    sock = ExecSocket(await self.engine.call(self.engine.api.exec_start,
                                                             exec_id, socket=True))
                except docker.errors.APIError as err:
                    raise Conflict(f"exec could not start: {api_message(err)}",
                                   "exec_failed") from None
            return container_id, exec_id, sock
        raise Conflict("exec could not start: the space keeps changing state", "exec_failed")

    async def run_internal(self, info: dict[str, Any], req: ExecRequest,
                           output_limit: int, user: str | None = None,
                           stdin: Iterator[bytes] | None = None) -> ExecResult:
        """An exec of the service's own (files, probes): not audited, not activity.

        ``stdin``, a blocking iterator, is sent to the command (then end of file) while its
        output is collected; an error the iterator raises (a client's broken upload) is
        raised once the command has seen end of file and ended."""
        started = time.monotonic()
        exec_id, sock = await self.open_internal(info, req, user, stdin is not None)
        failure: list[BaseException] = []

        def feed(chunks: Iterator[bytes]) -> None:
            try:
                for chunk in chunks:
                    sock.sendall(chunk)
            except OSError:
                pass  # the command ended without reading it all; its exit code tells
            except Exception as err:  # noqa: BLE001 - handed to the caller below
                failure.append(err)
            finally:
                sock.shutdown(socket.SHUT_WR)

        feeding = None if stdin is None else asyncio.ensure_future(
            self.engine.stream(functools.partial(feed, stdin)))
        try:
            result = await self._collect(info["Id"], exec_id, sock, req.timeout, output_limit,
                                         started)
        finally:
            if feeding is not None:
                sock.shutdown(socket.SHUT_RDWR)
                await feeding
        if failure:
            raise failure[0]
        return result

    async def open_internal(self, info: dict[str, Any], req: ExecRequest,
                            user: str | None = None,
                            stdin: bool = False) -> tuple[str, ExecSocket]:
        """Start a service exec, as the space's user unless told otherwise."""
        if user is None:
            user = str((info.get("Config") or {}).get("User") or "")
        try:
            return await self.engine.call(self._open_exec, info["Id"], user, req, stdin)
        except docker.errors.APIError as err:
            raise Conflict(f"exec could not start: {api_message(err)}", "exec_failed") from None

    def _create_exec(self, container_id: str, user: str, req: ExecRequest,
                     stdin: bool = False) -> str:
        exec_id: str = self.engine.api.exec_create(
            container_id, req.argv, stdout=True, stderr=True, stdin=stdin, tty=False,
            environment=req.env or None, workdir=req.workdir, user=user)["Id"]
        return exec_id

    def _open_exec(self, container_id: str, user: str, req: ExecRequest,
                   stdin: bool = False) -> tuple[str, ExecSocket]:
        """Create and start an exec in one executor job (blocking)."""
        exec_id = self._create_exec(container_id, user, req, stdin)
        return exec_id, ExecSocket(self.engine.api.exec_start(exec_id, socket=True))

    async def _collect(self, container_id: str, exec_id: str, sock: ExecSocket,
                       timeout: float, output_limit: int, started: float) -> ExecResult:
        """Read an exec's output (capped), enforce its timeout, and report how it ended."""
        api = self.engine.api
        reader = DemuxReader(sock, output_limit)
        task = asyncio.ensure_future(self.engine.stream(reader.run))
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            timed_out = True
            await self.kill_exec(container_id, exec_id)
            try:
                await asyncio.wait_for(asyncio.shield(task), 5)
            except asyncio.TimeoutError:
                reader.abort()  # something escaped the process group and holds the pipe
                await task
        finally:
            if not task.done():
                reader.abort()
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
            "oomKilled": False,
            "stdoutTruncated": reader.truncated[1],
            "stderrTruncated": reader.truncated[2],
        }

    async def kill_exec(self, container_id: str, exec_id: str,
                        sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal an exec's whole process group (a timeout, a closed terminal)."""
        api = self.engine.api
        for _ in range(50):  # a just-started exec reports Running with Pid 0 for a moment
            details = await self.engine.call(api.exec_inspect, exec_id)
            host_pid = details.get("Pid") or 0
            if not details.get("Running") or host_pid > 0:
                break
            await asyncio.sleep(0.05)
        if not details.get("Running") or host_pid <= 0:
            return
        container_pid = kill_exec_group(host_pid, container_id, sig)
        if container_pid is None:
            return
        # From inside, as the space's user, who owns the processes (root in the space has no
        # capability over them).
        user = next((u for _, (cid, u) in self.known.items() if cid == container_id), "")
        with contextlib.suppress(docker.errors.APIError):
            killer = await self.engine.call(
                api.exec_create, container_id,
                ["sh", "-c", f"kill -s {sig.name[3:]} -- -{int(container_pid)}"], user=user)
            await self.engine.call(api.exec_start, killer["Id"])


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
            raw = await self.engine.call(self.engine.api.stats, container_id, stream=False)
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
OBSERVE_SCRIPT = (
    "df -Pk /workspace 2>/dev/null | tail -n 1; echo {sep}; "
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

    def __init__(self, spaces: Spaces) -> None:
        self.spaces = spaces
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

    async def observe(self, name: str, top: int, history_lines: int) -> dict[str, Any]:
        info = await self.spaces.inspect(name)
        labels = (info.get("Config") or {}).get("Labels") or {}
        host = info.get("HostConfig") or {}
        state = info.get("State") or {}
        observation: dict[str, Any] = {"workspaceDisk": None, "workspaceSizeBytes": None,
                                       "top": [], "bashHistoryTail": None}
        if state.get("Running") and not state.get("Paused"):
            script = OBSERVE_SCRIPT.format(sep=OBSERVE_SEPARATOR, top=top, lines=history_lines)
            result = await self.spaces.run_internal(info, ExecRequest(
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
                "template": labels.get(f"{LABEL}.template") or None,
                "network": labels.get(f"{LABEL}.network", "internet"),
                "writableRootfs": not host.get("ReadonlyRootfs", False),
                "image": labels.get(f"{LABEL}.image", ""),
                "user": labels.get(f"{LABEL}.user", ""),
                "memory": int(host.get("Memory") or 0),
                "cpus": (host.get("NanoCpus") or 0) / 1e9,
                "pidsLimit": host.get("PidsLimit"),
                "gpu": labels.get(f"{LABEL}.gpu") == "true",
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


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Where a workspace path really lands inside the container, checked component by component.

    ``real`` is the absolute in-container path (symlinks resolved, always under /workspace);
    ``stat`` is the engine's stat of it, or None when it does not exist; ``missing`` lists the
    components below the deepest existing directory ``parent`` that a write has to create.
    """

    rel: str
    real: str
    stat: dict[str, Any] | None
    parent: str
    missing: tuple[str, ...]


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


def inside_workspace(path: str) -> bool:
    return path == WORKSPACE or path.startswith(WORKSPACE + "/")


def to_rel(real: str) -> str:
    return real[len(WORKSPACE):] or "/"


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
# result to /workspace: they check the directory they are in, or the file they opened, after
# opening it. POSIX sh and coreutils only (the image may have no python3 or bash).
USER_READ_SCRIPT = r"""
[ -p "$1" ] && exit 103
exec <"$1" || exit 101
case $(readlink -f /proc/self/fd/0) in /workspace|/workspace/*) ;; *) exit 102 ;; esac
[ -f /proc/self/fd/0 ] || exit 103
stat -L -c %s /proc/self/fd/0 || exit 104
[ "$3" -gt 0 ] && head -c "$3" /proc/self/fd/0
[ "$2" -eq 0 ] && exec cat
exec tail -c "+$(($2 + 1))" /proc/self/fd/0
"""
USER_WRITE_SCRIPT = r"""
mkdir -p -- "$1" || exit 101
cd -P -- "$1" || exit 101
case $(pwd -P) in /workspace|/workspace/*) ;; *) exit 102 ;; esac
set -C
cat >"$3" || { rm -f -- "$3"; exit 105; }
[ "$(stat -c %s -- "$3")" = "$5" ] || { rm -f -- "$3"; exit 107; }
chmod "$4" -- "$3" || { rm -f -- "$3"; exit 105; }
if [ -d "$2" ] && [ ! -L "$2" ]; then rm -f -- "$3"; exit 103; fi
mv -fT -- "$3" "$2" || { rm -f -- "$3"; exit 106; }
"""
USER_LIST_SCRIPT = r"""
cd -P -- "$1" || exit 101
case $(pwd -P) in /workspace|/workspace/*) ;; *) exit 102 ;; esac
if find . -maxdepth 0 -printf '' 2>/dev/null; then
    exec find . -mindepth 1 -maxdepth 1 -printf '%y\t%s\t%T@\t%f\0'
fi
for f in * .[!.]* ..?*; do
    if [ -e "$f" ] || [ -L "$f" ]; then stat --printf '%f\t%s\t%Y\t%n\0' -- "$f"; fi
done
"""
USER_DELETE_SCRIPT = r"""
cd -P -- "$1" || exit 101
case $(pwd -P) in /workspace|/workspace/*) ;; *) exit 102 ;; esac
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

    def __init__(self, spaces: Spaces, container_id: str, exec_id: str, sock: ExecSocket,
                 rel: str) -> None:
        self.spaces = spaces
        self.container_id = container_id
        self.exec_id = exec_id
        self.sock = sock
        self.stdout = ExecStdout(sock, FILE_CHUNK)
        self.rel = rel
        self.size = 0
        self.closed = False
        self.exit_code: int | None = None

    async def start(self) -> None:
        """Read the size line the script prints once the file is open (or raise its error).

        Bounded: a space can swap a FIFO in for the file, whose open never returns."""
        try:
            line = await asyncio.wait_for(
                self.spaces.engine.stream(lambda: self.stdout.read_line(32)), FILE_OPEN_TIMEOUT)
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
                self.spaces.engine.stream(lambda: self.stdout.read(size)), FILE_READ_STALL)
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
        self.sock.close()
        api = self.spaces.engine.api
        details = await self.spaces.engine.call(api.exec_inspect, self.exec_id)
        if details.get("Running"):
            await self.spaces.kill_exec(self.container_id, self.exec_id)
            return None
        code = details.get("ExitCode")
        self.exit_code = None if code is None else int(code)
        return self.exit_code


def while_busy(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """A Files call keeps its space in use (auto-sleep waits) for as long as it runs."""

    @functools.wraps(method)
    async def wrapper(self: Files, name: str, *args: Any, **kwargs: Any) -> T:
        with self.spaces.busy(name):
            return await method(self, name, *args, **kwargs)

    return wrapper


class Files:
    """The files API: everything under /workspace, through processes of the space's user.

    No host path of a volume is ever touched. A path is first resolved one component at a time
    with the engine's stat (metadata only, which resolves symlinks inside the container), and
    anything whose real location is outside /workspace is refused with 403. The access itself,
    reading, writing, listing or deleting, is then done by a process of the space's user that
    opens the path itself and checks again where it landed, so a space racing its own tree
    gets at most what its user could read or write anyway.
    """

    def __init__(self, spaces: Spaces) -> None:
        self.spaces = spaces
        self.engine = spaces.engine

    # -- engine archive calls -------------------------------------------------------------

    def _archive_url(self, container_id: str) -> str:
        url: str = self.engine.api._url("/containers/{0}/archive", container_id)
        return url

    def _stat_blocking(self, container_id: str, path: str) -> dict[str, Any] | None:
        response = self.engine.api.head(self._archive_url(container_id), params={"path": path})
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise Conflict(f"cannot stat {to_rel(path)}: HTTP {response.status_code}",
                           "stat_failed")
        header = response.headers.get("X-Docker-Container-Path-Stat", "")
        stat: dict[str, Any] | None = json.loads(base64.b64decode(header)) if header else None
        return stat

    async def stat(self, container_id: str, path: str) -> dict[str, Any] | None:
        return await self.engine.call(self._stat_blocking, container_id, path)

    # -- resolution -----------------------------------------------------------------------

    async def resolve(self, container_id: str, raw_path: str | None,
                      follow_last: bool = True) -> Resolved:
        rel = workspace_rel(raw_path)
        components = [c for c in rel.split("/") if c]
        current = WORKSPACE
        stat = await self.stat(container_id, WORKSPACE)
        for index, component in enumerate(components):
            last = index == len(components) - 1
            candidate = f"{current}/{component}"
            stat = await self.stat(container_id, candidate)
            if stat is None:
                return Resolved(rel, f"{current}/{'/'.join(components[index:])}", None, current,
                                tuple(components[index:]))
            if stat["mode"] & MODE_SYMLINK and (follow_last or not last):
                target = stat.get("linkTarget") or ""
                if not inside_workspace(target):
                    raise Forbidden(f"{rel} leads outside /workspace", "outside_workspace")
                stat = await self.stat(container_id, target)
                if stat is None:
                    if not last:
                        raise NotFound(f"{rel}: no such file or directory")
                    parent, _, base = target.rpartition("/")
                    return Resolved(rel, target, None, parent or "/", (base,))
                candidate = target
            if not last and not stat["mode"] & MODE_DIR:
                raise BadRequest(f"{rel}: {to_rel(candidate)} is not a directory", "not_a_dir")
            current = candidate
        return Resolved(rel, current, stat, current.rpartition("/")[0] or "/", ())

    async def _resolved(self, name: str, raw_path: str | None, actor: Actor,
                        follow_last: bool = True) -> tuple[dict[str, Any], Resolved]:
        info = await self.spaces.running(name, actor)
        self.spaces.touch(name)
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
        result = await self.spaces.run_internal(info, ExecRequest(
            argv=["sh", "-c", USER_LIST_SCRIPT, "sh", where.real], env={}, workdir=WORKSPACE,
            timeout=60), LIST_OUTPUT_LIMIT)
        if result["exitCode"] != 0:
            raise user_file_error(where.rel, result["exitCode"], result["stderr"])
        base = where.rel.rstrip("/")
        kinds = {"f": "file", "d": "dir", "l": "symlink"}
        entries: list[FileEntry] = []
        for record in result["stdout"].split("\0"):
            fields = record.split("\t", 3)
            if len(fields) != 4 or not fields[1].isdigit():
                continue
            kind, size, mtime, entry_name = fields
            if len(kind) > 1:  # stat's hex mode (the fallback without GNU find)
                kind = STAT_TYPES.get(int(kind, 16) & 0o170000, "o") if all(
                    c in "0123456789abcdef" for c in kind) else "o"
            with contextlib.suppress(ValueError):
                entries.append({"name": entry_name, "path": f"{base}/{entry_name}",
                                "type": kinds.get(kind, "other"), "size": int(size),
                                "mtimeMs": int(float(mtime) * 1000)})
        entries.sort(key=lambda e: e["name"])
        return {"path": where.rel, "entries": entries[:limit], "truncated": len(entries) > limit}

    # -- read -----------------------------------------------------------------------------

    async def open_user_file(self, info: dict[str, Any], real: str, rel: str,
                             offset: int = 0, head: int = 0) -> UserFile:
        """Open a regular file as the space's user and learn its size; the caller closes it.

        The stream is ``head`` bytes from the start, then everything from ``offset``."""
        exec_id, sock = await self.spaces.open_internal(info, ExecRequest(
            argv=["sh", "-c", USER_READ_SCRIPT, "sh", real, str(offset), str(head)], env={},
            workdir=WORKSPACE, timeout=0))
        opened = UserFile(self.spaces, info["Id"], exec_id, sock, rel)
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

    async def read_raw(self, request: web.Request, name: str, raw_path: str | None,
                       max_bytes: int | None, actor: Actor) -> web.StreamResponse:
        with self.spaces.busy(name):
            return await self._stream_file(request, name, raw_path, max_bytes, actor)

    async def _stream_file(self, request: web.Request, name: str, raw_path: str | None,
                           max_bytes: int | None, actor: Actor) -> web.StreamResponse:
        where, opened = await self.open_file(name, raw_path, actor)
        try:
            size = opened.size
            length = size if max_bytes is None else min(size, max_bytes)
            answer = web.StreamResponse(headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(length),
                "X-Clawdspace-Size": str(size),
                "X-Clawdspace-Truncated": "true" if length < size else "false",
            })
            await answer.prepare(request)
            left = length
            while left > 0:
                chunk = await opened.read(min(FILE_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                await answer.write(chunk)
                self.spaces.touch(name)
            if left > 0:
                # The file shrank after its length was promised: end the connection rather
                # than let the client take a short body for the whole file.
                log.warning("files: %s of %s shrank while being read; connection closed",
                            where.rel, name)
                if request.transport is not None:
                    request.transport.abort()
                return answer
            await answer.write_eof()
            return answer
        finally:
            await opened.close()

    # -- write ----------------------------------------------------------------------------

    @while_busy
    async def write(self, name: str, raw_path: str | None, size: int,
                    chunks: Iterator[bytes], actor: Actor, mode: int = 0o644) -> dict[str, Any]:
        """Write a file atomically, as the space's user: stream into a temporary name beside
        it, check its length, then rename it into place."""
        info, where = await self._resolved(name, raw_path, actor)
        if where.rel == "/":
            raise BadRequest("path must name a file inside /workspace", "invalid_path")
        if where.stat is not None and mode_type(where.stat["mode"]) != "file":
            raise Conflict(f"{where.rel} exists and is not a regular file", "not_a_file")
        missing = list(where.missing) if where.stat is None else [where.real.rpartition("/")[2]]
        parent = where.parent if where.stat is None else where.real.rpartition("/")[0]
        directory = "/".join([parent, *missing[:-1]])
        final = missing[-1]
        temp = f"{TEMP_MARK}{os.urandom(6).hex()}"  # short: any legal name fits beside it
        async with self.spaces.audit.action("space.file.write", name,
                                            {"path": where.rel, "bytes": size}, actor):
            result = await self.spaces.run_internal(info, ExecRequest(
                argv=["sh", "-c", USER_WRITE_SCRIPT, "sh", directory, final, temp,
                      f"{mode:o}", str(size)], env={}, workdir=WORKSPACE,
                timeout=self.spaces.config.exec_max_timeout), 65536, stdin=chunks)
            if result["exitCode"] == NOT_REGULAR:
                raise Conflict(f"{where.rel} exists and is not a regular file", "not_a_file")
            if result["exitCode"] != 0:
                raise user_file_error(where.rel, result["exitCode"], result["stderr"])
        return {"message": "OK", "path": where.rel, "bytes": size}

    # -- delete ---------------------------------------------------------------------------

    @while_busy
    async def delete(self, name: str, raw_path: str | None, recursive: bool,
                     actor: Actor) -> dict[str, Any]:
        info, where = await self._resolved(name, raw_path, actor, follow_last=False)
        if where.rel == "/":
            raise BadRequest("the workspace root cannot be deleted", "invalid_path")
        if where.stat is None:
            raise NotFound(f"{where.rel}: no such file or directory")
        is_dir = mode_type(where.stat["mode"]) == "dir"
        parent, _, base = where.real.rpartition("/")
        argv = ["sh", "-c", USER_DELETE_SCRIPT, "sh", parent or "/", base,
                ("tree" if recursive else "dir") if is_dir else "file"]
        async with self.spaces.audit.action("space.file.delete", name,
                                            {"path": where.rel, "recursive": recursive}, actor):
            result = await self.spaces.run_internal(info, ExecRequest(
                argv=argv, env={}, workdir=WORKSPACE, timeout=300), 65536)
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
# Terminal ####################################################################
###############################################################################

TERMINAL_QUEUE_CHUNKS = 16  # x 64 KiB: the most output held per terminal for a slow client
TERMINAL_MAX_FRAME = 1 << 20


def origin_allowed(request: web.Request, allowed: frozenset[str]) -> bool:
    """Browsers send Origin on upgrades: only this node's own origin and configured ones pass."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser (curl, SDKs): the key is the guard
    if origin in allowed:
        return True
    return origin in (f"http://{request.host}", f"https://{request.host}")


class Terminals:
    """Websocket terminals: a TTY exec of ``bash -l`` (or ``sh``) bridged to a websocket.

    Output flows through a bounded queue: a client that stops reading stalls the shell (the
    kernel and the engine hold a little), never the service's memory.
    """

    def __init__(self, spaces: Spaces) -> None:
        self.spaces = spaces
        self.engine = spaces.engine
        self.sockets: set[web.WebSocketResponse] = set()
        self.shells: dict[str, list[str]] = {}

    async def shell(self, info: dict[str, Any]) -> list[str]:
        """``bash -l`` where the image has bash, else ``sh -l``."""
        if info["Id"] not in self.shells:
            probe = await self.spaces.run_internal(info, ExecRequest(
                argv=["bash", "-c", "exit 0"], env={}, workdir=WORKSPACE, timeout=10), 1024)
            self.shells[info["Id"]] = ["bash", "-l"] if probe["exitCode"] == 0 else ["sh", "-l"]
        return self.shells[info["Id"]]

    async def serve(self, request: web.Request, name: str, actor: Actor) -> web.WebSocketResponse:
        api = self.engine.api
        cols = query_int(request, "cols", 80, 1, 500)
        rows = query_int(request, "rows", 24, 1, 200)
        info = await self.spaces.running(name, actor)
        user = str(info["Config"].get("User") or "")
        argv = await self.shell(info)
        await self.spaces.audit.record("terminal.open", name, {"shell": argv[0]}, actor)
        try:
            exec_id = (await self.engine.call(
                api.exec_create, info["Id"], argv, stdin=True, tty=True, stdout=True,
                stderr=True, environment={"TERM": "xterm-256color"}, workdir=WORKSPACE,
                user=user))["Id"]
            sock = ExecSocket(await self.engine.call(api.exec_start, exec_id, socket=True,
                                                     tty=True))
        except docker.errors.APIError as err:
            raise Conflict(f"terminal could not start: {api_message(err)}", "exec_failed") \
                from None
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=TERMINAL_MAX_FRAME)
        try:
            await ws.prepare(request)
        except BaseException:
            sock.close()
            raise
        self.sockets.add(ws)
        opened = time.monotonic()
        with contextlib.suppress(docker.errors.APIError, ClawdError):
            await self.engine.call(api.exec_resize, exec_id, height=rows, width=cols)
        with self.spaces.busy(name):
            pump = asyncio.ensure_future(self._pump_output(name, sock, ws))
            try:
                await self._pump_input(name, exec_id, sock, ws)
            finally:
                # Shielded: a cancelled handler (the client vanished) still ends the shell,
                # closes the engine socket and audits the close.
                await asyncio.shield(self._finish(
                    name, info["Id"], exec_id, sock, ws, pump, opened, actor))
        return ws

    async def _finish(self, name: str, container_id: str, exec_id: str, sock: ExecSocket,
                      ws: web.WebSocketResponse, pump: asyncio.Future[None], opened: float,
                      actor: Actor) -> None:
        if not pump.done():
            await self._end_shell(container_id, exec_id, sock)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pump, 10)
        sock.close()
        self.sockets.discard(ws)
        exit_code: int | None = None
        with contextlib.suppress(docker.errors.APIError, ClawdError):
            exit_code = (await self.engine.call(self.engine.api.exec_inspect, exec_id)).get(
                "ExitCode")
        await self.spaces.audit.record("terminal.close", name, {
            "durationMs": int((time.monotonic() - opened) * 1000), "exitCode": exit_code},
            actor)

    async def _pump_output(self, name: str, sock: ExecSocket,
                           ws: web.WebSocketResponse) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(TERMINAL_QUEUE_CHUNKS)

        def read_shell() -> None:
            try:
                while True:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    future = asyncio.run_coroutine_threadsafe(queue.put(data or None), loop)
                    future.result()
                    if not data:
                        return
            except (RuntimeError, concurrent.futures.CancelledError):
                return  # the loop is gone (shutdown)

        reader = loop.run_in_executor(self.engine.streams, read_shell)
        try:
            while True:
                data = await queue.get()
                if data is None:
                    break
                self.spaces.touch(name)
                await ws.send_bytes(data)
            await ws.close(code=1000, message=b"shell exited")
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away; input pumping notices and ends the shell
        finally:
            while not reader.done():  # unblock the reader if it waits on a full queue
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                await asyncio.sleep(0.01)

    async def _pump_input(self, name: str, exec_id: str, sock: ExecSocket,
                          ws: web.WebSocketResponse) -> None:
        async for message in ws:
            self.spaces.touch(name)
            if message.type == web.WSMsgType.BINARY:
                await self._send(sock, message.data)
            elif message.type == web.WSMsgType.TEXT:
                await self._control(exec_id, sock, ws, message.data)
            elif message.type == web.WSMsgType.ERROR:
                break

    async def _control(self, exec_id: str, sock: ExecSocket, ws: web.WebSocketResponse,
                       text: str) -> None:
        try:
            command = json.loads(text)
        except ValueError:
            command = None
        if not isinstance(command, dict):
            await self._send(sock, text.encode())  # plain text is typed, as before
            return
        kind = command.get("type")
        if kind == "input" and isinstance(command.get("data"), str):
            await self._send(sock, command["data"].encode())
        elif kind == "resize":
            cols, rows = command.get("cols"), command.get("rows")
            if not (isinstance(cols, int) and isinstance(rows, int)) or isinstance(
                    cols, bool) or isinstance(rows, bool):
                await ws.send_json({"type": "error", "error": "resize needs integer cols and rows"})
                return
            with contextlib.suppress(docker.errors.APIError, ClawdError):
                await self.engine.call(self.engine.api.exec_resize, exec_id,
                                       height=min(max(rows, 1), 200), width=min(max(cols, 1), 500))
        elif kind == "ping":
            await ws.send_json({"type": "pong"})
        else:
            await ws.send_json({"type": "error", "error": f"unknown message type {kind!r}"})

    async def _send(self, sock: ExecSocket, data: bytes) -> None:
        with contextlib.suppress(OSError):
            await self.engine.stream(lambda: sock.sendall(data))

    async def _end_shell(self, container_id: str, exec_id: str, sock: ExecSocket) -> None:
        """The client left: hang up like a dropped ssh session (SIGHUP, which bash passes on
        to its jobs; nohup'd ones live on), then kill what is left of the shell's group."""
        await self.spaces.kill_exec(container_id, exec_id, signal.SIGHUP)
        sock.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.3)
        await self.spaces.kill_exec(container_id, exec_id)

    async def close_all(self) -> None:
        for ws in list(self.sockets):
            await ws.close(code=1001, message=b"server shutting down")


###############################################################################
# Housekeeping: activity, auto-sleep, shell history ###########################
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


def write_json_atomic(path: str, value: Any) -> None:
    write_atomic(path, json.dumps(value, separators=(",", ":")).encode())


def read_json_file(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as source:
            return json.load(source)
    except (OSError, ValueError):
        return None


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
    """Background work of the node: auto-sleep of idle spaces and shell history ingestion.

    Neither counts as activity nor wakes a paused space. Activity times and history read
    positions live in small JSON files in the data directory, so a restart neither pauses every
    space at once nor emits a history line twice.
    """

    def __init__(self, config: Config, spaces: Spaces, files: Files) -> None:
        self.config = config
        self.spaces = spaces
        self.files = files
        self.activity_path = os.path.join(config.data_dir, "activity.json")
        self.cursor_path = os.path.join(config.data_dir, "history-cursors.json")
        self.cursors: dict[str, dict[str, Any]] = {}
        self.history_turn = 0  # where the next tick's round of the spaces starts
        self.saved_activity: dict[str, float] = {}

    def load(self) -> None:
        activity = read_json_file(self.activity_path)
        if isinstance(activity, dict):
            for name, when in activity.items():
                if isinstance(when, (int, float)):
                    self.spaces.last_activity.setdefault(str(name), float(when))
        cursors = read_json_file(self.cursor_path)
        if isinstance(cursors, dict):
            self.cursors = {str(k): v for k, v in cursors.items() if isinstance(v, dict)}

    async def save_activity(self) -> None:
        current = dict(self.spaces.last_activity)
        if current != self.saved_activity:
            await asyncio.get_running_loop().run_in_executor(
                None, write_json_atomic, self.activity_path, current)
            self.saved_activity = current

    # -- auto-sleep -----------------------------------------------------------------------

    async def sleep_idle(self) -> None:
        now = self.spaces.clock()
        for space in await self.spaces.list_all():
            name = space["name"]
            if space["status"] != "running" or self.spaces.is_busy(name):
                continue
            last = self.spaces.last_activity.get(name)
            if last is None:
                self.spaces.last_activity[name] = now  # first sight (e.g. after an upgrade)
                continue
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
            await guarded(f"history of {space['name']}",
                          functools.partial(self._ingest_one, space, budget))
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
            if stamp is not None and stamp > self.spaces.clock() + 60:
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

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        every = {
            "sleep": min(30.0, max(0.5, (self.config.idle_timeout or 120) / 4)),
            "history": float(self.config.history_interval),
            "firewall": 60.0,
        }
        jobs: dict[str, Callable[[], Awaitable[Any]]] = {
            "sleep": self.sleep_idle, "history": self.ingest_history,
            "firewall": self.spaces.firewall.check}
        due = {job: time.monotonic() + (every[job] if job == "firewall" else 0) for job in jobs
               if every[job] > 0}
        while True:
            for job in due:
                if time.monotonic() >= due[job]:
                    due[job] = time.monotonic() + every[job]
                    await guarded(f"housekeeping ({job})", jobs[job])
            await guarded("housekeeping (activity)", self.save_activity)
            await asyncio.sleep(max(0.2, min(due.values()) - time.monotonic()))


###############################################################################
# Nodes: discovery, cluster view, forwarding ##################################
###############################################################################

NODE_PROBE_TIMEOUT = 3.0
NODE_ANSWER_LIMIT = 4 << 20  # bytes read from a peer's JSON answer
FORWARD_HEADER = "X-Clawdspace-Node"
FORWARDED_MARK = "X-Clawdspace-Forwarded"
HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "transfer-encoding", "upgrade", "host"})


class NodeInfo(TypedDict, total=False):
    name: str
    url: str
    status: str
    latencyMs: int | None
    capabilities: dict[str, Any] | None
    self: bool
    error: str


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
        self.session: Any = None  # aiohttp.ClientSession, opened with the app

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

    async def _get_json(self, url: str, key: str | None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with self.session.get(url, headers=headers, allow_redirects=False) as response:
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
            status, health = await asyncio.wait_for(self._get_json(f"{url}/api/health", None),
                                                    NODE_PROBE_TIMEOUT)
            node["latencyMs"] = int((time.monotonic() - started) * 1000)
            if not (isinstance(health, dict) and "version" in health and "status" in health):
                node["status"], node["error"] = "unknown", "not a clawdspace node"
                return node
            node["status"] = "online" if status == 200 else "degraded"
            status, caps = await asyncio.wait_for(
                self._get_json(f"{url}/api/system/capabilities", self.config.api_key),
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

    async def run(self) -> None:
        while True:
            await guarded("node discovery", self.refresh)
            await asyncio.sleep(self.config.nodes_refresh)

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
                    self._get_json(f"{node['url']}/api/spaces", self.config.api_key), 10)
                if status != 200 or not isinstance(body, dict):
                    raise ValueError(f"HTTP {status}")
                spaces.extend({**s, "node": node["name"]} for s in body.get("spaces", [])
                              if isinstance(s, dict))
            except Exception as err:  # noqa: BLE001 - one node down must not sink the view
                errors.append({"node": node["name"], "error": str(err) or type(err).__name__})

        await asyncio.gather(*(fetch(n) for n in peers))
        spaces.sort(key=lambda s: (str(s.get("node")), str(s.get("name"))))
        return {"spaces": spaces, "errors": errors}

    async def forward(self, request: web.Request, node: NodeInfo) -> web.StreamResponse:
        """Send this request to another node with the same key, streaming both ways."""
        query = [(k, v) for k, v in request.query.items() if k not in ("node", "key")]
        target = f"{node['url']}{request.path}"
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in HOP_HEADERS and k != FORWARD_HEADER}
        headers[FORWARDED_MARK] = self.self_name()
        headers["Authorization"] = f"Bearer {presented_key(request) or ''}"
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._forward_websocket(request, node, target, query, headers)
        try:
            upstream = await self.session.request(
                request.method, target, params=query, headers=headers,
                data=request.content if request.body_exists else None, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=NODE_PROBE_TIMEOUT,
                                              sock_read=self.config.exec_max_timeout + 60))
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

    async def _forward_websocket(self, request: web.Request, node: NodeInfo, target: str,
                                 query: list[tuple[str, str]],
                                 headers: dict[str, str]) -> web.StreamResponse:
        headers = {k: v for k, v in headers.items() if not k.lower().startswith("sec-websocket")}
        try:
            upstream = await self.session.ws_connect(
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


###############################################################################
# E2B-compatible surface: control plane and envd ##############################
###############################################################################

E2B_ENVD_VERSION = "0.5.7"  # what the SDK gates features on (see E2B.md 4.5)
E2B_ENVD_PORT = "49983"
E2B_ID_HEADER = "E2b-Sandbox-Id"
E2B_DEFAULT_TIMEOUT = 300
E2B_MAX_PROCESSES = 256  # remembered per node, for List and SendSignal
CONNECT_CODES = {400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied",
                 404: "not_found", 409: "failed_precondition", 411: "invalid_argument",
                 413: "resource_exhausted", 502: "unavailable", 503: "unavailable",
                 504: "deadline_exceeded", 507: "resource_exhausted"}
E2B_PATHS = ("/sandboxes", "/v2/sandboxes")


ENVD_PATHS = ("/health", "/files", "/process.Process/", "/filesystem.Filesystem/")


def is_envd_request(request: web.BaseRequest) -> bool:
    """A call of E2B's in-sandbox daemon: one of its paths, for the sandbox the header names."""
    path = request.path
    return E2B_ID_HEADER in request.headers and (
        path in ENVD_PATHS[:2] or path.startswith(ENVD_PATHS[2:]))


def is_e2b_rest(request: web.BaseRequest) -> bool:
    return request.path.startswith(E2B_PATHS)


ENVD_TOKEN_RE = re.compile(r"([0-9a-f]{12})\.([0-9a-f]{64})")


def envd_token(config: Config, sandbox_id: str, container_id: str) -> str:
    """The daemon token of one incarnation of a sandbox: derived, never stored.

    ``<container id>.<HMAC of sandbox id and container id under the API key>``: any node of
    the cluster (they share the key) can check it without state, and the node that holds the
    sandbox also checks that the container it names is still the sandbox's, so a killed
    sandbox's token is worth nothing, even if a sandbox of the same id were made again."""
    incarnation = container_id[:12]
    secret = (config.api_key or "clawdspace-auth-disabled").encode("utf-8", "surrogateescape")
    mac = hmac.new(secret, f"e2b-envd:{sandbox_id}:{incarnation}".encode(), hashlib.sha256)
    return f"{incarnation}.{mac.hexdigest()}"


def envd_token_incarnation(config: Config, sandbox_id: str, token: str) -> str | None:
    """The container id (12 hex digits) a valid token of ``sandbox_id`` names; else None."""
    match = ENVD_TOKEN_RE.fullmatch(token)
    if match is None:
        return None
    expected = envd_token(config, sandbox_id, match.group(1))
    return match.group(1) if hmac.compare_digest(token.encode(), expected.encode()) else None


def connect_envelope(message: dict[str, Any], end: bool = False) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">BI", 0x02 if end else 0x00, len(body)) + body


def read_envelope(raw: bytes) -> dict[str, Any]:
    if len(raw) < 5:
        raise BadRequest("empty Connect stream request", "invalid_argument")
    flags, size = struct.unpack(">BI", raw[:5])
    message = load_json(raw[5:5 + size], "the Connect message", "invalid_argument")
    if flags & 0x01 or not isinstance(message, dict):
        raise BadRequest("compressed or malformed Connect message", "invalid_argument")
    return message


def e2b_time(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass
class E2bProcess:
    """A command started through envd: the exec behind the pid the SDK sees."""

    sandbox: str
    container_id: str
    exec_id: str
    config: dict[str, Any]
    tag: str | None


class E2b:
    """E2B's REST control plane over spaces, and envd emulated with ``docker exec`` and the
    files API. A sandbox is a space named ``e2b-<hex>``; its metadata and template are labels,
    its timeout a deadline in the data directory (timeouts pause; nothing is deleted)."""

    def __init__(self, config: Config, spaces: Spaces, files: Files, templates: Templates,
                 nodes: Nodes) -> None:
        self.config = config
        self.spaces = spaces
        self.files = files
        self.templates = templates
        self.nodes = nodes
        self.deadline_path = os.path.join(config.data_dir, "e2b-deadlines.json")
        self.deadlines: dict[str, float] = {}
        self.save_lock = asyncio.Lock()
        self.processes: dict[int, E2bProcess] = {}
        self.next_pid = 1000

    def load(self) -> None:
        saved = read_json_file(self.deadline_path)
        if isinstance(saved, dict):
            self.deadlines = {str(k): float(v) for k, v in saved.items()
                              if isinstance(v, (int, float))}

    async def _save(self) -> None:
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
            metadata = json.loads((labels or {}).get(f"{LABEL}.e2b-metadata") or "{}")
        except (ValueError, RecursionError):
            metadata = {}
        sandbox: dict[str, Any] = {
            "templateID": (labels or {}).get(f"{LABEL}.e2b-template") or space["template"]
            or "base",
            "sandboxID": name,
            "clientID": self.nodes.self_name(),
            "envdVersion": E2B_ENVD_VERSION,
            "domain": None,
            "startedAt": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "endAt": e2b_time(self.deadlines.get(name,
                                                 self.spaces.clock() + E2B_DEFAULT_TIMEOUT)),
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
        if sandbox_id in self.spaces.known:
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
                with contextlib.suppress(Exception):
                    status, _ = await asyncio.wait_for(self.nodes._get_json(
                        f"{node['url']}/sandboxes/{sandbox_id}", self.config.api_key),
                        NODE_PROBE_TIMEOUT)
                    if status == 200:
                        return node
        return None

    async def is_incarnation(self, sandbox_id: str, incarnation: str) -> bool:
        """Whether the sandbox exists here and its container's id starts with
        ``incarnation``."""
        if sandbox_id not in self.spaces.known:
            with contextlib.suppress(NotFound, BadRequest):
                await self.spaces.inspect(sandbox_id)
        known = self.spaces.known.get(sandbox_id)
        return known is not None and known[0].startswith(incarnation)

    async def _find(self, sandbox_id: str) -> tuple[SpaceInfo, dict[str, str]]:
        if not SPACE_NAME_RE.fullmatch(sandbox_id) or not sandbox_id.startswith("e2b-"):
            raise NotFound(f"sandbox {sandbox_id[:80]} not found")
        try:
            info = await self.spaces.inspect(sandbox_id)
        except (NotFound, BadRequest):
            raise NotFound(f"sandbox {sandbox_id} not found") from None
        return self.spaces.view_inspected(info), (info.get("Config") or {}).get("Labels") or {}

    def _timeout(self, body: dict[str, Any]) -> int:
        timeout = body.get("timeout", E2B_DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 < timeout <= \
                86400 * 30:
            raise BadRequest("timeout must be a number of seconds", "invalid_argument")
        return timeout

    async def create(self, body: dict[str, Any], actor: Actor) -> dict[str, Any]:
        template_id = body.get("templateID") or "base"
        if not isinstance(template_id, str):
            raise BadRequest("templateID must be a string", "invalid_argument")
        template = await self.templates.for_space("default" if template_id == "base"
                                                  else template_id)
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
        request = dataclasses.replace(request, labels={
            f"{LABEL}.e2b-template": template_id, f"{LABEL}.e2b-metadata": encoded})
        space = await self.spaces.create(request, actor)
        self.deadlines[name] = self.spaces.clock() + timeout
        await self._save()
        return self._sandbox(space, request.labels)

    async def get(self, sandbox_id: str) -> dict[str, Any]:
        space, labels = await self._find(sandbox_id)
        return self._sandbox(space, labels)

    async def list_sandboxes(self, request: web.Request) -> list[dict[str, Any]]:
        states = set((request.query.get("state") or "running,paused").split(","))
        wanted = dict(urllib.parse.parse_qsl(request.query.get("metadata") or ""))
        filters = {"label": [f"{LABEL}.instance={self.config.prefix}", f"{LABEL}.kind=space",
                             f"{LABEL}.e2b-template"]}
        rows = await self.spaces.engine.call(self.spaces.engine.api.containers, all=True,
                                             filters=filters)
        found = []
        for row in rows:
            labels = row.get("Labels") or {}
            sandbox = self._sandbox(self.spaces.view(row["Id"], labels, row.get("State", "")),
                                    labels, with_token=False)
            if sandbox["state"] in states and all(
                    sandbox["metadata"].get(k) == v for k, v in wanted.items()):
                found.append(sandbox)
        return found[:max(1, min(query_int(request, "limit", 100, 1, 100), 100))]

    async def kill(self, sandbox_id: str, actor: Actor) -> None:
        await self._find(sandbox_id)
        await self.spaces.destroy(sandbox_id, True, actor)
        self.deadlines.pop(sandbox_id, None)
        await self._save()

    async def set_timeout(self, sandbox_id: str, body: dict[str, Any]) -> None:
        await self._find(sandbox_id)
        self.deadlines[sandbox_id] = self.spaces.clock() + self._timeout(body)
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
        self.deadlines[sandbox_id] = self.spaces.clock() + self._timeout(body)
        await self._save()
        space, labels = await self._find(sandbox_id)
        return (201 if resumed else 200), self._sandbox(space, labels)

    async def run(self) -> None:
        while True:
            await guarded("e2b timeouts", self.expire)
            await asyncio.sleep(5)

    async def expire(self) -> None:
        """Sandboxes past their timeout are paused (never deleted: /workspace survives)."""
        now = self.spaces.clock()
        for name, deadline in list(self.deadlines.items()):
            if deadline > now or self.spaces.last_activity.get(name, 0) > deadline:
                continue  # used after its deadline (woken by a call): auto-sleep governs now
            try:
                space, _ = await self._find(name)
            except NotFound:
                self.deadlines.pop(name, None)
                continue
            if space["status"] == "running" and not self.spaces.is_busy(name):
                with contextlib.suppress(ClawdError):
                    await self.spaces.pause(name, SYSTEM_ACTOR, reason="e2b timeout")

    # -- envd: processes ------------------------------------------------------------------

    async def start_process(self, request: web.Request, sandbox: str,
                            actor: Actor) -> web.StreamResponse:
        message = read_envelope(await read_body(request))
        process = json_object(message.get("process"), "process")
        cmd, args = process.get("cmd"), process.get("args") or []
        envs, cwd = process.get("envs") or {}, process.get("cwd") or WORKSPACE
        if not isinstance(cmd, str) or not cmd or not isinstance(args, list) or not all(
                isinstance(a, str) for a in args):
            raise BadRequest("process.cmd and args are required", "invalid_argument")
        if not isinstance(cwd, str) or not cwd.startswith("/") or "\x00" in cwd:
            raise BadRequest("cwd must be an absolute path outside /proc, /sys and /dev",
                             "invalid_argument")
        timeout_ms = request.headers.get("Connect-Timeout-Ms", "")
        timeout = min(int(timeout_ms) / 1000, float(self.config.exec_max_timeout)) \
            if re.fullmatch(r"[0-9]{1,12}", timeout_ms) and int(timeout_ms) else None
        keepalive = request.headers.get("Keepalive-Ping-Interval", "")
        ping_every = float(keepalive) if re.fullmatch(r"[0-9]{1,6}", keepalive) and int(
            keepalive) > 0 else 50.0
        req = ExecRequest(argv=[cmd, *args], env=check_env(envs),
                          workdir="/" + os.path.normpath(cwd).lstrip("/"),
                          timeout=timeout or 86400.0, root="")
        with self.spaces.busy(sandbox):
            container_id, exec_id, sock = await self.spaces._start_exec(sandbox, req, actor, {
                "command": [cmd, *args], "envKeys": sorted(req.env), "workdir": req.workdir,
                "source": "e2b"})
            pid = self._remember(E2bProcess(sandbox, container_id, exec_id,
                                            {"cmd": cmd, "args": args, "envs": envs,
                                             "cwd": req.workdir}, message.get("tag")))
            answer = web.StreamResponse(headers={"Content-Type": "application/connect+json"})
            await answer.prepare(request)
            await answer.write(connect_envelope({"event": {"start": {"pid": pid}}}))
            await self._relay(answer, sandbox, sock, container_id, exec_id, timeout, ping_every)
            return answer

    def _remember(self, process: E2bProcess) -> int:
        self.next_pid += 1
        self.processes[self.next_pid] = process
        while len(self.processes) > E2B_MAX_PROCESSES:
            self.processes.pop(next(iter(self.processes)))
        return self.next_pid

    async def _relay(self, answer: web.StreamResponse, sandbox: str, sock: ExecSocket,
                     container_id: str, exec_id: str, timeout: float | None,
                     ping_every: float) -> None:
        """Exec output to Connect data events through a bounded queue, then the end event."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(16)
        reader = DemuxReader(sock, 0)
        reader.sink = lambda stream, data: asyncio.run_coroutine_threadsafe(
            queue.put((stream, data)), loop).result()
        pump = loop.run_in_executor(self.spaces.engine.streams, self._pump, reader, queue, loop)
        deadline = time.monotonic() + timeout if timeout else None
        client_gone = timed_out = False
        try:
            while True:
                wait = ping_every if deadline is None else min(ping_every,
                                                               deadline - time.monotonic())
                try:
                    item = await asyncio.wait_for(queue.get(), max(wait, 0.01))
                except asyncio.TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        timed_out = True
                        await self.spaces.kill_exec(container_id, exec_id)
                        deadline = None
                        continue
                    item = (-1, b"")
                if item is None:
                    break
                self.spaces.touch(sandbox)
                if client_gone:
                    continue  # keep draining: envd leaves a process running when a client goes
                stream, data = item
                event = {"keepalive": {}} if stream < 0 else {"data": {
                    "stdout" if stream == 1 else "stderr": base64.b64encode(data).decode()}}
                try:
                    await answer.write(connect_envelope({"event": event}))
                except (ConnectionResetError, RuntimeError):
                    client_gone = True
        finally:
            if not pump.done():
                reader.abort()
            with contextlib.suppress(Exception):
                await pump
            sock.close()
        details = await self.spaces.engine.call(self.spaces.engine.api.exec_inspect, exec_id)
        code = details.get("ExitCode")
        code = -1 if code is None or timed_out else int(code)
        end: dict[str, Any] = {"exitCode": code, "exited": not timed_out,
                               "status": "signal: killed" if timed_out else f"exit status {code}"}
        if client_gone:
            return
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await answer.write(connect_envelope({"event": {"end": end}}))
            trailer: dict[str, Any] = {}
            if timed_out:
                trailer = {"error": {"code": "deadline_exceeded",
                                     "message": "the command ran past its timeout"}}
            await answer.write(connect_envelope(trailer, end=True))
            await answer.write_eof()

    @staticmethod
    def _pump(reader: DemuxReader, queue: asyncio.Queue[tuple[int, bytes] | None],
              loop: asyncio.AbstractEventLoop) -> None:
        try:
            reader.run()
        finally:
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

    async def list_processes(self, sandbox: str) -> dict[str, Any]:
        api = self.spaces.engine.api
        alive = []
        for pid, process in list(self.processes.items()):
            if process.sandbox != sandbox:
                continue
            with contextlib.suppress(docker.errors.APIError):
                if (await self.spaces.engine.call(api.exec_inspect, process.exec_id)).get(
                        "Running"):
                    entry: dict[str, Any] = {"config": process.config, "pid": pid}
                    if process.tag:
                        entry["tag"] = process.tag
                    alive.append(entry)
        return {"processes": alive}

    async def signal(self, sandbox: str, body: dict[str, Any]) -> dict[str, Any]:
        raw_pid = json_object(body.get("process"), "process").get("pid")
        pid = raw_pid if isinstance(raw_pid, int) else -1
        process = self.processes.get(pid)
        if process is None or process.sandbox != sandbox:
            raise NotFound(f"process {pid} not found")
        running = (await self.spaces.engine.call(self.spaces.engine.api.exec_inspect,
                                                 process.exec_id)).get("Running")
        if not running:
            self.processes.pop(pid, None)
            raise NotFound(f"process {pid} not found")
        await self.spaces.kill_exec(process.container_id, process.exec_id)
        self.processes.pop(pid, None)  # killed: a second signal finds nothing, as in envd
        return {}

    # -- envd: files ----------------------------------------------------------------------

    @staticmethod
    def rel_path(path: Any) -> str:
        """An envd path (absolute, or relative to the home, here /workspace) for the files API."""
        if not isinstance(path, str) or not path:
            raise BadRequest("path is required", "invalid_argument")
        if path == WORKSPACE or path.startswith(WORKSPACE + "/"):
            return path[len(WORKSPACE):] or "/"
        if path.startswith("/"):
            raise Forbidden(f"{path} is outside /workspace", "outside_workspace")
        return "/" + path

    def entry(self, real: str, kind: str, size: int, mtime: float) -> dict[str, Any]:
        types = {"dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}
        mode = 0o755 if kind == "dir" else 0o644
        return {"name": real.rstrip("/").rpartition("/")[2] or real, "path": real,
                "type": types.get(kind, "FILE_TYPE_FILE"), "size": str(size), "mode": mode,
                "permissions": ("d" if kind == "dir" else "-") + "".join(
                    "rwx"[i % 3] if mode & (1 << (8 - i)) else "-" for i in range(9)),
                "owner": "sandbox", "group": "sandbox", "modifiedTime": e2b_time(mtime)}

    async def filesystem(self, method: str, sandbox: str, body: dict[str, Any],
                         actor: Actor) -> dict[str, Any]:
        info = await self.spaces.running(sandbox, actor)
        self.spaces.touch(sandbox)
        if method == "Stat":
            where = await self.files.resolve(info["Id"], self.rel_path(body.get("path")))
            if where.stat is None:
                raise NotFound(f"{body.get('path')}: no such file or directory")
            return {"entry": self._stat_entry(where)}
        if method == "ListDir":
            listing = await self.files.list_dir(sandbox, self.rel_path(body.get("path")), 10000,
                                                actor)
            return {"entries": [self.entry(WORKSPACE + e["path"], e["type"], e["size"],
                                           e["mtimeMs"] / 1000) for e in listing["entries"]]}
        if method in ("MakeDir", "Remove"):
            where = await self.files.resolve(info["Id"], self.rel_path(body.get("path")),
                                             follow_last=method == "MakeDir")
            if method == "MakeDir":
                if where.stat is not None:
                    raise E2bExists(f"{where.rel} already exists")
                argv = ["mkdir", "-p", "--", where.real]
                event: tuple[str, dict[str, Any]] = ("space.file.mkdir", {"path": where.rel})
            else:
                if where.rel == "/":
                    raise BadRequest("the workspace root cannot be removed", "invalid_argument")
                if where.stat is None:
                    raise NotFound(f"{where.rel}: no such file or directory")
                argv = ["rm", "-rf", "--", where.real]
                event = ("space.file.delete", {"path": where.rel, "recursive": True})
            async with self.spaces.audit.action(event[0], sandbox,
                                                {**event[1], "source": "e2b"}, actor):
                await self._run(info, argv)
            if method == "Remove":
                return {}
            return {"entry": self._stat_entry(await self.files.resolve(info["Id"], where.rel))}
        if method == "Move":
            source = await self.files.resolve(info["Id"], self.rel_path(body.get("source")),
                                              follow_last=False)
            target = await self.files.resolve(info["Id"],
                                              self.rel_path(body.get("destination")))
            if source.stat is None:
                raise NotFound(f"{source.rel}: no such file or directory")
            if source.rel == "/":
                raise BadRequest("the workspace root cannot be moved", "invalid_argument")
            async with self.spaces.audit.action("space.file.move", sandbox, {
                    "path": source.rel, "destination": target.rel, "source": "e2b"}, actor):
                await self._run(info, ["mv", "-f", "--", source.real, target.real])
            return {"entry": self._stat_entry(await self.files.resolve(info["Id"], target.rel,
                                                                        follow_last=False))}
        raise NotFound(f"filesystem.Filesystem/{method} is not supported")

    def _stat_entry(self, where: Resolved) -> dict[str, Any]:
        stat = where.stat or {}
        mtime = dt.datetime.fromisoformat(str(stat.get("mtime", "1970-01-01T00:00:00"))[:19])
        return self.entry(where.real, mode_type(int(stat.get("mode", 0))),
                          int(stat.get("size", 0)),
                          mtime.replace(tzinfo=dt.timezone.utc).timestamp())

    async def _run(self, info: dict[str, Any], argv: list[str]) -> None:
        result = await self.spaces.run_internal(info, ExecRequest(
            argv=argv, env={}, workdir=WORKSPACE, timeout=60), 65536)
        if result["exitCode"] != 0:
            raise Conflict(result["stderr"].strip() or f"{argv[0]} failed")

    async def upload(self, request: web.Request, sandbox: str,
                     actor: Actor) -> list[dict[str, str]]:
        written = []
        path = request.query.get("path")
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, aiohttp.BodyPartReader) or part.name != "file":
                    continue
                target = path or part.filename
                data = await part.read(decode=False)
                await self.files.write(sandbox, self.rel_path(target), len(data),
                                       iter([bytes(data)]), actor)
                written.append(self.rel_path(target))
        else:
            size = request.content_length
            if size is None:
                raise LengthRequired("uploads need a Content-Length header")
            await self.files.write(sandbox, self.rel_path(path), size, body_chunks(request),
                                   actor)
            written.append(self.rel_path(path))
        if not written:
            raise BadRequest("no file in the upload", "invalid_argument")
        return [{"name": rel.rpartition("/")[2], "type": "file", "path": WORKSPACE + rel}
                for rel in written]


class E2bExists(Conflict):
    """An envd MakeDir on an existing path (the SDK answers False)."""

    code = "already_exists"


###############################################################################
# Auth and errors (middlewares) ###############################################
###############################################################################

CONFIG_KEY = web.AppKey("config", Config)
ENGINE_KEY = web.AppKey("engine", Engine)
AUDIT_KEY = web.AppKey("audit", AuditLog)
SPACES_KEY = web.AppKey("spaces", Spaces)
FILES_KEY = web.AppKey("files", Files)
TERMINALS_KEY = web.AppKey("terminals", Terminals)
OBSERVER_KEY = web.AppKey("observer", Observer)
HOUSEKEEPER_KEY = web.AppKey("housekeeper", Housekeeper)
TEMPLATES_KEY = web.AppKey("templates", Templates)
FIREWALL_KEY = web.AppKey("firewall", Firewall)
NODES_KEY = web.AppKey("nodes", Nodes)
E2B_KEY = web.AppKey("e2b", E2b)
GIT_KEY = web.AppKey("git", GitOps)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HEADER_LIMIT = 128 << 10
# What a route accepts as credentials, fixed in the route table, never chosen by the headers a
# request happens to carry. A route missing from the table (404, 405) needs the key.
PUBLIC = "public"  # nothing (GET and HEAD only)
NODE_KEY = "key"  # the node's API key
ENVD_TOKEN = "envd"  # noqa: S105 - a route kind; one E2B sandbox's daemon token, for that sandbox only
ACTOR_KEY = web.RequestKey("actor", Actor)
ENVD_INCARNATION_KEY = web.RequestKey("envd_incarnation", str)


def json_error(status: int, message: str, code: str, headers: dict[str, str] | None = None,
               request: web.BaseRequest | None = None) -> web.Response:
    """Our ``{"error", "code"}``; E2B's shapes on its surfaces (envd: Connect error codes)."""
    if request is not None and is_envd_request(request):
        connect = code if code in ("already_exists",) else CONNECT_CODES.get(status, "internal")
        return web.json_response({"code": connect, "message": message}, status=status,
                                 headers=headers)
    if request is not None and is_e2b_rest(request):
        return web.json_response({"code": status, "message": message}, status=status,
                                 headers={**(headers or {}), "Should-Retry": "false"})
    return web.json_response({"error": message, "code": code}, status=status, headers=headers)


def presented_key(request: web.Request) -> str | None:
    """Bearer header, ``?key=``, or X-API-Key (what E2B's SDK sends)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.query.get("key") or request.headers.get("X-API-Key") or None


def make_auth_middleware(config: Config, access: dict[web.AbstractRoute, str]) -> Any:
    """Deny by default: the route's entry in ``access`` says which credential it takes."""
    expected = (config.api_key or "").encode("utf-8", "surrogateescape")

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        kind = access.get(request.match_info.route, NODE_KEY)
        if kind == PUBLIC and request.method in ("GET", "HEAD"):
            request[ACTOR_KEY] = Actor(key_id=None, addr=request.remote)
        elif config.auth_disabled:
            request[ACTOR_KEY] = Actor(key_id=None, addr=request.remote)
            if kind == ENVD_TOKEN:
                request[ENVD_INCARNATION_KEY] = ""
        elif kind == ENVD_TOKEN:
            sandbox = request.headers.get(E2B_ID_HEADER, "")
            incarnation = envd_token_incarnation(config, sandbox,
                                                 request.headers.get("X-Access-Token", ""))
            if incarnation is None:
                log.warning("auth: rejected envd %s %s from %s", request.method,
                            request.path, request.remote)
                raise Unauthorized("Unauthorized")
            request[ACTOR_KEY] = Actor(key_id=None, addr=request.remote, sandbox=sandbox)
            request[ENVD_INCARNATION_KEY] = incarnation
        else:
            key = presented_key(request)
            if key is None or not hmac.compare_digest(
                    key.encode("utf-8", "surrogateescape"), expected):
                log.warning("auth: rejected %s %s from %s (%s)", request.method, request.path,
                            request.remote, "no key" if key is None else "wrong key")
                raise Unauthorized("Unauthorized")
            request[ACTOR_KEY] = Actor(key_id=key_id(key), addr=request.remote)
        return await handler(request)

    return authenticate


NODE_LOCAL_PATHS = frozenset({"/api/health", "/api/openapi.json", "/api/nodes"})


def make_forward_middleware(nodes: Nodes) -> Any:
    @web.middleware
    async def forward(request: web.Request, handler: Handler) -> web.StreamResponse:
        """``?node=NAME`` (or the X-Clawdspace-Node header) sends the request to that node."""
        target = request.query.get("node") or request.headers.get(FORWARD_HEADER)
        if not target:
            sandbox = request.headers.get(E2B_ID_HEADER) if is_envd_request(request) else \
                request.match_info.get("id") if is_e2b_rest(request) else None
            if sandbox and SPACE_NAME_RE.fullmatch(sandbox) and request.path != "/health":
                forwarded = await e2b_elsewhere(request, sandbox)
                if forwarded is not None:
                    return forwarded
        if not target or request.headers.get(FORWARDED_MARK) or request.path in \
                NODE_LOCAL_PATHS or target == nodes.self_name():
            return await handler(request)
        if not nodes.nodes:
            await nodes.refresh()
        node = nodes.find(target)
        if node.get("self"):
            return await handler(request)
        if node["status"] != "online":
            node = await nodes.recheck(node)  # the cache may be older than the node's start
        if node["status"] != "online":
            raise BadGateway(f"node {target} is {node['status']}"
                             f"{': ' + node['error'] if node.get('error') else ''}")
        return await nodes.forward(request, node)

    return forward


HTTP_CODES = {400: "invalid", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
              415: "unsupported_media_type"}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes ``{"error", "code"}`` JSON with the right status."""
    try:
        return await handler(request)
    except ClawdError as err:
        return json_error(err.status, err.message, err.code, request=request)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        headers = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else None
        message = {404: "no such route", 413: "request body too large"}.get(err.status,
                                                                         err.reason)
        return json_error(err.status, message, HTTP_CODES.get(err.status, "http_error"), headers,
                          request)
    except docker.errors.APIError as err:
        log.warning("docker: %s %s: %s", request.method, request.path, api_message(err))
        if api_status(err) in (404, 409):
            return json_error(api_status(err), api_message(err),
                              "not_found" if api_status(err) == 404 else "conflict",
                              request=request)
        return json_error(503, f"the Docker engine refused: {api_message(err)}", "docker_error",
                          request=request)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return json_error(500, "internal error (see the service log)", "internal",
                          request=request)


class RedactingAccessLogger(AbstractAccessLogger):
    """Access log lines without query strings, so a ``?key=`` never reaches the log."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %d %.1fms", request.remote, request.method, request.path,
                         response.status, time * 1000)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


###############################################################################
# Handlers ####################################################################
###############################################################################

def actor(request: web.Request) -> Actor:
    """Who is calling, as the auth middleware established it."""
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


def body_chunks(request: web.Request) -> Iterator[bytes]:
    """The request body as a blocking iterator, for a writer thread; it pulls from the loop."""
    loop = asyncio.get_running_loop()
    timeout = request.app[CONFIG_KEY].body_timeout

    async def next_chunk() -> bytes:
        try:
            return await asyncio.wait_for(request.content.readany(), timeout)
        except asyncio.TimeoutError:
            log.warning("upload from %s stalled for %d s; dropped", request.remote, timeout)
            raise BodyTimeout(f"the request body stopped arriving for {timeout} s") from None

    def chunks() -> Iterator[bytes]:
        while True:
            chunk = asyncio.run_coroutine_threadsafe(next_chunk(), loop).result()
            if not chunk:
                return
            yield chunk

    return chunks()


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
        {"status": "ok" if ok else "degraded", "version": VERSION, "docker": docker_state,
         "firewall": request.app[FIREWALL_KEY].status()},
        status=200 if ok else 503)


async def get_system(request: web.Request) -> web.Response:
    return web.json_response(await system_info(request.app[CONFIG_KEY], request.app[ENGINE_KEY]))


async def get_capabilities(request: web.Request) -> web.Response:
    caps = await capabilities(request.app[CONFIG_KEY], request.app[ENGINE_KEY])
    return web.json_response({**caps, "firewall": request.app[FIREWALL_KEY].status()})


async def list_spaces(request: web.Request) -> web.Response:
    scope = request.query.get("scope", "node")
    if scope not in ("node", "cluster"):
        raise BadRequest("scope must be node or cluster", "invalid_scope")
    local = await request.app[SPACES_KEY].list_all()
    if scope == "node":
        return web.json_response({"spaces": local})
    nodes = request.app[NODES_KEY]
    if not nodes.nodes:
        await nodes.refresh()
    return web.json_response(await nodes.cluster_spaces(local))


async def get_nodes(request: web.Request) -> web.Response:
    nodes = request.app[NODES_KEY]
    if query_bool(request, "refresh") or not nodes.nodes:
        await nodes.refresh()
    return web.json_response({"nodes": nodes.nodes, "lastUpdatedAt": nodes.updated_ms})


async def create_space(request: web.Request) -> web.Response:
    body = await json_body(request)
    config = request.app[CONFIG_KEY]
    template = await request.app[TEMPLATES_KEY].for_space(body.get("template", "default"))
    req = parse_create(body, config, template)
    who = actor(request)
    files, git = request.app[FILES_KEY], request.app[GIT_KEY]

    async def provision(info: dict[str, Any]) -> None:
        if req.env_file is not None:
            path, content = req.env_file
            await files.write(req.name, path, len(content), iter([content]), who, mode=0o600)
        if req.repo is not None:
            token = req.git_token
            if token is None and req.repo.netloc == "github.com":
                token = await node_github_token(config)
            result = await git.clone(info, req.repo, req.repo_branch, req.repo_dest, token)
            if result["exitCode"] != 0:
                detail = (result["stderr"] or result["stdout"]).strip() or "unknown error"
                raise BadRequest(f"Repo clone failed: {detail[-2000:]}", "clone_failed")

    needs_provision = req.env_file is not None or req.repo is not None
    try:
        space = await request.app[SPACES_KEY].create(req, who,
                                                     provision if needs_provision else None)
    except NoGpu as err:
        others = request.app[NODES_KEY].with_gpu()
        if others:
            raise NoGpu(f"{err.message}; nodes with GPUs: {', '.join(others)} (create there, "
                        "or add ?node=NAME)") from None
        raise
    return web.json_response({"space": space}, status=201)


async def list_templates(request: web.Request) -> web.Response:
    return web.json_response({"templates": await request.app[TEMPLATES_KEY].list_all()})


async def get_template(request: web.Request) -> web.Response:
    template, text = await request.app[TEMPLATES_KEY].get(request.match_info["name"])
    return web.json_response({"name": template.name, "yaml": text,
                              "template": template.as_dict()})


async def put_template(request: web.Request) -> web.Response:
    body = await json_body(request)
    check_fields(body, {"yaml"})
    template = await request.app[TEMPLATES_KEY].put(body.get("yaml"), actor(request))
    return web.json_response({"template": template.as_dict()})


async def delete_template(request: web.Request) -> web.Response:
    await request.app[TEMPLATES_KEY].delete(request.match_info["name"], actor(request))
    return web.json_response({"message": "OK"})


async def git_push(request: web.Request) -> web.Response:
    name = check_space_name(request.match_info["name"])
    body = await json_body(request)
    return web.json_response(await request.app[GIT_KEY].push(name, body, actor(request)))


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


async def touch_space(request: web.Request) -> web.Response:
    name = check_space_name(request.match_info["name"])
    spaces = request.app[SPACES_KEY]
    await spaces.running(name, actor(request))
    spaces.touch(name)
    return web.json_response({"message": "OK",
                              "lastActivity": epoch_to_iso(spaces.last_activity[name])})


async def space_stats(request: web.Request) -> web.Response:
    info = await request.app[SPACES_KEY].inspect(request.match_info["name"])
    return web.json_response({"stats": await request.app[OBSERVER_KEY].stats(info)})


async def space_observability(request: web.Request) -> web.Response:
    top = query_int(request, "top", 8, 1, 25)
    lines = query_int(request, "historyLines", 50, 1, 500)
    observation = await request.app[OBSERVER_KEY].observe(request.match_info["name"], top, lines)
    return web.json_response({"observability": observation})


def wants_raw(request: web.Request) -> bool:
    if query_bool(request, "raw"):
        return True
    accept = request.headers.get("Accept", "")
    return accept.split(";")[0].strip() == "application/octet-stream"


async def list_files(request: web.Request) -> web.Response:
    name = check_space_name(request.match_info["name"])
    limit = query_int(request, "limit", 1000, 1, 10000)
    listing = await request.app[FILES_KEY].list_dir(name, request.query.get("path"), limit,
                                                    actor(request))
    return web.json_response(listing)


async def read_file(request: web.Request) -> web.StreamResponse:
    name = check_space_name(request.match_info["name"])
    files = request.app[FILES_KEY]
    path = request.query.get("path")
    if not path:
        raise BadRequest("path required", "invalid_path")
    limit = request.app[CONFIG_KEY].file_read_limit
    if wants_raw(request):
        max_bytes = (query_int(request, "maxBytes", 0, 0, 1 << 62)
                     if "maxBytes" in request.query else None)
        return await files.read_raw(request, name, path, max_bytes, actor(request))
    max_bytes = query_int(request, "maxBytes", 262144, 0, limit)
    return web.json_response(await files.read(name, path, max_bytes, actor(request)))


async def write_file(request: web.Request) -> web.Response:
    name = check_space_name(request.match_info["name"])
    path = request.query.get("path")
    if not path:
        raise BadRequest("path required", "invalid_path")
    files = request.app[FILES_KEY]
    if request.content_type == "application/octet-stream":
        size = request.content_length
        if size is None:
            raise LengthRequired("raw uploads need a Content-Length header")
        return web.json_response(await files.write(name, path, size, body_chunks(request),
                                                   actor(request)))
    payload = await json_body(request)
    check_fields(payload, {"contentBase64"})
    encoded = payload.get("contentBase64")
    if not isinstance(encoded, str):
        raise BadRequest("contentBase64 required (a base64 string; empty for an empty file)",
                         "invalid_content")
    try:
        data = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise BadRequest("contentBase64 is not valid base64", "invalid_content") from None
    return web.json_response(await files.write(name, path, len(data), iter([data]),
                                               actor(request)))


async def delete_file(request: web.Request) -> web.Response:
    name = check_space_name(request.match_info["name"])
    path = request.query.get("path")
    if not path:
        raise BadRequest("path required", "invalid_path")
    recursive = query_bool(request, "recursive")
    return web.json_response(await request.app[FILES_KEY].delete(name, path, recursive,
                                                                 actor(request)))


async def terminal(request: web.Request) -> web.StreamResponse:
    name = check_space_name(request.match_info["name"])
    if not origin_allowed(request, request.app[CONFIG_KEY].allowed_origins):
        log.warning("terminal: refused upgrade from origin %s", request.headers.get("Origin"))
        raise Forbidden("this Origin may not open terminals (see CLAWDSPACE_ALLOWED_ORIGINS)",
                        "bad_origin")
    return await request.app[TERMINALS_KEY].serve(request, name, actor(request))


async def e2b_create(request: web.Request) -> web.Response:
    body = await json_body(request)
    return web.json_response(await request.app[E2B_KEY].create(body, actor(request)), status=201)


async def e2b_list(request: web.Request) -> web.Response:
    return web.json_response(await request.app[E2B_KEY].list_sandboxes(request))


async def e2b_get(request: web.Request) -> web.Response:
    return web.json_response(await request.app[E2B_KEY].get(request.match_info["id"]))


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
    body = await json_body(request) if request.can_read_body else {}
    status, sandbox = await request.app[E2B_KEY].connect(request.match_info["id"], body,
                                                         actor(request))
    return web.json_response(sandbox, status=status)


async def e2b_elsewhere(request: web.Request, sandbox_id: str) -> web.StreamResponse | None:
    """Serve a sandbox of another node through this one (one URL for the whole cluster)."""
    if request.headers.get(FORWARDED_MARK):
        return None
    node = await request.app[E2B_KEY].owner(sandbox_id)
    if node is None:
        return None
    return await request.app[NODES_KEY].forward(request, node)


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
    be the sandbox's current container (the middleware checked the token's signature)."""
    sandbox = envd_target(request)
    incarnation = request[ENVD_INCARNATION_KEY]
    if incarnation and not await request.app[E2B_KEY].is_incarnation(sandbox, incarnation):
        log.warning("auth: envd token of a gone sandbox %s from %s", sandbox, request.remote)
        raise Unauthorized("Unauthorized")
    return sandbox


async def envd_health(request: web.Request) -> web.Response:
    envd_target(request)
    return web.Response(status=204)


async def envd_download(request: web.Request) -> web.StreamResponse:
    sandbox = await envd_sandbox(request)
    path = E2b.rel_path(request.query.get("path"))
    return await request.app[FILES_KEY].read_raw(request, sandbox, path, None, actor(request))


async def envd_upload(request: web.Request) -> web.Response:
    sandbox = await envd_sandbox(request)
    return web.json_response(await request.app[E2B_KEY].upload(request, sandbox,
                                                               actor(request)))


async def envd_process(request: web.Request) -> web.StreamResponse:
    sandbox = await envd_sandbox(request)
    e2b, method = request.app[E2B_KEY], request.match_info["method"]
    if method == "Start":
        return await e2b.start_process(request, sandbox, actor(request))
    body = await json_body(request) if request.can_read_body else {}
    if method == "List":
        return web.json_response(await e2b.list_processes(sandbox))
    if method == "SendSignal":
        return web.json_response(await e2b.signal(sandbox, body))
    raise NotFound(f"process.Process/{method[:40]} is not supported by this node")


async def envd_filesystem(request: web.Request) -> web.Response:
    sandbox = await envd_sandbox(request)
    body = await json_body(request) if request.can_read_body else {}
    return web.json_response(await request.app[E2B_KEY].filesystem(
        request.match_info["method"], sandbox, body, actor(request)))


async def get_audit(request: web.Request) -> web.Response:
    space = request.query.get("space") or None
    limit = query_int(request, "limit", 200, 1, 1000)
    events = await request.app[AUDIT_KEY].read(space, limit)
    return web.json_response({"events": events})


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


###############################################################################
# OpenAPI document ############################################################
###############################################################################

def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    words = {400: "Invalid input", 401: "Missing or wrong API key",
             403: "Outside /workspace, or a foreign Origin", 404: "Not found",
             409: "Conflict with the space's state", 411: "Content-Length required",
             413: "Body too large", 507: "The space's disk is full",
             503: "The Docker engine or the audit log is unavailable"}
    return {str(s): _json(_ref("Error"), words[s]) for s in statuses}


NAME_PARAM = {"name": "name", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": SPACE_NAME_RE.pattern, "maxLength": 63}}
PATH_PARAM = {"name": "path", "in": "query", "required": True,
              "description": "Path relative to /workspace, e.g. /src/main.py",
              "schema": {"type": "string", "maxLength": 4096}}
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
                         "gpu", "gpus", "template", "network", "writableRootfs", "idleTimeout",
                         "user",
                         "lastActivity", "volume"],
            "properties": {
                "name": {"type": "string"}, "id": {"type": "string"},
                "status": {"enum": ["running", "paused", "stopped"]},
                "created": {"type": "string"}, "started": {"type": ["string", "null"]},
                "image": {"type": "string"}, "memory": {"type": "integer"},
                "cpus": {"type": "number"}, "gpu": {"type": "boolean"},
                "gpus": {"type": "array", "items": {"type": "string"}},
                "node": {"type": "string"},
                "template": {"type": ["string", "null"]}, "network": {"type": "string"},
                "writableRootfs": {"type": "boolean"},
                "idleTimeout": {"type": ["integer", "null"]},
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
                "network": {"enum": list(NETWORK_MODES)},
                "gpus": {"oneOf": [{"type": "integer", "minimum": 1, "maximum": 64},
                                   {"const": "all"}]},
                "writableRootfs": {"type": "boolean"},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "envFileText": {"type": "string"},
                "envFileBase64": {"type": "string", "contentEncoding": "base64"},
                "envFilePath": {"type": "string"},
                "repoUrl": {"type": "string", "format": "uri"},
                "repoBranch": {"type": "string"},
                "repoDest": {"type": "string"},
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
                "stats": _ref("Stats"),
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
                                   "mtimeMs": {"type": "integer"}}}},
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
        "/api/nodes": {"get": _operation("Nodes of the cluster (refresh=true: probe now)", _json(
            {"type": "object", "required": ["nodes", "lastUpdatedAt"], "properties": {
                "lastUpdatedAt": {"type": "integer"},
                "nodes": {"type": "array", "items": {
                    "type": "object", "required": ["name", "url", "status"],
                    "properties": {"name": {"type": "string"}, "url": {"type": "string"},
                                   "status": {"enum": ["online", "offline", "degraded",
                                                       "unknown"]},
                                   "latencyMs": {"type": ["integer", "null"]},
                                   "capabilities": {"type": ["object", "null"]}}}}}},
            "Nodes"), 400, params=[{"name": "refresh", "in": "query",
                                    "schema": {"type": "boolean"}}])},
        "/api/spaces": {
            "get": _operation("List spaces (scope=cluster: every online node's)", _json(
                {"type": "object", "required": ["spaces"],
                 "properties": {"spaces": {"type": "array", "items": _ref("Space")},
                                "errors": {"type": "array", "items": {"type": "object"}}}},
                "Spaces"), 400, params=[{"name": "scope", "in": "query",
                                         "schema": {"enum": ["node", "cluster"]}}]),
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
        "/api/spaces/{name}/touch": space_op | {
            "post": _operation("Mark a space active (resumes a paused one)", _json(
                {"type": "object", "required": ["message", "lastActivity"],
                 "properties": {"message": {"type": "string"},
                                "lastActivity": {"type": "string"}}}, "Touched"),
                400, 404, 409)},
        "/api/spaces/{name}/stats": space_op | {
            "get": _operation("Resource usage now", _json(
                {"type": "object", "required": ["stats"], "properties": {"stats": _ref("Stats")}},
                "Stats"), 400, 404)},
        "/api/spaces/{name}/observability": space_op | {
            "get": _operation("Stats, disk, top processes, history tail, settings", _json(
                {"type": "object", "required": ["observability"],
                 "properties": {"observability": _ref("Observability")}}, "Observability"),
                400, 404, params=[
                    {"name": "top", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 25}},
                    {"name": "historyLines", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 500}}])},
        "/api/spaces/{name}/files": space_op | {
            "get": _operation("List a directory of /workspace", _json(
                _ref("Listing"), "Entries"), 400, 403, 404, 409, params=[
                    PATH_PARAM | {"required": False},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}])},
        "/api/spaces/{name}/file": space_op | {
            "get": _operation(
                "Read a file (JSON base64, or raw bytes with raw=true or Accept: "
                "application/octet-stream)", {
                    **_json(_ref("FileContent"), "Content"),
                    "content": {"application/json": {"schema": _ref("FileContent")},
                                "application/octet-stream": {"schema": {
                                    "type": "string", "format": "binary"}}}},
                400, 403, 404, 409, params=[
                    PATH_PARAM,
                    {"name": "maxBytes", "in": "query", "schema": {"type": "integer",
                                                                  "minimum": 0}},
                    {"name": "raw", "in": "query", "schema": {"type": "boolean"}}]),
            "put": _operation(
                "Write a file atomically (JSON base64, or a raw application/octet-stream "
                "body with Content-Length)", _json(_ref("FileWritten"), "Written"),
                400, 403, 404, 409, 411, 413, 507, params=[PATH_PARAM]) | {
                    "requestBody": {"required": True, "content": {
                        "application/json": {"schema": {
                            "type": "object", "required": ["contentBase64"],
                            "additionalProperties": False,
                            "properties": {"contentBase64": {"type": "string",
                                                             "contentEncoding": "base64"}}}},
                        "application/octet-stream": {"schema": {"type": "string",
                                                                "format": "binary"}}}}},
            "delete": _operation("Delete a file, or a directory with recursive=true", _json(
                {"type": "object", "required": ["message", "path"],
                 "properties": {"message": {"type": "string"}, "path": {"type": "string"}}},
                "Deleted"), 400, 403, 404, 409, params=[
                    PATH_PARAM,
                    {"name": "recursive", "in": "query", "schema": {"type": "boolean"}}]),
        },
        "/api/spaces/{name}/terminal": space_op | {
            "get": _operation(
                "Websocket terminal (bash -l). Binary frames are stdin and output; text frames "
                "are JSON {type: input|resize|ping}", {"description": "Switching protocols"},
                400, 403, 404, 409, params=[
                    {"name": "cols", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                    {"name": "rows", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 200}}],
                ok_status="101")},
        "/api/spaces/{name}/git/push": space_op | {
            "post": _operation(
                "Push a branch from a repository in the space; the token only reaches git",
                _json(_ref("ExecResult"), "git push finished (see exitCode)"), 403, 404, 409,
                body={"type": "object", "additionalProperties": False, "properties": {
                    "repoPath": {"type": "string", "default": "/repo"},
                    "remote": {"type": "string", "default": "origin"},
                    "branch": {"type": "string", "default": "main"},
                    "token": {"type": "string"}}})},
        "/api/templates": {
            "get": _operation("List templates", _json(
                {"type": "object", "required": ["templates"], "properties": {"templates": {
                    "type": "array", "items": {
                        "type": "object", "required": ["name", "description", "source"],
                        "properties": {"name": {"type": "string"},
                                       "description": {"type": "string"},
                                       "source": {"enum": ["builtin", "shipped", "user"]}}}}}},
                "Templates")),
            "put": _operation("Create or replace a template from YAML", _json(
                {"type": "object", "required": ["template"],
                 "properties": {"template": {"type": "object"}}}, "Stored"),
                body={"type": "object", "required": ["yaml"], "additionalProperties": False,
                      "properties": {"yaml": {"type": "string"}}}),
        },
        "/api/templates/{name}": {
            "parameters": [{"name": "name", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "get": _operation("One template", _json(
                {"type": "object", "required": ["name", "yaml", "template"],
                 "properties": {"name": {"type": "string"}, "yaml": {"type": "string"},
                                "template": {"type": "object"}}}, "Template"), 400, 404),
            "delete": _operation("Delete a user template (shipped ones can only be overridden)",
                                 _json(MESSAGE, "Deleted"), 400, 404, 409),
        },
        "/api/audit": {"get": _operation("Audit events, oldest first", _json(
            {"type": "object", "required": ["events"],
             "properties": {"events": {"type": "array", "items": _ref("AuditEvent")}}},
            "Events"), 400, params=[
                {"name": "space", "in": "query", "schema": {"type": "string"}},
                {"name": "limit", "in": "query",
                 "description": "Default 200; values above 1000 are read as 1000",
                 "schema": {"type": "integer", "minimum": 1}}])},
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


###############################################################################
# App factory #################################################################
###############################################################################

ROUTES: list[tuple[str, str, Handler, str]] = [
    ("GET", "/api/health", health, PUBLIC),
    ("GET", "/api/openapi.json", get_openapi, PUBLIC),
    ("GET", "/api/system", get_system, NODE_KEY),
    ("GET", "/api/system/capabilities", get_capabilities, NODE_KEY),
    ("GET", "/api/nodes", get_nodes, NODE_KEY),
    ("GET", "/api/spaces", list_spaces, NODE_KEY),
    ("POST", "/api/spaces", create_space, NODE_KEY),
    ("GET", "/api/spaces/{name}", get_space, NODE_KEY),
    ("DELETE", "/api/spaces/{name}", delete_space, NODE_KEY),
    ("POST", "/api/spaces/{name}/stop", stop_space, NODE_KEY),
    ("POST", "/api/spaces/{name}/start", start_space, NODE_KEY),
    ("POST", "/api/spaces/{name}/exec", exec_space, NODE_KEY),
    ("POST", "/api/spaces/{name}/touch", touch_space, NODE_KEY),
    ("GET", "/api/spaces/{name}/stats", space_stats, NODE_KEY),
    ("GET", "/api/spaces/{name}/observability", space_observability, NODE_KEY),
    ("GET", "/api/spaces/{name}/files", list_files, NODE_KEY),
    ("GET", "/api/spaces/{name}/file", read_file, NODE_KEY),
    ("PUT", "/api/spaces/{name}/file", write_file, NODE_KEY),
    ("DELETE", "/api/spaces/{name}/file", delete_file, NODE_KEY),
    ("GET", "/api/spaces/{name}/terminal", terminal, NODE_KEY),
    ("POST", "/api/spaces/{name}/git/push", git_push, NODE_KEY),
    ("GET", "/api/templates", list_templates, NODE_KEY),
    ("PUT", "/api/templates", put_template, NODE_KEY),
    ("GET", "/api/templates/{name}", get_template, NODE_KEY),
    ("DELETE", "/api/templates/{name}", delete_template, NODE_KEY),
    ("GET", "/api/audit", get_audit, NODE_KEY),
    # E2B-compatible control plane (outside /api: the SDK's paths)
    ("POST", "/sandboxes", e2b_create, NODE_KEY),
    ("POST", "/v2/sandboxes", e2b_create, NODE_KEY),
    ("GET", "/sandboxes", e2b_list, NODE_KEY),
    ("GET", "/v2/sandboxes", e2b_list, NODE_KEY),
    ("GET", "/sandboxes/{id}", e2b_get, NODE_KEY),
    ("DELETE", "/sandboxes/{id}", e2b_kill, NODE_KEY),
    ("POST", "/sandboxes/{id}/timeout", e2b_timeout, NODE_KEY),
    ("POST", "/sandboxes/{id}/pause", e2b_pause, NODE_KEY),
    ("POST", "/sandboxes/{id}/connect", e2b_connect, NODE_KEY),
    ("POST", "/v2/sandboxes/{id}/connect", e2b_connect, NODE_KEY),
    # E2B's in-sandbox daemon, selected by the E2b-Sandbox-Id header
    ("GET", "/health", envd_health, PUBLIC),
    ("GET", "/files", envd_download, ENVD_TOKEN),
    ("POST", "/files", envd_upload, ENVD_TOKEN),
    ("POST", "/process.Process/{method}", envd_process, ENVD_TOKEN),
    ("POST", "/filesystem.Filesystem/{method}", envd_filesystem, ENVD_TOKEN),
]


async def service_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Open what the service owns at start, run the housekeeper; undo it all at shutdown."""
    audit = app[AUDIT_KEY]
    audit.open()
    for directory in (app[CONFIG_KEY].data_dir, app[TEMPLATES_KEY].user_dir):
        if remove_temp_files(directory):
            log.info("removed temporary files of interrupted writes in %s", directory)
    await guarded("undoing interrupted creates", app[SPACES_KEY].recover)
    housekeeper = app[HOUSEKEEPER_KEY]
    housekeeper.load()
    if not await app[FIREWALL_KEY].check():
        log.warning("egress firewall inactive: %s", app[FIREWALL_KEY].error)
    nodes = app[NODES_KEY]
    nodes.session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=NODE_PROBE_TIMEOUT),
        trust_env=False)
    app[E2B_KEY].load()
    tasks = [asyncio.create_task(supervised(what, run)) for what, run in (
        ("housekeeper", housekeeper.run), ("node discovery", nodes.run),
        ("e2b timeouts", app[E2B_KEY].run))]
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await nodes.session.close()
    with contextlib.suppress(OSError):
        await housekeeper.save_activity()
    audit.close()
    await app[ENGINE_KEY].close()


async def close_terminals(app: web.Application) -> None:
    await app[TERMINALS_KEY].close_all()


def create_app(config: Config) -> web.Application:
    """The aiohttp application for ``config``; tests build it directly."""
    config.check()
    if config.auth_disabled:
        log.warning("AUTHENTICATION IS DISABLED (CLAWDSPACE_AUTH_DISABLED=true): anyone who "
                    "can reach this port controls every space. Use only on a trusted dev box.")
    engine = Engine()
    nodes = Nodes(config, engine)
    access: dict[web.AbstractRoute, str] = {}  # filled below, with the routes
    app = web.Application(
        middlewares=[error_middleware, make_auth_middleware(config, access),
                     make_forward_middleware(nodes)],
        client_max_size=config.max_body_bytes,
        # Long header lines (up to 128 KiB) get to the middlewares (and a JSON 401/400), not
        # aiohttp's 8 KiB plain-text refusal; bounded in size and count, so what a client
        # sends before auth cannot grow the service (64 x 128 KiB at most per request).
        handler_args={"max_line_size": HEADER_LIMIT, "max_field_size": HEADER_LIMIT,
                      "max_headers": 64},
    )
    audit = AuditLog(config.data_dir, config.audit_max_bytes, config.audit_keep,
                     Redactor([config.api_key or ""]))
    app[CONFIG_KEY] = config
    app[ENGINE_KEY] = engine
    app[AUDIT_KEY] = audit
    firewall = Firewall(config, engine)
    spaces = Spaces(config, engine, audit, firewall)
    files = Files(spaces)
    templates = Templates(config.shipped_templates_dir,
                          config.templates_dir or os.path.join(config.data_dir, "templates"),
                          audit)
    app[FIREWALL_KEY] = firewall
    app[NODES_KEY] = nodes
    app[TEMPLATES_KEY] = templates
    app[E2B_KEY] = E2b(config, spaces, files, templates, nodes)
    app[GIT_KEY] = GitOps(config, spaces, files)
    app[SPACES_KEY] = spaces
    app[FILES_KEY] = files
    app[TERMINALS_KEY] = Terminals(spaces)
    app[OBSERVER_KEY] = Observer(spaces)
    app[HOUSEKEEPER_KEY] = Housekeeper(config, spaces, files)
    for method, path, handler, kind in ROUTES:
        access[app.router.add_route(method, path, handler)] = kind
    app.cleanup_ctx.append(service_lifecycle)
    app.on_shutdown.append(close_terminals)
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
            except docker.errors.APIError as err:
                print(f"ERROR: {network['Name']}: {api_message(err)}", file=sys.stderr)
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
