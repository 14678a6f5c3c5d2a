"""The terminal websocket as a client sees it: handshake auth and Origin, the PTY protocol,
shell exit, many terminals, and a client that never reads."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest
from conftest import (
    SESSION_KEY,
    Api,
    MakeClient,
    Served,
    SpaceMaker,
    Terminal,
    auth,
    container_of,
    container_processes,
    in_container,
    leak_watch,
    poll,
    remove_everything,
    serve,
    served_terminal,
    unique_name,
)

import clawdspace


def ws_base(served: Served) -> str:
    return served.url.replace("http", "ws", 1)


async def handshake_status(api: Api, name: str, headers: dict[str, str],
                           query: str = "") -> tuple[int, Any]:
    """Send a websocket upgrade as a plain request: (status, JSON body or text)."""
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}
    async with api.client.get(f"/api/spaces/{name}/terminal{query}",
                              headers={**upgrade, **headers}) as resp:
        body: Any = await resp.text()
        if resp.content_type == "application/json":
            body = await resp.json()
        return resp.status, body


def events_of(api: Api, name: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in api.audit_lines() if e.get("space") == name and e["type"] == kind]


def served_events(served: Served, name: str, kind: str | None = None) -> list[dict[str, Any]]:
    status, body = served.request("GET", f"/api/audit?space={name}&limit=1000")
    assert status == 200, body
    return [e for e in body["events"] if kind is None or e["type"] == kind]


def shells(docker_api: docker.APIClient, container: str) -> list[str]:
    """Processes other than the container's init and its ``sleep infinity``."""
    return [p for p in container_processes(docker_api, container)
            if not p.startswith(("docker-init ", "sleep sleep infinity", "tini "))]


async def wait_until_gone(docker_api: docker.APIClient, container: str,
                          which: str = "", timeout: float = 60) -> None:
    """Poll until no process of the container (but its init) matches ``which`` (all: "")."""
    left: list[str] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        left = [p for p in shells(docker_api, container) if which in p]
        if not left:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"still running {timeout} s after the client left: {left}")


def new_space(served: Served, **body: Any) -> Iterator[str]:
    name = unique_name("term")
    status, reply = served.request("POST", "/api/spaces", {"name": name, "memory": "64m", **body})
    assert status == 201, reply
    yield name
    status, reply = served.request("DELETE", f"/api/spaces/{name}?removeVolume=true")
    assert status == 200, reply


@pytest.fixture
def own_space(served: Served) -> Iterator[str]:
    """A space of its own (via the real service), for tests that count its processes."""
    yield from new_space(served)


# ---------------------------------------------------------------------------------------------
# Handshake: auth before the upgrade, Origin
# ---------------------------------------------------------------------------------------------

async def test_no_or_wrong_key_is_401_and_never_101(client: Api, shared_space: str) -> None:
    for headers, query in [({}, ""), ({"Authorization": "Bearer wrong"}, ""),
                           ({}, "?key=wrong"), ({"Authorization": "Basic eDp5"}, "")]:
        status, body = await handshake_status(client, shared_space, headers, query)
        assert status == 401, (headers, query, status, body)
        assert body["code"] == "unauthorized"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.client.ws_connect(f"/api/spaces/{shared_space}/terminal")
    assert refused.value.status == 401
    assert events_of(client, shared_space, "terminal.open") == []


async def test_foreign_origin_is_403(client: Api, shared_space: str) -> None:
    for origin in ("https://evil.example", "null", "http://127.0.0.1.evil.example"):
        status, body = await handshake_status(
            client, shared_space, {**auth(client), "Origin": origin})
        assert status == 403, (origin, status, body)
        assert body["code"] == "bad_origin"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.client.ws_connect(f"/api/spaces/{shared_space}/terminal",
                                       headers={**auth(client), "Origin": "https://evil.example"})
    assert refused.value.status == 403
    assert events_of(client, shared_space, "terminal.open") == []


