"""python -m bench NAME [args]: run one benchmark (scheduling, ...)."""
from __future__ import annotations

import importlib
import logging
import sys

NAMES = ("scheduling", "store", "overhead", "control_plane", "websockets", "large_files", "abuse", "cluster",
         "webhooks")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in NAMES:
        print(f"usage: python -m bench {{{','.join(NAMES)}}} [--help]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR)  # the bridge's own warnings (e.g. a backend not up yet) are noise here
    module = importlib.import_module(f"bench.{sys.argv[1]}")
    return int(module.main(sys.argv[2:]))


if __name__ == "__main__":
    sys.exit(main())
