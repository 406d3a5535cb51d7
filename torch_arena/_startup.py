"""The interpreter start-up hook: ``TORCH_ARENA`` puts every DataLoader on an arena.

``torch_arena-startup.pth`` sits in site-packages (installed with the
package; ``python -m torch_arena install-hook`` adds it where an install did
not, e.g. an editable one). Python runs its one line in every interpreter
that starts, and the line reads one environment variable:

* unset, empty, ``none``, ``off`` or ``0``: nothing else happens, nothing is
  imported;
* otherwise :func:`run`: the value is parsed and validated here, at start-up
  (a bad value prints what was wrong and the accepted values, and the process
  exits with status 2: never a silent stock run), and the switch
  (:mod:`torch_arena._loader.switch`) is armed. Nothing heavy is imported:
  once torch's DataLoader (or torchdata's StatefulDataLoader) is imported, its
  ``_get_iterator`` is replaced by a small trampoline, and the first loader
  that starts an iterator turns the switch on (by then torch has finished
  importing; turning it on inside torch's own import would import torch_arena
  into a half-initialised torch).

The value: an arena name, optionally followed by settings, comma-separated::

    TORCH_ARENA=pool
    TORCH_ARENA=ring,budget=4GiB,timeout=5,overflow=raise,threshold=8192
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from torch_arena._loader.after_import import when_imported
from torch_arena._loader.settings import SETTING_NAMES, ArenaSettings

__all__ = ["VARIABLE", "parse", "run", "state"]

VARIABLE = "TORCH_ARENA"
#: Values that mean off (what the .pth line checks before importing anything).
OFF = ("", "none", "off", "0", "false")
#: The keys of the compact form -> ArenaDataLoader's keyword arguments.
KEYS = {name.removeprefix("arena_"): name for name in SETTING_NAMES if name != "arena"}
_CASTS = {"timeout": float, "threshold": int}
_EXAMPLE = "e.g. TORCH_ARENA=pool or TORCH_ARENA=ring,budget=4GiB,timeout=5,overflow=raise,threshold=8192"

#: What the hook did in this process (the doctor reports it).
state: dict[str, Any] = {"ran": False, "settings": None, "turned_on": False}
_trampolines: list[tuple[type, Any]] = []
_lock = threading.Lock()


def parse(text: str) -> ArenaSettings:
    """The settings ``TORCH_ARENA=text`` asks for; ValueError naming the
    variable and the accepted values for anything else."""
    name, *pairs = [part.strip() for part in text.split(",")]
    if name.lower() in OFF:
        name = "none"
    if name.lower() not in ("pool", "ring", "none"):
        raise ValueError(
            f"{VARIABLE}={text!r}: {name!r} is not an arena: use pool, ring or none (off), "
            f"optionally followed by settings ({', '.join(f'{k}=...' for k in KEYS)}), {_EXAMPLE}"
        )
    kwargs: dict[str, Any] = {"arena": name.lower()}
    for pair in pairs:
        key, sep, value = (part.strip() for part in pair.partition("="))
        if key.lower() not in KEYS or not sep or not value:
            raise ValueError(
                f"{VARIABLE}={text!r}: {pair!r} is not a setting: after the arena come "
                f"{', '.join(f'{k}=...' for k in KEYS)}, comma-separated, {_EXAMPLE}"
            )
        key = key.lower()
        cast = _CASTS.get(key)
        try:
            kwargs[KEYS[key]] = cast(value) if cast is not None else value
        except ValueError:
            raise ValueError(f"{VARIABLE}={text!r}: {key} must be a {cast.__name__}, got {value!r}") from None
    return ArenaSettings.from_arguments(where=f"{VARIABLE}={text!r}", allow_instance=False, **kwargs)


def run() -> None:
    """What the .pth line calls when ``TORCH_ARENA`` is set. Runs once: in a
    virtual environment ``site`` processes site-packages, and so the line,
    twice (``site.venv`` adds it, then ``site.main`` again)."""
    with _lock:
        if state["ran"]:
            return
        state["ran"] = True
    text = os.environ.get(VARIABLE, "")
    try:
        settings = parse(text)
    except ValueError as exc:
        # At interpreter start-up: an exception here would print a traceback
        # about the site module and let the program run on without the arena.
        sys.stderr.write(f"torch_arena: {exc}\nUnset {VARIABLE} to run without torch_arena.\n")
        sys.stderr.flush()
        os._exit(2)
    state["settings"] = settings
    if settings.enabled:
        when_imported("torch.utils.data.dataloader", lambda module: _arm(module.DataLoader))
        when_imported("torchdata.stateful_dataloader.stateful_dataloader", lambda m: _arm(m.StatefulDataLoader))


def _arm(cls: type) -> None:
    """Replace ``cls._get_iterator`` by a trampoline that turns the switch on."""
    with _lock:
        if state["turned_on"] or any(armed is cls for armed, _ in _trampolines):
            return  # the switch hooks the class itself / armed already
        original = cls.__dict__["_get_iterator"]

        def _get_iterator(self: Any) -> Any:
            _turn_on()
            return self._get_iterator()  # the switch's hook, now

        _get_iterator.__wrapped__ = original  # type: ignore[attr-defined]
        _get_iterator.torch_arena_trampoline = True  # type: ignore[attr-defined]
        cls._get_iterator = _get_iterator  # type: ignore[attr-defined]
        _trampolines.append((cls, original))


def _turn_on() -> None:
    with _lock:
        if state["turned_on"]:
            return
        state["turned_on"] = True
        for cls, original in reversed(_trampolines):
            cls._get_iterator = original  # type: ignore[attr-defined]
        _trampolines.clear()
    from torch_arena._loader import switch

    settings: ArenaSettings = state["settings"]
    switch.enable(**settings.as_kwargs(), _where=VARIABLE)
