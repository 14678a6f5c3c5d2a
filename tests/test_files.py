"""The files API through HTTP: list, read, write, delete, raw streams, and hostile paths.

Every effect is checked inside the container through the engine (``in_container``), not only on
the service's word. Hostile symlinks are planted inside a space, as a sandboxed program would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import posixpath
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from conftest import (
    Api,
    MakeClient,
    Reply,
    Served,
    SpaceMaker,
    container_of,
    in_container,
    unique_name,
)
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from yarl import URL

WORKSPACE = "/workspace"
PASSWD_MARK = b"root:x:0:0"  # a line of the container's /etc/passwd: must never come back


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sh(docker_api: docker.APIClient, container: str, script: str, user: str = "") -> str:
    """Run a script in the container (engine, not service); it must succeed."""
    code, out = in_container(docker_api, container, script, user)
    assert code == 0, (script, code, out)
    return out.decode("utf-8", "replace")


def exists(docker_api: docker.APIClient, container: str, path: str) -> bool:
    code, _ = in_container(docker_api, container, f"test -e '{path}' || test -L '{path}'", "0")
    return code == 0


def sha256_in(docker_api: docker.APIClient, container: str, path: str) -> str:
    return sh(docker_api, container, f"sha256sum '{path}' | cut -d' ' -f1", "0").strip()


async def read(api: Api, name: str, path: str, **params: str) -> Reply:
    return await api.get(f"/api/spaces/{name}/file", params={"path": path, **params})


async def listing(api: Api, name: str, path: str | None, **params: str) -> Reply:
    query = dict(params) if path is None else {"path": path, **params}
    return await api.get(f"/api/spaces/{name}/files", params=query)


async def write(api: Api, name: str, path: str, data: bytes) -> Reply:
    return await api.call("PUT", f"/api/spaces/{name}/file", params={"path": path},
                          json={"contentBase64": b64(data)})


async def remove(api: Api, name: str, path: str, **params: str) -> Reply:
    return await api.delete(f"/api/spaces/{name}/file", params={"path": path, **params})


async def raw_get(api: Api, path_and_query: str) -> Reply:
    """A GET whose path and query go on the wire exactly as given (no client re-quoting)."""
    base = str(api.client.make_url("/")).rstrip("/")
    url = URL(base + path_and_query, encoded=True)
    headers = {"Authorization": f"Bearer {api.key}"}
    async with api.client.session.get(url, headers=headers) as resp:
        raw = await resp.read()
        body: Any = raw
        if resp.content_type == "application/json":
            body = json.loads(raw)
        return Reply(resp.status, body, resp.content_type, dict(resp.headers))


def content_of(reply: Reply) -> bytes:
    assert reply.status == 200, reply.body
    return base64.b64decode(reply.body["contentBase64"])


def assert_refused(reply: Reply, *statuses: int) -> None:
    """A 4xx JSON error that carries nothing from outside the workspace."""
    assert reply.status in statuses, (reply.status, reply.body)
    reply.error_code()
    assert PASSWD_MARK not in str(reply.body).encode()


def make_space(served: Served, docker_api: docker.APIClient, stem: str,
               setup: str) -> Iterator[str]:
    name = unique_name(stem)
    status, body = served.request("POST", "/api/spaces", {"name": name, "memory": "256m"})
    assert status == 201, body
    try:
        sh(docker_api, f"{served.prefix}{name}", setup)
        yield name
    finally:
        status, body = served.request("DELETE", f"/api/spaces/{name}?removeVolume=true")
        assert status == 200, body


# ---------------------------------------------------------------------------------------------
# Spaces shared by the tests that only read (or write under their own unique names)
# ---------------------------------------------------------------------------------------------

FILES_SETUP = (
    "cd /workspace && mkdir -p a/deep etc empty && printf hello > a/f.txt && "
    "printf 'inside-hosts\\n' > etc/hosts && printf 0123456789 > ten.txt && "
    "for i in 1 2 3 4 5; do printf x > many$i; done && printf zz > a/deep/z && "
    "ln -s a/f.txt link-to-f && ln -s / a/root && ln -s .. a/up"
)


@pytest.fixture(scope="module")
def files_space(served: Served, docker_api: docker.APIClient) -> Iterator[str]:
    """A space with a small known tree (and two symlinks: a/root -> /, a/up -> ..)."""
    yield from make_space(served, docker_api, "files", FILES_SETUP)


HOSTILE_SETUP = (
    "cd /workspace && mkdir -p data sub && printf inside > data/inside.txt && "
    "ln -s / root && ln -s /etc/shadow shadow && ln -s /etc etc && "
    "ln -s /etc/passwd c2 && ln -s c2 c1 && ln -s ../../etc sub/rel && "
    "ln -s /workspace/data back && ln -s /tmp tmplink && "
    "ln -s /workspace/newtarget dangle-in && ln -s /tmp/evil-out dangle-out"
)


@pytest.fixture(scope="module")
def hostile(served: Served, docker_api: docker.APIClient) -> Iterator[str]:
    """A space whose sandbox planted symlinks out of /workspace (and one back into it)."""
    yield from make_space(served, docker_api, "hostile", HOSTILE_SETUP)


# ---------------------------------------------------------------------------------------------
# List
# ---------------------------------------------------------------------------------------------

async def test_list_root_shape_sorted_and_lstat(client: Api, files_space: str,
                                                docker_api: docker.APIClient,
                                                prefix: str) -> None:
    reply = await listing(client, files_space, "/")
    assert reply.status == 200, reply.body
    assert reply.body["path"] == "/"
    assert reply.body["truncated"] is False
    entries = reply.body["entries"]
    names = [e["name"] for e in entries]
    assert names == sorted(names)
    assert {"a", "etc", "empty", "ten.txt", "link-to-f", "many1"} <= set(names)
    for entry in entries:
        assert set(entry) == {"name", "path", "type", "size", "mtimeMs", "mode", "owner",
                              "group", "target"}, entry
        assert entry["owner"] == "sandbox" and entry["group"] == "sandbox", entry
        assert entry["path"] == f"/{entry['name']}"
        assert isinstance(entry["size"], int) and isinstance(entry["mtimeMs"], int)
    by_name = {e["name"]: e for e in entries}
    assert by_name["a"]["type"] == "dir"
    assert by_name["ten.txt"]["type"] == "file" and by_name["ten.txt"]["size"] == 10
    assert by_name["link-to-f"]["type"] == "symlink"  # lstat: the link, not its target
    assert by_name["link-to-f"]["target"] == "a/f.txt" and by_name["ten.txt"]["target"] is None
    modes = sh(docker_api, f"{prefix}{files_space}", "stat -c %a /workspace/ten.txt /workspace/a")
    assert [by_name["ten.txt"]["mode"], by_name["a"]["mode"]] == [
        int(m, 8) for m in modes.split()]
    mtime = int(sh(docker_api, f"{prefix}{files_space}", "stat -c %Y /workspace/ten.txt"))
    assert by_name["ten.txt"]["mtimeMs"] // 1000 == mtime


async def test_list_subdir_and_default_path(client: Api, files_space: str) -> None:
    sub = await listing(client, files_space, "a")
    assert sub.status == 200, sub.body
    assert sub.body["path"] == "/a"
    assert [(e["name"], e["path"], e["type"]) for e in sub.body["entries"]] == [
        ("deep", "/a/deep", "dir"), ("f.txt", "/a/f.txt", "file"),
        ("root", "/a/root", "symlink"), ("up", "/a/up", "symlink")]
    default = await listing(client, files_space, None)
    assert default.status == 200 and default.body["path"] == "/"
    empty = await listing(client, files_space, "/empty/")
    assert empty.status == 200 and empty.body == {"path": "/empty", "entries": [],
                                                  "truncated": False}


async def test_list_limit_truncates(client: Api, files_space: str) -> None:
    full = await listing(client, files_space, "/")
    assert len(full.body["entries"]) > 3
    capped = await listing(client, files_space, "/", limit="3")
    assert capped.status == 200, capped.body
    assert capped.body["truncated"] is True
    assert capped.body["entries"] == full.body["entries"][:3]
    bad = await listing(client, files_space, "/", limit="0")
    assert bad.status == 400 and bad.error_code() == "invalid_limit"


async def test_list_missing_and_not_a_dir(client: Api, files_space: str) -> None:
    missing = await listing(client, files_space, "/nope")
    assert missing.status == 404 and missing.error_code() == "not_found"
    not_dir = await listing(client, files_space, "/ten.txt")
    assert not_dir.status == 400 and not_dir.error_code() == "not_a_dir"


# ---------------------------------------------------------------------------------------------
# Read
# ---------------------------------------------------------------------------------------------

async def test_read_shape_and_max_bytes(client: Api, files_space: str) -> None:
    whole = await read(client, files_space, "/ten.txt")
    assert whole.status == 200, whole.body
    assert set(whole.body) == {"path", "contentBase64", "truncated", "size"}
    assert whole.body["path"] == "/ten.txt"
    assert content_of(whole) == b"0123456789"
    assert whole.body["truncated"] is False and whole.body["size"] == 10
    part = await read(client, files_space, "ten.txt", maxBytes="4")
    assert content_of(part) == b"0123"
    assert part.body["truncated"] is True and part.body["size"] == 10
    exact = await read(client, files_space, "ten.txt", maxBytes="10")
    assert content_of(exact) == b"0123456789" and exact.body["truncated"] is False
    zero = await read(client, files_space, "ten.txt", maxBytes="0")
    assert content_of(zero) == b"" and zero.body["truncated"] is True


async def test_read_errors(client: Api, files_space: str) -> None:
    for path, status, code in [("/missing.txt", 404, "not_found"), ("/a", 400, "not_a_file"),
                               ("/ten.txt/x", 400, "not_a_dir")]:
        reply = await read(client, files_space, path)
        assert reply.status == status, (path, reply.body)
        assert reply.error_code() == code
    no_path = await client.get(f"/api/spaces/{files_space}/file")
    assert no_path.status == 400 and no_path.error_code() == "invalid_path"
    bad_max = await read(client, files_space, "/ten.txt", maxBytes="lots")
    assert bad_max.status == 400 and bad_max.error_code() == "invalid_maxBytes"
    missing_space = await read(client, unique_name("none"), "/x")
    assert missing_space.status == 404


async def test_read_through_symlink_inside_workspace(client: Api, files_space: str) -> None:
    reply = await read(client, files_space, "/link-to-f")
    assert content_of(reply) == b"hello"
    up = await read(client, files_space, "/a/up/ten.txt")  # a/up -> .. (still /workspace)
    assert content_of(up) == b"0123456789"


# ---------------------------------------------------------------------------------------------
# Write
# ---------------------------------------------------------------------------------------------

async def test_write_creates_parents_owned_by_sandbox_atomically(
        client: Api, files_space: str, docker_api: docker.APIClient, prefix: str) -> None:
    container = f"{prefix}{files_space}"
    top = unique_name("w")
    path = f"/{top}/x/y/note.txt"
    reply = await write(client, files_space, path, b"first version\n")
    assert reply.status == 200, reply.body
    assert reply.body == {"message": "OK", "path": path, "bytes": 14}
    assert sh(docker_api, container, f"cat /workspace{path}") == "first version\n"
    owners = sh(docker_api, container,
                f"stat -c '%u:%g %n' /workspace/{top} /workspace/{top}/x /workspace/{top}/x/y "
                f"/workspace{path}").splitlines()
    assert [line.split()[0] for line in owners] == ["1001:1001"] * 4, owners
    # Overwrite: replaced whole, still owned by the sandbox, no temporary file left behind.
    again = await write(client, files_space, path, b"v2")
    assert again.status == 200, again.body
    assert content_of(await read(client, files_space, path)) == b"v2"
    assert sh(docker_api, container, f"stat -c %u:%g /workspace{path}").strip() == "1001:1001"
    left = sh(docker_api, container, f"ls -A /workspace/{top}/x/y").split()
    assert left == ["note.txt"], left


async def test_write_empty_file(client: Api, files_space: str, docker_api: docker.APIClient,
                                prefix: str) -> None:
    path = f"/{unique_name('empty')}.txt"
    reply = await write(client, files_space, path, b"")
    assert reply.status == 200, reply.body
    assert reply.body["bytes"] == 0
    assert sh(docker_api, f"{prefix}{files_space}",
              f"stat -c '%s %F %u' /workspace{path}").strip() == "0 regular empty file 1001"
    back = await read(client, files_space, path)
    assert content_of(back) == b"" and back.body["size"] == 0


async def test_write_errors(client: Api, files_space: str) -> None:
    url = f"/api/spaces/{files_space}/file"
    cases: list[tuple[dict[str, str], Any, int, str]] = [
        ({"path": "/x.txt"}, {"contentBase64": "not base64!"}, 400, "invalid_content"),
        ({"path": "/x.txt"}, {"contentBase64": 5}, 400, "invalid_content"),
        ({"path": "/x.txt"}, {}, 400, "invalid_content"),
        ({"path": "/x.txt"}, {"contentBase64": "", "mode": "777"}, 400, "unknown_field"),
        ({"path": "/a"}, {"contentBase64": ""}, 409, "not_a_file"),
        ({"path": "/"}, {"contentBase64": ""}, 400, "invalid_path"),
        ({"path": "/ten.txt/sub"}, {"contentBase64": ""}, 400, "not_a_dir"),
        ({}, {"contentBase64": ""}, 400, "invalid_path"),
    ]
    for params, body, status, code in cases:
        reply = await client.call("PUT", url, params=params, json=body)
        assert reply.status == status, (params, body, reply.body)
        assert reply.error_code() == code, (params, body)
    not_json = await client.call("PUT", url, params={"path": "/x.txt"}, data=b"{",
                                 headers={"Content-Type": "application/json"})
    assert not_json.status == 400 and not_json.error_code() == "invalid_json"
    assert (await read(client, files_space, "/x.txt")).status == 404


async def test_write_audit_has_path_and_size_never_content(
        served: Served, files_space: str) -> None:
    canary = f"CANARY-{secrets.token_hex(12)}"
    path = f"/{unique_name('audit')}.txt"
    data = (canary + "\n").encode()
    query = urllib.parse.urlencode({"path": path})
    status, body = served.request("PUT", f"/api/spaces/{files_space}/file?{query}",
                                  {"contentBase64": b64(data)})
    assert status == 200, body
    status, body = served.request("GET", f"/api/audit?space={files_space}&limit=50")
    writes = [e for e in body["events"] if e["type"] == "space.file.write"
              and e.get("meta", {}).get("path") == path]
    assert len(writes) == 1, body["events"]
    assert writes[0]["meta"] == {"path": path, "bytes": len(data)}
    audit_text = (served.data_dir / "audit.jsonl").read_text()
    for leak in (canary, b64(data), b64(data).rstrip("=")[:20]):
        assert leak not in audit_text
        assert leak not in served.log()


async def test_absolute_paths_are_relative_to_the_workspace(
        client: Api, files_space: str, docker_api: docker.APIClient, prefix: str) -> None:
    container = f"{prefix}{files_space}"
    missing = await read(client, files_space, "/etc/passwd")  # /workspace/etc/passwd: none
    assert_refused(missing, 404)
    hosts = await read(client, files_space, "/etc/hosts")
    assert content_of(hosts) == b"inside-hosts\n"  # the workspace's, not the system's
    system_hosts = sha256_in(docker_api, container, "/etc/hosts")
    name = unique_name("abs")
    written = await write(client, files_space, f"/etc/{name}", b"mine")
    assert written.status == 200, written.body
    assert sh(docker_api, container, f"cat /workspace/etc/{name}") == "mine"
    assert not exists(docker_api, container, f"/etc/{name}")
    assert sha256_in(docker_api, container, "/etc/hosts") == system_hosts


async def test_odd_names_round_trip(client: Api, files_space: str,
                                    docker_api: docker.APIClient, prefix: str) -> None:
    container = f"{prefix}{files_space}"
    top = unique_name("odd")
    names = ["é ü 日本.txt", "tab\there", "new\nline", "-rf", "quote'\"q", " lead", "a;b|c&$(x)"]
    for index, name in enumerate(names):
        reply = await write(client, files_space, f"/{top}/{name}", f"n{index}".encode())
        assert reply.status == 200, (name, reply.body)
    listed = await listing(client, files_space, f"/{top}")
    assert listed.status == 200, listed.body
    assert [e["name"] for e in listed.body["entries"]] == sorted(names)
    assert all(e["path"] == f"/{top}/{e['name']}" for e in listed.body["entries"])
    for index, name in enumerate(names):
        assert content_of(await read(client, files_space, f"/{top}/{name}")) == \
            f"n{index}".encode()
    assert (await remove(client, files_space, f"/{top}/-rf")).status == 200
    count = sh(docker_api, container,
               f"find /workspace/{top} -mindepth 1 -maxdepth 1 -printf x | wc -c").strip()
    assert count == str(len(names) - 1)  # "-rf" went, and nothing else


async def test_json_write_over_the_body_limit_is_413(make_client: MakeClient, files_space: str,
                                                     docker_api: docker.APIClient,
                                                     prefix: str) -> None:
    api = await make_client(max_body_bytes=64 << 10)
    path = f"/{unique_name('big')}.bin"
    reply = await write(api, files_space, path, b"x" * (100 << 10))
    assert reply.status == 413, reply.body
    assert reply.error_code() == "too_large"
    assert not exists(docker_api, f"{prefix}{files_space}", f"/workspace{path}")


async def test_files_on_a_stopped_space_are_409(client: Api, space: SpaceMaker,
                                                docker_api: docker.APIClient,
                                                prefix: str) -> None:
    name = (await space(memory="64m"))["name"]
    docker_api.stop(f"{prefix}{name}", timeout=1)
    for reply in (await read(client, name, "/x"), await listing(client, name, "/"),
                  await write(client, name, "/x", b"x"), await remove(client, name, "/x")):
        assert reply.status == 409, reply.body
        assert reply.error_code() == "space_stopped"
    assert container_of(docker_api, prefix, name)["State"]["Running"] is False


# ---------------------------------------------------------------------------------------------
# Raw byte streams
# ---------------------------------------------------------------------------------------------

RAW_SIZE = 24 << 20


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A file of random bytes on disk (never held whole in memory) and its sha256."""
    path = tmp_path_factory.mktemp("raw") / "big.bin"
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        left = RAW_SIZE + 12345  # not a multiple of any block size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return path, digest.hexdigest()


