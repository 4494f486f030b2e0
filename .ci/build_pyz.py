"""Build dist/comfy-bridge.pyz: the bridge, its page, workflows, default settings and pure-Python dependencies.

    python .ci/build_pyz.py [--out dist/comfy-bridge.pyz]

The result needs only a Python (the same minor version) on the GPU box:
    python comfy-bridge.pyz --config settings.yaml
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipapp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ["bridge.py", "settings.yaml", "comfy", "handlers", "static", "workflows"]

MAIN = '''"""Run comfy-bridge from this zip: its files unpacked once where this user may write, then bridge.main()."""
import asyncio
import atexit
import hashlib
import os
import shutil
import sys
import tempfile
import zipfile


def places(archive):
    """Folders to unpack into, best first: systemd's cache/runtime folders, $XDG_CACHE_HOME, a folder beside
    the archive (never the home folder, which a service account may not have)."""
    for name in ("CACHE_DIRECTORY", "RUNTIME_DIRECTORY", "XDG_CACHE_HOME"):
        base = os.environ.get(name, "").split(":")[0]
        if base:
            yield os.path.join(base, "comfy-bridge")
    yield os.path.join(os.path.dirname(archive), ".comfy-bridge")


def unpack_into(folder, archive, digest):
    """The unpacked bundle in folder/<digest>, made if missing; OSError when folder is not writable."""
    target = os.path.join(folder, digest)
    if os.path.isfile(os.path.join(target, "bridge.py")):
        return target
    os.makedirs(folder, mode=0o700, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=folder)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another process unpacked it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def unpack():
    """The bundle's files on disk (the page and the workflows are served as files), never in a place this
    user may not write; with no such place, a private temporary folder for this run."""
    archive = os.path.abspath(sys.argv[0])
    with open(archive, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:16]
    for folder in places(archive):
        try:
            return unpack_into(folder, archive, digest)
        except OSError:
            continue
    tmp = tempfile.mkdtemp(prefix="comfy-bridge-")
    atexit.register(shutil.rmtree, tmp, True)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
    return tmp


try:
    home = unpack()
except OSError as exc:
    sys.exit(f"comfy-bridge: cannot unpack {sys.argv[0]}: {exc}")
sys.path[:0] = [home, os.path.join(home, "_deps")]
if "--config" not in sys.argv and sys.argv[1:2] != ["init"]:
    # without a settings file of the operator's, keep data beside where the bridge is started
    os.environ.setdefault("BRIDGE_DATA_DIR", os.path.abspath("data"))
import bridge  # noqa: E402

sys.exit(asyncio.run(bridge.main(sys.argv[1:])))
'''


def build(out: Path) -> Path:
    """Assemble the tree in a temporary folder and zip it with a __main__."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "app"
        tree.mkdir()
        for name in APP:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "data"))
            else:
                shutil.copy2(src, tree / name)
        deps = tree / "_deps"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target", str(deps),
                        "-r", str(ROOT / "requirements.txt")], check=True)
        # compiled speed-ups cannot load from the bundle's folder on every box; each has a pure-Python fallback
        for ext in ("*.so", "*.pyd"):
            for f in deps.rglob(ext):
                f.unlink()
        for f in list(deps.glob("*.dist-info")) + list(deps.glob("bin")):
            shutil.rmtree(f)
        (tree / "__main__.py").write_text(MAIN)
        out.parent.mkdir(parents=True, exist_ok=True)
        zipapp.create_archive(tree, out, interpreter="/usr/bin/env python3", compressed=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "dist" / "comfy-bridge.pyz")
    args = p.parse_args()
    out = build(args.out)
    print(f"built {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
