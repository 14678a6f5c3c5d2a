"""Configuration from the environment, and how ``clawdspace.py serve`` starts or refuses to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import run_cli, serve, service_env, unique_name

import clawdspace

ENV_DEFAULTS = {
    "api_key": None,
    "auth_disabled": False,
    "host": "0.0.0.0",  # noqa: S104 - the documented default, compared only
    "port": 7777,
    "data_dir": "/var/lib/clawdspace",
    "templates_dir": "/var/lib/clawdspace/templates",
    "image": "clawdspace:latest",
    "gpu_image": "clawdspace:latest",
    "prefix": "clawdspace-",
    "idle_timeout": 600,
    "nodes": "",
    "exec_timeout": 600,
    "exec_max_timeout": 86400,
    "exec_output_limit": 1048576,
    "max_body_bytes": 8388608,
    "pids_limit": 1024,
    "audit_max_bytes": 52428800,
    "audit_keep": 5,
    "nvidia_smi": "nvidia-smi",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No CLAWDSPACE_* (or API_KEY) variable from the outer environment."""
    for name in list(os.environ):
        if name.startswith("CLAWDSPACE_") or name == "API_KEY":
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults(clean_env: pytest.MonkeyPatch) -> None:
    config = clawdspace.Config.from_env()
    assert {f: getattr(config, f) for f in ENV_DEFAULTS} == ENV_DEFAULTS


def test_every_variable_is_read(clean_env: pytest.MonkeyPatch) -> None:
    values = {
        "CLAWDSPACE_API_KEY": "k1", "CLAWDSPACE_AUTH_DISABLED": "yes",
        "CLAWDSPACE_HOST": "127.0.0.9", "CLAWDSPACE_PORT": "8080",
        "CLAWDSPACE_DATA_DIR": "/srv/cs", "CLAWDSPACE_IMAGE": "img:1",
        "CLAWDSPACE_GPU_IMAGE": "gpu:2", "CLAWDSPACE_PREFIX": "pfx-",
        "CLAWDSPACE_IDLE_TIMEOUT": "30", "CLAWDSPACE_NODES": "a=http://a:7777",
        "CLAWDSPACE_EXEC_TIMEOUT": "5", "CLAWDSPACE_EXEC_MAX_TIMEOUT": "50",
        "CLAWDSPACE_EXEC_OUTPUT_LIMIT": "2048", "CLAWDSPACE_MAX_BODY_BYTES": "4096",
        "CLAWDSPACE_PIDS_LIMIT": "64", "CLAWDSPACE_AUDIT_MAX_BYTES": "8192",
        "CLAWDSPACE_AUDIT_KEEP": "2", "CLAWDSPACE_NVIDIA_SMI": "/opt/nvidia-smi",
        "CLAWDSPACE_TEMPLATES_DIR": "/srv/tpl", "CLAWDSPACE_BODY_TIMEOUT": "7",
    }
    for name, value in values.items():
        clean_env.setenv(name, value)
    config = clawdspace.Config.from_env()
    assert config == clawdspace.Config(
        api_key="k1", auth_disabled=True, host="127.0.0.9", port=8080, data_dir="/srv/cs",
        templates_dir="/srv/tpl", image="img:1", gpu_image="gpu:2", prefix="pfx-",
        idle_timeout=30, nodes="a=http://a:7777", exec_timeout=5, exec_max_timeout=50,
        exec_output_limit=2048, max_body_bytes=4096, pids_limit=64, audit_max_bytes=8192,
        audit_keep=2, nvidia_smi="/opt/nvidia-smi", body_timeout=7)


def test_derived_defaults_follow_their_base(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CLAWDSPACE_DATA_DIR", "/srv/cs")
    clean_env.setenv("CLAWDSPACE_IMAGE", "img:1")
    config = clawdspace.Config.from_env()
    assert config.templates_dir == "/srv/cs/templates"
    assert config.gpu_image == "img:1"


def test_api_key_alias(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("API_KEY", "alias-key")
    assert clawdspace.Config.from_env().api_key == "alias-key"
    clean_env.setenv("CLAWDSPACE_API_KEY", "main-key")
    assert clawdspace.Config.from_env().api_key == "main-key"


@pytest.mark.parametrize(("name", "value"), [
    ("CLAWDSPACE_PORT", "abc"),
    ("CLAWDSPACE_PORT", "80.5"),
    ("CLAWDSPACE_PORT", "-1"),
    ("CLAWDSPACE_IDLE_TIMEOUT", "10m"),
    ("CLAWDSPACE_EXEC_TIMEOUT", "0"),
    ("CLAWDSPACE_EXEC_OUTPUT_LIMIT", "100"),
    ("CLAWDSPACE_PIDS_LIMIT", "1e3"),
    ("CLAWDSPACE_AUDIT_KEEP", "0"),
    ("CLAWDSPACE_AUTH_DISABLED", "maybe"),
])
def test_bad_values_are_config_errors(clean_env: pytest.MonkeyPatch, name: str,
                                      value: str) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(clawdspace.ConfigError, match=name):
        clawdspace.Config.from_env()


def test_check_refuses_unusable_configs() -> None:
    with pytest.raises(clawdspace.ConfigError, match="API key"):
        clawdspace.Config().check()
    with pytest.raises(clawdspace.ConfigError, match="PREFIX"):
        clawdspace.Config(api_key="k", prefix="Bad Prefix/").check()
    clawdspace.Config(api_key="k").check()
    clawdspace.Config(auth_disabled=True).check()


@pytest.mark.parametrize("env", [
    {},
    {"CLAWDSPACE_AUTH_DISABLED": "false"},
    {"CLAWDSPACE_API_KEY": ""},
    {"CLAWDSPACE_API_KEY": "k", "CLAWDSPACE_PORT": "seven"},
], ids=["no-key", "auth-enabled", "empty-key", "bad-port"])
def test_serve_refuses_to_start(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_cli("serve", env=service_env(
        CLAWDSPACE_DATA_DIR=str(tmp_path), CLAWDSPACE_HOST="127.0.0.1", **env))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ERROR: ")
    assert "Traceback" not in result.stderr + result.stdout


def test_version_command() -> None:
    result = run_cli("version", env=service_env())
    assert result.returncode == 0
    assert result.stdout.strip() == clawdspace.VERSION


def test_auth_disabled_starts_and_warns(tmp_path: Path, prefix: str) -> None:
    with serve(tmp_path, None, prefix, CLAWDSPACE_AUTH_DISABLED="true") as server:
        status, body = server.request("GET", "/api/spaces", key=None)
        assert status == 200, body
        assert isinstance(body["spaces"], list)
        status, body = server.request("GET", f"/api/spaces/{unique_name()}", key=None)
        assert status == 404, body
        warnings = [line for line in server.log().splitlines() if "WARNING" in line]
    assert any("AUTHENTICATION IS DISABLED" in line for line in warnings), server.log()
