"""Deny-by-default auth, the JSON error contract, and keys kept out of every log."""

from __future__ import annotations

import json
import time
from typing import Any

import docker
import pytest
from conftest import Api, MakeClient, Served, container_of, router_routes

import clawdspace

PUBLIC = {("GET", "/api/health"), ("GET", "/api/openapi.json"), ("GET", "/health")}
WRONG_KEY = "wrong-key-0123456789abcdef"


def concrete(path: str, name: str) -> str:
    return path.replace("{name}", name).replace("{id}", "e2b-0123456789abcdef").replace(
        "{method}", "List")


def refused(path: str, reply: Any) -> bool:
    """401 in our error shape, or in E2B's (``{"code": 401, "message"}``) on E2B's paths."""
    if reply.status != 401:
        return False
    if path.startswith(clawdspace.E2B_REST_PATHS):
        return isinstance(reply.body, dict) and reply.body.get("code") == 401
    return bool(reply.error_code() == "unauthorized")


async def test_every_private_route_needs_the_key(client: Api, shared_space: str,
                                                 docker_api: docker.APIClient,
                                                 prefix: str) -> None:
    routes = router_routes(client.app)
    assert len(routes) >= 12
    assert routes >= PUBLIC
    problems: list[str] = []
    for method, template in sorted(routes - PUBLIC):
        path = concrete(template, shared_space)
        attempts: list[dict[str, Any]] = [
            {"key": None},
            {"key": WRONG_KEY},
            {"key": None, "params": {"key": WRONG_KEY}},
            {"key": None, "headers": {"Authorization": f"Basic {client.key}"}},
        ]
        for attempt in attempts:
            reply = await client.call(method, path, json={"command": "touch /workspace/x"},
                                      **attempt)
            if not refused(path, reply):
                problems.append(f"{method} {path} {attempt}: {reply.status} {reply.body}")
    assert not problems, "\n".join(problems)
    # Nothing happened to the space the requests named: not destroyed, paused nor exec'd.
    state = container_of(docker_api, prefix, shared_space)["State"]
    assert state["Running"] and not state["Paused"]
    assert client.audit_lines() == []


async def test_public_routes_answer_without_key(client: Api) -> None:
    for method, path in sorted(PUBLIC - {("GET", "/health")}):
        reply = await client.call(method, path, key=None)
        assert reply.status == 200, (path, reply.body)
        assert reply.content_type == "application/json"
    # E2B's daemon health check: public, for the sandbox its header names (an unknown one is
    # not running: 502, as E2B's proxy answers, not 401).
    reply = await client.get("/health", key=None,
                             headers={"E2b-Sandbox-Id": "e2b-0123456789abcdef"})
    assert reply.status == 502 and reply.body["message"], reply.body


async def test_key_as_bearer_header_and_query(client: Api) -> None:
    key = client.key
    assert (await client.get("/api/spaces")).status == 200
    assert (await client.get("/api/spaces", key=None,
                             headers={"Authorization": f"bearer {key}"})).status == 200
    reply = await client.get("/api/spaces", key=None, params={"key": key})
    assert reply.status == 200, reply.body
    assert isinstance(reply.body["spaces"], list)


@pytest.mark.parametrize("attempt", [
    {"headers": {"Authorization": "Bearer ключ-неверный"}},
    {"params": {"key": "ключ-неверный"}},
    {"headers": {"Authorization": "Bearer "}},
    {"headers": {"Authorization": "Bearer"}},
    {"headers": {"Authorization": ""}},
    {"params": {"key": ""}},
    {"headers": {"Authorization": "Bearer " + "k" * 100_000}},
    {"params": {"key": "k" * 100_000}},
], ids=["non-ascii-header", "non-ascii-query", "empty-bearer", "bare-bearer", "empty-header",
        "empty-query", "100k-header", "100k-query"])
async def test_odd_keys_are_401_not_5xx(client: Api, attempt: dict[str, Any]) -> None:
    reply = await client.get("/api/spaces", key=None, **attempt)
    assert reply.status == 401, reply.body
    assert reply.error_code() == "unauthorized"


