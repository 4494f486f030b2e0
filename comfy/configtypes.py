"""The settings' value types: a named API key, one backend, and the error a wrong setting raises."""
from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the key."""


def known_mapping(where: str, item: Any, known: Collection[str], shape: str) -> dict[str, Any]:
    """One entry of a settings list that must be a mapping of `known` keys (`shape` says what it must be)."""
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be {shape}")
    unknown = set(item) - set(known)
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown, key=str)[0]}: unknown setting")
    return item


ROLES = ("caller", "admin")
KEY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class ApiKey:
    """One named key: who holds it and what it may do. Only the key's SHA-256 is kept."""

    name: str
    role: str
    digest: bytes = field(repr=False)

    @staticmethod
    def hash(key: str) -> bytes:
        """The digest a key is stored and compared as."""
        return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class BackendConfig:
    """One ComfyUI server the bridge may send jobs to."""

    url: str
    slots: int = 1
    name: str = ""
    weight: float = 1.0
    workflows: tuple[str, ...] | None = None  # None: every workflow
    output_dir: Path | None = None  # the server's output folder, when the bridge sees it: outputs are read there

    def accepts(self, alias: str) -> bool:
        """True if this server may run the workflow (its allow-list, when it has one, names it)."""
        return self.workflows is None or alias in self.workflows

    @property
    def label(self) -> str:
        """The name used in logs and listings: never includes credentials from the URL."""
        if self.name:
            return self.name
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


WEBHOOK_EVENTS = ("queued", "started", "progress", "completed", "failed", "cancelled")
DEFAULT_WEBHOOK_EVENTS = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class WebhookEndpoint:
    """One operator-configured webhook receiver: where, signed with what, for which events and workflows."""

    url: str
    secret: str = field(repr=False)
    events: frozenset[str] = frozenset(DEFAULT_WEBHOOK_EVENTS)
    workflows: frozenset[str] | None = None  # None: every workflow

    def wants(self, event: str, workflow: str) -> bool:
        """True if this endpoint is to hear of `event` for a job of `workflow`."""
        return event in self.events and (self.workflows is None or workflow in self.workflows)
