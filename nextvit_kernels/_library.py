"""Finding and binding libnextvit_kernels.so through ctypes, without torch (the whole-model runtime's
Python front must import where only CuPy is installed). ``clib`` (per-op functions over torch
tensors) and ``runtime`` (the whole model over CUDA arrays) both reach the library through here.

The library is the one next to this file (``pip install`` puts it there), or ``$NEXTVIT_CLIB``: a
path to the .so or to a directory holding it (a CMake build directory). With ``$NEXTVIT_CLIB`` set
nothing else is tried.
"""
import ctypes
import os

# Set while nextvit_kernels.testing.cpu_driver is active: the CPU stand-in of the CUDA driver
# (testing.CpuDriver) and the library it drives. clib and runtime then take host memory.
host = None
host_lib = None

STATUS = {0: "OK", 1: "NVK_ERR_INVALID", 2: "NVK_ERR_UNSUPPORTED", 3: "NVK_ERR_CUDA", 4: "NVK_ERR_NO_DRIVER"}
NAME = "libnextvit_kernels.so"

_VP, _I, _SZ = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
# (argtypes, restype) of every entry point, as in csrc/include/nextvit_kernels.h (tests/test_aot.py
# checks the two agree: a wrong count here only fails at a GPU call otherwise). Pointers, output
# pointers included, are passed as integers.
SIGNATURES = {
    "nvk_conv_bn_relu": ([_VP] * 4 + [_I] * 7 + [_VP], _I),
    "nvk_patch_embed": ([_VP] * 4 + [_I] * 7 + [_VP], _I),
    "nvk_mhca": ([_VP] * 6 + [_I] * 7 + [_VP], _I),
    "nvk_mlp": ([_VP] * 8 + [_I] * 9 + [_VP], _I),
    "nvk_e_mhsa": ([_VP] * 11 + [_I] * 9 + [_VP], _I),
    "nvk_head": ([_VP] * 4 + [_I] * 6 + [_VP], _I),
    "nvk_e_mhsa_workspace_size": ([_I] * 9, _SZ),
    "nvk_mlp_workspace_size": ([_I] * 9, _SZ),
    "nvk_mhca_workspace_size": ([_I] * 7, _SZ),
    "nvk_load": ([_VP], _I),
    "nvk_reset_driver": ([], _I),
    "nvk_manifest": ([], ctypes.c_char_p),
    "nvk_last_error": ([], ctypes.c_char_p),
    "nvk_version": ([], ctypes.c_char_p),
    "nvk_model_load": ([ctypes.c_char_p, _I, _VP], _I),
    "nvk_model_load_memory": ([_VP, _SZ, _I, _VP], _I),
    "nvk_model_free": ([_VP], None),
    "nvk_model_get_info": ([_VP, _VP], _I),
    "nvk_model_workspace_size": ([_VP, _I, _I, _I, _I], _SZ),
    "nvk_model_output_shape": ([_VP, _I, _I, _I, _I, _VP, _VP], _I),
    "nvk_model_forward": ([_VP, _VP, _I, _VP, _VP, _SZ, _I, _I, _I, _VP], _I),
    "nvk_model_forward_features": ([_VP, _VP, _I, _VP, _VP, _SZ, _I, _I, _I, _VP], _I),
}
_STRINGS = ("nvk_last_error", "nvk_version", "nvk_manifest")


class ModelInfo(ctypes.Structure):
    """nvk_model_info."""
    _fields_ = [("dtype", ctypes.c_int), ("n_steps", ctypes.c_int), ("n_classes", ctypes.c_int),
                ("in_channels", ctypes.c_int), ("feature_channels", ctypes.c_int * 4),
                ("has_stage_norms", ctypes.c_int), ("weight_bytes", ctypes.c_size_t)]


class CtypesLib:
    """The C API over ctypes: ``lib.<op>(...)`` for ``nvk_<op>``, returning the status code."""

    def __init__(self, path):
        self.path = path
        lib = ctypes.CDLL(path)
        for name, (args, res) in SIGNATURES.items():
            f = getattr(lib, name)
            f.argtypes, f.restype = args, res
            if name not in _STRINGS:
                setattr(self, name[4:], f)
        self._lib = lib

    def last_error(self):
        return self._lib.nvk_last_error().decode()

    def version(self):
        return self._lib.nvk_version().decode()

    def manifest(self):
        return self._lib.nvk_manifest().decode()


def candidates():
    """Where the library is looked for, in order."""
    env = os.environ.get("NEXTVIT_CLIB")
    if env:  # an explicit choice: nothing else is tried
        return [env if env.endswith(".so") else os.path.join(env, NAME)]
    return [os.path.join(os.path.dirname(os.path.abspath(__file__)), NAME)]


def open_path(path: str) -> CtypesLib:
    """The library at ``path`` (a .so, or a directory holding libnextvit_kernels.so)."""
    if os.path.isdir(path):
        path = os.path.join(path, NAME)
    if not os.path.exists(path):
        raise RuntimeError(f"no C library at {path}")
    return CtypesLib(os.path.abspath(path))


def not_built_message(tried) -> str:
    return ("the nextvit_kernels C library is not built. Build it with `pip install .` (needs a C compiler, "
            "cmake and ninja; see README) or `cmake -S . -B build -G Ninja && cmake --build build`, then set "
            "NEXTVIT_CLIB=build (the directory holding libnextvit_kernels.so). Tried: " + "; ".join(tried))


def open_default() -> CtypesLib:
    """The first library of ``candidates()`` that loads; RuntimeError saying how to build it."""
    tried = []
    for p in candidates():
        if not os.path.exists(p):
            tried.append(f"{p}: not found")
            continue
        try:
            return CtypesLib(p)
        except OSError as e:
            tried.append(f"{p}: {e}")
    raise RuntimeError(not_built_message(tried))
