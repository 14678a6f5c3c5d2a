"""Space attributes in container labels: encoding, tolerant decoding, schema versions and
migrations, the view against its OpenAPI schema, and hostile labels through the API."""

from __future__ import annotations

import logging
from typing import Any

import docker
import pytest
from conftest import TEST_IMAGE, Api, SpaceMaker, unique_name

import clawdspace
from clawdspace import ATTRIBUTES_BY_FIELD, SCHEMA_LABEL, decode_labels, encode_labels

FULL: dict[str, Any] = {
    "image": "ghcr.io/example/sandbox:1.2", "memory": 512 << 20, "cpus": 1.5, "gpu": True,
    "gpus": ["GPU-a", "GPU-b"], "template": "default", "network": "none",
    "writableRootfs": False, "sudo": True, "idleTimeout": 300, "user": "sandbox",
    "created": "2024-05-01T12:00:00.000Z", "createdBy": "k-abc",
}
DEFAULTS = {a.field: a.default for a in clawdspace.SPACE_ATTRIBUTES}
SCHEMA = {SCHEMA_LABEL: str(clawdspace.LABEL_SCHEMA)}


def label(field: str) -> str:
    """The label of the attribute whose view field is ``field``."""
    return ATTRIBUTES_BY_FIELD[field].label


def test_full_covers_every_attribute_and_labels_are_distinct() -> None:
    assert set(FULL) == set(ATTRIBUTES_BY_FIELD)
    labels = [a.label for a in clawdspace.SPACE_ATTRIBUTES]
    assert len(set(labels)) == len(labels) and SCHEMA_LABEL not in labels


@pytest.mark.parametrize("changes", [
    {}, {"idleTimeout": None}, {"idleTimeout": 0}, {"createdBy": None}, {"gpus": []},
    {"gpu": False, "writableRootfs": True, "sudo": False, "cpus": 0.25, "memory": 0, "user": ""},
    {"template": None},
])
def test_round_trip(changes: dict[str, Any]) -> None:
    values = {**FULL, **changes}
    labels = encode_labels(values)
    assert labels[SCHEMA_LABEL] == str(clawdspace.LABEL_SCHEMA)
    assert set(labels) == {SCHEMA_LABEL} | {label(f) for f in values}
    assert decode_labels(labels) == (values, [])


def test_encode_always_writes_the_schema() -> None:
    assert encode_labels({}) == SCHEMA
    assert decode_labels(SCHEMA) == (DEFAULTS, [])


@pytest.mark.parametrize(("field", "text"), [
    ("memory", "lots"), ("memory", "1.5"), ("memory", ""), ("memory", "9" * 5000),
    ("cpus", "nan"), ("cpus", "inf"), ("cpus", "-inf"), ("cpus", "1e999"), ("cpus", "two"),
    ("idleTimeout", "-5"), ("idleTimeout", "²"), ("idleTimeout", "1.5"), ("idleTimeout", " 5"),
    ("idleTimeout", "٣"), ("memory", "-5"), ("memory", "٣"), ("cpus", "-2"),
    ("writableRootfs", "maybe"), ("sudo", "yes"), ("gpu", "yes"), ("gpu", "TRUE"),
])
def test_a_malformed_label_reads_as_its_default_and_is_reported(field: str, text: str) -> None:
    values, problems = decode_labels({**SCHEMA, label(field): text})
    assert values == DEFAULTS
    assert len(problems) == 1 and label(field) in problems[0], problems


def test_unknown_labels_are_ignored() -> None:
    labels = {**encode_labels(FULL), "clawdspace.colour": "blue", "com.example.x": "1"}
    assert decode_labels(labels) == (FULL, [])


@pytest.mark.parametrize(("schema", "words"), [
    (None, "not a schema version"), ("99", "newer"), ("x", "not a schema version"),
    ("", "not a schema version"), ("٣", "not a schema version"), ("0", "no migration"),
])
def test_a_schema_label_that_cannot_be_followed(schema: str | None, words: str) -> None:
    labels = {k: v for k, v in encode_labels(FULL).items() if k != SCHEMA_LABEL}
    if schema is not None:
        labels[SCHEMA_LABEL] = schema
    values, problems = decode_labels(labels)
    assert values == FULL  # still read, as the current schema
    assert len(problems) == 1 and words in problems[0], problems