async def test_raw_upload_and_download_round_trip(
        client: Api, files_space: str, big_file: tuple[Path, str],
        docker_api: docker.APIClient, prefix: str) -> None:
    source, digest = big_file
    size = source.stat().st_size
    path = f"/{unique_name('raw')}/big.bin"
    url = f"/api/spaces/{files_space}/file"
    with open(source, "rb") as body:
        reply = await client.call("PUT", url, params={"path": path}, data=body,
                                  headers={"Content-Type": "application/octet-stream"})
    assert reply.status == 200, reply.body
    assert reply.body == {"message": "OK", "path": path, "bytes": size}
    container = f"{prefix}{files_space}"
    assert sha256_in(docker_api, container, f"/workspace{path}") == digest
    assert sh(docker_api, container, f"stat -c %u /workspace{path}").strip() == "1001"

    for params, headers in [({"path": path, "raw": "true"}, {}),
                            ({"path": path}, {"Accept": "application/octet-stream"})]:
        got = hashlib.sha256()
        received = 0
        async with client.client.get(url, params=params, headers={
                **headers, "Authorization": f"Bearer {client.key}"}) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/octet-stream"
            assert resp.headers["Content-Length"] == str(size)
            assert resp.headers["X-Clawdspace-Size"] == str(size)
            assert resp.headers["X-Clawdspace-Truncated"] == "false"
            async for chunk in resp.content.iter_chunked(1 << 20):
                got.update(chunk)
                received += len(chunk)
        assert received == size
        assert got.hexdigest() == digest


