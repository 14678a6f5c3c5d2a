"""GPUs on a machine without one: a stand-in ``nvidia-smi`` (0, 1 or 4 GPUs) and, where a test
needs the service to believe in a GPU runtime, a stand-in ``nvidia-ctk`` on its PATH.

The Docker engine here has no NVIDIA runtime: a GPU create reaches it and fails at start, which
is the error path checked. What the engine recorded for a GPU container (``docker inspect``) is
checked on the way, before the failed start rolls it back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from conftest import (
    TEST_IMAGE,
    Api,
    MakeClient,
    MakeConfig,
    container_exists,
    docker_names,
    remove_everything,
    unique_name,
)
from support.fakes import gpu_row, nvidia_smi_script, toolkit_dir

import clawdspace

H100 = "NVIDIA H100 80GB HBM3"
UUIDS = [f"GPU-{i}{i}{i}{i}aaaa-bbbb-cccc-dddd-{i:012d}" for i in range(4)]
ROWS_1 = [gpu_row(0, UUIDS[0], H100, "81559", "1024", "37")]
# Printed out of index order, one name holding ", ", one board without usage figures.
ROWS_4 = [
    gpu_row(2, UUIDS[2], "NVIDIA RTX A6000, Ada", "49140", "[N/A]", "[N/A]"),
    gpu_row(0, UUIDS[0], H100, "81559", "1024", "37"),
    gpu_row(1, UUIDS[1], H100, "81559", "0", "0"),
    gpu_row(3, UUIDS[3], "NVIDIA A100-SXM4-40GB", "40960", "39000", "100"),
]
GPUS_4: list[dict[str, Any]] = [
    {"index": 2, "uuid": UUIDS[2], "name": "NVIDIA RTX A6000, Ada", "memoryMiB": 49140,
     "memoryUsedMiB": None, "utilizationPercent": None},
    {"index": 0, "uuid": UUIDS[0], "name": H100, "memoryMiB": 81559, "memoryUsedMiB": 1024,
     "utilizationPercent": 37},
    {"index": 1, "uuid": UUIDS[1], "name": H100, "memoryMiB": 81559, "memoryUsedMiB": 0,
     "utilizationPercent": 0},
    {"index": 3, "uuid": UUIDS[3], "name": "NVIDIA A100-SXM4-40GB", "memoryMiB": 40960,
     "memoryUsedMiB": 39000, "utilizationPercent": 100},
]
TOOLKIT = ("nvidia-container-cli", "nvidia-container-runtime-hook", "nvidia-ctk")


def path_without_toolkit() -> str:
    """The PATH minus every directory holding an NVIDIA Container Toolkit program."""
    return os.pathsep.join(
        d for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and not any(os.path.exists(os.path.join(d, tool)) for tool in TOOLKIT))


@pytest.fixture(scope="module", autouse=True)
def _engine_without_nvidia(docker_api: docker.APIClient) -> None:
    """These tests describe an engine that cannot pass GPUs; on a GPU host they do not apply."""
    info = docker_api.info()
    if "nvidia" in (info.get("Runtimes") or {}) or info.get("CDISpecDirs"):
        pytest.skip("this Docker engine has an NVIDIA runtime or CDI (a real GPU host)")


@pytest.fixture
def no_toolkit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service (in this process) finds no NVIDIA Container Toolkit program."""
    monkeypatch.setenv("PATH", path_without_toolkit())