def test_an_older_schema_is_migrated(monkeypatch: pytest.MonkeyPatch) -> None:
    def rename(labels: dict[str, str]) -> dict[str, str]:
        """Schema 1 -> 2: clawdspace.mem became clawdspace.memory."""
        renamed = {k: v for k, v in labels.items() if k != "clawdspace.mem"}
        renamed[label("memory")] = labels["clawdspace.mem"]
        return renamed

    monkeypatch.setattr(clawdspace, "LABEL_SCHEMA", 2)
    monkeypatch.setattr(clawdspace, "LABEL_MIGRATIONS", {1: rename})
    old = {SCHEMA_LABEL: "1", "clawdspace.mem": "1024", label("cpus"): "2.0"}
    assert decode_labels(old) == ({**DEFAULTS, "memory": 1024, "cpus": 2.0}, [])
    assert encode_labels({"memory": 5})[SCHEMA_LABEL] == "2"
    assert decode_labels(encode_labels({"memory": 5})) == ({**DEFAULTS, "memory": 5}, [])

    monkeypatch.setattr(clawdspace, "LABEL_MIGRATIONS", {})
    values, problems = decode_labels(old)
    assert values == {**DEFAULTS, "cpus": 2.0}  # read as is: the old name is unknown
    assert len(problems) == 1 and "no migration" in problems[0], problems


async def test_hostile_labels_through_the_api(client: Api, docker_api: docker.APIClient,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "clawdspace")
    prefix, name = client.config.prefix, unique_name("hostile")
    labels = {"clawdspace.instance": prefix, "clawdspace.kind": "space",
              "clawdspace.space": name, "clawdspace.memory": "x", "clawdspace.cpus": "1e999",
              "clawdspace.gpus": ",,", "clawdspace.schema": "7",
              "clawdspace.writable-rootfs": "maybe", "clawdspace.idle-timeout": "soon"}
    container = docker_api.create_container(
        TEST_IMAGE, ["sleep", "infinity"], name=f"{prefix}{name}", labels=labels,
        host_config=docker_api.create_host_config(network_mode="none"))
    short = container["Id"][:12]
    try:
        docker_api.start(container["Id"])
        for _ in range(2):
            listed = await client.get("/api/spaces")
            assert listed.status == 200, listed.body
            one = await client.get(f"/api/spaces/{name}")
            assert one.status == 200, one.body
            mine = [s for s in listed.body["spaces"] if s["name"] == name]
            for view in (*mine, one.body["space"]):
                assert view["id"] == short and view["status"] == "running"
                assert (view["memory"], view["cpus"], view["gpus"], view["idleTimeout"]) \
                    == (0, 0.0, [], None)
            assert len(mine) == 1
        warned = [r.getMessage() for r in caplog.records
                  if r.name == "clawdspace" and r.levelno == logging.WARNING]
        warned = [m for m in warned if short in m]
        for words in ("clawdspace.memory=", "clawdspace.cpus=", "clawdspace.idle-timeout=",
                      "schema 7"):
            assert len([m for m in warned if words in m]) == 1, (words, warned)
        assert all(name in m for m in warned)
    finally:
        docker_api.remove_container(container["Id"], force=True)


async def test_the_view_and_its_schema_agree(client: Api) -> None:
    schema = clawdspace.space_schema()
    view, _ = clawdspace.space_view("0123456789abcdef", encode_labels(FULL), "running", None,
                                    None, "vol")
    required = schema["required"]
    assert set(required) == set(view) and len(set(required)) == len(required)
    assert set(ATTRIBUTES_BY_FIELD) <= set(required) <= set(schema["properties"])
    document = await client.get("/api/openapi.json")
    assert document.status == 200
    assert document.body["components"]["schemas"]["Space"] == schema


async def test_created_by_is_the_key_id_never_the_key(client: Api, space: SpaceMaker,
                                                      docker_api: docker.APIClient) -> None:
    name = unique_name("owner")
    created = await space(name, network="none")
    shown = await client.get(f"/api/spaces/{name}")
    assert shown.status == 200, shown.body
    assert created["createdBy"] == shown.body["space"]["createdBy"] \
        == clawdspace.key_id(client.key)
    assert set(shown.body["space"]) == set(clawdspace.space_schema()["required"])
    labels = docker_api.inspect_container(f"{client.config.prefix}{name}")["Config"]["Labels"]
    assert labels["clawdspace.created-by"] == clawdspace.key_id(client.key)
    assert not [item for item in labels.items() if client.key in "=".join(item)]
