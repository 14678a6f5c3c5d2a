"""Housekeeping: shell history ingestion, auto-sleep of idle spaces, activity, and touch.

Every test runs its service instances under a prefix of its own, so the auto-sleep and the
history ingestion of one test never see the spaces of another (or of other modules).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
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
    Terminal,
    container_of,
    in_container,
    poll,
    remove_everything,
    remove_prefix_networks,
    serve,
    served_terminal,
    unique_name,
)

import clawdspace

TOKEN = "ghp_" + "Zq9Xw8Vu7T" * 3 + "s6R5p4"  # a GitHub token shape (36 characters)

StartNode = Callable[..., contextlib.AbstractContextManager[Served]]


@pytest.fixture(scope="module")
def module_instance(prefix: str, docker_api: docker.APIClient) -> Iterator[str]:
    """A prefix of this module's own (under the session's), with one bridge network."""
    own = f"{prefix}hk{secrets.token_hex(2)}-"
    yield own
    remove_everything(docker_api, own)
    remove_prefix_networks(docker_api, own)


@pytest.fixture
def instance(module_instance: str, docker_api: docker.APIClient) -> Iterator[str]:
    """The module's prefix, with no space left from another test: the spaces of this test are
    all its service instances see (auto-sleep and ingestion included)."""
    remove_everything(docker_api, module_instance)
    yield module_instance
    remove_everything(docker_api, module_instance)


@pytest.fixture
def node(tmp_path: Path, instance: str) -> StartNode:
    """``with node(**env) as served:`` the real service on this test's prefix; starting it
    again in the same test reuses the data directory (a restart)."""

    def start(**env: str) -> contextlib.AbstractContextManager[Served]:
        return serve(tmp_path / "node", SESSION_KEY, instance, **env)

    (tmp_path / "node").mkdir()
    return start


def create(served: Served, memory: str = "64m") -> str:
    name = unique_name("hk")
    status, body = served.request("POST", "/api/spaces", {"name": name, "memory": memory})
    assert status == 201, body
    return name


async def api_create(api: Api, memory: str = "64m") -> str:
    name = unique_name("hk")
    reply = await api.post("/api/spaces", {"name": name, "memory": memory})
    assert reply.status == 201, reply.body
    return name


def audit_file(served: Served) -> list[dict[str, Any]]:
    path = served.data_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def shell_events(served: Served, name: str) -> list[dict[str, Any]]:
    """Ingested history: in shell.jsonl, beside the audit log, rotating on its own."""
    path = served.data_dir / "shell.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()] \
        if path.exists() else []
    return [e for e in events if e.get("space") == name and e["type"] == "space.shell"]


async def wait_for_command(served: Served, name: str, needle: str,
                           timeout: float = 30) -> dict[str, Any]:
    """The space.shell event whose command holds ``needle``, once the service emitted it."""

    async def found() -> dict[str, Any] | None:
        return next((e for e in shell_events(served, name)
                     if needle in e["meta"]["command"]), None)

    event: dict[str, Any] = await poll(found, timeout, 0.3, f"space.shell with {needle!r}")
    return event


def paused(docker_api: docker.APIClient, container: str) -> bool:
    return bool(docker_api.inspect_container(container)["State"]["Paused"])


def pause_events(audit: Callable[[], list[dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    return [e for e in audit() if e.get("space") == name and e["type"] == "space.pause"]


async def wait_idle_pause(docker_api: docker.APIClient, container: str, name: str,
                          audit: Callable[[], list[dict[str, Any]]], what: str) -> None:
    """Poll until the engine shows the space paused and its ``space.pause`` is in the audit
    (the engine state comes first, the audit line just after)."""

    async def done() -> bool:
        return paused(docker_api, container) and bool(pause_events(audit, name))

    await poll(done, 30, 0.1, what)


def assert_idle_paused(docker_api: docker.APIClient, container: str, name: str,
                       audit: Callable[[], list[dict[str, Any]]], what: str) -> None:
    """Right after an auto-sleep round the test ran itself: the space is paused, and its
    ``space.pause`` is in the audit (a round returns once both are done)."""
    assert paused(docker_api, container), what
    assert pause_events(audit, name), what


class FakeClock:
    """Wall-clock seconds (``Activity.clock``) that pass only when the test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def install(self, api: Api) -> FakeClock:
        """This clock for the activity, auto-sleep and E2B deadlines of ``api``'s app."""
        api.app[clawdspace.SPACES_KEY].activity.clock = self
        return self


