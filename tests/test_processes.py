"""Client commands as processes of a space: streaming exec (NDJSON as output arrives), the
process list, signals and kills, the per-space cap, terminals' shells listed. Waits are on
files the test creates, never on time."""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

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
    free_loopback,
    in_container,
    launch,
    poll,
    unique_name,
    wait_healthy,
)

import clawdspace


def running(docker_api: docker.APIClient, container: str, command: str) -> bool:
    """Whether a process whose command line holds ``command`` runs in the container (the
    bracket keeps pgrep's own shell from matching)."""
    return in_container(docker_api, container, f"pgrep -f '[{command[0]}]{command[1:]}'")[0] == 0


class Events:
    """A streaming exec's NDJSON answer, read one event at a time."""

    def __init__(self, lines: AsyncIterator[bytes]) -> None:
        self.lines = lines
        self.seen: list[dict[str, Any]] = []

    async def next(self) -> dict[str, Any]:
        line = await anext(self.lines)
        event: dict[str, Any] = json.loads(line)
        self.seen.append(event)
        return event

    async def until(self, kind: str) -> dict[str, Any]:
        while (event := await self.next())["type"] != kind:
            pass
        return event

    def text(self, kind: str = "stdout") -> str:
        return "".join(e.get("data", "") for e in self.seen if e["type"] == kind)


