"""install.sh and clawdspace.service, end to end, on a Debian node with systemd as PID 1.

The node is a container of tests/install/Dockerfile (systemd, curl, python3, no Docker engine of
its own) that uses the host's Docker socket and network. A snapshot of the checkout is served
over HTTP on a loopback address, and the node installs from it the way a user does:

    curl -fsSL http://127.0.0.x:PORT/install.sh | CLAWDSPACE_BASE_URL=... sh

pip installs from a wheelhouse downloaded once on the host (cached under
/var/cache/clawdspace-test, or $CLAWDSPACE_TEST_CACHE, keyed by requirements.txt), so only the
first run needs an index.

The node's processes live in its own PID namespace, while the spaces' processes are in the
host's, so the host-side paths of the service (killing a timed-out exec's process group, stats
from /proc and cgroup files) cannot run there. test_unit_capabilities_suffice checks those on
the host, under the unit's own capability bounding set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.server
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from conftest import (
    NO_GPU,
    container_processes,
    free_loopback,
    http_json,
    remove_everything,
    service_env,
    stop_process,
)

ROOT = Path(__file__).resolve().parent.parent
NODE_CONTEXT = ROOT / "tests" / "install"
NODE_REPO = "clawdspace-node-test"
CACHE = Path(os.environ.get("CLAWDSPACE_TEST_CACHE", "/var/cache/clawdspace-test"))
UNIT = "clawdspace.service"
ENV_FILE = "/etc/clawdspace/clawdspace.env"
SUMS = "/opt/clawdspace/templates.sha256"  # the hashes of the last install's templates
# systemd-analyze's exposure score of the unit (0 best, 10 worst); README records the value.
MAX_EXPOSURE = 3.0


# ---------------------------------------------------------------------------------------------
# The node image and the wheelhouse (both cached by content)
# ---------------------------------------------------------------------------------------------

def build(docker_api: docker.APIClient, tag: str, **kwargs: Any) -> None:
    log: list[str] = []
    for chunk in docker_api.build(tag=tag, rm=True, forcerm=True, decode=True, **kwargs):
        if "error" in chunk:
            raise AssertionError(f"building {tag} failed: {chunk['error']}\n{''.join(log)}")
        log.append(str(chunk.get("stream", "")))


def node_image(docker_api: docker.APIClient) -> str:
    """``clawdspace-node-test:<hash>`` on the mmdebstrap base that tests/build-image.sh makes."""
    subprocess.run(["bash", "tests/build-image.sh"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"clawdspace-base:{os.environ.get('CLAWDSPACE_BASE_SUITE', 'bookworm')}"
    digest = hashlib.sha256(docker_api.inspect_image(base)["Id"].encode())
    for path in sorted(NODE_CONTEXT.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    tag = f"{NODE_REPO}:{digest.hexdigest()[:12]}"
    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_api.inspect_image(tag)
        return tag
    build(docker_api, tag, path=str(NODE_CONTEXT), buildargs={"BASE_IMAGE": base},
          network_mode=os.environ.get("CLAWDSPACE_BUILD_NETWORK") or None)
    for image in docker_api.images(name=NODE_REPO):
        for old in image.get("RepoTags") or []:
            if old != tag:
                with contextlib.suppress(docker.errors.APIError):
                    docker_api.remove_image(old)
    return tag


def wheelhouse(python_version: str) -> Path:
    """Wheels of requirements.txt for the node's CPython ``X.Y``, downloaded once on the host
    (the node may not reach the index the host's pip is configured for)."""
    requirements = (ROOT / "requirements.txt").read_bytes()
    arch = platform.machine()
    key = hashlib.sha256(requirements + f"{python_version} {arch}".encode()).hexdigest()[:12]
    path = CACHE / f"wheelhouse-{key}"
    if (path / ".complete").exists():
        return path
    partial = CACHE / f"wheelhouse-{key}.partial-{os.getpid()}"
    partial.mkdir(parents=True)
    abi = "cp" + python_version.replace(".", "")
    platforms = [f"manylinux2014_{arch}", f"manylinux_2_17_{arch}", f"manylinux_2_28_{arch}"]
    command = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
               "-r", str(ROOT / "requirements.txt"), "-d", str(partial), "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "--abi", abi]
    for name in platforms:
        command += ["--platform", name]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"pip download failed:\n{result.stdout}{result.stderr}"
    (partial / ".complete").touch()
    if not path.exists():
        partial.rename(path)
    return path


# ---------------------------------------------------------------------------------------------
# The node
# ---------------------------------------------------------------------------------------------

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def snapshot(target: Path) -> Path:
    """The checkout's top-level files, images/ and templates/, as of now: what the node installs
    stays the same through the test even while someone edits the working tree."""
    for entry in ROOT.iterdir():
        if entry.is_file():
            shutil.copy2(entry, target / entry.name)
        elif entry.name in ("images", "templates"):
            shutil.copytree(entry, target / entry.name)
    return target


@dataclasses.dataclass
class Node:
    api: docker.APIClient
    container: str
    source: Path  # the files served: a snapshot of the checkout
    served: str  # their base URL
    host: str  # loopback address the service binds
    instance: str  # CLAWDSPACE_PREFIX of the installed service
    find_links: str  # the wheelhouse, as the node sees it

    def sh(self, script: str, timeout: float = 300) -> tuple[int, str]:
        """``sh -c script`` on the node as root: (exit code, stdout and stderr together)."""
        exec_id = self.api.exec_create(self.container, ["timeout", str(int(timeout)),
                                                        "sh", "-c", script])["Id"]
        output = self.api.exec_start(exec_id).decode("utf-8", "replace")
        code = self.api.exec_inspect(exec_id).get("ExitCode")
        return int(code if code is not None else -1), output

    def ok(self, script: str, timeout: float = 300) -> str:
        code, output = self.sh(script, timeout)
        assert code == 0, f"{script!r} exited {code}:\n{output}"
        return output

    def install(self, *args: str, port: int | None = None) -> str:
        """Pipe install.sh from the served checkout into sh, as a user would; its output."""
        settings = {"CLAWDSPACE_BASE_URL": self.served, "CLAWDSPACE_INSTALL_DOCKER": "0",
                    "CLAWDSPACE_PIP_FIND_LINKS": self.find_links}
        if port is not None:
            settings.update(CLAWDSPACE_PORT=str(port), CLAWDSPACE_HOST=self.host,
                            CLAWDSPACE_PREFIX=self.instance)
        env = " ".join(f"{k}={v}" for k, v in settings.items())
        return self.ok(f"curl -fsSL {self.served}/install.sh | {env} sh -s -- {' '.join(args)}")

    def exists(self, path: str) -> bool:
        return self.sh(f"test -e {path}")[0] == 0

    def key(self) -> str:
        return self.ok(f"sed -n 's/^CLAWDSPACE_API_KEY=//p' {ENV_FILE}").strip()

    def unit(self, prop: str) -> str:
        return self.ok(f"systemctl show -p {prop} --value {UNIT}").strip()


@pytest.fixture(scope="module")
def node(docker_api: docker.APIClient, prefix: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    image = node_image(docker_api)
    source = snapshot(tmp_path_factory.mktemp("checkout"))
    CACHE.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}node"
    instance = f"{prefix}inst-"
    # systemd as PID 1 without --privileged; the host's network (the loopback server and the
    # service's port are reachable both ways, and the firewall acts as on a real node).
    host_config = docker_api.create_host_config(
        network_mode="host", cap_add=["SYS_ADMIN", "NET_ADMIN"],
        security_opt=["seccomp=unconfined"], tmpfs={"/run": "", "/run/lock": ""},
        binds=["/sys/fs/cgroup:/sys/fs/cgroup:rw",
               "/var/run/docker.sock:/var/run/docker.sock:rw", f"{CACHE}:/cache:ro"])
    address, port = free_loopback()
    server = http.server.ThreadingHTTPServer(
        (address, port), functools.partial(QuietHandler, directory=str(source)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        docker_api.create_container(image, name=name, host_config=host_config,
                                    labels={"clawdspace.instance": prefix})
        docker_api.start(name)
        node = Node(docker_api, name, source, f"http://{address}:{port}", address, instance, "")
        for _ in range(60):  # until systemd has booted (the bus may not be up at first)
            _, state = node.sh("systemctl is-system-running --wait", timeout=60)
            if state.strip() in ("running", "degraded"):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"systemd did not boot: {state}")
        python = node.ok("python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'")
        node.find_links = f"/cache/{wheelhouse(python.strip()).name}"
        yield node
    finally:
        with contextlib.suppress(docker.errors.APIError):
            docker_api.remove_container(name, force=True)
        server.shutdown()
        server.server_close()
        remove_everything(docker_api, instance)
        for network in docker_api.networks(filters={"label": f"clawdspace.instance={instance}"}):
            with contextlib.suppress(docker.errors.APIError):
                docker_api.remove_network(network["Id"])


def api(node: Node, port: int, method: str, path: str, body: Any = None,
        key: str | None = None) -> tuple[int, Any]:
    return http_json(method, f"http://{node.host}:{port}{path}", body, key)


def instance_objects(docker_api: docker.APIClient, instance: str) -> list[str]:
    """Containers, volumes and networks labelled with the instance prefix."""
    selector = {"label": f"clawdspace.instance={instance}"}
    return ([c["Names"][0] for c in docker_api.containers(all=True, filters=selector)]
            + [v["Name"] for v in docker_api.volumes(filters=selector).get("Volumes") or []]
            + [n["Name"] for n in docker_api.networks(filters=selector)])


def firewall_rules() -> list[str]:
    """``iptables -S`` and ``ip6tables -S`` of the host (the node shares its network)."""
    return [line for family in ("iptables", "ip6tables")
            for line in subprocess.run([family, "-w", "5", "-S"], capture_output=True,
                                       text=True, check=False).stdout.splitlines()]


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)  # a cold run builds the node image and downloads the wheelhouse
def test_install_use_upgrade_uninstall(node: Node, docker_api: docker.APIClient) -> None:
    _, port = free_loopback()
    installed = ("/opt/clawdspace", "/etc/clawdspace", f"/etc/systemd/system/{UNIT}")

    # A truncated download runs nothing: everything is inside main, called on the last line.
    half = len((node.source / "install.sh").read_bytes()) // 2
    code, output = node.sh(f"curl -fsSL {node.served}/install.sh | head -c {half} | sh")
    assert code != 0, output
    # --dry-run prints what it would do and changes nothing.
    output = node.install("--dry-run", port=port)
    assert "python3 -m venv /opt/clawdspace/venv.new" in output
    assert "/etc/clawdspace/clawdspace.env" in output
    assert "dry run: nothing was changed" in output
    assert not any(node.exists(path) for path in installed)

    # First install: piped from curl, files fetched from the served checkout.
    started = time.monotonic()
    output = node.install(port=port)
    install_seconds = time.monotonic() - started
    key = node.key()
    assert re.fullmatch(r"[0-9a-f]{64}", key), "the generated key is 64 hex digits"
    assert key not in output, "the installer never prints the key"
    assert f"http://{node.host}:{port}/api" in output
    assert ENV_FILE in output and "journalctl -u clawdspace" in output
    assert node.unit("ActiveState") == "active"
    assert node.ok(f"systemctl is-enabled {UNIT}").strip() == "enabled"
    assert node.ok(f"stat -c '%a %U' {ENV_FILE}").split() == ["600", "root"]
    shipped = sorted(p.name for p in (node.source / "templates").glob("*.yaml"))
    assert node.ok("ls /etc/clawdspace/templates").split() == shipped
    score = node.ok(f"systemd-analyze security --no-pager {UNIT} | tail -n 1")
    match = re.search(r"exposure level for \S+: ([0-9.]+)", score)
    assert match and float(match.group(1)) <= MAX_EXPOSURE, score

    # The installed service, with the generated key.
    status, health = api(node, port, "GET", "/api/health")
    assert status == 200 and health["status"] == "ok", health
    status, body = api(node, port, "POST", "/api/spaces", {"name": "keep", "memory": "256m"}, key)
    assert status == 201, body  # the default template: internet, behind the firewall
    status, body = api(node, port, "POST", "/api/spaces/keep/exec", {"command": "echo hi"}, key)
    assert status == 200 and body["stdout"] == "hi\n", body
    status, body = api(node, port, "POST", "/api/spaces/keep/exec",
                       {"command": "sleep 30", "timeout": 1}, key)
    assert status == 200 and body["timedOut"] is True, body
    status, body = api(node, port, "GET", "/api/spaces/keep/stats", key=key)
    assert status == 200 and "memoryUsageBytes" in body["stats"], body
    status, body = api(node, port, "POST", "/api/spaces",
                       {"name": "gone", "memory": "256m", "template": "offline"}, key)
    assert status == 201, body
    status, body = api(node, port, "DELETE", "/api/spaces/gone?removeVolume=true", key=key)
    assert status == 200, body
    status, body = api(node, port, "GET", "/api/system/capabilities", key=key)
    assert status == 200 and body["firewall"]["active"] is True, body
    journal = node.ok(f"journalctl -u {UNIT} --no-pager")
    assert "listening on" in journal and key not in journal

    # A re-run with nothing new changes nothing and leaves the service running as it was.
    invocation = node.unit("InvocationID")
    output = node.install()
    assert "no change" in output, output
    assert node.unit("InvocationID") == invocation
    assert node.key() == key

    # An upgrade that changes a setting: the service restarts on the new port; key and spaces
    # stay. Shipped templates are kept when edited, updated when not, as if the last install
    # had shipped "# old" versions of gpu, offline and gone (which this release drops).
    _, new_port = free_loopback()
    templates = "/etc/clawdspace/templates"
    node.ok(f"""set -e; cd {templates}; old=$(printf '# old\\n' | sha256sum | cut -c1-64)
        echo '# mine' >> default.yaml
        printf '# old\\n' | tee gpu.yaml > gone.yaml; printf '# mine\\n' > offline.yaml
        sed -i "s/^[0-9a-f]*  \\(gpu\\|offline\\).yaml$/$old  \\1.yaml/" {SUMS}
        echo "$old  gone.yaml" >> {SUMS}""")
    output = node.install(port=new_port)
    assert node.ok(f"tail -n 1 {templates}/default.yaml").strip() == "# mine"
    assert not node.exists(f"{templates}/default.yaml.new"), "unchanged in this release"
    assert node.ok(f"cat {templates}/gpu.yaml") == (node.source / "templates/gpu.yaml").read_text()
    assert node.ok(f"cat {templates}/offline.yaml") == "# mine\n"
    assert f"kept your edited {templates}/offline.yaml" in output
    new = node.ok(f"cat {templates}/offline.yaml.new")
    assert new == (node.source / "templates/offline.yaml").read_text()
    assert not node.exists(f"{templates}/gone.yaml")
    assert node.unit("InvocationID") != invocation
    assert node.key() == key
    status, body = api(node, new_port, "GET", "/api/spaces/keep", key=key)
    assert status == 200 and body["space"]["status"] == "running", body

    # Uninstall: unit and program go; settings, key, data and spaces stay.
    output = node.ok("/opt/clawdspace/uninstall.sh")
    assert "Kept: /etc/clawdspace" in output
    assert not node.exists("/opt/clawdspace")
    assert not node.exists(f"/etc/systemd/system/{UNIT}")
    assert node.sh(f"systemctl is-active {UNIT}")[1].strip() != "active"
    assert node.exists("/var/lib/clawdspace/audit.jsonl")
    assert node.key() == key
    assert f"/{node.instance}keep" in instance_objects(docker_api, node.instance)

    # Uninstall --purge (here after a plain uninstall, so piped from curl again) removes the
    # spaces, their networks and firewall rules, settings and data.
    selector = {"label": f"clawdspace.instance={node.instance}"}
    bridges = [n["Options"]["com.docker.network.bridge.name"]
               for n in docker_api.networks(filters=selector)]
    assert bridges, "the internet space has a bridge network"
    assert any(f"-i {bridges[0]} " in rule for rule in firewall_rules())
    node.ok(f"curl -fsSL {node.served}/install.sh | sh -s -- --uninstall --purge")
    assert not any(node.exists(path) for path in (*installed, "/var/lib/clawdspace"))
    assert instance_objects(docker_api, node.instance) == []
    assert not [rule for rule in firewall_rules() if any(f" {b} " in rule for b in bridges)]
    print(f"first install {install_seconds:.1f} s")


def unit_directives(name: str) -> list[str]:
    return [line.split("=", 1)[1] for line in (ROOT / UNIT).read_text().splitlines()
            if line.startswith(f"{name}=")]


def test_unit_capabilities_suffice(docker_api: docker.APIClient, prefix: str,
                                   tmp_path: Path) -> None:
    """The service under the unit's capability bounding set and no_new_privs, in the host's PID
    namespace as on a real node: a timed-out exec's process group (another uid) is killed from
    the host, and stats come from /proc and the cgroup files."""
    caps = " ".join(unit_directives("CapabilityBoundingSet")).split()
    assert caps and all(c.startswith("CAP_") for c in caps), caps
    assert unit_directives("NoNewPrivileges") == ["yes"]
    bounding = ",".join(["-all", *(f"+{c[4:].lower()}" for c in caps)])
    host, port = free_loopback()
    key = secrets.token_hex(16)
    instance = f"{prefix}caps-"
    env = service_env(CLAWDSPACE_API_KEY=key, CLAWDSPACE_HOST=host, CLAWDSPACE_PORT=str(port),
                      CLAWDSPACE_DATA_DIR=str(tmp_path / "data"), CLAWDSPACE_PREFIX=instance,
                      CLAWDSPACE_NVIDIA_SMI=NO_GPU)
    log_path = tmp_path / "serve.log"
    url = f"http://{host}:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["setpriv", f"--bounding-set={bounding}", "--no-new-privs", sys.executable,
             str(ROOT / "clawdspace.py"), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            assert process.poll() is None, log_path.read_text()
            with contextlib.suppress(OSError):
                if http_json("GET", f"{url}/api/health", timeout=5)[0] == 200:
                    break
            time.sleep(0.1)
        proc_status = Path(f"/proc/{process.pid}/status").read_text()
        bounding = re.search(r"CapBnd:\s*([0-9a-f]+)", proc_status)
        assert bounding and bin(int(bounding.group(1), 16)).count("1") == len(caps), proc_status

        name = "caps"
        status_code, body = http_json("POST", f"{url}/api/spaces",
                                      {"name": name, "memory": "256m", "template": "offline"}, key)
        assert status_code == 201, body
        status_code, body = http_json("POST", f"{url}/api/spaces/{name}/exec",
                                      {"command": "sleep 30", "timeout": 1}, key)
        assert status_code == 200 and body["timedOut"] is True, body
        # Killed from the host at once (the engine's fallback would take 5 s more).
        assert body["durationMs"] < 4000, body
        assert not any("sleep 30" in p for p in
                       container_processes(docker_api, f"{instance}{name}")), "still running"
        status_code, body = http_json("GET", f"{url}/api/spaces/{name}/stats", key=key)
        assert status_code == 200 and body["stats"]["pids"] >= 1, body
        assert body["stats"]["memoryUsageBytes"] > 0, body
        status_code, body = http_json("DELETE", f"{url}/api/spaces/{name}?removeVolume=true",
                                      key=key)
        assert status_code == 200, body
    finally:
        stop_process(process)
        remove_everything(docker_api, instance)