# One auto-sleep round, as the housekeeper's loop runs it (the method itself, whatever the
# ``rounds`` fixture makes of the loop's own calls).
SLEEP_IDLE = clawdspace.Housekeeper.sleep_idle


async def idle_round(api: Api) -> None:
    """One auto-sleep round of ``api``'s app, at the time its clock says now."""
    await SLEEP_IDLE(api.app[clawdspace.HOUSEKEEPER_KEY])


@pytest.fixture
def rounds(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """A fake clock (``.install(api)`` on each app of the test) with auto-sleep rounds only
    when the test runs them (``idle_round``): the housekeeper's own loop still runs, but its
    rounds do nothing. So no round of the loop can fall between an ``advance`` and the check
    after it, nor race a round of the test's (two rounds at once could both pause a space)."""

    async def loop_round(self: clawdspace.Housekeeper) -> None:
        return None

    monkeypatch.setattr(clawdspace.Housekeeper, "sleep_idle", loop_round)
    return FakeClock()


def history_stamps(docker_api: docker.APIClient, container: str) -> dict[str, float]:
    """Command -> its ``#<epoch>`` stamp, from the history file as the shell wrote it."""
    code, out = in_container(docker_api, container, "cat /workspace/.bash_history")
    assert code == 0, out
    stamps: dict[str, float] = {}
    stamp = None
    for line in out.decode().splitlines():
        if re.fullmatch(r"#\d{9,12}", line):
            stamp = float(line[1:])
        elif stamp is not None:
            stamps[line] = stamp
    return stamps


# ---------------------------------------------------------------------------------------------
# parse_history
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("#1700000000\nls -la\n#1700000005\necho hi\n",
     [(1700000000.0, "ls -la"), (1700000005.0, "echo hi")]),
    ("#1700000000\nfor i in 1 2; do\necho $i\ndone\n#1700000010\npwd\n",
     [(1700000000.0, "for i in 1 2; do\necho $i\ndone"), (1700000010.0, "pwd")]),
    ("ls\npwd\n\ncd /tmp\n", [(None, "ls"), (None, "pwd"), (None, "cd /tmp")]),
    ("", []),
    ("#1700000000\n", []),
    ("#1700000000\n\n  \nuptime\n", [(1700000000.0, "uptime")]),
    ("#notastamp\n#123\necho a\n", [(None, "#notastamp"), (None, "#123"), (None, "echo a")]),
    ("echo early\n#1700000000\necho late\n", [(None, "echo early"), (1700000000.0, "echo late")]),
    ("#1700000000\necho one\n#1700000001\n#1700000002\necho two\n",
     [(1700000000.0, "echo one"), (1700000002.0, "echo two")]),
], ids=["stamped", "multi-line", "no-stamps", "empty", "stamp-only", "blank-lines",
        "not-stamps", "mixed", "empty-entry"])
def test_parse_history(text: str, expected: list[tuple[float | None, str]]) -> None:
    assert clawdspace.parse_history(text) == expected


# ---------------------------------------------------------------------------------------------
# Shell history ingestion
# ---------------------------------------------------------------------------------------------

async def test_history_ingested_once_with_own_time_across_restart_and_truncation(
        node: StartNode, docker_api: docker.APIClient, instance: str) -> None:
    tag = secrets.token_hex(4)
    with node(CLAWDSPACE_HISTORY_INTERVAL="1") as first:
        name = create(first)
        container = f"{instance}{name}"
        async with served_terminal(first, name) as term:
            await term.type(f"echo one-{tag} $((1+1))\n")
            await term.expect(f"one-{tag} 2")
            await term.type(f"echo {TOKEN} two-{tag} $((2+2))\n")
            await term.expect(f"two-{tag} 4")
        one = await wait_for_command(first, name, f"one-{tag}")
        two = await wait_for_command(first, name, f"two-{tag}")
    assert one["meta"] == {"command": f"echo one-{tag} $((1+1))", "source": "bash_history"}
    assert "keyId" not in one  # the service's own doing, no client's
    stamps = history_stamps(docker_api, container)
    assert one["ts"] == clawdspace.epoch_to_iso(stamps[f"echo one-{tag} $((1+1))"])
    assert TOKEN not in two["meta"]["command"] and "[REDACTED]" in two["meta"]["command"]
    assert two["meta"]["command"].endswith(f"two-{tag} $((2+2))")

    # A restart (same data directory) emits nothing twice; new commands still come.
    with node(CLAWDSPACE_HISTORY_INTERVAL="1") as second:
        async with served_terminal(second, name) as term:
            await term.type(f"echo three-{tag} $((3+3))\n")
            await term.expect(f"three-{tag} 6")
        await wait_for_command(second, name, f"three-{tag}")
        # Truncated: what comes after is read from the top; what was there is not re-emitted.
        code, out = in_container(docker_api, container, ": > /workspace/.bash_history")
        assert code == 0, out
        async with served_terminal(second, name) as term:
            await term.type(f"echo four-{tag} $((4+4))\n")
            await term.expect(f"four-{tag} 8")
        await wait_for_command(second, name, f"four-{tag}")
        commands = [e["meta"]["command"] for e in shell_events(second, name)]
    for word in ("one", "two", "three", "four"):
        assert sum(f"{word}-{tag}" in c for c in commands) == 1, (word, commands)
    audit_text = (second.data_dir / "audit.jsonl").read_text()
    assert TOKEN not in audit_text
    assert not any(e["type"] == "space.exec" for e in audit_file(second)
                   if e.get("space") == name)  # ingestion is no exec of anybody's


