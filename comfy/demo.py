"""--demo: two simulated ComfyUI servers on loopback, and what the page is told about them."""
from __future__ import annotations

import logging
from typing import Any

from .config import BackendConfig, Config
from .fake import imaging

log = logging.getLogger(__name__)


def demo_info() -> dict[str, Any]:
    """What /health says in demo mode: the backends are simulated, and whether their images are real pixels."""
    if imaging.available():
        note = "Simulated ComfyUI servers: images are computed with Pillow (inverted, blurred, scaled, drawn)."
    else:
        note = ("Simulated ComfyUI servers: Pillow is not installed here, so results are plain placeholder "
                "images (pip install Pillow for realistic ones).")
    return {"simulated_backends": True, "realistic_images": imaging.available(), "note": note}


async def start_demo_backends(config: Config, profile: str = "mixed") -> tuple[Config, list[Any]]:
    """Start two simulated ComfyUI servers (of one release, or by default one 0.3.64 and one current) and point
    the config at them (data under data_dir/demo)."""
    from .fake import FakeComfy

    profiles = ["0.3.64", "current"] if profile == "mixed" else [profile] * 2
    fakes = [FakeComfy(duration=3.0, tick=0.05, profile=p) for p in profiles]
    for fake in fakes:
        await fake.start()
    log.warning("DEMO MODE: the backends are SIMULATED ComfyUI servers at %s; %s",
                ", ".join(f.url for f in fakes), demo_info()["note"])
    backends = tuple(BackendConfig(url=f.url, name=f"simulated-{i + 1}") for i, f in enumerate(fakes))
    return config.replace(backends=backends, data_dir=config.data_dir / "demo"), fakes
