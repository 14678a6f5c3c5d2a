"""Network policy for real: our bridge networks and the egress firewall, against a test host in
a network namespace of our own (tests/support/netns.py) and the node's API on all addresses.

Traffic goes only to loopback, to containers this module makes, and to the test host's
addresses (10.213.X.2, and 169.254.X.77 / 100.64.X.77 routed to it from the host).
"""

from __future__ import annotations

import hashlib
import secrets
import subprocess
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import docker
import pytest
from conftest import (
    SESSION_KEY,
    SESSION_PREFIX,
    TEST_IMAGE,
    Api,
    MakeClient,
    Served,
    http_json,
    in_container,
    remove_prefix_networks,
    serve,
    unique_name,
)
from support.fakes import wait_until
from support.netns import NetnsHost

import clawdspace

pytestmark = pytest.mark.network

NODE_PREFIX = SESSION_PREFIX  # one bridge per allow-list per prefix: the address pool is small
MADE: list[str] = []  # spaces this module made through the node
BLOCKED = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16")


# ---------------------------------------------------------------------------------------------
# Helpers and module fixtures
# ---------------------------------------------------------------------------------------------

def curl(docker_api: docker.APIClient, container: str, url: str, seconds: int = 2) -> bool:
    """Does an HTTP request from inside ``container`` get any answer at all?"""
    code, _ = in_container(docker_api, container,
                           f"curl -sS -m {seconds} -o /dev/null {url}")
    return code == 0


def iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True,
                          check=False)


def jump_count(parent: str, bridge: str, chain: str) -> int:
    rules = iptables("-S", parent).stdout.splitlines()
    return sum(1 for rule in rules if rule.split() == ["-A", parent, "-i", bridge, "-j", chain])


