"""Spaces through HTTP, checked against what the Docker engine really holds."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from conftest import (
    TEST_IMAGE,
    Api,
    MakeClient,
    SpaceMaker,
    container_exists,
    container_of,
    docker_names,
    fake_nvidia_smi,
    unique_name,
    volume_exists,
)

import clawdspace

# Docker's default capabilities minus NET_RAW, MKNOD, AUDIT_WRITE and SYS_CHROOT.
ALLOWED_CAPS = {"CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE",
                "SETFCAP", "SETGID", "SETPCAP", "SETUID"}
SPACE_FIELDS = {"name", "id", "status", "created", "createdBy", "started", "image", "memory",
                "cpus", "gpu", "gpus", "template", "network", "writableRootfs", "sudo",
                "idleTimeout", "user", "lastActivity", "volume"}


def iso(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


@pytest.fixture
def foreign_container(docker_api: docker.APIClient, prefix: str) -> Iterator[str]:
    """A container named like a space of this instance but not made by clawdspace."""
    name = unique_name("foreign")
    docker_api.create_container(TEST_IMAGE, ["sleep", "60"], name=f"{prefix}{name}")
    yield name
    docker_api.remove_container(f"{prefix}{name}", force=True)


async def test_create_shape_and_hardening(make_client: MakeClient, space: SpaceMaker,
                                          docker_api: docker.APIClient, prefix: str) -> None:
    api = await make_client(pids_limit=333)
    name = unique_name("hard")
    body = await space(name, api=api, memory="256m", cpus=0.5)
    info = container_of(docker_api, prefix, name)
    assert set(body) == SPACE_FIELDS
    assert body["name"] == name
    assert body["id"] == info["Id"][:12]
    assert body["status"] == "running"
    assert iso(body["created"]) <= iso(body["started"])
    assert body["createdBy"] == clawdspace.key_id(api.key)  # the key's id, never the key
    assert iso(body["lastActivity"]) >= iso(body["created"])
    assert body["image"] == TEST_IMAGE
    assert body["memory"] == 256 << 20
    assert body["cpus"] == 0.5
    assert body["gpu"] is False
    assert body["template"] == "default"  # the template a create gets when it names none
    assert body["gpus"] == []
    assert body["writableRootfs"] is True and body["idleTimeout"] is None
    assert body["network"] == "internet"
    assert body["user"] == "sandbox"
    assert body["volume"] == {"name": f"{prefix}vol-{name}", "mountpoint": "/workspace"}

    host = info["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert {cap.removeprefix("CAP_") for cap in host["CapAdd"] or []} <= ALLOWED_CAPS
    assert any(opt.startswith("no-new-privileges") for opt in host["SecurityOpt"] or [])
    assert host["PidsLimit"] == 333
    assert host["Memory"] == host["MemorySwap"] == 256 << 20
    assert host["NanoCpus"] == 500_000_000
    assert host["Init"] is True
    assert host["Privileged"] is False
    assert not host["Binds"]
    assert not host["Devices"]
    assert not host["DeviceRequests"]
    assert host["PidMode"] in ("", "private") and host["IpcMode"] != "host"
    assert host["NetworkMode"] not in ("host", "none")
    assert [(m["Type"], m["Name"], m["Destination"], m["RW"]) for m in info["Mounts"]] == [
        ("volume", f"{prefix}vol-{name}", "/workspace", True)]
    labels = info["Config"]["Labels"]
    assert labels["clawdspace.instance"] == prefix
    assert labels["clawdspace.space"] == name
    volume = docker_api.inspect_volume(f"{prefix}vol-{name}")
    assert volume["Labels"]["clawdspace.instance"] == prefix
    assert volume["Labels"]["clawdspace.space"] == name

    # What the process inside sees: the image's non-root user, no capabilities, no new privs.
    result = await api.exec(name, "id -un; touch /workspace/probe && stat -c %U /workspace/probe;"
                                  " grep -E '^(CapEff|NoNewPrivs)' /proc/self/status")
    assert result["exitCode"] == 0, result
    lines = result["stdout"].split()
    assert lines[:2] == ["sandbox", "sandbox"], result
    assert "0000000000000000" in lines and lines[-1] == "1", result


BAD_CREATES: list[tuple[str, dict[str, Any], str]] = [
    ("name-129", {"name": "a" * 129}, "invalid_name"),
    ("name-dot", {"name": "a.b"}, "invalid_name"),
    ("name-space", {"name": "a b"}, "invalid_name"),
    ("name-unicode", {"name": "caf\u00e9"}, "invalid_name"),
    ("name-empty", {"name": ""}, "invalid_name"),
    ("name-int", {"name": 5}, "invalid_name"),
    ("name-null", {"name": None}, "invalid_name"),
    ("name-list", {"name": ["a"]}, "invalid_name"),
    ("name-slash", {"name": "a/b"}, "invalid_name"),
    ("name-missing", {}, "invalid_name"),
    ("memory-lots", {"memory": "lots"}, "invalid_memory"),
    ("memory-2x", {"memory": "2x"}, "invalid_memory"),
    ("memory-empty", {"memory": ""}, "invalid_memory"),
    ("memory-negative", {"memory": -1}, "invalid_memory"),
    ("memory-bool", {"memory": True}, "invalid_memory"),
    ("memory-one-byte", {"memory": 1}, "invalid_memory"),
    ("memory-15m", {"memory": "15m"}, "invalid_memory"),
    ("memory-huge", {"memory": "99999t"}, "invalid_memory"),
    ("memory-float", {"memory": 1.5e9}, "invalid_memory"),
    ("memory-null", {"memory": None}, "invalid_memory"),
    ("cpus-zero", {"cpus": 0}, "invalid_cpus"),
    ("cpus-negative", {"cpus": -1}, "invalid_cpus"),
    ("cpus-word", {"cpus": "two"}, "invalid_cpus"),
    ("cpus-1000", {"cpus": 1000}, "invalid_cpus"),
    ("cpus-bool", {"cpus": True}, "invalid_cpus"),
    ("gpu-yes", {"gpu": "yes"}, "invalid_gpu"),
    ("gpu-one", {"gpu": 1}, "invalid_gpu"),
    ("image-missing", {"image": "cst-never-built:nope"}, "image_not_found"),
    ("image-bad-ref", {"image": "bad image!"}, "invalid_image"),
    ("unknown-privileged", {"privileged": True}, "unknown_field"),
    ("unknown-hostconfig", {"HostConfig": {"Binds": ["/:/host"]}}, "unknown_field"),
    ("template-unknown", {"template": "nope"}, "unknown_template"),
    ("template-int", {"template": 5}, "invalid_template"),
]


@pytest.mark.parametrize(("fields", "code"), [c[1:] for c in BAD_CREATES],
                         ids=[c[0] for c in BAD_CREATES])
async def test_bad_create_is_400_and_leaves_nothing(client: Api, docker_api: docker.APIClient,
                                                    prefix: str, fields: dict[str, Any],
                                                    code: str) -> None:
    before = docker_names(docker_api, prefix)
    body = {"name": unique_name("bad"), **fields}
    if "name" in fields or not fields:
        body = fields
    reply = await client.post("/api/spaces", body)
    assert reply.status == 400, reply.body
    assert reply.error_code() == code
    if code == "image_not_found":
        assert "cst-never-built:nope" in reply.body["error"]
    assert docker_names(docker_api, prefix) == before
    assert client.audit_lines() == []


async def test_gpu_on_cpu_node_is_409_and_leaves_nothing(client: Api,
                                                        docker_api: docker.APIClient,
                                                        prefix: str) -> None:
    before = docker_names(docker_api, prefix)
    reply = await client.post("/api/spaces", {"name": unique_name("bad"), "gpu": True})
    assert reply.status == 409, reply.body
    assert reply.error_code() == "no_gpu"
    assert docker_names(docker_api, prefix) == before
    assert client.audit_lines() == []


async def test_memory_t_suffix_is_parsed(client: Api) -> None:
    small = await client.post("/api/spaces", {"name": unique_name(), "memory": "0t"})
    assert small.status == 400 and "at least" in small.body["error"], small.body
    large = await client.post("/api/spaces", {"name": unique_name(), "memory": "1t"})
    host = clawdspace.host_memory_bytes()
    assert 0 < host < 1 << 40
    assert large.status == 400 and "more than this node has" in large.body["error"], large.body


@pytest.mark.parametrize(("memory", "expected"), [
    ("65536k", 64 << 20), ("48m", 48 << 20), ("1G", 1 << 30), (33554432, 32 << 20),
    ("40000000", 40000000),
], ids=["k", "m", "g", "int-bytes", "string-bytes"])
async def test_memory_sizes(space: SpaceMaker, docker_api: docker.APIClient, prefix: str,
                            memory: Any, expected: int) -> None:
    name = unique_name("mem")
    body = await space(name, memory=memory)
    assert body["memory"] == expected
    host = container_of(docker_api, prefix, name)["HostConfig"]
    assert host["Memory"] == host["MemorySwap"] == expected


async def test_failed_engine_create_leaves_nothing(make_client: MakeClient, tmp_path: Path,
                                                   docker_api: docker.APIClient, prefix: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that claims a GPU on an engine without the NVIDIA runtime: the engine refuses at
    start, after the volume and the container exist; both must be rolled back."""
    rows = ["0, GPU-aaaa, NVIDIA H100 80GB HBM3, 81559, 0, 0"]
    api = await make_client(nvidia_smi=fake_nvidia_smi(tmp_path / "gpu", rows))
    toolkit = tmp_path / "toolkit"  # an nvidia-ctk on PATH: the service believes in a runtime
    toolkit.mkdir()
    (toolkit / "nvidia-ctk").write_text("#!/bin/sh\nexit 0\n")
    (toolkit / "nvidia-ctk").chmod(0o755)
    monkeypatch.setenv("PATH", f"{toolkit}:{os.environ['PATH']}")
    before = docker_names(docker_api, prefix)
    name = unique_name("gpu")
    body = {"name": name, "gpu": True, "image": TEST_IMAGE}
    reply = await api.post("/api/spaces", body)
    assert reply.status == 503, reply.body
    assert reply.error_code() == "no_gpu_runtime"
    assert docker_names(docker_api, prefix) == before
    retry = await api.post("/api/spaces", body)
    assert retry.status == 503 and retry.error_code() == "no_gpu_runtime", retry.body


