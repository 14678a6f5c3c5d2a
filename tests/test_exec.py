"""Exec through HTTP: shell and argv forms, limits, timeouts, and concurrency."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import docker
import pytest
from conftest import (
    Api,
    MakeClient,
    SpaceMaker,
    container_of,
    in_container,
    leak_watch,
    poll,
    unique_name,
)

SPLIT_UTF8 = (
    "import sys, time\n"
    "b = 'é'.encode()\n"
    "for _ in range(5):\n"
    "    sys.stdout.buffer.write(b[:1]); sys.stdout.flush(); time.sleep(0.01)\n"
    "    sys.stdout.buffer.write(b[1:]); sys.stdout.flush()\n"
)


def processes(docker_api: docker.APIClient, container: str) -> list[str]:
    """Command lines of every process in a container (from the host's view)."""
    top = docker_api.top(container, ps_args="-eo pid,args")
    column = top["Titles"].index("COMMAND")
    return [row[column] for row in top["Processes"] or []]


async def test_string_command_runs_in_a_shell(client: Api, shared_space: str) -> None:
    result = await client.exec(shared_space, "echo out; echo err >&2; exit 3")
    assert result["stdout"] == "out\n"
    assert result["stderr"] == "err\n"
    assert result["exitCode"] == 3
    assert result["timedOut"] is False
    assert result["stdoutTruncated"] is False and result["stderrTruncated"] is False
    assert isinstance(result["durationMs"], int) and result["durationMs"] >= 0


async def test_argv_command_has_no_shell(client: Api, shared_space: str) -> None:
    result = await client.exec(shared_space, ["echo", "$HOME", "a b", ";", "*"])
    assert result["stdout"] == "$HOME a b ; *\n"
    assert result["exitCode"] == 0
    missing = await client.exec(shared_space, ["/no/such/program"])
    assert missing["exitCode"] != 0


async def test_env_is_passed_and_validated(client: Api, shared_space: str) -> None:
    result = await client.exec(shared_space, ["sh", "-c", 'printf %s "$GREETING:$_X1"'],
                               env={"GREETING": "hello world", "_X1": "ünï"})
    assert result["stdout"] == "hello world:ünï"
    for env in ({"1BAD": "x"}, {"A-B": "x"}, {"": "x"}, {"OK": 5}, {"OK": "a\x00b"}, ["A=1"],
                None):
        reply = await client.post(f"/api/spaces/{shared_space}/exec",
                                  {"command": "true", "env": env})
        assert reply.status == 400, (env, reply.body)
        assert reply.error_code() == "invalid_env"


@pytest.mark.parametrize(("workdir", "expected"), [
    ("sub/dir", "/workspace/sub/dir"),
    ("/workspace/sub", "/workspace/sub"),
    ("/workspace", "/workspace"),
    ("sub/../sub/dir", "/workspace/sub/dir"),
])
async def test_workdir_inside_workspace(client: Api, shared_space: str, workdir: str,
                                        expected: str) -> None:
    await client.exec(shared_space, "mkdir -p /workspace/sub/dir")
    result = await client.exec(shared_space, "pwd", workdir=workdir)
    assert result["stdout"] == f"{expected}\n", result


@pytest.mark.parametrize("workdir", [
    "/etc", "../etc", "/workspace/../etc", "/", "..", "/workspace2", "", 5, "/proc/self/cwd"])
async def test_workdir_outside_workspace_is_400(client: Api, shared_space: str,
                                                workdir: Any) -> None:
    reply = await client.post(f"/api/spaces/{shared_space}/exec",
                              {"command": "pwd", "workdir": workdir})
    assert reply.status == 400, reply.body
    assert reply.error_code() == "invalid_workdir"


@pytest.mark.parametrize("body", [
    {"command": ""}, {"command": "   "}, {}, {"command": None}, {"command": []},
    {"command": [""]}, {"command": [1, 2]}, {"command": 5}, {"command": {"a": 1}},
    {"command": "echo a\x00b"},
], ids=["empty", "blank", "missing", "null", "empty-list", "empty-argv0", "ints", "int",
        "object", "nul"])
async def test_bad_command_is_400(client: Api, shared_space: str, body: dict[str, Any]) -> None:
    reply = await client.post(f"/api/spaces/{shared_space}/exec", body)
    assert reply.status == 400, reply.body
    assert reply.error_code() == "invalid_command"


@pytest.mark.parametrize("body", [
    {"command": "true", "timeout": 0}, {"command": "true", "timeout": -1},
    {"command": "true", "timeout": "5"}, {"command": "true", "timeout": True},
    {"command": "true", "timeout": 10**9}, {"command": "true", "user": "root"},
    {"command": "true", "timeout": None},
])
async def test_bad_exec_fields_are_400(client: Api, shared_space: str,
                                       body: dict[str, Any]) -> None:
    reply = await client.post(f"/api/spaces/{shared_space}/exec", body)
    assert reply.status == 400, reply.body
    assert reply.error_code() in ("invalid_timeout", "unknown_field")


async def test_exec_on_missing_or_invalid_space(client: Api) -> None:
    missing = await client.post(f"/api/spaces/{unique_name('none')}/exec", {"command": "true"})
    assert missing.status == 404 and missing.error_code() == "not_found"
    invalid = await client.post("/api/spaces/Bad.Name/exec", {"command": "true"})
    assert invalid.status == 400 and invalid.error_code() == "invalid_name"


async def test_timeout_kills_the_whole_process_tree(client: Api, shared_space: str,
                                                    docker_api: docker.APIClient,
                                                    prefix: str) -> None:
    result = await asyncio.wait_for(
        client.exec(shared_space, "sleep 30 & sleep 60; echo never", timeout=1), 30)
    assert result["timedOut"] is True
    assert result["exitCode"] == 137
    assert "never" not in result["stdout"]
    leftovers = [p for p in processes(docker_api, f"{prefix}{shared_space}")
                 if p.startswith(("sleep 30", "sleep 60"))]
    assert leftovers == []
    ps = await client.exec(shared_space, ["ps", "-eo", "args"])
    assert "sleep 30" not in ps["stdout"] and "sleep 60" not in ps["stdout"], ps["stdout"]


async def test_output_is_capped(make_client: MakeClient, shared_space: str) -> None:
    api = await make_client(exec_output_limit=4096)
    result = await api.exec(shared_space, "head -c 100000 /dev/zero | tr '\\0' a; "
                                          "head -c 5000 /dev/zero | tr '\\0' b >&2")
    assert result["exitCode"] == 0
    assert result["stdout"] == "a" * 4096
    assert result["stdoutTruncated"] is True
    assert result["stderr"] == "b" * 4096
    assert result["stderrTruncated"] is True
    small = await api.exec(shared_space, "head -c 4096 /dev/zero | tr '\\0' c")
    assert small["stdout"] == "c" * 4096 and small["stdoutTruncated"] is False


async def test_utf8_split_across_frames_survives(client: Api, shared_space: str) -> None:
    result = await client.exec(shared_space, ["python3", "-c", SPLIT_UTF8])
    assert result["exitCode"] == 0, result
    assert result["stdout"] == "ééééé"


async def test_cap_never_splits_a_character(make_client: MakeClient, shared_space: str) -> None:
    api = await make_client(exec_output_limit=4096)
    result = await api.exec(shared_space, ["python3", "-c", "print('a' + 'é' * 5000)"])
    assert result["stdoutTruncated"] is True
    assert result["stdout"] == "a" + "é" * 2047  # 4096 bytes: 'a' + 2047.5 two-byte chars
    assert "\ufffd" not in result["stdout"]


async def test_exec_resumes_a_paused_space(client: Api, space: SpaceMaker,
                                           docker_api: docker.APIClient, prefix: str) -> None:
    name = (await space())["name"]
    assert (await client.post(f"/api/spaces/{name}/stop")).status == 200
    assert container_of(docker_api, prefix, name)["State"]["Paused"] is True
    result = await client.exec(name, "echo awake")
    assert result["stdout"] == "awake\n"
    state = container_of(docker_api, prefix, name)["State"]
    assert state["Running"] is True and state["Paused"] is False
    events = [(e["type"], e.get("meta")) for e in client.audit_lines() if e.get("space") == name]
    assert ("space.start", {"reason": "auto"}) in events
    assert [t for t, _ in events] == ["space.create", "space.pause", "space.start", "space.exec"]


async def test_exec_on_stopped_space_is_409(client: Api, space: SpaceMaker,
                                            docker_api: docker.APIClient, prefix: str) -> None:
    name = (await space())["name"]
    docker_api.stop(f"{prefix}{name}", timeout=1)
    reply = await client.post(f"/api/spaces/{name}/exec", {"command": "true"})
    assert reply.status == 409, reply.body
    assert reply.error_code() == "space_stopped"
    assert container_of(docker_api, prefix, name)["State"]["Running"] is False


async def test_fifty_concurrent_execs_do_not_stall_the_service(
        client: Api, shared_space: str, docker_api: docker.APIClient, prefix: str) -> None:
    """All 50 run at once (none waits for a free reader thread), and health and listing answer
    while they run. Order, not duration: each exec marks that it started, then waits for a
    release file that the test writes only after all 50 are up and both requests answered."""
    container = f"{prefix}{shared_space}"
    gate = f"/workspace/.cst-fifty-{secrets.token_hex(4)}"
    in_container(docker_api, container, f"mkdir -p {gate}")
    execs = [asyncio.ensure_future(client.exec(
        shared_space, f"touch {gate}/up.{i}; "
                      f"while [ ! -e {gate}/go ]; do sleep 0.2; done; echo {i}"))
             for i in range(50)]

    async def all_up() -> bool:
        assert not any(task.done() for task in execs), "an exec ended before the release"
        code, out = await asyncio.to_thread(in_container, docker_api, container,
                                            f"ls {gate} | grep -c '^up\\.'")
        return code == 0 and int(out.split()[0]) == 50

    try:
        await poll(all_up, timeout=120, what="all 50 execs running at once")
        health, listing = await asyncio.gather(client.get("/api/health", key=None),
                                               client.get("/api/spaces"))
        finished_first = sum(task.done() for task in execs)
    except BaseException:
        for task in execs:
            task.cancel()
        await asyncio.gather(*execs, return_exceptions=True)
        raise
    finally:
        in_container(docker_api, container, f"touch {gate}/go")
    assert health.status == 200 and health.body["docker"]["ok"] is True
    assert listing.status == 200
    assert shared_space in {s["name"] for s in listing.body["spaces"]}
    assert finished_first == 0  # both answered while every exec was still running
    results = await asyncio.gather(*execs)
    in_container(docker_api, container, f"rm -rf {gate}")
    assert [r["stdout"] for r in results] == [f"{i}\n" for i in range(50)]
    assert all(r["exitCode"] == 0 and not r["timedOut"] for r in results)


async def test_exec_releases_its_docker_connection(client: Api, shared_space: str) -> None:
    """Exec must close the engine's hijacked HTTP connection itself, not leave it to the
    garbage collector (which warns: ResourceWarning, and an error in urllib3's close)."""
    with leak_watch() as leaks:
        for _ in range(3):
            await client.exec(shared_space, "true")
    assert leaks.resource_warnings == []
    assert leaks.unraisable == []