async def test_raw_download_max_bytes(client: Api, files_space: str) -> None:
    async with client.client.get(
            f"/api/spaces/{files_space}/file",
            params={"path": "/ten.txt", "raw": "1", "maxBytes": "3"},
            headers={"Authorization": f"Bearer {client.key}"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "3"
        assert resp.headers["X-Clawdspace-Size"] == "10"
        assert resp.headers["X-Clawdspace-Truncated"] == "true"
        assert await resp.read() == b"012"


async def test_raw_upload_without_length_is_411(client: Api, files_space: str,
                                                docker_api: docker.APIClient,
                                                prefix: str) -> None:
    path = f"/{unique_name('chunked')}.bin"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 1000

    reply = await client.call("PUT", f"/api/spaces/{files_space}/file", params={"path": path},
                              data=chunks(),
                              headers={"Content-Type": "application/octet-stream"})
    assert reply.status == 411, reply.body
    assert reply.error_code() == "length_required"
    assert not exists(docker_api, f"{prefix}{files_space}", f"/workspace{path}")


# ---------------------------------------------------------------------------------------------
# Delete
# ---------------------------------------------------------------------------------------------

async def test_delete_file_and_dirs(client: Api, files_space: str,
                                    docker_api: docker.APIClient, prefix: str) -> None:
    container = f"{prefix}{files_space}"
    top = unique_name("del")
    sh(docker_api, container, f"cd /workspace && mkdir -p {top}/full/inner {top}/hollow && "
                              f"printf 1 > {top}/one && printf 2 > {top}/full/inner/two")
    gone = await remove(client, files_space, f"/{top}/one")
    assert gone.status == 200, gone.body
    assert gone.body == {"message": "OK", "path": f"/{top}/one"}
    assert not exists(docker_api, container, f"/workspace/{top}/one")

    refused = await remove(client, files_space, f"/{top}/full")
    assert refused.status == 409 and refused.error_code() == "dir_not_empty"
    assert exists(docker_api, container, f"/workspace/{top}/full/inner/two")

    hollow = await remove(client, files_space, f"/{top}/hollow")
    assert hollow.status == 200, hollow.body
    assert not exists(docker_api, container, f"/workspace/{top}/hollow")

    tree = await remove(client, files_space, f"/{top}/full", recursive="true")
    assert tree.status == 200, tree.body
    assert not exists(docker_api, container, f"/workspace/{top}/full")

    missing = await remove(client, files_space, f"/{top}/full")
    assert missing.status == 404 and missing.error_code() == "not_found"
    deletes = [e["meta"] for e in client.audit_lines() if e["type"] == "space.file.delete"]
    assert {"path": f"/{top}/full", "recursive": True} in deletes


async def test_delete_root_is_refused(client: Api, files_space: str,
                                      docker_api: docker.APIClient, prefix: str) -> None:
    for path in ("/", ".", "a/..", "//"):
        reply = await remove(client, files_space, path, recursive="true")
        assert reply.status == 400, (path, reply.body)
        assert reply.error_code() == "invalid_path"
    assert exists(docker_api, f"{prefix}{files_space}", "/workspace/ten.txt")


async def test_delete_symlink_removes_the_link_only(client: Api, files_space: str,
                                                    docker_api: docker.APIClient,
                                                    prefix: str) -> None:
    container = f"{prefix}{files_space}"
    link = unique_name("ln")
    sh(docker_api, container, f"cd /workspace && printf keep > {link}.target && "
                              f"ln -s {link}.target {link}")
    reply = await remove(client, files_space, f"/{link}")
    assert reply.status == 200, reply.body
    assert not exists(docker_api, container, f"/workspace/{link}")
    assert sh(docker_api, container, f"cat /workspace/{link}.target") == "keep"


# ---------------------------------------------------------------------------------------------
# Hostile paths (lexical)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["..", "/..", "/../etc/passwd", "a/../../etc",
                                  "../workspace/ten.txt", "./../", "a/../..//..", "/./../."])