async def test_allowed_and_own_origins_open(tmp_path: Path, prefix: str,
                                            shared_space: str) -> None:
    with serve(tmp_path, SESSION_KEY, prefix,
               CLAWDSPACE_ALLOWED_ORIGINS="https://ok.example, https://two.example/") as node:
        own = node.url  # a page served by the node itself
        for origin in ("https://ok.example", "https://two.example", own):
            async with served_terminal(node, shared_space, {"Origin": origin}) as term:
                await term.type("echo origin-$((20+1))\n")
                await term.expect("origin-21")
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(
                    f"{ws_base(node)}/api/spaces/{shared_space}/terminal",
                    headers={"Authorization": f"Bearer {node.key}",
                             "Origin": "https://other.example"})
            assert refused.value.status == 403
        opened = served_events(node, shared_space, "terminal.open")
        assert len(opened) == 3


async def test_behind_a_trusted_proxy_its_forwarded_host_is_the_origin(
        make_client: MakeClient, client: Api, shared_space: str) -> None:
    """A reverse proxy that rewrites Host: its X-Forwarded-Host counts, from it only."""
    behind = {"Origin": "https://proxy.example", "X-Forwarded-Host": "proxy.example"}
    status, body = await handshake_status(client, shared_space, {**auth(client), **behind})
    assert status == 403 and body["code"] == "bad_origin"  # nobody is trusted by default
    proxied = await make_client(trusted_proxies=("127.0.0.0/8", "::1/128"))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await proxied.client.ws_connect(
            f"/api/spaces/{shared_space}/terminal", headers={
                **auth(proxied), "Origin": "https://other.example",
                "X-Forwarded-Host": "proxy.example"})
    assert refused.value.status == 403
    ws = await proxied.client.ws_connect(f"/api/spaces/{shared_space}/terminal",
                                         headers={**auth(proxied), **behind})
    term = Terminal(ws)
    await term.type("echo proxied-$((40+2))\n")
    await term.expect("proxied-42")
    await ws.close()


# ---------------------------------------------------------------------------------------------
# The protocol (on the real service)
# ---------------------------------------------------------------------------------------------

async def test_bash_as_sandbox_in_workspace_with_xterm(served: Served,
                                                       shared_space: str) -> None:
    before = len(served_events(served, shared_space, "terminal.open"))
    async with served_terminal(served, shared_space) as term:
        await term.type('echo "T=$TERM P=$(pwd) U=$(whoami) S=${BASH_VERSION:+bash} '
                        'L=$(shopt -q login_shell && echo login) $((6*7))"\n')
        out = await term.expect(" 42")
    assert re.search(rb"T=xterm-256color P=/workspace U=sandbox S=bash L=login 42", out), out
    opened = served_events(served, shared_space, "terminal.open")
    assert len(opened) == before + 1
    assert opened[-1]["meta"] == {"shell": "bash"}
    assert opened[-1]["keyId"].startswith("k-")


async def test_input_forms_ping_and_errors(served: Served, shared_space: str) -> None:
    async with served_terminal(served, shared_space) as term:
        await term.ws.send_bytes(b"echo bin-$((2+3))\n")
        await term.expect("bin-5")
        await term.ws.send_json({"type": "input", "data": "echo json-$((3+4))\n"})
        await term.expect("json-7")
        await term.ws.send_str("echo plain-$((4+5))\n")  # not JSON: typed as it is
        await term.expect("plain-9")
        await term.ws.send_json({"type": "ping"})
        assert await term.text() == {"type": "pong"}
        for bad in ({"type": "resize", "cols": "80", "rows": 24},
                    {"type": "resize", "cols": 80}, {"type": "resize", "cols": True, "rows": 5},
                    {"type": "bogus"}):
            await term.ws.send_json(bad)
            answer = await term.text()
            assert answer["type"] == "error" and answer["error"], (bad, answer)
        await term.ws.send_bytes("echo ünï-$((1+1)) 日本\n".encode())
        await term.expect("ünï-2 日本")


async def test_resize(served: Served, shared_space: str) -> None:
    async with served_terminal(served, shared_space, cols=100, rows=30) as term:
        await term.type("stty size; echo size-$((1+0))\n")
        out = await term.expect("size-1")
        assert b"30 100" in out, out
        await term.ws.send_json({"type": "resize", "cols": 123, "rows": 45})
        await term.type("stty size; echo size-$((1+1))\n")
        out = await term.expect("size-2")
        assert b"45 123" in out.split(b"size-1")[-1], out
        await term.ws.send_json({"type": "resize", "cols": 9999, "rows": 0})  # clamped
        await term.type("stty size; echo size-$((1+2))\n")
        out = await term.expect("size-3")
        assert b"1 500" in out.split(b"size-2")[-1], out


