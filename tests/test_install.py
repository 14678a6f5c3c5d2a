"""install.sh and clawdspace.service, end to end, on a Debian node with systemd as PID 1; and
release.sha256, the list of the files an install fetches, with their SHA-256.

The node is a container of tests/install/Dockerfile (systemd, curl, python3, no Docker engine of
its own) on the host's network. Its Docker socket is that of a second engine the test starts
(``engine``: a dockerd with its own data, state, pid file and socket, no default bridge, no
iptables rules), which has no sandbox image: the installer must build clawdspace:latest there
from the downloaded images/, on the mmdebstrap base image that the test loads into it (no image
registry is reachable). A snapshot of the checkout is served over HTTP on a loopback address,
and the node installs from it the way a user does:

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
import ipaddress
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
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
    remove_prefix_networks,
    service_env,
    stop_process,
)

ROOT = Path(__file__).resolve().parent.parent
NODE_CONTEXT = ROOT / "tests" / "install"
NODE_REPO = "clawdspace-node-test"
# The base image tests/build-image.sh makes with mmdebstrap: of the node, and of the sandbox
# image the installer builds.
BASE_IMAGE = f"clawdspace-base:{os.environ.get('CLAWDSPACE_BASE_SUITE', 'bookworm')}"
MANIFEST = "release.sha256"
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
    digest = hashlib.sha256(docker_api.inspect_image(BASE_IMAGE)["Id"].encode())
    for path in sorted(NODE_CONTEXT.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    tag = f"{NODE_REPO}:{digest.hexdigest()[:12]}"
    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_api.inspect_image(tag)
        return tag
    build(docker_api, tag, path=str(NODE_CONTEXT), buildargs={"BASE_IMAGE": BASE_IMAGE},
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
# The node's Docker engine: a second dockerd that shares no state with the host's
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Engine:
    api: docker.APIClient
    socket: Path  # its API socket, which the node mounts as /var/run/docker.sock
    log: Path  # dockerd's output (removed with the engine's directory at the end)


def free_pool() -> str:
    """A 10.X.0.0/16 that no route of the host overlaps, for the engine's bridge networks (the
    service makes one for internet spaces). 10.213/16 is tests/support/netns.py's."""
    routes = []
    for line in Path("/proc/net/route").read_text().splitlines()[1:]:
        fields = line.split()  # Iface Destination Gateway Flags ... Mask: hex, in host order
        destination, mask = (ipaddress.IPv4Address(int(fields[i], 16).to_bytes(4, sys.byteorder))
                             for i in (1, 7))
        if int(mask):
            routes.append(ipaddress.IPv4Network(f"{destination}/{mask}", strict=False))
    for octet in range(200, 255):
        pool = ipaddress.IPv4Network(f"10.{octet}.0.0/16")
        if octet != 213 and not any(pool.overlaps(route) for route in routes):
            return str(pool)
    raise AssertionError(f"no 10.200-254.0.0/16 is free of the host's routes: {routes}")


def unmount_under(root: Path) -> None:
    """Unmount what a stopped engine left mounted under ``root`` (dockerd keeps the namespace
    file exec-root/netns/default mounted), deepest first."""
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", target], check=True, capture_output=True)


def listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


