"""A caching arena allocator for the test processes (CPython >= 3.11).

CPython 3.11+ keeps its frames on a "data stack" of 16 KiB chunks taken from the arena allocator,
which is mmap / munmap, and frees a chunk as soon as the frame at its start returns. A call that
happens to sit at a chunk boundary and is repeated in a loop then costs an mmap and a munmap each
time. Triton's interpreter calls small Python functions millions of times, and where its loop
sits depends on how deep the caller is: the same fuzz test made 0.34 M mmaps in a plain pytest
process and 1.0 M in a pytest-xdist worker (deeper by execnet's frames), and took 19 s and 42 s.
Keeping up to 64 freed blocks for reuse (obmalloc's arenas too) removes that: 9-10 s in both.

``install()`` builds the allocator (tests/_builds.py keeps it) and sets it with
``PyObject_SetArenaAllocator``; blocks the old allocator mapped are freed through the new one,
which only caches or unmaps them. It changes where CPython's memory comes from, not what any
test computes; without a C compiler it does nothing.
"""
import ctypes
import sys
from pathlib import Path

SOURCE = r"""
#include <pthread.h>
#include <stddef.h>
#include <sys/mman.h>

typedef struct {
  void* ctx;
  void* (*alloc)(void* ctx, size_t size);
  void (*free)(void* ctx, void* ptr, size_t size);
} PyObjectArenaAllocator; /* Python's cpython/objimpl.h */

enum { SLOTS = 64 }; /* at most 64 blocks kept: 64 MiB of obmalloc arenas at worst */
static struct { size_t size; void* ptr; } kept[SLOTS];
static int n_kept;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void* cached_alloc(void* ctx, size_t size) {
  (void)ctx;
  void* ptr = NULL;
  pthread_mutex_lock(&lock);
  for (int i = n_kept - 1; i >= 0 && !ptr; --i)
    if (kept[i].size == size) {
      ptr = kept[i].ptr;
      kept[i] = kept[--n_kept];
    }
  pthread_mutex_unlock(&lock);
  if (ptr) return ptr;
  ptr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return ptr == MAP_FAILED ? NULL : ptr;
}

static void cached_free(void* ctx, void* ptr, size_t size) {
  (void)ctx;
  pthread_mutex_lock(&lock);
  int keep = n_kept < SLOTS;
  if (keep) {
    kept[n_kept].size = size;
    kept[n_kept].ptr = ptr;
    ++n_kept;
  }
  pthread_mutex_unlock(&lock);
  if (!keep) munmap(ptr, size);
}

PyObjectArenaAllocator nvk_test_arena = {NULL, cached_alloc, cached_free};
int nvk_test_arena_kept(void) { return n_kept; }
"""

_installed = []


def install() -> bool:
    """Sets the caching arena allocator in this process (once); False where it cannot be built."""
    if _installed:
        return True
    if sys.version_info < (3, 11) or not sys.platform.startswith("linux"):
        return False  # no frame data stack before 3.11; mmap flags above are Linux's
    import subprocess

    import _builds

    cc = _builds.find_c_compiler()
    if cc is None:
        return False

    def build(d):
        (d / "arena.c").write_text(SOURCE)
        r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-Wall", "-Werror", str(d / "arena.c"), "-o",
                            str(d / "libnvk_test_arena.so"), "-lpthread"], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr)

    try:
        d = _builds.cached("arena", [SOURCE, cc, _builds.tool_version([cc])], build)
    except (OSError, RuntimeError):
        return False
    lib = ctypes.CDLL(str(Path(d) / "libnvk_test_arena.so"))
    ctypes.pythonapi.PyObject_SetArenaAllocator(ctypes.byref(ctypes.c_char.in_dll(lib, "nvk_test_arena")))
    _installed.append(lib)
    return True