async def test_duplicate_name_is_409(client: Api, space: SpaceMaker,
                                     docker_api: docker.APIClient, prefix: str) -> None:
    first = await space(memory="64m")
    reply = await client.post("/api/spaces", {"name": first["name"], "memory": "128m"})
    assert reply.status == 409, reply.body
    assert reply.error_code() == "space_exists"
    info = container_of(docker_api, prefix, first["name"])
    assert info["Id"].startswith(first["id"]) and info["State"]["Running"]
    assert info["HostConfig"]["Memory"] == 64 << 20
    assert volume_exists(docker_api, f"{prefix}vol-{first['name']}")


async def test_concurrent_creates_of_one_name(client: Api, space: SpaceMaker,
                                              docker_api: docker.APIClient, prefix: str) -> None:
    name = unique_name("race")
    space.adopt(name)
    replies = await asyncio.gather(*(client.post("/api/spaces", {"name": name})
                                     for _ in range(8)))
    statuses = sorted(r.status for r in replies)
    assert statuses == [201] + [409] * 7, [(r.status, r.body) for r in replies]
    containers, volumes = docker_names(docker_api, prefix)
    assert [c for c in containers if c == f"{prefix}{name}"] == [f"{prefix}{name}"]
    assert f"{prefix}vol-{name}" in volumes
    assert container_of(docker_api, prefix, name)["State"]["Running"]
    result = await client.exec(name, "echo ok > /workspace/f && cat /workspace/f")
    assert result["stdout"] == "ok\n"


