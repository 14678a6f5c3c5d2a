"""A space cannot flood or erase the audit trail through its shell history: ingestion has a
budget per space and per node, says what it skipped, goes round every running space, and the
record of what was done to spaces survives any amount of history."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Api, MakeClient, SpaceMaker

import clawdspace


def events_in(path: Path) -> list[dict[str, Any]]:
    files = sorted(path.parent.glob(path.name + "*"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


async def put_history(api: Api, name: str, lines: int, width: int = 40) -> int:
    """Write a .bash_history of ``lines`` commands; returns its size."""
    text = "".join(f"echo {i:08d} {'x' * width}\n" for i in range(lines))
    reply = await api.call("PUT", f"/api/spaces/{name}/file", params={"path": "/.bash_history"},
                           data=io.BytesIO(text.encode()),
                           headers={"Content-Type": "application/octet-stream"})
    assert reply.status == 200, reply.body
    return len(text)


async def test_a_flood_of_history_is_capped_summarised_and_never_erases_lifecycle_events(
        make_client: MakeClient) -> None:
    api = await make_client(audit_max_bytes=64 << 10, audit_keep=2)
    space = SpaceMaker(api)
    try:
        name = (await space(network="none", memory="128m"))["name"]
        assert (await api.exec(name, "true"))["exitCode"] == 0
        # 4 MiB of history at once: what a space writing 250 KB/s leaves in a 15 s tick.
        size = await put_history(api, name, 60_000, 60)
        housekeeper = api.app[clawdspace.HOUSEKEEPER_KEY]
        shell_log = api.audit_path.with_name("shell.jsonl")
        for tick in range(1, 4):
            await housekeeper.ingest_history()
            shells = [e for e in events_in(shell_log) if e["type"] == "space.shell"]
            # At most one read's worth per tick, even if rotation dropped older ones.
            assert len(shells) <= clawdspace.HISTORY_LINES_PER_SPACE * tick
        skipped = [e for e in events_in(api.audit_path) if e["type"] == "space.shell.skipped"]
        assert skipped, "nothing said what was skipped"
        assert sum(e["meta"]["bytes"] for e in skipped) > 3 << 20
        # The cursor reached the end: the next tick has nothing to read.
        cursor = housekeeper.cursors[name]
        assert cursor["offset"] == size
        # Lifecycle events are all still there, whatever the history did.
        types = [e["type"] for e in events_in(api.audit_path) if e.get("space") == name]
        assert "space.create" in types and "space.exec" in types and "space.file.write" in types
        # And GET /api/audit merges both trails.
        merged = await api.get("/api/audit", params={"space": name, "limit": "1000"})
        kinds = {e["type"] for e in merged.body["events"]}
        assert {"space.create", "space.shell", "space.shell.skipped"} <= kinds
    finally:
        await space.destroy_all()


async def spaces_with_history(client: Api, space: SpaceMaker, lines: int) -> set[str]:
    """Three new spaces, each with a .bash_history of ``lines`` commands."""
    names = [(await space(network="none", memory="64m"))["name"] for _ in range(3)]
    for name in names:
        await put_history(client, name, lines)
    return set(names)


def shell_events_of(client: Api, names: set[str]) -> list[dict[str, Any]]:
    shell_log = client.audit_path.with_name("shell.jsonl")
    return [e for e in events_in(shell_log) if e.get("space") in names]


async def test_ingestion_goes_round_every_running_space(
        client: Api, space: SpaceMaker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clawdspace, "HISTORY_SPACES_PER_TICK", 2)
    ours = await spaces_with_history(client, space, 5)
    housekeeper = client.app[clawdspace.HOUSEKEEPER_KEY]
    await housekeeper.ingest_history()
    await housekeeper.ingest_history()
    ingested = {e["space"] for e in shell_events_of(client, ours)}
    assert ingested == ours  # the third space was reached on the second tick


async def test_the_node_wide_cap_holds_across_spaces(
        client: Api, space: SpaceMaker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clawdspace, "HISTORY_NODE_LINES", 300)
    ours = await spaces_with_history(client, space, 400)
    await client.app[clawdspace.HOUSEKEEPER_KEY].ingest_history()
    recorded = shell_events_of(client, ours)
    assert 0 < len(recorded) <= 300
