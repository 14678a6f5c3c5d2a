"""Secret shapes never reach the audit log: in exec commands, in ingested shell history and in the
history tail that observability returns. One canary per shape; each must vanish everywhere."""

from __future__ import annotations

import json
import secrets

import pytest
from conftest import Api, SpaceMaker

import clawdspace


def canary(alphabet: str = "abcdefghijklmnopqrstuvwxyz0123456789", size: int = 24) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(size))


def shapes() -> list[tuple[str, str, str]]:
    """(shape, command line, the secret in it)."""
    upper = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    found: list[tuple[str, str, str]] = []

    def add(shape: str, line: str, secret: str) -> None:
        found.append((shape, line, secret))

    aws = canary(upper + "abcdefghij/+", 40)
    add("aws-secret", f"export AWS_SECRET_ACCESS_KEY={aws}", aws)
    add("aws-key-id", f"echo AKIA{canary(upper, 16)}", "")
    pg = canary()
    add("pgpassword", f"PGPASSWORD={pg} psql -h db", pg)
    curl = canary()
    add("curl-u", f"curl -u deploy:{curl} https://example.invalid", curl)
    mysql = canary()
    add("mysql-p", f"mysql -u root -p{mysql} shop", mysql)
    long_opt = canary()
    add("password-eq", f"tool --password={long_opt} run", long_opt)
    spaced = canary()
    add("password-space", f"tool --password {spaced} run", spaced)
    stripe = "sk_live_" + canary(size=24)
    add("stripe-sk", f"stripe charges list --api {stripe}", stripe)
    restricted = "rk_live_" + canary(size=24)
    add("stripe-rk", f"echo {restricted}", restricted)
    google = "AIza" + canary(size=35)
    add("google", f"curl 'https://maps.invalid/?key={google}'", google)
    for kind in "bpa":
        slack = f"xox{kind}-{canary(size=12)}-{canary(size=16)}"
        add(f"slack-{kind}", f"echo {slack}", slack)
    jwt = f"eyJ{canary(size=20)}.eyJ{canary(size=30)}.{canary(size=32)}"
    add("jwt", f"echo {jwt}", jwt)
    header = canary()
    add("authorization", f"curl -H 'Authorization: Bearer {header}' https://x.invalid",
        header)
    basic = canary()
    add("authorization-basic", f"curl -H \"authorization: Basic {basic}\" x", basic)
    github = "ghp_" + canary(size=36)
    add("github", f"git push https://x:{github}@github.com/a/b", github)
    url = canary()
    add("url-password", f"pip install -i https://me:{url}@pypi.invalid/simple x", url)
    url_token = canary(size=32)
    add("url-token", f"git clone https://{url_token}@github.com/a/b", url_token)
    for header in ("X-API-Key", "PRIVATE-TOKEN", "Cookie"):
        value = canary()
        add(f"header-{header.lower()}", f"curl -H '{header}: {value}' https://x.invalid", value)
    sshpass = canary()
    add("sshpass", f"sshpass -p {sshpass} ssh me@host.invalid", sshpass)
    login = canary()
    add("docker-login", f"docker login -u me -p {login} registry.invalid", login)
    openai = canary()
    add("env-key", f"OPENAI_KEY={openai} python3 app.py", openai)
    return [(shape, line, secret or line.split()[-1]) for shape, line, secret in found]


SHAPES = shapes()


@pytest.mark.parametrize(("shape", "line", "secret"), SHAPES, ids=[s[0] for s in SHAPES])
def test_each_shape_is_redacted(shape: str, line: str, secret: str) -> None:
    redacted = clawdspace.Redactor([]).text(line)
    assert secret not in redacted, (shape, redacted)
    assert "[REDACTED]" in redacted


def test_argv_lists_are_read_in_context() -> None:
    redactor = clawdspace.Redactor([])
    secret = canary()
    for argv in (["curl", "-u", f"bob:{secret}", "https://x.invalid"],
                 ["mysql", "--password", secret, "shop"],
                 ["sshpass", "-p", secret, "ssh", "host"],
                 ["env", f"PGPASSWORD={secret}", "psql"]):
        clean = redactor.value(argv)
        assert secret not in str(clean), clean
        assert len(clean) == len(argv) and clean[0] == argv[0]
    assert redactor.value(["ls", "-la", "/workspace"]) == ["ls", "-la", "/workspace"]


def test_plain_commands_are_left_alone() -> None:
    redactor = clawdspace.Redactor([])
    for line in ("ls -la /workspace", "python3 -m pytest -q", "git push origin main",
                 "curl -s https://example.invalid/api", "mysql -u root shop", "tool -p 8080",
                 "git clone ssh://git@github.com/a/b", "echo monkey=1"):
        assert redactor.text(line) == line


async def test_no_canary_reaches_the_audit_log_or_observability(
        client: Api, space: SpaceMaker) -> None:
    name = (await space(network="none", memory="256m"))["name"]
    for _, line, _ in SHAPES:
        result = await client.exec(name, f": {line}")  # ':' runs nothing
        assert result["exitCode"] == 0, result
    history = "".join(f"{line}\n" for _, line, _ in SHAPES)
    written = await client.call("PUT", f"/api/spaces/{name}/file",
                                params={"path": "/.bash_history"}, data=history.encode(),
                                headers={"Content-Type": "application/octet-stream"})
    assert written.status == 200, written.body
    await client.app[clawdspace.HOUSEKEEPER_KEY].ingest_history()
    observed = await client.get(f"/api/spaces/{name}/observability")
    assert observed.status == 200, observed.body
    audit = client.audit_path.read_text() + client.audit_path.with_name(
        "shell.jsonl").read_text()
    events = [json.loads(line) for line in audit.splitlines()]
    assert len([e for e in events if e["type"] == "space.shell"]) >= len(SHAPES)
    assert len([e for e in events if e["type"] == "space.exec"]) >= len(SHAPES)
    leaked = [shape for shape, _, secret in SHAPES
              if secret in audit or secret in json.dumps(observed.body)]
    assert not leaked, leaked
