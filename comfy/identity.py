"""Who is asking: the caller's key (name and role), its address behind trusted proxies, and its scope."""
from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Iterable, Mapping
from urllib.parse import urlsplit

from tornado.httputil import HTTPHeaders

from .config import ApiKey, Config

FORWARDING_HEADERS = ("X-Forwarded-For", "X-Real-Ip", "Forwarded")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class Identity:
    """The caller of one request. `owner` names who jobs and uploads belong to; `scope` namespaces clientIds."""

    name: str           # the key's name; "" without a key
    role: str           # "caller", "admin", or "anonymous" (open mode, public paths)
    address: str        # the caller's address (the proxy's client when the proxy is trusted)
    local: bool         # straight from loopback, not through any proxy
    key_mode: bool      # the bridge requires keys

    @property
    def admin(self) -> bool:
        """Holds an admin key: sees and steers everyone's work, drains and resumes backends."""
        return self.role == "admin"

    @property
    def operator(self) -> bool:
        """May change the bridge itself: an admin key, or in open mode a request straight from loopback."""
        return self.admin or (not self.key_mode and self.local)

    @property
    def owner(self) -> str:
        """Whose jobs, uploads and stored bytes these are: the key's name, or the address in open mode."""
        return self.name if self.key_mode else f"@{self.address}"

    def scope(self, client_id: str) -> str:
        """The clientId as the bridge keeps it: another key's identical string is another client.

        The shared key "default" (BRIDGE_API_KEY) and open mode use the bare id, as stores made before
        named keys did; "/" never occurs in a caller's clientId, so scoped ids cannot collide with bare ones."""
        if not self.key_mode or self.name == "default":
            return client_id
        return f"{self.name}/{client_id}"


def unscoped(client_id: str) -> str:
    """The caller's own clientId from a scoped one."""
    return client_id.rpartition("/")[2]


def client_tag(client_id: str) -> str:
    """A short, one-way tag of a clientId for logs: lines of one client can be matched, the id not recovered."""
    return hashlib.blake2s(client_id.encode("utf-8", "surrogateescape"), digest_size=5).hexdigest()


def find_key(keys: Iterable[ApiKey], given: str) -> ApiKey | None:
    """The key whose digest matches; every stored digest is compared, each in constant time."""
    digest = ApiKey.hash(given)
    found = None
    for key in keys:
        if hmac.compare_digest(digest, key.digest):
            found = key
    return found


def bearer(headers: Mapping[str, str], token: str | None = None) -> str:
    """The key a request presents: an Authorization Bearer header, else a ?token= (sockets)."""
    scheme, _, given = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return given.strip()
    return token or ""


def _networks(items: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(item, strict=False) for item in items]


@functools.lru_cache(maxsize=4096)  # every request asks of its peer's address, several times
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


class Resolver:
    """Turns a request's peer address and headers into an Identity, as the settings say."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.proxies = _networks(config.trusted_proxies)
        self.hosts = allowed_hosts(config)

    def trusted(self, address: str) -> bool:
        """True if this peer is a configured proxy, whose X-Forwarded-For is believed."""
        return bool(self.proxies) and self.within(address, self.proxies)

    @staticmethod
    def networks(items: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """IP networks from addresses or CIDR texts (checked when the settings were loaded)."""
        return _networks(items)

    @staticmethod
    def within(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
        """True if the address is in one of the networks."""
        ip = _ip(address)
        return ip is not None and any(ip in net for net in networks)

    def address(self, peer: str, headers: HTTPHeaders) -> tuple[str, bool]:
        """(the caller's address, whether the request came through a proxy).

        Only a trusted proxy's X-Forwarded-For is read, right to left, skipping further trusted proxies;
        any forwarding header at all makes the request forwarded, so it is never taken for loopback."""
        forwarded = any(headers.get(h) for h in FORWARDING_HEADERS)
        if not self.trusted(peer):
            return peer, forwarded
        hops = [h.strip() for h in ",".join(headers.get_list("X-Forwarded-For")).split(",") if h.strip()]
        for hop in reversed(hops):
            if _ip(hop) is None:
                break  # garbage from the far side: the last good hop is the caller
            peer = hop
            if not self.trusted(hop):
                break
        return peer, forwarded

    def identify(self, peer: str, headers: HTTPHeaders, key: ApiKey | None) -> Identity:
        """The identity of a request that presented `key` (None: no or no valid key)."""
        address, forwarded = self.address(peer, headers)
        ip = _ip(address)
        # a proxy of ours relays other machines' requests even when it adds no forwarding header
        local = not forwarded and not self.trusted(peer) and ip is not None and ip.is_loopback
        if key is None:
            return Identity("", "anonymous", address, local, self.config.key_mode)
        return Identity(key.name, key.role, address, local, True)

    def host_allowed(self, host_header: str) -> bool:
        """True if the Host header names this bridge (protects loopback services from DNS rebinding)."""
        if "*" in self.hosts or not host_header:
            return True  # browsers always send Host: a request without one comes from no web page
        return host_name(host_header) in self.hosts


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port, lower-case (IPv6 in brackets stays in brackets)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def allowed_hosts(config: Config) -> frozenset[str]:
    """Loopback names and server.allowed_hosts, else the bound address (any name when bound to all addresses)."""
    # loopback names always: a rebound page cannot use them, and local probes and scrapers do
    loopback = {"localhost", "127.0.0.1", "[::1]"}
    if config.allowed_hosts:
        return frozenset({*loopback, *(h.lower() for h in config.allowed_hosts)})
    if config.host in WILDCARD_HOSTS:
        return frozenset({"*"})
    bound = config.host.lower()
    return frozenset({*loopback, f"[{bound}]" if ":" in bound else bound})


def same_origin(origin: str, host_header: str) -> bool:
    """True if a browser's Origin is this bridge as the request addressed it."""
    return urlsplit(origin).netloc.lower() == host_header.strip().lower()