async def test_shell_exit_closes_with_1000_and_audits(served: Served, own_space: str) -> None:
    async with served_terminal(served, own_space) as term:
        await term.type("echo ready-$((1+1)); exit 3\n")
        await term.expect("ready-2")
        assert await term.closed() == 1000
        assert term.close_reason

    async def closed() -> list[dict[str, Any]]:
        return served_events(served, own_space, "terminal.close")

    closes = await poll(closed, what="terminal.close audited")
    assert len(closes) == 1
    meta = closes[0]["meta"]
    assert meta["exitCode"] == 3, meta
    assert isinstance(meta["durationMs"], int) and meta["durationMs"] >= 0
    assert closes[0]["keyId"].startswith("k-")
    # The shell's own history may be ingested meanwhile (space.shell, stamped to the second).
    kinds = [e["type"] for e in served_events(served, own_space) if e["type"] != "space.shell"]
    assert kinds == ["space.create", "terminal.open", "terminal.close"], kinds


async def test_in_process_shell_exit_cleans_up(client: Api, space: SpaceMaker) -> None:
    """The same through aiohttp's test server, which cancels a handler whose connection is
    gone (``handler_cancellation=True``, as any runner may): the terminal's cleanup must
    still run (close audited, the engine socket closed)."""
    name = (await space(memory="64m"))["name"]
    closes: list[dict[str, Any]] = []
    with leak_watch() as leaks:
        ws = await client.client.ws_connect(f"/api/spaces/{name}/terminal",
                                            headers=auth(client))
        term = Terminal(ws)
        await term.type("echo bye-$((1+1)); exit 3\n")
        await term.expect("bye-2")
        assert await term.closed() == 1000
        await ws.close()

        async def closed() -> list[dict[str, Any]]:
            return events_of(client, name, "terminal.close")

        closes = await poll(closed, timeout=60, what="terminal.close audited")
    assert len(closes) == 1, "terminal.close was never audited"
    assert closes[0]["meta"]["exitCode"] == 3
    assert leaks.resource_warnings == [] and leaks.unraisable == []


async def test_terminal_on_missing_or_invalid_space(client: Api, shared_space: str) -> None:
    status, body = await handshake_status(client, unique_name("none"), auth(client))
    assert status == 404 and body["code"] == "not_found"
    status, body = await handshake_status(client, "Bad.Name", auth(client))
    assert status == 400 and body["code"] == "invalid_name"
    for query, code in (("?cols=0", "invalid_cols"), ("?rows=abc", "invalid_rows")):
        status, body = await handshake_status(client, shared_space, auth(client), query)
        assert status == 400 and body["code"] == code, (query, body)
    assert events_of(client, shared_space, "terminal.open") == []


async def test_key_in_query_opens_and_is_never_logged(served: Served,
                                                      shared_space: str) -> None:
    """Browsers cannot set headers on websockets: ``?key=`` works, and stays out of logs."""
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{ws_base(served)}/api/spaces/{shared_space}/terminal",
                                      params={"key": served.key})
        term = Terminal(ws)
        await term.type("echo query-$((5+5))\n")
        await term.expect("query-10")
        await ws.close()
    assert served.key not in served.log()
    assert served.key not in (served.data_dir / "audit.jsonl").read_text()


async def test_oversized_frame_closes_1009_and_ends_the_shell(
        served: Served, own_space: str, docker_api: docker.APIClient) -> None:
    async with served_terminal(served, own_space) as term:
        await term.type("echo big-$((1+1))\n")
        await term.expect("big-2")
        await term.ws.send_bytes(b"#" * (2 << 20))  # more than the 1 MiB frame limit
        assert await term.closed() == 1009
    await wait_until_gone(docker_api, f"{served.prefix}{own_space}")


async def test_terminal_resumes_a_paused_space(served: Served, own_space: str,
                                               docker_api: docker.APIClient) -> None:
    status, body = served.request("POST", f"/api/spaces/{own_space}/stop")
    assert status == 200, body
    assert container_of(docker_api, served.prefix, own_space)["State"]["Paused"] is True
    async with served_terminal(served, own_space) as term:
        await term.type("echo awake-$((1+1))\n")
        await term.expect("awake-2")
        assert container_of(docker_api, served.prefix, own_space)["State"]["Paused"] is False
    events = [(e["type"], e.get("meta")) for e in served_events(served, own_space)]
    kinds = [kind for kind, _ in events]
    assert ("space.start", {"reason": "auto"}) in events
    assert kinds.index("space.start") < kinds.index("terminal.open")


