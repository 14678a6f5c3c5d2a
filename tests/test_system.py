"""Health, system facts and GPU capabilities (a fake nvidia-smi stands in for a GPU host)."""

from __future__ import annotations

import gc
import os
import socket
from pathlib import Path
from typing import Any

import docker
import pytest
from conftest import Api, MakeClient, fake_nvidia_smi

import clawdspace

H100 = "NVIDIA H100 80GB HBM3"


async def test_health_reports_docker_ok(client: Api) -> None:
    reply = await client.get("/api/health", key=None)
    assert reply.status == 200
    assert reply.body["status"] == "ok"
    assert reply.body["version"] == clawdspace.VERSION
    assert reply.body["docker"]["ok"] is True


# docker-py leaves the socket of a failed unix connect unclosed (docker/transport/unixconn.py).
@pytest.mark.filterwarnings("ignore::ResourceWarning",
                            "ignore::pytest.PytestUnraisableExceptionWarning")
async def test_unreachable_docker_is_degraded_not_500(
        make_client: MakeClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nonexistent.sock")
    api = await make_client()
    health = await api.get("/api/health", key=None)
    assert health.status == 503, health.body
    assert health.body["status"] == "degraded"
    assert health.body["docker"]["ok"] is False
    for path in ("/api/spaces", "/api/spaces/some-space"):
        reply = await api.get(path)
        assert reply.status == 503, (path, reply.body)
        assert reply.error_code() == "docker_unavailable"
    reply = await api.post("/api/spaces", {"name": "x"})
    assert reply.status == 503, reply.body
    assert reply.error_code() == "docker_unavailable"
    await api.client.close()
    gc.collect()  # the leaked sockets' warnings land here, inside the filter


async def test_system_shape(client: Api, docker_api: docker.APIClient) -> None:
    reply = await client.get("/api/system")
    assert reply.status == 200, reply.body
    body: dict[str, Any] = reply.body
    assert body["hostname"] == socket.gethostname()
    assert body["platform"] == "linux"
    assert isinstance(body["arch"], str) and body["arch"]
    assert body["cpus"] == os.cpu_count()
    assert isinstance(body["loadAverage"], list) and len(body["loadAverage"]) == 3
    assert all(isinstance(x, (int, float)) for x in body["loadAverage"])
    assert set(body["memory"]) == {"total", "free", "used", "percentage"}
    assert body["memory"]["percentage"].endswith("%")
    assert set(body["disk"]) == {"total", "used", "available", "percentage"}
    assert isinstance(body["uptime"], str) and body["uptime"].endswith("m")
    engine = docker_api.info()
    assert body["docker"]["version"] == engine["ServerVersion"]
    assert set(body["docker"]) == {"version", "containers", "containersRunning",
                                   "containersPaused", "images"}
    assert all(isinstance(body["docker"][k], int) for k in body["docker"] if k != "version")
    assert body["capabilities"]["gpu"] is False
    assert {"gpu", "gpuName", "gpuMemory", "arch", "platform"} <= set(body["capabilities"])


# nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu
#            --format=csv,noheader,nounits
@pytest.mark.parametrize(("rows", "count"), [
    ([], 0),
    ([f"0, GPU-aaaa, {H100}, 81559, 1024, 37"], 1),
    ([f"0, GPU-aaaa, {H100}, 81559, 1024, 37",
      "1, GPU-bbbb, NVIDIA A100-SXM4-40GB, 40960, 0, 0",
      "2, GPU-cccc, NVIDIA GeForce RTX 3090, 24576, [N/A], [N/A]"], 3),
])
async def test_capabilities_with_fake_gpus(make_client: MakeClient, tmp_path: Path,
                                           rows: list[str], count: int) -> None:
    api = await make_client(nvidia_smi=fake_nvidia_smi(tmp_path / f"gpus{count}", rows))
    reply = await api.get("/api/system/capabilities")
    assert reply.status == 200, reply.body
    caps = reply.body
    assert caps["gpuCount"] == count
    assert len(caps["gpus"]) == count
    assert caps["cpus"] == os.cpu_count()
    assert isinstance(caps["memory"], int) and caps["memory"] > 0
    assert caps["platform"] == "linux"
    assert "gpuSupport" in caps
    if count == 0:
        assert caps["gpu"] is False
        assert caps["gpuName"] is None and caps["gpuMemory"] is None
        return
    assert caps["gpu"] is True
    assert caps["gpuName"] == H100
    assert caps["gpuMemory"] == "81559 MiB"
    assert caps["gpus"][0] == {"index": 0, "uuid": "GPU-aaaa", "name": H100, "memoryMiB": 81559,
                               "memoryUsedMiB": 1024, "utilizationPercent": 37}
    assert set(caps["gpuSupport"]) == {"nvidiaRuntime", "nvidiaToolkit", "cdi"}
    assert all(isinstance(v, bool) for v in caps["gpuSupport"].values())
    assert [g["index"] for g in caps["gpus"]] == list(range(count))
    system = await api.get("/api/system")
    assert system.body["capabilities"]["gpuCount"] == count


async def test_failing_nvidia_smi_means_no_gpu(make_client: MakeClient, tmp_path: Path) -> None:
    script = fake_nvidia_smi(tmp_path / "broken", [f"0, GPU-aaaa, {H100}, 81559, 0, 0"],
                             exit_code=9)
    api = await make_client(nvidia_smi=script)
    reply = await api.get("/api/system/capabilities")
    assert reply.status == 200, reply.body
    assert reply.body["gpu"] is False
    assert reply.body["gpuCount"] == 0 and reply.body["gpus"] == []


def test_parse_nvidia_smi() -> None:
    text = ("0, GPU-1111, NVIDIA H100 80GB HBM3, 81559, 1024, 37\n"
            "\n"
            "No devices were found\n"
            "1, GPU-2222, NVIDIA RTX A6000, Ada, 49140, 0, 0\n"  # a name holding ", "
            "2, GPU-3333, Some GPU, [N/A], [N/A], [N/A]\n")
    assert clawdspace.parse_nvidia_smi(text) == [
        {"index": 0, "uuid": "GPU-1111", "name": "NVIDIA H100 80GB HBM3", "memoryMiB": 81559,
         "memoryUsedMiB": 1024, "utilizationPercent": 37},
        {"index": 1, "uuid": "GPU-2222", "name": "NVIDIA RTX A6000, Ada", "memoryMiB": 49140,
         "memoryUsedMiB": 0, "utilizationPercent": 0},
        {"index": 2, "uuid": "GPU-3333", "name": "Some GPU", "memoryMiB": 0,
         "memoryUsedMiB": None, "utilizationPercent": None},
    ]
    assert clawdspace.parse_nvidia_smi("") == []