@pytest.fixture
def toolkit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The service finds a stand-in ``nvidia-ctk``: it believes Docker can pass GPUs."""
    directory = toolkit_dir(tmp_path / "toolkit")
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{path_without_toolkit()}")
    return directory


def smi(tmp_path: Path, rows: list[str], exit_code: int = 0) -> str:
    """A stand-in nvidia-smi in a directory of its own (GPU answers are cached per path)."""
    return nvidia_smi_script(tmp_path / f"smi-{unique_name('g')}", rows, exit_code)


# ---------------------------------------------------------------------------------------------
# Inventory
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [0, 1, 4])
async def test_capabilities(make_client: MakeClient, tmp_path: Path, no_toolkit: None,
                            count: int) -> None:
    if count == 0:  # what nvidia-smi says on a machine whose driver sees no GPU
        script = smi(tmp_path, ["No devices were found"], exit_code=6)
    else:
        script = smi(tmp_path, ROWS_1 if count == 1 else ROWS_4)
    api = await make_client(nvidia_smi=script, node_name="n")
    caps = (await api.get("/api/system/capabilities")).body
    assert caps["gpuCount"] == count
    if count == 0:
        assert caps["gpu"] is False and caps["gpus"] == []
        assert caps["gpuName"] is None and caps["gpuMemory"] is None
    else:
        assert caps["gpu"] is True
        expected = [GPUS_4[1]] if count == 1 else GPUS_4
        assert sorted(caps["gpus"], key=lambda g: g["index"]) == sorted(
            expected, key=lambda g: g["index"])
        first = caps["gpus"][0]
        assert caps["gpuName"] == first["name"]
        assert caps["gpuMemory"] == f"{first['memoryMiB']} MiB"
        assert caps["gpuSupport"] == {"nvidiaRuntime": False, "nvidiaToolkit": False,
                                      "cdi": False}
    system = (await api.get("/api/system")).body["capabilities"]
    assert system["gpuCount"] == count and system["gpus"] == caps["gpus"]
    me = (await api.get("/api/nodes")).body["nodes"][0]
    assert me["self"] is True and me["capabilities"]["gpus"] == caps["gpus"]


async def test_one_gpu_capabilities_exactly(make_client: MakeClient, tmp_path: Path,
                                            no_toolkit: None) -> None:
    api = await make_client(nvidia_smi=smi(tmp_path, ROWS_1))
    caps = (await api.get("/api/system/capabilities")).body
    assert (caps["gpu"], caps["gpuName"], caps["gpuMemory"], caps["gpuCount"]) == (
        True, H100, "81559 MiB", 1)
    assert caps["gpus"] == [{"index": 0, "uuid": UUIDS[0], "name": H100, "memoryMiB": 81559,
                             "memoryUsedMiB": 1024, "utilizationPercent": 37}]


async def test_toolkit_on_path_is_detected(make_client: MakeClient, tmp_path: Path,
                                           toolkit: str) -> None:
    api = await make_client(nvidia_smi=smi(tmp_path, ROWS_1))
    caps = (await api.get("/api/system/capabilities")).body
    assert caps["gpuSupport"] == {"nvidiaRuntime": False, "nvidiaToolkit": True, "cdi": False}


# ---------------------------------------------------------------------------------------------
# Refused GPU creates
# ---------------------------------------------------------------------------------------------

async def assert_refused(api: Api, body: dict[str, Any], status: int, code: str,
                         docker_api: docker.APIClient, prefix: str) -> dict[str, Any]:
    """The create is refused with ``status``/``code`` and leaves no container or volume."""
    before = docker_names(docker_api, prefix)
    reply = await api.post("/api/spaces", body)
    assert reply.status == status, reply.body
    assert reply.error_code() == code, reply.body
    assert docker_names(docker_api, prefix) == before
    assert not any(line.get("type") == "space.create" for line in api.audit_lines())
    return reply.body  # type: ignore[no-any-return]


async def test_gpu_on_a_gpu_less_node_names_nodes_with_gpus(
        make_client: MakeClient, tmp_path: Path, docker_api: docker.APIClient,
        prefix: str) -> None:
    gpu_node = await make_client(nvidia_smi=smi(tmp_path, ROWS_1), node_name="gpu1",
                                 data_dir=str(tmp_path / "gpu1"))
    peer_url = str(gpu_node.client.make_url("")).rstrip("/")
    alone = await make_client(nvidia_smi=smi(tmp_path, []), data_dir=str(tmp_path / "alone"),
                              tailscale="/nonexistent/tailscale", node_name="cpu0")
    body = await assert_refused(alone, {"name": unique_name(), "gpu": True}, 409, "no_gpu",
                                docker_api, prefix)
    assert "gpu1" not in body["error"]
    cpu = await make_client(nvidia_smi=smi(tmp_path, []), data_dir=str(tmp_path / "cpu"),
                            node_name="cpu1", nodes=f"cpu1=http://127.0.0.1:1,gpu1={peer_url}")
    nodes = {n["name"]: n for n in (await cpu.get("/api/nodes?refresh=1")).body["nodes"]}
    assert nodes["gpu1"]["status"] == "online" and nodes["gpu1"]["capabilities"]["gpu"] is True
    for fields in ({"gpu": True}, {"gpus": 2}, {"gpus": "all"}, {"template": "gpu"}):
        body = await assert_refused(cpu, {"name": unique_name(), **fields}, 409, "no_gpu",
                                    docker_api, prefix)
        assert "gpu1" in body["error"], body
        assert "cpu1" not in body["error"].replace("gpu1", ""), body


async def test_more_gpus_than_the_node_has(make_client: MakeClient, tmp_path: Path,
                                           toolkit: str, docker_api: docker.APIClient,
                                           prefix: str) -> None:
    api = await make_client(nvidia_smi=smi(tmp_path, ROWS_4))
    body = await assert_refused(api, {"name": unique_name(), "gpus": 5}, 409,
                                "not_enough_gpus", docker_api, prefix)
    assert "5" in body["error"] and "4" in body["error"], body


@pytest.mark.parametrize("fields", [
    {"gpus": 0}, {"gpus": "two"}, {"gpus": True}, {"gpu": False, "gpus": 2}, {"gpus": -1},
    {"gpus": 65}, {"gpus": 1.5}, {"gpus": "ALL"}, {"gpus": [0]}, {"gpu": "yes"},
], ids=["zero", "word", "bool", "gpu-false", "negative", "65", "float", "ALL", "list", "gpu-yes"])
async def test_bad_gpu_fields_are_400(make_client: MakeClient, tmp_path: Path, toolkit: str,
                                      docker_api: docker.APIClient, prefix: str,
                                      fields: dict[str, Any]) -> None:
    api = await make_client(nvidia_smi=smi(tmp_path, ROWS_4))
    body = await assert_refused(api, {"name": unique_name(), **fields}, 400,
                                "invalid_gpu" if "gpus" not in fields else "invalid_gpus",
                                docker_api, prefix)
    assert "gpu" in body["error"]


async def test_no_gpu_runtime_is_503_with_advice(make_client: MakeClient, tmp_path: Path,
                                                 no_toolkit: None, docker_api: docker.APIClient,
                                                 prefix: str) -> None:
    api = await make_client(nvidia_smi=smi(tmp_path, ROWS_1))
    name = unique_name("gpu")
    body = await assert_refused(api, {"name": name, "gpu": True}, 503, "no_gpu_runtime",
                                docker_api, prefix)
    assert "NVIDIA Container Toolkit" in body["error"], body
    assert "nvidia-ctk" in body["error"] or "install" in body["error"].lower(), body
    assert not container_exists(docker_api, f"{prefix}{name}")


# ---------------------------------------------------------------------------------------------
# A GPU create that reaches the engine
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def gpu_image(docker_api: docker.APIClient, prefix: str) -> Iterator[str]:
    """The suite's image under a name of its own, to show the GPU image is the one used."""
    repository = f"{prefix}gpu-image"
    docker_api.tag(TEST_IMAGE, repository, "latest")
    try:
        yield f"{repository}:latest"
    finally:
        with contextlib.suppress(docker.errors.APIError):
            docker_api.remove_image(f"{repository}:latest")