async def test_history_symlink_or_fifo_is_not_read(node: StartNode,
                                                   docker_api: docker.APIClient,
                                                   instance: str) -> None:
    tag = secrets.token_hex(4)
    with node(CLAWDSPACE_HISTORY_INTERVAL="1") as served:
        control, hostile = create(served), create(served)
        code, out = in_container(docker_api, f"{instance}{hostile}",
                                 "cd /workspace && rm -f .bash_history && "
                                 "ln -s /etc/passwd .bash_history")
        assert code == 0, out
        for step, plant in enumerate(["", "rm .bash_history && mkfifo .bash_history"]):
            if plant:
                code, out = in_container(docker_api, f"{instance}{hostile}",
                                         f"cd /workspace && {plant}")
                assert code == 0, out
            # Two ticks of the control space prove the hostile one had its turns too.
            for round_ in range(2):
                line = f"echo control-{tag}-{step}-{round_}"
                code, out = in_container(
                    docker_api, f"{instance}{control}",
                    f"printf '#%s\\n%s\\n' \"$(date +%s)\" '{line}' >> /workspace/.bash_history")
                assert code == 0, out
                await wait_for_command(served, control, line)
        assert shell_events(served, hostile) == []
        audit_text = (served.data_dir / "audit.jsonl").read_text()
        assert "root:x:0:0" not in audit_text and "nologin" not in audit_text
        status, _ = served.request("GET", "/api/health")
        assert status == 200


async def test_ingestion_does_not_wake_a_paused_space(node: StartNode,
                                                      docker_api: docker.APIClient,
                                                      instance: str) -> None:
    tag = secrets.token_hex(4)
    with node(CLAWDSPACE_HISTORY_INTERVAL="1") as served:
        control, sleeper = create(served), create(served)
        code, out = in_container(docker_api, f"{instance}{sleeper}",
                                 f"printf '#1700000000\\necho sleeper-{tag}\\n' "
                                 "> /workspace/.bash_history")
        assert code == 0, out
        status, body = served.request("POST", f"/api/spaces/{sleeper}/stop")
        assert status == 200, body
        for round_ in range(3):
            line = f"echo awake-{tag}-{round_}"
            code, out = in_container(
                docker_api, f"{instance}{control}",
                f"printf '#%s\\n%s\\n' \"$(date +%s)\" '{line}' >> /workspace/.bash_history")
            assert code == 0, out
            await wait_for_command(served, control, line)
            assert paused(docker_api, f"{instance}{sleeper}")
        kinds = [e["type"] for e in audit_file(served) if e.get("space") == sleeper]
        assert "space.start" not in kinds, kinds
        # Once resumed (by a client), its history is read as usual.
        status, body = served.request("POST", f"/api/spaces/{sleeper}/start")
        assert status == 200, body
        event = await wait_for_command(served, sleeper, f"sleeper-{tag}")
        assert event["ts"] == clawdspace.epoch_to_iso(1700000000)


async def test_a_line_longer_than_a_tick_does_not_stop_ingestion(
        node: StartNode, docker_api: docker.APIClient, instance: str) -> None:
    """A pasted 300 KB command (more than one tick reads) must not hide every command typed
    after it from the audit."""
    tag = secrets.token_hex(4)
    with node(CLAWDSPACE_HISTORY_INTERVAL="1") as served:
        name = create(served)
        code, out = in_container(
            docker_api, f"{instance}{name}",
            "cd /workspace && { printf '#1700000000\\necho '; "
            "head -c 300000 /dev/zero | tr '\\0' A; "
            f"printf '\\n#1700000001\\necho after-{tag}\\n'; }} > .bash_history")
        assert code == 0, out
        event = await wait_for_command(served, name, f"after-{tag}", timeout=12)
        assert event["ts"] == clawdspace.epoch_to_iso(1700000001)
        assert event["meta"]["command"] == f"echo after-{tag}"


