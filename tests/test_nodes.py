"""Nodes: discovery (static list and Tailscale), peer probing without leaking the key, the
cluster view of spaces, and forwarding requests (exec, files, terminal) to another node.

Several real service processes share the engine on loopback addresses, one port for all (as
Tailscale discovery assumes): a = 127.0.0.2, b = 127.0.0.3, c = 127.0.0.4 (started late), each
with its own prefix. Fake peers (tests/support/fakes.py) stand for laptops, redirectors and slow
machines on 127.0.0.5 and up. Nothing but loopback is ever contacted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest
from conftest import (
    SESSION_KEY,
    Instances,
    MakeClient,
    Reply,
    Served,
    Terminal,
    container_exists,
    in_container,
    port_free_on,
    remove_everything,
    unique_name,
)
from support.fakes import (
    CLAWDSPACE_HEALTH,
    FakePeer,
    hang,
    in_pieces,
    json_answer,
    redirect,
    tailscale_calls,
    trickle,
    wait_until,
)
from support.fakes import fake_tailscale as write_fake_tailscale

import clawdspace

A, B, C = "127.0.0.2", "127.0.0.3", "127.0.0.4"
PEER1, PEER2, PEER3, PEER4, PEER5, PEER6 = (f"127.0.0.{n}" for n in range(5, 11))
DEAD = "127.0.0.11"  # nothing ever listens there
ALL_HOSTS = ["127.0.0.1", A, B, C, PEER1, PEER2, PEER3, PEER4, PEER5, PEER6, DEAD]
CLIENT_TIMEOUT = 15  # no call may take longer: a dead or slow node must never hang a request
NODE_KEYS = {"name", "url", "status", "latencyMs", "capabilities"}
FAKE_CAPS = {"gpu": True, "gpuName": "Fake GPU", "gpuMemory": "1024 MiB", "gpuCount": 1,
             "gpus": [], "arch": "x64", "platform": "linux", "cpus": 1, "memory": 1 << 30}


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Cluster:
    """Nodes a and b running, c known to them but not started, d dead, q with '=' in its URL."""

    port: int
    prefix: str  # every instance prefix of this module starts with it
    nodes: str  # the CLAWDSPACE_NODES setting every node gets
    a: Served
    b: Served
    instances: Instances

    def url(self, host: str) -> str:
        return f"http://{host}:{self.port}"

    def instance_prefix(self, name: str) -> str:
        return f"{self.prefix}{name}-"

    def start(self, name: str, host: str, **env: str) -> Served:
        """Another instance at ``host`` on the cluster's port, knowing the cluster's nodes."""
        variables = {"CLAWDSPACE_NODES": self.nodes, "CLAWDSPACE_NODES_REFRESH": "3600",
                     "CLAWDSPACE_TAILSCALE": "/nonexistent/tailscale", **env}
        return self.instances.start(host, self.port, self.instance_prefix(name), variables)


@pytest.fixture(scope="module")
def cluster(instances: Instances, prefix: str, docker_api: docker.APIClient) -> Iterator[Cluster]:
    port = port_free_on(ALL_HOSTS)
    nodes = ",".join([f"a=http://{A}:{port}", f"b=http://{B}:{port}", f"c=http://{C}:{port}",
                      f"d=http://{DEAD}:{port}", f"q=http://{DEAD}:{port}/?token=x=y"])
    module_prefix = f"{prefix}nd"
    made: list[Served] = []

    def named(name: str, host: str) -> Served:
        served = instances.start(host, port, f"{module_prefix}{name}-", {
            "CLAWDSPACE_NODES": nodes, "CLAWDSPACE_NODE_NAME": name,
            "CLAWDSPACE_URL": f"http://{host}:{port}", "CLAWDSPACE_NODES_REFRESH": "3600",
            "CLAWDSPACE_TAILSCALE": "/nonexistent/tailscale"})
        made.append(served)
        return served

    try:
        yield Cluster(port, module_prefix, nodes, named("a", A), named("b", B), instances)
    finally:
        remove_everything(docker_api, module_prefix)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session whose every request gives up after CLIENT_TIMEOUT seconds."""
    async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)) as session:
        yield session


