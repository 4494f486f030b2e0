"""Settings: one frozen dataclass, loaded once from settings.yaml, .env and the environment."""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml
from dotenv import dotenv_values

from .configtypes import KEY_NAME as KEY_NAME, ROLES as ROLES, ApiKey as ApiKey
from .configtypes import BackendConfig as BackendConfig, ConfigError as ConfigError, known_mapping
from .configtypes import WebhookEndpoint as WebhookEndpoint
from .webhook_config import AllowedHost, check_secret, parse_allow_hosts, parse_endpoints

HERE = Path(__file__).resolve().parent.parent
DEFAULT_SETTINGS = HERE / "settings.yaml"


@dataclass(frozen=True)
class Config:
    """Everything the bridge is told by its operator. Tests build it directly."""

    backends: tuple[BackendConfig, ...] = (BackendConfig("http://127.0.0.1:8188"),)
    host: str = "127.0.0.1"
    port: int = 8000
    workflows_dir: Path = HERE / "workflows"
    data_dir: Path = HERE / "data"
    # the job store: "" = SQLite in data_dir (one bridge); postgresql://... = shared by several bridges
    store_url: str = field(default="", repr=False)
    cluster_name: str = ""  # this bridge's name in leases and events; "" = <hostname>:<port>
    lease_ttl: float = 10.0  # seconds within which a dead bridge's backends are taken over (see pool.py)
    # jobs
    job_timeout: float = 60.0
    max_queue: int = 1000
    max_queue_per_identity: int = 100  # waiting jobs of one identity (key, or address in open mode)
    history_poll_interval: float = 2.0
    interrupt_wait: float = 10.0
    max_attempts: int = 3
    results_ttl: float = 86400.0  # seconds an unfetched result is kept
    max_wait: float = 300.0  # seconds a submit may wait for its result (Prefer: wait=N); a longer N is capped
    # backend health
    probe_interval: float = 2.0
    down_after: int = 3
    up_after: int = 2
    failover_grace: float = 20.0
    # client sockets
    keepalive_interval: float = 5.0
    progress_interval: float = 0.1
    disconnect_grace: float = 5.0
    allowed_origins: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the REST API (CORS off when empty)
    max_ws_per_client: int = 8
    max_ws_total: int = 10_000
    # limits
    max_upload_bytes: int = 100 * 1024 * 1024
    max_upload_files: int = 16
    max_body_bytes: int = 1024 * 1024
    max_string_length: int = 10_000
    max_client_id_length: int = 128
    submit_rate: float = 10.0   # submits per second per clientId (sustained)
    submit_burst: int = 20      # submits a clientId may make at once before the rate applies
    upload_ttl: float = 3600.0        # seconds an upload no job uses is kept
    quota_bytes: int = 2 * 1024**3    # stored bytes (uploads + untaken results) per identity
    # jobs
    refetch_grace: float = 600.0      # seconds delivered results can be fetched again (?redeliver=1)
    # connections
    trusted_proxies: tuple[str, ...] = ()  # addresses/networks whose X-Forwarded-For is believed
    allowed_hosts: tuple[str, ...] = ()    # Host names served; empty: the bound address + localhost
    header_timeout: float = 10.0      # seconds a client may take to send its request line and headers
    body_timeout: float = 30.0        # seconds a request body may go without a byte arriving
    body_min_rate: int = 1024         # bytes/s a body must average after its first body_timeout seconds
    idle_timeout: float = 60.0        # seconds a kept-alive connection may wait for its next request
    send_timeout: float = 60.0        # seconds a download may wait for the caller to read more before it is cut
    max_connections: int = 10_000     # open client connections; capped below the open-file limit
    max_connections_per_address: int = 256  # of those, from one address (trusted proxies exempt)
    max_header_bytes: int = 64 * 1024  # request line + headers; beyond it 431
    ws_ping_interval: float = 20.0    # seconds between pings on /ws
    ws_ping_timeout: float = 20.0     # seconds a socket may leave a ping unanswered before it is closed
    # shutdown
    drain_timeout: float = 30.0  # seconds running jobs may take to finish on SIGTERM
    # backend connections
    connect_timeout: float = 5.0
    request_timeout: float = 30.0
    # auth
    api_key: str = field(default="", repr=False)  # BRIDGE_API_KEY: one caller key named "default"
    keys: tuple[ApiKey, ...] = ()
    # webhooks (comfy/webhooks.py)
    webhooks: tuple[WebhookEndpoint, ...] = ()
    webhook_allow_hosts: tuple[AllowedHost, ...] = ()  # hosts a caller's per-job callback may name; none: no callbacks
    webhook_callback_secret: str = field(default="", repr=False)  # signs per-job callbacks
    webhook_retry_for: float = 86400.0   # seconds a delivery is retried before it is marked failed
    webhook_timeout: float = 10.0        # seconds one delivery attempt may take
    webhook_max_in_flight: int = 16      # delivery attempts at once
    webhook_retry_delay: float = 1.0     # the first retry comes within this many seconds, doubling per attempt

    @property
    def api_keys(self) -> tuple[ApiKey, ...]:
        """Every key the bridge accepts (auth.keys, and api_key as the caller key "default")."""
        if not self.api_key:
            return self.keys
        return (*self.keys, ApiKey("default", "caller", ApiKey.hash(self.api_key)))

    @property
    def key_mode(self) -> bool:
        """True when callers must present a key (open mode otherwise)."""
        return bool(self.api_key or self.keys)

    @property
    def uploads_dir(self) -> Path:
        """Where uploaded input files are kept."""
        return self.data_dir / "uploads"

    @property
    def results_dir(self) -> Path:
        """Where job outputs are kept until the caller takes them."""
        return self.data_dir / "results"

    def replace(self, **changes: Any) -> Config:
        """A copy with some settings changed."""
        return dataclasses.replace(self, **changes)