@contextlib.asynccontextmanager
async def stream(api: Api, name: str, command: str, **fields: Any) -> AsyncIterator[Events]:
    async with api.client.post(f"/api/spaces/{name}/exec", headers=auth(api),
                               json={"command": command, "stream": True, **fields}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/x-ndjson"
        yield Events(aiter(resp.content))


def gate(tag: str) -> str:
    """Shell that waits until the test creates /workspace/<tag> (no timing assumptions)."""
    return f"while [ ! -e /workspace/{tag} ]; do sleep 0.05; done"


async def processes(api: Api, name: str) -> list[dict[str, Any]]:
    reply = await api.get(f"/api/spaces/{name}/processes")
    assert reply.status == 200, reply.body
    return reply.body["processes"]  # type: ignore[no-any-return]


async def test_stream_sends_output_as_it_comes_and_the_process_is_listed(
        client: Api, space: SpaceMaker, docker_api: docker.APIClient) -> None:
    name = (await space(memory="64m", network="none"))["name"]
    container = f"{client.config.prefix}{name}"
    async with stream(client, name, f"echo first; {gate('go')}; echo second >&2; "
                               "exit 3", env={"SECRET_TOKEN": "v-123"}) as events:
        start = await events.next()
        assert start["type"] == "start" and start["id"].startswith("p-")
        assert isinstance(start["pid"], int) and start["pid"] > 1
        first = await events.next()
        assert first["type"] == "stdout" and first["data"] == "first\n"
        assert first["next"] == len("first\n")
        # The command has not ended: it waits on a file that does not exist yet.
        [listed] = [p for p in await processes(client, name) if p["id"] == start["id"]]
        assert listed["status"] == "running" and listed["pid"] == start["pid"]
        assert listed["envKeys"] == ["SECRET_TOKEN"] and "v-123" not in json.dumps(listed)
        assert listed["source"] == "api" and listed["cwd"] == "/workspace"
        assert in_container(docker_api, container, "touch /workspace/go")[0] == 0
        exit_event = await events.until("exit")
        assert events.text("stderr") == "second\n"
        assert exit_event["exitCode"] == 3 and exit_event["timedOut"] is False
    got = await client.get(f"/api/spaces/{name}/processes/{start['id']}")
    assert got.status == 200, got.body
    ended = got.body["process"]
    assert ended["status"] == "exited" and ended["exitCode"] == 3 and ended["endedAt"]
    assert ended["stdoutBytes"] == len("first\n") and ended["stderrBytes"] == len("second\n")
    audit = [e for e in client.audit_lines() if e.get("space") == name
             and e["type"] == "process.start"]
    assert audit[-1]["meta"]["process"] == start["id"]
    assert "v-123" not in json.dumps(audit)


async def test_stream_text_is_never_split_and_bytes_are_base64(client: Api,
                                                               shared_space: str) -> None:
    # é is c3 a9: the halves arrive in two writes; ff fe is no UTF-8 at all.
    async with stream(client, shared_space,
                               r"printf '\303'; sleep 0.2; printf '\251 ok'; sleep 0.2; "
                               r"printf '\377\376' >&2") as events:
        await events.until("exit")
    assert events.text() == "é ok"
    assert all("b64" not in e for e in events.seen if e["type"] == "stdout")
    raw = b"".join(base64.b64decode(e["b64"]) for e in events.seen if "b64" in e)
    assert raw == b"\xff\xfe"


async def test_stream_timeout_kills_and_reports(client: Api, shared_space: str) -> None:
    async with stream(client, shared_space, "sleep 300", timeout=1) as events:
        start = await events.next()
        exit_event = await events.until("exit")
    assert exit_event["timedOut"] is True
    got = await client.get(f"/api/spaces/{shared_space}/processes/{start['id']}")
    assert got.body["process"]["status"] == "timed-out"


async def test_signal_and_kill_a_running_process(client: Api, shared_space: str) -> None:
    async with stream(client, shared_space, "trap 'exit 143' TERM; sleep 300 & wait",
                               timeout=0) as events:
        start = await events.next()
        url = f"/api/spaces/{shared_space}/processes/{start['id']}"
        bad = await client.post(f"{url}/signal", {"signal": "BOGUS"})
        assert bad.status == 400 and bad.error_code() == "invalid_signal"
        sent = await client.post(f"{url}/signal", {"signal": "TERM"})
        assert sent.status == 200, sent.body
        assert sent.body["process"]["signal"] == "TERM"
        exit_event = await events.until("exit")
    assert exit_event["exitCode"] == 143
    ended = (await client.get(url)).body["process"]
    assert ended["status"] == "killed" and ended["signal"] == "TERM"
    again = await client.delete(url)
    assert again.status == 409 and again.error_code() == "process_ended"
    missing = await client.delete(f"/api/spaces/{shared_space}/processes/p-000000000000")
    assert missing.status == 404 and missing.error_code() == "process_not_found"
    signals = [e for e in client.audit_lines() if e["type"] == "process.signal"
               and e["meta"]["process"] == start["id"]]
    assert [e["meta"]["signal"] for e in signals] == ["TERM"]


async def test_delete_kills_the_whole_group(client: Api, shared_space: str,
                                            docker_api: docker.APIClient) -> None:
    async with stream(client, shared_space, "sleep 3607 & sleep 300", timeout=0) as events:
        start = await events.next()
        killed = await client.delete(f"/api/spaces/{shared_space}/processes/{start['id']}")
        assert killed.status == 200, killed.body
        exit_event = await events.until("exit")
    assert exit_event["exitCode"] == 137
    container = f"{client.config.prefix}{shared_space}"

    async def gone() -> bool:
        code, out = in_container(docker_api, container, "ps -eo args")
        return code == 0 and "sleep 3607" not in out.decode()

    await poll(gone, what="the background child killed with its group")


async def test_the_process_cap_is_429(make_client: MakeClient, space: SpaceMaker) -> None:
    api = await make_client(max_processes=2)
    name = (await space(memory="64m", network="none", api=api))["name"]
    held: list[Any] = []
    try:
        for _ in range(2):
            resp = await api.client.post(f"/api/spaces/{name}/exec", headers=auth(api), json={
                "command": "sleep 300", "stream": True, "timeout": 0})
            held.append(resp)
            assert resp.status == 200
            assert json.loads(await resp.content.readline())["type"] == "start"
        refused = await api.post(f"/api/spaces/{name}/exec", {"command": "true"})
        assert refused.status == 429 and refused.error_code() == "too_many_processes"
    finally:
        for process in await processes(api, name):
            if process["status"] == "running":
                await api.delete(f"/api/spaces/{name}/processes/{process['id']}")
        for resp in held:
            resp.close()

    async def none_running() -> bool:
        return all(p["status"] != "running" for p in await processes(api, name))

    await poll(none_running, what="the killed processes ended")
    assert (await api.post(f"/api/spaces/{name}/exec", {"command": "true"})).status == 200


async def test_a_client_that_goes_away_leaves_the_command_running(
        client: Api, space: SpaceMaker, docker_api: docker.APIClient) -> None:
    name = (await space(memory="64m", network="none"))["name"]
    container = f"{client.config.prefix}{name}"
    resp = await client.client.post(f"/api/spaces/{name}/exec", headers=auth(client), json={
        "command": f"{gate('go')}; echo done > /workspace/out", "stream": True, "timeout": 0})
    start = json.loads(await resp.content.readline())
    resp.close()  # the client is gone; the command waits on its file
    assert in_container(docker_api, container, "touch /workspace/go")[0] == 0

    async def ended() -> dict[str, Any] | None:
        got = await client.get(f"/api/spaces/{name}/processes/{start['id']}")
        process: dict[str, Any] = got.body["process"]
        return process if process["status"] != "running" else None

    process = await poll(ended, what="the command ended by itself")
    assert process["status"] == "exited" and process["exitCode"] == 0
    assert in_container(docker_api, container, "cat /workspace/out")[1] == b"done\n"


async def test_a_terminal_shell_is_a_process(client: Api, shared_space: str) -> None:
    ws = await client.client.ws_connect(f"/api/spaces/{shared_space}/terminal?cols=100&rows=30",
                                        headers=auth(client))
    term = Terminal(ws)
    await term.type("echo here-$((1+1))\n")
    await term.expect("here-2")
    shells = [p for p in await processes(client, shared_space) if p["source"] == "terminal"
              and p["status"] == "running"]
    assert len(shells) == 1 and shells[0]["pty"] == {"cols": 100, "rows": 30}
    await term.type("exit\n")
    assert await term.closed() == 1000
    await ws.close()

    async def ended() -> bool:
        listed = {p["id"]: p for p in await processes(client, shared_space)}
        return bool(listed[shells[0]["id"]]["status"] == "exited")

    await poll(ended, what="the shell listed as exited")


async def test_background_then_reattach_from_any_offset_with_two_watchers(
        client: Api, space: SpaceMaker, docker_api: docker.APIClient) -> None:
    name = (await space(memory="64m", network="none"))["name"]
    container = f"{client.config.prefix}{name}"
    reply = await client.post(f"/api/spaces/{name}/exec", {
        "command": f"echo one; {gate('go')}; echo two; exit 5", "background": True,
        "timeout": 0})
    assert reply.status == 202, reply.body
    process = reply.body["process"]
    url = f"/api/spaces/{name}/processes/{process['id']}/output"

    async def first_line() -> bool:
        got = await client.get(f"/api/spaces/{name}/processes/{process['id']}")
        return bool(got.body["process"]["output"]["next"] >= 4)

    await poll(first_line, what="the first line spooled")
    # Not following: what is kept so far, then where to go on from.
    async with client.client.get(url, headers=auth(client)) as resp:
        events = Events(aiter(resp.content))
        start = await events.next()
        assert start["offset"] == 0 and start["oldest"] == 0
        more = await events.until("more")
    assert events.text() == "one\n" and more["next"] == 4
    # Two watchers follow at once, one from a later offset.
    async with client.client.get(url, headers=auth(client), params={"follow": "true"}) as a, \
            client.client.get(url, headers=auth(client),
                              params={"follow": "true", "offset": "4"}) as b:
        watchers = [Events(aiter(a.content)), Events(aiter(b.content))]
        for watcher in watchers:
            assert (await watcher.next())["type"] == "start"
        assert (await watchers[0].next())["data"] == "one\n"
        assert in_container(docker_api, container, "touch /workspace/go")[0] == 0
        exits = [await watcher.until("exit") for watcher in watchers]
    assert [w.text() for w in watchers] == ["one\ntwo\n", "two\n"]
    assert all(e["exitCode"] == 5 for e in exits)


async def test_stdin_round_trip_and_eof(client: Api, shared_space: str) -> None:
    reply = await client.post(f"/api/spaces/{shared_space}/exec", {
        "command": "read line; echo got:$line; cat; echo end", "background": True,
        "stdin": True})
    assert reply.status == 202, reply.body
    process = reply.body["process"]
    assert process["stdin"] is True
    base = f"/api/spaces/{shared_space}/processes/{process['id']}"
    assert (await client.post(f"{base}/stdin", {"data": "hello\n"})).status == 200
    raw = await client.call("POST", f"{base}/stdin", data=b"\xc3\xa9\n",
                            headers={"Content-Type": "application/octet-stream"})
    assert raw.status == 200, raw.body
    closed = await client.post(f"{base}/stdin", {"eof": True})
    assert closed.status == 200 and closed.body["process"]["stdin"] is False
    async with client.client.get(f"{base}/output", headers=auth(client),
                                 params={"follow": "true"}) as resp:
        events = Events(aiter(resp.content))
        exit_event = await events.until("exit")
    assert events.text() == "got:hello\né\nend\n" and exit_event["exitCode"] == 0
    after = await client.post(f"{base}/stdin", {"data": "late"})
    assert after.status == 409 and after.error_code() == "no_stdin"
    writes = [e for e in client.audit_lines() if e["type"] == "process.stdin"
              and e["meta"]["process"] == process["id"]]
    assert [e["meta"]["bytes"] for e in writes] == [6, 3, 0]


async def test_stdin_needs_a_process_that_keeps_it(client: Api, shared_space: str) -> None:
    refused = await client.post(f"/api/spaces/{shared_space}/exec",
                                {"command": "cat", "stdin": True})
    assert refused.status == 400 and refused.error_code() == "invalid_stdin"
    reply = await client.post(f"/api/spaces/{shared_space}/exec",
                              {"command": "true", "background": True})
    base = f"/api/spaces/{shared_space}/processes/{reply.body['process']['id']}"
    closed = await client.post(f"{base}/stdin", {"data": "x"})
    assert closed.status == 409 and closed.error_code() == "no_stdin"
    both = await client.post(f"{base}/stdin", {"data": "x", "b64": "eA=="})
    assert both.status == 400 and both.error_code() == "invalid_stdin"


async def test_the_output_ring_keeps_the_newest_bytes(make_client: MakeClient,
                                                      space: SpaceMaker) -> None:
    api = await make_client(process_output_bytes=65536)
    name = (await space(memory="64m", network="none", api=api))["name"]
    reply = await api.post(f"/api/spaces/{name}/exec", {
        "command": "head -c 200000 /dev/zero | tr '\\0' a; echo; echo tail-end",
        "background": True})
    base = f"/api/spaces/{name}/processes/{reply.body['process']['id']}"

    async def ended() -> bool:
        return bool((await api.get(base)).body["process"]["status"] == "exited")

    await poll(ended, what="the printer ended")  # so the ring holds still while it is read
    async with api.client.get(f"{base}/output", headers=auth(api),
                              params={"follow": "true"}) as resp:
        events = Events(aiter(resp.content))
        start = await events.next()
        await events.until("exit")
    total = 200000 + 1 + len("tail-end\n")
    assert start["oldest"] == start["offset"] and start["offset"] >= total - 65536
    assert events.text().endswith("a\ntail-end\n")
    assert len(events.text()) == total - start["offset"]


async def test_a_command_on_a_pty_resizes_and_reads_its_terminal(client: Api,
                                                                  shared_space: str) -> None:
    reply = await client.post(f"/api/spaces/{shared_space}/exec", {
        "command": "tty; stty size; read x; stty size; echo term=$TERM", "background": True,
        "pty": {"cols": 100, "rows": 30}})
    assert reply.status == 202, reply.body
    process = reply.body["process"]
    assert process["pty"] == {"cols": 100, "rows": 30} and process["stdin"] is True
    base = f"/api/spaces/{shared_space}/processes/{process['id']}"
    async with client.client.get(f"{base}/output", headers=auth(client),
                                 params={"follow": "true"}) as resp:
        events = Events(aiter(resp.content))
        while "30 100" not in events.text():
            await events.next()
        resized = await client.post(f"{base}/resize", {"cols": 120, "rows": 50})
        assert resized.status == 200 and resized.body["process"]["pty"] == {
            "cols": 120, "rows": 50}
        assert (await client.post(f"{base}/stdin", {"data": "\r"})).status == 200
        exit_event = await events.until("exit")
    lines = events.text().replace("\r", "").splitlines()
    assert lines[0].startswith("/dev/pts/"), lines
    assert "30 100" in lines and "50 120" in lines and "term=xterm-256color" in lines, lines
    assert exit_event["exitCode"] == 0
    ended = await client.post(f"{base}/resize", {"cols": 80, "rows": 24})
    assert ended.status == 409 and ended.error_code() == "no_pty"
    bad = await client.post(f"/api/spaces/{shared_space}/exec",
                            {"command": "true", "pty": {"cols": 0, "rows": 5}})
    assert bad.status == 400 and bad.error_code() == "invalid_pty"


async def test_timeout_zero_only_with_stream(client: Api, shared_space: str) -> None:
    reply = await client.post(f"/api/spaces/{shared_space}/exec",
                              {"command": "true", "timeout": 0})
    assert reply.status == 400 and reply.error_code() == "invalid_timeout"
    bad = await client.post(f"/api/spaces/{shared_space}/exec",
                            {"command": "true", "stream": "yes"})
    assert bad.status == 400 and bad.error_code() == "invalid_stream"


@pytest.mark.parametrize("path", ["/processes", "/processes/p-000000000000"])
async def test_processes_of_a_missing_space_are_404(client: Api, path: str) -> None:
    reply = await client.get(f"/api/spaces/{unique_name('none')}{path}")
    assert reply.status == 404


# ---------------------------------------------------------------------------------------------
# Attach: a websocket onto a process, any number of watchers
# ---------------------------------------------------------------------------------------------

async def test_attach_websocket_carries_output_stdin_and_the_exit(client: Api,
                                                                  shared_space: str) -> None:
    reply = await client.post(f"/api/spaces/{shared_space}/exec", {
        "command": "echo ready; read a; echo got:$a; echo oops >&2; read b; echo got:$b; "
                   "exit 6", "background": True, "stdin": True})
    assert reply.status == 202, reply.body
    base = f"/api/spaces/{shared_space}/processes/{reply.body['process']['id']}"
    first = Terminal(await client.client.ws_connect(f"{base}/attach", headers=auth(client)))
    await first.expect("ready")
    second = Terminal(await client.client.ws_connect(f"{base}/attach", headers=auth(client)))
    await second.expect("ready")  # a late watcher gets what was printed before it came
    await first.ws.send_bytes(b"one\n")
    await first.expect("got:one")
    await second.expect("got:one")
    await second.ws.send_json({"type": "ping"})
    await second.ws.send_json({"type": "bogus"})
    await second.ws.send_json({"type": "input", "data": "two\n"})
    await first.expect("oops")
    await first.expect("got:two")
    for watcher in (first, second):
        while await watcher._receive_one(30):
            pass
        exits = [t for t in watcher.texts if t["type"] == "exit"]
        assert exits and exits[0]["exitCode"] == 6, watcher.texts
        assert watcher.close_code == 1000
    kinds = [t["type"] for t in second.texts]
    assert "pong" in kinds and "error" in kinds
    audit = [e for e in client.audit_lines() if e["type"] == "process.attach"
             and e["meta"]["process"] == reply.body["process"]["id"]]
    assert len(audit) == 2
    assert not [e for e in client.audit_lines() if e["type"] == "process.stdin"
                and e["meta"]["process"] == reply.body["process"]["id"]]


async def test_attach_to_a_missing_process_is_404(client: Api, shared_space: str) -> None:
    reply = await client.get(f"/api/spaces/{shared_space}/processes/p-000000000000/attach")
    assert reply.status == 404 and reply.error_code() == "process_not_found"


# ---------------------------------------------------------------------------------------------
# Output staged in the space: bounded there, removed at the end
# ---------------------------------------------------------------------------------------------

async def test_output_files_in_the_space_stay_small_and_go_at_the_end(
        client: Api, space: SpaceMaker, docker_api: docker.APIClient) -> None:
    name = (await space(memory="256m", network="none"))["name"]
    container = f"{client.config.prefix}{name}"
    size = 40 << 20
    reply = await client.post(f"/api/spaces/{name}/exec", {
        "command": f"head -c {size} /dev/zero; echo; {gate('end')}", "background": True})
    assert reply.status == 202, reply.body
    process = reply.body["process"]
    base = f"/api/spaces/{name}/processes/{process['id']}"
    where = f"/tmp/.clawdspace-processes/{process['id']}"

    async def all_read() -> bool:
        return bool((await client.get(base)).body["process"]["stdoutBytes"] == size + 1)

    await poll(all_read, 120, what="all 40 MiB read by the service")

    async def small() -> bool:  # what was read is given back to the space's disk
        code, out = in_container(docker_api, container, f"du -k {where}/1 | cut -f1")
        return code == 0 and int(out.split()[0]) <= 8 * 1024

    await poll(small, 60, what="the spool file in the space punched down to a few MiB")
    in_container(docker_api, container, "touch /workspace/end")

    async def ended() -> bool:
        return bool((await client.get(base)).body["process"]["status"] == "exited")

    await poll(ended, what="the command ended")

    async def removed() -> bool:
        return in_container(docker_api, container, f"test -e {where}")[0] != 0

    await poll(removed, what="its files in the space removed")
    got = (await client.get(base)).body["process"]
    assert got["stdoutBytes"] == size + 1 and got["output"]["next"] == size + 1


async def test_a_space_that_removes_its_output_files_only_loses_its_own_output(
        client: Api, shared_space: str) -> None:
    reply = await client.post(f"/api/spaces/{shared_space}/exec", {
        "command": "echo before; rm -rf /tmp/.clawdspace-processes; echo after; exit 2",
        "background": True})
    assert reply.status == 202, reply.body
    base = f"/api/spaces/{shared_space}/processes/{reply.body['process']['id']}"
    async with client.client.get(f"{base}/output", headers=auth(client),
                                 params={"follow": "true"}) as resp:
        assert resp.status == 200
        events = Events(aiter(resp.content))
        exit_event = await events.until("exit")
    assert exit_event["exitCode"] == 2  # what it printed is its own loss; nothing hangs
    assert set(events.text().split()) <= {"before", "after"}
    again = await client.post(f"/api/spaces/{shared_space}/exec", {
        "command": "echo fine", "stream": True})
    assert again.status == 200 and '"data":"fine\\n"' in str(again.body), again.body


# ---------------------------------------------------------------------------------------------
# Survival: kill -9 of the service and a restart, with the process still running
# ---------------------------------------------------------------------------------------------

def ndjson(url: str, key: str) -> Iterator[dict[str, Any]]:
    request = urllib.request.Request(  # noqa: S310 - loopback
        url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=120) as resp:  # noqa: S310 - loopback
        for line in resp:
            yield json.loads(line)


def until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@contextlib.contextmanager
def restartable(tmp_path: Path, docker_api: docker.APIClient,
                prefix: str) -> Iterator[tuple[Callable[[], Served], str]]:
    """A service on a loopback port with one space; ``start()`` (re)starts it on the same
    data directory. The space is removed through the engine at the end."""
    host, port = free_loopback()
    name = unique_name("surv")
    services: list[Served] = []

    def start() -> Served:
        served = launch(tmp_path, host, port, prefix, SESSION_KEY, {})
        services.append(served)
        wait_healthy(served)
        return served

    try:
        first = start()
        status, body = first.request("POST", "/api/spaces", {
            "name": name, "network": "none", "memory": "64m"})
        assert status == 201, body
        yield start, name
    finally:
        for served in services:
            if served.process.poll() is None:
                served.process.kill()
            served.process.wait()
        with contextlib.suppress(docker.errors.NotFound):
            docker_api.remove_container(f"{prefix}{name}", force=True)
        with contextlib.suppress(docker.errors.APIError):
            docker_api.remove_volume(f"{prefix}vol-{name}")


def start_background(served: Served, name: str, **fields: Any) -> tuple[str, str]:
    """A background process through a real service: (its id, its path under the API)."""
    status, body = served.request("POST", f"/api/spaces/{name}/exec",
                                  {"background": True, **fields})
    assert status == 202, body
    process_id = body["process"]["id"]
    return process_id, f"/api/spaces/{name}/processes/{process_id}"


def test_a_process_outlives_kill_9_of_the_service_and_keeps_its_output(
        tmp_path: Path, docker_api: docker.APIClient, prefix: str) -> None:
    with restartable(tmp_path, docker_api, prefix) as (start, name):
        first = start()
        process_id, base = start_background(
            first, name, command=f"echo before; {gate('go')}; echo while-down; echo err >&2; "
                                 f"{gate('end')}; echo after; exit 4", timeout=600)
        until(lambda: first.request("GET", base)[1]["process"]["stdoutBytes"] > 0,
              "the first line read")
        first.process.kill()  # kill -9: no shutdown of any kind
        first.process.wait()
        container = f"{prefix}{name}"
        in_container(docker_api, container, "touch /workspace/go")
        until(lambda: b"err" in in_container(
            docker_api, container, f"cat /tmp/.clawdspace-processes/{process_id}/2")[1],
            "the command printing while the service is down")
        second = start()
        status, body = second.request("GET", f"/api/spaces/{name}/processes")
        assert status == 200, body
        listed = {p["id"]: p for p in body["processes"]}
        assert listed[process_id]["status"] == "running", listed
        assert listed[process_id]["pid"] == body["processes"][0]["pid"]
        in_container(docker_api, container, "touch /workspace/end")
        events = list(ndjson(f"{second.url}{base}/output?offset=0&follow=true", SESSION_KEY))
        text = "".join(e.get("data", "") for e in events if e["type"] == "stdout")
        assert text == "before\nwhile-down\nafter\n", events
        assert "".join(e.get("data", "") for e in events if e["type"] == "stderr") == "err\n"
        assert events[-1]["type"] == "exit" and events[-1]["exitCode"] == 4, events
        status, body = second.request("GET", base)
        assert body["process"]["status"] == "exited" and body["process"]["exitCode"] == 4
        until(lambda: in_container(docker_api, container,
                                   "test -e /tmp/.clawdspace-processes/" + process_id)[0] != 0,
              "its files in the space removed")
        # A third start still lists it, ended, with its output.
        second.process.terminate()
        second.process.wait()
        third = start()
        status, body = third.request("GET", base)
        assert status == 200 and body["process"]["exitCode"] == 4, body
        events = list(ndjson(f"{third.url}{base}/output?offset=0", SESSION_KEY))
        assert "".join(e.get("data", "") for e in events if e["type"] == "stdout") == text


@pytest.mark.parametrize("stop", ["kill", "terminate"])
def test_a_timeout_holds_across_restarts(tmp_path: Path, docker_api: docker.APIClient,
                                         prefix: str, stop: str) -> None:
    marker = f"sleep 4{secrets.randbelow(1000):03d}"
    with restartable(tmp_path, docker_api, prefix) as (start, name):
        first = start()
        _, base = start_background(first, name, command=marker, timeout=8)
        getattr(first.process, stop)()  # kill -9, or a clean stop: it runs on either way
        first.process.wait()
        container = f"{prefix}{name}"
        assert running(docker_api, container, marker)
        second = start()
        assert second.request("GET", base)[1]["process"]["status"] in ("running",
                                                                         "timed-out")
        until(lambda: second.request("GET", base)[1]["process"]["status"] == "timed-out",
              "the process ended by its timeout", 60)
        assert not running(docker_api, container, marker)


async def test_output_files_swapped_for_an_endless_device_are_read_for_a_bounded_time(
        client: Api, shared_space: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(clawdspace, "SPOOL_FINAL_READ", 1.0)
    reply = await client.post(f"/api/spaces/{shared_space}/exec", {
        "command": "echo real; for d in /tmp/.clawdspace-processes/*; do "
                   "ln -sf /dev/zero $d/1; mkfifo $d/2.fifo; mv -f $d/2.fifo $d/2; done",
        "background": True})
    assert reply.status == 202, reply.body
    base = f"/api/spaces/{shared_space}/processes/{reply.body['process']['id']}"
    async with client.client.get(f"{base}/output", headers=auth(client),
                                 params={"follow": "true"}) as resp:
        events = Events(aiter(resp.content))
        exit_event = await events.until("exit")
    assert exit_event["exitCode"] == 0
    assert (await client.get(base)).body["process"]["status"] == "exited"
    assert "its output files did not end; reading stopped" in caplog.text


async def test_a_process_that_cannot_be_recorded_never_starts(
        client: Api, shared_space: str, docker_api: docker.APIClient) -> None:
    spool = Path(client.config.data_dir) / "processes"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(spool)], check=True)
    try:
        with contextlib.suppress(OSError), open(spool / "filler", "wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
                filler.flush()
        marker = f"sleep 5{secrets.randbelow(1000):03d}"
        reply = await client.post(f"/api/spaces/{shared_space}/exec",
                                  {"command": marker, "background": True})
        assert reply.status == 503 and reply.error_code() == "disk_unavailable", reply.body
        plain = await client.post(f"/api/spaces/{shared_space}/exec", {"command": "echo ok"})
        assert plain.status == 200 and plain.body["stdout"] == "ok\n"  # not recorded: runs
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=True)
    container = f"{client.config.prefix}{shared_space}"
    assert not running(docker_api, container, marker)
    assert not [e for e in client.audit_lines() if e["type"] == "process.start"
                and e["meta"]["command"] == marker]
    assert not [p for p in await processes(client, shared_space) if p["command"] == marker]


