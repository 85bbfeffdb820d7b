"""The execute mode of the CPU driver stand-in: a launch of the C library, decoded with the
manifest the library embeds, runs the same Triton kernel under Triton's interpreter on the
host buffers its pointers address, every load and store checked against those buffers.

How a launch is decoded:
- the module's image is identified by its SHA-1 (``aot.embedded_manifest`` records one per
  cubin and PTX): every variant of a kernel has the same ``.entry`` name, the image tells
  which variant (constexprs, specialization) it is;
- the kernelParams (NULL-terminated by the C library) must be exactly the variant's passed
  runtime parameters plus Triton's hidden scratch pointers, which must be NULL;
- each pointer must lie in a buffer the stand-in knows and be 16-byte aligned, and each
  integer the variant was compiled to assume divisible by 16 must be; the pointer's region
  is from it to the end of the innermost known buffer it starts in;
- the block must be the variant's 32 * num_warps threads and the dynamic shared memory its
  image's.
Then ``kernel[grid](...)`` runs with the decoded arguments and the variant's constexprs,
while every active lane of every load and store must fall inside one of the launch's
pointer regions: an access outside them raises before memory is touched.
"""
import ctypes
import hashlib
import importlib
import json
import struct
import threading

import numpy as np

_PTR_DTYPES = {"*fp32": "float32", "*fp16": "float16", "*bf16": "bfloat16"}


class LaunchError(Exception):
    """A launch the stand-in refuses or could not run; the message names the kernel."""


class Region:
    """A pointer argument's reach: from the pointer to the end of the buffer it starts in;
    ``high`` is the end of the furthest byte accessed through it so far."""
    __slots__ = ("name", "start", "end", "high", "buffer")

    def __init__(self, name, start, end):
        self.name, self.start, self.end, self.high = name, start, end, start


# ------------------------------------------------------------------ checked memory access
_active = threading.local()  # .launch: (kernel description, [Region]) while a launch runs here
_patched = None


def _check_access(ptrs, mask, kind):
    launch = getattr(_active, "launch", None)
    if launch is None:
        return  # an interpreter kernel of someone else (e.g. the Triton path) on this thread
    what, regions = launch
    addr = ptrs.data if mask is None else ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
    if addr.size == 0:
        return
    size = ptrs.get_element_ty().primitive_bitwidth // 8
    lo, hi = int(addr.min()), int(addr.max()) + size
    for r in regions:
        if r.start <= lo and hi <= r.end:
            r.high = max(r.high, hi)
            return
    ok = np.zeros(addr.shape, dtype=bool)
    for r in regions:
        inside = (addr >= r.start) & (addr + size <= r.end)
        if inside.any():
            r.high = max(r.high, int(addr[inside].max()) + size)
        ok |= inside
    if ok.all():
        return
    bad = int(addr[~ok].flat[0])
    near = max((r for r in regions if r.start <= bad), key=lambda r: r.start, default=None)
    where = (f"+{bad - near.start} from argument {near.name}, whose buffer ends at +{near.end - near.start}"
             if near is not None else f"below every pointer argument ({', '.join(r.name for r in regions)})")
    raise LaunchError(f"{what}: {kind} of {size} bytes at {bad:#x}, {where}; {int((~ok).sum())} lanes of this "
                      f"access are outside the launch's buffers")


def install_checks():
    """Wraps the interpreter's memory ops with the bounds check (once per process; a thread
    with no stand-in launch running is not checked)."""
    global _patched
    if _patched is not None:
        return
    from triton.runtime import interpreter as it
    b = it.interpreter_builder
    load, store = b.create_masked_load, b.create_masked_store

    def masked_load(ptrs, mask, other, *args, **kw):
        _check_access(ptrs, mask, "load")
        return load(ptrs, mask, other, *args, **kw)

    def masked_store(ptrs, value, mask, *args, **kw):
        _check_access(ptrs, mask, "store")
        return store(ptrs, value, mask, *args, **kw)

    def unmodelled(name):
        orig = getattr(b, name)

        def f(*args, **kw):
            if getattr(_active, "launch", None) is not None:
                raise LaunchError(f"{_active.launch[0]}: {name} is not modelled by the CPU stand-in")
            return orig(*args, **kw)
        return f

    b.create_masked_load, b.create_masked_store = masked_load, masked_store
    for name in ("create_atomic_rmw", "create_atomic_cas", "create_tensor_pointer_load",
                 "create_tensor_pointer_store", "create_descriptor_load", "create_descriptor_store"):
        if hasattr(b, name):
            setattr(b, name, unmodelled(name))
    _patched = b