def create(node: Served, body: dict[str, Any]) -> dict[str, Any]:
    MADE.append(body["name"])
    status, reply = node.request("POST", "/api/spaces", body)
    assert status == 201, reply
    return reply["space"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The service as a real process listening on every address (0.0.0.0), as a node does."""
    with serve(tmp_path_factory.mktemp("node"), SESSION_KEY, NODE_PREFIX,
               CLAWDSPACE_HOST="0.0.0.0") as server:  # noqa: S104 - the point of the test
        yield server
        for name in MADE:
            server.request("DELETE", f"/api/spaces/{name}?removeVolume=true")


@pytest.fixture(scope="module")
def control(docker_api: docker.APIClient) -> Iterator[str]:
    """A plain container on Docker's default bridge: what an unfenced container can reach."""
    name = f"{SESSION_PREFIX}control-{secrets.token_hex(3)}"
    docker_api.create_container(TEST_IMAGE, ["sleep", "infinity"], name=name,
                                host_config=docker_api.create_host_config(init=True))
    docker_api.start(name)
    yield name
    docker_api.remove_container(name, force=True)


@pytest.fixture(scope="module")
def pair(node: Served, docker_api: docker.APIClient) -> tuple[str, str]:
    """Two internet spaces of the node (default template): their container names."""
    names = []
    for stem in ("neta", "netb"):
        name = unique_name(stem)
        create(node, {"name": name, "memory": "128m"})
        names.append(f"{NODE_PREFIX}{name}")
    return names[0], names[1]


def network_of(docker_api: docker.APIClient, container: str) -> tuple[str, dict[str, Any]]:
    info = docker_api.inspect_container(container)
    mode = info["HostConfig"]["NetworkMode"]
    return mode, info["NetworkSettings"]["Networks"].get(mode) or {}


def gateway_of(docker_api: docker.APIClient, network: str) -> str:
    config = docker_api.inspect_network(network)["IPAM"]["Config"]
    return str(config[0]["Gateway"])


# ---------------------------------------------------------------------------------------------
# Status and the rules themselves
# ---------------------------------------------------------------------------------------------

async def test_firewall_status_in_health_and_capabilities(client: Api, node: Served) -> None:
    health = await client.get("/api/health", key=None)
    assert health.status == 200
    assert health.body["firewall"] == {"enabled": True, "active": True, "error": None}
    caps = await client.get("/api/system/capabilities")
    assert caps.status == 200
    assert caps.body["firewall"] == {"enabled": True, "active": True, "error": None}
    status, body = node.request("GET", "/api/health", key=None)
    assert status == 200 and body["firewall"]["active"] is True


async def test_disabled_firewall_is_reported(make_client: MakeClient) -> None:
    api = await make_client(firewall=False)
    health = await api.get("/api/health")
    assert health.body["firewall"]["enabled"] is False
    assert health.body["firewall"]["active"] is False
    caps = await api.get("/api/system/capabilities")
    assert caps.body["firewall"]["enabled"] is False and caps.body["firewall"]["active"] is False


def test_internet_space_joins_our_fenced_bridge(node: Served, pair: tuple[str, str],
                                                docker_api: docker.APIClient) -> None:
    network = f"{NODE_PREFIX}net"
    for container in pair:
        mode, endpoint = network_of(docker_api, container)
        assert mode == network
        assert endpoint.get("IPAddress")
        labels = docker_api.inspect_container(container)["Config"]["Labels"]
        assert labels["clawdspace.network"] == "internet"
        assert labels["clawdspace.template"] == "default"
    details = docker_api.inspect_network(network)
    bridge = clawdspace.Firewall.bridge_name(network)
    assert details["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert details["Options"]["com.docker.network.bridge.name"] == bridge
    assert details["Labels"]["clawdspace.instance"] == NODE_PREFIX
    out_chain, in_chain = clawdspace.Firewall.chains(bridge)
    assert jump_count("DOCKER-USER", bridge, out_chain) == 1
    assert jump_count("INPUT", bridge, in_chain) == 1
    rules = iptables("-S", out_chain).stdout
    for cidr in BLOCKED:
        assert f"-A {out_chain} -d {cidr} -j REJECT" in rules, rules
    # DNS to the node's resolvers is the only way out into a blocked range, and only port 53.
    returns = [r for r in rules.splitlines() if r.endswith("-j RETURN") and " -d " in r]
    assert returns and all("--dport 53" in r for r in returns), rules
    assert iptables("-S", in_chain).stdout.splitlines()[-1] == \
        f"-A {in_chain} -j REJECT --reject-with icmp-admin-prohibited"
    _, space = node.request("GET", f"/api/spaces/{pair[0].removeprefix(NODE_PREFIX)}")
    assert space["space"]["network"] == "internet"


# ---------------------------------------------------------------------------------------------
# Egress for real
# ---------------------------------------------------------------------------------------------

def test_blocked_ranges_are_unreachable_from_a_space_but_not_from_a_control_container(
        netns_host: NetnsHost, pair: tuple[str, str], control: str,
        docker_api: docker.APIClient) -> None:
    listener = netns_host.listener()
    targets = {"rfc1918 (10/8)": netns_host.ip, "link-local / metadata": netns_host.link_local,
               "cgnat / tailnet": netns_host.cgnat}
    for what, address in targets.items():
        url = f"http://{address}:{listener.port}/"
        assert not curl(docker_api, pair[0], url), f"an internet space reached {what} {address}"
    assert listener.connections() == 0, listener.events()
    for what, address in targets.items():
        url = f"http://{address}:{listener.port}/"
        assert curl(docker_api, control, url), f"the control container cannot reach {what}"
    assert listener.connections() == len(targets), listener.events()


def test_spaces_on_the_bridge_cannot_reach_each_other(pair: tuple[str, str],
                                                      docker_api: docker.APIClient) -> None:
    first, second = pair
    _, endpoint = network_of(docker_api, first)
    address = endpoint["IPAddress"]
    server = docker_api.exec_create(first, ["python3", "-m", "http.server", "18080", "--bind",
                                            address, "--directory", "/tmp"])
    docker_api.exec_start(server["Id"], detach=True)
    wait_until(lambda: curl(docker_api, first, f"http://{address}:18080/"), timeout=60,
               what="the listener in the first space came up")
    assert not curl(docker_api, second, f"http://{address}:18080/"), \
        "inter-container traffic on the space bridge is open"


PROBE = """
import os, socket
tries = hits = 0
# Until told to stop (and at least {minimum} tries): the test says when, after the creates.
while tries < {minimum} or not os.path.exists("/tmp/cst-probe-stop"):
    if tries == 1:
        open("/tmp/cst-probe-up", "w").close()
    tries += 1
    s = socket.socket()
    s.settimeout(0.05)  # replies are local; REJECTs past the ICMP rate limit are silent
    try:
        s.connect(("{ip}", {port}))
        hits += 1
    except OSError:
        pass
    finally:
        s.close()
open("/tmp/cst-probe.tmp", "w").write(f"{{tries}} {{hits}}")
__import__("os").rename("/tmp/cst-probe.tmp", "/tmp/cst-probe")
"""


def test_fence_stays_closed_while_other_spaces_are_created(
        node: Served, pair: tuple[str, str], netns_host: NetnsHost,
        docker_api: docker.APIClient) -> None:
    """Creating a space re-installs the rules of its bridge; a space already on that bridge
    must not get through while that happens."""
    listener = netns_host.listener()
    out_chain, _ = clawdspace.Firewall.chains(
        clawdspace.Firewall.bridge_name(f"{NODE_PREFIX}net"))
    open_states: list[str] = []
    stop = threading.Event()

    def watch_rules() -> None:  # the same question, asked of the rules themselves
        while not stop.is_set():
            rules = iptables("-S", out_chain).stdout
            if "-d 10.0.0.0/8 -j REJECT" not in rules:
                open_states.append(rules)

    watcher = threading.Thread(target=watch_rules, daemon=True)
    probe = PROBE.format(minimum=61, ip=netns_host.ip, port=listener.port)
    in_container(docker_api, pair[1], "rm -f /tmp/cst-probe /tmp/cst-probe-up /tmp/cst-probe-stop")
    started = docker_api.exec_create(pair[1], ["python3", "-c", probe])
    docker_api.exec_start(started["Id"], detach=True)
    watcher.start()
    try:
        wait_until(lambda: in_container(docker_api, pair[1], "test -e /tmp/cst-probe-up")[0] == 0,
                   timeout=60, what="the probe started")
        for _ in range(3):  # each create rebuilds the chains of the bridge both spaces are on
            create(node, {"name": unique_name("churn"), "memory": "64m"})
    finally:
        stop.set()
        watcher.join()
        in_container(docker_api, pair[1], "touch /tmp/cst-probe-stop")
    wait_until(lambda: in_container(docker_api, pair[1], "test -e /tmp/cst-probe")[0] == 0,
               timeout=60, what="the probe finished")
    code, out = in_container(docker_api, pair[1], "cat /tmp/cst-probe")
    assert code == 0, out
    tries, hits = map(int, out.split())
    assert tries > 60, f"the probe ran only {tries} times"
    assert (hits, listener.connections(), len(open_states)) == (0, 0, 0), \
        f"{hits} of {tries} connections from an internet space reached {netns_host.ip} " \
        f"while other spaces were created on its bridge; the chain lacked its REJECT rules " \
        f"in {len(open_states)} samples, e.g. {open_states[:1]}"


def test_node_api_is_unreachable_from_a_space(node: Served, pair: tuple[str, str], control: str,
                                              netns_host: NetnsHost,
                                              docker_api: docker.APIClient) -> None:
    port = urlsplit(node.url).port
    gateway = gateway_of(docker_api, f"{NODE_PREFIX}net")
    docker0 = docker_api.inspect_container(control)["NetworkSettings"]["Gateway"]  # docker0's
    status, body = http_json("GET", f"http://{gateway}:{port}/api/health", timeout=10)
    assert status == 200, body  # from the host it answers on the bridge's address
    for address in (gateway, docker0, netns_host.gateway):
        assert not curl(docker_api, pair[0], f"http://{address}:{port}/api/health"), \
            f"a space reached the node's API at {address}:{port}"
    # The fence is ours and scoped: an ordinary container still reaches the port.
    assert curl(docker_api, control, f"http://{docker0}:{port}/api/health")


def test_offline_space_has_no_network_at_all(node: Served, netns_host: NetnsHost,
                                             docker_api: docker.APIClient) -> None:
    name = unique_name("offl")
    made = create(node, {"name": name, "template": "offline", "memory": "128m"})
    assert made["network"] == "none" and made["template"] == "offline"
    container = f"{NODE_PREFIX}{name}"
    info = docker_api.inspect_container(container)
    assert info["HostConfig"]["NetworkMode"] == "none"
    assert info["Config"]["Labels"]["clawdspace.network"] == "none"
    code, out = in_container(docker_api, container, "ls /sys/class/net")
    assert code == 0 and out.split() == [b"lo"], out
    # Only with no interface but lo can a lookup go nowhere; now try one, and a raw datagram.
    code, out = in_container(docker_api, container, "getent hosts cst-offline.test")
    assert code != 0, out
    listener = netns_host.listener()
    assert not curl(docker_api, container, f"http://{netns_host.ip}:{listener.port}/")
    probe = (f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
             f"s.sendto(b'x', ('{netns_host.ip}', 53))")
    code, out = in_container(docker_api, container, f'python3 -c "{probe}"')
    assert code != 0 and b"unreachable" in out.lower(), out
    assert listener.connections() == 0


def test_allow_cidrs_template_opens_exactly_that_range(node: Served, netns_host: NetnsHost,
                                                       docker_api: docker.APIClient) -> None:
    template = f"cst-lab-{secrets.token_hex(2)}"
    text = f"name: {template}\nnetwork:\n  mode: internet\n  allowCidrs: [{netns_host.subnet}]\n"
    status, body = node.request("PUT", "/api/templates", {"yaml": text})
    assert status == 200, body
    assert body["template"]["network"]["allowCidrs"] == [netns_host.subnet]
    name = unique_name("lab")
    create(node, {"name": name, "template": template, "memory": "128m"})
    container = f"{NODE_PREFIX}{name}"
    digest = hashlib.sha256(netns_host.subnet.encode()).hexdigest()[:8]
    network = f"{NODE_PREFIX}net-{digest}"
    mode, _ = network_of(docker_api, container)
    assert mode == network
    assert docker_api.inspect_network(network)["Labels"]["clawdspace.allow"] == netns_host.subnet

    listener = netns_host.listener()
    assert curl(docker_api, container, f"http://{netns_host.ip}:{listener.port}/"), \
        "allowCidrs did not open the test host's subnet"
    assert listener.connections() == 1
    for address in (netns_host.link_local, netns_host.cgnat):
        assert not curl(docker_api, container, f"http://{address}:{listener.port}/"), address
    port = urlsplit(node.url).port
    for address in (gateway_of(docker_api, network), netns_host.gateway):
        assert not curl(docker_api, container, f"http://{address}:{port}/api/health"), \
            f"allowCidrs opened the node itself at {address}"
    assert listener.connections() == 1, listener.events()
    node.request("DELETE", f"/api/templates/{template}")


# ---------------------------------------------------------------------------------------------
# Installation is idempotent, and the housekeeper's check repairs missing jumps
# ---------------------------------------------------------------------------------------------

async def test_check_reinstalls_missing_jumps(make_client: MakeClient,
                                              docker_api: docker.APIClient) -> None:
    own_prefix = f"{SESSION_PREFIX}fw-"  # nobody else's housekeeper repairs this one for us
    api = await make_client(prefix=own_prefix)
    firewall = api.app[clawdspace.FIREWALL_KEY]
    try:
        network = await firewall.network_for("internet", ())
        assert network == f"{own_prefix}net"
        assert await firewall.network_for("internet", ()) == network  # again: idempotent
        bridge = clawdspace.Firewall.bridge_name(network)
        out_chain, in_chain = clawdspace.Firewall.chains(bridge)
        assert jump_count("DOCKER-USER", bridge, out_chain) == 1
        assert jump_count("INPUT", bridge, in_chain) == 1
        rules_before = iptables("-S", out_chain).stdout

        assert iptables("-D", "DOCKER-USER", "-i", bridge, "-j", out_chain).returncode == 0
        assert iptables("-D", "INPUT", "-i", bridge, "-j", in_chain).returncode == 0
        assert jump_count("DOCKER-USER", bridge, out_chain) == 0

        assert await firewall.check() is True
        assert jump_count("DOCKER-USER", bridge, out_chain) == 1
        assert jump_count("INPUT", bridge, in_chain) == 1
        assert iptables("-S", out_chain).stdout == rules_before
        assert firewall.status() == {"enabled": True, "active": True, "error": None}
        health = await api.get("/api/health")
        assert health.body["firewall"]["active"] is True

        assert await firewall.check() is True  # nothing missing: nothing added
        assert jump_count("DOCKER-USER", bridge, out_chain) == 1
    finally:
        remove_prefix_networks(docker_api, own_prefix)


def test_block_cidrs_refuse_what_allow_cidrs_would_open_and_lan_mode_opens_the_lan(
        node: Served, netns_host: NetnsHost, docker_api: docker.APIClient) -> None:
    """The earlier server's template fields: blockCidrs (refused first) and mode lan."""
    listener = netns_host.listener()
    url = f"http://{netns_host.ip}:{listener.port}/"
    names = []
    for label, network in (
            ("blk", f"  mode: internet\n  allowCidrs: [{netns_host.subnet}]\n"
                    f"  blockCidrs: [{netns_host.ip}/32]\n"),
            ("lan", "  mode: lan\n")):
        template = f"cst-{label}-{secrets.token_hex(2)}"
        status, body = node.request("PUT", "/api/templates", {
            "yaml": f"name: {template}\nmanaged: false\nnetwork:\n{network}"})
        assert status == 200, body
        name = unique_name(label)
        create(node, {"name": name, "template": template, "memory": "128m"})
        names.append((name, template, body["template"]))
    (blocked, _, shown), (lan, _, lan_shown) = names
    assert shown["network"]["blockCidrs"] == [f"{netns_host.ip}/32"]
    assert lan_shown["network"]["mode"] == "internet"
    assert "10.0.0.0/8" in lan_shown["network"]["allowCidrs"]
    assert not curl(docker_api, f"{NODE_PREFIX}{blocked}", url), "blockCidrs let it through"
    assert listener.connections() == 0
    assert curl(docker_api, f"{NODE_PREFIX}{lan}", url), "lan mode did not open the LAN"
    for address in (netns_host.link_local, netns_host.cgnat):
        assert not curl(docker_api, f"{NODE_PREFIX}{lan}", f"http://{address}:{listener.port}/")
    port = urlsplit(node.url).port
    assert not curl(docker_api, f"{NODE_PREFIX}{lan}",
                    f"http://{netns_host.gateway}:{port}/api/health"), "lan opened the node"
    for name, template, _ in names:
        node.request("DELETE", f"/api/spaces/{name}?removeVolume=true")
        node.request("DELETE", f"/api/templates/{template}")