async def test_get_space(client: Api, space: SpaceMaker, foreign_container: str) -> None:
    created = await space()
    reply = await client.get(f"/api/spaces/{created['name']}")
    assert reply.status == 200, reply.body
    assert reply.body["space"]["id"] == created["id"]
    assert reply.body["space"]["status"] == "running"
    missing = await client.get(f"/api/spaces/{unique_name('none')}")
    assert missing.status == 404 and missing.error_code() == "not_found"
    invalid = await client.get("/api/spaces/Bad.Name")
    assert invalid.status == 400 and invalid.error_code() == "invalid_name"
    foreign = await client.get(f"/api/spaces/{foreign_container}")
    assert foreign.status == 404 and foreign.error_code() == "not_found"


async def test_list_spaces(client: Api, space: SpaceMaker, foreign_container: str) -> None:
    running = await space()
    paused = await space()
    assert (await client.post(f"/api/spaces/{paused['name']}/stop")).status == 200
    reply = await client.get("/api/spaces")
    assert reply.status == 200, reply.body
    listed = {s["name"]: s for s in reply.body["spaces"]}
    assert listed[running["name"]]["status"] == "running"
    assert listed[paused["name"]]["status"] == "paused"
    assert foreign_container not in listed
    for entry in listed.values():
        assert set(entry) == SPACE_FIELDS
    assert listed[running["name"]]["id"] == running["id"]
    assert listed[running["name"]]["memory"] == running["memory"]


