"""Shared fixtures: a real Docker engine, the app in-process, and the service as a real process.

Every container and volume the suite makes carries a per-session prefix (``cst<hex6>-``); a
session finaliser removes whatever is left under it, whatever a test did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import docker
import docker.errors
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # clawdspace.py is a module at the repository root
    sys.path.insert(0, str(ROOT))

import clawdspace  # noqa: E402

TEST_REPO = "clawdspace-test"


def context_tag(root: Path = ROOT) -> str:
    """``clawdspace-test:<hash>`` of images/ as tests/build-image.sh names it: the first 12 hex
    digits of the sha256 of ``sha256sum`` over every file of images/, in byte order of path."""
    files = sorted((p for p in (root / "images").rglob("*") if p.is_file()),
                   key=lambda p: os.fsencode(p.relative_to(root)))
    listing = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root)}\n"
                      for p in files)
    return f"{TEST_REPO}:{hashlib.sha256(listing.encode()).hexdigest()[:12]}"


def find_test_image() -> str:
    """The sandbox image of this run: ``$CLAWDSPACE_TEST_IMAGE`` (tests/run.sh exports the tag
    it built), else the ``clawdspace-test`` image of the checkout's images/, else the newest
    ``clawdspace-test`` image there is. Never ``clawdspace:latest``: that tag belongs to whatever
    service shares the engine, and the suite leaves it alone."""
    given = os.environ.get("CLAWDSPACE_TEST_IMAGE", "")
    if given:
        return given
    api = docker.APIClient(version="auto")
    try:
        want = context_tag()
        with contextlib.suppress(docker.errors.ImageNotFound):
            api.inspect_image(want)
            return want
        images = sorted(api.images(name=TEST_REPO), key=lambda image: image["Created"])
    finally:
        api.close()
    tags: list[str] = [tag for image in reversed(images) for tag in image.get("RepoTags") or []
                       if tag.startswith(f"{TEST_REPO}:")]
    if not tags:
        raise pytest.UsageError(
            f"no {TEST_REPO}:* image on this engine: run `bash tests/build-image.sh` (or "
            "`bash tests/run.sh`, which builds it), or set CLAWDSPACE_TEST_IMAGE to an image")
    return tags[0]


TEST_IMAGE = find_test_image()
SESSION_PREFIX = f"cst{secrets.token_hex(3)}-"
SESSION_KEY = f"cs-test-key-{secrets.token_hex(16)}"
NO_GPU = "/nonexistent/nvidia-smi"  # an nvidia-smi that is not there: a GPU-less node


def unique_name(stem: str = "s") -> str:
    """A space name no other test uses."""
    return f"{stem}-{secrets.token_hex(3)}"


# ---------------------------------------------------------------------------------------------
# Docker
# ---------------------------------------------------------------------------------------------

def owned_by(prefix: str, name: str, labels: dict[str, str] | None) -> bool:
    instance = (labels or {}).get("clawdspace.instance", "")
    return name.lstrip("/").startswith(prefix) or instance.startswith(prefix)


def docker_names(api: docker.APIClient, prefix: str) -> tuple[set[str], set[str]]:
    """Names of the containers and volumes under ``prefix`` (by name or by instance label)."""
    containers = {
        row["Names"][0].lstrip("/") for row in api.containers(all=True)
        if owned_by(prefix, row["Names"][0], row.get("Labels"))
    }
    volumes = {
        vol["Name"] for vol in (api.volumes().get("Volumes") or [])
        if owned_by(prefix, vol["Name"], vol.get("Labels"))
    }
    return containers, volumes


def remove_everything(api: docker.APIClient, prefix: str) -> None:
    containers, volumes = docker_names(api, prefix)
    for name in containers:
        with contextlib.suppress(docker.errors.NotFound):
            api.remove_container(name, force=True)
    for name in volumes:
        for _ in range(20):
            try:
                api.remove_volume(name)
                break
            except docker.errors.NotFound:
                break
            except docker.errors.APIError:
                time.sleep(0.25)


@pytest.fixture(scope="session")
def docker_api() -> Iterator[docker.APIClient]:
    api = docker.APIClient(version="auto")
    yield api
    api.close()


@pytest.fixture(scope="session")
def prefix() -> str:
    return SESSION_PREFIX


@pytest.fixture(scope="session", autouse=True)
def _cleanup_docker(docker_api: docker.APIClient) -> Iterator[None]:
    yield
    remove_everything(docker_api, SESSION_PREFIX)


def container_of(docker_api: docker.APIClient, prefix: str, name: str) -> dict[str, Any]:
    """``docker inspect`` of the container of space ``name``."""
    return docker_api.inspect_container(f"{prefix}{name}")  # type: ignore[no-any-return]


def container_exists(docker_api: docker.APIClient, name: str) -> bool:
    try:
        docker_api.inspect_container(name)
    except docker.errors.NotFound:
        return False
    return True


def volume_exists(docker_api: docker.APIClient, name: str) -> bool:
    try:
        docker_api.inspect_volume(name)
    except docker.errors.NotFound:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Config and the in-process app
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def api_key() -> str:
    return SESSION_KEY


class MakeConfig(Protocol):
    def __call__(self, **overrides: Any) -> clawdspace.Config: ...


@pytest.fixture
def make_config(tmp_path: Path, prefix: str, api_key: str) -> MakeConfig:
    def make(**overrides: Any) -> clawdspace.Config:
        values: dict[str, Any] = {
            "api_key": api_key, "data_dir": str(tmp_path / "data"), "prefix": prefix,
            "host": "127.0.0.1", "port": 0, "nvidia_smi": NO_GPU,
            "image": TEST_IMAGE,  # gpu_image "" follows it, as CLAWDSPACE_GPU_IMAGE does
        }
        values.update(overrides)
        return clawdspace.Config(**values)

    return make


@dataclasses.dataclass
class Reply:
    status: int
    body: Any
    content_type: str
    headers: dict[str, str]

    def error_code(self) -> str:
        """The ``code`` of a JSON error answer (asserts the error shape)."""
        assert self.content_type == "application/json", (self.status, self.body)
        assert isinstance(self.body, dict) and set(self.body) == {"error", "code"}, self.body
        assert isinstance(self.body["error"], str) and self.body["error"]
        return str(self.body["code"])


class Api:
    """A test client of one app that sends the Bearer key unless told otherwise."""

    def __init__(self, client: TestClient[Any, Any], app: web.Application,
                 config: clawdspace.Config) -> None:
        self.client = client
        self.app = app
        self.config = config
        self.key = config.api_key or ""

    @property
    def audit_path(self) -> Path:
        return Path(self.config.data_dir) / "audit.jsonl"

    def audit_lines(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    async def call(self, method: str, path: str, *, key: str | None = "",
                   headers: dict[str, str] | None = None, **kwargs: Any) -> Reply:
        """One request; ``key=""`` sends the configured key, ``None`` sends none."""
        headers = dict(headers or {})
        if key is not None:
            headers.setdefault("Authorization", f"Bearer {key or self.key}")
        async with self.client.request(method, path, headers=headers, **kwargs) as resp:
            raw = await resp.read()
            body: Any = raw.decode("utf-8", "replace")
            if resp.content_type == "application/json":
                body = json.loads(raw)
            return Reply(resp.status, body, resp.content_type, dict(resp.headers))

    async def get(self, path: str, **kwargs: Any) -> Reply:
        return await self.call("GET", path, **kwargs)

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> Reply:
        if body is not None:
            kwargs["json"] = body
        return await self.call("POST", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> Reply:
        return await self.call("DELETE", path, **kwargs)

    async def exec(self, name: str, command: Any, **fields: Any) -> dict[str, Any]:
        """Run a command that must be accepted; returns the exec result."""
        reply = await self.post(f"/api/spaces/{name}/exec", {"command": command, **fields})
        assert reply.status == 200, reply.body
        return reply.body  # type: ignore[no-any-return]


def auth(api: Api) -> dict[str, str]:
    """The headers that carry ``api``'s key (for calls made with the raw client)."""
    return {"Authorization": f"Bearer {api.key}"}