@pytest.fixture(scope="module")
def engine(prefix: str) -> Iterator[Engine]:
    """A dockerd of the test's own, started here and stopped at the end of the module: its data
    root, exec root (with its own containerd), pid file, configuration file (empty: the host's
    /etc/docker/daemon.json does not apply) and socket are under a fresh directory. Its default
    bridge is one of its own; it adds no iptables rules, leaves IP forwarding alone, and takes
    its networks' subnets from a pool no host route overlaps. It shares no state with the
    host's engine, and neither restarts nor reconfigures it."""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        pytest.skip("no dockerd here: the install test starts a Docker engine of its own")
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}engine-", dir="/tmp"))  # short socket paths
    (root / "daemon.json").write_text("{}\n")
    socket_path, log_path = root / "docker.sock", root / "dockerd.log"
    namespace = f"{prefix}engine"  # containerd namespaces, should a system containerd be used
    pool = ipaddress.IPv4Network(free_pool())
    # A default bridge of its own: with --bridge none, dockerd deletes the link named docker0
    # at start, and this dockerd shares the host's network namespace: the host engine's.
    bridge = f"{prefix[:9]}br"
    bridge_address = f"{pool.network_address + 255 * 256 + 1}/24"
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", bridge_address, "dev", bridge], check=True)
    command = [dockerd, "--config-file", str(root / "daemon.json"),
               "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
               "--pidfile", str(root / "dockerd.pid"), "--host", f"unix://{socket_path}",
               "--bridge", bridge, "--iptables=false", "--ip6tables=false",
               "--ip-forward=false", "--ip-masq=false",
               "--default-address-pool", f"base={pool},size=24",
               "--containerd-namespace", namespace,
               "--containerd-plugins-namespace", f"{namespace}-plugins"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    api: docker.APIClient | None = None
    try:
        deadline = time.monotonic() + 60
        while not listening(socket_path):  # dockerd listens once it is ready to serve
            assert process.poll() is None, f"dockerd exited {process.returncode}:\n" + \
                log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "dockerd did not answer within 60 s:\n" + \
                log_path.read_text(errors="replace")
            time.sleep(0.2)
        api = docker.APIClient(base_url=f"unix://{socket_path}", version="auto", timeout=120)
        yield Engine(api, socket_path, log_path)
    finally:
        if api is not None:
            for container in api.containers(all=True):
                api.remove_container(container["Id"], force=True)
            for network in api.networks():
                if network["Name"] not in ("bridge", "host", "none"):
                    api.remove_network(network["Id"])
            api.close()
        stop_process(process)
        with contextlib.suppress(ProcessLookupError):  # its containerd, had it to be killed
            os.killpg(process.pid, signal.SIGKILL)
        unmount_under(root)
        shutil.rmtree(root)
        subprocess.run(["ip", "link", "del", bridge], check=False)


def load_image(source: docker.APIClient, target: docker.APIClient, image: str,
               scratch: Path) -> None:
    """``docker save image | docker -H target load``, through a file."""
    archive = scratch / "image.tar"
    with open(archive, "wb") as out:
        for chunk in source.get_image(image):
            out.write(chunk)
    with open(archive, "rb") as data:
        target.load_image(data)
    archive.unlink()
    target.inspect_image(image)


# ---------------------------------------------------------------------------------------------
# The node
# ---------------------------------------------------------------------------------------------

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[str]:
    """``directory`` over HTTP on a loopback address, for as long as the block runs: its URL."""
    address, port = free_loopback()
    server = http.server.ThreadingHTTPServer(
        (address, port), functools.partial(QuietHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{address}:{port}"
    finally:
        server.shutdown()
        server.server_close()


def snapshot(target: Path) -> Path:
    """The checkout's top-level files, images/ and templates/, as of now: what the node installs
    stays the same through the test even while someone edits the working tree. Its
    release.sha256 is rewritten from the copied files (test_release_manifest_matches_tree checks
    the checkout's own), so that this test tests the install, not the manifest's freshness."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.is_file():
            shutil.copy2(entry, target / entry.name)
        elif entry.name in ("images", "templates"):
            shutil.copytree(entry, target / entry.name)
    installer(target, "--write-manifest")
    return target


def installer(directory: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``sh directory/install.sh args`` on the host, with no CLAWDSPACE_* setting but ``env``;
    its stdout and stderr together."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLAWDSPACE_")}
    result = subprocess.run(["sh", str(directory / "install.sh"), *args], env={**clean, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=120, check=False)
    assert "Traceback" not in result.stdout, result.stdout
    return result


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

    def install(self, *args: str, port: int | None = None, check: bool = True) -> str:
        """Pipe install.sh from the served checkout into sh, as a user would; its output. The
        sandbox image is built on the base image loaded into the node's engine, and its RUN
        steps use the host's network (that engine has no default bridge) to reach the Debian
        mirror."""
        settings = {"CLAWDSPACE_BASE_URL": self.served, "CLAWDSPACE_INSTALL_DOCKER": "0",
                    "CLAWDSPACE_PIP_FIND_LINKS": self.find_links,
                    "CLAWDSPACE_BASE_IMAGE": BASE_IMAGE, "CLAWDSPACE_BUILD_NETWORK": "host"}
        if port is not None:
            settings.update(CLAWDSPACE_PORT=str(port), CLAWDSPACE_HOST=self.host,
                            CLAWDSPACE_PREFIX=self.instance)
        env = " ".join(f"{k}={v}" for k, v in settings.items())
        script = f"curl -fsSL {self.served}/install.sh | {env} sh -s -- {' '.join(args)}"
        if check:
            return self.ok(script)
        code, output = self.sh(script)
        assert code != 0, f"{script!r} succeeded:\n{output}"
        return output

    def exists(self, path: str) -> bool:
        return self.sh(f"test -e {path}")[0] == 0

    def key(self) -> str:
        return self.ok(f"sed -n 's/^CLAWDSPACE_API_KEY=//p' {ENV_FILE}").strip()

    def unit(self, prop: str) -> str:
        return self.ok(f"systemctl show -p {prop} --value {UNIT}").strip()


@pytest.fixture(scope="module")
def node(docker_api: docker.APIClient, engine: Engine, prefix: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    image = node_image(docker_api)
    load_image(docker_api, engine.api, BASE_IMAGE, tmp_path_factory.mktemp("image"))
    source = snapshot(tmp_path_factory.mktemp("checkout"))
    CACHE.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}node"
    instance = f"{prefix}inst-"
    # systemd as PID 1 without --privileged; the host's network (the loopback server and the
    # service's port are reachable both ways, and the firewall acts as on a real node); the
    # test's engine as the node's Docker.
    host_config = docker_api.create_host_config(
        network_mode="host", cap_add=["SYS_ADMIN", "NET_ADMIN"],
        security_opt=["seccomp=unconfined"], tmpfs={"/run": "", "/run/lock": ""},
        binds=["/sys/fs/cgroup:/sys/fs/cgroup:rw",
               f"{engine.socket}:/var/run/docker.sock:rw", f"{CACHE}:/cache:ro"])
    with contextlib.ExitStack() as cleanup:
        served = cleanup.enter_context(serving(source))
        cleanup.callback(remove_prefix_networks, engine.api, instance)
        cleanup.callback(remove_everything, engine.api, instance)
        cleanup.callback(remove_container, docker_api, name)
        docker_api.create_container(image, name=name, host_config=host_config,
                                    labels={"clawdspace.instance": prefix})
        docker_api.start(name)
        node = Node(docker_api, name, source, served, str(urllib.parse.urlsplit(served).hostname),
                    instance, "")
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


def remove_container(docker_api: docker.APIClient, name: str) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        docker_api.remove_container(name, force=True)


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

def test_release_manifest_matches_tree() -> None:
    """release.sha256 lists every file an install fetches, with its SHA-256 as in the tree. After
    editing one of them, or adding a file to images/ or templates/: sh install.sh --write-manifest
    """
    result = installer(ROOT, "--check-manifest")
    assert result.returncode == 0, result.stdout


def test_manifest_check_and_write(tmp_path: Path) -> None:
    """--check-manifest names the stale entries and says how to regenerate the list; a checkout
    install stops at the same check; --write-manifest writes it again, in byte order."""
    tree = snapshot(tmp_path)
    assert installer(tree, "--check-manifest").returncode == 0
    setup = tree / "images" / "setup.sh"
    setup.write_bytes(setup.read_bytes() + b"# edited\n")
    (tree / "images" / "extra.conf").write_text("a new file of the build context\n")
    for args in (["--check-manifest"], ["--dry-run"]):
        result = installer(tree, *args)
        assert result.returncode == 1, result.stdout
        assert f"{tree}/{MANIFEST} does not match the files of this checkout" in result.stdout
        assert "images/extra.conf images/setup.sh" in result.stdout
        assert f"sh {tree}/install.sh --write-manifest" in result.stdout
    result = installer(tree, "--write-manifest")
    assert result.returncode == 0 and f"wrote {tree}/{MANIFEST}" in result.stdout, result.stdout
    assert installer(tree, "--check-manifest").returncode == 0
    lines = (tree / MANIFEST).read_text().splitlines()
    listed = [line.split("  ", 1)[1] for line in lines]
    assert "images/extra.conf" in listed and listed == sorted(listed)
    digest = hashlib.sha256(setup.read_bytes()).hexdigest()
    assert f"{digest}  images/setup.sh" in lines
    assert "is up to date" in installer(tree, "--write-manifest").stdout


def test_download_checked_against_manifest(tmp_path: Path) -> None:
    """install.sh on its own (as curl | sh runs it) fetches release.sha256, then each file it
    lists, and stops at the first file that is missing or differs, or at a malformed list.
    --dry-run downloads and checks for real, and changes nothing on this host."""
    tree = snapshot(tmp_path / "release")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy2(tree / "install.sh", alone)
    manifest = tree / MANIFEST
    listing = manifest.read_text()
    setup = tree / "images" / "setup.sh"
    original = setup.read_bytes()
    with serving(tree) as url:
        def fails_with(message: str) -> None:
            result = installer(alone, "--dry-run", CLAWDSPACE_BASE_URL=url)
            assert result.returncode == 1 and message in result.stdout, result.stdout
            assert "dry run: nothing was changed" not in result.stdout

        result = installer(alone, "--dry-run", CLAWDSPACE_BASE_URL=url)
        assert result.returncode == 0, result.stdout
        count = len(listing.splitlines())
        assert f"downloaded {count} files, each matching its SHA-256 in {MANIFEST}" \
            in result.stdout
        assert "dry run: nothing was changed" in result.stdout

        setup.write_bytes(original + b"# edited after the list was made\n")
        fails_with(f"{url}/images/setup.sh does not match {MANIFEST}:\n    its SHA-256 is "
                   f"{hashlib.sha256(setup.read_bytes()).hexdigest()}")
        setup.unlink()
        fails_with(f"could not download {url}/images/setup.sh (listed in {MANIFEST})")
        setup.write_bytes(original)
        manifest.write_text(listing + f"{'0' * 64}  ../outside\n")
        fails_with(f"line {count + 1} of {url}/{MANIFEST} is not '<sha256>  <path>'")
        manifest.write_text("".join(line for line in listing.splitlines(keepends=True)
                                    if not line.endswith("  images/Dockerfile\n")))
        fails_with(f"{url}/{MANIFEST} does not list images/Dockerfile")
        manifest.unlink()
        fails_with(f"could not download {url}/{MANIFEST}")


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cold run builds the node image and downloads the wheelhouse
def test_install_use_upgrade_uninstall(node: Node, engine: Engine) -> None:
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

    # A download that does not match release.sha256 stops before anything is installed.
    setup = node.source / "images" / "setup.sh"
    original = setup.read_bytes()
    try:
        setup.write_bytes(original + b"# changed after release.sha256 was made\n")
        output = node.install(port=port, check=False)
    finally:
        setup.write_bytes(original)
    assert f"/images/setup.sh does not match {MANIFEST}" in output, output
    assert "Nothing was installed" in output
    assert not any(node.exists(path) for path in installed)

    # First install: piped from curl, files fetched from the served checkout and checked
    # against release.sha256; the node's engine has no sandbox image, so it is built there
    # from the downloaded images/ (the Dockerfile and the setup.sh it copies).
    with pytest.raises(docker.errors.ImageNotFound):
        engine.api.inspect_image("clawdspace:latest")
    started = time.monotonic()
    output = node.install(port=port)
    install_seconds = time.monotonic() - started
    assert f"downloaded {len((node.source / MANIFEST).read_text().splitlines())} files" in output
    assert "building the sandbox image clawdspace:latest" in output, output
    labels = engine.api.inspect_image("clawdspace:latest")["Config"]["Labels"] or {}
    assert re.fullmatch(r"[0-9a-f]{64}", labels.get("clawdspace.build-sha256", "")), labels
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
    assert "sandbox image clawdspace:latest is up to date" in output, output
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
    assert f"/{node.instance}keep" in instance_objects(engine.api, node.instance)

    # Uninstall --purge (here after a plain uninstall, so piped from curl again) removes the
    # spaces, their networks and firewall rules, settings and data.
    selector = {"label": f"clawdspace.instance={node.instance}"}
    bridges = [n["Options"]["com.docker.network.bridge.name"]
               for n in engine.api.networks(filters=selector)]
    assert bridges, "the internet space has a bridge network"
    assert any(f"-i {bridges[0]} " in rule for rule in firewall_rules())
    node.ok(f"curl -fsSL {node.served}/install.sh | sh -s -- --uninstall --purge")
    assert not any(node.exists(path) for path in (*installed, "/var/lib/clawdspace"))
    assert instance_objects(engine.api, node.instance) == []
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
        cap_bnd = re.search(r"CapBnd:\s*([0-9a-f]+)", proc_status)
        assert cap_bnd and bin(int(cap_bnd.group(1), 16)).count("1") == len(caps), proc_status

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