async def test_pause_and_resume(client: Api, space: SpaceMaker, docker_api: docker.APIClient,
                                prefix: str) -> None:
    name = (await space())["name"]
    stop = await client.post(f"/api/spaces/{name}/stop")
    assert stop.status == 200, stop.body
    assert container_of(docker_api, prefix, name)["State"]["Paused"] is True
    assert (await client.get(f"/api/spaces/{name}")).body["space"]["status"] == "paused"
    again = await client.post(f"/api/spaces/{name}/stop")
    assert again.status == 200, again.body
    start = await client.post(f"/api/spaces/{name}/start")
    assert start.status == 200, start.body
    state = container_of(docker_api, prefix, name)["State"]
    assert state["Running"] is True and state["Paused"] is False
    assert (await client.get(f"/api/spaces/{name}")).body["space"]["status"] == "running"
    assert (await client.post(f"/api/spaces/{name}/start")).status == 200


async def test_start_brings_back_a_container_stopped_behind_our_back(
        client: Api, space: SpaceMaker, docker_api: docker.APIClient, prefix: str) -> None:
    name = (await space())["name"]
    docker_api.stop(f"{prefix}{name}", timeout=1)
    assert (await client.get(f"/api/spaces/{name}")).body["space"]["status"] == "stopped"
    pause = await client.post(f"/api/spaces/{name}/stop")
    assert pause.status == 409 and pause.error_code() == "space_stopped", pause.body
    start = await client.post(f"/api/spaces/{name}/start")
    assert start.status == 200, start.body
    assert container_of(docker_api, prefix, name)["State"]["Running"] is True
    assert (await client.exec(name, "echo back"))["stdout"] == "back\n"


@pytest.mark.parametrize("action", ["stop", "start"])
async def test_lifecycle_on_missing_or_invalid_space(client: Api, action: str) -> None:
    missing = await client.post(f"/api/spaces/{unique_name('none')}/{action}")
    assert missing.status == 404 and missing.error_code() == "not_found", missing.body
    invalid = await client.post(f"/api/spaces/Bad.Name/{action}")
    assert invalid.status == 400 and invalid.error_code() == "invalid_name", invalid.body


async def test_delete_keeps_or_removes_the_volume(client: Api, space: SpaceMaker,
                                                  docker_api: docker.APIClient,
                                                  prefix: str) -> None:
    name = (await space())["name"]
    volume = f"{prefix}vol-{name}"
    await client.exec(name, "echo kept > /workspace/data.txt")
    maybe = await client.delete(f"/api/spaces/{name}", params={"removeVolume": "maybe"})
    assert maybe.status == 400 and maybe.error_code() == "invalid_removeVolume", maybe.body
    assert container_exists(docker_api, f"{prefix}{name}")

    keep = await client.delete(f"/api/spaces/{name}")
    assert keep.status == 200, keep.body
    assert not container_exists(docker_api, f"{prefix}{name}")
    assert volume_exists(docker_api, volume)
    assert (await client.get(f"/api/spaces/{name}")).status == 404

    await space(name)
    assert (await client.exec(name, "cat /workspace/data.txt"))["stdout"] == "kept\n"

    gone = await client.delete(f"/api/spaces/{name}", params={"removeVolume": "true"})
    assert gone.status == 200, gone.body
    assert not container_exists(docker_api, f"{prefix}{name}")
    assert not volume_exists(docker_api, volume)
    again = await client.delete(f"/api/spaces/{name}")
    assert again.status == 404 and again.error_code() == "not_found", again.body