def router_routes(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route the app serves, HEAD excluded."""
    return {(route.method, route.resource.canonical) for route in app.router.routes()
            if route.method != "HEAD" and route.resource is not None}


MakeClient = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_client(aiohttp_client: Any, make_config: MakeConfig) -> MakeClient:
    """``await make_client(**config_overrides)``: a fresh app on its own test server."""

    async def make(**overrides: Any) -> Api:
        config = make_config(**overrides)
        app = clawdspace.create_app(config)
        return Api(await aiohttp_client(app), app, config)

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> Api:
    return await make_client()


class SpaceMaker:
    """``await space(name=None, api=None, **body)`` creates a space through the API (asserting
    201); every space it made or was told of (``adopt``) is destroyed, volume and all, at
    teardown."""

    def __init__(self, client: Api) -> None:
        self.client = client
        self.names: list[str] = []

    async def __call__(self, name: str | None = None, api: Api | None = None,
                       **body: Any) -> dict[str, Any]:
        name = name or unique_name()
        self.adopt(name)
        reply = await (api or self.client).post("/api/spaces", {"name": name, **body})
        assert reply.status == 201, reply.body
        return reply.body["space"]  # type: ignore[no-any-return]

    def adopt(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)

    async def destroy_all(self) -> None:
        for name in self.names:
            reply = await self.client.delete(f"/api/spaces/{name}",
                                             params={"removeVolume": "true"})
            assert reply.status in (200, 404), reply.body


@pytest.fixture
async def space(client: Api) -> AsyncIterator[SpaceMaker]:
    maker = SpaceMaker(client)
    yield maker
    await maker.destroy_all()


def fake_nvidia_smi(directory: Path, rows: list[str], exit_code: int = 0) -> str:
    """An executable that prints ``rows`` as ``nvidia-smi --query-gpu=... --format=csv`` would.

    clawdspace caches GPU answers per command path, so each directory is one fake node.
    """
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    body = "".join(f"echo '{row}'\n" for row in rows)
    script.write_text(f"#!/bin/sh\n{body}exit {exit_code}\n")
    script.chmod(0o755)
    return str(script)


# ---------------------------------------------------------------------------------------------
# The service as a real process
# ---------------------------------------------------------------------------------------------

def http_json(method: str, url: str, body: Any = None, key: str | None = None,
              timeout: float = 60) -> tuple[int, Any]:
    """A blocking HTTP request; returns (status, parsed JSON or text)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
            status, raw, ctype = resp.status, resp.read(), resp.headers.get_content_type()
    except urllib.error.HTTPError as err:
        with err:
            status, raw, ctype = err.code, err.read(), err.headers.get_content_type()
    return status, json.loads(raw) if ctype == "application/json" else raw.decode()


def free_loopback() -> tuple[str, int]:
    """A random 127.0.0.x address and a port free on it."""
    host = f"127.0.0.{random.randint(2, 250)}"
    with socket.socket() as sock:
        sock.bind((host, 0))
        return host, sock.getsockname()[1]


@dataclasses.dataclass
class Served:
    url: str
    key: str
    prefix: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: Any = None,
                key: str | None = "") -> tuple[int, Any]:
        return http_json(method, self.url + path, body, self.key if key == "" else key)


