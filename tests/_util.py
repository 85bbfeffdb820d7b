"""Comparison helpers shared by the tests."""
import torch

# Relative to the largest reference magnitude; fp16/bf16 cover one rounding of
# each stored intermediate (eager PyTorch in those dtypes makes errors of the
# same order against a float64 reference).
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol: float = None, what: str = ""):
    """Every element of ``out`` within tol·max|ref| (+ tol·|ref|) of ``ref``; no NaN/inf."""
    assert out.shape == ref.shape, f"{what} shape {tuple(out.shape)} != {tuple(ref.shape)}"
    tol = TOL[dtype] if tol is None else tol
    out64 = out.detach().to(torch.float64).cpu()
    ref64 = ref.detach().to(torch.float64).cpu()
    bad = ~torch.isfinite(out64)
    assert not bad.any(), f"{what} {int(bad.sum())} non-finite elements (unwritten?) e.g. at {bad.nonzero()[0].tolist()}"
    scale = max(ref64.abs().max().item(), 1e-6)
    err = (out64 - ref64).abs()
    limit = tol * scale + tol * ref64.abs()
    over = err > limit
    assert not over.any(), (
        f"{what} {int(over.sum())}/{err.numel()} elements off; max abs err {err.max().item():.3e}, "
        f"max |ref| {scale:.3e}, tol {tol:g}; first at {over.nonzero()[0].tolist()}"
    )


def force_split(monkeypatch, module, split: bool):
    """Makes an op with two modes (ops.mlp, ops.mhca, ops.e_mhsa: one kernel, or split into
    kernels through a scratch) run the given one whatever the shape, keeping the tiles its
    _config picks for the shape."""
    orig = module._config
    monkeypatch.setattr(module, "_config", lambda *a, **k: dict(orig(*a, **k), split=split))


def rand_like_dtype(*shape, dtype, device="cpu", scale=1.0):
    """Random values already rounded to ``dtype``, plus their float64 copy for the reference."""
    x = (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(device)
    return x, x.to(torch.float64).cpu()


@torch.no_grad()
def randomize_(model: torch.nn.Module, gain: float = 0.5, generator=None):
    """Random weights with a sane scale and random BatchNorm statistics, so a
    test cannot pass by BatchNorms being identities or weights being tiny."""
    g = generator
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * gain / fan_in ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


_CPU_DRIVER_LIBRARY = {}


def cpu_driver_library():
    """The C library that the CPU driver stand-in tests (test_clib_cpu.py, test_cpu_driver.py) run:
    ``(library, manifest)`` where ``library`` is what ``testing.cpu_driver(library=...)`` takes (None:
    ``clib.load()``, the installed library or ``$NEXTVIT_CLIB``) and ``manifest`` the JSON it embeds.
    Without a usable library one is built once per process into a temp dir (AOT of NextViT-S at 224
    and 384, all dtypes, as test_clib.py's fixture does: minutes on 2 cores; set NEXTVIT_CLIB to
    reuse a build). Called at collection time, since the cases are the library's shape classes:
    skips the calling module when nothing can be built."""
    import atexit
    import ctypes
    import json
    import os
    import shutil
    import tempfile

    import pytest

    from nextvit_kernels import clib

    if "found" not in _CPU_DRIVER_LIBRARY:
        def embedded(path):
            lib = ctypes.CDLL(path)
            if not hasattr(lib, "nvk_manifest"):
                return None
            lib.nvk_manifest.restype = ctypes.c_char_p
            m = json.loads(lib.nvk_manifest().decode())
            # image hashes: how the stand-in tells the variants apart (aot.embedded_manifest)
            ok = any(info.get("cubin_sha1") for k in m.get("kernels", ()) for info in k["archs"].values())
            return m if ok else None

        why = "no C library is built"
        try:
            path = clib.library_path(clib.load())
            manifest = embedded(path)
            if manifest is not None:
                _CPU_DRIVER_LIBRARY["found"] = (None, manifest)
            else:
                why = f"the C library {path} predates the CPU stand-in (its manifest has no image hashes)"
        except RuntimeError:
            pass
        if "found" not in _CPU_DRIVER_LIBRARY:
            missing = [t for t in ("cmake", "ninja") if shutil.which(t) is None]
            if missing:
                _CPU_DRIVER_LIBRARY["found"] = f"{why} and {' and '.join(missing)} are missing to build one"
            else:
                from nextvit_kernels import aot
                build = tempfile.mkdtemp(prefix="nvk_cpu_build_")
                atexit.register(shutil.rmtree, build, True)  # the process has it loaded, no one else
                print(f"{why}: building one into {build}")
                aot.build_library(build, aot_args=["--variants", "nextvit_small", "--resolutions", "224,384",
                                                   "--dtypes", "fp16,bf16,fp32"])
                path = os.path.join(build, "libnextvit_kernels.so")
                _CPU_DRIVER_LIBRARY["found"] = (path, embedded(path))
    found = _CPU_DRIVER_LIBRARY["found"]
    if isinstance(found, str):
        pytest.skip(found, allow_module_level=True)
    return found


def record_launches(monkeypatch):
    """The launches the CPU stand-in executes from now on (``cpu_driver(execute=True)``), as dicts:
    entry ``name``, ``image`` address, its ``sha1`` (which variant and arch: aot.embedded_manifest),
    ``grid``, ``block``, ``shared`` bytes."""
    from nextvit_kernels.testing import _interpret

    seen = []
    run = _interpret.Executor.launch

    def spy(self, name, image, grid, block, shared, *args):
        try:
            self.variant(image)  # hashes it
        except _interpret.LaunchError:
            pass  # refused by the launch itself, below
        seen.append(dict(name=name, image=image, sha1=self._images.get(image), grid=tuple(grid), block=tuple(block),
                         shared=shared))
        return run(self, name, image, grid, block, shared, *args)

    monkeypatch.setattr(_interpret.Executor, "launch", spy)
    return seen


def interpreted():
    """Skips a test that runs kernels under the stand-in where Triton's interpreter is off (a GPU
    machine: conftest sets TRITON_INTERPRET=1 only without one)."""
    import os

    import pytest

    return pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                              reason="cpu_driver(execute=True) runs kernels under TRITON_INTERPRET=1")
