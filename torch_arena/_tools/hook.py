"""``python -m torch_arena hook``: the start-up hook that reads ``TORCH_ARENA``.

A wheel install puts ``torch_arena-startup.pth`` into site-packages. An
editable install, a source tree on ``PYTHONPATH`` or a copied environment may
lack it; then ``TORCH_ARENA`` has no effect, and ``doctor`` says so. This
command shows where it is (``status``), puts it into this interpreter's
site-packages (``install``) or removes it (``remove``).
"""

from __future__ import annotations

import argparse
import importlib.resources
import site
import sysconfig
from pathlib import Path

__all__ = ["HOOK", "install", "installed", "main", "remove"]

HOOK = "torch_arena-startup.pth"


def _site_dirs() -> list[Path]:
    dirs = [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"]]
    return list(dict.fromkeys(Path(d) for d in dirs))


def installed() -> list[Path]:
    """The hook files this interpreter runs at start-up."""
    return [d / HOOK for d in _site_dirs() if (d / HOOK).is_file()]


def install() -> Path:
    """Write the hook into this interpreter's site-packages; returns its path."""
    target = Path(sysconfig.get_paths()["purelib"]) / HOOK
    target.write_text((importlib.resources.files("torch_arena") / "startup.pth").read_text())
    return target


def remove() -> list[Path]:
    """Remove every hook file of this interpreter; returns what was removed."""
    found = installed()
    for path in found:
        path.unlink()
    return found


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m torch_arena hook``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m torch_arena hook", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", nargs="?", choices=("status", "install", "remove"), default="status")
    action = parser.parse_args(argv).action
    if action == "install":
        print(f"installed {install()}: TORCH_ARENA now applies to every Python process of this environment")
    elif action == "remove":
        gone = remove()
        print("removed " + ", ".join(map(str, gone)) if gone else "no start-up hook was installed")
    else:
        found = installed()
        print("\n".join(f"installed: {p}" for p in found) if found else
              "not installed: TORCH_ARENA has no effect here; run `python -m torch_arena hook install`")
        return 0 if found else 1
    return 0
