"""The E2B-compatible surface, driven by the real ``e2b`` SDK (pinned in requirements-dev.txt).

The service runs as a real process on a loopback address with its own prefix; the SDK is
synchronous and is called straight from sync tests, always with explicit ``api_url``,
``sandbox_url`` and ``api_key`` (``opts``), except in the one test of the environment path.
Every case also checks its effect through the Docker engine: labels, files in the container,
processes, containers and volumes that are gone. Raw ``httpx`` covers what the SDK hides:
status codes, bodies and headers, and the envd access token.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import fcntl
import gzip
import io
import json
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import httpx
import pytest
from conftest import (
    ROOT,
    SESSION_KEY,
    TEST_IMAGE,
    Instances,
    Served,
    container_exists,
    derived_image,
    http_json,
    in_container,
    port_free_on,
    serve,
    volume_exists,
)
from e2b import (
    AuthenticationException,
    BuildException,
    CommandExitException,
    FileNotFoundException,
    FileType,
    PtySize,
    Sandbox,
    SandboxException,
    SandboxInfo,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
    Template,
    TimeoutException,
)

T = TypeVar("T")
Opts = dict[str, Any]

WORKSPACE = "/workspace"  # the same volume as the home, where /api sees it
HOME = "/home/user"  # E2B's base template's home: its user is `user`, uid 1000
USER_UID = "1000"
PASSWD_MARK = "root:x:0:0"  # a line of the container's /etc/passwd: must never come back
SANDBOX_ID_RE = re.compile(r"e2b-[0-9a-f]{16}")
OLD_E2B = "2.50.0"  # the last release that creates with POST /sandboxes
OLD_E2B_VENV = ROOT / "tests" / ".cache" / f"e2b-{OLD_E2B}"
OLD_SDK_SCRIPT = ROOT / "tests" / "support" / "e2b_old_sdk.py"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.25) -> T:
    """Call ``check()`` until it returns something truthy (returned) or ``timeout`` passes
    (AssertionError naming ``what`` and the last value)."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s (last: {last!r})")
        time.sleep(interval)


def sh(docker_api: docker.APIClient, container: str, script: str, user: str = "") -> str:
    """A script in the container through the engine (not the service); it must succeed."""
    code, out = in_container(docker_api, container, script, user)
    assert code == 0, (script, code, out)
    return out.decode("utf-8", "replace")


def file_bytes(docker_api: docker.APIClient, container: str, path: str) -> bytes:
    """The exact bytes of a file in the container, read through the engine."""
    return base64.b64decode(sh(docker_api, container, f"base64 -w0 '{path}'", "0"))


def owner_uid(docker_api: docker.APIClient, container: str, path: str) -> str:
    return sh(docker_api, container, f"stat -c %u '{path}'", "0").strip()


def path_exists(docker_api: docker.APIClient, container: str, path: str) -> bool:
    code, _ = in_container(docker_api, container, f"test -e '{path}' || test -L '{path}'", "0")
    return code == 0


def commands(docker_api: docker.APIClient, container: str) -> list[str]:
    """The program name of every process in the container."""
    return sh(docker_api, container, "ps -eo comm=", "0").split()


def running_args(docker_api: docker.APIClient, container: str) -> list[str]:
    """The command line of every process in the container (``ps`` inside it, as root)."""
    return [line.strip() for line in sh(docker_api, container, "ps -eo args", "0").splitlines()]


def docker_state(docker_api: docker.APIClient, container: str) -> dict[str, Any]:
    return docker_api.inspect_container(container)["State"]  # type: ignore[no-any-return]


def envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    """One Connect stream envelope: flags byte, big-endian length, JSON."""
    body = json.dumps(message).encode()
    return struct.pack(">BI", flags, len(body)) + body


