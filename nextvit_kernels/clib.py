"""The C library's per-op functions (libnextvit_kernels.so, csrc/) over torch tensors.

(The whole-model C runtime is ``nextvit_kernels.runtime``, and ``NextViT(kernels="runtime")``.)
One function per fused op with the signatures of ``nextvit_kernels.ops`` (torch tensors in,
channels_last tensor out; ``impl=`` is accepted and ignored), so the whole model runs
through the C library with ``fused.run(plan, x, backend=clib)``. Every tensor of a call must
be on the input's device (ValueError otherwise); the call runs there, on torch's current
stream of that device, whatever device is current.

The library is reached through ctypes (``_library``): ``libnextvit_kernels.so`` next to this
file, or at ``$NEXTVIT_CLIB``, a path to the .so or to a build directory. (A pybind11 binding
saved about 1 µs per call, measured: not worth a second binding; docs/design.md §7.)

Under ``nextvit_kernels.testing.cpu_driver()`` the library launches through a CPU stand-in of the
CUDA driver: CPU tensors then stand for device tensors, and each call registers its tensors with
the stand-in for the call's duration.
"""
from typing import Optional

import torch

from . import _library
from .ops import _common
from .plan import TORCH_DTYPE_ID as _DT

_STATUS = _library.STATUS
_lib = None
_load_error: Optional[str] = None


class CLibError(RuntimeError):
    """A C entry point returned an error; ``status`` is the nvk_status code."""

    def __init__(self, op, status, message):
        self.status = status
        super().__init__(f"nvk_{op}: {_STATUS.get(status, status)}: {message}")


def load():
    """Loads the library (once). Raises RuntimeError saying how to build it when missing."""
    global _lib, _load_error
    if _lib is None:
        try:
            _lib = _library.open_default()
        except RuntimeError as e:
            _load_error = str(e)
            raise RuntimeError(_load_error) from None
    return _lib


def library_path(lib=None) -> str:
    """The file of a loaded library (default: ``load()``'s)."""
    return (load() if lib is None else lib).path


def available() -> bool:
    """True when the C library can be loaded (it still needs a GPU to launch anything)."""
    try:
        load()
        return True
    except RuntimeError:
        return False


def version() -> str:
    return load().version()


# --------------------------------------------------------------------------- helpers
def _check(op, status):
    if status != 0:
        raise CLibError(op, status, (_library.host_lib or load()).last_error())


def _prep(op, x):
    _common.check_activation(op, "x", x)
    return _common.to_channels_last(x)


def _lib_for(op, x):
    """The library, once every tensor of the call has been checked against ``x``'s device (so
    a device mismatch is reported as such on any device type, before CUDA is needed)."""
    if _library.host is not None:
        if x.is_cuda:
            raise ValueError(f"{op}: under nextvit_kernels.testing.cpu_driver() the C library launches on a CPU "
                             "stand-in of the CUDA driver: pass CPU tensors")
        return _library.host_lib
    if not x.is_cuda:
        raise ValueError(f"{op}: the C library needs CUDA tensors, got {x.device}")
    return load()


def _w(op, name, t, x, shape):
    if t.dim() == 4 and len(shape) == 2:
        t = _common.as_matrix(op, name, t, x, shape[0], shape[1])
    return _common.check_param(op, name, t, x, shape)


def _launch(op, entry, x, *args):
    """Calls C entry point ``entry(*args, stream)`` on ``x``'s device, whatever device is current;
    tensor arguments are passed as their pointers, None as NULL. The stream is torch's current
    stream of that device: the library launches in a stream's own context, but torch's default
    stream is the NULL handle, which launches in the current context, so x's device is made
    current for such a call. CPU tensors (under the stand-in driver) are registered with it for
    the call, on the default stream."""
    raw = [a.data_ptr() if isinstance(a, torch.Tensor) else 0 if a is None else a for a in args]
    if _library.host is not None:
        with _library.host.registered(*(a for a in args if isinstance(a, torch.Tensor))):
            status = entry(*raw, 0)
    else:
        stream = torch.cuda.current_stream(x.device).cuda_stream
        if stream == 0 and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                status = entry(*raw, stream)
        else:
            status = entry(*raw, stream)
    _check(op, status)


