"""The files API against a space that races its own tree: while code in the space swaps a
directory of /workspace with a link to /etc (rename exchange, in a loop), every read, write,
listing, exec working directory and history ingestion reads and writes only what the space's
user could, and nothing lands outside /workspace."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator

import aiohttp
import docker
import pytest
from conftest import Api, SpaceMaker, container_of

ROUNDS = 120
SHADOW_MARK = b"root:"  # /etc/shadow's first line; root-only in the image
RACER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
os.chdir("/workspace")
os.makedirs("d", exist_ok=True)
with open("d/shadow", "w") as f:
    f.write("innocent\n")
with open(".bash_history", "w") as f:
    f.write("echo innocent\n")
with open("h", "w") as f:
    f.write("echo innocent too\n")
for link, target in (("l", "/etc"), ("hl", "/etc/shadow")):
    if not os.path.lexists(link):
        os.symlink(target, link)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
while not os.path.exists("/workspace/stop-racing"):
    for a, b in ((b"d", b"l"), (b".bash_history", b"hl"), (b".bash_history", b"h")):
        if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
            sys.exit(f"renameat2: errno {ctypes.get_errno()}")
"""


def root_sh(docker_api: docker.APIClient, container: str, script: str) -> tuple[int, bytes]:
    exec_id = docker_api.exec_create(container, ["sh", "-c", script], user="0")["Id"]
    out = docker_api.exec_start(exec_id)
    return int(docker_api.exec_inspect(exec_id)["ExitCode"]), out


async def start_in_space(client: Api, space: SpaceMaker, docker_api: docker.APIClient,
                         prefix: str, script: str) -> tuple[str, str]:
    """A new space whose user runs the python ``script`` in the background; (name, exec id)."""
    name = (await space(network="none", memory="256m"))["name"]
    user = container_of(docker_api, prefix, name)["Config"]["User"]
    write = await client.call("PUT", f"/api/spaces/{name}/file", params={"path": "/script.py"},
                              data=script.encode(),
                              headers={"Content-Type": "application/octet-stream"})
    assert write.status == 200, write.body
    exec_id = docker_api.exec_create(f"{prefix}{name}", ["python3", "/workspace/script.py"],
                                     user=user)["Id"]
    docker_api.exec_start(exec_id, detach=True)
    return name, exec_id


@pytest.fixture
async def racing(client: Api, space: SpaceMaker, docker_api: docker.APIClient,
                 prefix: str) -> AsyncIterator[str]:
    """A space whose user runs the racer in the background until the test ends."""
    name, exec_id = await start_in_space(client, space, docker_api, prefix, RACER)
    container = f"{prefix}{name}"
    for _ in range(200):  # the racer made its tree (condition, not a timed wait)
        code, _ = root_sh(docker_api, container, "test -L /workspace/hl -o -L /workspace/l")
        if code == 0:
            break
    else:
        raise AssertionError("the racer did not start")
    yield name
    root_sh(docker_api, container, "touch /workspace/stop-racing")
    assert docker_api.exec_inspect(exec_id)["ExitCode"] in (None, 0), "the racer failed"


def reads(body: object) -> Iterator[bytes]:
    if isinstance(body, dict) and "contentBase64" in body:
        yield base64.b64decode(body["contentBase64"])
    elif isinstance(body, (bytes, str)):
        yield body if isinstance(body, bytes) else body.encode()


async def test_racing_swaps_leak_nothing_and_write_nothing_outside(
        client: Api, racing: str, docker_api: docker.APIClient, prefix: str) -> None:
    name, container = racing, f"{prefix}{racing}"
    seen: dict[str, set[int]] = {"json": set(), "raw": set(), "write": set(), "exec": set(),
                                 "list": set()}
    for index in range(ROUNDS):
        got = await client.get(f"/api/spaces/{name}/file", params={"path": "/d/shadow"})
        seen["json"].add(got.status)
        assert got.status in (200, 400, 403, 404, 409), got.body
        assert all(SHADOW_MARK not in data for data in reads(got.body)), got.body
        async with client.client.get(f"/api/spaces/{name}/file",
                                     params={"path": "/d/shadow", "raw": "true"},
                                     headers={"Authorization": f"Bearer {client.key}"}) as raw:
            body = await raw.read()
            seen["raw"].add(raw.status)
            assert SHADOW_MARK not in body, body
        put = await client.call("PUT", f"/api/spaces/{name}/file",
                                params={"path": f"/d/clawdspace-race-{index}"}, data=b"x",
                                headers={"Content-Type": "application/octet-stream"})
        seen["write"].add(put.status)
        assert put.status in (200, 400, 403, 404, 409), put.body
        ran = await client.post(f"/api/spaces/{name}/exec",
                                {"command": "pwd -P; cat shadow", "workdir": "/workspace/d"})
        seen["exec"].add(ran.status)
        assert ran.status in (200, 400), ran.body
        if ran.status == 200:
            # The directory it entered (renamed to l since, perhaps), never /etc.
            assert ran.body["stdout"].split("\n")[0] in ("/workspace/d", "/workspace/l"), \
                ran.body
            assert SHADOW_MARK.decode() not in ran.body["stdout"], ran.body
        else:
            assert ran.body["code"] == "invalid_workdir", ran.body
        removed = await client.delete(f"/api/spaces/{name}/file",
                                      params={"path": "/d/hostname"})
        # /d has none; /etc has one, which must stay (checked at the end)
        assert removed.status in (200, 400, 403, 404, 409), removed.body
        listed = await client.get(f"/api/spaces/{name}/files", params={"path": "/d"})
        seen["list"].add(listed.status)
        if listed.status == 200:
            names = {e["name"] for e in listed.body["entries"]}
            assert names <= {"shadow"} | {f"clawdspace-race-{i}" for i in range(ROUNDS)}, names
    # Nothing was written outside /workspace, whatever the race did.
    code, out = root_sh(docker_api, container, "ls -a /etc | grep clawdspace || true")
    assert code == 0 and out.strip() == b"", out
    assert root_sh(docker_api, container, "test -f /etc/hostname")[0] == 0
    # The race really happened: each call saw both sides of it at least once.
    assert 200 in seen["json"] and 200 in seen["write"] and 200 in seen["exec"], seen
    assert {403, 404, 400, 409} & (seen["json"] | seen["write"]), seen