async def test_climbing_out_is_403(client: Api, files_space: str, path: str) -> None:
    for reply in (await read(client, files_space, path),
                  await listing(client, files_space, path),
                  await write(client, files_space, path, b"x"),
                  await remove(client, files_space, path)):
        assert_refused(reply, 403)
        assert reply.error_code() == "outside_workspace"


async def test_encoded_and_odd_paths_as_sent_raw(client: Api, files_space: str) -> None:
    base = f"/api/spaces/{files_space}"
    # aiohttp decodes the query once: %2e%2e%2f is ../ (403); %252e is a literal "%2e" (404).
    for query, status in [("%2e%2e%2fetc%2fpasswd", 403), ("%2E%2E/%2E%2E/etc", 403),
                          ("a%2f..%2f..%2fetc", 403), ("%252e%252e%252fetc%252fpasswd", 404),
                          ("..%5c..%5cetc%5cpasswd", 404), ("%2fetc%2fpasswd", 404),
                          ("a%2fdeep%2f..%2f..%2fetc%2fhosts", 200)]:
        for endpoint in ("file", "files"):
            reply = await raw_get(client, f"{base}/{endpoint}?path={query}")
            want = status
            if endpoint == "files" and status == 200:
                want = 400  # a file, not a directory
            assert reply.status == want, (endpoint, query, reply.body)
            if want >= 400:
                assert_refused(reply, want)
            elif endpoint == "file":
                assert content_of(reply) == b"inside-hosts\n"


