"""The JSON Lines audit log: through HTTP, and the AuditLog class on its own."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_IMAGE, Api, SpaceMaker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clawdspace

ACTOR = clawdspace.Actor(key_id="k-0123456789", addr="127.0.0.1")
MakeAudit = Callable[..., clawdspace.AuditLog]


@pytest.fixture
async def make_audit(tmp_path: Path) -> AsyncIterator[MakeAudit]:
    """``make_audit(max_bytes=..., keep=..., secrets=[...], directory=...)``: an opened log,
    closed at teardown."""
    made: list[clawdspace.AuditLog] = []

    def make(max_bytes: int = 1 << 20, keep: int = 3, secrets: list[str] | None = None,
             directory: Path | None = None) -> clawdspace.AuditLog:
        audit = clawdspace.AuditLog(str(directory or tmp_path / "audit"), max_bytes, keep,
                                    clawdspace.Redactor(secrets or []))
        audit.open()
        made.append(audit)
        return audit

    yield make
    for audit in made:
        audit.close()


def lines_of(path: str | Path) -> list[dict[str, Any]]:
    raw = Path(path).read_bytes()
    assert raw == b"" or raw.endswith(b"\n")
    return [json.loads(line) for line in raw.split(b"\n")[:-1]]


# ---------------------------------------------------------------------------------------------
# Through HTTP
# ---------------------------------------------------------------------------------------------

async def test_lifecycle_events(client: Api, space: SpaceMaker) -> None:
    name = (await space(memory="64m"))["name"]
    await client.exec(name, "echo hi", env={"A": "1"}, workdir="/workspace/", timeout=30)
    assert (await client.post(f"/api/spaces/{name}/stop")).status == 200
    assert (await client.post(f"/api/spaces/{name}/start")).status == 200
    assert (await client.delete(f"/api/spaces/{name}")).status == 200
    events = [e for e in client.audit_lines() if e.get("space") == name]
    assert [e["type"] for e in events] == [
        "space.create", "space.exec", "space.pause", "space.start", "space.destroy"]
    for event in events:
        assert event["keyId"] == clawdspace.key_id(client.key)
        assert event["clientAddr"] == "127.0.0.1"
        assert event["ts"].endswith("Z")
        assert client.key not in json.dumps(event)
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    create, execute, _, _, destroy = events
    assert create["meta"]["memory"] == 64 << 20 and create["meta"]["image"] == TEST_IMAGE
    assert re.fullmatch(r"p-[0-9a-f]{12}", execute["meta"]["process"])  # what it became
    assert {k: v for k, v in execute["meta"].items() if k != "process"} == {
        "command": "echo hi", "envKeys": ["A"], "workdir": "/workspace", "timeout": 30.0}
    assert destroy["meta"] == {"removeVolume": False}

    reply = await client.get("/api/audit", params={"space": name})
    assert reply.status == 200, reply.body
    assert reply.body["events"] == events


async def test_audit_query(client: Api) -> None:
    audit = client.app[clawdspace.AUDIT_KEY]
    for i in range(1205):
        await audit.record("test.event", f"s{i % 2}", {"i": i})
    every = (await client.get("/api/audit")).body["events"]
    assert [e["meta"]["i"] for e in every] == list(range(1005, 1205))  # default 200, oldest first
    capped = (await client.get("/api/audit", params={"limit": "5000"})).body["events"]
    assert [e["meta"]["i"] for e in capped] == list(range(205, 1205))
    odd = (await client.get("/api/audit", params={"space": "s1", "limit": "3"})).body["events"]
    assert [e["meta"]["i"] for e in odd] == [1199, 1201, 1203]
    assert (await client.get("/api/audit", params={"space": "none"})).body["events"] == []
    for bad in ("0", "-1", "abc", "1.5"):
        reply = await client.get("/api/audit", params={"limit": bad})
        assert reply.status == 400, (bad, reply.body)
        assert reply.error_code() == "invalid_limit"


# ---------------------------------------------------------------------------------------------
# AuditLog on its own
# ---------------------------------------------------------------------------------------------

async def test_torn_last_line_is_moved_aside(make_audit: MakeAudit, tmp_path: Path) -> None:
    directory = tmp_path / "torn"
    directory.mkdir()
    good = b'{"ts":"2026-01-01T00:00:00.000Z","type":"a"}\n'
    (directory / "audit.jsonl").write_bytes(good + b'{"ts":"2026-01-01T00:00:0')
    audit = make_audit(directory=directory)
    assert (directory / "audit.jsonl").read_bytes() == good
    torn = list(directory.glob("audit.jsonl.torn-*"))
    assert [p.read_bytes() for p in torn] == [b'{"ts":"2026-01-01T00:00:0']
    await audit.record("b")
    assert [e["type"] for e in lines_of(audit.path)] == ["a", "b"]
    assert [e["type"] for e in await audit.read(None, 10)] == ["a", "b"]


async def test_intact_file_is_left_alone(make_audit: MakeAudit, tmp_path: Path) -> None:
    directory = tmp_path / "intact"
    directory.mkdir()
    content = b'{"type":"a"}\n{"type":"b"}\n'
    (directory / "audit.jsonl").write_bytes(content)
    make_audit(directory=directory)
    assert (directory / "audit.jsonl").read_bytes() == content
    assert list(directory.glob("*.torn-*")) == []


async def test_rotation_keeps_n_files_and_read_spans_them(make_audit: MakeAudit) -> None:
    audit = make_audit(max_bytes=4096, keep=2)
    for i in range(200):
        await audit.record("rot", "s", {"i": i, "pad": "x" * 40})
    base = Path(audit.path)
    assert sorted(p.name for p in base.parent.iterdir() if p.name.startswith("audit")) == [
        "audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    kept: list[int] = []
    for path in (f"{base}.2", f"{base}.1", base):
        assert Path(path).stat().st_size <= 4096
        kept += [e["meta"]["i"] for e in lines_of(path)]
    assert kept == list(range(200 - len(kept), 200))  # the newest, contiguous, in order
    assert len(lines_of(base)) < len(kept)
    read = [e["meta"]["i"] for e in await audit.read("s", 1000)]
    assert read == kept


SECRETS = [
    "ghp_" + "A1b2C3d4E5" * 3 + "x1y2z3",
    "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
    "hunter2pass",
    "abc123",
]


async def test_secrets_are_redacted(make_audit: MakeAudit) -> None:
    api_key = "node-api-key-8f2a9c"
    audit = make_audit(secrets=[api_key])
    commands = [
        f"git clone https://{SECRETS[0]}@github.com/o/r.git",
        f"curl -H 'Authorization: token {SECRETS[1]}' https://api.github.com",
        f"git clone https://user:{SECRETS[2]}@example.com/r.git",
        f"TOKEN={SECRETS[3]} ./run.sh",
        f"curl http://localhost:7777/api/spaces?key={api_key}",
    ]
    for command in commands:
        await audit.record("space.exec", "s", {"command": command, "argv": [command]})
    text = Path(audit.path).read_text()
    for secret in [*SECRETS, api_key]:
        assert secret not in text
    events = lines_of(audit.path)
    assert len(events) == len(commands)
    assert all("[REDACTED]" in e["meta"]["command"] for e in events)
    assert "example.com/r.git" in events[2]["meta"]["command"]  # only the secret goes


async def test_exec_command_secrets_redacted_through_http(client: Api, shared_space: str) -> None:
    key = client.key
    command = f"true {SECRETS[0]} TOKEN={SECRETS[3]} https://u:{SECRETS[2]}@h/ {key}"
    assert (await client.exec(shared_space, command))["exitCode"] == 0
    assert (await client.exec(shared_space, ["true", SECRETS[1], key]))["exitCode"] == 0
    text = client.audit_path.read_text()
    assert text.count("space.exec") == 2
    for secret in [*SECRETS, key]:
        assert secret not in text


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(
    st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(
        ["\n", "\r", "\u2028", "\u2029", "\x1b", "\x00", '"', "\\", "'"])),
    st.dictionaries(st.text(max_size=8), st.text() | st.integers() | st.none(), max_size=3),
), min_size=1, max_size=8))
def test_any_text_stays_one_line_per_record(tmp_path_factory: pytest.TempPathFactory,
                                            records: list[tuple[str, dict[str, Any]]]) -> None:
    directory = tmp_path_factory.mktemp("prop")

    async def scenario() -> None:
        audit = clawdspace.AuditLog(str(directory), 1 << 20, 2, clawdspace.Redactor([]))
        audit.open()
        try:
            for space_name, meta in records:
                await audit.record(space_name or "t", space_name, meta)
        finally:
            audit.close()

    asyncio.run(scenario())
    raw = (directory / "audit.jsonl").read_bytes()
    assert b"\x1b" not in raw
    events = lines_of(directory / "audit.jsonl")
    assert len(events) == len(records)
    assert [e["space"] for e in events] == [name for name, _ in records]


async def test_concurrent_records_stay_intact(make_audit: MakeAudit) -> None:
    audit = make_audit()
    await asyncio.gather(*(audit.record("c", f"s{i}", {"i": i, "pad": "y" * (i * 7)})
                           for i in range(200)))
    events = lines_of(audit.path)
    assert sorted(e["meta"]["i"] for e in events) == list(range(200))