# settings.yaml section/key -> Config field
_SECTIONS: dict[str, dict[str, str]] = {
    "server": {"host": "host", "port": "port", "drain_timeout": "drain_timeout",
               "trusted_proxies": "trusted_proxies", "allowed_hosts": "allowed_hosts",
               "header_timeout": "header_timeout", "body_timeout": "body_timeout",
               "body_min_rate": "body_min_rate", "idle_timeout": "idle_timeout", "send_timeout": "send_timeout",
               "max_connections": "max_connections", "max_connections_per_address": "max_connections_per_address", "max_header_bytes": "max_header_bytes"},
    "jobs": {"timeout": "job_timeout", "max_queue": "max_queue", "max_queue_per_identity": "max_queue_per_identity",
             "history_poll_interval": "history_poll_interval", "interrupt_wait": "interrupt_wait",
             "max_attempts": "max_attempts", "results_ttl": "results_ttl", "refetch_grace": "refetch_grace",
             "max_wait": "max_wait"},
    "health": {"probe_interval": "probe_interval", "down_after": "down_after", "up_after": "up_after",
               "failover_grace": "failover_grace"},
    "clients": {"keepalive_interval": "keepalive_interval", "progress_interval": "progress_interval",
                "disconnect_grace": "disconnect_grace", "allowed_origins": "allowed_origins",
                "cors_origins": "cors_origins", "max_ws_per_client": "max_ws_per_client",
                "max_ws_total": "max_ws_total", "ping_interval": "ws_ping_interval",
                "ping_timeout": "ws_ping_timeout"},
    "limits": {"max_upload_bytes": "max_upload_bytes", "max_upload_files": "max_upload_files",
               "max_body_bytes": "max_body_bytes", "max_string_length": "max_string_length",
               "max_client_id_length": "max_client_id_length", "submit_rate": "submit_rate",
               "submit_burst": "submit_burst", "upload_ttl": "upload_ttl", "quota_bytes": "quota_bytes"},
    "backend_connection": {"connect_timeout": "connect_timeout", "request_timeout": "request_timeout"},
    "auth": {"api_key": "api_key", "keys": "keys"},
    "cluster": {"name": "cluster_name", "lease_ttl": "lease_ttl"},
    "webhook_delivery": {"allow_hosts": "webhook_allow_hosts", "callback_secret": "webhook_callback_secret",
                         "retry_for": "webhook_retry_for", "timeout": "webhook_timeout",
                         "max_in_flight": "webhook_max_in_flight", "retry_delay": "webhook_retry_delay"},
}
_TOP_LEVEL = {"backends", "workflows_dir", "data_dir", "store", "webhooks", *_SECTIONS}
_RENAMED = {"store": "store_url"}  # top-level settings whose Config field has another name
_ENV = {"BRIDGE_STORE_URL": "store_url", "BRIDGE_HOST": "host", "BRIDGE_PORT": "port",
        "BRIDGE_BACKENDS": "backends",
        "BRIDGE_WORKFLOWS_DIR": "workflows_dir", "BRIDGE_DATA_DIR": "data_dir", "BRIDGE_API_KEY": "api_key"}
