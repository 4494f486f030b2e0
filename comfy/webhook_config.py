"""Webhook settings and URLs: the `webhooks:` list, `webhook_delivery.allow_hosts`, and a caller's per-job
callback (the submit body's `webhook` key), each checked with a message that names what is wrong."""
from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Union
from urllib.parse import SplitResult, urlsplit

from .configtypes import DEFAULT_WEBHOOK_EVENTS, WEBHOOK_EVENTS, ConfigError, WebhookEndpoint, known_mapping
from .signing import MIN_KEY_BYTES, secret_key

MAX_URL = 2048
ANY_PORT = -1  # an allow_hosts entry with :* (any port)
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def check_url(url: Any) -> SplitResult:
    """An http(s) URL with a host and no user name or password in it; ValueError says what is wrong."""
    if not isinstance(url, str) or not url:
        raise ValueError("must be an http:// or https:// URL")
    if len(url) > MAX_URL:
        raise ValueError(f"is longer than {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        raise ValueError(f"is not a valid URL: {url[:80]!r}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must be an http:// or https:// URL, got {parts.scheme or 'no'} scheme")
    if "@" in parts.netloc:
        raise ValueError("must not hold a user name or password (the signature authenticates the bridge)")
    if not parts.hostname:
        raise ValueError("names no host")
    if parts.port == 0:
        raise ValueError("names port 0")
    if not url.isascii() or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise ValueError("must be ASCII without spaces or control characters (percent-encode the rest, "
                         "write a non-ASCII host name in its xn-- form)")
    return parts


def shown(url: str) -> str:
    """A URL as listings show it: scheme, host, port and path; never a query string (it may hold a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _events(where: str, value: Any) -> frozenset[str]:
    if value is None:
        return frozenset(DEFAULT_WEBHOOK_EVENTS)
    if not isinstance(value, list) or not value or not all(isinstance(e, str) for e in value):
        raise ValueError(f"{where}: must be a non-empty list of events ({', '.join(WEBHOOK_EVENTS)})")
    unknown = sorted(set(value) - set(WEBHOOK_EVENTS))
    if unknown:
        raise ValueError(f"{where}: unknown event {unknown[0]!r} (known: {', '.join(WEBHOOK_EVENTS)})")
    return frozenset(value)


def check_secret(where: str, secret: Any) -> str:
    """A signing secret: whsec_<base64> or plain text, at least MIN_KEY_BYTES bytes of key."""
    if not isinstance(secret, str) or not secret:
        raise ConfigError(f"{where}: a signing secret is required (e.g. whsec_ followed by base64 of 32 random "
                          "bytes: python -c \"import base64,os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\")")
    try:
        key = secret_key(secret)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"{where}: must stand for at least {MIN_KEY_BYTES} bytes of key")
    return secret


def parse_endpoints(key: str, val: Any) -> tuple[WebhookEndpoint, ...]:
    """webhooks: [{url, secret, events, workflows}]."""
    if val is None:
        return ()
    if not isinstance(val, list):
        raise ConfigError(f"{key}: must be a list of {{url, secret, events, workflows}} mappings")
    out: list[WebhookEndpoint] = []
    for i, item in enumerate(val):
        where = f"{key}[{i}]"
        item = known_mapping(where, item, ("url", "secret", "events", "workflows"), "a mapping with url and secret")
        try:
            check_url(item.get("url"))
            events = _events(f"{where}.events", item.get("events"))
        except ValueError as exc:
            text = str(exc)
            raise ConfigError(text if text.startswith(where) else f"{where}.url: {text}") from None
        flows = item.get("workflows")
        if flows is not None and (not isinstance(flows, list) or not flows
                                  or not all(isinstance(w, str) and w for w in flows)):
            raise ConfigError(f"{where}.workflows: must be a non-empty list of workflow aliases")
        secret = check_secret(f"{where}.secret", item.get("secret"))
        out.append(WebhookEndpoint(item["url"], secret, events, frozenset(flows) if flows is not None else None))
    urls = [e.url for e in out]
    if len(set(urls)) != len(urls):
        raise ConfigError(f"{key}: the same url is listed twice (give one entry all its events)")
    return tuple(out)


@dataclass(frozen=True)
class AllowedHost:
    """One entry of webhook_delivery.allow_hosts: a host (an exact name, `*.domain`, or an IP address) and the
    port a callback to it may use: None for the scheme's own (80, 443), a number, or ANY_PORT."""

    host: str
    port: int | None = None

    def matches(self, host: str, port: int) -> bool:
        """True if a URL's host (lower case, no trailing dot) and port fall under this entry."""
        if self.port is None:
            if port not in (80, 443):
                return False
        elif self.port not in (ANY_PORT, port):
            return False
        entry = self.host
        return host == entry or (entry.startswith("*.") and host.endswith(entry[1:]) and len(host) > len(entry) - 1)

    @functools.cached_property
    def address(self) -> IPAddress | None:
        """The entry's IP address, when it names one (worked out once: every callback delivery asks)."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None


def parse_allow_hosts(key: str, val: Any) -> tuple[AllowedHost, ...]:
    """webhook_delivery.allow_hosts: host names (exact), `*.example.com` (its subdomains) or IP addresses, each
    optionally with `:port` or `:*` (any port; [brackets] around an IPv6 address then)."""
    if val is None:
        return ()
    if isinstance(val, str):
        val = [v.strip() for v in val.split(",") if v.strip()]
    if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
        raise ConfigError(f"{key}: must be a list of host names")
    return tuple(_allowed_host(key, item) for item in val)


def _allowed_host(key: str, item: str) -> AllowedHost:
    text = item.strip().lower()
    port: int | None = None
    head, _, tail = text.rpartition(":")
    if (tail == "*" or tail.isdigit()) and (head.endswith("]") or (":" not in head and not head.startswith("["))):
        text = head  # host:port, [v6]:port (a bare IPv6 address has colons of its own)
        port = ANY_PORT if tail == "*" else int(tail) if tail.isdigit() and 0 < int(tail) < 65536 else 0
        if not port:
            raise ConfigError(f"{key}: {item!r} has a bad port (a number 1-65535, or * for any)")
    host = text.rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    name = host[2:] if host.startswith("*.") else host
    try:
        ipaddress.ip_address(name)
        ip = True
    except ValueError:
        ip = False
    wild = name != host
    if not (ip and not wild) and not (_HOST_NAME.match(name) and (not wild or "." in name)):
        raise ConfigError(f"{key}: {item!r} is not a host name, *.domain or IP address, with an optional :port "
                          "(no scheme or path; a *. entry needs a dot after it)")
    return AllowedHost(host, port)


def host_allowed(parts: SplitResult, allow: tuple[AllowedHost, ...]) -> AllowedHost | None:
    """The allow-list entry a URL's host and port fall under (the first), else None."""
    host = (parts.hostname or "").lower().rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return next((entry for entry in allow if entry.matches(host, port)), None)


def callback_of(value: Any, allow: tuple[AllowedHost, ...]) -> dict[str, Any]:
    """A submit's `webhook` ("https://host/path" or {"url", "events"}) as stored with the job; ValueError with
    the reason when it may not be used."""
    if not allow:
        raise ValueError("webhook: per-job callbacks are not enabled on this bridge "
                         "(its operator lists the hosts they may name in webhook_delivery.allow_hosts)")
    if isinstance(value, str):
        value = {"url": value}
    if not isinstance(value, dict):
        raise ValueError("webhook: must be a URL or {\"url\": ..., \"events\": [...]}")
    unknown = sorted(set(value) - {"url", "events"}, key=str)
    if unknown:
        raise ValueError(f"webhook.{unknown[0]}: unknown key (allowed: url, events)")
    try:
        parts = check_url(value.get("url"))
    except ValueError as exc:
        raise ValueError(f"webhook.url: {exc}") from None
    assert parts.hostname is not None
    if host_allowed(parts, allow) is None:
        port = f" on port {parts.port}" if parts.port else ""
        raise ValueError(f"webhook.url: the host {parts.hostname!r}{port} is not one this bridge may call "
                         "(webhook_delivery.allow_hosts; an entry without :port allows ports 80 and 443)")
    events = _events("webhook.events", value.get("events"))
    return {"url": value["url"], "events": [e for e in WEBHOOK_EVENTS if e in events]}