def _workspace(x, nbytes):
    """Device scratch of ``nbytes`` (a multiple of 256) for an entry point, or None if 0."""
    return _common.new_scratch(x, nbytes // x.element_size()) if nbytes else None


# --------------------------------------------------------------------------- ops
def conv_bn_relu(x, w, b, *, stride: int, impl: str = "auto"):
    op = "conv_bn_relu"
    x = _prep(op, x)
    bsz, c_in, h, wd = x.shape
    w = _common.check_param(op, "w", w, x, (None, c_in, 3, 3))
    c_out = w.shape[0]
    b = _common.check_param(op, "b", b, x, (c_out,))
    lib = _lib_for(op, x)
    out = _common.new_output(x, bsz, c_out, (h - 1) // stride + 1, (wd - 1) // stride + 1)
    _launch(op, lib.conv_bn_relu, x, x, w, b, out, bsz, h, wd, c_in, c_out, int(stride),
            _DT[x.dtype])
    return out


def patch_embed(x, w, b, *, stride: int, impl: str = "auto"):
    op = "patch_embed"
    x = _prep(op, x)
    bsz, c_in, h, wd = x.shape
    w = _w(op, "w", w, x, (None, c_in))
    c_out = w.shape[0]
    b = _common.check_param(op, "b", b, x, (c_out,))
    lib = _lib_for(op, x)
    out = _common.new_output(x, bsz, c_out, _common.pooled_size(h, stride), _common.pooled_size(wd, stride))
    _launch(op, lib.patch_embed, x, x, w, b, out, bsz, h, wd, c_in, c_out, int(stride),
            _DT[x.dtype])
    return out


def mhca(x, conv_w, conv_b, proj_w, *, residual: bool = True, impl: str = "auto"):
    op = "mhca"
    x = _prep(op, x)
    bsz, c, h, wd = x.shape
    conv_w = _common.check_param(op, "conv_w", conv_w, x, (c, 32, 3, 3))
    conv_b = _common.check_param(op, "conv_b", conv_b, x, (c,))
    proj_w = _w(op, "proj_w", proj_w, x, (None, c))
    c_out = proj_w.shape[0]
    lib = _lib_for(op, x)
    dt, res = _DT[x.dtype], int(bool(residual))
    ws = _workspace(x, lib.mhca_workspace_size(bsz, h, wd, c, c_out, res, dt))
    out = _common.new_output(x, bsz, c_out, h, wd)
    _launch(op, lib.mhca, x, x, conv_w, conv_b, proj_w, out, ws,
            bsz, h, wd, c, c_out, res, dt)
    return out


def mlp(x, fc1_w, fc1_b, fc2_w, fc2_b, *, x2=None, residual: bool = True, impl: str = "auto"):
    op = "mlp"
    x = _prep(op, x)
    bsz, c1, h, wd = x.shape
    c2 = 0
    if x2 is not None:
        x2 = _prep(op, x2)
        if x2.device != x.device:
            raise ValueError(f"{op}: x2 is on {x2.device} but the input is on {x.device}")
        if x2.dtype != x.dtype or x2.shape[0] != bsz or tuple(x2.shape[2:]) != (h, wd):
            raise ValueError(f"{op}: x2 {tuple(x2.shape)} {x2.dtype} does not match x {tuple(x.shape)} {x.dtype}")
        c2 = x2.shape[1]
    fc1_w = _w(op, "fc1_w", fc1_w, x, (None, c1 + c2))
    hidden = fc1_w.shape[0]
    fc1_b = _common.check_param(op, "fc1_b", fc1_b, x, (hidden,))
    fc2_w = _w(op, "fc2_w", fc2_w, x, (None, hidden))
    c_out = fc2_w.shape[0]
    fc2_b = _common.check_param(op, "fc2_b", fc2_b, x, (c_out,))
    lib = _lib_for(op, x)
    dt, res = _DT[x.dtype], int(bool(residual))
    ws = _workspace(x, lib.mlp_workspace_size(bsz, h, wd, c1, c2, hidden, c_out, res, dt))
    out = _common.new_output(x, bsz, c_out, h, wd)
    _launch(op, lib.mlp, x, x, x2, fc1_w, fc1_b, fc2_w, fc2_b, out,
            ws, bsz, h, wd, c1, c2, hidden, c_out, res, dt)
    return out


def e_mhsa(x, q_w, q_b, k_w, k_b, v_w, v_b, proj_w, proj_b, *, sr_ratio: int, head_dim: int = 32,
           residual: bool = True, impl: str = "auto"):
    op = "e_mhsa"
    x = _prep(op, x)
    bsz, c, h, wd = x.shape
    q_w, k_w, v_w = (_w(op, n, t, x, (c, c)) for n, t in (("q_w", q_w), ("k_w", k_w), ("v_w", v_w)))
    q_b, k_b, v_b = (_common.check_param(op, n, t, x, (c,)) for n, t in (("q_b", q_b), ("k_b", k_b), ("v_b", v_b)))
    proj_w = _w(op, "proj_w", proj_w, x, (None, c))
    c_out = proj_w.shape[0]
    proj_b = _common.check_param(op, "proj_b", proj_b, x, (c_out,))
    lib = _lib_for(op, x)
    dt = _DT[x.dtype]
    res = int(bool(residual))
    ws = _workspace(x, lib.e_mhsa_workspace_size(bsz, h, wd, c, c_out, int(sr_ratio), int(head_dim), res, dt))
    out = _common.new_output(x, bsz, c_out, h, wd)
    _launch(op, lib.e_mhsa, x, x, q_w, q_b, k_w, k_b, v_w, v_b,
            proj_w, proj_b, out, ws, bsz, h, wd, c, c_out, int(sr_ratio), int(head_dim),
            res, dt)
    return out


def head(x, w, b, *, impl: str = "auto"):
    op = "head"
    x = _prep(op, x)
    bsz, c, h, wd = x.shape
    w = _w(op, "w", w, x, (None, c))
    n = w.shape[0]
    b = _common.check_param(op, "b", b, x, (n,))
    lib = _lib_for(op, x)
    out = torch.empty((bsz, n), device=x.device, dtype=x.dtype)
    if _common.POISON_OUTPUTS:
        out.fill_(float("nan"))
    _launch(op, lib.head, x, x, w, b, out, bsz, h, wd, c, n, _DT[x.dtype])
    return out


__all__ = ["available", "load", "version", "CLibError", "conv_bn_relu", "patch_embed", "mhca", "mlp", "e_mhsa",
           "head"]