async def test_nul_and_overlong_paths_are_400(client: Api, files_space: str) -> None:
    for path in ("a\x00b", "ten.txt\x00", "/" + "x" * 5000, "/".join(["a"] * 2500)):
        for reply in (await read(client, files_space, path),
                      await listing(client, files_space, path),
                      await write(client, files_space, path, b"x"),
                      await remove(client, files_space, path)):
            assert reply.status == 400, (path[:20], reply.body)
            assert reply.error_code() == "invalid_path"


# ---------------------------------------------------------------------------------------------
# Hostile symlinks planted inside the space
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/root/etc/passwd", "/root", "/shadow", "/etc/passwd",
                                  "/etc", "/c1", "/c2", "/sub/rel/passwd", "/sub/rel",
                                  "/root/workspace/data/inside.txt", "/tmplink"])
async def test_symlink_escapes_are_403_for_read_and_list(client: Api, hostile: str,
                                                         path: str) -> None:
    for reply in (await read(client, hostile, path), await listing(client, hostile, path)):
        assert_refused(reply, 403)
        assert reply.error_code() == "outside_workspace"


@pytest.mark.parametrize("path", ["/root/tmp/evil", "/etc/evil", "/shadow", "/c1",
                                  "/sub/rel/evil", "/tmplink/evil", "/tmplink/new/evil",
                                  "/dangle-out", "/root/workspace/evil"])
