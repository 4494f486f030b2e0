"""load_config: defaults, settings.yaml, .env, environment, overrides, and bad settings."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import ROOT
from comfy.config import BackendConfig, Config, ConfigError, load_config


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """The folder holding settings.yaml (resolved, as load_config resolves it)."""
    return tmp_path.resolve()


def settings(base: Path, text: str = "") -> Path:
    """Write a settings.yaml in base and return its path."""
    path = base / "settings.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def bad(path: Path, **env: str) -> str:
    """The message of the ConfigError that loading path raises."""
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env)
    return str(info.value)


# defaults -----------------------------------------------------------------------------------------

def test_empty_settings_file_gives_the_documented_defaults(base: Path) -> None:
    config = load_config(settings(base), environ={})
    assert config.host == "127.0.0.1"
    assert config.port == 8000
    assert config.backends == (BackendConfig(url="http://127.0.0.1:8188", slots=1),)
    assert config.workflows_dir == ROOT / "workflows"  # no folder beside the settings: the shipped ones
    assert config.data_dir == base / "data"
    assert config.api_key == ""
    assert config.job_timeout == 60.0
    assert config.max_queue == 1000


def test_a_workflows_folder_beside_the_settings_is_used_when_none_is_named(base: Path) -> None:
    (base / "workflows").mkdir()
    assert load_config(settings(base), environ={}).workflows_dir == base / "workflows"


def test_missing_keys_and_empty_sections_keep_their_defaults(base: Path) -> None:
    config = load_config(settings(base, "server: {port: 9000}\njobs:\nclients:\n"), environ={})
    assert config.port == 9000
    assert config.host == "127.0.0.1"
    assert config.job_timeout == Config().job_timeout
    assert config.keepalive_interval == Config().keepalive_interval


def test_relative_paths_are_relative_to_the_settings_file_not_the_cwd(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = base / "conf"
    conf.mkdir()
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(settings(conf, "workflows_dir: wf\ndata_dir: ../state\n"), environ={})
    assert config.workflows_dir == conf / "wf"
    assert config.data_dir == conf / ".." / "state"
    assert config.uploads_dir == conf / ".." / "state" / "uploads"
    assert config.results_dir == conf / ".." / "state" / "results"


def test_absolute_paths_are_kept(base: Path) -> None:
    config = load_config(settings(base, f"workflows_dir: {base / 'w'}\ndata_dir: {base / 'd'}\n"), environ={})
    assert config.workflows_dir == base / "w"
    assert config.data_dir == base / "d"


def test_a_full_settings_file_is_read(base: Path) -> None:
    path = settings(base, """
server: {host: 0.0.0.0, port: "8100"}
backends:
  - url: http://gpu-a:8188/
    slots: 2
    name: gpu-a
  - http://gpu-b:8188
