"""No 500 from any input or engine state, one writer per file, supervised background loops,
and what interrupted writes leave behind is swept at start."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import secrets
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import yaml
from conftest import (
    SESSION_KEY,
    TEST_IMAGE,
    Api,
    MakeClient,
    Served,
    free_loopback,
    launch,
    poll,
    wait_healthy,
)
from support.fakes import wait_until

import clawdspace


def connect_message(message: Any) -> bytes:
    body = json.dumps(message).encode()
    return b"\x00" + len(body).to_bytes(4, "big") + body


# ---------------------------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    b'{"name": "x", "memory": ' + b"9" * 5000 + b"}",
    b'{"name": "x", "cpus": 1' + b"0" * 5000 + b"}",
], ids=["deep-list", "deep-object", "long-int", "long-float"])
async def test_pathological_json_is_400(client: Api, raw: bytes) -> None:
    reply = await client.post("/api/spaces", data=raw,
                              headers={"Content-Type": "application/json"})
    assert reply.status == 400, reply.body
    assert reply.error_code() in ("invalid_json", "invalid_memory", "invalid_cpus")


@pytest.mark.parametrize("text", [
    "name: deep\nresources: " + "[" * 5000 + "]" * 5000,
    "name: deep\nresources: " + "{a: " * 5000 + "1" + "}" * 5000,
    "name: big\nresources:\n  memory: " + "9" * 5000,
    "name: big\nresources:\n  cpus: 0x" + "f" * 5000,
], ids=["deep-list", "deep-map", "long-int", "long-hex"])
async def test_pathological_yaml_is_400(client: Api, text: str) -> None:
    reply = await client.call("PUT", "/api/templates", json={"yaml": text})
    assert reply.status == 400, reply.body
    assert reply.error_code() == "invalid_template"


async def test_odd_envd_shapes_are_400(client: Api) -> None:
    made = await client.post("/sandboxes", {"templateID": "offline"})
    assert made.status == 201, made.body
    sandbox = made.body
    envd = {"E2b-Sandbox-Id": sandbox["sandboxID"], "X-Access-Token": sandbox["envdAccessToken"]}
    try:
        for message in ({"process": "x"}, {"process": ["cmd"]}, {"process": 7}, [1], "x"):
            reply = await client.post("/process.Process/Start", key=None, data=connect_message(
                message), headers={**envd, "Content-Type": "application/connect+json"})
            assert reply.status == 400, (message, reply.status, reply.body)
            assert reply.body["code"] == "invalid_argument", reply.body
            signal = await client.post("/process.Process/SendSignal", key=None,
                                       json={"process": message}, headers=envd)
            assert signal.status in (400, 404), (message, signal.status, signal.body)
        deep = await client.post("/process.Process/Start", key=None, data=connect_message(
            0).replace(b"0", b"[" * 50_000 + b"]" * 50_000).replace(
                b"\x00\x00\x00\x00\x01", b"\x00" + (100_000).to_bytes(4, "big")),
            headers={**envd, "Content-Type": "application/connect+json"})
        assert deep.status == 400, deep.body
    finally:
        assert (await client.delete(f"/sandboxes/{sandbox['sandboxID']}")).status == 204


@pytest.fixture
def hostile_container(docker_api: docker.APIClient, prefix: str) -> Iterator[str]:
    """A container of ours (by its labels) whose other labels are nonsense, as anyone with
    access to the engine could make."""
    name = f"odd-{secrets.token_hex(3)}"
    image = next(tag for row in docker_api.images() for tag in (row.get("RepoTags") or [])
                 if tag.startswith(("clawdspace-test:", "clawdspace:")))
    labels = {"clawdspace.instance": prefix, "clawdspace.kind": "space", "clawdspace.space": name,
              "clawdspace.memory": "lots", "clawdspace.cpus": "1e999999", "clawdspace.gpus": "x,,",
              "clawdspace.idle-timeout": "9" * 5000, "clawdspace.created-at": "yesterday",
              "clawdspace.e2b-template": "base", "clawdspace.e2b-metadata": "{not json",
              "clawdspace.network": "\x00"}
    container = docker_api.create_container(image, ["sleep", "infinity"], labels=labels,
                                            name=f"{prefix}{name}", network_disabled=True)
    try:
        yield name
    finally:
        docker_api.remove_container(container["Id"], force=True)


async def test_malformed_labels_are_no_500(client: Api, hostile_container: str) -> None:
    listed = await client.get("/api/spaces")
    assert listed.status == 200, listed.body
    mine = [s for s in listed.body["spaces"] if s["name"] == hostile_container]
    assert mine and mine[0]["memory"] == 0 and mine[0]["idleTimeout"] is None
    assert (await client.get(f"/api/spaces/{hostile_container}")).status == 200
    for path in ("/sandboxes", "/v2/sandboxes"):
        reply = await client.get(path)
        assert reply.status == 200, reply.body
    # The housekeeper goes through it too, and lives.
    housekeeper = client.app[clawdspace.HOUSEKEEPER_KEY]
    await housekeeper.sleep_idle()
    await housekeeper.ingest_history()


# ---------------------------------------------------------------------------------------------
# One writer per file
# ---------------------------------------------------------------------------------------------

async def test_concurrent_template_puts_never_tear(client: Api) -> None:
    name = f"race-{secrets.token_hex(3)}"
    texts = [f"name: {name}\ndescription: writer {i}\nresources:\n  memory: {64 + i}m\n"
             for i in range(120)]
    replies = await asyncio.gather(*(client.call("PUT", "/api/templates", json={"yaml": text})
                                     for text in texts))
    assert [r.status for r in replies] == [200] * len(texts), [r.body for r in replies
                                                               if r.status != 200][:3]
    stored = Path(client.config.data_dir, "templates", f"{name}.yaml").read_text()
    assert stored in texts  # one whole version, not a mix
    assert not [p for p in Path(client.config.data_dir, "templates").iterdir()
                if p.name.startswith(".")]


async def test_concurrent_timeout_updates_never_tear(client: Api) -> None:
    made = await client.post("/sandboxes", {"templateID": "offline"})
    assert made.status == 201, made.body
    sandbox_id = made.body["sandboxID"]
    try:
        replies = await asyncio.gather(*(client.post(f"/sandboxes/{sandbox_id}/timeout",
                                                     {"timeout": 100 + i}) for i in range(200)))
        assert {r.status for r in replies} == {204}, [r.body for r in replies][:3]
        saved = json.loads(Path(client.config.data_dir, "e2b-deadlines.json").read_text())
        assert sandbox_id in saved
    finally:
        assert (await client.delete(f"/sandboxes/{sandbox_id}")).status == 204


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, filled up."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        (mount / "templates").mkdir()
        with pytest.raises(OSError), open(mount / "filler", "wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
                filler.flush()
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


async def test_template_put_on_a_full_disk_is_503(make_client: MakeClient,
                                                  tiny_disk: Path) -> None:
    api = await make_client(templates_dir=str(tiny_disk / "templates"))
    text = "name: full\ndescription: fills the disk\n" + "# pad\n" * 9000
    reply = await api.call("PUT", "/api/templates", json={"yaml": text})
    assert reply.status == 503, reply.body
    assert reply.error_code() == "disk_unavailable"
    assert list((tiny_disk / "templates").iterdir()) == []  # no temporary file left


async def test_an_e2b_build_upload_on_a_full_disk_is_507_and_leaves_nothing(
        make_client: MakeClient, tiny_disk: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "e2b-build-files").symlink_to(tiny_disk)  # the audit log is on a disk with room
    api = await make_client(data_dir=str(data))
    before = set(tiny_disk.iterdir())
    link = await api.get(f"/templates/full/files/{'a' * 64}")
    assert link.status == 201 and link.body["present"] is False, link.body
    target = urllib.parse.urlsplit(link.body["url"])
    reply = await api.call("PUT", f"{target.path}?{target.query}", key=None,
                           data=b"x" * (1 << 20))
    assert reply.status == 507, reply.body
    assert set(tiny_disk.iterdir()) == before  # no temporary file left
    again = await api.get(f"/templates/full/files/{'a' * 64}")
    assert again.body["present"] is False


async def test_an_e2b_upload_link_names_the_origin_a_trusted_proxy_was_asked_for(
        make_client: MakeClient) -> None:
    proxied = {"X-Forwarded-Host": "builds.example", "X-Forwarded-Proto": "https"}
    behind = await make_client(trusted_proxies=("127.0.0.0/8", "::1/128"))
    link = await behind.get(f"/templates/t1/files/{'b' * 64}", headers=proxied)
    assert link.status == 201 and link.body["url"].startswith(
        f"https://builds.example/templates/t1/files/{'b' * 64}?"), link.body
    direct = await make_client()  # the same headers from a peer not trusted: ignored
    link = await direct.get(f"/templates/t1/files/{'b' * 64}", headers=proxied)
    assert link.status == 201 and link.body["url"].startswith("http://127.0.0.1:"), link.body


async def test_interrupted_writes_are_swept_at_start(make_client: MakeClient,
                                                     tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "templates").mkdir(parents=True)
    left = [data / f".e2b-deadlines.json{clawdspace.TEMP_INFIX}0a1b2c",
            data / "templates" / f".t.yaml{clawdspace.TEMP_INFIX}ffff"]
    for path in left:
        path.write_text("half")
    keep = data / "templates" / "keep.yaml"
    keep.write_text(yaml.safe_dump({"name": "keep"}))
    api = await make_client(data_dir=str(data))
    assert (await api.get("/api/templates")).status == 200
    assert [p for p in left if p.exists()] == []
    assert keep.exists()


# ---------------------------------------------------------------------------------------------
# Supervised background loops
# ---------------------------------------------------------------------------------------------

async def test_a_failing_housekeeping_job_is_logged_and_the_loop_goes_on(
        make_client: MakeClient, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = await make_client(idle_timeout=2)  # the sleep job runs every 0.5 s
    housekeeper = client.app[clawdspace.HOUSEKEEPER_KEY]
    calls: list[int] = []

    async def broken() -> None:
        calls.append(1)
        raise RuntimeError("injected failure")

    monkeypatch.setattr(housekeeper, "sleep_idle", broken)
    caplog.set_level(logging.ERROR, "clawdspace")
    monkeypatch.setattr("clawdspace.BACKOFF_LIMIT", 0.5)  # the service's own loop, backing off
    await poll(lambda: asyncio.sleep(0, len(calls) >= 3), what="three rounds")
    failures = [r for r in caplog.records if "injected failure" in str(r.exc_info)]
    assert failures and failures[0].exc_info is not None  # logged with its traceback


async def test_a_loop_that_dies_is_restarted(caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[int] = []

    async def dies_once() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise KeyError("boom")
        await asyncio.Event().wait()

    async def no_wait(_: float) -> None:
        return None

    monkeypatch.setattr("clawdspace.asyncio.sleep", no_wait)  # the restart's pause
    caplog.set_level(logging.ERROR, "clawdspace")
    task = asyncio.ensure_future(clawdspace.supervise("test loop", dies_once, every=1))
    try:
        for _ in range(1000):  # loop turns, not time
            if len(runs) >= 2:
                break
            await _yield()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(runs) == 2
    assert any("test loop" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_a_failing_loop_backs_off_and_recovers(caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each failure in a row doubles the wait before the next round, up to BACKOFF_LIMIT;
    one good round brings the loop back to its own interval."""
    outcomes = iter([False, False, False, False, True, False, True])
    waits: list[float] = []

    async def round_() -> None:
        if not next(outcomes, True):
            raise OSError("injected")

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 7:
            raise asyncio.CancelledError

    monkeypatch.setattr("clawdspace.asyncio.sleep", fake_sleep)
    monkeypatch.setattr("clawdspace.BACKOFF_LIMIT", 12.0)
    caplog.set_level(logging.ERROR, "clawdspace")
    with pytest.raises(asyncio.CancelledError):
        await clawdspace.supervise("backing off", round_, every=1.5)
    assert waits == [3.0, 6.0, 12.0, 12.0, 1.5, 3.0, 1.5]
    logged = [r for r in caplog.records if "backing off" in r.getMessage()]
    assert len(logged) == 5 and all(r.exc_info for r in logged)