async def test_non_ascii_key_can_be_the_key(make_client: MakeClient) -> None:
    api = await make_client(api_key="schlüssel-ключ-鍵-0123456789")
    assert (await api.get("/api/spaces")).status == 200
    reply = await api.get("/api/spaces", key=None, params={"key": api.key})
    assert reply.status == 200, reply.body
    assert (await api.get("/api/spaces", key="schlussel-ключ-鍵-0123456789")).status == 401


async def test_unknown_api_paths(client: Api) -> None:
    for path in ("/api/nosuch", "/api/spaces/a/b/c", "/api"):
        unauthenticated = await client.get(path, key=None)
        assert unauthenticated.status == 401, (path, unauthenticated.body)
        assert unauthenticated.error_code() == "unauthorized"
        reply = await client.get(path)
        assert reply.status == 404, (path, reply.body)
        assert reply.error_code() == "not_found"
    reply = await client.call("PUT", "/api/spaces")
    assert reply.status == 405, reply.body
    assert reply.error_code() == "method_not_allowed"


@pytest.mark.parametrize("raw", [b"{bad", b"", b"   ", b"\xff\xfe", b'{"name": "x"'])
async def test_malformed_json_is_400(client: Api, raw: bytes) -> None:
    reply = await client.post("/api/spaces", data=raw,
                              headers={"Content-Type": "application/json"})
    assert reply.status == 400, reply.body
    assert reply.error_code() == "invalid_json"


@pytest.mark.parametrize("body", [[1, 2], "name", 5, None, True])
async def test_non_object_json_is_400(client: Api, shared_space: str, body: Any) -> None:
    for path in ("/api/spaces", f"/api/spaces/{shared_space}/exec"):
        reply = await client.post(path, data=json.dumps(body),
                                  headers={"Content-Type": "application/json"})
        assert reply.status == 400, (path, reply.body)
        assert reply.error_code() == "invalid_json"


async def test_body_over_limit_is_413(make_client: MakeClient, shared_space: str) -> None:
    api = await make_client(max_body_bytes=4096)
    big = {"name": "x", "image": "a" * 10_000}
    for path in ("/api/spaces", f"/api/spaces/{shared_space}/exec"):
        reply = await api.post(path, big)
        assert reply.status == 413, (path, reply.body)
        assert reply.error_code() == "too_large"
    small = await api.post("/api/spaces", {"name": "Not.Valid"})
    assert small.status == 400, small.body


async def test_key_never_in_service_log_or_audit(client: Api, shared_space: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    key = client.key
    assert key
    caplog.set_level("DEBUG")
    await client.get("/api/spaces", key=None, params={"key": key})
    await client.get("/api/spaces", key=None, params={"key": WRONG_KEY})
    await client.get("/api/spaces", key=WRONG_KEY)
    reply = await client.post(f"/api/spaces/{shared_space}/exec",
                              {"command": f"echo {key} >/dev/null"}, key=None,
                              params={"key": key})
    assert reply.status == 200, reply.body
    result = await client.exec(shared_space, ["true", key, f"API_KEY={key}"])
    assert result["exitCode"] == 0
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("clawdspace")]
    assert any("rejected" in message for message in ours)  # the wrong keys were logged...
    for message in ours:
        assert key not in message and WRONG_KEY not in message  # ...but not the keys
    audit = client.audit_path.read_text()
    assert audit.count("space.exec") == 2
    assert key not in audit


def test_key_never_in_access_log(served: Served, shared_space: str) -> None:
    wrong = f"{WRONG_KEY}-served"
    status, _ = served.request("GET", f"/api/spaces?key={served.key}", key=None)
    assert status == 200
    status, _ = served.request("GET", f"/api/system?key={wrong}", key=None)
    assert status == 401
    deadline = time.monotonic() + 30  # access lines are written after the response is sent
    while time.monotonic() < deadline and not all(
            line in served.log() for line in ("GET /api/spaces 200", "GET /api/system 401")):
        time.sleep(0.05)
    log = served.log()
    assert "GET /api/spaces 200" in log and "GET /api/system 401" in log, log
    assert served.key not in log
    assert wrong not in log
    assert served.key not in (served.data_dir / "audit.jsonl").read_text()
