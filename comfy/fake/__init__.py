"""A protocol-faithful fake ComfyUI server (Tornado) for the bridge's tests, demo mode and benchmarks."""
from __future__ import annotations

import logging

from .server import FakeComfy

log = logging.getLogger(__name__)

__all__ = ["FakeComfy"]