async def test_sh_on_an_image_without_bash(served: Served, nopy_image: str) -> None:
    for name in new_space(served, image=nopy_image):
        async with served_terminal(served, name) as term:
            await term.type('echo "U=$(whoami) P=$(pwd) T=$TERM B=${BASH_VERSION:-none}" '
                            "$((6*7))\n")
            out = await term.expect(" 42")
            assert b"U=sandbox P=/workspace T=xterm-256color B=none 42" in out, out
        assert served_events(served, name, "terminal.open")[0]["meta"] == {"shell": "sh"}


async def test_ten_terminals_at_once(served: Served, shared_space: str) -> None:
    async def one(index: int) -> bytes:
        async with served_terminal(served, shared_space) as term:
            await term.type(f"echo many-$(({index}*1000+7))-end\n")
            return await term.expect(f"many-{index * 1000 + 7}-end")

    before = len(served_events(served, shared_space, "terminal.open"))
    outputs = await asyncio.gather(*(one(i) for i in range(10)))
    for index, out in enumerate(outputs):
        others = [i for i in range(10) if i != index]
        assert not any(f"many-{i * 1000 + 7}-end".encode() in out for i in others)
    assert len(served_events(served, shared_space, "terminal.open")) == before + 10


# ---------------------------------------------------------------------------------------------
# Ending: the client leaves, the client never reads
# ---------------------------------------------------------------------------------------------

async def test_client_close_ends_the_shell(served: Served, own_space: str,
                                           docker_api: docker.APIClient) -> None:
    container = f"{served.prefix}{own_space}"
    async with served_terminal(served, own_space) as term:
        await term.type("sleep 3600; echo never\n")

        async def sleeping() -> list[str]:
            running = shells(docker_api, container)
            return running if any(p.startswith("sleep sleep 3600") for p in running) else []

        running = await poll(sleeping, timeout=60, interval=0.1, what="sleep 3600 running")
        assert any(p.startswith("bash ") for p in running), running
    await wait_until_gone(docker_api, container)  # the shell and its foreground job


async def test_client_close_hangs_up_background_jobs(served: Served, own_space: str,
                                                     docker_api: docker.APIClient) -> None:
    """Closing a terminal is a hangup, as when an ssh client goes away: the shell's jobs get
    SIGHUP and end (unless started with nohup); they are not left running in the space."""
    container = f"{served.prefix}{own_space}"
    async with served_terminal(served, own_space) as term:
        await term.type("sleep 3601 & nohup sleep 3602 >/dev/null 2>&1 & "
                        "echo started-$((1+1))\n")
        await term.expect("started-2")
        running = shells(docker_api, container)
        assert any("sleep 3601" in p for p in running), running
    await wait_until_gone(docker_api, container, "bash")  # the shell itself
    await wait_until_gone(docker_api, container, "sleep 3601")  # its job, hung up
    assert any("sleep 3602" in p for p in shells(docker_api, container))  # nohup: kept


