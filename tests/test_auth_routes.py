"""Auth is chosen by route: an E2B sandbox's daemon token opens that sandbox's daemon routes and
nothing else, and stops working when the sandbox is killed."""

from __future__ import annotations

from typing import Any

import aiohttp
import docker
from conftest import Api, container_of, router_routes

ENVD_ROUTES = {("GET", "/files"), ("POST", "/files"), ("POST", "/process.Process/{method}"),
               ("POST", "/filesystem.Filesystem/{method}")}
PUBLIC = {("GET", "/api/health"), ("GET", "/api/openapi.json"), ("GET", "/health")}


async def new_sandbox(client: Api) -> dict[str, Any]:
    reply = await client.post("/sandboxes", {"templateID": "offline", "timeout": 300})
    assert reply.status == 201, reply.body
    return reply.body  # type: ignore[no-any-return]


def with_token(sandbox: dict[str, Any], sandbox_id: str | None = None) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sandbox_id or sandbox["sandboxID"],
            "X-Access-Token": sandbox["envdAccessToken"]}


def concrete(template: str, space: str, sandbox_id: str) -> str:
    return template.replace("{name}", space).replace("{id}", sandbox_id).replace(
        "{method}", "List")


async def test_a_sandbox_token_opens_only_its_daemon_routes(
        client: Api, shared_space: str, docker_api: docker.APIClient, prefix: str) -> None:
    sandbox = await new_sandbox(client)
    sandbox_id = sandbox["sandboxID"]
    try:
        routes = router_routes(client.app)
        assert routes >= ENVD_ROUTES and routes >= PUBLIC
        wrongly_open: list[str] = []
        for method, template in sorted(routes - ENVD_ROUTES - PUBLIC):
            path = concrete(template, shared_space, sandbox_id)
            for headers in (with_token(sandbox),
                            {**with_token(sandbox), "Authorization": "Bearer "},
                            {**with_token(sandbox), "Connect-Protocol-Version": "1"}):
                reply = await client.call(method, path, key=None, headers=headers,
                                          json={"command": "touch /workspace/x", "timeout": 60})
                if reply.status != 401:
                    wrongly_open.append(f"{method} {path}: {reply.status} {reply.body}")
        assert not wrongly_open, "\n".join(wrongly_open)
        # Nothing happened to either space the requests named.
        for name in (shared_space, sandbox_id):
            state = container_of(docker_api, prefix, name)["State"]
            assert state["Running"] and not state["Paused"], name

        # Its own daemon routes answer.
        listed = await client.post("/process.Process/List", key=None,
                                   headers=with_token(sandbox), json={})
        assert listed.status == 200, listed.body
        made = await client.post("/filesystem.Filesystem/MakeDir", key=None,
                                 headers=with_token(sandbox), json={"path": "/workspace/d"})
        assert made.status == 200, made.body
    finally:
        assert (await client.delete(f"/sandboxes/{sandbox_id}")).status == 204


async def test_a_token_is_worth_nothing_for_another_sandbox_or_after_kill(client: Api) -> None:
    first, second = await new_sandbox(client), await new_sandbox(client)
    try:
        # first's token presented for second: refused on every daemon route.
        for method, template in sorted(ENVD_ROUTES):
            path = concrete(template, "x", second["sandboxID"])
            reply = await client.call(method, path, key=None, params={"path": "/workspace"},
                                      headers=with_token(first, second["sandboxID"]), json={})
            assert reply.status == 401, (path, reply.status, reply.body)
        # The node's key is no daemon token either.
        reply = await client.post("/process.Process/List", json={}, headers={
            "E2b-Sandbox-Id": first["sandboxID"], "X-Access-Token": client.key})
        assert reply.status == 401, reply.body
        ok = await client.post("/process.Process/List", key=None, headers=with_token(first),
                               json={})
        assert ok.status == 200, ok.body
    finally:
        for sandbox in (first, second):
            assert (await client.delete(f"/sandboxes/{sandbox['sandboxID']}")).status == 204
    gone = await client.post("/process.Process/List", key=None, headers=with_token(first),
                             json={})
    assert gone.status == 401, gone.body