async def test_symlink_escapes_are_403_for_write(client: Api, hostile: str,
                                                 docker_api: docker.APIClient,
                                                 prefix: str, path: str) -> None:
    container = f"{prefix}{hostile}"
    guarded = ["/etc/shadow", "/etc/passwd"]
    before = {p: sha256_in(docker_api, container, p) for p in guarded}
    reply = await write(client, hostile, path, b"pwned\n")
    assert_refused(reply, 403)
    for outside in ("/tmp/evil", "/etc/evil", "/tmp/evil-out", "/tmp/new", "/workspace/evil"):
        assert not exists(docker_api, container, outside), outside
    assert {p: sha256_in(docker_api, container, p) for p in guarded} == before
    leftovers = sh(docker_api, container, "find / -xdev -name '*.clawdspace-*' 2>/dev/null; "
                                          "find /workspace -name '*.clawdspace-*'", "0")
    assert leftovers.strip() == ""


async def test_delete_through_escaping_symlinks(client: Api, hostile: str,
                                                docker_api: docker.APIClient,
                                                prefix: str) -> None:
    container = f"{prefix}{hostile}"
    passwd = sha256_in(docker_api, container, "/etc/passwd")
    shadow = sha256_in(docker_api, container, "/etc/shadow")
    # Through a link in the middle of the path: refused, nothing outside touched.
    for path in ("/root/etc/passwd", "/etc/passwd", "/sub/rel/passwd", "/root/tmp"):
        reply = await remove(client, hostile, path, recursive="true")
        assert_refused(reply, 403)
    # The link itself as the last component: the link goes, its target stays.
    tag = secrets.token_hex(3)
    sh(docker_api, container, f"cd /workspace && ln -s /etc/passwd p-{tag} && "
                              f"ln -s /etc e-{tag} && ln -s / r-{tag}")
    for link in (f"p-{tag}", f"e-{tag}", f"r-{tag}"):
        reply = await remove(client, hostile, f"/{link}", recursive="true")
        assert reply.status == 200, (link, reply.body)
        assert not exists(docker_api, container, f"/workspace/{link}")
    assert sha256_in(docker_api, container, "/etc/passwd") == passwd
    assert sha256_in(docker_api, container, "/etc/shadow") == shadow
    assert exists(docker_api, container, "/etc/hostname")


