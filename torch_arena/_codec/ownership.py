"""Whose bytes are these? The user's own values, or another object's pickled state.

SPDL's rule, that a pool restores bytes-likes as writable memoryviews over
shared memory, is meant for the user's own values: the item itself, and what
its containers hold (dict, list and tuple items, namedtuple fields, dataclass
members, the attributes of any object pickled attribute by attribute). The
same bytes type also appears in *other objects' pickled state*: an
``array.array``, a masked array, a numpy scalar, a ``datetime`` reduce to a
reconstructor that insists on ``bytes``. And a dict key or set member must
hash, which a writable memoryview cannot.

:class:`OwnershipPickler` marks those positions while the codec pickles. The
pickler visits every object in order, calling ``persistent_id`` first (where
the codec diverts large leaves) and, for objects that are not built-in
containers, ``reducer_override``; here that computes the reduction exactly as
pickle would and marks what it hands to the reconstructor. Marks are
propagated lazily, one level each time the pickler reaches a marked container
or object, so the cost is a shallow scan of what pickle visits anyway, and
only below another object's reduction or a dict's keys.
"""

from __future__ import annotations

import copyreg
import pickle
import types
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["OwnershipPickler"]

#: Types that hold neither bytes nor other objects: never worth a mark.
_SCALARS = frozenset((int, float, str, bool, type(None), complex, type))
_HASHED = frozenset((set, frozenset))
#: Reconstructors of object's default reduction: state is set attribute by attribute.
_DEFAULT_REDUCERS = (copyreg.__newobj__, copyreg.__newobj_ex__, copyreg._reconstructor)
#: Types whose reduction holds no bytes-like (tensors: storages, sizes, flags):
#: pickle reduces them itself, saving a Python call per tensor.
_OPAQUE = frozenset((types.FunctionType, torch.Tensor, torch.nn.Parameter, torch.Size, torch.dtype, torch.device))
_HOOKS = ("__reduce_ex__", "__reduce__", "__getstate__", "__setstate__", "__getnewargs__", "__getnewargs_ex__")
_OBJECT_HOOKS = tuple(getattr(object, name, None) for name in _HOOKS)


def _default_pickling(cls: type) -> bool:
    """Whether instances pickle by object's default machinery (a dataclass, a
    plain class, a namedtuple): their attributes or fields are user values."""
    hooks = tuple(getattr(cls, name, None) for name in _HOOKS)
    if hooks == _OBJECT_HOOKS:
        return True
    # namedtuple: only __getnewargs__ (= its fields) differs from object's
    return issubclass(cls, tuple) and hasattr(cls, "_fields") and hooks[:4] == _OBJECT_HOOKS[:4] and hooks[5] is None


class OwnershipPickler(pickle.Pickler):
    """A pickler that knows, for each object it is about to save, whether it is
    a user value or part of another object's pickled state (:meth:`in_state`)."""

    def __init__(self, file: Any, protocol: int) -> None:
        super().__init__(file, protocol=protocol)
        self._protocol = protocol
        self.mark_min = 0  # bytes shorter than this travel inline anyway: no mark needed
        # id -> object, holding each marked object so that its id stays its own
        self._state: dict[int, object] = {}
        self._expanded: set[int] = set()
        self._default: dict[type, bool] = {}

    def in_state(self, obj: object) -> bool:
        """Whether ``obj`` (being saved now) belongs to another object's state."""
        return id(obj) in self._state

    def _mark(self, obj: object) -> None:
        cls = type(obj)
        if cls in _SCALARS or (cls is bytes or cls is bytearray) and len(obj) < self.mark_min:  # type: ignore[arg-type]
            return
        self._state[id(obj)] = obj

    def _mark_all(self, objs: Any) -> None:
        if not _SCALARS.issuperset(map(type, objs)):
            for obj in objs:
                self._mark(obj)

    def visit_container(self, obj: Any, cls: type) -> None:
        """Called from ``persistent_id`` for each built-in container pickle saves."""
        key = id(obj)
        if key in self._state:
            if key not in self._expanded:  # everything below another object's state is state
                self._expanded.add(key)
                self._mark_all(obj)
                if cls is dict:
                    self._mark_all(obj.values())
        elif cls is dict or cls in _HASHED:  # keys and members must hash as they did
            self._mark_all(obj)

    def reducer_override(self, obj: Any) -> Any:
        """pickle's own reduction of ``obj``, after marking what is state in it."""
        cls = type(obj)
        if cls is type or cls in _OPAQUE:
            return NotImplemented
        reduce = copyreg.dispatch_table.get(cls)
        if reduce is not None:
            rv = reduce(obj)
        elif issubclass(cls, type):
            return NotImplemented
        else:
            rv = obj.__reduce_ex__(self._protocol)
        if not isinstance(rv, tuple) or len(rv) < 2:
            return rv  # a global's name, or pickle's own error about a bad reduction
        everything = id(obj) in self._state
        if not everything:
            default = self._default.get(cls)
            if default is None:
                default = self._default[cls] = _default_pickling(cls)
            if default and rv[0] in _DEFAULT_REDUCERS and (len(rv) < 6 or rv[5] is None):
                # attributes / fields / items: the user's own values (but keys must hash)
                if len(rv) > 4 and rv[4] is not None:
                    rv = (*rv[:4], self._marking_items(rv[4], False), *rv[5:])
                return rv
        if type(rv[1]) is tuple:
            self._mark_all(rv[1])
        if len(rv) > 2:
            self._mark(rv[2])
        if len(rv) > 3 and rv[3] is not None and everything:
            rv = (*rv[:3], self._marking(rv[3]), *rv[4:])
        if len(rv) > 4 and rv[4] is not None:
            rv = (*rv[:4], self._marking_items(rv[4], everything), *rv[5:])
        return rv

    def _marking(self, items: Any) -> Iterator[Any]:
        for item in items:
            self._mark(item)
            yield item

    def _marking_items(self, items: Any, values_too: bool) -> Iterator[Any]:
        for item in items:
            if type(item) is tuple and len(item) == 2:
                self._mark(item[0])  # a key: it must hash as it did
                if values_too:
                    self._mark(item[1])
            yield item