_POSITIVE = {"port", "max_queue", "max_queue_per_identity", "max_upload_bytes", "max_upload_files", "max_body_bytes",
             "max_string_length", "job_timeout", "history_poll_interval", "interrupt_wait",
             "keepalive_interval", "progress_interval", "connect_timeout", "request_timeout",
             "max_attempts", "results_ttl", "probe_interval", "max_ws_per_client", "max_ws_total",
             "max_client_id_length", "submit_rate", "submit_burst", "drain_timeout", "down_after", "up_after",
             "upload_ttl", "quota_bytes", "refetch_grace", "header_timeout", "body_timeout", "body_min_rate",
             "idle_timeout", "send_timeout", "max_connections", "max_connections_per_address", "max_header_bytes", "ws_ping_interval", "ws_ping_timeout",
             "lease_ttl", "max_wait", "webhook_retry_for", "webhook_timeout", "webhook_max_in_flight",
             "webhook_retry_delay"}


def load_config(path: Path | str | None = None, *, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Read settings.yaml, then .env beside it, then the environment, then explicit overrides."""
    path = Path(path) if path else DEFAULT_SETTINGS
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"settings file not found: {path}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of settings")
    base = path.resolve().parent
    values: dict[str, Any] = {}
    for key, val in raw.items():
        if key not in _TOP_LEVEL:
            raise ConfigError(f"{key}: unknown setting (known: {', '.join(sorted(_TOP_LEVEL))})")
        if key in _SECTIONS:
            if val is None:
                continue
            if not isinstance(val, dict):
                raise ConfigError(f"{key}: must be a mapping")
            for sub, sval in val.items():
                if sub not in _SECTIONS[key]:
                    raise ConfigError(f"{key}.{sub}: unknown setting")
                values[_SECTIONS[key][sub]] = (f"{key}.{sub}", sval)
        else:
            values[_RENAMED.get(str(key), str(key))] = (key, val)
    env = {**dotenv_values(base / ".env"), **(os.environ if environ is None else environ)}
    for name, fld in _ENV.items():
        if env.get(name):
            values[fld] = (name, env[name])
    for fld, val in (overrides or {}).items():
        if val is not None:
            values[fld] = (f"--{fld.replace('_', '-')}", val)
    return _build(values, base)


def _build(values: dict[str, tuple[str, Any]], base: Path) -> Config:
    """Check and convert every value; the first bad one stops the start with its key named."""
    defaults = Config()
    # Paths not given are relative to the settings file too; with no workflows folder beside it, the
    # workflows shipped with the bridge serve (a settings file of its own next to the single-file build).
    beside = base / "workflows"
    kwargs: dict[str, Any] = {"workflows_dir": beside if beside.is_dir() else HERE / "workflows",
                              "data_dir": base / "data"}
    for fld, (key, val) in values.items():
        default = getattr(defaults, fld)
        if fld == "backends":
            kwargs[fld] = _backends(key, val, base)
        elif fld in ("workflows_dir", "data_dir"):
            if not isinstance(val, str) or not val:
                raise ConfigError(f"{key}: must be a path")
            p = Path(val).expanduser()
            kwargs[fld] = p if p.is_absolute() else (base / p)
        elif fld == "keys":
            kwargs[fld] = _keys(key, val)
        elif fld == "store_url":
            kwargs[fld] = _store_url(key, val)
        elif fld == "webhooks":
            kwargs[fld] = parse_endpoints(key, val)
        elif fld == "webhook_allow_hosts":
            kwargs[fld] = parse_allow_hosts(key, val)
        elif fld in ("allowed_origins", "cors_origins", "trusted_proxies", "allowed_hosts"):
            if isinstance(val, str):
                val = [v.strip() for v in val.split(",") if v.strip()]
            if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
                raise ConfigError(f"{key}: must be a list of {'origins' if 'origins' in fld else 'names'}")
            if fld == "trusted_proxies":
                for item in val:
                    try:
                        ipaddress.ip_network(item, strict=False)
                    except ValueError:
                        raise ConfigError(f"{key}: {item!r} is not an IP address or network") from None
            kwargs[fld] = tuple(val)
        elif isinstance(default, str):
            kwargs[fld] = "" if val is None else str(val)
        else:
            kwargs[fld] = _number(key, val, type(default), fld in _POSITIVE)
            if fld == "port" and kwargs[fld] > 65535:
                raise ConfigError(f"{key}: must be at most 65535")
    config = Config(**kwargs)
    if config.ws_ping_timeout > config.ws_ping_interval:
        raise ConfigError("clients.ping_timeout: must not exceed clients.ping_interval")
    names = [k.name for k in config.api_keys]
    if len(set(names)) != len(names):
        raise ConfigError("auth.keys: two keys share a name (\"default\" is BRIDGE_API_KEY's)")
    if config.webhook_allow_hosts:  # per-job callbacks are always signed
        if not config.webhook_callback_secret:
            raise ConfigError("webhook_delivery.callback_secret: required when allow_hosts names hosts "
                              "(per-job callbacks are signed with it)")
        check_secret("webhook_delivery.callback_secret", config.webhook_callback_secret)
    return config


def _store_url(key: str, val: Any) -> str:
    """store: empty (SQLite in data_dir) or a postgresql:// URL."""
    if val is None or val == "":
        return ""
    if not isinstance(val, str):
        raise ConfigError(f"{key}: must be empty (SQLite in data_dir) or a postgresql:// URL")
    parts = urlsplit(val)
    if parts.scheme not in ("postgresql", "postgres") or not (parts.hostname or parts.path.strip("/")):
        shown = f"{parts.scheme}://..." if parts.scheme else repr(val[:40])
        raise ConfigError(f"{key}: must be empty (SQLite in data_dir) or postgresql://user@host:port/db, "
                          f"got {shown}")
    return val


def _keys(key: str, val: Any) -> tuple[ApiKey, ...]:
    """auth.keys: [{name, role, key | key_sha256}]; a key is kept only as its SHA-256."""
    if val is None:
        return ()
    if not isinstance(val, list):
        raise ConfigError(f"{key}: must be a list of {{name, role, key}} mappings")
    out: list[ApiKey] = []
    for i, item in enumerate(val):
        where = f"{key}[{i}]"
        item = known_mapping(where, item, ("name", "role", "key", "key_sha256"),
                             "a mapping with name, role and key (or key_sha256)")
        name = item.get("name")
        if not isinstance(name, str) or not KEY_NAME.match(name):
            raise ConfigError(f"{where}.name: must be 1-64 letters, digits and _ . -")
        role = item.get("role", "caller")
        if role not in ROLES:
            raise ConfigError(f"{where}.role: must be one of {', '.join(ROLES)}, got {role!r}")
        secret, hexed = item.get("key"), item.get("key_sha256")
        if (secret is None) == (hexed is None):
            raise ConfigError(f"{where}: give exactly one of key and key_sha256")
        if secret is not None:
            if not isinstance(secret, str) or len(secret) < 16:
                raise ConfigError(f"{where}.key: must be a string of at least 16 characters")
            digest = ApiKey.hash(secret)
        else:
            if not isinstance(hexed, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", hexed):
                raise ConfigError(f"{where}.key_sha256: must be 64 hex digits (sha256sum of the key)")
            digest = bytes.fromhex(hexed)
        out.append(ApiKey(name, role, digest))
    return tuple(out)


def _number(key: str, val: Any, kind: type, positive: bool) -> int | float:
    if isinstance(val, bool):
        raise ConfigError(f"{key}: must be a number, got {val!r}")
    try:
        num = kind(val) if not isinstance(val, str) or kind is float else int(val, 10)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: must be a{'n integer' if kind is int else ' number'}, got {val!r}") from None
    if kind is int and isinstance(val, float) and val != num:
        raise ConfigError(f"{key}: must be an integer, got {val!r}")
    if not math.isfinite(num):
        raise ConfigError(f"{key}: must be a finite number, got {val!r}")
    if num < 0 or (positive and num == 0):
        raise ConfigError(f"{key}: must be {'greater than 0' if positive else 'at least 0'}, got {val!r}")
    return num


def _output_dir(key: str, val: Any, base: Path) -> Path | None:
    """A backend's output folder as the bridge sees it (relative to the settings file); it must exist."""
    if val is None or val == "":
        return None
    if not isinstance(val, str):
        raise ConfigError(f"{key}: must be a path")
    path = Path(val).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    if not path.is_dir():
        raise ConfigError(f"{key}: {str(path)!r} is not a folder (ComfyUI's output folder, as this machine sees it)")
    return path


def _backends(key: str, val: Any, base: Path) -> tuple[BackendConfig, ...]:
    if isinstance(val, str):
        val = [{"url": u.strip()} for u in val.split(",") if u.strip()]
    if not isinstance(val, list) or not val:
        raise ConfigError(f"{key}: must list at least one ComfyUI server")
    out: list[BackendConfig] = []
    for i, item in enumerate(val):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            item = {"url": item}
        item = known_mapping(where, item, ("url", "slots", "name", "weight", "workflows", "output_dir"),
                             "a URL or a mapping with url")
        url = item.get("url")
        try:
            parts = urlsplit(url if isinstance(url, str) else "")
        except ValueError:  # an unclosed IPv6 bracket
            raise ConfigError(f"{where}.url: not a URL: {url!r}") from None
        if not isinstance(url, str) or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}.url: must be an http(s) URL, got {url!r}")
        try:
            parts.port
        except ValueError:
            raise ConfigError(f"{where}.url: bad port in {url!r}") from None
        slots = _number(f"{where}.slots", item.get("slots", 1), int, True)
        name = item.get("name") or ""
        if not isinstance(name, str):
            raise ConfigError(f"{where}.name: must be a string")
        weight = _number(f"{where}.weight", item.get("weight", 1.0), float, True)
        allowed = item.get("workflows")
        if allowed is not None and (not isinstance(allowed, list) or not allowed
                                    or not all(isinstance(a, str) for a in allowed)):
            raise ConfigError(f"{where}.workflows: must be a non-empty list of workflow aliases")
        out.append(BackendConfig(url=url.rstrip("/"), slots=int(slots), name=name, weight=float(weight),
                                 workflows=tuple(allowed) if allowed is not None else None,
                                 output_dir=_output_dir(f"{where}.output_dir", item.get("output_dir"), base)))
    urls = [b.url for b in out]
    if len(set(urls)) != len(urls):
        raise ConfigError(f"{key}: the same URL is listed twice")
    labels = [b.label for b in out]
    for label in labels:
        if labels.count(label) > 1:
            raise ConfigError(f"{key}: two servers share the label {label!r}; give them distinct names")
    return tuple(out)
