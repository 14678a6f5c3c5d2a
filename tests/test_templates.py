"""Templates: the shipped set, user overrides through the API, the closed YAML schema, names that
must never leave the templates directory, and the effective settings of a space made from one."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from conftest import (
    ROOT,
    Api,
    MakeClient,
    SpaceMaker,
    container_exists,
    container_of,
    in_container,
    unique_name,
    volume_exists,
)

SHIPPED = ROOT / "templates"
SHIPPED_NAMES = {"default", "offline", "gpu", "readonly"}


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(shipped, user) template directories: a copy of the shipped set, so that nothing a test
    does can touch the repository, and an empty user directory."""
    shipped = tmp_path / "install" / "templates"
    shutil.copytree(SHIPPED, shipped)
    return shipped, tmp_path / "data" / "templates"


@pytest.fixture
async def tpl(make_client: MakeClient, dirs: tuple[Path, Path]) -> Api:
    shipped, user = dirs
    return await make_client(shipped_templates_dir=str(shipped), templates_dir=str(user))


HOUSEKEEPING = ("audit.jsonl", "activity.json", "history-cursors.json")


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` with its content, but for the service's own
    bookkeeping files (the housekeeper may write those at any moment)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(HOUSEKEEPING)}


async def raw_request(api: Api, method: str, raw_path: str, body: bytes = b"") -> tuple[int, Any]:
    """One request with the path sent byte for byte (no client-side normalisation or
    decoding of ``%2F``, ``%2e`` or ``..``)."""
    host, port = api.client.host, api.client.port
    reader, writer = await asyncio.open_connection(host, port)
    head = (f"{method} {raw_path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {api.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    writer.write(head.encode() + body)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    try:
        parsed: Any = json.loads(payload)
    except ValueError:
        parsed = payload.decode("latin-1")
    return int(status_line.split()[1]), parsed


async def put(api: Api, text: str) -> Any:
    return await api.call("PUT", "/api/templates", json={"yaml": text})


def audit_of(api: Api, kind: str) -> list[dict[str, Any]]:
    return [e for e in api.audit_lines() if e["type"] == kind]


# ---------------------------------------------------------------------------------------------
# The shipped set and the routes
# ---------------------------------------------------------------------------------------------

async def test_shipped_templates_are_listed_and_readable(make_client: MakeClient,
                                                          tmp_path: Path) -> None:
    api = await make_client(shipped_templates_dir=str(SHIPPED),
                            templates_dir=str(tmp_path / "user"))
    reply = await api.get("/api/templates")
    assert reply.status == 200, reply.body
    rows = {row["name"]: row for row in reply.body["templates"]}
    assert set(rows) >= SHIPPED_NAMES
    for name in SHIPPED_NAMES:
        assert rows[name]["source"] == "shipped", rows[name]
        assert isinstance(rows[name]["description"], str) and rows[name]["description"]
        one = await api.get(f"/api/templates/{name}")
        assert one.status == 200, one.body
        assert set(one.body) == {"name", "yaml", "template"}
        assert one.body["name"] == name
        assert one.body["yaml"] == (SHIPPED / f"{name}.yaml").read_text()
        assert one.body["template"]["name"] == name
        assert one.body["template"]["source"] == "shipped"
    expected = {"default": ("internet", True, False), "offline": ("none", True, False),
                "gpu": ("internet", True, True), "readonly": ("internet", False, False)}
    for name, (mode, writable, gpu) in expected.items():
        template = (await api.get(f"/api/templates/{name}")).body["template"]
        assert template["network"]["mode"] == mode, name
        assert template["security"]["writableRootfs"] is writable, name
        assert template["resources"]["gpu"] is gpu, name


async def test_put_override_wins_and_delete_restores_the_shipped_one(
        tpl: Api, dirs: tuple[Path, Path]) -> None:
    shipped, user = dirs
    before = tree(shipped)
    text = ("name: default\ndescription: team default\nresources:\n  memory: 512m\n  cpus: 0.5\n"
            "network:\n  mode: internet\n")
    reply = await put(tpl, text)
    assert reply.status == 200, reply.body
    assert reply.body["template"]["name"] == "default"
    assert reply.body["template"]["resources"]["memory"] == 512 << 20
    assert (user / "default.yaml").read_text() == text
    assert tree(shipped) == before, "a PUT wrote into the shipped templates"

    got = await tpl.get("/api/templates/default")
    assert got.status == 200 and got.body["yaml"] == text
    assert got.body["template"]["source"] == "user"
    assert got.body["template"]["description"] == "team default"
    listed = {r["name"]: r for r in (await tpl.get("/api/templates")).body["templates"]}
    assert listed["default"]["source"] == "user"
    assert listed["default"]["description"] == "team default"

    gone = await tpl.delete("/api/templates/default")
    assert gone.status == 200, gone.body
    assert not (user / "default.yaml").exists()
    back = await tpl.get("/api/templates/default")
    assert back.status == 200 and back.body["template"]["source"] == "shipped"
    assert back.body["yaml"] == (shipped / "default.yaml").read_text()
    assert tree(shipped) == before

    assert [e["meta"] for e in audit_of(tpl, "template.upsert")] == [{"template": "default"}]
    assert [e["meta"] for e in audit_of(tpl, "template.delete")] == [{"template": "default"}]
    for event in audit_of(tpl, "template.upsert") + audit_of(tpl, "template.delete"):
        assert event.get("keyId"), event


async def test_new_template_lifecycle(tpl: Api, dirs: tuple[Path, Path]) -> None:
    _, user = dirs
    reply = await put(tpl, "name: team-a\ndescription: for team a\n")
    assert reply.status == 200, reply.body
    template = reply.body["template"]
    assert template["network"] == {"mode": "internet", "allowCidrs": [], "blockCidrs": []}
    assert template["managed"] is False  # schema defaults
    assert template["security"] == {"writableRootfs": True, "sudo": False}
    listed = {r["name"]: r for r in (await tpl.get("/api/templates")).body["templates"]}
    assert listed["team-a"] == {"name": "team-a", "description": "for team a", "source": "user"}
    assert (await tpl.delete("/api/templates/team-a")).status == 200
    assert not (user / "team-a.yaml").exists()
    missing = await tpl.get("/api/templates/team-a")
    assert missing.status == 404 and missing.error_code() == "not_found"
    again = await tpl.delete("/api/templates/team-a")
    assert again.status == 404 and again.error_code() == "not_found"


async def test_shipped_only_template_cannot_be_deleted(tpl: Api, dirs: tuple[Path, Path]) -> None:
    shipped, _ = dirs
    for name in ("offline", "readonly"):
        reply = await tpl.delete(f"/api/templates/{name}")
        assert reply.status == 409, reply.body
        reply.error_code()
        assert (shipped / f"{name}.yaml").exists()
    assert audit_of(tpl, "template.delete") == []


async def test_unknown_template_is_404(tpl: Api) -> None:
    for method in ("GET", "DELETE"):
        reply = await tpl.call(method, "/api/templates/no-such-template")
        assert reply.status == 404, (method, reply.body)
        assert reply.error_code() == "not_found"


async def test_put_body_shape(tpl: Api) -> None:
    bodies: list[Any] = [{}, {"yaml": ""}, {"yaml": "   "}, {"yaml": 5}, {"yaml": ["name: x"]},
                         {"yaml": "name: x", "extra": 1}, [], "name: x"]
    for body in bodies:
        reply = await tpl.call("PUT", "/api/templates", json=body)
        assert reply.status == 400, (body, reply.body)
        reply.error_code()


# ---------------------------------------------------------------------------------------------
# The closed schema
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "field"), [
    ("name: t1\nprivileged: true\n", "privileged"),
    ("name: t1\ncap_add: [SYS_ADMIN]\n", "cap_add"),
    ("name: t1\nbinds: ['/:/host']\n", "binds"),
    ("name: t1\nnetwork_mode: host\n", "network_mode"),
    ("name: t1\npid: host\n", "pid"),
    ("name: t1\ndevices: [/dev/mem]\n", "devices"),
    ("name: t1\nruntime: runc\n", "runtime"),
    ("name: t1\nresources:\n  memory: lots\n", "resources.memory"),
    ("name: t1\nresources:\n  memory: 1e15\n", "resources.memory"),
    ("name: t1\nresources:\n  memory: 1\n", "resources.memory"),
    ("name: t1\nresources:\n  cpus: -1\n", "resources.cpus"),
    ("name: t1\nresources:\n  cpus: many\n", "resources.cpus"),
    ("name: t1\nresources:\n  gpu: maybe\n", "resources.gpu"),
    ("name: t1\nresources:\n  image: 'bad image;rm'\n", "resources.image"),
    ("name: t1\nresources:\n  privileged: true\n", "resources.privileged"),
    ("name: t1\nresources: 4g\n", "resources"),
    ("name: t1\nnetwork:\n  mode: bridge\n", "network.mode"),
    ("name: t1\nnetwork:\n  mode: host\n", "network.mode"),
    ("name: t1\nnetwork:\n  allowCidrs: [not-a-cidr]\n", "network.allowCidrs"),
    ("name: t1\nnetwork:\n  allowCidrs: ['10.0.0.0/33']\n", "network.allowCidrs"),
    ("name: t1\nnetwork:\n  allowCidrs: 10.0.0.0/8\n", "network.allowCidrs"),
    ("name: t1\nnetwork:\n  dns: [1.1.1.1]\n", "network.dns"),
    ("name: t1\nsecurity:\n  writableRootfs: perhaps\n", "security.writableRootfs"),
    ("name: t1\nsecurity:\n  privileged: true\n", "security.privileged"),
    ("name: t1\nsecurity:\n  sudo: perhaps\n", "security.sudo"),
    ("name: t1\nidleTimeout: -5\n", "idleTimeout"),
    ("name: t1\nidleTimeout: soon\n", "idleTimeout"),
    ("name: t1\nworkspace:\n  defaultRepoDest: ../x\n", "workspace.defaultRepoDest"),
    ("name: t1\nworkspace:\n  defaultRepoDest: /abs\n", "workspace.defaultRepoDest"),
    ("name: t1\ndescription: [1, 2]\n", "description"),
    ("description: no name here\n", "name"),
    ("name: Bad/Name\n", "name"),
    ("name: ../escape\n", "name"),
])
async def test_schema_errors_name_the_field(tpl: Api, dirs: tuple[Path, Path], text: str,
                                            field: str) -> None:
    _, user = dirs
    reply = await put(tpl, text)
    assert reply.status == 400, reply.body
    assert reply.error_code()
    assert field in reply.body["error"], reply.body
    assert not user.exists() or list(user.iterdir()) == []
    assert (await tpl.get("/api/templates/t1")).status == 404
    assert audit_of(tpl, "template.upsert") == []


@pytest.mark.parametrize("text", [
    "- a\n- b\n", "just a string\n", "name: [unclosed\n", "name: t1\n--- \nname: t2\n",
    "null\n", "name: t1\n\tbad: tab\n",
])
async def test_documents_that_are_not_one_mapping(tpl: Api, text: str) -> None:
    reply = await put(tpl, text)
    assert reply.status == 400, reply.body
    reply.error_code()


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system",
                                 "!!python/object/new:os.system",
                                 "!!python/object/apply:subprocess.check_output"])
async def test_python_tags_never_run(tpl: Api, tag: str) -> None:
    marker = Path(f"/tmp/cst-pwned-{secrets.token_hex(4)}")
    argument = f'["touch {marker}"]' if "os.system" in tag else f'[["touch", "{marker}"]]'
    for text in (f"name: t1\ndescription: {tag} {argument}\n",
                 f"name: t1\nresources:\n  memory: {tag} {argument}\n",
                 f"{tag} {argument}\n"):
        reply = await put(tpl, text)
        assert reply.status == 400, (text, reply.body)
        reply.error_code()
    assert not marker.exists(), "a YAML tag ran a command on the host"


def billion_laughs(where: str) -> str:
    levels = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for index, letter in enumerate("bcdefghi"):
        previous = "abcdefghi"[index]
        levels.append(f"&{letter} [" + ",".join([f"*{previous}"] * 9) + "]")
    bomb = "[" + ", ".join(levels) + "]"
    if where == "top":
        pairs = zip("abcdefghi", levels, strict=True)
        return "name: t1\n" + "".join(f"{key}: {value}\n" for key, value in pairs)
    if where == "description":
        return f"name: t1\ndescription: {bomb}\n"
    if where == "allowCidrs":
        return f"name: t1\nnetwork:\n  allowCidrs: {bomb}\n"
    if where == "memory":
        return f"name: t1\nresources:\n  memory: {bomb}\n"
    return f"name: t1\nidleTimeout: {bomb}\n"


@pytest.mark.parametrize("where", ["top", "description", "allowCidrs", "memory", "idleTimeout"])
async def test_alias_bomb_is_refused_quickly(tpl: Api, where: str) -> None:
    """Quickly in CPU time, not wall time (the app runs in this process): expanding the bomb
    would cost minutes of CPU, while a loaded host only stretches the wall clock."""
    started = time.process_time()
    reply = await put(tpl, billion_laughs(where))
    elapsed = time.process_time() - started
    assert reply.status < 500, reply.body
    assert reply.status in (200, 400), reply.body
    assert elapsed < 2, f"an alias bomb took {elapsed:.1f} s of CPU"
    if reply.status == 200:  # stored harmlessly: it must read back as quickly
        started = time.process_time()
        assert (await tpl.get("/api/templates/t1")).status == 200
        assert (await tpl.get("/api/templates")).status == 200
        assert time.process_time() - started < 2


async def test_template_over_64_kib_is_refused(tpl: Api, dirs: tuple[Path, Path]) -> None:
    _, user = dirs
    text = "name: big\ndescription: padded\n# " + "x" * (64 << 10) + "\n"
    reply = await put(tpl, text)
    assert reply.status == 400, reply.body
    reply.error_code()
    assert not (user / "big.yaml").exists()
    just_under = "name: big\n# " + "x" * ((64 << 10) - 100) + "\n"
    assert (await put(tpl, just_under)).status == 200


async def test_a_file_whose_name_disagrees_is_not_served(tpl: Api,
                                                         dirs: tuple[Path, Path]) -> None:
    _, user = dirs
    user.mkdir(parents=True, exist_ok=True)
    (user / "alias.yaml").write_text("name: offline\nnetwork:\n  mode: internet\n")
    reply = await tpl.get("/api/templates/alias")
    assert reply.status in (400, 404), reply.body  # never 500, never served as "offline"
    listed = await tpl.get("/api/templates")
    assert listed.status == 200
    assert "alias" not in {row["name"] for row in listed.body["templates"]}


# ---------------------------------------------------------------------------------------------
# Names never leave the templates directory
# ---------------------------------------------------------------------------------------------

ESCAPES = [
    "..%2F..%2Fetc%2Fpasswd", "..%2F..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e", "%2E%2E%2Fplanted",
    "..%2Fplanted", "..%2f..%2fplanted", "%2e%2e%2f%2e%2e%2fplanted", "a%2Fb", "a/b", "..",
    "%2e", ".planted", "..%5Cplanted", "planted%00", "%2Fetc%2Fpasswd", "%252e%252e%252fplanted",
]


@pytest.mark.parametrize("raw", ESCAPES)
async def test_names_never_read_outside(tpl: Api, dirs: tuple[Path, Path], raw: str) -> None:
    shipped, user = dirs
    user.mkdir(parents=True, exist_ok=True)
    outside = "name: planted\ndescription: OUTSIDE-THE-TEMPLATES-DIR\n"
    for directory in (user.parent, shipped.parent, user.parent.parent):
        (directory / "planted.yaml").write_text(outside)
    status, body = await raw_request(tpl, "GET", "/api/templates/offline")  # the helper works
    assert status == 200 and body["name"] == "offline", body
    for method in ("GET", "DELETE"):
        status, body = await raw_request(tpl, method, f"/api/templates/{raw}")
        assert status in (400, 404), (method, raw, status, body)
        text = json.dumps(body)
        assert "OUTSIDE-THE-TEMPLATES-DIR" not in text and "root:" not in text, text
    for directory in (user.parent, shipped.parent, user.parent.parent):
        assert (directory / "planted.yaml").read_text() == outside, "deleted from outside"
    assert Path("/etc/passwd").exists()


@pytest.mark.parametrize("name", ["../escape", "../../tmp/cst-escape", "a/b", "..", ".", ".hidden",
                                  "/abs", "x\x00y", "x" * 65, "UPPER", "-dash", "a\\b",
                                  "trailing\n"])
async def test_names_never_write_outside(tpl: Api, dirs: tuple[Path, Path], tmp_path: Path,
                                         name: str) -> None:
    before = tree(tmp_path)
    reply = await put(tpl, yaml.safe_dump({"name": name, "description": "escape"}))
    assert reply.status == 400, reply.body
    reply.error_code()
    assert tree(tmp_path) == before
    assert not Path("/tmp/cst-escape.yaml").exists()
    assert not Path("/escape.yaml").exists() and not Path("/abs.yaml").exists()


async def test_user_dir_is_the_only_place_written(tpl: Api, dirs: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    shipped, user = dirs
    before = tree(tmp_path)
    assert (await put(tpl, "name: offline\ndescription: mine\nnetwork:\n  mode: none\n")).status \
        == 200
    assert (await put(tpl, "name: fresh.one_2\n")).status == 200
    after = tree(tmp_path)
    changed = {path for path in set(before) | set(after) if before.get(path) != after.get(path)}
    user_rel = str(user.relative_to(tmp_path))
    assert changed == {f"{user_rel}/offline.yaml", f"{user_rel}/fresh.one_2.yaml"}, changed
    assert not [p for p in user.iterdir() if ".tmp" in p.name], "a temporary file was left"
    assert (await tpl.delete("/api/templates/offline")).status == 200  # user override removed
    assert (await tpl.get("/api/templates/offline")).body["template"]["source"] == "shipped"


# ---------------------------------------------------------------------------------------------
# Effective settings of a space made from a template
# ---------------------------------------------------------------------------------------------

def labels_of(info: dict[str, Any]) -> dict[str, str]:
    return info["Config"]["Labels"]  # type: ignore[no-any-return]


async def test_template_resources_apply_and_the_request_overrides_them(
        tpl: Api, space: SpaceMaker, docker_api: docker.APIClient, prefix: str) -> None:
    text = ("name: cst-small\ndescription: small\nidleTimeout: 1234\nresources:\n  memory: 300m\n"
            "  cpus: 0.5\n")
    assert (await put(tpl, text)).status == 200
    plain = await space(api=tpl, template="cst-small")
    info = container_of(docker_api, prefix, plain["name"])
    assert info["HostConfig"]["Memory"] == 300 << 20
    assert info["HostConfig"]["NanoCpus"] == 500_000_000
    labels = labels_of(info)
    assert labels["clawdspace.template"] == "cst-small"
    assert labels["clawdspace.network"] == "internet"
    assert labels["clawdspace.writable-rootfs"] == "true"
    assert labels["clawdspace.idle-timeout"] == "1234"
    shown = (await tpl.get(f"/api/spaces/{plain['name']}")).body["space"]
    assert shown["template"] == "cst-small"
    assert shown["memory"] == 300 << 20 and shown["cpus"] == 0.5
    assert shown["network"] == "internet"
    assert shown["writableRootfs"] is True
    assert shown["idleTimeout"] == 1234

    mine = await space(api=tpl, template="cst-small", memory="200m", cpus=0.25)
    info = container_of(docker_api, prefix, mine["name"])
    assert info["HostConfig"]["Memory"] == 200 << 20
    assert info["HostConfig"]["NanoCpus"] == 250_000_000
    assert labels_of(info)["clawdspace.template"] == "cst-small"
    create = [e for e in tpl.audit_lines()
              if e["type"] == "space.create" and e["space"] == mine["name"]]
    assert create and create[0]["meta"]["template"] == "cst-small"


async def test_user_default_wins_and_a_request_may_tighten(
        tpl: Api, space: SpaceMaker, docker_api: docker.APIClient, prefix: str) -> None:
    assert (await put(tpl, "name: default\nresources:\n  memory: 320m\n")).status == 200
    made = await space(api=tpl, network="none", writableRootfs=False)
    info = container_of(docker_api, prefix, made["name"])
    assert info["HostConfig"]["Memory"] == 320 << 20, "the user's default template was not used"
    assert info["HostConfig"]["NetworkMode"] == "none"
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    labels = labels_of(info)
    assert labels["clawdspace.template"] == "default"
    assert labels["clawdspace.network"] == "none"
    assert labels["clawdspace.writable-rootfs"] == "false"
    assert made["network"] == "none" and made["writableRootfs"] is False
    assert made["template"] == "default"
    code, out = in_container(docker_api, info["Id"], "ls /sys/class/net")
    assert code == 0 and out.split() == [b"lo"], out


@pytest.mark.parametrize(("template", "body", "code"), [
    ("offline", {"network": "internet"}, "network_loosening"),
    ("readonly", {"writableRootfs": True}, "rootfs_loosening"),
    ("offline", {"network": "lan"}, "invalid_network"),
    ("default", {"writableRootfs": "yes"}, "invalid_writableRootfs"),
    ("default", {"sudo": True}, "sudo_loosening"),
    ("default", {"sudo": "yes"}, "invalid_sudo"),
])
async def test_a_request_cannot_loosen_the_template(
        tpl: Api, docker_api: docker.APIClient, prefix: str, template: str,
        body: dict[str, Any], code: str) -> None:
    name = unique_name("loose")
    reply = await tpl.post("/api/spaces", {"name": name, "template": template, **body})
    assert reply.status == 400, reply.body
    assert reply.error_code() == code
    assert not container_exists(docker_api, f"{prefix}{name}")
    assert not volume_exists(docker_api, f"{prefix}vol-{name}")


async def test_sudo_only_where_the_template_allows_it(
        tpl: Api, space: SpaceMaker, docker_api: docker.APIClient, prefix: str) -> None:
    name = unique_name("sudo")
    reply = await put(tpl, f"name: {name}\nnetwork: {{mode: none}}\nsecurity: {{sudo: true}}\n")
    assert reply.status in (200, 201), reply.body
    made = await space(api=tpl, template=name)
    assert made["sudo"] is True
    info = container_of(docker_api, prefix, made["name"])
    assert "no-new-privileges:true" not in (info["HostConfig"]["SecurityOpt"] or [])
    assert "AUDIT_WRITE" in info["HostConfig"]["CapAdd"]
    assert labels_of(info)["clawdspace.sudo"] == "true"
    done = await tpl.exec(made["name"], "sudo -n id -u && id -un")
    assert (done["exitCode"], done["stdout"]) == (0, "0\nsandbox\n"), done

    tight = await space(api=tpl, template=name, sudo=False)  # a request may tighten it
    assert tight["sudo"] is False
    done = await tpl.exec(tight["name"], "sudo -n id -u")
    assert done["exitCode"] != 0 and "no new privileges" in done["stderr"], done
    plain = await space(api=tpl, network="none")  # the default template: no sudo
    assert plain["sudo"] is False
    done = await tpl.exec(plain["name"], "sudo -n id -u")
    assert done["exitCode"] != 0 and "no new privileges" in done["stderr"], done
    observed = await tpl.get(f"/api/spaces/{plain['name']}/observability")
    assert observed.status == 200, observed.body
    assert observed.body["observability"]["settings"]["sudo"] is False


async def test_readonly_template(tpl: Api, space: SpaceMaker, docker_api: docker.APIClient,
                                 prefix: str) -> None:
    made = await space(api=tpl, template="readonly")
    info = container_of(docker_api, prefix, made["name"])
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    assert info["HostConfig"]["Memory"] == 1 << 30  # the template's memory
    labels = labels_of(info)
    assert labels["clawdspace.template"] == "readonly"
    assert labels["clawdspace.writable-rootfs"] == "false"
    assert labels["clawdspace.network"] == "internet"
    assert made["writableRootfs"] is False and made["template"] == "readonly"
    name = made["name"]
    code, out = in_container(docker_api, info["Id"], "touch /etc/cst-x", user="0")  # even root
    assert code != 0 and b"Read-only file system" in out, out
    for path in ("/tmp/cst-x", "/var/tmp/cst-x", "/workspace/cst-x"):
        done = await tpl.exec(name, f"echo hi > {path} && cat {path}")
        assert done["exitCode"] == 0 and done["stdout"] == "hi\n", (path, done)


async def test_unknown_template_on_create(tpl: Api, docker_api: docker.APIClient,
                                          prefix: str) -> None:
    for template in ("no-such-template", "../default", "Default", 5, ""):
        name = unique_name("unk")
        reply = await tpl.post("/api/spaces", {"name": name, "template": template})
        assert reply.status == 400, (template, reply.body)
        reply.error_code()
        if template == "no-such-template":
            assert "no-such-template" in reply.body["error"], reply.body
        assert not container_exists(docker_api, f"{prefix}{name}")
        assert not volume_exists(docker_api, f"{prefix}vol-{name}")


async def test_template_image_must_exist(tpl: Api, docker_api: docker.APIClient,
                                         prefix: str) -> None:
    missing = f"cst-missing-{secrets.token_hex(3)}:latest"
    assert (await put(tpl, f"name: cst-img\nresources:\n  image: {missing}\n")).status == 200
    name = unique_name("img")
    reply = await tpl.post("/api/spaces", {"name": name, "template": "cst-img"})
    assert reply.status == 400, reply.body
    assert reply.error_code() == "image_not_found"
    assert missing in reply.body["error"]
    assert not container_exists(docker_api, f"{prefix}{name}")
    assert not volume_exists(docker_api, f"{prefix}vol-{name}")
