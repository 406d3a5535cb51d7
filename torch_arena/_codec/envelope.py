"""The envelope: what crosses a queue for one offloaded object.

An envelope is ``header + pickle stream``. Large leaves are not in the stream:
a *reference* stands in their place (a persistent id, see :data:`PID_TAG`),
naming the handler kind, the binary's ``(offset, nbytes)`` in the unit and the
handler's description of the object. The header:

======  =======  ===========================================================
offset  type     field
======  =======  ===========================================================
0       4s       magic ``b"TAE2"`` (layout 2)
4       Q        the arena's token (an envelope restored against another
                 arena is refused)
12      Q        the unit's span
20      q        the threshold it was offloaded with (-1: not recorded)
28      I        CRC-32 of the header before it and of the body
======  =======  ===========================================================

:func:`read_envelope` validates all of it before anything is unpickled: a
damaged or truncated envelope is a ``ValueError`` saying "corrupt envelope".
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

__all__ = ["DEFAULT_THRESHOLD", "PID_TAG", "pack_envelope", "parse_envelope", "read_envelope"]

#: Leaves (tensors, arrays, bytes) smaller than this many bytes travel inside
#: the envelope instead of through the arena.
DEFAULT_THRESHOLD = 4096

_MAGIC = b"TAE2"
_HEADER = struct.Struct("<4sQQqI")
_CHECKED = _HEADER.size - 4  # the CRC covers the header before it, and the body
#: First element of every reference in the pickle stream.
PID_TAG = "torch_arena"


def pack_envelope(token: int, span: int, body: bytes, threshold: int = -1) -> bytes:
    """Prefix ``body`` with the envelope header (``threshold`` -1: not recorded)."""
    head = _HEADER.pack(_MAGIC, token, span, threshold, 0)[:_CHECKED]
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


def read_envelope(envelope: Any) -> tuple[int, int, int, memoryview]:
    """``(token, span, threshold, body)``; ValueError if ``envelope`` is not intact."""
    if not isinstance(envelope, (bytes, bytearray, memoryview)):
        raise TypeError(f"restore expects the bytes returned by offload(), got {type(envelope).__name__}")
    data = memoryview(envelope).cast("B")
    if len(data) < _HEADER.size:
        raise ValueError(f"corrupt envelope: {len(data)} bytes is shorter than its {_HEADER.size}-byte header")
    magic, token, span, threshold, checksum = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError("corrupt envelope: not written by torch_arena.offload (bad magic)")
    body = data[_HEADER.size :]
    if zlib.crc32(body, zlib.crc32(data[:_CHECKED])) != checksum:
        raise ValueError(
            f"corrupt envelope: its checksum does not match its {len(data)} bytes (damaged or truncated)"
        )
    return token, span, threshold, body


def parse_envelope(envelope: Any) -> tuple[int, int, memoryview]:
    """``(token, span, body)`` of an envelope; ValueError if it is not an intact one."""
    token, span, _, body = read_envelope(envelope)
    return token, span, body