# ------------------------------------------------------------------ images
def image_bytes(addr: int) -> bytes:
    """The bytes of a module image at ``addr``: an ELF cubin (its size from the ELF header's
    section and program header tables, which end the file in ptxas's output) or NUL-ended PTX."""
    head = ctypes.string_at(addr, 4)
    if head != b"\x7fELF":
        return ctypes.string_at(addr)
    hdr = ctypes.string_at(addr, 64)
    if hdr[4] != 2 or hdr[5] != 1:
        raise LaunchError(f"image at {addr:#x}: not a little-endian 64-bit ELF file")
    phoff, shoff = struct.unpack_from("<QQ", hdr, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", hdr, 0x36)
    size = max(64, shoff + shnum * shentsize, phoff + phnum * phentsize)
    if size > 1 << 28:
        raise LaunchError(f"image at {addr:#x}: ELF header claims {size} bytes")
    return ctypes.string_at(addr, size)


class Executor:
    """Decodes and runs launches for the kernels of one embedded manifest."""

    def __init__(self, manifest_json: str, find, touched):
        """``find(ptr) -> (start, size) | None``: the innermost known buffer holding ptr;
        ``touched(buffer_start, end)``: an access through some argument reached ``end``."""
        self.manifest = json.loads(manifest_json)
        self.find, self.touched = find, touched
        self.by_hash = {}
        for k in self.manifest["kernels"]:
            for arch, info in k["archs"].items():
                for kind in ("cubin", "ptx"):
                    digest = info.get(f"{kind}_sha1")
                    if digest:
                        self.by_hash[digest] = (k, arch, info)
        if not self.by_hash:
            raise LaunchError("the C library's manifest has no image hashes (built before the stand-in existed): "
                              "rebuild the library")
        self._images = {}

    def variant(self, image: int):
        digest = self._images.get(image)
        if digest is None:
            digest = self._images[image] = hashlib.sha1(image_bytes(image)).hexdigest()
        found = self.by_hash.get(digest)
        if found is None:
            raise LaunchError(f"unknown kernel image at {image:#x} (SHA-1 {digest}): not in the manifest of the C "
                              "library the stand-in was given")
        return found

    def launch(self, name, image, grid, block, shared, params, n_params):
        try:
            k, arch, info = self.variant(image)
        except LaunchError as err:  # no variant to name: the entry it was launched as
            raise LaunchError(f"entry {name!r}: {err}") from None
        what = f"kernel {k['id']} ({k['op']}.{k['kernel']}, {arch})"
        if name != info["symbol"]:
            raise LaunchError(f"{what}: launched as entry {name!r}, the image's entry is {info['symbol']!r}")
        passed = [p for p in k["params"] if p["passed"]]
        n_hidden = len(info["hidden_params"])
        if n_params != len(passed) + n_hidden:
            raise LaunchError(f"{what}: {n_params} kernel parameters given, the kernel takes {len(passed)} "
                              f"(+ {n_hidden} hidden scratch pointers)")
        want_block = (32 * k["num_warps"], 1, 1)
        if tuple(block) != want_block:
            raise LaunchError(f"{what}: block {tuple(block)}, the kernel was compiled for {want_block}")
        if shared != info["shared"]:
            raise LaunchError(f"{what}: {shared} bytes of dynamic shared memory, the image needs {info['shared']}")
        for i in range(len(passed), n_params):
            if ctypes.c_uint64.from_address(params[i]).value != 0:
                raise LaunchError(f"{what}: hidden parameter {i} ({info['hidden_params'][i - len(passed)]['name']}) "
                                  "is not NULL; the kernels need no scratch")
        import torch
        import triton
        values, regions, keep = {}, [], []
        it = iter(range(len(passed)))
        for p in k["params"]:
            pname = p["name"]
            if not p["passed"]:
                values[pname] = p["value"]
                continue
            addr = params[next(it)]
            if p["type"] == "ptr":
                ptr = ctypes.c_uint64.from_address(addr).value
                buf = self.find(ptr)
                if buf is None:
                    raise LaunchError(f"{what}: argument {pname} = {ptr:#x} is not in any buffer the stand-in knows")
                if ptr % 16:
                    raise LaunchError(f"{what}: argument {pname} = {ptr:#x} is not 16-byte aligned, which the compiled "
                                      "kernel assumes (tt.divisibility=16)")
                end = buf[0] + buf[1]
                region = Region(pname, ptr, end)
                region.buffer = buf[0]
                regions.append(region)
                raw = torch.frombuffer((ctypes.c_uint8 * (end - ptr)).from_address(ptr), dtype=torch.uint8)
                keep.append(raw)
                values[pname] = triton.reinterpret(raw, getattr(torch, _PTR_DTYPES[k["signature"][pname]]))
            elif p["type"] == "i32":
                v = ctypes.c_int32.from_address(addr).value
                if p.get("div16") and v % 16:
                    raise LaunchError(f"{what}: argument {pname} = {v} is not a multiple of 16, which the compiled "
                                      "kernel assumes (tt.divisibility=16)")
                values[pname] = v
            elif p["type"] == "f32":
                values[pname] = ctypes.c_float.from_address(addr).value
            else:
                raise LaunchError(f"{what}: parameter {pname} of type {p['type']!r} is not modelled")
        fn = getattr(importlib.import_module(f"nextvit_kernels.ops.{k['op']}"), k["kernel"])
        consts = {c: v for c, v in k["constexprs"].items()}
        # one launch at a time: ops._interpreter serialises the interpreter, whose state is global
        _active.launch = (what, regions)
        try:
            fn[tuple(grid)](**dict(values, **consts))
        except LaunchError:
            raise
        except Exception as err:  # the interpreter wraps what a kernel raised, once per jit call level
            cause = err
            while cause is not None and not isinstance(cause, LaunchError):
                cause = cause.__cause__
            if cause is not None:
                raise cause from None
            raise LaunchError(f"{what}: the interpreter failed: {err}") from err
        finally:
            _active.launch = None
            for r in regions:
                if r.high > r.start:
                    self.touched(r.buffer, r.high)