def service_env(**env: str) -> dict[str, str]:
    """The parent environment minus every CLAWDSPACE_* variable, plus the suite's image as
    CLAWDSPACE_IMAGE (and so CLAWDSPACE_GPU_IMAGE, which follows it), plus ``env``."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("CLAWDSPACE_") and k != "API_KEY"}
    return {**base, "PYTHONUNBUFFERED": "1", "CLAWDSPACE_IMAGE": TEST_IMAGE, **env}


def run_cli(*args: str, env: dict[str, str],
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "clawdspace.py"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def launch(workdir: Path, host: str, port: int, prefix: str, key: str | None,
           env: dict[str, str]) -> Served:
    """Start ``clawdspace.py serve`` on host:port with its data and log under ``workdir``."""
    data_dir, log_path = workdir / "data", workdir / "serve.log"
    variables = {"CLAWDSPACE_HOST": host, "CLAWDSPACE_PORT": str(port),
                 "CLAWDSPACE_DATA_DIR": str(data_dir), "CLAWDSPACE_PREFIX": prefix,
                 "CLAWDSPACE_NVIDIA_SMI": NO_GPU, **env}
    if key is not None:
        variables["CLAWDSPACE_API_KEY"] = key
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, str(ROOT / "clawdspace.py"), "serve"],
                                   env=service_env(**variables), stdout=log_file,
                                   stderr=subprocess.STDOUT, cwd=workdir)
    return Served(f"http://{host}:{port}", key or "", prefix, data_dir, log_path, process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it has not ended 15 s later."""
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def serve(workdir: Path, key: str | None, prefix: str, **env: str) -> Iterator[Served]:
    """``clawdspace.py serve`` as a real process on a free loopback port, until exit."""
    host, port = free_loopback()
    served = launch(workdir, host, port, prefix, key, env)
    try:
        wait_healthy(served, timeout=30)
        yield served
    finally:
        stop_process(served.process)


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The service as a real process, with the session key and prefix."""
    with serve(tmp_path_factory.mktemp("served"), SESSION_KEY, SESSION_PREFIX) as server:
        yield server


@pytest.fixture(scope="module")
def shared_space(served: Served) -> Iterator[str]:
    """One running space for the read-only tests of a module; destroyed after them."""
    name = unique_name("shared")
    status, body = served.request("POST", "/api/spaces", {"name": name, "memory": "256m"})
    assert status == 201, body
    yield name
    status, body = served.request("DELETE", f"/api/spaces/{name}?removeVolume=true")
    assert status == 200, body


# ---------------------------------------------------------------------------------------------
# Inside a space: engine-side checks, an image without python3/bash/find, terminals, polling
# ---------------------------------------------------------------------------------------------

def in_container(docker_api: docker.APIClient, container: str, script: str,
                 user: str = "") -> tuple[int, bytes]:
    """``sh -c script`` in a container straight through the engine, not the service:
    (exit code, stdout and stderr together). ``user="0"`` runs as root."""
    exec_id = docker_api.exec_create(container, ["sh", "-c", script], user=user,
                                     stdout=True, stderr=True)["Id"]
    output = docker_api.exec_start(exec_id)
    code = docker_api.exec_inspect(exec_id).get("ExitCode")
    return int(code if code is not None else -1), bytes(output)


def container_processes(docker_api: docker.APIClient, container: str) -> list[str]:
    """``comm args`` of every process of a container, as the host sees them."""
    top = docker_api.top(container, ps_args="-eo pid,comm,args")
    titles = top["Titles"]
    comm, args = titles.index("COMMAND"), len(titles) - 1
    return [f"{row[comm]} {row[args]}" if comm != args else row[comm]
            for row in top["Processes"] or []]


NOPY_DOCKERFILE = (
    f"FROM {TEST_IMAGE}\n"
    "USER root\n"
    "RUN rm -f /usr/bin/python3* /bin/bash /usr/bin/bash /usr/bin/find\n"
    "USER sandbox\n"
)


@contextlib.contextmanager
def derived_image(docker_api: docker.APIClient, tag: str, dockerfile: str) -> Iterator[str]:
    """An image built from ``dockerfile`` (on the suite's image), removed afterwards."""
    import io

    log: list[str] = []
    for chunk in docker_api.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag,
                                  rm=True, forcerm=True, decode=True):
        if "error" in chunk:
            raise AssertionError(f"building {tag} failed: {chunk['error']}\n{''.join(log)}")
        log.append(str(chunk.get("stream", "")))
    try:
        yield tag
    finally:
        with contextlib.suppress(docker.errors.APIError):
            docker_api.remove_image(tag, force=True)