async def test_history_control_characters_are_stripped(node: StartNode,
                                                       docker_api: docker.APIClient,
                                                       instance: str) -> None:
    """Escape sequences typed or planted in the history never reach the audit log (they
    would drive the terminal of whoever reads it)."""
    tag = secrets.token_hex(4)
    with node(CLAWDSPACE_HISTORY_INTERVAL="1") as served:
        name = create(served)
        code, out = in_container(
            docker_api, f"{instance}{name}",
            "printf '#1700000000\\necho \\033[2J\\033]0;owned\\007x\\rdone-"
            f"{tag}\\010\\n' > /workspace/.bash_history")
        assert code == 0, out
        event = await wait_for_command(served, name, f"done-{tag}", timeout=20)
        command = event["meta"]["command"]
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", command), repr(command)
        assert command.startswith("echo ") and f"done-{tag}" in command


# ---------------------------------------------------------------------------------------------
# Auto-sleep and activity
# ---------------------------------------------------------------------------------------------

async def test_idle_space_is_paused(make_client: MakeClient, instance: str,
                                    docker_api: docker.APIClient) -> None:
    """End to end, through the housekeeper's own loop (every 0.5 s with a 2 s idle timeout):
    nothing is paused until the clock has moved past the idle timeout, then the loop pauses
    the space on its own."""
    api = await make_client(prefix=instance, idle_timeout=2, history_interval=0)
    clock = FakeClock().install(api)
    name = await api_create(api)
    container = f"{instance}{name}"
    assert not paused(docker_api, container)

    clock.advance(2)
    await wait_idle_pause(docker_api, container, name, api.audit_lines, "the idle space paused")
    pauses = pause_events(api.audit_lines, name)
    assert len(pauses) == 1 and pauses[0]["meta"] == {"reason": "idle"}, pauses
    assert "keyId" not in pauses[0]
    listed = (await api.get(f"/api/spaces/{name}")).body["space"]
    assert listed["status"] == "paused"  # the GET itself does not wake it...
    assert paused(docker_api, container)
    assert (await api.exec(name, "echo back"))["stdout"] == "back\n"  # ...but use does
    assert not paused(docker_api, container)


IDLE = 600  # the idle timeout of the tests below, in seconds of their fake clocks


async def test_running_exec_keeps_the_space_awake(make_client: MakeClient, rounds: FakeClock,
                                                  instance: str,
                                                  docker_api: docker.APIClient) -> None:
    api = await make_client(prefix=instance, idle_timeout=IDLE, history_interval=0)
    clock = rounds.install(api)
    name = await api_create(api)
    container = f"{instance}{name}"
    # The exec says it runs (/tmp/started), then runs until the test lets it end (/tmp/go).
    exec_task = asyncio.ensure_future(api.exec(
        name, "touch /tmp/started; until [ -e /tmp/go ]; do sleep 0.05; done; echo done",
        timeout=120))

    async def started() -> bool:
        code, _ = await asyncio.to_thread(in_container, docker_api, container,
                                          "test -e /tmp/started")
        return code == 0

    checks = 0
    try:
        await poll(started, 60, 0.05, "the exec under way")
        for _ in range(5):  # two and a half idle timeouts, the exec running all along
            clock.advance(IDLE / 2)
            await idle_round(api)
            assert not exec_task.done()
            assert not paused(docker_api, container), f"paused during the exec ({checks})"
            checks += 1
    finally:
        with contextlib.suppress(docker.errors.APIError):
            if paused(docker_api, container):  # a failed check: let the exec end anyway
                docker_api.unpause(container)
            await asyncio.to_thread(in_container, docker_api, container, "touch /tmp/go")
        result = await exec_task
    assert result["stdout"] == "done\n" and result["exitCode"] == 0, result
    assert checks > 3
    assert pause_events(api.audit_lines, name) == []

    clock.advance(IDLE)
    await idle_round(api)
    assert_idle_paused(docker_api, container, name, api.audit_lines,
                       "paused once the exec ended and time passed")