jobs: {timeout: 12.5, max_queue: 7}
clients: {allowed_origins: ["https://app.example"]}
limits: {max_string_length: 500}
auth: {api_key: s3cret}
""")
    config = load_config(path, environ={})
    assert (config.host, config.port) == ("0.0.0.0", 8100)
    assert config.backends == (BackendConfig("http://gpu-a:8188", 2, "gpu-a"), BackendConfig("http://gpu-b:8188"))
    assert config.job_timeout == 12.5
    assert config.max_queue == 7
    assert config.allowed_origins == ("https://app.example",)
    assert config.max_string_length == 500
    assert config.api_key == "s3cret"


# environment, .env and overrides -------------------------------------------------------------------

@pytest.mark.parametrize(("var", "value", "field", "expected"), [
    ("BRIDGE_HOST", "0.0.0.0", "host", "0.0.0.0"),
    ("BRIDGE_PORT", "8123", "port", 8123),
    ("BRIDGE_API_KEY", "k3y", "api_key", "k3y"),
])
def test_each_environment_variable_overrides_settings(base: Path, var: str, value: str, field: str,
                                                      expected: object) -> None:
    path = settings(base, "server: {host: 10.0.0.1, port: 8001}\nauth: {api_key: old}\n")
    assert getattr(load_config(path, environ={var: value}), field) == expected


@pytest.mark.parametrize(("var", "field"), [("BRIDGE_WORKFLOWS_DIR", "workflows_dir"),
                                            ("BRIDGE_DATA_DIR", "data_dir")])
def test_environment_overrides_paths(base: Path, var: str, field: str) -> None:
    path = settings(base, "workflows_dir: wf\ndata_dir: dd\n")
    target = base / "from-env"
    assert getattr(load_config(path, environ={var: str(target)}), field) == target


def test_bridge_backends_is_a_comma_separated_list_of_urls(base: Path) -> None:
    path = settings(base, "backends: [{url: 'http://old:8188', slots: 3}]\n")
    config = load_config(path, environ={"BRIDGE_BACKENDS": "http://a:8188, http://b:8189/ ,"})
    assert config.backends == (BackendConfig("http://a:8188"), BackendConfig("http://b:8189"))


def test_an_empty_environment_variable_does_not_blank_the_setting(base: Path) -> None:
    path = settings(base, "server: {host: 10.0.0.1}\n")
    assert load_config(path, environ={"BRIDGE_HOST": ""}).host == "10.0.0.1"


def test_dotenv_beside_the_settings_file_is_read(base: Path) -> None:
    path = settings(base, "server: {port: 8001}\n")
    (base / ".env").write_text("BRIDGE_PORT=8002\nBRIDGE_API_KEY=from-dotenv\n"
                               "BRIDGE_BACKENDS=http://x:1,http://y:2\n", encoding="utf-8")
    config = load_config(path, environ={})
    assert config.port == 8002
    assert config.api_key == "from-dotenv"
    assert [b.url for b in config.backends] == ["http://x:1", "http://y:2"]


def test_precedence_overrides_then_environment_then_dotenv_then_settings(base: Path) -> None:
    path = settings(base, "server: {host: yaml-host, port: 8001}\n")
    (base / ".env").write_text("BRIDGE_PORT=8002\nBRIDGE_HOST=dotenv-host\n", encoding="utf-8")
    assert load_config(path, environ={}).port == 8002
    assert load_config(path, environ={"BRIDGE_PORT": "8003"}).port == 8003
    assert load_config(path, environ={"BRIDGE_PORT": "8003"}).host == "dotenv-host"
    assert load_config(path, environ={"BRIDGE_PORT": "8003"}, overrides={"port": 8004}).port == 8004
    # an unset command-line flag (None) leaves the lower layers alone
    assert load_config(path, environ={"BRIDGE_PORT": "8003"}, overrides={"port": None}).port == 8003
    (base / ".env").unlink()
    assert load_config(path, environ={}).port == 8001


def test_the_real_environment_is_used_when_environ_is_not_given(base: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_PORT", "8765")
    assert load_config(settings(base)).port == 8765


# bad settings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "env", "key"), [
    pytest.param("colour: red\n", {}, "colour", id="unknown-key"),
    pytest.param("server: {prot: 8000}\n", {}, "server.prot", id="unknown-subkey"),
    pytest.param("server: {port: http}\n", {}, "server.port", id="port-not-number"),
    pytest.param("server: {port: 80.5}\n", {}, "server.port", id="port-fraction"),
    pytest.param("server: {port: 0}\n", {}, "server.port", id="port-zero"),
    pytest.param("server: {port: -1}\n", {}, "server.port", id="port-negative"),
    pytest.param("server: {port: 70000}\n", {}, "server.port", id="port-too-big"),
    pytest.param("", {"BRIDGE_PORT": "eighty"}, "BRIDGE_PORT", id="env-port-not-number"),
    pytest.param("", {"BRIDGE_PORT": "0"}, "BRIDGE_PORT", id="env-port-zero"),
    pytest.param("", {"BRIDGE_PORT": "70000"}, "BRIDGE_PORT", id="env-port-too-big"),
    pytest.param("backends: [{url: 'http://a:8188', slots: 0}]\n", {}, "backends[0].slots", id="slots-zero"),
    pytest.param("backends: [{url: 'http://a:8188'}, {url: 'http://b:8188', slots: two}]\n", {}, "backends[1].slots", id="slots-not-number"),
    pytest.param("backends: ['ftp://a:8188']\n", {}, "backends[0].url", id="url-ftp"),
    pytest.param("backends: ['localhost:8188']\n", {}, "backends[0].url", id="url-no-scheme"),
    pytest.param("backends: [{url: 'http://a:99999'}]\n", {}, "backends[0].url", id="url-port-out-of-range"),
    pytest.param("backends: [{url: 'http://a:port'}]\n", {}, "backends[0].url", id="url-port-not-number"),
    pytest.param("backends: ['http://[::1:8188']\n", {}, "backends[0].url", id="url-ipv6-unclosed"),
    pytest.param("", {"BRIDGE_BACKENDS": "http://[::1"}, "BRIDGE_BACKENDS[0].url", id="env-url-ipv6-unclosed"),
    pytest.param("", {"BRIDGE_BACKENDS": "http://a:8188,ws://b:8188"}, "BRIDGE_BACKENDS[1].url", id="env-url-ws"),
    pytest.param("backends: ['http://a:8188', 'http://a:8188/']\n", {}, "backends", id="duplicate-url"),
    pytest.param("backends: [{url: 'http://a:1', name: gpu}, {url: 'http://b:1', name: gpu}]\n", {}, "backends", id="duplicate-name"),
    pytest.param("backends: []\n", {}, "backends", id="no-backends"),
    pytest.param("", {"BRIDGE_BACKENDS": " , "}, "BRIDGE_BACKENDS", id="env-no-backends"),
    pytest.param("backends: [{url: 'http://a:8188', gpus: 2}]\n", {}, "backends[0].gpus", id="backend-unknown-key"),
    # unknown keys of mixed types (YAML reads 1 as a number) are still named, not a crash comparing them
    pytest.param("backends: [{url: 'http://a:8188', gpus: 2, 1: x}]\n", {}, "backends[0].1", id="backend-unknown-keys-mixed"),
    pytest.param("jobs: {timeout: soon}\n", {}, "jobs.timeout", id="timeout-not-number"),
    pytest.param("jobs: {timeout: .nan}\n", {}, "jobs.timeout", id="timeout-nan"),
    pytest.param("jobs: {timeout: 0}\n", {}, "jobs.timeout", id="timeout-zero"),
    pytest.param("jobs: {max_queue: true}\n", {}, "jobs.max_queue", id="max-queue-bool"),
    pytest.param("limits: {max_upload_bytes: [1]}\n", {}, "limits.max_upload_bytes", id="limit-list"),
    pytest.param("server: 8000\n", {}, "server", id="section-not-mapping"),
])
def test_bad_settings_name_the_key_in_one_line(base: Path, text: str, env: dict[str, str], key: str) -> None:
    message = bad(settings(base, text), **env)
    assert message.startswith(key + ":") or message.startswith(key + " "), message
    assert "\n" not in message


def test_missing_settings_file_names_the_file(base: Path) -> None:
    path = base / "nope.yaml"
    message = bad(path)
    assert str(path) in message
    assert "not found" in message


@pytest.mark.parametrize("content", [
    pytest.param(b"server: {port: 8000\n", id="broken-yaml"),
    pytest.param(b"server:\n  host: caf\xe9\n", id="not-utf8"),
    pytest.param(b"- just\n- a list\n", id="not-a-mapping"),
])
def test_unreadable_settings_file_names_the_file(base: Path, content: bytes) -> None:
    path = base / "settings.yaml"
    path.write_bytes(content)
    assert str(path) in bad(path)


def test_settings_path_that_is_a_folder_is_a_config_error(base: Path) -> None:
    folder = base / "settings.yaml"
    folder.mkdir()
    assert str(folder) in bad(folder)


# secrets ----------------------------------------------------------------------------------------------

def test_backend_label_never_shows_credentials(base: Path) -> None:
    assert BackendConfig("http://user:secret@host:8188").label == "host:8188"
    assert BackendConfig("https://user:secret@gpu.example").label == "gpu.example"
    assert BackendConfig("http://user:secret@host:8188", name="gpu-0").label == "gpu-0"
    path = settings(base, "backends: ['http://user:secret@host:8188']\n")
    label = load_config(path, environ={}).backends[0].label
    assert "secret" not in label and "user" not in label


def test_api_key_is_not_in_the_config_repr(base: Path) -> None:
    config = load_config(settings(base), environ={"BRIDGE_API_KEY": "hunter2-very-secret"})
    assert config.api_key == "hunter2-very-secret"
    assert "hunter2-very-secret" not in repr(config)


def test_named_keys_are_kept_only_as_digests(base: Path) -> None:
    digest = hashlib.sha256(b"ops-secret-0123456789").hexdigest()
    path = settings(base, "auth:\n  keys:\n    - {name: alice, key: alice-secret-0123456789}\n"
                          f"    - {{name: ops, role: admin, key_sha256: {digest}}}\n")
    config = load_config(path, environ={"BRIDGE_API_KEY": "shared-secret-key"})
    assert [(k.name, k.role) for k in config.api_keys] == [("alice", "caller"), ("ops", "admin"),
                                                           ("default", "caller")]
    assert config.api_keys[1].digest == bytes.fromhex(digest)
    assert "alice-secret" not in repr(config) and config.key_mode
    assert not load_config(settings(base, "auth: {keys: []}\n"), environ={}).key_mode


@pytest.mark.parametrize("keys, message", [
    ("- {name: a b, key: 0123456789abcdef}", "auth.keys[0].name"),
    ("- {name: a, role: root, key: 0123456789abcdef}", "auth.keys[0].role"),
    ("- {name: a, key: short}", "auth.keys[0].key: must be a string of at least 16"),
    ("- {name: a}", "exactly one of key and key_sha256"),
    ("- {name: a, key_sha256: nothex}", "auth.keys[0].key_sha256"),
    ("- {name: a, key: 0123456789abcdef, scope: x}", "auth.keys[0].scope: unknown"),
    ("- {name: a, key: 0123456789abcdef}\n    - {name: a, key: fedcba9876543210}", "share a name"),
    ("- just-a-string", "auth.keys[0]: must be a mapping"),
])
def test_bad_named_keys_name_the_key(base: Path, keys: str, message: str) -> None:
    assert message in bad(settings(base, f"auth:\n  keys:\n    {keys}\n"))


def test_security_settings_are_checked(base: Path) -> None:
    assert "server.trusted_proxies" in bad(settings(base, "server: {trusted_proxies: [not-an-ip]}\n"))
    assert "clients.ping_timeout" in bad(settings(base, "clients: {ping_interval: 5, ping_timeout: 10}\n"))
    config = load_config(settings(base, "server: {trusted_proxies: [127.0.0.1, 10.0.0.0/8],"
                                        " allowed_hosts: gpu.example.com}\n"), environ={})
    assert config.trusted_proxies == ("127.0.0.1", "10.0.0.0/8") and config.allowed_hosts == ("gpu.example.com",)


def test_a_backends_output_folder_is_relative_to_the_settings_and_must_exist(base: Path) -> None:
    (base / "comfy-out").mkdir()
    config = load_config(settings(base, "backends:\n  - {url: http://gpu:8188, output_dir: comfy-out}\n"), environ={})
    assert config.backends[0].output_dir == base / "comfy-out"
    message = bad(settings(base, "backends:\n  - {url: http://gpu:8188, output_dir: nowhere}\n"))
    assert message.startswith("backends[0].output_dir:") and "not a folder" in message
    assert "must be a path" in bad(settings(base, "backends:\n  - {url: http://gpu:8188, output_dir: [1]}\n"))
