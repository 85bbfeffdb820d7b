"""tests/_builds.py: what the tests build is built once however many workers ask for it at the
same time, rebuilt when an input changes, and never taken half-built."""
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

import _builds


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTVIT_TEST_BUILDS", str(tmp_path / "store"))
    source = tmp_path / "source.c"
    source.write_text("int f(void) { return 1; }\n")
    return tmp_path, source


def _build_once(args):
    """In a process of its own: cached(kind, [source], build) where build takes a while and logs itself."""
    store, source, log, start = args
    os.environ["NEXTVIT_TEST_BUILDS"] = store
    while time.time() < start:  # every process asks at the same moment
        time.sleep(0.001)

    def build(d):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        (d / "out").write_text(open(source).read())

    return str(_builds.cached("demo", [Path(source)], build))


def test_parallel_workers_build_once_and_share_it(store):
    tmp, source = store
    log = tmp / "builds.log"
    with mp.get_context("spawn").Pool(4) as pool:
        start = time.time() + 3  # after the spawned interpreters are up
        dirs = pool.map(_build_once, [(str(tmp / "store"), str(source), str(log), start)] * 4)
    assert len(set(dirs)) == 1, dirs
    assert len(log.read_text().split()) == 1, f"built {log.read_text().split()} times"
    assert (Path(dirs[0]) / "out").read_text() == source.read_text()


def test_a_changed_input_rebuilds_and_a_half_built_one_is_redone(store):
    tmp, source = store
    built = []

    def build(d):
        built.append(d)
        (d / "out").write_text(source.read_text())

    first = _builds.cached("demo", [source, ("-O2",)], build)
    assert _builds.cached("demo", [source, ("-O2",)], build) == first and len(built) == 1
    assert _builds.cached("demo", [source, ("-O1",)], build) != first   # a flag is an input
    source.write_text("int f(void) { return 2; }\n")
    second = _builds.cached("demo", [source, ("-O2",)], build)          # so is a file's content
    assert second != first and (second / "out").read_text() == source.read_text()
    (second / ".complete").unlink()                                     # as if the build was killed
    (second / "stale").write_text("")

    def failing(d):
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        _builds.cached("demo", [source, ("-O2",)], failing)
    assert not (second / ".complete").exists()                          # a failed build does not count
    assert _builds.cached("demo", [source, ("-O2",)], build) == second
    assert not (second / "stale").exists() and (second / ".complete").exists()


def test_the_caching_arena_allocator_serves_this_process():
    """tests/_arena.py: CPython's arenas and frame-stack chunks come from it, freed ones are reused."""
    import ctypes
    import sys

    import _arena
    if not _arena.install():
        pytest.skip(f"no caching arena allocator for Python {sys.version_info[:2]} on {sys.platform}")
    lib = _arena._installed[0]

    class Allocator(ctypes.Structure):
        _fields_ = [("ctx", ctypes.c_void_p), ("alloc", ctypes.c_void_p), ("free", ctypes.c_void_p)]

    current = Allocator()
    ctypes.pythonapi.PyObject_GetArenaAllocator(ctypes.byref(current))
    assert (current.alloc, current.free) == (Allocator.in_dll(lib, "nvk_test_arena").alloc,
                                             Allocator.in_dll(lib, "nvk_test_arena").free)

    def deep(n):  # frames past a 16 KiB chunk, popped again: a chunk freed to the cache
        return 0 if n == 0 else deep(n - 1) + 1

    deep(500)
    junk = [[i] for i in range(300_000)]  # a few obmalloc arenas, freed below
    del junk
    assert lib.nvk_test_arena_kept() > 0
    assert deep(500) == 500  # taken from the cache again, and working