async def test_a_daemon_the_command_leaves_behind_does_not_hold_it_open(
        client: Api, shared_space: str, docker_api: docker.APIClient) -> None:
    marker = f"sleep 6{secrets.randbelow(1000):03d}"
    reply = await client.post(f"/api/spaces/{shared_space}/exec", {
        "command": f"nohup {marker} >/dev/null 2>&1 & echo started", "background": True})
    assert reply.status == 202, reply.body
    base = f"/api/spaces/{shared_space}/processes/{reply.body['process']['id']}"
    container = f"{client.config.prefix}{shared_space}"
    try:
        async def ended() -> bool:
            return bool((await client.get(base)).body["process"]["status"] == "exited")

        await poll(ended, what="the command ended, its daemon still running")
        assert running(docker_api, container, marker)
        got = (await client.get(base)).body["process"]
        assert got["exitCode"] == 0 and got["stdoutBytes"] == len("started\n")
    finally:
        in_container(docker_api, container, f"pkill -f '[{marker[0]}]{marker[1:]}'")


def test_output_of_a_process_that_ended_while_the_service_was_down_is_kept(
        tmp_path: Path, docker_api: docker.APIClient, prefix: str) -> None:
    with restartable(tmp_path, docker_api, prefix) as (start, name):
        first = start()
        process_id, base = start_background(
            first, name, command=f"head -c 7000000 /dev/zero | tr '\\0' b; echo; "
                                 f"{gate('go')}; echo tail-end")
        container = f"{prefix}{name}"
        until(lambda: first.request("GET", base)[1]["process"]["stdoutBytes"] == 7000001,
              "the first 7 MB read")

        def punched() -> bool:  # what was read has been given back (a hole in the file)
            code, out = in_container(docker_api, container,
                                     f"du -k /tmp/.clawdspace-processes/{process_id}/1")
            return code == 0 and int(out.split()[0]) < 5000

        until(punched, "a hole punched behind the reader")
        first.process.kill()
        first.process.wait()
        in_container(docker_api, container, "touch /workspace/go")
        until(lambda: not running(docker_api, container, "tail-end"),
              "the command ended while the service is down")
        second = start()
        until(lambda: second.request("GET", base)[1]["process"]["status"] == "exited",
              "the ended process recorded as such")
        events = list(ndjson(f"{second.url}{base}/output?offset=0", SESSION_KEY))
        text = "".join(e.get("data", "") for e in events if e["type"] == "stdout")
        assert text.endswith("b\ntail-end\n") and "\x00" not in text, text[-80:]
        assert events[0]["oldest"] >= 7000001 - (1 << 20), events[0]
        assert second.request("GET", base)[1]["process"]["exitCode"] == 0