def record_starts(api: Api, docker_api: docker.APIClient) -> list[dict[str, Any]]:
    """Have the app's engine client inspect every container just before starting it; returns
    the list the inspections go to."""
    engine = api.app[clawdspace.ENGINE_KEY]
    real_start = engine.start
    seen: list[dict[str, Any]] = []

    async def start(container: str) -> None:
        seen.append(docker_api.inspect_container(container))
        await real_start(container)

    engine.start = start  # type: ignore[assignment]
    return seen


@pytest.mark.parametrize(("fields", "wanted"), [
    ({"gpu": True}, [UUIDS[1]]),  # ranked by load, then index: GPU 0 carries a space
    ({"gpus": "all"}, UUIDS),
    ({"template": "gpu", "network": "none"}, [UUIDS[1]]),
], ids=["gpu", "all", "template-offline"])
async def test_engine_without_nvidia_driver(make_client: MakeClient, tmp_path: Path,
                                            toolkit: str, docker_api: docker.APIClient,
                                            prefix: str, gpu_image: str,
                                            fields: dict[str, Any], wanted: list[str]) -> None:
    instance = f"{prefix}gdrv-"
    api = await make_client(nvidia_smi=smi(tmp_path, ROWS_4), gpu_image=gpu_image,
                            prefix=instance, firewall=False)
    busy = docker_api.create_container(TEST_IMAGE, ["sleep", "infinity"],
                                       name=f"{instance}busy", labels={
                                           "clawdspace.instance": instance,
                                           "clawdspace.kind": "space",
                                           "clawdspace.space": "busy",
                                           "clawdspace.gpus": UUIDS[0]})
    try:
        seen = record_starts(api, docker_api)
        name = unique_name("gpu")
        before = docker_names(docker_api, instance)
        reply = await api.post("/api/spaces", {"name": name, **fields})
        assert reply.status == 503, reply.body
        assert reply.error_code() == "no_gpu_runtime", reply.body
        assert "could not select device driver" in reply.body["error"], reply.body
        assert docker_names(docker_api, instance) == before, "the failed create left things"
        assert len(seen) == 1, seen
        recorded = seen[0]
        host = recorded["HostConfig"]
        [request] = host["DeviceRequests"]
        assert sorted(request.pop("DeviceIDs")) == sorted(wanted), request
        assert request == {"Driver": "nvidia", "Count": 0, "Capabilities": [["gpu"]],
                           "Options": {}}
        assert host["CapDrop"] == ["ALL"]
        assert "no-new-privileges:true" in (host["SecurityOpt"] or [])
        assert host["Privileged"] is False and not host.get("Binds")
        assert not host.get("Devices") and host["PidsLimit"] and host["Init"] is True
        if fields.get("network") == "none":
            assert host["NetworkMode"] == "none"
        else:
            assert host["NetworkMode"] not in ("none", "host", "default", "bridge"), host
        labels = recorded["Config"]["Labels"]
        assert labels["clawdspace.gpu"] == "true"
        assert sorted(labels["clawdspace.gpus"].split(",")) == sorted(wanted)
        assert labels["clawdspace.network"] == fields.get("network", "internet")
        assert recorded["Config"]["Image"] == gpu_image
        assert [m["Type"] for m in recorded["Mounts"]] == ["volume"]
    finally:
        docker_api.remove_container(busy["Id"], force=True)
        remove_everything(docker_api, instance)