async def test_lists_carry_no_daemon_tokens(client: Api) -> None:
    sandbox = await new_sandbox(client)
    try:
        for path in ("/sandboxes", "/v2/sandboxes"):
            reply = await client.get(path)
            assert reply.status == 200, reply.body
            mine = [s for s in reply.body if s["sandboxID"] == sandbox["sandboxID"]]
            assert len(mine) == 1
            assert all("envdAccessToken" not in s for s in reply.body)
            assert sandbox["envdAccessToken"] not in str(reply.body)
        detail = await client.get(f"/sandboxes/{sandbox['sandboxID']}")
        assert detail.body["envdAccessToken"] == sandbox["envdAccessToken"]
    finally:
        assert (await client.delete(f"/sandboxes/{sandbox['sandboxID']}")).status == 204


async def test_daemon_calls_are_audited_as_the_sandbox(client: Api) -> None:
    sandbox = await new_sandbox(client)
    try:
        form = aiohttp.FormData()
        form.add_field("file", b"hello", filename="a.txt")
        reply = await client.post("/files", key=None, headers=with_token(sandbox), data=form,
                                  params={"path": "/workspace/a.txt"})
        assert reply.status == 200, reply.body
        events = [e for e in client.audit_lines() if e.get("space") == sandbox["sandboxID"]]
        by_sandbox = [e for e in events if e.get("actor") == f"sandbox:{sandbox['sandboxID']}"]
        assert by_sandbox, events
        assert all("keyId" not in e for e in by_sandbox)
        created = [e for e in events if e["type"] == "space.create"]
        assert created and created[0].get("keyId", "").startswith("k-")
    finally:
        assert (await client.delete(f"/sandboxes/{sandbox['sandboxID']}")).status == 204


async def test_unmatched_requests_answer_in_their_surfaces_shape(client: Api) -> None:
    """A request no route serves still needs the key first, and answers in the error shape
    of the protocol it speaks: E2B's control plane, E2B's daemon (Connect), or ours."""
    sandbox = {"E2b-Sandbox-Id": "e2b-0123456789abcdef"}
    cases: list[tuple[str, str, dict[str, str], str | None, int, dict[str, Any]]] = [
        ("GET", "/sandboxes/e2b-x/metrics", {}, "", 404, {"code": 404}),
        ("PUT", "/sandboxes", {}, None, 401, {"code": 401}),
        ("GET", "/v2/sandboxes/e2b-x/connect", {}, "", 405, {"code": 405}),
        ("GET", "/process.Process/Start", sandbox, None, 401, {"code": "unauthenticated"}),
        ("POST", "/health", sandbox, None, 401, {"code": "unauthenticated"}),
        ("GET", "/process.Process/Start", sandbox, "", 405, {"code": "unimplemented"}),
        ("GET", "/api/nothing", {}, None, 401, {"code": "unauthorized"}),
        ("GET", "/api/nothing", {}, "", 404, {"code": "not_found"}),
        ("GET", "/process.Process/Start", {}, "", 405, {"code": "method_not_allowed"}),
    ]
    for method, path, headers, key, status, shape in cases:
        reply = await client.call(method, path, key=key, headers=headers)
        assert reply.status == status, (method, path, reply.status, reply.body)
        assert isinstance(reply.body, dict), (method, path, reply.body)
        assert shape.items() <= reply.body.items(), (method, path, reply.body)
        if path.startswith(("/sandboxes", "/v2/sandboxes")):
            assert set(reply.body) == {"code", "message"}, reply.body
            assert reply.headers.get("Should-Retry") == "false"
        elif "E2b-Sandbox-Id" in headers:
            assert set(reply.body) == {"code", "message"}, reply.body
        else:
            assert reply.error_code() == shape["code"]
