"""The whole-model C runtime from Python, with no torch needed: ``Model(path, device=0)(images)``.

    from nextvit_kernels.runtime import Model
    model = Model("nextvit_s.nvk", device=0)     # a model file: nextvit_kernels.save_runtime
    logits = model(images)                       # a CuPy array or torch tensor on cuda:0: the same kind back
    s4, s8, s16, s32 = model.forward_features(images)

One call of the C library (``nvk_model_forward``) per forward: no JIT, no per-op Python. Images are
``[B, 3, H, W]`` (NCHW-contiguous, or a channels_last torch tensor: NHWC in memory) or
``[B, H, W, 3]`` contiguous, in the file's dtype, on the model's device. The forward runs on the
caller's current stream (torch's for torch tensors, CuPy's for CuPy arrays, the default stream for
any other ``__cuda_array_interface__`` object); DLPack-only objects are taken through CuPy or torch,
whichever is installed. Logits are ``[B, n_classes]``; features are ``[B, C, H, W]`` channels_last
torch tensors, or ``[B, H, W, C]`` arrays of the other kinds (the same NHWC memory).

Workspace: cached per thread, per stream and per input shape (a workspace shared by two threads
would be overwritten by the other thread's kernels even on one stream). One model may be called
from any number of threads; each call is independent.

Under ``nextvit_kernels.testing.cpu_driver()`` the same code runs on the CPU: CPU torch tensors and
``__cuda_array_interface__`` objects over host buffers the stand-in knows stand for device arrays.
"""
import contextlib
import ctypes
import os
import sys
import threading
from collections import OrderedDict
from typing import List, Optional

from . import _library

_DTYPES = {0: "float32", 1: "float16", 2: "bfloat16"}
_TYPESTR = {"float32": "<f4", "float16": "<f2", "uint8": "|u1"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}
NCHW, NHWC = 0, 1
_MAX_WORKSPACES = 8  # per thread


class ModelError(RuntimeError):
    """A C runtime call failed; ``status`` is the nvk_status code."""

    def __init__(self, what, status, message):
        self.status = status
        super().__init__(f"{what}: {_library.STATUS.get(status, status)}: {message}")