# ---------------------------------------------------------------------------------------------
# Assignment, HostConfig and the request fields (logic against the real engine)
# ---------------------------------------------------------------------------------------------

async def test_assign_gpus_fewest_spaces_first(make_client: MakeClient, tmp_path: Path,
                                               toolkit: str, docker_api: docker.APIClient,
                                               prefix: str) -> None:
    instance = f"{prefix}asg-"
    api = await make_client(nvidia_smi=smi(tmp_path, ROWS_4), prefix=instance)
    spaces = api.app[clawdspace.SPACES_KEY]
    made: list[str] = []

    def container(name: str, gpus: list[str], owner: str = instance, kind: str = "space",
                  start: bool = False) -> None:
        created = docker_api.create_container(
            TEST_IMAGE, ["sleep", "infinity"], name=f"{prefix}asg{name}",
            labels={"clawdspace.instance": owner, "clawdspace.kind": kind,
                    "clawdspace.space": name, "clawdspace.gpu": "true",
                    "clawdspace.gpus": ",".join(gpus)})
        made.append(created["Id"])
        if start:
            docker_api.start(created["Id"])

    try:
        container("one", [UUIDS[0], UUIDS[1]], start=True)
        container("two", [UUIDS[0]])
        container("other", [UUIDS[2], UUIDS[3]], owner=f"{prefix}elsewhere-")  # not ours
        container("volume", [UUIDS[2]], kind="space-volume")  # not a space
        # Load: GPU 0: 2, GPU 1: 1, GPU 2: 0, GPU 3: 0.
        assert await spaces.assign_gpus(1) == [UUIDS[2]]  # a tie goes to the lower index
        assert await spaces.assign_gpus(2) == [UUIDS[2], UUIDS[3]]
        assert await spaces.assign_gpus(3) == [UUIDS[2], UUIDS[3], UUIDS[1]]
        assert await spaces.assign_gpus(4) == [UUIDS[2], UUIDS[3], UUIDS[1], UUIDS[0]]
        assert sorted(await spaces.assign_gpus(-1)) == sorted(UUIDS)
        with pytest.raises(clawdspace.Conflict) as refused:
            await spaces.assign_gpus(5)
        assert refused.value.code == "not_enough_gpus"
        container("three", [UUIDS[2]])  # now GPU 3 alone carries nothing
        assert await spaces.assign_gpus(1) == [UUIDS[3]]
        listed = {s["name"]: s for s in (await api.get("/api/spaces")).body["spaces"]}
        assert listed["one"]["gpus"] == [UUIDS[0], UUIDS[1]] and listed["one"]["gpu"] is True
        assert listed["three"]["gpus"] == [UUIDS[2]]
        assert "other" not in listed and "volume" not in listed
    finally:
        for container_id in made:
            docker_api.remove_container(container_id, force=True)