async def test_history_ingestion_reads_nothing_the_user_cannot(
        client: Api, racing: str) -> None:
    from clawdspace import HOUSEKEEPER_KEY

    housekeeper = client.app[HOUSEKEEPER_KEY]
    for _ in range(ROUNDS // 2):
        housekeeper.cursors.pop(racing, None)  # read from the start each time
        await housekeeper.ingest_history()
    shell_log = client.audit_path.with_name("shell.jsonl")
    shells = [e for e in map(json.loads, shell_log.read_text().splitlines())
              if e.get("space") == racing and e["type"] == "space.shell"]
    assert shells, "history was never ingested"
    assert all("root:" not in e["meta"]["command"] for e in shells), shells


SHRINKER = r"""
import os
big = b"y" * (1 << 20)
while not os.path.exists("/workspace/stop-shrinking"):
    with open("/workspace/shrinking", "r+b") as f:
        f.truncate(0)
        f.write(big)
"""


async def test_a_file_that_shrinks_while_read_is_409_or_a_cut_connection_never_short(
        client: Api, space: SpaceMaker, docker_api: docker.APIClient, prefix: str) -> None:
    shrinker = 'open("/workspace/shrinking", "w").close()\n' + SHRINKER
    name, _ = await start_in_space(client, space, docker_api, prefix, shrinker)
    container = f"{prefix}{name}"
    for _ in range(200):  # the shrinker made its file (condition, not a timed wait)
        if root_sh(docker_api, container, "test -e /workspace/shrinking")[0] == 0:
            break
    outcomes: dict[str, int] = {}
    try:
        for _ in range(ROUNDS):
            got = await client.get(f"/api/spaces/{name}/file",
                                   params={"path": "/shrinking", "maxBytes": str(2 << 20)})
            assert got.status in (200, 409), got.body
            if got.status == 200:
                data = base64.b64decode(got.body["contentBase64"])
                assert len(data) == got.body["size"], (len(data), got.body["size"])
            outcomes[f"json {got.status}"] = outcomes.get(f"json {got.status}", 0) + 1
            try:
                async with client.client.get(
                        f"/api/spaces/{name}/file", params={"path": "/shrinking", "raw": "true"},
                        headers={"Authorization": f"Bearer {client.key}"}) as raw:
                    body = await raw.read()
                    assert raw.status == 200
                    assert len(body) == int(raw.headers["Content-Length"])
                    outcomes["raw whole"] = outcomes.get("raw whole", 0) + 1
            except aiohttp.ClientPayloadError:
                outcomes["raw cut"] = outcomes.get("raw cut", 0) + 1  # told, not fooled
    finally:
        root_sh(docker_api, container, "touch /workspace/stop-shrinking")
    assert outcomes.get("json 200") and outcomes.get("raw whole"), outcomes


FIFO_RACER = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
os.chdir("/workspace")
with open("target", "w") as f:
    f.write("a regular file\n")
os.mkfifo("pipe")
while not os.path.exists("/workspace/stop-swapping"):
    libc.renameat2(-100, b"target", -100, b"pipe", 2)  # RENAME_EXCHANGE
"""


async def test_a_fifo_swapped_in_cannot_hang_reads(
        client: Api, space: SpaceMaker, docker_api: docker.APIClient, prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import clawdspace

    monkeypatch.setattr(clawdspace, "FILE_OPEN_TIMEOUT", 2)
    name, _ = await start_in_space(client, space, docker_api, prefix, FIFO_RACER)
    container = f"{prefix}{name}"
    seen: set[int] = set()
    try:
        for _ in range(40):
            got = await client.get(f"/api/spaces/{name}/file", params={"path": "/target"})
            assert got.status in (200, 400, 404, 409), got.body
            seen.add(got.status)
    finally:
        root_sh(docker_api, container, "touch /workspace/stop-swapping")

    def readers_left() -> bytes:
        return root_sh(docker_api, container, "pgrep -f /workspace/[t]arget || true")[1].strip()

    for _ in range(300):  # condition, bounded: no reader is left behind
        if not readers_left():
            break
        await asyncio.sleep(0.1)
    assert not readers_left()
    assert 200 in seen, seen