# ------------------------------------------------------------------ a device buffer without torch/CuPy
class _Driver:
    """The few driver calls a ``DeviceArray`` needs: libcuda.so.1, or the library
    ``$NEXTVIT_CUDA_DRIVER`` names (the CPU stand-in under testing.cpu_driver)."""

    _lock = threading.Lock()
    _cache = {}

    @classmethod
    def get(cls):
        name = os.environ.get("NEXTVIT_CUDA_DRIVER") or "libcuda.so.1"
        with cls._lock:
            drv = cls._cache.get(name)
            if drv is None:
                drv = cls._cache[name] = cls(name)
        return drv

    def __init__(self, name):
        lib = ctypes.CDLL(name)
        self.lib = lib
        for f, args in (("cuInit", [ctypes.c_uint]), ("cuDeviceGet", [ctypes.c_void_p, ctypes.c_int]),
                        ("cuDevicePrimaryCtxRetain", [ctypes.c_void_p, ctypes.c_int]),
                        ("cuCtxPushCurrent_v2", [ctypes.c_void_p]), ("cuCtxPopCurrent_v2", [ctypes.c_void_p]),
                        ("cuMemAlloc_v2", [ctypes.c_void_p, ctypes.c_size_t]),
                        ("cuMemFree_v2", [ctypes.c_uint64]),
                        ("cuMemcpyDtoH_v2", [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]),
                        ("cuMemcpyHtoD_v2", [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t])):
            fn = getattr(lib, f)
            fn.argtypes, fn.restype = args, ctypes.c_int
        self._check(lib.cuInit(0), "cuInit")

    def _check(self, r, what):
        if r:
            raise RuntimeError(f"{what} failed: CUDA error {r}")

    def in_device(self, device, fn):
        """fn() with device's primary context current."""
        d, ctx = ctypes.c_int(), ctypes.c_void_p()
        self._check(self.lib.cuDeviceGet(ctypes.addressof(d), device), "cuDeviceGet")
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.addressof(ctx), d.value), "cuDevicePrimaryCtxRetain")
        self._check(self.lib.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
        try:
            return fn()
        finally:
            self.lib.cuCtxPopCurrent_v2(ctypes.addressof(ctypes.c_void_p()))


class DeviceArray:
    """A contiguous device buffer with ``__cuda_array_interface__``: what ``Model`` returns for inputs
    that are neither torch tensors nor CuPy arrays. ``to_host()`` copies it into a NumPy array."""

    def __init__(self, shape, dtype: str, device: int = 0):
        n = 1
        for d in shape:
            n *= d
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.nbytes = n * _ITEMSIZE[dtype]
        self._drv = _Driver.get()
        ptr = ctypes.c_uint64()
        self._drv.in_device(device, lambda: self._drv._check(
            self._drv.lib.cuMemAlloc_v2(ctypes.addressof(ptr), max(self.nbytes, 1)), "cuMemAlloc"))
        self.ptr = ptr.value

    @property
    def __cuda_array_interface__(self):
        if self.dtype not in _TYPESTR:
            raise TypeError(f"{self.dtype} has no __cuda_array_interface__ typestr")
        return dict(shape=self.shape, typestr=_TYPESTR[self.dtype], data=(self.ptr, False), strides=None,
                    version=3)

    def to_host(self):
        import numpy as np
        out = np.empty(self.shape, dtype=np.uint16 if self.dtype == "bfloat16" else self.dtype)
        self._drv.in_device(self.device, lambda: self._drv._check(
            self._drv.lib.cuMemcpyDtoH_v2(out.ctypes.data, self.ptr, self.nbytes), "cuMemcpyDtoH"))
        return out

    def __del__(self):
        if getattr(self, "ptr", 0):
            try:
                self._drv.in_device(self.device, lambda: self._drv.lib.cuMemFree_v2(self.ptr))
            except Exception:  # noqa: BLE001 - interpreter shutdown, driver gone
                pass
            self.ptr = 0


# ------------------------------------------------------------------ the kinds of arrays taken
class _View:
    """What the runtime needs of one array: pointer, shape, element strides, dtype name, device, the
    stream to run on, and how to make arrays of the same kind."""

    def __init__(self, x):
        torch = sys.modules.get("torch")
        cupy = sys.modules.get("cupy")
        self.x = x
        if torch is not None and isinstance(x, torch.Tensor):
            self.kind = "torch"
            self.ptr, self.shape, self.strides = x.data_ptr(), tuple(x.shape), tuple(x.stride())
            self.dtype = str(x.dtype).replace("torch.", "")
            self.device = x.device.index if x.is_cuda else None
        elif cupy is not None and isinstance(x, cupy.ndarray):
            self.kind = "cupy"
            self.ptr, self.shape = x.data.ptr, tuple(x.shape)
            self.strides = tuple(s // x.itemsize for s in x.strides)
            self.dtype, self.device = x.dtype.name, x.device.id
        elif hasattr(x, "__cuda_array_interface__"):
            import numpy as np
            cai = x.__cuda_array_interface__
            self.kind = "cai"
            dt = np.dtype(cai["typestr"])
            self.ptr, self.shape, self.dtype, self.device = cai["data"][0], tuple(cai["shape"]), dt.name, None
            st = cai.get("strides")
            self.strides = tuple(s // dt.itemsize for s in st) if st else _contiguous(self.shape)
        elif hasattr(x, "__dlpack__"):
            if cupy is not None or "torch" not in sys.modules:
                import cupy
                self.__init__(cupy.from_dlpack(x))
            else:
                self.__init__(torch.from_dlpack(x))
        else:
            raise TypeError(f"expected a CUDA array (torch tensor, CuPy array, __cuda_array_interface__ or DLPack), "
                            f"got {type(x).__name__}")

    def stream(self) -> int:
        if self.kind == "torch" and self.device is not None:
            return sys.modules["torch"].cuda.current_stream(self.device).cuda_stream
        if self.kind == "cupy":
            return sys.modules["cupy"].cuda.get_current_stream().ptr
        return 0

    def empty(self, shape, dtype: str, device: int, nchw_logical: bool = False):
        """A new array of this kind; ``nchw_logical``: a [B, H, W, C] buffer shown as torch's
        channels_last [B, C, H, W]."""
        if self.kind == "torch":
            torch = sys.modules["torch"]
            dev = self.x.device
            if nchw_logical:
                b, h, w, c = shape
                return torch.empty((b, c, h, w), dtype=getattr(torch, dtype), device=dev,
                                   memory_format=torch.channels_last)
            return torch.empty(shape, dtype=getattr(torch, dtype), device=dev)
        if self.kind == "cupy":
            import cupy
            if dtype == "bfloat16":
                raise TypeError("CuPy has no bfloat16 arrays: use a torch tensor for a bf16 model")
            with cupy.cuda.Device(device):
                return cupy.empty(shape, dtype=dtype)
        return DeviceArray(shape, dtype, device)

    def capturing(self) -> bool:
        return self.kind == "torch" and self.device is not None and \
            sys.modules["torch"].cuda.is_current_stream_capturing()


def _contiguous(shape):
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


def _same_strides(shape, strides, want) -> bool:
    return all(s == w or d == 1 for d, s, w in zip(shape, strides, want))


def _ptr_of(a) -> int:
    return _View(a).ptr


# ------------------------------------------------------------------ the model
class Model:
    """A model file loaded onto ``device`` by the C library (``nvk_model_load``). ``path`` may also be
    the file's bytes. ``library``: a libnextvit_kernels.so to use instead of the installed one."""

    def __init__(self, path, device: int = 0, library: Optional[str] = None):
        self._lib = _library.host_lib if library is None and _library.host_lib is not None else (
            _library.open_path(library) if library else _library.open_default())
        self._handle = ctypes.c_void_p()
        self.device = int(device)
        if isinstance(path, (bytes, bytearray, memoryview)):
            data = bytes(path)
            status = self._lib.model_load_memory(data, len(data), self.device, ctypes.addressof(self._handle))
            what = "nvk_model_load_memory"
        else:
            status = self._lib.model_load(os.fsencode(path), self.device, ctypes.addressof(self._handle))
            what = f"nvk_model_load({path})"
        self._check(what, status)
        info = _library.ModelInfo()
        self._check("nvk_model_get_info", self._lib.model_get_info(self._handle, ctypes.addressof(info)))
        self.dtype = _DTYPES[info.dtype]
        self.n_classes = info.n_classes
        self.feature_channels = tuple(info.feature_channels)
        self.has_stage_norms = bool(info.has_stage_norms)
        self.weight_bytes = info.weight_bytes
        self._local = threading.local()

    def _check(self, what, status):
        if status != 0:
            raise ModelError(what, status, self._lib.last_error())

    def close(self):
        """Frees the weights on the device (also when the object is collected)."""
        h, self._handle = getattr(self, "_handle", None), None
        if h is not None and h.value:
            self._lib.model_free(h)

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------- queries
    def workspace_size(self, batch: int, height: int, width: int, features: bool = False) -> int:
        n = self._lib.model_workspace_size(self._live(), batch, height, width, int(features))
        if n == 0:
            raise ModelError("nvk_model_workspace_size", 1, self._lib.last_error())
        return n

    def output_shape(self, batch: int, height: int, width: int, which: int = -1) -> tuple:
        """-1: logits [B, n_classes]; 0..3: stage features [B, H, W, C]."""
        dims, ndim = (ctypes.c_int * 4)(), ctypes.c_int()
        self._check("nvk_model_output_shape", self._lib.model_output_shape(
            self._live(), batch, height, width, which, ctypes.addressof(dims), ctypes.addressof(ndim)))
        return tuple(dims[:ndim.value])

    def _live(self):
        if self._handle is None or not self._handle.value:
            raise ValueError("the model was closed")
        return self._handle

    # -------------------------------------------------------------- forward
    def _input(self, x):
        v = _View(x)
        if len(v.shape) != 4:
            raise ValueError(f"expected a 4-D image batch [B, 3, H, W] or [B, H, W, 3], got shape {v.shape}")
        if v.dtype != self.dtype:
            raise ValueError(f"the model file is {self.dtype}, the input is {v.dtype}")
        if v.device is None and (v.kind != "cai" and _library.host is None):
            raise ValueError("the input is on the CPU: the C runtime needs device arrays")
        if v.device is not None and v.device != self.device:
            raise ValueError(f"the input is on device {v.device}, the model on device {self.device}")
        b = v.shape[0]
        if v.shape[1] == 3 and _same_strides(v.shape, v.strides, _contiguous(v.shape)):
            layout, (h, w) = NCHW, v.shape[2:]
        elif v.shape[1] == 3 and _same_strides(v.shape, v.strides, (v.shape[2] * v.shape[3] * 3, 1,
                                                                    v.shape[3] * 3, 3)):
            layout, (h, w) = NHWC, v.shape[2:]  # a channels_last torch tensor
        elif v.shape[3] == 3 and _same_strides(v.shape, v.strides, _contiguous(v.shape)):
            layout, (h, w) = NHWC, v.shape[1:3]
        else:
            raise ValueError(f"expected [B, 3, H, W] NCHW-contiguous (or channels_last) or [B, H, W, 3] contiguous "
                             f"images, got shape {v.shape} with strides {v.strides}")
        return v, layout, b, int(h), int(w)

    def _workspace(self, v, stream, key, nbytes):
        if nbytes == 0:
            return None
        if v.capturing():  # a graph capture keeps its own allocations
            return v.empty((nbytes,), "uint8", self.device)
        cache = getattr(self._local, "ws", None)
        if cache is None:
            cache = self._local.ws = OrderedDict()
        full = (v.kind, stream) + key
        ws = cache.get(full)
        if ws is None:
            ws = v.empty((nbytes,), "uint8", self.device)
            cache[full] = ws
            while len(cache) > _MAX_WORKSPACES:
                cache.popitem(last=False)
        else:
            cache.move_to_end(full)
        return ws

    def _run(self, x, features: bool):
        v, layout, b, h, w = self._input(x)
        handle = self._live()
        nbytes = self._lib.model_workspace_size(handle, b, h, w, int(features))
        if nbytes == 0:
            raise ModelError("nvk_model_workspace_size", 2, self._lib.last_error())
        stream = v.stream()
        ws = self._workspace(v, stream, (b, h, w, features), nbytes)
        if features:
            shapes = [self.output_shape(b, h, w, s) for s in range(4)]
            outs = [v.empty(s, self.dtype, self.device, nchw_logical=True) for s in shapes]
        else:
            outs = [v.empty((b, self.n_classes), self.dtype, self.device)]
        ptrs = [_ptr_of(o) for o in outs]
        host = _library.host if v.device is None else None
        args = (handle, v.ptr, layout)
        tail = (_ptr_of(ws) if ws is not None else 0, nbytes, b, h, w, stream)
        if host is not None and v.kind == "torch":
            regs = [x] + outs + ([ws] if ws is not None else [])
        else:
            regs = []
        with host.registered(*regs) if host is not None else contextlib.nullcontext():
            if features:
                arr = (ctypes.c_void_p * 4)(*ptrs)
                status = self._lib.model_forward_features(*args, ctypes.addressof(arr), *tail)
            else:
                status = self._lib.model_forward(*args, ptrs[0], *tail)
        self._check("nvk_model_forward_features" if features else "nvk_model_forward", status)
        return outs if features else outs[0]

    def __call__(self, x):
        """Logits [B, n_classes] of an image batch, as an array of the input's kind."""
        return self._run(x, False)

    def forward_features(self, x) -> List:
        """The four stage outputs (strides 4, 8, 16, 32), as arrays of the input's kind."""
        return self._run(x, True)


__all__ = ["Model", "ModelError", "DeviceArray"]
