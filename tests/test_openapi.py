"""The OpenAPI document: public, complete, and true (schemathesis against the real process)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import schemathesis
from conftest import (
    SESSION_KEY,
    SESSION_PREFIX,
    Api,
    Served,
    remove_everything,
    router_routes,
    serve,
)
from hypothesis import Phase, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

import clawdspace

METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
FUZZ_PREFIX = f"{SESSION_PREFIX}fz-"


async def test_document_is_public_openapi_31(client: Api) -> None:
    reply = await client.get("/api/openapi.json", key=None)
    assert reply.status == 200
    assert reply.content_type == "application/json"
    assert reply.body["openapi"] == "3.1.0"
    assert reply.body["info"]["version"] == clawdspace.VERSION
    assert reply.body == clawdspace.openapi_document()


async def test_document_lists_exactly_the_routes(client: Api) -> None:
    document = (await client.get("/api/openapi.json")).body
    documented = {(method.upper(), path) for path, item in document["paths"].items()
                  for method in item if method in METHODS}
    served = router_routes(client.app)
    # The document covers Clawdspace's own API; the rest is E2B's wire protocol, whose
    # reference is E2B's own specification (README: "Use it from E2B's SDK").
    assert documented == {route for route in served if route[1].startswith("/api/")}
    assert {path for _, path in served if not path.startswith("/api/")} == {
        "/sandboxes", "/v2/sandboxes", "/sandboxes/{id}", "/sandboxes/{id}/timeout",
        "/sandboxes/{id}/pause", "/sandboxes/{id}/connect", "/v2/sandboxes/{id}/connect",
        "/sandboxes/{id}/metrics", "/templates", "/v2/templates", "/v3/templates",
        "/templates/aliases/{alias}", "/templates/{template}/files/{hash}",
        "/v2/templates/{template}/builds/{build}", "/templates/{template}/builds/{build}/status",
        "/health", "/files", "/process.Process/{method}", "/filesystem.Filesystem/{method}"}
    for path, item in document["paths"].items():
        for method in set(item) & METHODS:
            responses = item[method]["responses"]
            assert any(status[0] in "12" for status in responses), (method, path)  # 101: ws
            if path not in ("/api/health", "/api/openapi.json"):
                assert "401" in responses, (method, path)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory,
                docker_api: docker.APIClient) -> Iterator[Served]:
    """The service as a process with a prefix of its own, for whatever the fuzzer creates."""
    workdir: Path = tmp_path_factory.mktemp("fuzz")
    try:
        with serve(workdir, SESSION_KEY, FUZZ_PREFIX) as server:
            yield server
    finally:
        remove_everything(docker_api, FUZZ_PREFIX)


def test_served_document_is_the_one_fuzzed(fuzz_server: Served) -> None:
    status, document = fuzz_server.request("GET", "/api/openapi.json", key=None)
    assert status == 200
    assert document == clawdspace.openapi_document()


# The document comes from the module, the answers from the real process. (Loading it from the
# server through ``schemathesis.pytest.from_fixture`` fails on pytest 9.2: schemathesis 4.32
# renames test nodes through ``Node._nodeid``, which pytest 9.2 no longer has.)
schema = schemathesis.openapi.from_dict(clawdspace.openapi_document())


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])
def test_api_matches_its_document(case: schemathesis.Case[Any], fuzz_server: Served) -> None:
    case.call_and_validate(
        base_url=fuzz_server.url,
        headers={"Authorization": f"Bearer {fuzz_server.key}"},
        checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                response_schema_conformance, negative_data_rejection],
    )