async def test_open_terminal_keeps_the_space_awake(make_client: MakeClient, rounds: FakeClock,
                                                   instance: str,
                                                   docker_api: docker.APIClient) -> None:
    """The terminal websocket through the in-process test server (the same handler a real
    process serves)."""
    api = await make_client(prefix=instance, idle_timeout=IDLE, history_interval=0)
    clock = rounds.install(api)
    name = await api_create(api)
    container = f"{instance}{name}"
    ws = await api.client.ws_connect(f"/api/spaces/{name}/terminal",
                                     headers={"Authorization": f"Bearer {api.key}"})
    try:
        term = Terminal(ws)
        await term.type("echo open-$((1+1))\n")
        await term.expect("open-2")
        for _ in range(4):  # two idle timeouts with the terminal open and silent
            clock.advance(IDLE / 2)
            await idle_round(api)
            assert not paused(docker_api, container)
    finally:
        await ws.close()

    async def released() -> bool:  # the close audited and the space no longer in use
        closed = any(e.get("space") == name and e["type"] == "terminal.close"
                     for e in api.audit_lines())
        return closed and not api.app[clawdspace.SPACES_KEY].activity.is_busy(name)

    await poll(released, 60, 0.02, "the terminal closed on the server")
    clock.advance(IDLE)
    await idle_round(api)
    assert_idle_paused(docker_api, container, name, api.audit_lines,
                       "paused once the terminal closed")
    assert [e["meta"] for e in pause_events(api.audit_lines, name)] == [{"reason": "idle"}]
    kinds = [e["type"] for e in api.audit_lines() if e.get("space") == name]
    assert kinds.index("terminal.close") < kinds.index("space.pause"), kinds


async def test_touch_resets_the_timer_and_wakes(make_client: MakeClient, rounds: FakeClock,
                                                instance: str,
                                                docker_api: docker.APIClient) -> None:
    api = await make_client(prefix=instance, idle_timeout=IDLE, history_interval=0)
    clock = rounds.install(api)
    name = await api_create(api)
    container = f"{instance}{name}"
    first = (await api.get(f"/api/spaces/{name}")).body["space"]["lastActivity"]
    for _ in range(6):  # three idle timeouts of keepalives, half a timeout apart
        reply = await api.post(f"/api/spaces/{name}/touch")
        assert reply.status == 200, reply.body
        assert reply.body["message"] == "OK"
        clock.advance(IDLE / 2)
        await idle_round(api)
        assert not paused(docker_api, container)
    touched = reply.body["lastActivity"]
    assert touched > first
    assert (await api.get(f"/api/spaces/{name}")).body["space"]["lastActivity"] == touched

    clock.advance(IDLE / 2)  # a whole idle timeout since the last keepalive
    await idle_round(api)
    assert_idle_paused(docker_api, container, name, api.audit_lines,
                       "paused once the keepalives stopped")
    woken = await api.post(f"/api/spaces/{name}/touch")
    assert woken.status == 200, woken.body
    assert not paused(docker_api, container)
    assert container_of(docker_api, instance, name)["State"]["Running"] is True
    events = [(e["type"], e.get("meta")) for e in api.audit_lines() if e.get("space") == name]
    assert events[-2:] == [("space.pause", {"reason": "idle"}),
                           ("space.start", {"reason": "auto"})], events
    for bad, status in ((unique_name("none"), 404), ("Bad.Name", 400)):
        reply = await api.post(f"/api/spaces/{bad}/touch")
        assert reply.status == status, reply.body


async def test_restart_keeps_last_activity(make_client: MakeClient, rounds: FakeClock,
                                           instance: str, docker_api: docker.APIClient) -> None:
    first = await make_client(prefix=instance, idle_timeout=IDLE, history_interval=0)
    clock = rounds.install(first)
    old, fresh, unknown = [await api_create(first) for _ in range(3)]
    await first.client.close()  # saves activity.json on the way out
    activity_path = Path(first.config.data_dir) / "activity.json"
    saved = json.loads(activity_path.read_text())
    assert {old, fresh, unknown} <= set(saved)
    long_ago = clock.now - 1000
    saved[old] = long_ago
    saved[fresh] = clock.now
    del saved[unknown]
    activity_path.write_text(json.dumps(saved))

    second = await make_client(prefix=instance, idle_timeout=30, history_interval=0)
    clock.install(second)
    listed = (await second.get(f"/api/spaces/{old}")).body["space"]
    assert listed["lastActivity"] == clawdspace.epoch_to_iso(long_ago)  # survived the restart

    await idle_round(second)
    assert_idle_paused(docker_api, f"{instance}{old}", old, second.audit_lines,
                       "the space idle since before the restart paused")
    for _ in range(2):  # more rounds, short of the timeout: nothing else goes
        clock.advance(14)
        await idle_round(second)
    assert not paused(docker_api, f"{instance}{fresh}")
    assert not paused(docker_api, f"{instance}{unknown}")  # unknown activity counts as now
    pauses = [e["space"] for e in second.audit_lines() if e["type"] == "space.pause"]
    assert pauses == [old]