async def test_symlink_back_into_workspace_is_allowed(client: Api, hostile: str,
                                                      docker_api: docker.APIClient,
                                                      prefix: str) -> None:
    assert content_of(await read(client, hostile, "/back/inside.txt")) == b"inside"
    listed = await listing(client, hostile, "/back")
    assert listed.status == 200, listed.body
    assert [e["name"] for e in listed.body["entries"]] == ["inside.txt"]
    name = unique_name("via")
    written = await write(client, hostile, f"/back/{name}", b"through")
    assert written.status == 200, written.body
    assert sh(docker_api, f"{prefix}{hostile}", f"cat /workspace/data/{name}") == "through"


async def test_dangling_symlink_inside_workspace_creates_its_target(
        client: Api, hostile: str, docker_api: docker.APIClient, prefix: str) -> None:
    container = f"{prefix}{hostile}"
    reply = await write(client, hostile, "/dangle-in", b"made")
    assert reply.status == 200, reply.body
    assert sh(docker_api, container, "cat /workspace/newtarget") == "made"
    assert sh(docker_api, container, "readlink /workspace/dangle-in").strip() == \
        "/workspace/newtarget"


async def test_file_replaced_by_symlink_between_calls(client: Api, hostile: str,
                                                      docker_api: docker.APIClient,
                                                      prefix: str) -> None:
    container = f"{prefix}{hostile}"
    name = unique_name("swap")
    sh(docker_api, container, f"printf innocent > /workspace/{name}")
    assert content_of(await read(client, hostile, f"/{name}")) == b"innocent"
    sh(docker_api, container, f"rm /workspace/{name} && ln -s /etc/passwd /workspace/{name}")
    second = await read(client, hostile, f"/{name}")
    assert_refused(second, 403)
    raw = await raw_get(client, f"/api/spaces/{hostile}/file?path=/{name}&raw=true")
    assert_refused(raw, 403)
    assert PASSWD_MARK not in (raw.body if isinstance(raw.body, bytes) else b"")
    overwrite = await write(client, hostile, f"/{name}", b"pwned")
    assert_refused(overwrite, 403)
    assert b"pwned" not in in_container(docker_api, container, "cat /etc/passwd", "0")[1]


# ---------------------------------------------------------------------------------------------
# A paused space, and an image without python3, bash or GNU find
# ---------------------------------------------------------------------------------------------

async def test_files_resume_a_paused_space(client: Api, space: SpaceMaker,
                                           docker_api: docker.APIClient, prefix: str) -> None:
    name = (await space(memory="64m"))["name"]
    assert (await write(client, name, "/p.txt", b"before")).status == 200
    assert (await client.post(f"/api/spaces/{name}/stop")).status == 200
    assert container_of(docker_api, prefix, name)["State"]["Paused"] is True
    reply = await read(client, name, "/p.txt")
    assert content_of(reply) == b"before"
    state = container_of(docker_api, prefix, name)["State"]
    assert state["Running"] is True and state["Paused"] is False
    events = [(e["type"], e.get("meta")) for e in client.audit_lines() if e.get("space") == name]
    assert events[-2:] == [("space.pause", None), ("space.start", {"reason": "auto"})]
    # Every files call does the same (list, write, delete).
    calls: list[Callable[[], Awaitable[Reply]]] = [
        lambda: listing(client, name, "/"), lambda: write(client, name, "/q", b"q"),
        lambda: remove(client, name, "/q")]
    for call in calls:
        assert (await client.post(f"/api/spaces/{name}/stop")).status == 200
        reply = await call()
        assert reply.status == 200, reply.body
        assert container_of(docker_api, prefix, name)["State"]["Paused"] is False


