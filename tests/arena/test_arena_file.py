"""The arena file: what a pickled handle carries, and the checks made when it is opened."""

from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np
import pytest

import torch_arena as ta
from conftest import ARENA_FACTORIES
from torch_arena._arena.arena_file import ArenaSpec
from torch_arena._os.memory import share_fd


@pytest.mark.parametrize("kind", list(ARENA_FACTORIES))
def test_a_pickled_handle_opens_the_same_arena_with_the_same_parameters(kind):
    arena = ARENA_FACTORIES[kind]()
    copy = pickle.loads(pickle.dumps(arena))
    assert type(copy) is type(arena) and repr(copy) == repr(arena)
    assert copy.token == arena.token and copy is not arena
    # the copy writes, the original reads: one arena
    out = ta.restore(ta.offload(np.arange(20_000), copy.open_writer()), arena.open_reader())
    assert np.array_equal(out, np.arange(20_000))
    del out
    copy.close()
    arena.close()


def test_a_handle_of_the_wrong_kind_is_refused():
    pool = ta.SharedMemoryElasticPool("64MiB")
    spec = pool.__getstate__()
    ring = ta.SharedMemoryElasticRing.__new__(ta.SharedMemoryElasticRing)
    with pytest.raises(ValueError, match="the pickled handle is a SharedMemoryElasticRing, but its file holds a "
                                         "SharedMemoryElasticPool"):
        ring.__setstate__(spec)
    forged = dataclasses.replace(pool.__getstate__(), kind=4)  # a spec claiming the ring's kind
    with pytest.raises(ValueError, match="file holds a SharedMemoryElasticPool"):
        ring.__setstate__(forged)
    pool.close()


def test_a_foreign_file_is_refused(tmp_path):
    pool = ta.SharedMemorySegmentPool(64 << 10, 2)
    spec = pool.__getstate__()
    foreign = os.memfd_create("not-an-arena")
    os.write(foreign, b"\x00" * 4096)
    forged = dataclasses.replace(spec, memory_fd=share_fd(foreign))
    copy = ta.SharedMemorySegmentPool.__new__(ta.SharedMemorySegmentPool)
    with pytest.raises(ValueError, match="not a torch_arena arena of this version"):
        copy.__setstate__(pickle.loads(pickle.dumps(forged)))
    os.close(foreign)
    pool.close()


def test_a_spec_for_another_arena_of_the_same_kind_is_refused():
    first, second = ta.SharedMemorySegmentPool(64 << 10, 2), ta.SharedMemorySegmentPool(64 << 10, 2)
    crossed = dataclasses.replace(first.__getstate__(), memory_fd=second.__getstate__().memory_fd)
    copy = ta.SharedMemorySegmentPool.__new__(ta.SharedMemorySegmentPool)
    with pytest.raises(ValueError, match="token differs"):
        copy.__setstate__(pickle.loads(pickle.dumps(crossed)))
    first.close()
    second.close()


def test_unpickling_validates_the_parameters_as_the_constructor_does():
    pool = ta.SharedMemorySegmentPool(64 << 10, 2)
    bad = dataclasses.replace(pool.__getstate__(), params={"segment_size": 0, "count": 2, "acquire_timeout": 1.0})
    copy = ta.SharedMemorySegmentPool.__new__(ta.SharedMemorySegmentPool)
    with pytest.raises(ValueError, match="segment_size must be a positive int"):
        copy.__setstate__(bad)
    assert isinstance(pool.__getstate__(), ArenaSpec)
    pool.close()