@pytest.fixture(scope="session")
def nopy_image(docker_api: docker.APIClient, prefix: str) -> Iterator[str]:
    """A local image like the suite's (TEST_IMAGE) but without python3, bash and GNU find."""
    with derived_image(docker_api, f"{prefix}nopy:latest", NOPY_DOCKERFILE) as tag:
        yield tag


async def poll(check: Callable[[], Awaitable[Any]], timeout: float = 30,
               interval: float = 0.2, what: str = "condition") -> Any:
    """Await ``check()`` until it returns something truthy (returned) or ``timeout`` passes
    (AssertionError naming ``what`` and the last value)."""
    import asyncio

    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s (last: {last!r})")
        await asyncio.sleep(interval)


class Terminal:
    """A terminal websocket as a client sees it: binary output collected, text frames kept."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.output = bytearray()
        self.texts: list[Any] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None

    async def type(self, text: str) -> None:
        await self.ws.send_bytes(text.encode())

    async def _receive_one(self, timeout: float) -> bool:
        """One frame into output/texts; False once the socket is closed."""
        import aiohttp

        msg = await self.ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.BINARY:
            self.output += msg.data
        elif msg.type == aiohttp.WSMsgType.TEXT:
            self.texts.append(json.loads(msg.data))
        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                          aiohttp.WSMsgType.CLOSED):
            if msg.type == aiohttp.WSMsgType.CLOSE:
                self.close_code, self.close_reason = msg.data, msg.extra
            else:
                self.close_code = self.ws.close_code
            return False
        elif msg.type == aiohttp.WSMsgType.ERROR:
            raise AssertionError(f"websocket error: {msg.data!r}")
        return True

    async def expect(self, needle: str | bytes, timeout: float = 30) -> bytes:
        """Read until ``needle`` is in the output (from the start); returns all output."""
        wanted = needle.encode() if isinstance(needle, str) else needle
        deadline = time.monotonic() + timeout
        while wanted not in self.output:
            left = deadline - time.monotonic()
            if left <= 0 or not await self._receive_one(left):
                raise AssertionError(f"{wanted!r} never came; output so far: "
                                     f"{bytes(self.output[-2000:])!r}, close {self.close_code}")
        return bytes(self.output)

    async def text(self, timeout: float = 30) -> Any:
        """The next text (JSON) frame the server sent."""
        deadline = time.monotonic() + timeout
        while not self.texts:
            left = deadline - time.monotonic()
            if left <= 0 or not await self._receive_one(left):
                raise AssertionError(f"no text frame came (close {self.close_code})")
        return self.texts.pop(0)

    async def closed(self, timeout: float = 30) -> int | None:
        """Read until the server closes the socket; returns the close code."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("the terminal never closed")
            if not await self._receive_one(left):
                return self.close_code