async def test_files_on_an_image_without_python_bash_or_find(
        client: Api, space: SpaceMaker, nopy_image: str, docker_api: docker.APIClient,
        prefix: str) -> None:
    name = (await space(memory="64m", image=nopy_image))["name"]
    container = f"{prefix}{name}"
    code, _ = in_container(docker_api, container, "command -v python3 || command -v bash || "
                                                  "command -v find")
    assert code != 0  # really none of them
    written = await write(client, name, "/dir/sub/hello.txt", b"hi there")
    assert written.status == 200, written.body
    assert sh(docker_api, container, "stat -c %u:%g /workspace/dir/sub/hello.txt").strip() == \
        "1001:1001"
    sh(docker_api, container, "cd /workspace/dir && ln -s sub/hello.txt link && mkdir e")
    assert content_of(await read(client, name, "/dir/link")) == b"hi there"
    listed = await listing(client, name, "/dir")
    assert listed.status == 200, listed.body
    assert [(e["name"], e["path"], e["type"]) for e in listed.body["entries"]] == [
        ("e", "/dir/e", "dir"), ("link", "/dir/link", "symlink"), ("sub", "/dir/sub", "dir")]
    inner = await listing(client, name, "/dir/sub")
    assert [(e["name"], e["size"]) for e in inner.body["entries"]] == [("hello.txt", 8)]
    capped = await listing(client, name, "/dir", limit="2")
    assert capped.body["truncated"] is True and len(capped.body["entries"]) == 2
    removed = await remove(client, name, "/dir", recursive="true")
    assert removed.status == 200, removed.body
    assert not exists(docker_api, container, "/workspace/dir")


# ---------------------------------------------------------------------------------------------
# Property: any path is a 4xx or lands inside /workspace, never a 5xx
# ---------------------------------------------------------------------------------------------

VALID_PATHS = ["a/f.txt", "ten.txt", "etc/hosts", "a/up/ten.txt", "link-to-f", "a/deep/z",
               "a", "etc", "", "a/deep", "empty"]
INSERTS = ["..", ".", "", "%2e", "%2e%2e", "\\", "..\\..", "é", "\u2215", "\uff0e\uff0e",
           " ", "~", "*", "\x00", "passwd", "root", "...", "a/..", "nope/..", "up", "a/root"]


@st.composite
def workspace_paths(draw: st.DrawFn) -> str:
    """A path into the test tree with traversal pieces, odd characters and links mixed in."""
    parts = draw(st.sampled_from(VALID_PATHS)).split("/")
    for _ in range(draw(st.integers(0, 3))):
        parts.insert(draw(st.integers(0, len(parts))), draw(st.sampled_from(INSERTS)))
    lead = draw(st.sampled_from(["", "/", "//", "./", "../"]))
    return lead + "/".join(parts) + draw(st.sampled_from(["", "", "/", "/.", "/.."]))


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(path=workspace_paths())
@example(path="a/up/a/f.txt")
@example(path="/link-to-f")
@example(path="a/root/etc/passwd")
@example(path="etc/hosts/.")
def test_any_path_is_4xx_or_inside_the_workspace(served: Served, files_space: str,
                                                 docker_api: docker.APIClient,
                                                 path: str) -> None:
    container = f"{served.prefix}{files_space}"
    for endpoint in ("file", "files"):
        status, body = served.request(
            "GET", f"/api/spaces/{files_space}/{endpoint}?path={urllib.parse.quote(path)}")
        assert status < 500, (endpoint, path, status, body)
        assert status in (200, 400, 403, 404), (endpoint, path, status, body)
        event(f"{endpoint} {status}")
        if status >= 400:
            assert set(body) == {"error", "code"}, body
            continue
        rel = body["path"]
        assert rel.startswith("/"), body
        normal = posixpath.normpath(WORKSPACE + rel)
        assert normal == WORKSPACE or normal.startswith(WORKSPACE + "/"), (path, rel)
        code, real = _readlink(docker_api, container, WORKSPACE + rel)
        assert code == 0, real
        assert real == WORKSPACE or real.startswith(WORKSPACE + "/"), (path, rel, real)
        if endpoint == "file":
            assert PASSWD_MARK not in base64.b64decode(body["contentBase64"])


def _readlink(docker_api: docker.APIClient, container: str, path: str) -> tuple[int, str]:
    """``readlink -f`` of a path inside the container, the path passed as an argument."""
    exec_id = docker_api.exec_create(container, ["readlink", "-f", "--", path])["Id"]
    out = docker_api.exec_start(exec_id).decode("utf-8", "replace").strip()
    return int(docker_api.exec_inspect(exec_id)["ExitCode"]), out