def served_rss_kib(served: Served) -> int:
    with open(f"/proc/{served.process.pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def client_frame(payload: bytes) -> bytes:
    """One masked binary websocket frame, as a client must send it."""
    mask = os.urandom(4)
    header = bytes([0x82])
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    else:
        header += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_client_that_never_reads(served: Served, own_space: str,
                                       docker_api: docker.APIClient) -> None:
    """The shell prints 200 MB to a client that reads nothing after the handshake: the
    service stays responsive, its memory stays bounded, the writer in the space blocks, and
    when the client drops, the shell and its pipeline are gone."""
    container = f"{served.prefix}{own_space}"
    host, port = served.url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /api/spaces/{own_space}/terminal HTTP/1.1\r\n"
                      f"Host: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"Authorization: Bearer {served.key}\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 101"), head
        before = served_rss_kib(served)
        writer.write(client_frame(b"yes | head -c 200000000; echo flood-$((1+1))\n"))
        await writer.drain()

        async def head_pid() -> int:
            code, out = in_container(docker_api, container, "pgrep -x head")
            return int(out.split()[0]) if code == 0 and out.strip() else 0

        pid = await poll(head_pid, what="the flood starts")

        async def written() -> int:
            code, out = in_container(docker_api, container, f"cat /proc/{pid}/io")
            assert code == 0, out  # head is still there: the 200 MB did not go through
            return int(re.search(rb"wchar: (\d+)", out).group(1))  # type: ignore[union-attr]

        # Progress, not time: the writer advances only while buffers on the way (kernel,
        # engine, the service's bounded queue) fill, then blocks for good.
        samples = [await written()]
        async with aiohttp.ClientSession() as session:
            while len(samples) < 3 or samples[-1] != samples[-2]:
                assert len(samples) < 40, f"the writer never blocked: {samples}"
                async with session.get(f"{served.url}/api/health",
                                       timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    assert resp.status == 200  # the service answers meanwhile
                await asyncio.sleep(1)
                samples.append(await written())
        assert samples[-1] < 64_000_000, samples
        during = served_rss_kib(served)
    finally:
        writer.transport.abort()  # a client that just goes away
    await wait_until_gone(docker_api, container, "bash")
    await wait_until_gone(docker_api, container)  # the flood pipeline too
    after = served_rss_kib(served)
    assert max(during, after) - before < 64 * 1024, (before, during, after)
    async with aiohttp.ClientSession() as session, session.get(
            f"{served.url}/api/health") as resp:
        assert resp.status == 200


async def test_service_shutdown_hangs_up_terminals_and_audits_them(
        tmp_path: Path, prefix: str, docker_api: docker.APIClient) -> None:
    """A service that stops (SIGTERM) tells each terminal why (1001), hangs up its shell like
    a dropped session (its jobs end, nohup'd ones live on) and audits the close before its
    audit log closes."""
    instance, name = f"{prefix}stop-", unique_name("bye")
    container = f"{instance}{name}"
    try:
        with serve(tmp_path, SESSION_KEY, instance) as served:
            status, reply = served.request("POST", "/api/spaces", {
                "name": name, "memory": "64m", "network": "none"})
            assert status == 201, reply
            async with served_terminal(served, name) as term:
                await term.type("sleep 3604 & nohup sleep 3605 >/dev/null 2>&1 & "
                                "echo started-$((1+1))\n")
                await term.expect("started-2")

                async def both_running() -> bool:  # nohup has set its SIGHUP aside by then
                    running = shells(docker_api, container)
                    return all(any(p == f"sleep sleep {n}" for p in running)  # comm args:
                               for n in (3604, 3605))  # not "nohup nohup sleep" any more

                await poll(both_running, what="both jobs running")
                served.process.terminate()
                assert await term.closed() == 1001
                assert term.close_reason == "server shutting down"
            assert served.process.wait(30) == 0
        await wait_until_gone(docker_api, container, "sleep 3604")  # hung up
        assert any("sleep 3605" in p for p in shells(docker_api, container))
        events = [json.loads(line) for line in
                  (served.data_dir / "audit.jsonl").read_text().splitlines()]
        kinds = [e["type"] for e in events if e.get("space") == name]
        assert kinds == ["space.create", "terminal.open", "terminal.close"], kinds
    finally:
        remove_everything(docker_api, instance)


async def test_a_terminal_whose_shell_cannot_be_ended_still_releases_its_space(
        client: Api, space: SpaceMaker, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the engine fails while a closed terminal's shell is being ended, the failure is
    logged and the space is released and the close audited all the same (else auto-sleep
    would never pause it again)."""
    name = (await space(memory="64m", network="none"))["name"]
    activity = client.app[clawdspace.SPACES_KEY].activity
    ws = await client.client.ws_connect(f"/api/spaces/{name}/terminal", headers=auth(client))
    term = Terminal(ws)
    await term.type("echo up-$((1+1))\n")
    await term.expect("up-2")
    assert activity.is_busy(name)

    async def engine_down(*args: Any, **kwargs: Any) -> None:
        raise clawdspace.Unavailable("injected: the engine does not answer")

    monkeypatch.setattr(client.app[clawdspace.EXECS_KEY], "kill_exec", engine_down)
    await ws.close()

    async def released() -> bool:
        return not activity.is_busy(name) and bool(events_of(client, name, "terminal.close"))

    await poll(released, timeout=60, what="the space released and the close audited")