def read_envelopes(raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    """(flags, message) of every envelope of a Connect stream answer; asserts the framing."""
    frames: list[tuple[int, dict[str, Any]]] = []
    while raw:
        assert len(raw) >= 5, raw
        flags, size = struct.unpack(">BI", raw[:5])
        assert len(raw) >= 5 + size, raw
        frames.append((flags, json.loads(raw[5:5 + size])))
        raw = raw[5 + size:]
    return frames


def all_listed(opts: Opts, query: SandboxQuery | None = None) -> list[str]:
    """Sandbox ids of every page of ``Sandbox.list``."""
    paginator = Sandbox.list(query=query, **opts)
    ids = [info.sandbox_id for info in paginator.next_items()]
    while paginator.has_next:
        ids += [info.sandbox_id for info in paginator.next_items()]
    return ids


def ours(docker_api: docker.APIClient, prefix: str) -> set[str]:
    """Names of the containers under ``prefix``."""
    return {row["Names"][0].lstrip("/") for row in docker_api.containers(all=True)
            if row["Names"][0].lstrip("/").startswith(prefix)}


def envd_token_of(served: Served, sandbox_id: str) -> str:
    """The sandbox's envdAccessToken, as a connect answers it (the same on every connect)."""
    tokens: set[str] = set()
    for path in (f"/v2/sandboxes/{sandbox_id}/connect", f"/sandboxes/{sandbox_id}/connect"):
        reply = httpx.post(served.url + path, json={"timeout": 1800},
                           headers={"X-API-Key": served.key}, timeout=60)
        assert reply.status_code == 200, (path, reply.status_code, reply.text)
        tokens.add(str(reply.json()["envdAccessToken"]))
    assert len(tokens) == 1, tokens
    return tokens.pop()


def audit_text(served: Served) -> str:
    path = served.data_dir / "audit.jsonl"
    return path.read_text() if path.exists() else ""


# ---------------------------------------------------------------------------------------------
# Fixtures: one service for the module, a tracker of sandboxes, one shared sandbox
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def e2b_served(tmp_path_factory: pytest.TempPathFactory, prefix: str) -> Iterator[Served]:
    """The service as a real process with the session key and a prefix of this module."""
    with serve(tmp_path_factory.mktemp("e2b"), SESSION_KEY, f"{prefix}eb-") as server:
        yield server


@pytest.fixture(scope="module")
def opts(e2b_served: Served) -> Opts:
    return {"api_url": e2b_served.url, "sandbox_url": e2b_served.url,
            "api_key": e2b_served.key, "request_timeout": 30}


class Sandboxes:
    """``create(**kwargs)``: ``Sandbox.create("base", ...)`` through ``opts``; every sandbox it
    made (or was told of with ``adopt``) is killed at teardown."""

    def __init__(self, opts: Opts) -> None:
        self.opts = opts
        self.ids: list[tuple[str, Opts]] = []

    def create(self, template: str = "base", **kwargs: Any) -> Sandbox:
        sbx: Sandbox = Sandbox.create(template, **{"timeout": 300, **kwargs}, **self.opts)
        self.adopt(sbx.sandbox_id)
        return sbx

    def adopt(self, sandbox_id: str, opts: Opts | None = None) -> None:
        self.ids.append((sandbox_id, opts or self.opts))

    def close(self) -> None:
        for sandbox_id, opts in self.ids:
            with contextlib.suppress(Exception):
                Sandbox.kill(sandbox_id, **opts)


@pytest.fixture(scope="module")
def sandboxes(opts: Opts) -> Iterator[Sandboxes]:
    tracker = Sandboxes(opts)
    try:
        yield tracker
    finally:
        tracker.close()


@dataclasses.dataclass
class Shared:
    """The sandbox of the read-mostly cases: created as case 1 asks, its first ``get_info``."""

    sbx: Sandbox
    info: SandboxInfo  # right after create
    container: str


@pytest.fixture(scope="module")
def shared(sandboxes: Sandboxes, e2b_served: Served) -> Shared:
    sbx = sandboxes.create(timeout=120, metadata={"k": "v"}, envs={"FOO": "bar"})
    info = sbx.get_info()
    sbx.set_timeout(1800)  # the module must not meet the 120 s deadline (it would pause)
    return Shared(sbx, info, f"{e2b_served.prefix}{sbx.sandbox_id}")


def container_name(served: Served, sandbox_id: str) -> str:
    return f"{served.prefix}{sandbox_id}"


# ---------------------------------------------------------------------------------------------
# 1. Create: a sandbox is a space, with labels
# ---------------------------------------------------------------------------------------------

def test_create_makes_a_space_with_e2b_labels(shared: Shared, e2b_served: Served,
                                              docker_api: docker.APIClient) -> None:
    sandbox_id = shared.sbx.sandbox_id
    assert SANDBOX_ID_RE.fullmatch(sandbox_id), sandbox_id
    status, body = e2b_served.request("GET", f"/api/spaces/{sandbox_id}")
    assert status == 200, body
    assert body["space"]["name"] == sandbox_id
    assert body["space"]["status"] == "running"
    assert body["space"]["template"] == "default"  # E2B's "base" is our default template

    labels = docker_api.inspect_container(shared.container)["Config"]["Labels"]
    assert labels["clawdspace.e2b-template"] == "base"
    assert json.loads(labels["clawdspace.e2b-metadata"]) == {"k": "v"}
    assert labels["clawdspace.space"] == sandbox_id
    assert labels["clawdspace.instance"] == e2b_served.prefix

    info = shared.info
    assert info.sandbox_id == sandbox_id
    assert info.metadata == {"k": "v"}
    assert info.state == SandboxState.RUNNING
    assert info.template_id == "base"
    assert info.envd_version == "0.5.7"
    lifetime = (info.end_at - info.started_at).total_seconds()
    assert 110 <= lifetime <= 150, (info.started_at, info.end_at)
    assert shared.sbx.is_running()

    assert shared.sbx.commands.run("echo $FOO").stdout == "bar\n"
    assert sh(docker_api, shared.container, "printenv FOO") == "bar\n"


# ---------------------------------------------------------------------------------------------
# 2. Commands: output, exit codes, cwd, envs, timeout
# ---------------------------------------------------------------------------------------------

def test_run_separates_stdout_stderr_and_sees_sandbox_env(shared: Shared,
                                                          docker_api: docker.APIClient) -> None:
    marker = f"ran-{secrets.token_hex(4)}"
    result = shared.sbx.commands.run(
        f"echo hi; echo err >&2; echo $FOO; echo {marker} > /workspace/{marker}")
    assert result.stdout == "hi\nbar\n"
    assert result.stderr == "err\n"
    assert result.exit_code == 0
    assert result.error is None
    # The command ran in the container, as the image's user, in /workspace
    assert file_bytes(docker_api, shared.container, f"{HOME}/{marker}") == \
        f"{marker}\n".encode()
    assert owner_uid(docker_api, shared.container, f"{HOME}/{marker}") == USER_UID


def test_failing_command_raises_with_its_exit_code(shared: Shared) -> None:
    with pytest.raises(CommandExitException) as caught:
        shared.sbx.commands.run("echo before; echo bad >&2; exit 3")
    assert caught.value.exit_code == 3
    assert caught.value.stdout == "before\n"
    assert caught.value.stderr == "bad\n"


def test_cwd_and_per_command_envs(shared: Shared, docker_api: docker.APIClient) -> None:
    assert shared.sbx.commands.run("pwd").stdout == f"{HOME}\n"
    assert shared.sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    name = f"cwd-{secrets.token_hex(4)}"
    shared.sbx.commands.run(f"touch {name}", cwd="/tmp")
    assert path_exists(docker_api, shared.container, f"/tmp/{name}")

    result = shared.sbx.commands.run("echo $ONE-$FOO", envs={"ONE": "1", "FOO": "over"})
    assert result.stdout == "1-over\n"  # a per-command env wins over the sandbox's
    assert shared.sbx.commands.run("echo ${ONE:-unset}-$FOO").stdout == "unset-bar\n"


def test_command_timeout_raises_and_kills_the_process(shared: Shared,
                                                      docker_api: docker.APIClient) -> None:
    marker = "sleep 301"
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        shared.sbx.commands.run(marker, timeout=1)
    # The 1 s timeout ended it, not the SDK's default one (60 s): a margin no load eats up.
    assert time.monotonic() - started < 30
    wait_for(lambda: marker not in running_args(docker_api, shared.container), 30,
             f"{marker!r} gone from the container after its timeout")
    assert all(marker not in p.args for p in shared.sbx.commands.list())


# ---------------------------------------------------------------------------------------------
# 3. Background commands: listed, killed once
# ---------------------------------------------------------------------------------------------

def test_background_command_listed_and_killed(shared: Shared,
                                              docker_api: docker.APIClient) -> None:
    marker = "sleep 302"
    handle = shared.sbx.commands.run(marker, background=True)
    assert isinstance(handle.pid, int)
    listed = {p.pid: p for p in shared.sbx.commands.list()}
    assert handle.pid in listed, listed
    assert listed[handle.pid].args == ["-l", "-c", marker]
    assert shared.sbx.commands.kill(handle.pid) is True
    assert shared.sbx.commands.kill(handle.pid) is False  # not_found
    assert handle.pid not in {p.pid for p in shared.sbx.commands.list()}
    wait_for(lambda: marker not in running_args(docker_api, shared.container), 30,
             f"{marker!r} gone from the container after commands.kill returned True")


def test_background_command_killed_once_running(shared: Shared,
                                                docker_api: docker.APIClient) -> None:
    """The same as above, but the kill waits until the process is seen in the container."""
    marker = "sleep 303"
    handle = shared.sbx.commands.run(marker, background=True)
    wait_for(lambda: marker in running_args(docker_api, shared.container), 10,
             f"{marker!r} running in the container")
    assert shared.sbx.commands.kill(handle.pid) is True
    wait_for(lambda: marker not in running_args(docker_api, shared.container), 30,
             f"{marker!r} gone from the container after commands.kill")
    assert shared.sbx.commands.kill(handle.pid) is False


def test_send_stdin_then_close_it(shared: Shared) -> None:
    handle = shared.sbx.commands.run("read a; echo got-$a; cat; echo done", background=True,
                                     stdin=True, timeout=120)
    shared.sbx.commands.send_stdin(handle.pid, "one\n")
    shared.sbx.commands.send_stdin(handle.pid, b"two\n")
    shared.sbx.commands.close_stdin(handle.pid)
    result = handle.wait()
    assert result.exit_code == 0
    assert result.stdout == "got-one\ntwo\ndone\n"


def test_connect_from_a_second_client_gets_the_rest_and_the_exit_code(
        shared: Shared, opts: Opts, docker_api: docker.APIClient) -> None:
    gate = f"/workspace/gate-{os.urandom(4).hex()}"
    handle = shared.sbx.commands.run(
        f"echo early; while [ ! -e {gate} ]; do sleep 0.05; done; echo late; exit 4",
        background=True, timeout=120)
    other = Sandbox.connect(shared.sbx.sandbox_id, **opts)
    attached = other.commands.connect(handle.pid, timeout=120)
    sh(docker_api, shared.container, f"touch {gate}")
    with pytest.raises(CommandExitException) as ended:
        attached.wait()
    assert ended.value.exit_code == 4
    assert "late" in ended.value.stdout


def test_pty_create_send_input_resize_and_kill(shared: Shared) -> None:
    output = bytearray()
    terminal = shared.sbx.pty.create(PtySize(rows=30, cols=100), timeout=120)
    shared.sbx.pty.send_stdin(terminal.pid, b"tty\n")
    shared.sbx.pty.resize(terminal.pid, PtySize(rows=50, cols=120))  # done before it returns
    shared.sbx.pty.send_stdin(terminal.pid, b"stty size; exit 0\n")
    result = terminal.wait(on_pty=lambda data: output.extend(data))
    text = output.decode(errors="replace").replace("\r", "")
    assert "50 120\n" in text and "/dev/pts/" in text, text
    assert result.exit_code == 0


def test_stream_input_types_a_client_stream_into_the_process(shared: Shared,
                                                             e2b_served: Served) -> None:
    handle = shared.sbx.commands.run("read a; read b; echo got-$a-$b", background=True,
                                     stdin=True, timeout=120)
    token = envd_token_of(e2b_served, shared.sbx.sandbox_id)
    headers = {"E2b-Sandbox-Id": shared.sbx.sandbox_id, "X-Access-Token": token,
               "Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"}

    def client_stream() -> Iterator[bytes]:  # sent chunked, one envelope at a time
        yield envelope({"start": {"process": {"pid": handle.pid}}})
        yield envelope({"keepalive": {}})
        for word in ("one\n", "two\n"):
            yield envelope({"data": {"input": {
                "stdin": base64.b64encode(word.encode()).decode()}}})
        yield envelope({}, flags=0x02)

    reply = httpx.post(e2b_served.url + "/process.Process/StreamInput",
                       content=client_stream(), headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    frames = read_envelopes(reply.content)
    assert frames[-1][0] == 0x02 and frames[-1][1] == {}, frames
    assert handle.wait().stdout == "got-one-two\n"
    refused = httpx.post(e2b_served.url + "/process.Process/StreamInput", content=envelope(
        {"data": {"input": {"stdin": "eA=="}}}), headers=headers, timeout=60)
    assert refused.status_code == 400, refused.text


def test_bad_process_rpcs_are_4xx(shared: Shared, e2b_served: Served) -> None:
    token = envd_token_of(e2b_served, shared.sbx.sandbox_id)
    headers = {"E2b-Sandbox-Id": shared.sbx.sandbox_id, "X-Access-Token": token,
               "Content-Type": "application/json", "Connect-Protocol-Version": "1"}
    handle = shared.sbx.commands.run("sleep 120", background=True, timeout=120)
    bodies: list[dict[str, Any]] = [{"process": {"pid": handle.pid}, "signal": []},
                                    {"process": {"pid": []}}, {"process": {"tag": {}}},
                                    {"process": []}]
    for body in bodies:
        reply = httpx.post(e2b_served.url + "/process.Process/SendSignal", json=body,
                           headers=headers, timeout=60)
        assert 400 <= reply.status_code < 500, (body, reply.status_code, reply.text)
    assert shared.sbx.commands.kill(handle.pid) is True


def test_killing_a_sandbox_cuts_its_command_streams(sandboxes: Sandboxes) -> None:
    sbx = sandboxes.create()
    handle = sbx.commands.run("echo started; sleep 300", background=True, timeout=0)
    seen: list[str] = []
    waited: list[BaseException | object] = []

    def wait() -> None:
        try:
            waited.append(handle.wait(on_stdout=seen.append))
        except BaseException as err:  # noqa: BLE001 - what the SDK raises is the point
            waited.append(err)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    wait_for(lambda: seen, 60, "the first output")
    sbx.kill()
    waiter.join(60)
    assert waited, "the stream never ended"
    # Not an ordinary end: no CommandResult, no CommandExitException with exit code 137.
    assert isinstance(waited[0], Exception) and not isinstance(
        waited[0], CommandExitException), waited


# ---------------------------------------------------------------------------------------------
# 4. Streaming: callbacks before the end
# ---------------------------------------------------------------------------------------------

def test_on_stdout_receives_chunks_before_the_command_ends(shared: Shared,
                                                          docker_api: docker.APIClient) -> None:
    """Order, not time: the command prints its first line, then waits for a file that only
    the on_stdout callback writes (through the engine) once that line has arrived; so the
    command cannot end before the first chunk reached the client."""
    gate = f"{HOME}/.cst-stream-{secrets.token_hex(4)}"
    arrivals: list[tuple[bool, str]] = []  # (the gate was open when the chunk came, chunk)
    errors: list[str] = []
    opened = threading.Event()

    def on_stdout(chunk: str) -> None:
        arrivals.append((opened.is_set(), chunk))
        if "1\n" in chunk and not opened.is_set():
            sh(docker_api, shared.container, f"touch {gate}")
            opened.set()

    result = shared.sbx.commands.run(
        f"echo 1; while [ ! -e {gate} ]; do sleep 0.05; done; rm -f {gate}; "
        "for i in 2 3; do echo $i; done; echo oops >&2",
        on_stdout=on_stdout, on_stderr=errors.append)
    assert result.stdout == "1\n2\n3\n"
    assert "".join(chunk for _, chunk in arrivals) == "1\n2\n3\n"
    assert "".join(errors) == "oops\n"
    assert len(arrivals) >= 2, arrivals
    assert opened.is_set() and arrivals[0] == (False, "1\n"), arrivals  # before the end
    assert all(was_open for was_open, _ in arrivals[1:]), arrivals


# ---------------------------------------------------------------------------------------------
# 5. Files
# ---------------------------------------------------------------------------------------------

def test_files_write_and_read_text_bytes_and_file_objects(
        shared: Shared, docker_api: docker.APIClient) -> None:
    sbx, box = shared.sbx, shared.container
    tag = secrets.token_hex(4)
    text_path = f"{HOME}/text-{tag}.txt"
    info = sbx.files.write(text_path, "hello ✓\n")  # multipart
    assert info.path == text_path and info.name == f"text-{tag}.txt"
    assert sbx.files.read(text_path) == "hello ✓\n"
    assert file_bytes(docker_api, box, text_path) == "hello ✓\n".encode()
    assert owner_uid(docker_api, box, text_path) == USER_UID

    raw = bytes(range(256)) + b"\xff\xfe\x80 not utf-8"
    bin_path = f"{HOME}/nested-{tag}/bytes.bin"  # parents are made
    sbx.files.write(bin_path, raw)
    assert bytes(sbx.files.read(bin_path, format="bytes")) == raw
    assert file_bytes(docker_api, box, bin_path) == raw
    assert owner_uid(docker_api, box, bin_path) == USER_UID
    assert owner_uid(docker_api, box, f"{HOME}/nested-{tag}") == USER_UID

    obj_path = f"{HOME}/object-{tag}.bin"
    sbx.files.write(obj_path, io.BytesIO(b"\x00\xff" * 1000))  # octet-stream
    assert bytes(sbx.files.read(obj_path, format="bytes")) == b"\x00\xff" * 1000
    assert file_bytes(docker_api, box, obj_path) == b"\x00\xff" * 1000
    assert owner_uid(docker_api, box, obj_path) == USER_UID

    relative = f"relative-{tag}.txt"  # relative to the home
    sbx.files.write(relative, "rel")
    assert file_bytes(docker_api, box, f"{HOME}/{relative}") == b"rel"

    sbx.files.write(text_path, "replaced")  # an overwrite, not an append
    assert file_bytes(docker_api, box, text_path) == b"replaced"


def test_uploads_stream_chunked_and_gzip_bodies(shared: Shared, e2b_served: Served,
                                               docker_api: docker.APIClient) -> None:
    token = envd_token_of(e2b_served, shared.sbx.sandbox_id)
    envd = {"E2b-Sandbox-Id": shared.sbx.sandbox_id, "X-Access-Token": token}
    tag = secrets.token_hex(4)
    payload = os.urandom(3 << 20)

    def pieces() -> Iterator[bytes]:  # no length known: sent chunked
        for start in range(0, len(payload), 65536):
            yield payload[start:start + 65536]

    with open(__file__, "rb") as source:  # a real file object, as the SDK takes it
        shared.sbx.files.write(f"{HOME}/object-{tag}.py", source)
    assert file_bytes(docker_api, shared.container, f"{HOME}/object-{tag}.py") == \
        Path(__file__).read_bytes()
    with httpx.Client(base_url=e2b_served.url, timeout=120, headers=envd) as client:
        raw = client.post("/files", params={"path": f"{HOME}/chunked-{tag}.bin"},
                          content=pieces(),
                          headers={"Content-Type": "application/octet-stream"})
        assert raw.status_code == 200, raw.text
        assert file_bytes(docker_api, shared.container,
                          f"{HOME}/chunked-{tag}.bin") == payload
        multipart = client.post("/files", params={"path": f"{HOME}/multi-{tag}.bin"},
                                files={"file": ("x.bin", io.BytesIO(payload))})
        assert multipart.status_code == 200, multipart.text
        assert file_bytes(docker_api, shared.container,
                          f"{HOME}/multi-{tag}.bin") == payload
        packed = gzip.compress(b"squeezed " * 10000)
        zipped = client.post("/files", params={"path": f"{HOME}/gz-{tag}.txt"},
                             content=packed, headers={"Content-Encoding": "gzip",
                                                      "Content-Type": "application/octet-stream"})
        assert zipped.status_code == 200, zipped.text
        assert file_bytes(docker_api, shared.container,
                          f"{HOME}/gz-{tag}.txt") == b"squeezed " * 10000
    # A chunked body cut off midway installs nothing and leaves no temporary file.
    host, _, port = e2b_served.url.removeprefix("http://").rpartition(":")
    with socket.create_connection((host, int(port))) as cut:
        cut.sendall((f"POST /files?path={HOME}/cut-{tag}.bin HTTP/1.1\r\nHost: x\r\n"
                     f"E2b-Sandbox-Id: {shared.sbx.sandbox_id}\r\nX-Access-Token: {token}\r\n"
                     "Content-Type: application/octet-stream\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n10000\r\n").encode() + b"y" * 4096)
        wait_for(lambda: sh(docker_api, shared.container,
                            f"ls -a {WORKSPACE} | grep -c clawdspace-upload || true").strip()
                 != "0", 30, "the upload under way")
    wait_for(lambda: sh(docker_api, shared.container,
                        f"ls -a {WORKSPACE} | grep -c clawdspace-upload || true").strip() == "0",
             30, "the cut upload's temporary file removed")
    assert not path_exists(docker_api, shared.container, f"{HOME}/cut-{tag}.bin")


def test_files_exists_list_make_dir_rename_remove(shared: Shared,
                                                  docker_api: docker.APIClient) -> None:
    sbx, box = shared.sbx, shared.container
    root = f"{HOME}/tree-{secrets.token_hex(4)}"
    sh(docker_api, box, f"mkdir -p {root}/sub/deeper && printf abc > {root}/a.txt && "
                        f"printf x > {root}/sub/deep.txt")
    assert sbx.files.exists(f"{root}/a.txt") is True
    assert sbx.files.exists(root) is True
    assert sbx.files.exists(f"{root}/missing") is False

    entries = {e.name: e for e in sbx.files.list(root, depth=1)}
    assert set(entries) == {"a.txt", "sub"}, entries
    assert entries["a.txt"].type == FileType.FILE
    assert entries["a.txt"].size == 3
    assert entries["a.txt"].path == f"{root}/a.txt"
    assert entries["sub"].type == FileType.DIR
    assert set(sh(docker_api, box, f"ls -A {root}").split()) == set(entries)

    made = f"{root}/made/inner"
    assert sbx.files.make_dir(made) is True
    assert sbx.files.make_dir(made) is False  # already exists
    sh(docker_api, box, f"test -d {made}")
    assert owner_uid(docker_api, box, made) == USER_UID

    moved = sbx.files.rename(f"{root}/a.txt", f"{root}/made/b.txt")
    assert moved.path == f"{root}/made/b.txt"
    assert not path_exists(docker_api, box, f"{root}/a.txt")
    assert file_bytes(docker_api, box, f"{root}/made/b.txt") == b"abc"

    sbx.files.remove(f"{root}/made/b.txt")
    assert not path_exists(docker_api, box, f"{root}/made/b.txt")
    sh(docker_api, box, f"chmod 640 {root}/sub/deep.txt && ln -s deep.txt {root}/sub/ln")
    info = sbx.files.get_info(f"{root}/sub/deep.txt")
    assert (info.owner, info.group, info.mode, info.permissions) == (
        "user", "user", 0o640, "-rw-r-----"), info
    link = {e.name: e for e in sbx.files.list(f"{root}/sub")}["ln"]
    assert link.type == FileType.SYMLINK and link.symlink_target == "deep.txt", link
    deep = {e.path for e in sbx.files.list(root, depth=3)}
    assert {f"{root}/sub", f"{root}/sub/deeper", f"{root}/sub/deep.txt", f"{root}/sub/ln",
            f"{root}/made/inner"} <= deep, deep
    assert {e.path for e in sbx.files.list(root, depth=2)} == deep  # nothing below level 2
    sbx.files.remove(f"{root}/sub")  # a directory, with what is in it
    assert not path_exists(docker_api, box, f"{root}/sub")
    assert sbx.files.exists(f"{root}/sub") is False
    sbx.files.remove(f"{root}/sub")  # already gone: no error, as envd
    sh(docker_api, box, f"mkdir -p {root}/rel-cwd")
    assert sbx.commands.run("pwd", cwd=root.removeprefix(f"{HOME}/") + "/rel-cwd"
                            ).stdout == f"{root}/rel-cwd\n"


def test_watch_dir_reports_creates_writes_removes_and_stops(
        shared: Shared, e2b_served: Served, docker_api: docker.APIClient) -> None:
    root = f"{HOME}/watched-{secrets.token_hex(4)}"
    sh(docker_api, shared.container, f"mkdir -p {root}/sub")
    flat = shared.sbx.files.watch_dir(root)
    deep = shared.sbx.files.watch_dir(root, recursive=True)
    sh(docker_api, shared.container, f"echo a > {root}/a.txt && echo b > {root}/sub/b.txt")
    seen: dict[str, list[tuple[str, str]]] = {"flat": [], "deep": []}

    def saw(which: str, handle: Any, wanted: tuple[str, str]) -> bool:
        seen[which] += [(e.type.name, e.name) for e in handle.get_new_events()]
        return wanted in seen[which]

    wait_for(lambda: saw("deep", deep, ("CREATE", "sub/b.txt")), 30, "the nested create")
    wait_for(lambda: saw("flat", flat, ("CREATE", "a.txt")), 30, "the create")
    assert not [name for _, name in seen["flat"] if name.startswith("sub/")], seen
    sh(docker_api, shared.container, f"echo more >> {root}/a.txt && rm {root}/sub/b.txt")
    wait_for(lambda: saw("flat", flat, ("WRITE", "a.txt")), 30, "the write")
    wait_for(lambda: saw("deep", deep, ("REMOVE", "sub/b.txt")), 30, "the nested remove")
    # From inotify (the image has inotifywait): a rename is a rename, as envd reports it.
    assert "inotifywait" in commands(docker_api, shared.container)
    sh(docker_api, shared.container, f"mv {root}/a.txt {root}/renamed.txt && "
                                     f"chmod 600 {root}/renamed.txt")
    wait_for(lambda: saw("flat", flat, ("RENAME", "a.txt")), 30, "the rename")
    wait_for(lambda: saw("flat", flat, ("CREATE", "renamed.txt")), 30, "the renamed name")
    wait_for(lambda: saw("flat", flat, ("CHMOD", "renamed.txt")), 30, "the chmod")
    for handle in (flat, deep):
        handle.stop()
        with pytest.raises(SandboxException):
            handle.get_new_events()
    wait_for(lambda: "clawdspace-watch" not in " ".join(
        running_args(docker_api, shared.container)), 30, "the watchers gone from the space")
    assert not re.search(r"watcher w-\S+ failed", e2b_served.log()), e2b_served.log()[-3000:]
    with pytest.raises(SandboxException):
        shared.sbx.files.watch_dir(f"{root}/no-such-dir")


# ---------------------------------------------------------------------------------------------
# Template builds: Template.build on this node, from what it has
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def built(e2b_served: Served, docker_api: docker.APIClient) -> Iterator[list[str]]:
    """Names of templates a test builds; they and their images go at teardown."""
    names: list[str] = []
    yield names
    for name in names:
        status, body = e2b_served.request("GET", f"/api/templates/{name}")
        e2b_served.request("DELETE", f"/api/templates/{name}")
        image = body.get("template", {}).get("resources", {}).get("image") if status == 200 \
            else None
        if image:
            with contextlib.suppress(docker.errors.APIError):
                docker_api.remove_image(image, force=True)


def test_template_build_copies_runs_and_serves_the_template(
        sandboxes: Sandboxes, e2b_served: Served, opts: Opts, built: list[str],
        tmp_path: Path) -> None:
    name = f"cst-built-{secrets.token_hex(3)}"
    built.append(name)
    (tmp_path / "data.txt").write_text("from the context\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("X = 42\n")
    template = (Template(file_context_path=str(tmp_path)).from_base_image()
                .copy("data.txt", "/home/user/")
                .copy("pkg", "/opt/pkg", mode=0o755)
                .set_envs({"BUILT": "yes \"quoted\""})
                .run_cmd("echo built-by-$(id -un) > /home/user/built.txt")
                .run_cmd("id -u > /opt/root-id", user="root")
                .set_workdir("/home/user"))
    logs: list[Any] = []
    Template.build(template, name, cpu_count=1, memory_mb=512, on_build_logs=logs.append,
                   api_url=opts["api_url"], api_key=opts["api_key"])
    assert any("Step" in str(entry.message) for entry in logs), logs
    assert Template.exists(name, api_url=opts["api_url"], api_key=opts["api_key"])
    audited = [json.loads(line) for line in (e2b_served.data_dir / "audit.jsonl").read_text(
    ).splitlines()]
    kinds = {e["type"] for e in audited if (e.get("meta") or {}).get("template") == name}
    assert {"template.upload", "template.build", "template.upsert"} <= kinds, kinds

    status, body = e2b_served.request("GET", f"/api/templates/{name}")
    assert status == 200, body
    resources = body["template"]["resources"]
    assert resources["memory"] == 512 << 20 and resources["cpus"] == 1, resources
    sbx = sandboxes.create(template=name, timeout=120)
    result = sbx.commands.run("cat data.txt built.txt /opt/root-id; echo \"$BUILT\"; "
                              "cat /opt/pkg/mod.py; stat -c %a /opt/pkg/mod.py; whoami")
    assert result.stdout == ("from the context\nbuilt-by-user\n0\nyes \"quoted\"\nX = 42\n"
                             "755\nuser\n"), result.stdout
    sbx.kill()

    # Built again (the upload is already here, so it is skipped): the old image goes.
    Template.build(template, name, api_url=opts["api_url"], api_key=opts["api_key"])
    status, again = e2b_served.request("GET", f"/api/templates/{name}")
    assert again["template"]["resources"]["image"] != resources["image"]


def test_template_build_failures_are_clear(e2b_served: Served, opts: Opts,
                                           built: list[str]) -> None:
    api = {"api_url": opts["api_url"], "api_key": opts["api_key"]}
    name = f"cst-doomed-{secrets.token_hex(3)}"
    built.append(name)
    doomed = Template().from_base_image().run_cmd("echo fine").run_cmd("echo doomed; exit 3")
    with pytest.raises(BuildException) as failed:
        Template.build(doomed, name, **api)
    assert "step 2" in str(failed.value) and "non-zero code: 3" in str(failed.value)
    assert not Template.exists(name, **api)  # nothing half-made
    with pytest.raises(BuildException) as absent:
        Template.build(Template().from_image("cst-no-such-image:1"), name, **api)
    assert "not on this node" in str(absent.value)
    offline = Template().from_base_image().run_cmd("getent hosts localhost >/dev/null; "
                                                   "ls /sys/class/net | tr '\\n' ' '")
    logs: list[Any] = []
    Template.build(offline, name, on_build_logs=logs.append, **api)  # builds have no network
    assert any(str(e.message).strip() == "lo" for e in logs), [e.message for e in logs]

    status, body = e2b_served.request("GET", f"/templates/{name}/files/{'0' * 64}")
    assert status == 201 and body["present"] is False, body
    link = urllib.parse.urlsplit(body["url"])
    forged = dict(urllib.parse.parse_qsl(link.query), signature="0" * 64)
    reply = httpx.put(f"{e2b_served.url}{link.path}?{urllib.parse.urlencode(forged)}",
                      content=b"x", headers={"X-API-Key": e2b_served.key})  # the key is no link
    assert reply.status_code == 401, reply.text
    other = link.path.replace("0" * 64, "1" * 64)  # a link is for its one file
    reply = httpx.put(f"{e2b_served.url}{other}?{link.query}", content=b"x")
    assert reply.status_code == 401, reply.text
    # An upload cut off midway stores nothing, not even a temporary file.
    files_dir = e2b_served.data_dir / "e2b-build-files"

    def stored() -> set[Path]:
        return set(files_dir.iterdir()) if files_dir.is_dir() else set()

    before = stored()
    host, _, port = e2b_served.url.removeprefix("http://").rpartition(":")
    with socket.create_connection((host, int(port))) as cut:
        cut.sendall((f"PUT {link.path}?{link.query} HTTP/1.1\r\nHost: x\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n10000\r\n").encode() + b"y" * 4096)
        wait_for(lambda: stored() != before, 30, "the upload under way")
    wait_for(lambda: stored() == before, 30, "the cut upload's temporary file gone")
    status, body = e2b_served.request("GET", f"/templates/{name}/files/{'0' * 64}")
    assert body["present"] is False, body
    reply = httpx.put(f"{e2b_served.url}{link.path}?{link.query}", content=b"x")
    assert reply.status_code == 201, reply.text
    status, body = e2b_served.request("GET", f"/templates/{name}/files/{'0' * 64}")
    assert body == {"present": True}
    stale = files_dir / f"{'0' * 64}.tar"
    os.utime(stale, (time.time() - 8 * 86400,) * 2)  # unused for 8 days: pruned by a build
    Template.build(Template().from_base_image().run_cmd("true"), name, **api)
    assert not stale.exists()
    status, body = e2b_served.request("POST", "/v3/templates", {"name": "Bad Name!"})
    assert status == 400 and set(body) == {"code", "message"}, body

    with pytest.raises(BuildException) as taken:  # a template not made by a build stays
        Template.build(Template().from_base_image().run_cmd("true"), "offline", **api)
    assert "not made by Template.build" in str(taken.value)
    status, body = e2b_served.request("POST", "/v3/templates", {"name": name})
    assert status == 202, body
    for step in ({"type": "WORKDIR", "args": ["/x\nRUN touch /pwned"]},
                 {"type": "ENV", "args": ["A", "1\nRUN touch /pwned"]},
                 {"type": "RUN", "args": ["true", "root\nRUN touch /pwned"]},
                 {"type": "ADD", "args": ["http://example.com/x", "/x"]}):
        status, reply = e2b_served.request(
            "POST", f"/v2/templates/{name}/builds/{body['buildID']}",
            {"fromImage": "e2bdev/base", "steps": [step]})
        assert status == 400 and reply["code"] == 400, (step, reply)


NO_INOTIFY_DOCKERFILE = (
    f"FROM {TEST_IMAGE}\n"
    "USER root\n"
    "RUN rm -f /usr/bin/inotifywait /usr/bin/inotifywatch\n"
    "USER sandbox\n"
)


def test_watch_dir_polls_where_the_image_has_no_inotifywait(
        sandboxes: Sandboxes, e2b_served: Served, docker_api: docker.APIClient,
        prefix: str) -> None:
    name = f"cst-poll-{secrets.token_hex(3)}"
    with derived_image(docker_api, f"{prefix}noinotify:latest", NO_INOTIFY_DOCKERFILE) as image:
        status, body = e2b_served.request("PUT", "/api/templates", {"yaml": (
            f"name: {name}\nnetwork:\n  mode: none\nresources:\n  image: {image}\n")})
        assert status in (200, 201), body
        try:
            sbx = sandboxes.create(template=name, timeout=120)
            box = container_name(e2b_served, sbx.sandbox_id)
            sh(docker_api, box, f"mkdir -p {HOME}/w")
            handle = sbx.files.watch_dir(f"{HOME}/w")
            seen: list[tuple[str, str]] = []

            def saw(wanted: tuple[str, str]) -> bool:
                seen.extend((e.type.name, e.name) for e in handle.get_new_events())
                return wanted in seen

            sh(docker_api, box, f"echo a > {HOME}/w/a.txt")
            wait_for(lambda: saw(("CREATE", "a.txt")), 30, "the polled create")
            assert "inotifywait" not in commands(docker_api, box)
            sh(docker_api, box, f"mv {HOME}/w/a.txt {HOME}/w/b.txt")
            wait_for(lambda: saw(("REMOVE", "a.txt")), 30, "the polled remove")
            wait_for(lambda: saw(("CREATE", "b.txt")), 30, "the polled create of the new name")
            handle.stop()
            wait_for(lambda: sh(docker_api, box, "ls -A /tmp/.clawdspace-watch 2>/dev/null || "
                                                 "true").strip() == "", 30,
                     "the polling state removed")
            sbx.kill()
        finally:
            e2b_served.request("DELETE", f"/api/templates/{name}")


def test_base_world_user_home_volume_and_no_sudo(shared: Shared, e2b_served: Served,
                                                 docker_api: docker.APIClient) -> None:
    """E2B's base template: the user is `user`, its home /home/user is the persistent volume
    (the same one /api sees at /workspace), and sudo is refused unless a template allows it."""
    sbx, box = shared.sbx, shared.container
    assert sbx.commands.run("whoami; echo $HOME; pwd; id -u").stdout == \
        f"user\n{HOME}\n{HOME}\n{USER_UID}\n"
    tag = secrets.token_hex(4)
    sbx.commands.run(f"echo 'print(6 * 7)' > ~/x-{tag}.py")
    assert sbx.commands.run(f"python3 /home/user/x-{tag}.py").stdout == "42\n"
    assert sbx.files.read(f"x-{tag}.py") == "print(6 * 7)\n"
    status, body = e2b_served.request("GET",
                                      f"/api/spaces/{sbx.sandbox_id}/file?path=/x-{tag}.py")
    assert status == 200 and base64.b64decode(body["contentBase64"]) == b"print(6 * 7)\n"
    mounts = {m["Destination"]: m["Name"]
              for m in docker_api.inspect_container(box)["Mounts"]}
    assert mounts[HOME] == mounts[WORKSPACE], mounts
    assert owner_uid(docker_api, box, HOME) == USER_UID
    assert sbx.files.exists(".bashrc")  # the image's skeleton came with the fresh volume
    with pytest.raises(CommandExitException) as refused:
        sbx.commands.run("sudo -n id -u")
    assert "no new privileges" in refused.value.stderr
    status, body = e2b_served.request("GET", f"/api/spaces/{sbx.sandbox_id}")
    assert status == 200 and body["space"]["user"] == "user", body
    assert body["space"]["sudo"] is False, body


def test_files_reach_what_the_user_may_and_api_stays_in_workspace(
        shared: Shared, e2b_served: Served, docker_api: docker.APIClient) -> None:
    """envd's files go wherever the sandbox's user may (the container is the boundary), as
    that user; /api's files stay under /workspace."""
    sbx, box = shared.sbx, shared.container
    tag = secrets.token_hex(4)
    with pytest.raises(FileNotFoundException):
        sbx.files.read(f"{HOME}/no-such-{tag}")
    assert PASSWD_MARK in sbx.files.read("/etc/passwd")
    assert PASSWD_MARK in sbx.files.read("../../etc/passwd")  # relative to the home
    assert sbx.files.get_info("/etc/passwd").owner == "root"
    assert "passwd" in {e.name for e in sbx.files.list("/etc")}
    sbx.files.write(f"/tmp/outside-{tag}", "anywhere the user may")
    assert owner_uid(docker_api, box, f"/tmp/outside-{tag}") == USER_UID
    assert sbx.commands.run(f"cat /tmp/outside-{tag}").stdout == "anywhere the user may"

    shadow_link = f"{HOME}/shadow-{tag}"
    sh(docker_api, box, f"ln -s /etc/shadow {shadow_link}")  # planted by the sandbox user
    for path in ("/etc/shadow", shadow_link):
        with pytest.raises(SandboxException) as caught:
            content = sbx.files.read(path)
            raise AssertionError(f"{path} was read: {content[:80]!r}")
        assert "root:" not in str(caught.value), (path, caught.value)
    with pytest.raises(SandboxException):
        sbx.files.write(f"/etc/planted-{tag}", "nope")  # root's directory
    assert not path_exists(docker_api, box, f"/etc/planted-{tag}")
    with pytest.raises(SandboxException):
        sbx.files.remove("/etc/hostname")
    assert path_exists(docker_api, box, "/etc/hostname")
    for volume_root in (HOME, WORKSPACE):  # the volume's mount points stay, and its files
        with pytest.raises(SandboxException):
            sbx.files.remove(volume_root)
    assert path_exists(docker_api, box, f"{HOME}/.bashrc")
    with pytest.raises(SandboxException):
        sbx.files.make_dir(f"/root/made-{tag}")
    assert not path_exists(docker_api, box, f"/root/made-{tag}")

    passwd_link = f"{WORKSPACE}/passwd-{tag}"
    sh(docker_api, box, f"ln -s /etc/passwd {passwd_link}")
    for path in (f"/passwd-{tag}", "/../etc/passwd"):
        status, body = e2b_served.request(
            "GET", f"/api/spaces/{sbx.sandbox_id}/file?path={path}")
        assert status == 403 and PASSWD_MARK not in json.dumps(body), (path, status, body)


def test_sudo_works_where_a_template_allows_it(sandboxes: Sandboxes, e2b_served: Served,
                                               docker_api: docker.APIClient) -> None:
    name = f"cst-sudo-{secrets.token_hex(3)}"
    status, body = e2b_served.request("PUT", "/api/templates", {"yaml": (
        f"name: {name}\nnetwork:\n  mode: none\nsecurity:\n  sudo: true\n")})
    assert status in (200, 201), body
    try:
        sbx = sandboxes.create(template=name, timeout=120)
        assert sbx.commands.run("sudo -n id -u").stdout == "0\n"
        assert sbx.commands.run("whoami").stdout == "user\n"
        host = docker_api.inspect_container(container_name(e2b_served, sbx.sandbox_id))
        assert "no-new-privileges:true" not in (host["HostConfig"]["SecurityOpt"] or [])
        status, body = e2b_served.request("GET", f"/api/spaces/{sbx.sandbox_id}")
        assert status == 200 and body["space"]["sudo"] is True, body
        sbx.kill()
    finally:
        e2b_served.request("DELETE", f"/api/templates/{name}")


# ---------------------------------------------------------------------------------------------
# 6. Lifecycle: list, set_timeout, pause, connect, wake on envd, timeout pauses
# ---------------------------------------------------------------------------------------------

def test_list_set_timeout_pause_connect(sandboxes: Sandboxes, opts: Opts, e2b_served: Served,
                                        docker_api: docker.APIClient) -> None:
    case = f"lifecycle-{secrets.token_hex(4)}"
    sbx = sandboxes.create(timeout=120, metadata={"k": "v", "case": case})
    box = container_name(e2b_served, sbx.sandbox_id)
    sbx.files.write(f"{HOME}/kept.txt", "kept")

    assert sbx.sandbox_id in all_listed(opts)
    assert all_listed(opts, SandboxQuery(metadata={"case": case})) == [sbx.sandbox_id]
    assert sbx.sandbox_id in all_listed(opts, SandboxQuery(metadata={"k": "v"}))
    assert sbx.sandbox_id not in all_listed(opts, SandboxQuery(metadata={"case": "other"}))

    before = sbx.get_info().end_at
    sbx.set_timeout(600)
    after = sbx.get_info().end_at
    left = (after - dt.datetime.now(dt.timezone.utc)).total_seconds()
    assert after > before and 570 <= left <= 610, (before, after)

    assert sbx.pause() is True
    assert sbx.get_info().state == SandboxState.PAUSED
    assert docker_state(docker_api, box)["Paused"] is True
    assert sbx.pause() is False  # already paused (409)
    assert sbx.sandbox_id in all_listed(opts, SandboxQuery(state=[SandboxState.PAUSED]))
    assert sbx.sandbox_id not in all_listed(opts, SandboxQuery(state=[SandboxState.RUNNING]))

    again = Sandbox.connect(sbx.sandbox_id, **opts)
    state = docker_state(docker_api, box)
    assert state["Running"] is True and state["Paused"] is False
    assert again.get_info().state == SandboxState.RUNNING
    assert again.commands.run("cat kept.txt").stdout == "kept"
    assert again.commands.run("echo back").stdout == "back\n"


def test_pages_of_the_list_filters_and_order(sandboxes: Sandboxes, opts: Opts) -> None:
    case = f"pages-{secrets.token_hex(4)}"
    made = [sandboxes.create(metadata={"case": case}).sandbox_id for _ in range(3)]
    query = SandboxQuery(metadata={"case": case})
    paginator = Sandbox.list(query=query, limit=2, **opts)
    first = [s.sandbox_id for s in paginator.next_items()]
    assert len(first) == 2 and paginator.has_next
    second = [s.sandbox_id for s in paginator.next_items()]
    assert len(second) == 1 and not paginator.has_next
    assert sorted(first + second) == sorted(made)
    with httpx.Client(base_url=opts["api_url"], timeout=60,
                      headers={"X-API-Key": opts["api_key"]}) as client:
        def ids(**params: Any) -> list[str]:
            reply = client.get("/v2/sandboxes", params={"metadata": f"case={case}", **params})
            assert reply.status_code == 200, reply.text
            return [s["sandboxID"] for s in reply.json()]

        ascending = ids(order="asc")
        assert ascending == list(reversed(ids(order="desc"))) and sorted(ascending) == sorted(
            made)
        assert ids(template="base") and not ids(template="no-such-template")
        assert not ids(startedAfter="2999-01-01T00:00:00Z")
        assert sorted(ids(startedBefore="2999-01-01T00:00:00Z")) == sorted(made)
        for bad in ({"order": "sideways"}, {"nextToken": "%%%"}, {"state": "dead"},
                    {"startedAfter": "yesterday"}):
            reply = client.get("/v2/sandboxes", params=bad)
            assert reply.status_code == 400 and reply.json()["code"] == 400, (bad, reply.text)


def test_is_running_connect_extends_and_timeouts_fire_on_time(
        sandboxes: Sandboxes, opts: Opts, e2b_served: Served) -> None:
    sbx = sandboxes.create(timeout=600)
    assert sbx.is_running()
    end = sbx.get_info().end_at
    Sandbox.connect(sbx.sandbox_id, timeout=30, **opts)  # shorter: the end stays
    assert sbx.get_info().end_at == end
    assert sbx.pause() is True
    assert not sbx.is_running()
    Sandbox.connect(sbx.sandbox_id, timeout=30, **opts)
    assert sbx.is_running()
    sbx.set_timeout(0)  # E2B's "now"
    wait_for(lambda: sbx.get_info().state == SandboxState.PAUSED, 30, "paused at once")
    assert not sbx.is_running()
    timed = sandboxes.create(timeout=3)
    timed.commands.run("sleep 300", background=True)  # running commands do not hold it
    deadline = json.loads((e2b_served.data_dir / "e2b-deadlines.json").read_text())[
        timed.sandbox_id]
    wait_for(lambda: timed.get_info().state == SandboxState.PAUSED, 30, "paused at its time")
    paused = [e for e in (json.loads(line) for line in audit_text(e2b_served).splitlines())
              if e["type"] == "space.pause" and e.get("space") == timed.sandbox_id]
    at = dt.datetime.fromisoformat(paused[0]["ts"].replace("Z", "+00:00")).timestamp()
    assert deadline <= at < deadline + 1.0, (deadline, at)  # scheduled, not polled
    killed = sandboxes.create()
    killed.kill()
    assert not killed.is_running()


def test_envd_call_wakes_a_paused_sandbox(sandboxes: Sandboxes, e2b_served: Served,
                                          docker_api: docker.APIClient) -> None:
    sbx = sandboxes.create()
    box = container_name(e2b_served, sbx.sandbox_id)
    sbx.files.write(f"{HOME}/wake.txt", "awake")
    reply = httpx.post(f"{e2b_served.url}/sandboxes/{sbx.sandbox_id}/pause", json={},
                       headers={"X-API-Key": e2b_served.key}, timeout=60)
    assert reply.status_code == 204, reply.text
    assert docker_state(docker_api, box)["Paused"] is True
    assert sbx.files.read(f"{HOME}/wake.txt") == "awake"
    assert docker_state(docker_api, box)["Paused"] is False
    assert sbx.get_info().state == SandboxState.RUNNING


def test_timeout_pauses_and_never_deletes(sandboxes: Sandboxes, opts: Opts, e2b_served: Served,
                                          docker_api: docker.APIClient) -> None:
    sbx = sandboxes.create(timeout=2)
    box = container_name(e2b_served, sbx.sandbox_id)
    sbx.files.write(f"{HOME}/survives.txt", "still here")
    volume = docker_api.inspect_container(box)["Config"]["Labels"]["clawdspace.volume"]
    deadlines = json.loads((e2b_served.data_dir / "e2b-deadlines.json").read_text())
    assert sbx.sandbox_id in deadlines  # the deadline survives a restart

    wait_for(lambda: sbx.get_info().state == SandboxState.PAUSED, 20,
             "the sandbox paused at its timeout", interval=0.5)
    assert docker_state(docker_api, box)["Paused"] is True  # paused, not removed
    assert volume_exists(docker_api, volume)
    assert sbx.sandbox_id in all_listed(opts)

    again = Sandbox.connect(sbx.sandbox_id, timeout=300, **opts)
    assert docker_state(docker_api, box)["Paused"] is False
    assert again.files.read(f"{HOME}/survives.txt") == "still here"
    assert file_bytes(docker_api, box, f"{HOME}/survives.txt") == b"still here"


# ---------------------------------------------------------------------------------------------
# 7. Kill
# ---------------------------------------------------------------------------------------------

def test_kill_twice_leaves_nothing(sandboxes: Sandboxes, opts: Opts, e2b_served: Served,
                                   docker_api: docker.APIClient) -> None:
    sbx = sandboxes.create()
    box = container_name(e2b_served, sbx.sandbox_id)
    volume = docker_api.inspect_container(box)["Config"]["Labels"]["clawdspace.volume"]
    assert volume_exists(docker_api, volume)

    assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id, **opts) is False
    with pytest.raises(SandboxNotFoundException):
        sbx.get_info()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id, **opts)
    assert not container_exists(docker_api, box)
    assert not volume_exists(docker_api, volume)
    status, body = e2b_served.request("GET", f"/api/spaces/{sbx.sandbox_id}")
    assert status == 404, body
    assert sbx.sandbox_id not in all_listed(opts)


# ---------------------------------------------------------------------------------------------
# 8. Auth: the API key on the control plane, the per-sandbox token on envd
# ---------------------------------------------------------------------------------------------

def test_wrong_api_key_is_an_authentication_error(opts: Opts, shared: Shared,
                                                  e2b_served: Served,
                                                  docker_api: docker.APIClient) -> None:
    before = ours(docker_api, e2b_served.prefix)
    wrong = {**opts, "api_key": "wrong-" + secrets.token_hex(8)}
    with pytest.raises(AuthenticationException):
        Sandbox.create("base", timeout=60, **wrong)
    with pytest.raises(AuthenticationException):
        Sandbox.connect(shared.sbx.sandbox_id, **wrong)
    with pytest.raises(AuthenticationException):
        Sandbox.kill(shared.sbx.sandbox_id, **wrong)
    assert ours(docker_api, e2b_served.prefix) == before
    assert container_exists(docker_api, shared.container)


def test_envd_needs_the_sandbox_token(shared: Shared, sandboxes: Sandboxes, e2b_served: Served,
                                      docker_api: docker.APIClient) -> None:
    secret = f"secret-{secrets.token_hex(8)}"
    shared.sbx.files.write(f"{HOME}/secret.txt", secret)
    other = sandboxes.create()
    sandbox_id = shared.sbx.sandbox_id
    token = envd_token_of(e2b_served, sandbox_id)
    other_token = envd_token_of(e2b_served, other.sandbox_id)
    assert token and other_token and token != other_token

    pwned = f"{HOME}/pwned-{secrets.token_hex(4)}"
    start = envelope({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", f"touch {pwned}"]}})
    stream = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"}
    with httpx.Client(base_url=e2b_served.url, timeout=60) as client:
        for label, extra in (("missing", {}), ("wrong", {"X-Access-Token": "0" * 64}),
                             ("another sandbox's", {"X-Access-Token": other_token}),
                             ("the API key as", {"X-Access-Token": e2b_served.key})):
            headers = {"E2b-Sandbox-Id": sandbox_id, **extra}
            replies = [
                client.get("/files", params={"path": f"{HOME}/secret.txt"},
                           headers=headers),
                client.post("/files", params={"path": f"{HOME}/planted.txt"},
                            content=b"x", headers={**headers,
                                                   "Content-Type": "application/octet-stream"}),
                client.post("/process.Process/Start", content=start,
                            headers={**headers, **stream}),
                client.post("/process.Process/List", json={}, headers=headers),
                client.post("/filesystem.Filesystem/ListDir",
                            json={"path": HOME, "depth": 1}, headers=headers),
            ]
            for reply in replies:
                assert reply.status_code == 401, (label, reply.request.url, reply.text)
                assert reply.json()["code"] == "unauthenticated", reply.text
                assert secret not in reply.text and "secret.txt" not in reply.text
        # the API key is no substitute for the token either
        reply = client.get("/files", params={"path": f"{HOME}/secret.txt"},
                           headers={"E2b-Sandbox-Id": sandbox_id,
                                    "X-API-Key": e2b_served.key,
                                    "Authorization": f"Bearer {e2b_served.key}"})
        assert reply.status_code == 401, reply.text

        health = client.get("/health", headers={"E2b-Sandbox-Id": sandbox_id})
        assert health.status_code == 204, health.text
        good = client.get("/files", params={"path": f"{HOME}/secret.txt"},
                          headers={"E2b-Sandbox-Id": sandbox_id, "X-Access-Token": token})
        assert good.status_code == 200 and good.text == secret
    assert not path_exists(docker_api, shared.container, pwned)
    assert not path_exists(docker_api, shared.container, f"{HOME}/planted.txt")


# ---------------------------------------------------------------------------------------------
# 9. Strictness: status codes, bodies and headers the SDKs rely on
# ---------------------------------------------------------------------------------------------

def test_get_metrics_samples_cpu_memory_and_disk(shared: Shared) -> None:
    metrics = shared.sbx.get_metrics()
    assert len(metrics) == 1, metrics
    sample = metrics[0]
    assert sample.cpu_count >= 1 and 0 <= sample.cpu_used_pct
    assert 0 < sample.mem_used <= sample.mem_total
    assert 0 < sample.disk_used <= sample.disk_total
    age = dt.datetime.now(dt.timezone.utc) - sample.timestamp
    assert abs(age.total_seconds()) < 120, sample


def test_every_control_plane_path_answers_in_e2b_shape(e2b_served: Served) -> None:
    with httpx.Client(base_url=e2b_served.url, timeout=60) as client:
        for method, path in (("GET", "/templates"), ("GET", "/templates/x/builds/y/status"),
                             ("GET", "/snapshots"), ("GET", "/v2/sandboxes/x/metrics/extra"),
                             ("GET", "/templates/x/files/not-a-hash")):
            reply = client.request(method, path, headers={"X-API-Key": e2b_served.key},
                                   json={})
            assert reply.status_code in (400, 404, 405), (path, reply.status_code, reply.text)
            body = reply.json()
            assert body["code"] == reply.status_code and body["message"], (path, body)
            anonymous = client.request(method, path, json={})
            assert anonymous.status_code == 401 and anonymous.json()["code"] == 401, path
        for path in ("/templates", "/v2/templates"):  # the build API before 2.x: said plainly
            reply = client.post(path, headers={"X-API-Key": e2b_served.key}, json={})
            assert reply.status_code == 501 and "not served" in reply.json()["message"], path
        reply = client.post("/v3/templates", headers={"X-API-Key": e2b_served.key}, json={})
        assert reply.status_code == 400 and reply.json() == {
            "code": 400, "message": "name is required"}, reply.text


def test_template_builds_that_need_a_registry_are_refused_clearly(
        opts: Opts, e2b_served: Served) -> None:
    api = {"api_url": opts["api_url"], "api_key": opts["api_key"]}
    private = Template().from_image("registry.example/private:1", username="u", password="p")
    with pytest.raises(BuildException) as refused:
        Template.build(private, f"cst-private-{secrets.token_hex(3)}", **api)
    assert "pulls nothing" in str(refused.value), refused.value
    for path in ("/templates", "/v2/templates"):  # the build API before the SDK's 2.x
        status, body = e2b_served.request("POST", path, {"dockerfile": "FROM x"})
        assert status == 501 and "not served" in body["message"], (path, body)


def test_raw_http_status_codes_and_shapes(sandboxes: Sandboxes, e2b_served: Served,
                                          docker_api: docker.APIClient) -> None:
    key = {"X-API-Key": e2b_served.key}
    with httpx.Client(base_url=e2b_served.url, timeout=60) as client:
        created = []
        for path, body in (("/v2/sandboxes", {"templateID": "base", "timeout": 60,
                                              "metadata": {"raw": "1"}, "envVars": {"X": "1"}}),
                           ("/sandboxes", {"templateID": "base", "timeout": 60, "secure": True,
                                           "allow_internet_access": True, "autoPause": False,
                                           "envVars": {}, "metadata": {}})):
            reply = client.post(path, json=body, headers=key)
            assert reply.status_code == 201, (path, reply.text)
            assert reply.headers["content-type"].startswith("application/json")
            sandbox = reply.json()
            assert isinstance(sandbox, dict)
            for field in ("templateID", "sandboxID", "clientID", "envdVersion",
                          "envdAccessToken"):
                assert isinstance(sandbox.get(field), str) and sandbox[field], (field, sandbox)
            assert sandbox["templateID"] == "base"
            assert sandbox["envdVersion"] == "0.5.7"
            assert SANDBOX_ID_RE.fullmatch(sandbox["sandboxID"])
            sandboxes.adopt(sandbox["sandboxID"])
            assert container_exists(docker_api, container_name(e2b_served, sandbox["sandboxID"]))
            created.append(sandbox)
        first, second = created
        box = container_name(e2b_served, first["sandboxID"])
        assert "X=1" in docker_api.inspect_container(box)["Config"]["Env"]

        detail = client.get(f"/sandboxes/{first['sandboxID']}", headers=key)
        assert detail.status_code == 200, detail.text
        for field in ("templateID", "sandboxID", "clientID", "startedAt", "endAt",
                      "envdVersion", "cpuCount", "memoryMB", "diskSizeMB", "state"):
            assert field in detail.json(), (field, detail.json())
        assert detail.json()["metadata"] == {"raw": "1"}
        listing = client.get("/v2/sandboxes", params={"metadata": "raw=1"}, headers=key)
        assert listing.status_code == 200
        assert [s["sandboxID"] for s in listing.json()] == [first["sandboxID"]]

        envd = {"E2b-Sandbox-Id": first["sandboxID"], "X-Access-Token": first["envdAccessToken"]}
        unary = client.post("/process.Process/List", content=b"{}",
                            headers={**envd, "Content-Type": "application/json",
                                     "Connect-Protocol-Version": "1"})
        assert unary.status_code == 200, unary.text
        assert unary.headers["content-type"].startswith("application/json")
        assert isinstance(unary.json(), dict)
        assert unary.json().get("processes", []) == []

        start = client.post("/process.Process/Start", content=envelope(
            {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "printf raw; exit 4"]}}),
            headers={**envd, "Content-Type": "application/connect+json",
                     "Connect-Protocol-Version": "1"})
        assert start.status_code == 200, start.text
        assert start.headers["content-type"].startswith("application/connect+json")
        frames = read_envelopes(start.content)
        assert "start" in frames[0][1]["event"] and frames[0][0] == 0, frames
        assert frames[-1][0] == 0x02, frames  # the end-of-stream envelope
        ends = [m["event"]["end"] for flags, m in frames[:-1] if "end" in m.get("event", {})]
        assert ends and ends[-1]["exitCode"] == 4, frames

        upload = client.post("/files", params={"path": f"{HOME}/raw.bin"},
                             content=b"\x00raw\xff",
                             headers={**envd, "Content-Type": "application/octet-stream"})
        assert upload.status_code == 200, upload.text
        assert upload.json() == [{"name": "raw.bin", "type": "file",
                                  "path": f"{HOME}/raw.bin"}]
        assert file_bytes(docker_api, box, f"{HOME}/raw.bin") == b"\x00raw\xff"

        missing = client.post("/filesystem.Filesystem/Stat",
                              json={"path": f"{HOME}/nothing-here"}, headers=envd)
        assert missing.status_code == 404, missing.text
        assert missing.json()["code"] == "not_found"

        port = client.get("/health", headers={**envd, "E2b-Sandbox-Port": "49999"})
        assert port.status_code == 502, port.text
        rpc = client.post("/process.Process/List", json={},
                          headers={**envd, "E2b-Sandbox-Port": "49999"})
        assert rpc.status_code == 502, rpc.text

        before = ours(docker_api, e2b_served.prefix)
        unknown = client.post("/v2/sandboxes", json={"templateID": "no-such-template"},
                              headers=key)
        assert 400 <= unknown.status_code < 500, unknown.text
        assert unknown.headers.get("Should-Retry") == "false"
        error = unknown.json()
        assert set(error) == {"code", "message"}, error
        assert error["code"] == unknown.status_code
        assert isinstance(error["message"], str) and error["message"]
        assert ours(docker_api, e2b_served.prefix) == before  # nothing was made

        for path in (f"/sandboxes/e2b-{'0' * 16}", "/sandboxes/not-a-sandbox"):
            gone = client.get(path, headers=key)
            assert gone.status_code == 404, gone.text
            assert gone.json()["code"] == 404 and isinstance(gone.json()["message"], str)

        for sandbox in created:
            deleted = client.delete(f"/sandboxes/{sandbox['sandboxID']}", headers=key)
            assert deleted.status_code == 204, deleted.text
            assert deleted.content == b""
            assert not container_exists(docker_api,
                                        container_name(e2b_served, sandbox["sandboxID"]))
        again = client.delete(f"/sandboxes/{second['sandboxID']}", headers=key)
        assert again.status_code == 404 and again.json()["code"] == 404


# ---------------------------------------------------------------------------------------------
# 10. The environment path: E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY
# ---------------------------------------------------------------------------------------------

def test_environment_variables_path(monkeypatch: pytest.MonkeyPatch, e2b_served: Served,
                                    sandboxes: Sandboxes, docker_api: docker.APIClient) -> None:
    for name in ("E2B_DOMAIN", "E2B_DEBUG", "E2B_ACCESS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("E2B_API_URL", e2b_served.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", e2b_served.url)
    monkeypatch.setenv("E2B_API_KEY", e2b_served.key)
    sbx = Sandbox.create("base", timeout=120)
    sandboxes.adopt(sbx.sandbox_id)
    box = container_name(e2b_served, sbx.sandbox_id)
    assert container_exists(docker_api, box)
    assert sbx.commands.run("echo env-path > via-env.txt; cat via-env.txt").stdout == \
        "env-path\n"
    assert file_bytes(docker_api, box, f"{HOME}/via-env.txt") == b"env-path\n"
    assert sbx.kill() is True
    assert not container_exists(docker_api, box)


# ---------------------------------------------------------------------------------------------
# 11. An older SDK: the old create and connect paths
# ---------------------------------------------------------------------------------------------

def old_sdk_works(python: Path) -> bool:
    if not python.exists():
        return False
    check = subprocess.run(
        [str(python), "-c", "import e2b, importlib.metadata as m; "
                            f"assert m.version('e2b') == {OLD_E2B!r}"],
        capture_output=True, timeout=120, check=False)
    return check.returncode == 0


@pytest.fixture(scope="session")
def old_e2b_python() -> Path:
    """The interpreter of a cached venv with e2b 2.50.0 (built once, under tests/.cache)."""
    python = OLD_E2B_VENV / "bin" / "python"
    OLD_E2B_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(OLD_E2B_VENV.parent / f"e2b-{OLD_E2B}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test session may be building it
        if old_sdk_works(python):
            return python
        shutil.rmtree(OLD_E2B_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(OLD_E2B_VENV)], check=True,
                       capture_output=True, timeout=300)
        pip = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                              "--quiet", f"e2b=={OLD_E2B}"],
                             capture_output=True, text=True, timeout=600, check=False)
        if pip.returncode != 0 or not old_sdk_works(python):
            shutil.rmtree(OLD_E2B_VENV, ignore_errors=True)
            pytest.fail(f"could not install e2b=={OLD_E2B} from the package registry "
                        f"(pip exit {pip.returncode}):\n{pip.stdout[-2000:]}\n{pip.stderr[-4000:]}")
        return python