async def _yield() -> None:
    fut = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(fut.set_result, None)
    await fut


# ---------------------------------------------------------------------------------------------
# An action that cannot be audited is not done
# ---------------------------------------------------------------------------------------------

async def test_nothing_is_done_while_the_audit_log_cannot_be_written(
        client: Api, docker_api: docker.APIClient, prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    made = await client.post("/api/spaces", {"name": f"fc-{secrets.token_hex(3)}",
                                             "network": "none", "memory": "64m"})
    assert made.status == 201, made.body
    name = made.body["space"]["name"]
    container = f"{prefix}{name}"
    try:
        append = clawdspace.JsonlFile.append

        def disk_full(self: clawdspace.JsonlFile, line: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(clawdspace.JsonlFile, "append", disk_full)
        lines_before = len(client.audit_lines())
        other = f"fc-{secrets.token_hex(3)}"
        attempts: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", f"/api/spaces/{name}/exec", {"json": {"command": "touch /workspace/ran"}}),
            ("PUT", f"/api/spaces/{name}/file", {"params": {"path": "/written"},
                                                 "json": {"contentBase64": "aGk="}}),
            ("POST", "/api/spaces", {"json": {"name": other, "network": "none"}}),
            ("POST", f"/api/spaces/{name}/stop", {}),
            ("DELETE", f"/api/spaces/{name}", {}),
            ("PUT", "/api/templates", {"json": {"yaml": "name: fc\n"}}),
            ("POST", "/sandboxes", {"json": {"templateID": "offline"}}),
        ]
        for method, path, kwargs in attempts:
            reply = await client.call(method, path, **kwargs)
            assert reply.status == 503, (method, path, reply.status, reply.body)
        monkeypatch.setattr(clawdspace.JsonlFile, "append", append)
        # Nothing happened: the space runs, unpaused, untouched; no new space or template.
        state = docker_api.inspect_container(container)["State"]
        assert state["Running"] and not state["Paused"]
        for path in ("/workspace/ran", "/workspace/written"):
            exec_id = docker_api.exec_create(container, ["test", "-e", path])["Id"]
            docker_api.exec_start(exec_id)
            assert docker_api.exec_inspect(exec_id)["ExitCode"] == 1, path
        names = {c["Names"][0].lstrip("/") for c in docker_api.containers(all=True)}
        assert f"{prefix}{other}" not in names
        assert not [n for n in names if n.startswith(f"{prefix}e2b-")], names
        assert not Path(client.config.data_dir, "templates", "fc.yaml").exists()
        assert len(client.audit_lines()) == lines_before
        # Once the log can be written again, so can everything else.
        assert (await client.exec(name, "true"))["exitCode"] == 0
    finally:
        assert (await client.delete(f"/api/spaces/{name}",
                                    params={"removeVolume": "true"})).status == 200


# ---------------------------------------------------------------------------------------------
# A stalled client holds nothing
# ---------------------------------------------------------------------------------------------

async def test_a_stalled_upload_times_out_and_the_space_stays_usable(
        make_client: MakeClient, docker_api: docker.APIClient, prefix: str) -> None:
    api = await make_client(body_timeout=2)
    name = f"stall-{secrets.token_hex(3)}"
    made = await api.post("/api/spaces", {"name": name, "network": "none", "memory": "64m"})
    assert made.status == 201, made.body
    try:
        url = api.client.make_url("/")
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write((f"PUT /api/spaces/{name}/file?path=/stalled HTTP/1.1\r\n"
                      f"Host: {url.host}\r\nAuthorization: Bearer {api.key}\r\n"
                      "Content-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\nx"
                      ).encode())
        await writer.drain()
        # While the upload hangs, the space answers.
        assert (await api.get(f"/api/spaces/{name}")).status == 200
        assert (await api.exec(name, "echo fine"))["stdout"] == "fine\n"
        status_line = await asyncio.wait_for(reader.readline(), 60)  # bounded, not timed
        assert b" 408 " in status_line, status_line
        writer.close()
        # Nothing was written, not even a temporary file.
        listed = await api.exec(name, "ls -A /workspace")
        assert "stalled" not in listed["stdout"] and "clawdspace" not in listed["stdout"]
    finally:
        assert (await api.delete(f"/api/spaces/{name}",
                                 params={"removeVolume": "true"})).status == 200


# ---------------------------------------------------------------------------------------------
# Exec reports what happened; headers before auth are bounded
# ---------------------------------------------------------------------------------------------

async def test_exec_reports_a_missing_workdir_and_an_oom_kill(client: Api) -> None:
    name = f"oom-{secrets.token_hex(3)}"
    made = await client.post("/api/spaces", {"name": name, "network": "none", "memory": "64m"})
    assert made.status == 201, made.body
    try:
        missing = await client.post(f"/api/spaces/{name}/exec",
                                    {"command": "true", "workdir": "/workspace/nope"})
        assert missing.status == 400, missing.body
        assert missing.error_code() == "invalid_workdir"
        ok = await client.exec(name, "mkdir -p sub && echo made")
        assert ok["oomKilled"] is False
        assert (await client.exec(name, "pwd", workdir="/workspace/sub"))["stdout"] == \
            "/workspace/sub\n"
        hog = await client.exec(name, ["python3", "-c", "x = bytearray(1 << 30)"])
        assert hog["exitCode"] == 137 and hog["oomKilled"] is True, hog
        observed = await client.get(f"/api/spaces/{name}/observability")
        assert observed.body["observability"]["oomKills"] >= 1, observed.body
        oom = [e for e in client.audit_lines() if e["type"] == "space.exec.oom"]
        assert oom and oom[-1]["space"] == name
        # A kill that is not the OOM killer's is not reported as one.
        killed = await client.exec(name, "kill -KILL $$")
        assert killed["exitCode"] == 137 and killed["oomKilled"] is False, killed
    finally:
        assert (await client.delete(f"/api/spaces/{name}",
                                    params={"removeVolume": "true"})).status == 200


async def test_huge_headers_without_a_key_are_refused_without_growing_the_service(
        client: Api) -> None:
    import resource

    url = client.client.make_url("/")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    statuses = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(b"GET /api/spaces HTTP/1.1\r\nHost: x\r\n")
        try:
            for index in range(200):
                writer.write(f"X-Pad-{index}: ".encode() + b"a" * (1 << 20) + b"\r\n")
                await writer.drain()
        except ConnectionError:
            pass  # refused mid-way: what we want
        with contextlib.suppress(ConnectionError):
            statuses.append(await asyncio.wait_for(reader.readline(), 60))
        writer.close()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 25 << 10, f"the service grew by {grown} KiB"
    assert all(not line or b" 4" in line for line in statuses), statuses
    # A long (100 KB) key is still answered in JSON.
    reply = await client.get("/api/spaces", key=None,
                             headers={"Authorization": "Bearer " + "k" * 100_000})
    assert reply.status == 401 and reply.error_code() == "unauthorized"


# ---------------------------------------------------------------------------------------------
# A restart finishes or undoes what a crash interrupted
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DoomedNode:
    """A real service with one space (network none), to be killed with SIGKILL mid-work."""

    served: Served
    name: str
    container: str

    def kill(self) -> None:
        if self.served.process.poll() is None:
            self.served.process.kill()
        self.served.process.wait()


@contextlib.contextmanager
def doomed_node(tmp_path: Path, docker_api: docker.APIClient, prefix: str,
                stem: str) -> Iterator[DoomedNode]:
    """The service is killed at the end at the latest, and the space removed straight through
    the engine (no service is left to do it)."""
    host, port = free_loopback()
    node = DoomedNode(launch(tmp_path, host, port, prefix, SESSION_KEY, {}),
                      f"{stem}-{secrets.token_hex(3)}", "")
    node.container = f"{prefix}{node.name}"
    try:
        wait_healthy(node.served)
        status, body = node.served.request("POST", "/api/spaces", {
            "name": node.name, "network": "none", "memory": "64m"})
        assert status == 201, body
        yield node
    finally:
        node.kill()
        with contextlib.suppress(docker.errors.NotFound):
            docker_api.remove_container(node.container, force=True)
        with contextlib.suppress(docker.errors.APIError):
            docker_api.remove_volume(f"{prefix}vol-{node.name}")


def test_an_exec_timeout_holds_when_the_service_is_killed(
        tmp_path: Path, docker_api: docker.APIClient, prefix: str) -> None:
    marker = f"sleep 3{secrets.randbelow(1000):03d}"  # a command line to find
    with doomed_node(tmp_path, docker_api, prefix, "tmo") as node:

        def run_long() -> None:
            with contextlib.suppress(OSError):  # the service is killed under it
                node.served.request("POST", f"/api/spaces/{node.name}/exec",
                                    {"command": marker, "timeout": 3})

        threading.Thread(target=run_long, daemon=True).start()

        def running() -> bool:
            exec_id = docker_api.exec_create(node.container, ["pgrep", "-f", marker])["Id"]
            docker_api.exec_start(exec_id)
            return bool(docker_api.exec_inspect(exec_id)["ExitCode"] == 0)

        wait_until(running, 30, "the command to start")
        node.kill()
        # Nobody is left to enforce it but the space itself: it still ends.
        wait_until(lambda: not running(), 60, "the command to end after its timeout")


def test_an_upload_killed_with_the_service_leaves_no_temporary_file(
        tmp_path: Path, docker_api: docker.APIClient, prefix: str) -> None:
    import socket

    with doomed_node(tmp_path, docker_api, prefix, "upl") as node:

        def temp_files() -> bytes:
            exec_id = docker_api.exec_create(
                node.container, ["sh", "-c", "find /workspace -name '.clawdspace-upload-*'"])["Id"]
            return bytes(docker_api.exec_start(exec_id))

        url = node.served.url.removeprefix("http://").rpartition(":")
        with socket.create_connection((url[0], int(url[2]))) as upload:
            upload.sendall((f"PUT /api/spaces/{node.name}/file?path=/big.bin HTTP/1.1\r\n"
                            f"Host: x\r\nAuthorization: Bearer {SESSION_KEY}\r\n"
                            "Content-Type: application/octet-stream\r\n"
                            f"Content-Length: {1 << 20}\r\n\r\n").encode() + b"x" * 4096)
            wait_until(lambda: temp_files().strip() != b"", 30, "the upload to begin")
            node.kill()
            wait_until(lambda: temp_files().strip() == b"", 30, "the temporary file to go")
        exec_id = docker_api.exec_create(node.container,
                                         ["test", "-e", "/workspace/big.bin"])["Id"]
        docker_api.exec_start(exec_id)
        assert docker_api.exec_inspect(exec_id)["ExitCode"] == 1  # no half file in its place


# ---------------------------------------------------------------------------------------------
# Found by attacking the above: odd daemon headers and paths, the root through E2B, stamps
# from the future, E2B working directories in /proc
# ---------------------------------------------------------------------------------------------

async def test_e2b_odd_headers_paths_and_the_workspace_root(client: Api) -> None:
    made = await client.post("/sandboxes", {"templateID": "offline"})
    assert made.status == 201, made.body
    sandbox = made.body
    envd = {"E2b-Sandbox-Id": sandbox["sandboxID"], "X-Access-Token": sandbox["envdAccessToken"]}
    start = connect_message({"process": {"cmd": "true"}})
    try:
        for header, value in (("Connect-Timeout-Ms", "1" + "0" * 400),
                              ("Connect-Timeout-Ms", "\u00b2"),
                              ("Keepalive-Ping-Interval", "\u00b2"),
                              ("Keepalive-Ping-Interval", "0")):
            reply = await client.post("/process.Process/Start", key=None, data=start, headers={
                **envd, "Content-Type": "application/connect+json", header: value})
            assert reply.status == 200, (header, value, reply.status)
        for method in ("Stat", "ListDir", "MakeDir", "Remove"):
            reply = await client.post(f"/filesystem.Filesystem/{method}", key=None,
                                      headers=envd, json={"path": "/workspace/\ud800"})
            assert reply.status == 400, (method, reply.status, reply.body)
        made_dir = await client.post("/filesystem.Filesystem/MakeDir", key=None, headers=envd,
                                     json={"path": "/workspace/keep/me"})
        assert made_dir.status == 200, made_dir.body
        for method, body in (("Remove", {"path": "/workspace"}),
                             ("Move", {"source": "/workspace", "destination": "/workspace/x"})):
            reply = await client.post(f"/filesystem.Filesystem/{method}", key=None,
                                      headers=envd, json=body)
            assert reply.status == 400, (method, reply.status, reply.body)
        still = await client.post("/filesystem.Filesystem/Stat", key=None, headers=envd,
                                  json={"path": "/workspace/keep/me"})
        assert still.status == 200, still.body
        types = [e["type"] for e in client.audit_lines() if e.get("space") == sandbox["sandboxID"]]
        assert "space.file.mkdir" in types  # daemon file operations are audited too
    finally:
        assert (await client.delete(f"/sandboxes/{sandbox['sandboxID']}")).status == 204


def test_an_e2b_working_directory_in_proc_sys_or_dev_is_refused(
        docker_api: docker.APIClient, prefix: str, tmp_path: Path) -> None:
    image = TEST_IMAGE
    container = docker_api.create_container(image, ["sleep", "infinity"],
                                            name=f"{prefix}cwd-{secrets.token_hex(3)}",
                                            network_disabled=True)
    docker_api.start(container["Id"])
    try:
        for cwd, allowed in (("/proc/self", False), ("/sys", False), ("/dev", False),
                             ("/workspace", True), ("/tmp", True), ("/", True)):
            req = clawdspace.confined(clawdspace.ExecRequest(
                argv=["pwd"], env={}, workdir=cwd, timeout=10, root=""))
            exec_id = docker_api.exec_create(container["Id"], req.argv, workdir=req.workdir,
                                             user="1001")["Id"]
            out = docker_api.exec_start(exec_id).decode()
            code = docker_api.exec_inspect(exec_id)["ExitCode"]
            assert (code == 0) == allowed, (cwd, code, out)
            if not allowed:
                assert code == clawdspace.WORKDIR_FAILED and clawdspace.WORKDIR_MARK in out
    finally:
        docker_api.remove_container(container["Id"], force=True)


async def test_history_stamps_from_the_future_are_not_believed(client: Api) -> None:
    name = f"stamp-{secrets.token_hex(3)}"
    made = await client.post("/api/spaces", {"name": name, "network": "none", "memory": "64m"})
    assert made.status == 201, made.body
    try:
        history = "echo one\n#99999999999\necho future\n#999999999999\necho far\necho last\n"
        reply = await client.call(
            "PUT", f"/api/spaces/{name}/file", params={"path": "/.bash_history"},
            data=history.encode(), headers={"Content-Type": "application/octet-stream"})
        assert reply.status == 200, reply.body
        housekeeper = client.app[clawdspace.HOUSEKEEPER_KEY]
        await housekeeper.ingest_history()
        await housekeeper.ingest_history()  # a second tick adds nothing
        shell_log = client.audit_path.with_name("shell.jsonl")
        events = [json.loads(line) for line in shell_log.read_text().splitlines()]
        mine = [e for e in events if e.get("space") == name]
        # (a stamped command runs to the next stamp, as bash writes multi-line commands)
        assert [e["meta"]["command"] for e in mine] == ["echo one", "echo future",
                                                        "echo far\necho last"]
        assert all(e["ts"] < "2100" for e in mine), mine
        assert [e["meta"].get("claimedTime") for e in mine][1:3] == ["99999999999",
                                                                     "999999999999"]
        # The audit view still ends with what was done, not with claims from the future.
        view = await client.get("/api/audit", params={"limit": "3"})
        assert view.body["events"][-1]["ts"] < "2100"
    finally:
        assert (await client.delete(f"/api/spaces/{name}",
                                    params={"removeVolume": "true"})).status == 200
