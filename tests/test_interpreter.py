"""The fixes to Triton's interpreter (nextvit_kernels/ops/_interpreter.py) are in effect.

The cheap CI check of the versions: a kernel with a ``range()`` over a runtime argument, which
Triton < 3.8's interpreter breaks under NumPy >= 2.4 unless the fix is applied, and the fix
shown to repair that interpreter whatever version runs here (its broken ``__index__`` is put
back for the test). Also: concurrent launches under the interpreter each get their own result.
"""
import os

import numpy
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from nextvit_kernels.ops import _interpreter
from _util import in_threads

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU interpreter check")
BLOCK = 16


@triton.jit
def _repeat_add(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(n):  # n is a runtime integer: the interpreter's tensor.__index__
        acc += x
    tl.store(out_ptr + offs, acc)


def _run(x, n):
    out = torch.empty_like(x)
    _repeat_add[(x.numel() // BLOCK,)](x, out, n, BLOCK=BLOCK)
    return out


def test_range_over_a_runtime_argument():
    x = torch.arange(4 * BLOCK, dtype=torch.float32)
    assert torch.equal(_run(x, 3), x * 3)


def test_fixes_in_effect_for_these_versions():
    applied = _interpreter.patch()  # idempotent: the ops' import applied it already
    assert applied == _interpreter.patch()
    assert "serial-launch" in applied
    assert ("numpy-index" in applied) == _interpreter.index_fix_needed(), (triton.__version__, numpy.__version__)


def test_which_versions_need_the_index_fix():
    need = _interpreter.index_fix_needed
    assert need("3.6.0", "2.4.6") and need("3.7.1", "2.5.0") and need("3.6.0+git1234", "2.4.0rc1")
    assert not need("3.8.0", "2.4.6") and not need("3.6.0", "2.3.5") and not need("3.10.0", "2.5.0")


def _broken_index(patch_lang_tensor):
    """The interpreter as Triton 3.6 ships it: ``int()`` of the one-element argument array."""
    def patched(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    return patched


def test_index_fix_repairs_the_broken_interpreter(monkeypatch):
    x = torch.arange(2 * BLOCK, dtype=torch.float32)
    broken = _broken_index(interpreter._patch_lang_tensor)
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", broken)
    if _interpreter._release(numpy.__version__) >= (2, 4):  # the NumPy that refuses it
        with pytest.raises(interpreter.InterpreterError, match="0-dimensional arrays"):
            _run(x, 2)
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _interpreter.squeezed_index(broken))
    assert torch.equal(_run(x, 2), x * 2)


def test_concurrent_launches_get_their_own_results():
    """Unserialised, threads read each other's program ids or unpatched builtins."""
    def body(t):
        x = torch.full((8 * BLOCK,), float(t))
        for i in range(10):
            assert torch.equal(_run(x, 3), x * 3), f"launch {i}: another launch's result"

    assert in_threads(4, body) == []
