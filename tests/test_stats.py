"""Stats and observability of a space, through HTTP and against the engine; plus the pure
helpers that turn cgroup files and the engine's stats JSON into the answer."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import docker
import pytest
from conftest import (
    TEST_IMAGE,
    Api,
    SpaceMaker,
    container_of,
    in_container,
    poll,
    unique_name,
)

import clawdspace

STATS_FIELDS = {"cpuPercent", "memoryUsageBytes", "memoryLimitBytes", "pids", "networkRxBytes",
                "networkTxBytes", "blockReadBytes", "blockWriteBytes"}
TOKEN = "ghp_" + "A1b2C3d4E5" * 3 + "f6G7h8"  # 36 characters after the prefix


async def stats_of(api: Api, name: str) -> dict[str, Any]:
    reply = await api.get(f"/api/spaces/{name}/stats")
    assert reply.status == 200, reply.body
    assert set(reply.body) == {"stats"}
    stats: dict[str, Any] = reply.body["stats"]
    assert set(stats) == STATS_FIELDS, stats
    assert isinstance(stats["cpuPercent"], (int, float))
    for field in STATS_FIELDS - {"cpuPercent"}:
        assert isinstance(stats[field], int) and not isinstance(stats[field], bool), field
        assert stats[field] >= 0, (field, stats)
    return stats


async def observe(api: Api, name: str, **params: str) -> dict[str, Any]:
    reply = await api.get(f"/api/spaces/{name}/observability", params=params)
    assert reply.status == 200, reply.body
    assert set(reply.body) == {"observability"}
    return reply.body["observability"]  # type: ignore[no-any-return]


def sh(docker_api: docker.APIClient, container: str, script: str) -> str:
    code, out = in_container(docker_api, container, script)
    assert code == 0, (script, out)
    return out.decode()


def engine_block_writes(docker_api: docker.APIClient, container: str) -> int:
    raw = docker_api.stats(container, stream=False)
    rows = (raw.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []
    return sum(int(r.get("value", 0)) for r in rows if str(r.get("op", "")).lower() == "write")


# ---------------------------------------------------------------------------------------------
# Stats through HTTP
# ---------------------------------------------------------------------------------------------

async def test_stats_shape_and_memory_limit(client: Api, shared_space: str) -> None:
    stats = await stats_of(client, shared_space)
    assert stats["memoryLimitBytes"] == 256 << 20  # the space's memory (shared_space: 256m)
    assert 0 < stats["memoryUsageBytes"] < stats["memoryLimitBytes"]
    assert stats["pids"] >= 1  # at least the init and its sleep
    again = await stats_of(client, shared_space)
    assert again["networkRxBytes"] >= stats["networkRxBytes"]
    assert again["networkTxBytes"] >= stats["networkTxBytes"]


async def test_cpu_burner_shows(client: Api, shared_space: str) -> None:
    idle = await stats_of(client, shared_space)
    await client.exec(shared_space, "nohup timeout 300 sh -c 'while :; do :; done' "
                                    ">/dev/null 2>&1 &")
    try:
        await stats_of(client, shared_space)  # a first sample to measure from
        samples: list[dict[str, Any]] = []

        async def busy_sample() -> dict[str, Any] | None:
            """The next sample, if the burner shows in it (on a loaded host it may take some
            samples before it gets its share of a core)."""
            await asyncio.sleep(1)
            samples.append(await stats_of(client, shared_space))
            assert samples[-1]["cpuPercent"] <= 100 * 1.5, samples  # one core (cpus 1), slack
            return samples[-1] if samples[-1]["cpuPercent"] > 20 else None

        busy = await poll(busy_sample, timeout=120, interval=0, what="the burner shows")
        assert busy["cpuPercent"] > 20, (idle, busy)
        assert busy["cpuPercent"] <= 100 * 1.5, busy  # one core (cpus 1), some slack
    finally:
        await client.exec(shared_space, "pkill -f 'while [:]' || true")


async def test_pids_rise_with_processes(client: Api, shared_space: str) -> None:
    before = await stats_of(client, shared_space)
    await client.exec(shared_space, "for i in 1 2 3 4 5 6; do nohup sleep 30 "
                                    ">/dev/null 2>&1 & done")
    try:
        after = await stats_of(client, shared_space)
        assert after["pids"] >= before["pids"] + 6, (before, after)
    finally:
        await client.exec(shared_space, "pkill -f 'sleep 3[0]' || true")


async def test_block_writes_show(client: Api, shared_space: str, docker_api: docker.APIClient,
                                 prefix: str) -> None:
    """50 MB written with fsync raise blockWriteBytes by at least that much, wherever the host
    accounts block I/O per container (the engine's own stats say whether it does); where it
    does not (see the test report), the service must agree with the engine."""
    container = f"{prefix}{shared_space}"
    before = await stats_of(client, shared_space)
    engine_before = engine_block_writes(docker_api, container)
    result = await client.exec(shared_space, "dd if=/dev/zero of=/workspace/blk bs=1M count=50 "
                                             "conv=fsync 2>&1 && rm -f /workspace/blk")
    assert result["exitCode"] == 0, result
    after = await stats_of(client, shared_space)
    engine_after = engine_block_writes(docker_api, container)
    if engine_after - engine_before >= 50 << 20:
        assert after["blockWriteBytes"] - before["blockWriteBytes"] >= 50 << 20, (before, after)
    else:
        assert after["blockWriteBytes"] == engine_after, (after, engine_after)
    assert after["blockWriteBytes"] >= before["blockWriteBytes"]


async def test_paused_space_is_not_resumed_by_stats(client: Api, space: SpaceMaker,
                                                    docker_api: docker.APIClient,
                                                    prefix: str) -> None:
    name = (await space(memory="64m"))["name"]
    assert (await client.post(f"/api/spaces/{name}/stop")).status == 200
    stats = await stats_of(client, name)
    assert stats["memoryLimitBytes"] == 64 << 20
    assert stats["pids"] >= 1 and stats["memoryUsageBytes"] > 0
    assert container_of(docker_api, prefix, name)["State"]["Paused"] is True
    observed = await observe(client, name)
    assert observed["status"] == "paused"
    assert observed["top"] == [] and observed["bashHistoryTail"] is None
    assert observed["stats"]["memoryLimitBytes"] == 64 << 20
    assert container_of(docker_api, prefix, name)["State"]["Paused"] is True
    kinds = [e["type"] for e in client.audit_lines() if e.get("space") == name]
    assert kinds == ["space.create", "space.pause"], kinds


async def test_stopped_space_answers_zeros(client: Api, space: SpaceMaker,
                                           docker_api: docker.APIClient, prefix: str) -> None:
    name = (await space(memory="64m"))["name"]
    docker_api.stop(f"{prefix}{name}", timeout=1)
    stats = await stats_of(client, name)
    assert stats == {"cpuPercent": 0.0, "memoryUsageBytes": 0, "memoryLimitBytes": 64 << 20,
                     "pids": 0, "networkRxBytes": 0, "networkTxBytes": 0,
                     "blockReadBytes": 0, "blockWriteBytes": 0}
    observed = await observe(client, name)
    assert observed["status"] == "stopped"
    assert observed["stats"] == stats
    assert container_of(docker_api, prefix, name)["State"]["Running"] is False


async def test_stats_of_missing_or_invalid_space(client: Api) -> None:
    for what in ("stats", "observability"):
        missing = await client.get(f"/api/spaces/{unique_name('none')}/{what}")
        assert missing.status == 404 and missing.error_code() == "not_found"
        invalid = await client.get(f"/api/spaces/Bad.Name/{what}")
        assert invalid.status == 400 and invalid.error_code() == "invalid_name"


# ---------------------------------------------------------------------------------------------
# Observability through HTTP
# ---------------------------------------------------------------------------------------------

async def test_observability_shape_settings_and_history(client: Api, space: SpaceMaker,
                                                        docker_api: docker.APIClient,
                                                        prefix: str) -> None:
    created = await space(memory="128m", cpus=0.5)
    name = created["name"]
    container = f"{prefix}{name}"
    sh(docker_api, container, "printf '#1700000000\\necho obs-hello\\n#1700000001\\n"
                              f"echo {TOKEN}\\n' > /workspace/.bash_history && "
                              "head -c 300000 /dev/zero > /workspace/filler")
    observed = await observe(client, name)
    assert set(observed) >= {"stats", "workspaceDisk", "workspaceSizeBytes", "top",
                             "bashHistoryTail", "status", "settings"}
    assert set(observed["stats"]) == STATS_FIELDS
    assert observed["stats"]["memoryLimitBytes"] == 128 << 20
    disk = observed["workspaceDisk"]
    assert disk["path"] == "/workspace"
    assert 0 < disk["usedBytes"] <= disk["totalBytes"] and disk["availBytes"] > 0
    assert observed["workspaceSizeBytes"] >= 300000
    top = observed["top"]
    assert top and all(set(p) == {"pid", "cpu", "mem", "etime", "command"} for p in top), top
    assert any(p["command"] == "sleep" for p in top), top
    history = observed["bashHistoryTail"]
    assert "echo obs-hello" in history
    assert TOKEN not in history and "[REDACTED]" in history
    assert observed["status"] == "running"
    info = container_of(docker_api, prefix, name)
    settings = observed["settings"]
    assert settings["network"] == created["network"] == "internet"
    assert settings["image"] == TEST_IMAGE
    assert settings["memory"] == 128 << 20 == info["HostConfig"]["Memory"]
    assert settings["cpus"] == 0.5
    assert settings["writableRootfs"] is (not info["HostConfig"]["ReadonlyRootfs"])
    assert settings["template"] == created["template"]
    assert settings["user"] == "sandbox"
    capped = await observe(client, name, top="1", historyLines="1")
    assert len(capped["top"]) == 1
    assert "obs-hello" not in capped["bashHistoryTail"]  # only the last line


async def test_observability_is_no_activity_no_exec_and_one_probe(
        client: Api, space: SpaceMaker, docker_api: docker.APIClient, prefix: str) -> None:
    name = (await space(memory="64m"))["name"]
    info = container_of(docker_api, prefix, name)
    before = (await client.get(f"/api/spaces/{name}")).body["space"]["lastActivity"]
    audit_before = [e for e in client.audit_lines() if e.get("space") == name]
    await asyncio.sleep(1.1)  # engine events have one-second resolution
    since = int(time.time())
    for _ in range(2):
        await observe(client, name)
    sh(docker_api, info["Id"], "true")  # one exec of ours: proves the events query sees them
    until = int(time.time()) + 1
    await stats_of(client, name)
    after = (await client.get(f"/api/spaces/{name}")).body["space"]["lastActivity"]
    assert after == before
    assert [e for e in client.audit_lines() if e.get("space") == name] == audit_before
    events = list(docker_api.events(since=since, until=until, decode=True,
                                    filters={"container": info["Id"], "event": "exec_create"}))
    assert 1 <= len(events) <= 3, events  # ours, and at most one per observability call


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------

V2_ENGINE_STATS: dict[str, Any] = {
    "read": "2026-01-01T00:00:01.000000000Z",
    "preread": "2026-01-01T00:00:00.000000000Z",
    "pids_stats": {"current": 7, "limit": 1024},
    "blkio_stats": {"io_service_bytes_recursive": [
        {"major": 8, "minor": 0, "op": "read", "value": 4096},
        {"major": 8, "minor": 0, "op": "write", "value": 1048576},
        {"major": 8, "minor": 16, "op": "write", "value": 1024},
    ], "io_serviced_recursive": None},
    "cpu_stats": {"cpu_usage": {"total_usage": 2_000_000_000, "usage_in_kernelmode": 1,
                                "usage_in_usermode": 1},
                  "system_cpu_usage": 20_000_000_000, "online_cpus": 4, "throttling_data": {}},
    "precpu_stats": {"cpu_usage": {"total_usage": 1_000_000_000},
                     "system_cpu_usage": 10_000_000_000, "online_cpus": 4},
    "memory_stats": {"usage": 50_000_000, "limit": 268435456,
                     "stats": {"anon": 30_000_000, "file": 20_000_000,
                               "inactive_file": 10_000_000}},
    "networks": {"eth0": {"rx_bytes": 1000, "tx_bytes": 500, "rx_packets": 3},
                 "eth1": {"rx_bytes": 1, "tx_bytes": 2}},
}

V1_ENGINE_STATS: dict[str, Any] = {
    "pids_stats": {"current": 3},
    "blkio_stats": {"io_service_bytes_recursive": [
        {"major": 8, "minor": 0, "op": "Read", "value": 100},
        {"major": 8, "minor": 0, "op": "Write", "value": 200},
        {"major": 8, "minor": 0, "op": "Sync", "value": 300},
        {"major": 8, "minor": 0, "op": "Async", "value": 0},
        {"major": 8, "minor": 0, "op": "Total", "value": 300},
    ]},
    "cpu_stats": {"cpu_usage": {"total_usage": 500, "percpu_usage": [250, 250]},
                  "system_cpu_usage": 2000, "online_cpus": 2},
    "precpu_stats": {"cpu_usage": {"total_usage": 0}, "system_cpu_usage": 0},
    "memory_stats": {"usage": 9000, "limit": 1 << 30,
                     "stats": {"total_inactive_file": 1000, "cache": 5000}},
    "networks": {"eth0": {"rx_bytes": 10, "tx_bytes": 20}},
}


def test_stats_from_docker_v2_shape() -> None:
    assert clawdspace.stats_from_docker(V2_ENGINE_STATS) == {
        "cpuPercent": 40.0, "memoryUsageBytes": 40_000_000, "memoryLimitBytes": 268435456,
        "pids": 7, "networkRxBytes": 1001, "networkTxBytes": 502,
        "blockReadBytes": 4096, "blockWriteBytes": 1049600}


def test_stats_from_docker_v1_shape() -> None:
    assert clawdspace.stats_from_docker(V1_ENGINE_STATS) == {
        "cpuPercent": 50.0, "memoryUsageBytes": 8000, "memoryLimitBytes": 1 << 30,
        "pids": 3, "networkRxBytes": 10, "networkTxBytes": 20,
        "blockReadBytes": 100, "blockWriteBytes": 200}


@pytest.mark.parametrize("raw", [
    {},
    {"networks": None, "blkio_stats": {"io_service_bytes_recursive": None}, "pids_stats": {},
     "memory_stats": {}, "cpu_stats": {"cpu_usage": {"total_usage": 5}},
     "precpu_stats": {"cpu_usage": {"total_usage": 9}, "system_cpu_usage": 10}},
], ids=["empty", "stopped-or-paused"])
def test_stats_from_docker_of_a_quiet_container(raw: dict[str, Any]) -> None:
    stats = clawdspace.stats_from_docker(raw)
    assert set(stats) == STATS_FIELDS
    assert all(value == 0 for value in stats.values()), stats


def write_files(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def fake_cgroups(monkeypatch: pytest.MonkeyPatch, root: Path, paths: dict[str, str]) -> None:
    monkeypatch.setattr(clawdspace, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(clawdspace, "cgroup_paths", lambda pid: paths)
    monkeypatch.setattr(clawdspace, "network_counters", lambda pid: (11, 22))


def test_read_cgroup_sample_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cgroups(monkeypatch, tmp_path, {"": "/system.slice/docker-abc.scope"})
    base = "system.slice/docker-abc.scope"
    write_files(tmp_path, {
        "cgroup.controllers": "cpu io memory pids\n",
        f"{base}/cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        f"{base}/memory.current": "300000\n",
        f"{base}/memory.stat": "anon 1\nfile 2\ninactive_file 100000\nactive_file 5\n",
        f"{base}/memory.max": "max\n",
        f"{base}/pids.current": "5\n",
        f"{base}/io.stat": "8:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n"
                           "8:16 rbytes=1 wbytes=2 rios=1 wios=1 dbytes=0 dios=0\n",
    })
    sample = clawdspace.read_cgroup_sample(1, 8 << 30)
    assert (sample.cpu_ns, sample.memory_usage, sample.memory_limit, sample.pids) == (
        1_500_000, 200000, 8 << 30, 5)
    assert (sample.block_read, sample.block_write, sample.net_rx, sample.net_tx) == (
        101, 202, 11, 22)
    (tmp_path / base / "memory.max").write_text("1073741824\n")
    assert clawdspace.read_cgroup_sample(1, 8 << 30).memory_limit == 1 << 30
    (tmp_path / base / "memory.max").write_text(f"{16 << 30}\n")  # more than the host: host
    assert clawdspace.read_cgroup_sample(1, 8 << 30).memory_limit == 8 << 30


def test_read_cgroup_sample_v1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = "/docker/abc"
    fake_cgroups(monkeypatch, tmp_path, {c: path for c in
                                         ("cpu", "cpuacct", "memory", "pids", "blkio")})
    write_files(tmp_path, {
        f"cpu,cpuacct{path}/cpuacct.usage": "123456789\n",  # only the joint mount exists
        f"memory{path}/memory.usage_in_bytes": "50000\n",
        f"memory{path}/memory.stat": "cache 5\ntotal_inactive_file 1000\n",
        f"memory{path}/memory.limit_in_bytes": "9223372036854771712\n",  # unlimited
        f"pids{path}/pids.current": "4\n",
        f"blkio{path}/blkio.throttle.io_service_bytes_recursive":
            "8:0 Read 100\n8:0 Write 200\n8:0 Sync 300\n8:0 Async 0\n8:0 Total 300\n"
            "Total 300\n",
    })
    sample = clawdspace.read_cgroup_sample(1, 8 << 30)
    assert (sample.cpu_ns, sample.memory_usage, sample.memory_limit, sample.pids) == (
        123456789, 49000, 8 << 30, 4)
    assert (sample.block_read, sample.block_write) == (100, 200)


def test_read_cgroup_sample_of_this_process_does_not_fail() -> None:
    """On the real host (whatever its cgroup version), counters come back as numbers."""
    sample = clawdspace.read_cgroup_sample(os.getpid(), 1 << 40)
    assert sample.cpu_ns > 0 and sample.memory_limit > 0
    assert min(sample.net_rx, sample.net_tx, sample.block_read, sample.block_write) >= 0


def test_parse_observation() -> None:
    sep = clawdspace.OBSERVE_SEPARATOR
    text = (f"/dev/vda 1000 250 750 25% /workspace\n{sep}\n300\n{sep}\n"
            "    1  0.0  0.1    01:02 sleep\n   42 12.5  3.0 1-02:03:04 python3 app.py\n"
            f"{sep}\n#1700000000\nls -la\n")
    parsed = clawdspace.parse_observation(text)
    assert parsed == {
        "workspaceDisk": {"path": "/workspace", "totalBytes": 1024000, "usedBytes": 256000,
                          "availBytes": 768000, "usedPercent": 25.0},
        "workspaceSizeBytes": 307200,
        "top": [{"pid": 1, "cpu": 0.0, "mem": 0.1, "etime": "01:02", "command": "sleep"},
                {"pid": 42, "cpu": 12.5, "mem": 3.0, "etime": "1-02:03:04",
                 "command": "python3 app.py"}],
        "bashHistoryTail": "#1700000000\nls -la\n"}
    empty = clawdspace.parse_observation("")
    assert empty == {"workspaceDisk": None, "workspaceSizeBytes": None, "top": [],
                     "bashHistoryTail": None}