def run_old_sdk(python: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run([str(python), str(OLD_SDK_SCRIPT), *args], capture_output=True,
                          text=True, timeout=180, check=False)
    assert done.returncode == 0, (done.stdout, done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_older_sdk_uses_the_old_create_path(old_e2b_python: Path, e2b_served: Served,
                                            sandboxes: Sandboxes,
                                            docker_api: docker.APIClient) -> None:
    log_before = e2b_served.log()
    created = run_old_sdk(old_e2b_python, "create", e2b_served.url, e2b_served.key)
    sandbox_id = created["id"]
    sandboxes.adopt(sandbox_id)
    assert created["version"] == OLD_E2B
    assert created["stdout"] == "old-42\n" and created["stderr"] == "warn\n"
    assert created["exitCode"] == 0
    assert created["text"] == "from the old sdk"
    assert created["metadata"] == {"sdk": "old"}

    new_lines = e2b_server_lines(e2b_served.log()[len(log_before):])
    assert any(" POST /sandboxes 201 " in line for line in new_lines), new_lines
    assert any(f" POST /sandboxes/{sandbox_id}/connect 200 " in line for line in new_lines)
    assert not any("/v2/sandboxes" in line for line in new_lines), new_lines

    box = container_name(e2b_served, sandbox_id)
    labels = docker_api.inspect_container(box)["Config"]["Labels"]
    assert labels["clawdspace.e2b-template"] == "base"
    assert json.loads(labels["clawdspace.e2b-metadata"]) == {"sdk": "old"}
    assert file_bytes(docker_api, box, f"{HOME}/old.txt") == b"from the old sdk"
    assert owner_uid(docker_api, box, f"{HOME}/old.txt") == USER_UID

    killed = run_old_sdk(old_e2b_python, "kill", e2b_served.url, e2b_served.key, sandbox_id)
    assert (killed["first"], killed["second"]) == (True, False)
    assert not container_exists(docker_api, box)


def e2b_server_lines(log: str) -> list[str]:
    """The access-log lines of the E2B control plane in a piece of the service log."""
    return [line for line in log.splitlines()
            if "aiohttp.access" in line and "sandboxes" in line]


# ---------------------------------------------------------------------------------------------
# 12. Two nodes: one URL serves sandboxes of the other node (forwarding)
# ---------------------------------------------------------------------------------------------

def test_other_nodes_sandbox_through_one_url(instances: Instances, prefix: str,
                                             docker_api: docker.APIClient) -> None:
    hosts = ["127.0.0.2", "127.0.0.3"]
    port = port_free_on(hosts)
    nodes = f"a=http://{hosts[0]}:{port},b=http://{hosts[1]}:{port}"
    node_b = instances.start(hosts[1], port, f"{prefix}nb-", CLAWDSPACE_NODES=nodes,
                             CLAWDSPACE_NODE_NAME="b")
    node_a = instances.start(hosts[0], port, f"{prefix}na-", CLAWDSPACE_NODES=nodes,
                             CLAWDSPACE_NODE_NAME="a")

    def b_online() -> bool:
        status, body = http_json("GET", f"{node_a.url}/api/nodes", key=node_a.key)
        return status == 200 and any(n["name"] == "b" and n["status"] == "online"
                                     for n in body["nodes"])

    wait_for(b_online, 60, "node a sees node b online", interval=0.5)

    def on(node: Served) -> Opts:
        return {"api_url": node.url, "sandbox_url": node.url, "api_key": node.key,
                "request_timeout": 30}

    created = Sandbox.create("base", timeout=300, metadata={"node": "b"}, **on(node_b))
    try:
        assert created.get_info().metadata == {"node": "b"}
        on_b = f"{node_b.prefix}{created.sandbox_id}"
        assert container_exists(docker_api, on_b)
        assert not container_exists(docker_api, f"{node_a.prefix}{created.sandbox_id}")

        sbx = Sandbox.connect(created.sandbox_id, **on(node_a))  # a forwards to b
        assert sbx.get_info().metadata == {"node": "b"}
        result = sbx.commands.run("echo via-a | tee forwarded.txt; echo e >&2")
        assert (result.stdout, result.stderr, result.exit_code) == ("via-a\n", "e\n", 0)
        assert file_bytes(docker_api, on_b, f"{HOME}/forwarded.txt") == b"via-a\n"
        sbx.files.write(f"{HOME}/written-via-a.bin", b"\x00\x01forwarded\xff")
        assert file_bytes(docker_api, on_b, f"{HOME}/written-via-a.bin") == \
            b"\x00\x01forwarded\xff"
        assert sbx.files.read(f"{HOME}/forwarded.txt") == "via-a\n"
        assert {e.name for e in sbx.files.list(HOME)} >= {"forwarded.txt",
                                                              "written-via-a.bin"}
        assert not container_exists(docker_api, f"{node_a.prefix}{created.sandbox_id}")

        assert sbx.kill() is True  # through a, too
        assert not container_exists(docker_api, on_b)
    finally:
        with contextlib.suppress(Exception):
            Sandbox.kill(created.sandbox_id, **on(node_b))


# ---------------------------------------------------------------------------------------------
# 8 (end). The key never rests anywhere (checked last, after everything above ran)
# ---------------------------------------------------------------------------------------------

def test_api_key_never_in_audit_or_container(shared: Shared, e2b_served: Served,
                                             docker_api: docker.APIClient) -> None:
    shared.sbx.commands.run("true")
    audit = audit_text(e2b_served)
    assert shared.sbx.sandbox_id in audit  # the right file, and it saw E2B traffic
    assert '"source": "e2b"' in audit or '"source":"e2b"' in audit
    assert e2b_served.key not in audit
    inspected = json.dumps(docker_api.inspect_container(shared.container))
    assert e2b_served.key not in inspected
    for path in e2b_served.data_dir.rglob("*"):
        if path.is_file():
            assert e2b_served.key.encode() not in path.read_bytes(), path