# ---------------------------------------------------------------------------------------------
# Network: our bridges and firewall chains, a test host in a network namespace
# ---------------------------------------------------------------------------------------------

from support.netns import NetnsHost  # noqa: E402 - helpers of this section


def remove_prefix_networks(docker_api: docker.APIClient, prefix: str) -> list[str]:
    """Remove the bridge networks of every instance whose prefix starts with ``prefix``, and
    the firewall chains and jumps of their bridges (IPv4 and IPv6). Returns the networks."""
    removed = []
    for network in docker_api.networks(filters={"label": ["clawdspace.kind=network"]}):
        instance = (network.get("Labels") or {}).get("clawdspace.instance", "")
        if not instance.startswith(prefix):
            continue
        bridge = clawdspace.Firewall.bridge_name(network["Name"])
        out_chain, in_chain = clawdspace.Firewall.chains(bridge)
        for family, hook in (("iptables", "DOCKER-USER"), ("ip6tables", "FORWARD")):
            for parent, chain in ((hook, out_chain), ("INPUT", in_chain)):
                for _ in range(20):  # every copy of the jump, however many were inserted
                    if subprocess.run([family, "-w", "5", "-D", parent, "-i", bridge, "-j", chain],
                                      capture_output=True, check=False).returncode != 0:
                        break
                subprocess.run([family, "-w", "5", "-F", chain], capture_output=True, check=False)
                subprocess.run([family, "-w", "5", "-X", chain], capture_output=True, check=False)
        for _ in range(20):
            try:
                docker_api.remove_network(network["Id"])
                break
            except docker.errors.NotFound:
                break
            except docker.errors.APIError:
                time.sleep(0.25)  # a container just removed may still hold its endpoint
        removed.append(network["Name"])
    return removed


@pytest.fixture(scope="session", autouse=True)
def _cleanup_networks(docker_api: docker.APIClient) -> Iterator[None]:
    """At the end of the session: the session's containers and volumes (again: this runs
    before ``_cleanup_docker``), then its networks, firewall chains and jumps."""
    yield
    remove_everything(docker_api, SESSION_PREFIX)
    remove_prefix_networks(docker_api, SESSION_PREFIX)