async def call(session: aiohttp.ClientSession, method: str, url: str, *,
               key: str | None = SESSION_KEY, headers: dict[str, str] | None = None,
               **kwargs: Any) -> Reply:
    """One request (Bearer ``key`` unless None); the JSON body parsed."""
    headers = dict(headers or {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with session.request(method, url, headers=headers, **kwargs) as resp:
        raw = await resp.read()
        body: Any = raw
        if resp.content_type == "application/json":
            body = json.loads(raw)
        return Reply(resp.status, body, resp.content_type, dict(resp.headers))


async def nodes_of(session: aiohttp.ClientSession, base: str, refresh: bool = True,
                   key: str = SESSION_KEY) -> dict[str, dict[str, Any]]:
    """GET /api/nodes (refreshed unless told otherwise) as {name: node}, checking its shape."""
    reply = await call(session, "GET", f"{base}/api/nodes" + ("?refresh=1" if refresh else ""),
                       key=key)
    assert reply.status == 200, reply.body
    assert set(reply.body) == {"nodes", "lastUpdatedAt"}, reply.body
    assert isinstance(reply.body["lastUpdatedAt"], int)
    assert abs(reply.body["lastUpdatedAt"] / 1000 - time.time()) < 3600
    found: dict[str, dict[str, Any]] = {}
    for node in reply.body["nodes"]:
        assert set(node) >= NODE_KEYS, node
        assert node["name"] not in found, f"{node['name']} listed twice: {reply.body}"
        found[node["name"]] = node
    return found


def assert_offline(node: dict[str, Any]) -> None:
    assert node["status"] == "offline", node
    assert node["latencyMs"] is None and node["capabilities"] is None, node
    assert isinstance(node.get("error"), str) and node["error"], node


def no_key_in(seen: list[Any]) -> None:
    """None of these recorded requests carried a credential."""
    for request in seen:
        assert "Authorization" not in request.headers, request
        assert SESSION_KEY not in json.dumps(request.headers), request
        assert SESSION_KEY not in request.path and "key=" not in request.path, request


# ---------------------------------------------------------------------------------------------
# Settings and Tailscale status parsing (pure logic)
# ---------------------------------------------------------------------------------------------

def test_parse_nodes_setting() -> None:
    text = (" a=http://10.0.0.1:7777 , b = https://b.example:8443/ ,"
            "q=http://q.example:7777/base?token=x=y==,,noequals, =http://x:1,empty=")
    assert clawdspace.parse_nodes_setting(text) == [
        ("a", "http://10.0.0.1:7777"),
        ("b", "https://b.example:8443"),
        ("q", "http://q.example:7777/base?token=x=y=="),
    ]
    assert clawdspace.parse_nodes_setting("") == []
    for bad in ("x=ftp://host:21", "x=host:7777", "x=file:///etc/passwd"):
        with pytest.raises(clawdspace.ConfigError):
            clawdspace.parse_nodes_setting(bad)


def ts_node(host: str, ips: list[str], dns: str = "", online: bool = True,
            tags: list[str] | None = None) -> dict[str, Any]:
    """One node of ``tailscale status --json`` (the fields discovery reads, real spelling)."""
    node: dict[str, Any] = {"ID": secrets.token_hex(4), "PublicKey": f"nodekey:{host}",
                            "HostName": host, "DNSName": dns, "OS": "linux",
                            "TailscaleIPs": ips, "Online": online, "Active": online,
                            "Relay": "fra", "ExitNode": False}
    if tags is not None:
        node["Tags"] = tags
    return node


def ts_status(me: dict[str, Any], *peers: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "1.76.6-fake", "TUN": True, "BackendState": "Running",
            "Self": me, "MagicDNSSuffix": "tailnet.ts.net", "CurrentTailnet": {
                "Name": "example.com", "MagicDNSSuffix": "tailnet.ts.net",
                "MagicDNSEnabled": True},
            "Peer": {f"nodekey:{secrets.token_hex(8)}": peer for peer in peers}}


def test_tailscale_targets_magicdns_wins() -> None:
    status = ts_status(
        ts_node("me", ["100.64.0.1", "fd7a:115c:a1e0::1"], "me.tailnet.ts.net."),
        ts_node("gpu1", ["100.64.0.2", "fd7a:115c:a1e0::2"], "gpu1.tailnet.ts.net.",
                tags=["tag:clawdspace"]),
        ts_node("plain", ["fd7a:115c:a1e0::3", "100.64.0.3"]),  # IPv6 first: IPv4 is used
        ts_node("", ["100.64.0.4"], "nohost.tailnet.ts.net."),  # name from the DNS name
        ts_node("sleeping", ["100.64.0.5"], "sleeping.tailnet.ts.net.", online=False),
        ts_node("v6only", ["fd7a:115c:a1e0::6"]),  # no IPv4 and no DNS name: no URL
    )
    me, peers = clawdspace.tailscale_targets(status, 7777, None)
    assert me == {"name": "me", "url": "http://me.tailnet.ts.net:7777"}
    assert sorted(peers) == [
        ("gpu1", "http://gpu1.tailnet.ts.net:7777"),
        ("nohost", "http://nohost.tailnet.ts.net:7777"),
        ("plain", "http://100.64.0.3:7777"),
    ]
    _, tagged = clawdspace.tailscale_targets(status, 7777, "tag:clawdspace")
    assert tagged == [("gpu1", "http://gpu1.tailnet.ts.net:7777")]
    me, peers = clawdspace.tailscale_targets({"Self": ts_node("lonely", ["100.64.0.9"])}, 1, None)
    assert me == {"name": "lonely", "url": "http://100.64.0.9:1"} and peers == []
    assert clawdspace.tailscale_targets({}, 7777, None) == (None, [])


def test_tailscale_targets_hostile_names() -> None:
    huge = "h" * (1 << 20)
    status = ts_status(
        ts_node("me", ["100.64.0.1"]),
        ts_node("evil\nname\x1b[31m\u2028", ["100.64.0.2"]),
        ts_node(huge, ["100.64.0.3"]),
        ts_node("dns", ["100.64.0.4"], "bad\nname.tailnet.ts.net."),
        ts_node("slash", ["100.64.0.5"], "a/b@c.tailnet.ts.net."),
        ts_node("ipword", ["100.64.0.6; rm -rf /"]),
        ts_node("ipesc", ["\x1b[2J"]),
    )
    me, peers = clawdspace.tailscale_targets(status, 7777, None)
    assert me is not None and me["name"] == "me"
    urls = {url for _, url in peers}
    assert "http://100.64.0.2:7777" in urls and "http://100.64.0.3:7777" in urls
    for name, url in peers:
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,63}", name), name
        assert re.fullmatch(r"http://[A-Za-z0-9.-]+:7777", url), url
    assert len(peers) == 2, peers  # hostile DNS names and addresses are dropped


# ---------------------------------------------------------------------------------------------
# The node list of a static cluster
# ---------------------------------------------------------------------------------------------

async def test_nodes_lists_self_and_peers(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    nodes = await nodes_of(http, cluster.a.url)
    assert sorted(nodes) == ["a", "b", "c", "d", "q"]
    me = nodes["a"]
    assert me["self"] is True and me["status"] == "online", me
    assert me["url"] == cluster.url(A)
    assert me["capabilities"]["gpu"] is False and me["capabilities"]["cpus"] == os.cpu_count()
    peer = nodes["b"]
    assert peer["self"] is False and peer["status"] == "online", peer
    assert peer["url"] == cluster.url(B)
    assert isinstance(peer["latencyMs"], int) and 0 <= peer["latencyMs"] < CLIENT_TIMEOUT * 1000
    assert peer["capabilities"]["gpu"] is False and peer["capabilities"]["gpuCount"] == 0
    assert {"gpus", "arch", "platform", "cpus", "memory"} <= set(peer["capabilities"])
    assert_offline(nodes["c"])
    assert_offline(nodes["d"])
    assert nodes["q"]["url"] == f"http://{DEAD}:{cluster.port}/?token=x=y"
    assert_offline(nodes["q"])
    # And from b's side: b is itself, a a peer.
    from_b = await nodes_of(http, cluster.b.url, refresh=False)
    assert from_b["b"]["self"] is True and from_b["b"]["url"] == cluster.url(B)
    assert from_b["a"]["self"] is False and from_b["a"]["status"] == "online"


async def test_nodes_needs_the_key(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    reply = await call(http, "GET", f"{cluster.a.url}/api/nodes", key=None)
    assert reply.status == 401 and reply.error_code() == "unauthorized", reply.body


async def test_late_node_appears_on_refresh_and_dead_node_goes_offline(
        cluster: Cluster, http: aiohttp.ClientSession) -> None:
    assert_offline((await nodes_of(http, cluster.a.url))["c"])
    c = cluster.start("c", C)  # no CLAWDSPACE_NODE_NAME, no CLAWDSPACE_URL
    try:
        cached = await nodes_of(http, cluster.a.url, refresh=False)
        assert cached["c"]["status"] == "offline", "answered from the cache, not probed again"
        fresh = await nodes_of(http, cluster.a.url)
        assert fresh["c"]["status"] == "online", fresh["c"]
        assert fresh["c"]["capabilities"]["gpu"] is False
        # c names itself after its host and puts its real port in its URL.
        from_c = await nodes_of(http, c.url, refresh=False)
        me = [node for node in from_c.values() if node.get("self")]
        assert len(me) == 1, from_c
        assert me[0]["name"] == socket.gethostname()
        assert me[0]["url"] == f"http://{socket.gethostname()}:{cluster.port}"
    finally:
        cluster.instances.stop(c)
    after = await nodes_of(http, cluster.a.url)
    assert_offline(after["c"])
    assert after["b"]["status"] == "online"


# ---------------------------------------------------------------------------------------------
# The cluster view
# ---------------------------------------------------------------------------------------------

async def create_on(session: aiohttp.ClientSession, base: str, name: str,
                    node: str | None = None, **fields: Any) -> dict[str, Any]:
    """Create a small offline space (through ``base``, forwarded to ``node`` if given)."""
    query = f"?node={node}" if node else ""
    body = {"name": name, "memory": "64m", "network": "none", **fields}
    reply = await call(session, "POST", f"{base}/api/spaces{query}", json=body)
    assert reply.status == 201, reply.body
    return reply.body["space"]  # type: ignore[no-any-return]


async def delete_on(session: aiohttp.ClientSession, base: str, name: str) -> None:
    reply = await call(session, "DELETE", f"{base}/api/spaces/{name}?removeVolume=true")
    assert reply.status in (200, 404), reply.body


async def test_cluster_view_merges_nodes(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    on_a, on_b = unique_name("ca"), unique_name("cb")
    try:
        await create_on(http, cluster.a.url, on_a)
        await create_on(http, cluster.b.url, on_b)
        await nodes_of(http, cluster.a.url)
        for base in (cluster.a.url, cluster.b.url):
            reply = await call(http, "GET", f"{base}/api/spaces?scope=cluster")
            assert reply.status == 200, reply.body
            where = {s["name"]: s["node"] for s in reply.body["spaces"]}
            assert where.get(on_a) == "a" and where.get(on_b) == "b", reply.body
            assert reply.body["errors"] == [], reply.body
            assert all({"name", "status", "node"} <= set(s) for s in reply.body["spaces"])
        local = await call(http, "GET", f"{cluster.a.url}/api/spaces")
        names = {s["name"] for s in local.body["spaces"]}
        assert on_a in names and on_b not in names
        explicit = await call(http, "GET", f"{cluster.a.url}/api/spaces?scope=node")
        assert {s["name"] for s in explicit.body["spaces"]} == names
        bogus = await call(http, "GET", f"{cluster.a.url}/api/spaces?scope=bogus")
        assert bogus.status == 400 and bogus.error_code() == "invalid_scope", bogus.body
    finally:
        await delete_on(http, cluster.a.url, on_a)
        await delete_on(http, cluster.b.url, on_b)


async def test_cluster_view_and_forwarding_survive_a_dead_node(
        cluster: Cluster, http: aiohttp.ClientSession, docker_api: docker.APIClient) -> None:
    on_a, on_c = unique_name("ca"), unique_name("cc")
    c = cluster.start("c", C, CLAWDSPACE_NODE_NAME="c", CLAWDSPACE_URL=cluster.url(C))
    try:
        await create_on(http, cluster.a.url, on_a)
        await create_on(http, c.url, on_c)
        assert (await nodes_of(http, cluster.a.url))["c"]["status"] == "online"
        view = await call(http, "GET", f"{cluster.a.url}/api/spaces?scope=cluster")
        assert {s["name"]: s["node"] for s in view.body["spaces"]}.get(on_c) == "c", view.body
        cluster.instances.stop(c)  # a still believes c is online
        view = await call(http, "GET", f"{cluster.a.url}/api/spaces?scope=cluster")
        assert view.status == 200, view.body
        where = {s["name"]: s["node"] for s in view.body["spaces"]}
        assert where.get(on_a) == "a" and on_c not in where, view.body
        assert [e["node"] for e in view.body["errors"]] == ["c"], view.body
        assert view.body["errors"][0]["error"], view.body
        # Forwarding to it: a clear 502 naming c, not a hang.
        reply = await call(http, "GET", f"{cluster.a.url}/api/spaces/{on_c}?node=c")
        assert reply.status in (502, 504), reply.body
        assert reply.error_code() in ("node_unreachable", "node_timeout")
        assert re.search(r"\bnode c\b", reply.body["error"]), reply.body
    finally:
        cluster.instances.stop(c)
        await delete_on(http, cluster.a.url, on_a)
        remove_everything(docker_api, cluster.instance_prefix("c"))


# ---------------------------------------------------------------------------------------------
# Forwarding
# ---------------------------------------------------------------------------------------------

async def test_forwarding_exec_files_terminal_delete(
        cluster: Cluster, http: aiohttp.ClientSession, docker_api: docker.APIClient) -> None:
    a, name = cluster.a.url, unique_name("fw")
    b_container = f"{cluster.instance_prefix('b')}{name}"
    try:
        space = await create_on(http, a, name, node="b")
        assert space["name"] == name
        assert container_exists(docker_api, b_container)
        assert not container_exists(docker_api, f"{cluster.instance_prefix('a')}{name}")
        on_a = await call(http, "GET", f"{a}/api/spaces/{name}")
        assert on_a.status == 404, "the space is b's, not a's"
        got = await call(http, "GET", f"{a}/api/spaces/{name}", headers={
            "X-Clawdspace-Node": "b"})
        assert got.status == 200 and got.body["space"]["name"] == name, got.body

        # exec, named by the header: the command runs in b's container.
        token = secrets.token_hex(8)
        reply = await call(http, "POST", f"{a}/api/spaces/{name}/exec",
                           headers={"X-Clawdspace-Node": "b"},
                           json={"command": f"echo {token} | tee /workspace/marker"})
        assert reply.status == 200, reply.body
        assert reply.body["exitCode"] == 0 and reply.body["stdout"].strip() == token
        code, out = in_container(docker_api, b_container, "cat /workspace/marker")
        assert code == 0 and out.decode().strip() == token

        # files: raw upload and download of a few MB, byte for byte.
        data = os.urandom(3 << 20)
        put = await call(http, "PUT", f"{a}/api/spaces/{name}/file?path=/big.bin&node=b",
                         data=io.BytesIO(data), headers={
                             "Content-Type": "application/octet-stream",
                             "Content-Length": str(len(data))})
        assert put.status == 200, put.body
        got_raw = await call(http, "GET", f"{a}/api/spaces/{name}/file?path=/big.bin&raw=true"
                             "&node=b")
        assert got_raw.status == 200, got_raw.body
        assert hashlib.sha256(got_raw.body).hexdigest() == hashlib.sha256(data).hexdigest()
        code, out = in_container(docker_api, b_container, "sha256sum /workspace/big.bin")
        assert out.decode().split()[0] == hashlib.sha256(data).hexdigest()
        listing = await call(http, "GET", f"{a}/api/spaces/{name}/files?path=/&node=b")
        assert listing.status == 200, listing.body
        assert "big.bin" in json.dumps(listing.body)

        # terminal websocket through a
        async with http.ws_connect(f"{a}/api/spaces/{name}/terminal?node=b",
                                   headers={"Authorization": f"Bearer {SESSION_KEY}"}) as ws:
            term = Terminal(ws)
            await term.type("echo term-$((6*7))-$(cat /workspace/marker)\n")
            await term.expect(f"term-42-{token}")
            await term.type("exit\n")
            assert await term.closed() == 1000

        # A terminal b refuses (no such space) is refused through a with b's status.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with http.ws_connect(f"{a}/api/spaces/{name}-none/terminal?node=b",
                                       headers={"Authorization": f"Bearer {SESSION_KEY}"}):
                pass
        assert refused.value.status == 404

        deleted = await call(http, "DELETE", f"{a}/api/spaces/{name}?removeVolume=true&node=b")
        assert deleted.status == 200, deleted.body
        assert not container_exists(docker_api, b_container)
    finally:
        await delete_on(http, cluster.b.url, name)


async def test_forwarding_errors_and_auth(cluster: Cluster, http: aiohttp.ClientSession,
                                          docker_api: docker.APIClient) -> None:
    a = cluster.a.url
    unknown = await call(http, "GET", f"{a}/api/spaces?node=nope")
    assert unknown.status == 404 and unknown.error_code() == "unknown_node", unknown.body
    header = await call(http, "GET", f"{a}/api/spaces", headers={"X-Clawdspace-Node": "nope"})
    assert header.status == 404 and header.error_code() == "unknown_node", header.body

    dead = await call(http, "GET", f"{a}/api/spaces?node=d")
    assert dead.status in (502, 504), dead.body
    assert dead.error_code() in ("node_unreachable", "node_timeout")
    assert re.search(r"\bd\b", dead.body["error"]), dead.body

    # No key (or a wrong one) on a: refused there, never sent on to b.
    probe_name = unique_name("nokey")
    for key in (None, "wrong-key"):
        refused = await call(http, "GET", f"{a}/api/spaces/{probe_name}?node=b", key=key)
        assert refused.status == 401 and refused.error_code() == "unauthorized", refused.body
        refused = await call(http, "GET", f"{a}/api/spaces/{probe_name}", key=key,
                             headers={"X-Clawdspace-Node": "b"})
        assert refused.status == 401, refused.body
    assert probe_name not in cluster.b.log()
    allowed = await call(http, "GET", f"{a}/api/spaces/{probe_name}?node=b")
    assert allowed.status == 404 and allowed.error_code() == "not_found", allowed.body
    wait_until(lambda: probe_name in cluster.b.log(), what="b logs the forwarded request")

    # A key in the query on a is passed on as a header (and works).
    query_key = await call(http, "GET", f"{a}/api/spaces?node=b&key={SESSION_KEY}", key=None)
    assert query_key.status == 200, query_key.body

    # The node's own name: handled here, not forwarded.
    name = unique_name("self")
    try:
        await create_on(http, a, name, node="a")
        assert container_exists(docker_api, f"{cluster.instance_prefix('a')}{name}")
        assert not container_exists(docker_api, f"{cluster.instance_prefix('b')}{name}")
    finally:
        await delete_on(http, a, name)


async def test_a_node_listed_under_another_name_is_itself(
        cluster: Cluster, http: aiohttp.ClientSession, docker_api: docker.APIClient) -> None:
    """A node whose list holds its own URL under a second name does not probe or forward to
    itself: the entry is dropped, so the cluster view never shows its spaces twice."""
    url = cluster.url(PEER6)
    solo = cluster.instances.start(PEER6, cluster.port, cluster.instance_prefix("solo"), {
        "CLAWDSPACE_NODE_NAME": "solo", "CLAWDSPACE_URL": url,
        "CLAWDSPACE_NODES": f"solo={url},alias={url}", "CLAWDSPACE_NODES_REFRESH": "3600",
        "CLAWDSPACE_TAILSCALE": "/nonexistent/tailscale"})
    name = unique_name("loop")
    try:
        nodes = await nodes_of(http, solo.url)
        assert nodes["solo"]["self"] is True and "alias" not in nodes, nodes
        await create_on(http, solo.url, name, node="solo")
        assert container_exists(docker_api, f"{cluster.instance_prefix('solo')}{name}")
        reply = await call(http, "GET", f"{solo.url}/api/spaces?scope=cluster")
        assert reply.status == 200, reply.body
        assert [s["name"] for s in reply.body["spaces"]].count(name) == 1
        reply = await call(http, "GET", f"{solo.url}/api/spaces?node=alias")
        assert reply.status == 404 and reply.body["code"] == "unknown_node", reply.body
        # A client cannot make a node forward a request marked as already forwarded.
        reply = await call(http, "GET", f"{solo.url}/api/spaces?node=alias",
                           headers={"X-Clawdspace-Forwarded": "x"})
        assert reply.status == 200, reply.body
    finally:
        await delete_on(http, solo.url, name)
        cluster.instances.stop(solo)
        remove_everything(docker_api, cluster.instance_prefix("solo"))


# ---------------------------------------------------------------------------------------------
# Probing peers: the key goes only to clawdspace nodes; slow peers never hang discovery
# ---------------------------------------------------------------------------------------------

async def test_key_goes_only_to_clawdspace_peers(make_client: MakeClient) -> None:
    port = port_free_on([PEER1, PEER2, PEER3, PEER4, PEER5, PEER6])
    laptop = FakePeer(PEER1, port, {"/api/health": json_answer({"status": "up"})})
    phone = FakePeer(PEER2, port)  # 404 everywhere
    gpubox = FakePeer(PEER3, port, {"/api/health": CLAWDSPACE_HEALTH,
                                    "/api/system/capabilities": json_answer(FAKE_CAPS)})
    catcher = FakePeer(PEER4, port, default=CLAWDSPACE_HEALTH)  # where redirects point
    bouncer = FakePeer(PEER5, port, {"/api/health": redirect(f"{catcher.url}/api/health")})
    sly = FakePeer(PEER6, port, {
        "/api/health": CLAWDSPACE_HEALTH,
        "/api/system/capabilities": redirect(f"{catcher.url}/api/system/capabilities", 307)})
    peers = [laptop, phone, gpubox, catcher, bouncer, sly]
    try:
        api = await make_client(nodes=",".join([
            f"laptop={laptop.url}", f"phone={phone.url}", f"gpubox={gpubox.url}",
            f"bouncer={bouncer.url}", f"sly={sly.url}"]), node_name="me")
        reply = await api.get("/api/nodes", params={"refresh": "1"})
        assert reply.status == 200, reply.body
        nodes = {n["name"]: n for n in reply.body["nodes"]}
        for name, fake in (("laptop", laptop), ("phone", phone), ("bouncer", bouncer)):
            assert nodes[name]["status"] != "online", nodes[name]
            assert nodes[name]["capabilities"] is None, nodes[name]
            assert fake.routes_seen() == {"/api/health"}, fake.requests()
            no_key_in(fake.requests())
        assert nodes["gpubox"]["status"] == "online", nodes["gpubox"]
        assert nodes["gpubox"]["capabilities"] == FAKE_CAPS
        health = [r for r in gpubox.requests() if r.route == "/api/health"]
        caps = [r for r in gpubox.requests() if r.route == "/api/system/capabilities"]
        no_key_in(health)
        assert caps and all(r.headers.get("Authorization") == f"Bearer {api.key}" for r in caps)
        assert nodes["sly"]["capabilities"] is None, nodes["sly"]
        assert catcher.requests() == [], "a redirect was followed"
        no_key_in([r for r in sly.requests() if r.route == "/api/health"])
        # Forwarding to a peer that is not clawdspace is refused: the key never goes there.
        for name in ("laptop", "phone", "bouncer"):
            forwarded = await api.get("/api/spaces", params={"node": name})
            assert forwarded.status == 502, forwarded.body
            assert forwarded.error_code() == "node_unreachable", forwarded.body
            assert name in forwarded.body["error"]
        for fake in (laptop, phone, bouncer, catcher):
            assert fake.routes_seen() <= {"/api/health"}, fake.requests()
            no_key_in(fake.requests())
        with_gpu = await api.post("/api/spaces", {"name": unique_name(), "gpu": True})
        assert with_gpu.status == 409 and with_gpu.error_code() == "no_gpu", with_gpu.body
        assert "gpubox" in with_gpu.body["error"], "the fake node says it has a GPU"
        assert "sly" not in with_gpu.body["error"] and "laptop" not in with_gpu.body["error"]
    finally:
        for fake in peers:
            fake.close()


def flood(handler: Any, stop: Any) -> None:
    """A health answer that never ends (1 GiB promised), as fast as the client takes it."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(1 << 30))
    handler.end_headers()
    chunk = b'{"status": "ok", "version": "' + b"x" * 65536
    sent = 0
    while sent < 1 << 30 and not stop.is_set():
        try:
            handler.wfile.write(chunk)
        except OSError:
            return
        sent += len(chunk)


async def test_slow_and_hostile_peers_do_not_hang_discovery(make_client: MakeClient) -> None:
    port = port_free_on([PEER1, PEER2, PEER3, PEER4])
    stuck = FakePeer(PEER1, port, {"/api/health": hang})
    slow = FakePeer(PEER2, port, {"/api/health": trickle})
    big = FakePeer(PEER3, port, {"/api/health": flood})
    node = FakePeer(PEER4, port, {"/api/health": CLAWDSPACE_HEALTH,
                                  "/api/system/capabilities": json_answer(FAKE_CAPS)})
    fakes = [stuck, slow, big, node]
    # 20 names for the stuck peer: more than the probes allowed at once.
    setting = [f"node={node.url}", f"slow={slow.url}", f"big={big.url}"] + [
        f"stuck{i:02d}={stuck.url}" for i in range(20)]
    try:
        api = await make_client(nodes=",".join(setting), node_name="me")
        listing = asyncio.ensure_future(api.get("/api/nodes", params={"refresh": "1"}))
        again = asyncio.ensure_future(api.get("/api/nodes", params={"refresh": "1"}))
        # Until the 16 probes allowed at once are all in (the peers see 16 open requests),
        # which is well before the first probe's timeout (3 s) lets another one start.
        wait_for_probes = asyncio.get_running_loop().run_in_executor(
            None, lambda: wait_until(lambda: len(stuck.requests()) >= 2 and sum(
                fake.active for fake in fakes) >= 16, what="16 probes at once"))
        await wait_for_probes
        at_once = len(stuck.requests())
        for path in ("/api/health", "/api/spaces", "/api/system/capabilities"):
            reply = await api.get(path)
            assert reply.status == 200, reply.body
            assert not listing.done(), f"{path} waited for discovery"
        reply = await asyncio.wait_for(listing, CLIENT_TIMEOUT + 30)
        assert reply.status == 200, reply.body
        nodes = {n["name"]: n for n in reply.body["nodes"]}
        assert nodes["node"]["status"] == "online", nodes["node"]
        for name in ["slow", "big"] + [f"stuck{i:02d}" for i in range(20)]:
            assert nodes[name]["status"] != "online", nodes[name]
            assert nodes[name]["capabilities"] is None, nodes[name]
        for name in [f"stuck{i:02d}" for i in range(20)]:
            assert_offline(nodes[name])
        assert (await asyncio.wait_for(again, CLIENT_TIMEOUT + 30)).status == 200
        assert len(stuck.requests()) == 20, "refreshes overlapped (or a name was skipped)"
        assert 1 < at_once <= 16, f"{at_once} probes at once"
        for fake in (stuck, slow, big):
            assert fake.routes_seen() == {"/api/health"}
            no_key_in(fake.requests())
        wait_until(lambda: big.active == 0 and slow.active == 0, timeout=10,
                   what="the probes hung up on the endless answers")
    finally:
        for fake in fakes:
            fake.close()


async def test_long_peer_answers_are_read_whole(make_client: MakeClient) -> None:
    """Over a real network (a tailnet's MTU is 1280) a capabilities answer of a few KB comes in
    several TCP segments; the probe must read all of it, as it does for the space list of the
    cluster view."""
    port = port_free_on([PEER1])
    caps = {**FAKE_CAPS, "gpuCount": 8, "gpus": [
        {"index": i, "uuid": f"GPU-{i:08d}-aaaa-bbbb-cccc-{i:012d}",
         "name": "NVIDIA H100 80GB HBM3", "memoryMiB": 81559, "memoryUsedMiB": 0,
         "utilizationPercent": 0} for i in range(8)]}
    spaces: list[dict[str, Any]] = [{"name": f"remote{i}", "status": "running", "gpu": False}
                                    for i in range(40)]
    node = FakePeer(PEER1, port, {"/api/health": CLAWDSPACE_HEALTH,
                                  "/api/system/capabilities": in_pieces(caps),
                                  "/api/spaces": in_pieces({"spaces": spaces})})
    try:
        api = await make_client(nodes=f"big={node.url}", node_name="me")
        reply = await api.get("/api/nodes", params={"refresh": "1"})
        big = {n["name"]: n for n in reply.body["nodes"]}["big"]
        assert big["status"] == "online", big
        assert big["capabilities"] == caps, big
        view = await api.get("/api/spaces", params={"scope": "cluster"})
        assert view.status == 200, view.body
        assert view.body["errors"] == [], view.body
        assert sorted(s["name"] for s in view.body["spaces"] if s["node"] == "big") == sorted(
            s["name"] for s in spaces)
    finally:
        node.close()


# ---------------------------------------------------------------------------------------------
# Tailscale discovery
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Tailnet:
    """Fake machines of a tailnet on the cluster's port: a laptop (not clawdspace, online), a
    phone (offline), and whatever answers for a MagicDNS name (``localhost.``) and its IP."""

    laptop: FakePeer
    phone: FakePeer
    by_dns: FakePeer
    by_ip: FakePeer
    status: dict[str, Any]

    def fakes(self) -> list[FakePeer]:
        return [self.laptop, self.phone, self.by_dns, self.by_ip]


@pytest.fixture
def tailnet(cluster: Cluster) -> Iterator[Tailnet]:
    port = cluster.port
    net = Tailnet(
        laptop=FakePeer(PEER1, port, {"/api/health": json_answer({"hello": "laptop"})}),
        phone=FakePeer(PEER2, port, default=CLAWDSPACE_HEALTH),
        by_dns=FakePeer("127.0.0.1", port, {"/api/health": json_answer({"hello": "dns"})}),
        by_ip=FakePeer(PEER3, port, default=CLAWDSPACE_HEALTH),
        status=ts_status(
            ts_node("me", [A, "fd7a:115c:a1e0::2"], "me.tailnet.ts.net."),
            ts_node("bee", [B], tags=["tag:clawdspace"]),
            ts_node("laptop", [PEER1], tags=["tag:laptops"]),
            ts_node("phone", [PEER2], online=False, tags=["tag:clawdspace"]),
            ts_node("dnsbox", [PEER3], "localhost."),
        ))
    try:
        yield net
    finally:
        for fake in net.fakes():
            fake.close()


async def test_tailscale_discovery(cluster: Cluster, tailnet: Tailnet, tmp_path: Path,
                                   make_client: MakeClient,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``tailscale`` found on PATH; peers without a DNS name are reached at their IP."""
    fake = write_fake_tailscale(tmp_path / "bin", tailnet.status)
    monkeypatch.setenv("PATH", f"{Path(fake).parent}:{os.environ['PATH']}")
    api = await make_client(port=cluster.port)  # tailscale: "tailscale", from PATH
    reply = await api.get("/api/nodes", params={"refresh": "1"})
    assert reply.status == 200, reply.body
    nodes = {n["name"]: n for n in reply.body["nodes"]}
    assert sorted(nodes) == ["bee", "dnsbox", "laptop", "me"], nodes
    assert nodes["me"]["self"] is True and nodes["me"]["status"] == "online"
    assert nodes["me"]["url"] == f"http://me.tailnet.ts.net:{cluster.port}"
    assert nodes["bee"]["url"] == cluster.url(B) and nodes["bee"]["status"] == "online"
    assert nodes["bee"]["capabilities"]["gpu"] is False
    assert nodes["laptop"]["status"] != "online" and nodes["laptop"]["capabilities"] is None
    assert nodes["dnsbox"]["url"] == f"http://localhost:{cluster.port}", "MagicDNS name wins"
    assert tailnet.laptop.routes_seen() == {"/api/health"}
    no_key_in(tailnet.laptop.requests())
    assert tailnet.phone.requests() == [], "an offline peer was probed"
    assert tailnet.by_ip.requests() == [], "the IP was used although a DNS name was there"
    assert tailnet.by_dns.routes_seen() == {"/api/health"}
    no_key_in(tailnet.by_dns.requests())
    assert all(args == "status --json" for _, args in tailscale_calls(tmp_path / "bin"))


async def test_tailscale_tag_filter_from_the_environment(
        cluster: Cluster, tailnet: Tailnet, tmp_path: Path,
        http: aiohttp.ClientSession, docker_api: docker.APIClient) -> None:
    """CLAWDSPACE_TAILSCALE and CLAWDSPACE_TAILSCALE_TAG, in a real process."""
    fake = write_fake_tailscale(tmp_path / "ts", tailnet.status)
    node = cluster.instances.start(C, cluster.port, cluster.instance_prefix("ts"), {
        "CLAWDSPACE_TAILSCALE": fake, "CLAWDSPACE_TAILSCALE_TAG": "tag:clawdspace",
        "CLAWDSPACE_NODES_REFRESH": "3600"})
    try:
        nodes = await nodes_of(http, node.url)
        assert sorted(nodes) == ["bee", "me"], nodes
        assert nodes["bee"]["status"] == "online"
        assert nodes["me"]["url"] == f"http://me.tailnet.ts.net:{cluster.port}"
        for fake_peer in tailnet.fakes():
            assert fake_peer.requests() == [], fake_peer.requests()
        # The tagged node serves forwarded requests like a static one.
        spaces = await call(http, "GET", f"{node.url}/api/spaces?node=bee")
        assert spaces.status == 200, spaces.body
    finally:
        cluster.instances.stop(node)


async def test_hostile_tailscale_names(cluster: Cluster, tmp_path: Path,
                                       make_client: MakeClient) -> None:
    port = cluster.port
    named = FakePeer(PEER1, port)
    huge = FakePeer(PEER2, port)
    bad_dns = FakePeer(PEER3, port)
    fakes = [named, huge, bad_dns]
    status = ts_status(
        ts_node("me\n\x1b[31mroot", [A]),
        ts_node("evil\nname\x1b]0;pwned\x07", [PEER1]),
        ts_node("x" * (1 << 20), [PEER2], "y" * (1 << 20) + "."),
        ts_node("baddns", [PEER3], "bad\nname.\x1b[2J.ts.net."),
    )
    try:
        api = await make_client(port=port, tailscale=write_fake_tailscale(tmp_path, status))
        reply = await api.get("/api/nodes", params={"refresh": "1"})
        assert reply.status == 200, reply.body
        text = json.dumps(reply.body)
        assert len(text) < 64 << 10, "a 1 MB name came back"
        for node in reply.body["nodes"]:
            assert re.fullmatch(r"[A-Za-z0-9._-]{1,63}", node["name"]), node["name"]
            assert re.fullmatch(r"https?://[A-Za-z0-9.-]+:\d+", node["url"]), node["url"]
        nodes = {n["name"]: n for n in reply.body["nodes"]}
        assert any(n.get("self") for n in nodes.values())
        assert named.routes_seen() == {"/api/health"}
        for fake in fakes:
            no_key_in(fake.requests())
        assert bad_dns.requests() == []
        health = await api.get("/api/health")
        assert health.status == 200
    finally:
        for fake in fakes:
            fake.close()


@pytest.mark.parametrize("output", ["[1, 2, 3]", '{"Self": "me", "Peer": ["x"]}',
                                    '{"Self": null, "Peer": {"k": null}}', "garbage"])
async def test_odd_tailscale_output_keeps_self(make_client: MakeClient, tmp_path: Path,
                                               output: str) -> None:
    fake = write_fake_tailscale(tmp_path, None)
    (tmp_path / "status.json").write_text(output)
    api = await make_client(tailscale=fake, port=7777, node_name="me")
    reply = await api.get("/api/nodes", params={"refresh": "1"})
    assert reply.status == 200, reply.body
    assert [(n["name"], n["self"]) for n in reply.body["nodes"]] == [("me", True)]


async def test_tailscale_that_hangs_times_out_off_the_request_path(
        make_client: MakeClient, tmp_path: Path) -> None:
    status = ts_status(ts_node("me", [A]))
    hang = 60  # seconds the fake tailscale would take; discovery gives up on it long before
    fake = write_fake_tailscale(tmp_path, status, sleep=hang)
    api = await make_client(tailscale=fake, port=7777)  # discovery starts with the app
    await asyncio.get_running_loop().run_in_executor(
        None, lambda: wait_until(lambda: tailscale_calls(tmp_path), what="tailscale called"))
    started = time.monotonic()
    listing = asyncio.ensure_future(api.get("/api/nodes"))
    for path in ("/api/health", "/api/spaces", "/api/system"):
        reply = await api.get(path)
        assert reply.status == 200, reply.body
    assert not listing.done(), "the node list did not wait for discovery?"
    reply = await asyncio.wait_for(listing, CLIENT_TIMEOUT)
    waited = time.monotonic() - started
    assert reply.status == 200, reply.body
    assert [(n["name"], n["self"]) for n in reply.body["nodes"]] == [(socket.gethostname(), True)]
    # Not the tailscale's own end (the bound on the time itself is CLIENT_TIMEOUT, above).
    assert waited < hang, f"discovery waited {waited:.1f} s for tailscale"
    pid = tailscale_calls(tmp_path)[0][0]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the hung tailscale was killed, not left behind


async def test_without_tailscale_the_node_lists_itself(make_client: MakeClient) -> None:
    api = await make_client(tailscale="/nonexistent/tailscale", port=7777)
    reply = await api.get("/api/nodes")
    assert reply.status == 200, reply.body
    assert len(reply.body["nodes"]) == 1, reply.body
    me = reply.body["nodes"][0]
    assert me["self"] is True and me["status"] == "online" and me["latencyMs"] == 0
    assert me["name"] == socket.gethostname()
    assert me["url"] == f"http://{socket.gethostname()}:7777"
    assert me["capabilities"]["gpu"] is False
    named = await make_client(tailscale="/nonexistent/tailscale", node_name="n1",
                              public_url="https://n1.example:8443")
    me = (await named.get("/api/nodes")).body["nodes"][0]
    assert (me["name"], me["url"]) == ("n1", "https://n1.example:8443")