async def test_delete_missing_or_invalid(client: Api) -> None:
    missing = await client.delete(f"/api/spaces/{unique_name('none')}")
    assert missing.status == 404 and missing.error_code() == "not_found"
    missing = await client.delete(f"/api/spaces/{unique_name('none')}",
                                  params={"removeVolume": "true"})
    assert missing.status == 404 and missing.error_code() == "not_found"
    invalid = await client.delete("/api/spaces/Bad.Name")
    assert invalid.status == 400 and invalid.error_code() == "invalid_name"


async def test_foreign_volume_is_409_and_untouched(client: Api, docker_api: docker.APIClient,
                                                   prefix: str) -> None:
    name = unique_name("vol")
    volume = f"{prefix}vol-{name}"
    docker_api.create_volume(volume)
    try:
        reply = await client.post("/api/spaces", {"name": name})
        assert reply.status == 409, reply.body
        assert reply.error_code() == "volume_conflict"
        assert not container_exists(docker_api, f"{prefix}{name}")
        assert docker_api.inspect_volume(volume)["Labels"] in (None, {})
        destroy = await client.delete(f"/api/spaces/{name}", params={"removeVolume": "true"})
        assert destroy.status == 404, destroy.body
        assert volume_exists(docker_api, volume)
    finally:
        docker_api.remove_volume(volume)


async def test_spaces_survive_a_service_restart(make_client: MakeClient, space: SpaceMaker,
                                                docker_api: docker.APIClient) -> None:
    first = await make_client()
    name = (await space(api=first))["name"]
    await first.exec(name, "echo before > /workspace/state")
    assert (await first.post(f"/api/spaces/{name}/stop")).status == 200
    await first.client.close()

    second = await make_client()
    listed = {s["name"]: s for s in (await second.get("/api/spaces")).body["spaces"]}
    assert listed[name]["status"] == "paused"
    assert (await second.exec(name, "cat /workspace/state"))["stdout"] == "before\n"
    assert (await second.get(f"/api/spaces/{name}")).body["space"]["status"] == "running"
    assert container_of(docker_api, second.config.prefix, name)["State"]["Running"] is True


async def test_answers_are_compact_json_with_whole_cpu_counts(client: Api,
                                                              space: SpaceMaker) -> None:
    """The earlier server's CLI greps its answers (``"gpu":false``, ``"cpus":1``)."""
    name = (await space(memory="64m", cpus=1, network="none"))["name"]
    headers = {"Authorization": f"Bearer {client.key}"}
    async with client.client.get(f"/api/spaces/{name}", headers=headers) as resp:
        raw = await resp.text()
    assert resp.content_type == "application/json"
    assert '"cpus":1,' in raw and '"gpu":false' in raw and ": " not in raw, raw
    async with client.client.get("/api/spaces", headers=headers) as resp:
        assert '"cpus":1,' in await resp.text()
    async with client.client.get("/api/system", headers=headers) as resp:
        raw = await resp.text()
    assert '"gpu":' in raw and ", " not in raw, raw


async def test_names_of_the_earlier_server_are_spaces_of_their_own(
        client: Api, space: SpaceMaker, docker_api: docker.APIClient) -> None:
    """Either case, '_' and '-' (the earlier server's rule): distinct on the engine, each
    with a DNS-safe hostname."""
    stem = unique_name("n").replace("-", "_")
    names = [f"My_{stem}", f"my_{stem}", f"my-{stem.replace('_', '-')}"]
    for name in names:
        made = await space(name, memory="64m", network="none")
        assert made["name"] == name
    listed = {s["name"] for s in (await client.get("/api/spaces")).body["spaces"]}
    assert set(names) <= listed
    for name in names:
        result = await client.exec(name, "hostname")
        assert result["stdout"].strip() == names[2].lower()[:63], result
        info = container_of(docker_api, client.config.prefix, name)
        assert info["Name"] == f"/{client.config.prefix}{name}"
    got = await client.get(f"/api/spaces/{names[0]}")
    assert got.status == 200 and got.body["space"]["name"] == names[0]