async def test_file_traffic_is_activity_but_probes_are_not(make_client: MakeClient,
                                                           rounds: FakeClock, instance: str,
                                                           docker_api: docker.APIClient) -> None:
    api = await make_client(prefix=instance, idle_timeout=IDLE, history_interval=0)
    clock = rounds.install(api)
    name = await api_create(api)
    container = f"{instance}{name}"
    for index in range(6):  # three idle timeouts of file calls, half a timeout apart
        reply = await api.call("PUT", f"/api/spaces/{name}/file", params={"path": "/f"},
                               json={"contentBase64": ""})
        assert reply.status == 200, reply.body
        assert (await api.get(f"/api/spaces/{name}/files")).status == 200
        clock.advance(IDLE / 2)
        await idle_round(api)
        assert not paused(docker_api, container), f"paused during file traffic ({index})"

    # Stats and observability are the service looking, not the user working: probed all
    # along, the space still pauses a whole idle timeout after the last file call.
    async def observe() -> None:
        for what in ("stats", "observability"):
            assert (await api.get(f"/api/spaces/{name}/{what}")).status == 200

    await observe()
    assert not paused(docker_api, container)
    clock.advance(IDLE / 2)
    await idle_round(api)
    assert_idle_paused(docker_api, container, name, api.audit_lines, "paused while only probed")
    await observe()  # probing a paused space does not wake it either
    assert paused(docker_api, container)
    kinds = [e["type"] for e in api.audit_lines() if e.get("space") == name]
    assert "space.start" not in kinds, kinds


async def test_a_slow_upload_is_activity(make_client: MakeClient, rounds: FakeClock,
                                         instance: str, docker_api: docker.APIClient) -> None:
    """A raw upload that streams for several idle timeouts is file traffic all along: the
    space is not paused under it, and the file arrives whole. (The engine holds the
    container's lock during the upload, so the audit, not the engine, tells what happened.)"""
    api = await make_client(prefix=instance, idle_timeout=IDLE, history_interval=0)
    clock = rounds.install(api)
    name = await api_create(api)
    container = f"{instance}{name}"
    chunk, count = b"s" * 4096, 24

    async def writing() -> bool:  # the service is in the upload, reading its body
        return any(e.get("space") == name and e["type"] == "space.file.write"
                   for e in api.audit_lines())

    async def round_under_the_upload() -> None:
        """One round while the upload streams. Not awaited blindly: a pause of the space
        would wait for the upload, which waits for this body; a pause attempt (audited before
        the engine is asked) fails the test instead."""
        round_task = asyncio.ensure_future(idle_round(api))

        async def settled() -> bool:
            return round_task.done() or bool(pause_events(api.audit_lines, name))

        await poll(settled, 60, 0.01, "an auto-sleep round under the upload")
        if not round_task.done():
            round_task.cancel()
        assert pause_events(api.audit_lines, name) == [], "auto-sleep paused under the upload"
        await round_task

    async def slowly() -> AsyncIterator[bytes]:
        for index in range(count):
            yield chunk
            if index == 0:
                await poll(writing, 60, 0.02, "the upload under way")
            clock.advance(IDLE / 8)  # three idle timeouts in all, a round after each chunk
            await round_under_the_upload()

    reply = await api.call("PUT", f"/api/spaces/{name}/file", params={"path": "/slow.bin"},
                           data=slowly(), headers={"Content-Type": "application/octet-stream",
                                                   "Content-Length": str(len(chunk) * count)})
    kinds = [e["type"] for e in api.audit_lines() if e.get("space") == name]
    assert (await api.post(f"/api/spaces/{name}/touch")).status == 200  # awake, to look
    code, out = await asyncio.to_thread(in_container, docker_api, container,
                                        "ls -A /workspace; wc -c < /workspace/slow.bin")
    assert reply.status == 200, (reply.body, kinds, out)
    assert kinds == ["space.create", "space.file.write"], kinds
    assert code == 0 and out.split() == [b"slow.bin", str(len(chunk) * count).encode()], out