async def test_assign_gpus_refusals(make_client: MakeClient, tmp_path: Path,
                                    docker_api: docker.APIClient, no_toolkit: None) -> None:
    none = await make_client(nvidia_smi=smi(tmp_path, []))
    with pytest.raises(clawdspace.NoGpu):
        await none.app[clawdspace.SPACES_KEY].assign_gpus(1)
    four = await make_client(nvidia_smi=smi(tmp_path, ROWS_4))
    with pytest.raises(clawdspace.Unavailable) as refused:
        await four.app[clawdspace.SPACES_KEY].assign_gpus(1)
    assert refused.value.code == "no_gpu_runtime"


def gpu_request(network: str = "none", **overrides: Any) -> clawdspace.CreateRequest:
    values: dict[str, Any] = {"name": "g", "memory": 256 << 20, "cpus": 1.0, "gpu": True,
                              "image": TEST_IMAGE, "template": "gpu", "gpus": 1,
                              "network": network}
    values.update(overrides)
    return clawdspace.CreateRequest(**values)


async def test_host_config_of_a_gpu_space(client: Api, docker_api: docker.APIClient,
                                          prefix: str) -> None:
    host = clawdspace.space_host_config(client.config, gpu_request(), "vol", "none", [UUIDS[3]])
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": 0, "DeviceIDs": [UUIDS[3]],
                                       "Capabilities": [["gpu"]], "Options": {}}]
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert host["NetworkMode"] == "none"
    assert not host.get("Privileged") and not host.get("Binds")
    assert not host.get("Devices") and host["Init"] is True and host["PidsLimit"] > 0
    assert host["Memory"] == host["MemorySwap"] == 256 << 20
    plain = clawdspace.space_host_config(client.config, gpu_request(gpu=False, gpus=0), "vol",
                                          "none", [])
    assert not plain.get("DeviceRequests")
    assert {k: v for k, v in plain.items() if k != "DeviceRequests"} == {
        k: v for k, v in host.items() if k != "DeviceRequests"}
    # What the engine records for it (created, never started).
    name = f"{prefix}hostcfg-{unique_name()}"
    created = docker_api.create_container(TEST_IMAGE, ["true"], name=name,
                                          host_config=clawdspace.space_host_config(
                                              client.config, gpu_request(), f"{name}-vol",
                                              "none", UUIDS[:2]))
    try:
        recorded = docker_api.inspect_container(created["Id"])["HostConfig"]
        assert recorded["DeviceRequests"] == [{"Driver": "nvidia", "Count": 0,
                                               "DeviceIDs": UUIDS[:2],
                                               "Capabilities": [["gpu"]], "Options": {}}]
        assert recorded["CapDrop"] == ["ALL"] and recorded["NetworkMode"] == "none"
    finally:
        docker_api.remove_container(created["Id"], force=True, v=True)
        with contextlib.suppress(docker.errors.APIError):
            docker_api.remove_volume(f"{name}-vol")


def test_parse_create_gpu_fields(make_config: MakeConfig) -> None:
    config = make_config(image="cpu:1", gpu_image="gpu:1")
    root = Path(clawdspace.__file__).parent / "templates"
    default = clawdspace.parse_template((root / "default.yaml").read_text(), "shipped")
    gpu = clawdspace.parse_template((root / "gpu.yaml").read_text(), "shipped")
    offline = clawdspace.parse_template((root / "offline.yaml").read_text(), "shipped")

    def parsed(template: Any = default, **body: Any) -> clawdspace.CreateRequest:
        return clawdspace.parse_create({"name": "g", "memory": "64m", **body}, config, template)

    assert (parsed().gpu, parsed().gpus, parsed().image) == (False, 0, "cpu:1")
    one = parsed(gpu=True)
    assert (one.gpu, one.gpus, one.image) == (True, 1, "gpu:1")
    two = parsed(gpus=2)
    assert (two.gpu, two.gpus, two.image) == (True, 2, "gpu:1")
    assert parsed(gpus="all").gpus == -1 and parsed(gpus="all").gpu is True
    assert parsed(gpu=True, gpus=3).gpus == 3
    assert parsed(gpus=None).gpus == 0
    assert parsed(gpu=True, image="mine:2").image == "mine:2"
    from_template = parsed(gpu)
    assert (from_template.gpu, from_template.gpus, from_template.image) == (True, 1, "gpu:1")
    assert parsed(gpu, gpu=False).gpus == 0
    assert parsed(gpu, network="none").network == "none"
    assert parsed(offline, gpu=True).network == "none"
    with pytest.raises(clawdspace.BadRequest):
        parsed(offline, gpu=True, network="internet")
