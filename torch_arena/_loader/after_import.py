"""Run a function right after a module is imported (or now, if it is already).

The switch (:mod:`torch_arena._loader.switch`) and the start-up hook
(:mod:`torch_arena._startup`) must reach loader classes of modules that may
not be imported yet (torch's DataLoader, torchdata's StatefulDataLoader),
without importing them early. A finder on ``sys.meta_path`` lets the normal
finders locate the module and wraps its loader so that ``callback(module)``
runs once the module has executed. Imports nothing but the standard library.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["when_imported"]

Callback = Callable[[ModuleType], None]
_waiting: dict[str, list[Callback]] = {}
_lock = threading.Lock()


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the callbacks."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader, self._name = loader, name

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        with _lock:
            callbacks = _waiting.pop(self._name, [])
        for callback in callbacks:
            callback(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ... of the real loader
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in _waiting:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, name)
                return spec
        return None


_finder = _Finder()


def when_imported(name: str, callback: Callback) -> None:
    """``callback(module)`` once module ``name`` has been imported: now if it
    is already, else right after its import (in the importing thread)."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    with _lock:
        _waiting.setdefault(name, []).append(callback)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
        module = sys.modules.get(name)  # imported by another thread meanwhile?
        late = _waiting.pop(name, []) if module is not None else []
    for waiting in late:
        waiting(module)  # type: ignore[arg-type]