@pytest.fixture(scope="session")
def netns_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsHost]:
    """A test host in a network namespace of this session (tests/support.netns.py): the
    one place besides loopback that network tests may send traffic to."""
    host = NetnsHost.create(tmp_path_factory.mktemp("testhost"))
    try:
        yield host
    finally:
        host.close()


# ---------------------------------------------------------------------------------------------
# Several instances: real processes on chosen loopback addresses (the nodes of a test cluster)
# ---------------------------------------------------------------------------------------------

def port_free_on(hosts: list[str]) -> int:
    """A port that is free right now on every one of ``hosts`` (loopback addresses), so that
    nodes can share one port, as Tailscale discovery assumes."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind((hosts[0], 0))
            port = int(first.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no port is free on all of {hosts}")


def wait_healthy(served: Served, timeout: float = 60) -> None:
    """Until ``/api/health`` of ``served`` answers 200 (AssertionError with the log if the
    process exits or never answers)."""
    deadline = time.monotonic() + timeout
    while True:
        if served.process.poll() is not None:
            raise AssertionError(f"serve exited {served.process.returncode}:\n{served.log()}")
        with contextlib.suppress(OSError):
            status, _ = http_json("GET", served.url + "/api/health", timeout=5)
            if status == 200:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"serve never answered /api/health:\n{served.log()}")
        time.sleep(0.1)


class Instances:
    """``start(host, port, prefix, env, **more)``: ``clawdspace.py serve`` as a real process on
    that address with the variables of ``env`` and ``more`` (the session key unless ``key`` says
    otherwise, no GPU unless ``CLAWDSPACE_NVIDIA_SMI`` is given); ``stop(served)`` ends one;
    every one still running is stopped at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[Served] = []

    def start(self, host: str, port: int, prefix: str, env: dict[str, str] | None = None,
              key: str | None = SESSION_KEY, wait: bool = True, **more: str) -> Served:
        workdir = self.workdir / f"{host}-{port}-{secrets.token_hex(3)}"
        workdir.mkdir(parents=True)
        served = launch(workdir, host, port, prefix, key, {**(env or {}), **more})
        self.running.append(served)
        if wait:
            try:
                wait_healthy(served)
            except BaseException:
                self.stop(served)
                raise
        return served

    def stop(self, served: Served) -> None:
        """Terminate one instance and wait for it (killed after 15 s)."""
        if served in self.running:
            self.running.remove(served)
        stop_process(served.process)

    def close(self) -> None:
        for served in list(self.running):
            self.stop(served)


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instances]:
    """A factory of service processes for one module; all stopped after it."""
    factory = Instances(tmp_path_factory.mktemp("instances"))
    try:
        yield factory
    finally:
        factory.close()


@contextlib.asynccontextmanager
async def served_terminal(served: Served, name: str, headers: dict[str, str] | None = None,
                          **params: Any) -> AsyncIterator[Terminal]:
    """A terminal websocket on a real service process; closed politely on exit."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(
            f"{served.url.replace('http', 'ws', 1)}/api/spaces/{name}/terminal",
            headers={"Authorization": f"Bearer {served.key}", **(headers or {})},
            params={k: str(v) for k, v in params.items()})
        try:
            yield Terminal(ws)
        finally:
            await ws.close()


@dataclasses.dataclass
class Leaks:
    """What a ``leak_watch`` block left to the garbage collector."""

    resource_warnings: list[str] = dataclasses.field(default_factory=list)
    unraisable: list[str] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def leak_watch() -> Iterator[Leaks]:
    """Collect the ResourceWarnings and unraisable exceptions of the block's own garbage
    (earlier tests' garbage is collected first, and not counted)."""
    leaks = Leaks()
    hook = sys.unraisablehook
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        gc.collect()
        warnings.simplefilter("always")
        sys.unraisablehook = lambda u: leaks.unraisable.append(repr(u.exc_value))
        try:
            yield leaks
            gc.collect()
        finally:
            sys.unraisablehook = hook
    leaks.resource_warnings = [str(w.message) for w in caught
                               if issubclass(w.category, ResourceWarning)]
