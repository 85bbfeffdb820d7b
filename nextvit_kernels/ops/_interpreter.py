"""Fixes to Triton's interpreter (``TRITON_INTERPRET=1``), which runs the kernels on a CPU.

Two defects of the interpreter itself, not of the kernels:

- **Triton < 3.8 with NumPy >= 2.4.** The interpreter hands a scalar kernel argument over as a
  one-element array, and its ``tensor.__index__`` is ``int(array)``, which NumPy 2.4 refuses
  (``TypeError: only 0-dimensional arrays can be converted to Python scalars``): every
  ``range()`` over a runtime integer in a kernel fails. Upstream issue triton-lang/triton#9171,
  fixed there with ``int(array.squeeze())``, the version this module installs (seen fixed in
  3.8 and broken in 3.6; 3.7 was not checked, and squeezing a value already a scalar changes
  nothing, so patching a fixed release is harmless).
- **Every version: one launch at a time.** A launch keeps its grid index and its patches of
  ``triton.language`` in module globals and undoes the patches when it ends, so two threads
  launching at once run with each other's program ids or with unpatched builtins: wrong
  results or a ``TypeError``. Launches are serialised by a process-wide lock.

``patch()`` applies what the installed versions need, once per process. ``nextvit_kernels.ops``
calls it on import when ``TRITON_INTERPRET=1``; code that runs kernels under the interpreter
some other way calls it itself.
"""
import functools
import re
import threading

import numpy
import triton

_LAUNCH_LOCK = threading.RLock()
_MARK = "_nextvit_kernels_fix"


def _release(version: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", version)[:2])


def index_fix_needed(triton_version: str = triton.__version__, numpy_version: str = numpy.__version__) -> bool:
    return _release(triton_version) < (3, 8) and _release(numpy_version) >= (2, 4)


def _scalar_index(self):
    return int(self.handle.data.squeeze())


def squeezed_index(patch_lang_tensor):
    """``patch_lang_tensor`` (the interpreter's ``_patch_lang_tensor(tensor, scope)``) followed by
    an ``__index__`` that accepts one-element arrays, set through the same scope so that the
    interpreter's restore after the launch undoes it too."""
    @functools.wraps(patch_lang_tensor)
    def patched(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", _scalar_index)

    setattr(patched, _MARK, True)
    return patched


def serialised(launch):
    """``GridExecutor.__call__`` holding the process-wide launch lock."""
    @functools.wraps(launch)
    def locked(*args, **kwargs):
        with _LAUNCH_LOCK:
            return launch(*args, **kwargs)

    setattr(locked, _MARK, True)
    return locked


def applied() -> tuple:
    """The names of the fixes in effect in this process."""
    from triton.runtime import interpreter

    fixes = [("numpy-index", interpreter._patch_lang_tensor), ("serial-launch", interpreter.GridExecutor.__call__)]
    return tuple(name for name, fn in fixes if getattr(fn, _MARK, False))


def patch() -> tuple:
    """Applies the fixes the installed Triton and NumPy need (idempotent); returns ``applied()``."""
    from triton.runtime import interpreter

    with _LAUNCH_LOCK:
        done = applied()
        if "numpy-index" not in done and index_fix_needed():
            interpreter._patch_lang_tensor = squeezed_index(interpreter._patch_lang_tensor)
        if "serial-launch" not in done:
            interpreter.GridExecutor.__call__ = serialised(interpreter.GridExecutor.__call__)
    return applied()
