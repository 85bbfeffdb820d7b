"""Build products the tests share: made once, kept on disk by a key of their inputs, and guarded by
a file lock so that parallel workers (pytest-xdist), and later runs, build each one once.

- ``aot_output()``: the kernels of every plan (S/B/L at 224 and 384, fp16/bf16/fp32, sm_80 and
  sm_90), what an install compiles; Triton's own cache makes a repeat of a compile cheap, this
  makes a repeat of the whole step free.
- ``c_library(sanitized)``: libnextvit_kernels.so built by CMake from that output, plain or with
  ASan + UBSan (``SANITIZE``).
- ``trt_harness(include, library, sanitized)``: the TensorRT plugins and their CPU harnesses for
  one TensorRT major, against the recording stub of the C library (``library=None``) or a real one.

Each lives in ``$NEXTVIT_TEST_BUILDS`` (default: ``~/.cache/nextvit_kernels/test-builds``) as
``<kind>-<key>/``; the key hashes the contents of every source file the product is made from, the
tool versions and the flags, so an edit rebuilds and nothing stale is reused. A folder counts only
once its ``.complete`` marker is written; the newest few of each kind are kept.
"""
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEEP = 3  # folders kept per kind: a few checkouts or branches side by side
BUILD_TIMEOUT = 1200
# What the C tests build with when they run under ASan + UBSan.
SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g", "-O1")


def root() -> Path:
    d = os.environ.get("NEXTVIT_TEST_BUILDS") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "nextvit_kernels", "test-builds")
    os.makedirs(d, exist_ok=True)
    return Path(d)


@contextlib.contextmanager
def _locked(path: Path, blocking: bool = True):
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _hash_inputs(h, inputs) -> None:
    """Files and folders by content (sorted, relative names), anything else by its repr."""
    for item in inputs:
        if isinstance(item, Path):
            files = sorted(p for p in item.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
                if item.is_dir() else [item]
            for p in files:
                h.update(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p).encode())
                h.update(p.read_bytes())
        else:
            h.update(repr(item).encode())
        h.update(b"\0")


def cached(kind: str, inputs, build) -> Path:
    """The folder ``build(folder)`` fills for these inputs, built now unless a finished one exists."""
    h = hashlib.sha1(kind.encode())
    _hash_inputs(h, inputs)
    d = root() / f"{kind}-{h.hexdigest()[:16]}"
    done = d / ".complete"
    if done.exists():
        return d
    with _locked(d.with_suffix(".lock")):
        if not done.exists():  # another worker may have finished it while this one waited
            shutil.rmtree(d, ignore_errors=True)  # an interrupted build
            d.mkdir(parents=True)
            t0 = time.time()
            build(d)
            done.write_text(json.dumps(dict(kind=kind, seconds=round(time.time() - t0, 1), pid=os.getpid())))
            _prune(kind, d)
    return d


def _prune(kind: str, keep_dir: Path) -> None:
    done = sorted((p for p in root().glob(f"{kind}-*/.complete")), key=lambda p: p.stat().st_mtime, reverse=True)
    for marker in done[KEEP:]:
        d = marker.parent
        if d == keep_dir:
            continue
        with _locked(d.with_suffix(".lock"), blocking=False) as mine:
            if mine:  # not being built or waited on right now
                shutil.rmtree(d, ignore_errors=True)


def tool_version(cmd) -> str:
    try:
        return subprocess.run([*cmd, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    except OSError:
        return "missing"


def find_c_compiler():
    """The C compiler an install would use (nvk_build.c_compiler), or None."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import nvk_build
    return nvk_build.c_compiler()


@functools.lru_cache(maxsize=None)
def sanitizer_probe(cc, language: str = "c") -> str:
    """Why ``cc`` cannot build a ``language`` (c, c++) program with ``SANITIZE`` ("" when it can)."""
    probe = subprocess.run([cc, *SANITIZE, "-x", language, "-", "-o", os.devnull], input="int main(void){return 0;}",
                           capture_output=True, text=True)
    return probe.stderr[-300:] or "failed" if probe.returncode else ""


def sanitizer_runtimes():
    """[libasan.so, libubsan.so] of the C compiler an install uses, when it builds with ``SANITIZE``
    and names both shared runtimes (a Python executable is not linked with them: preload them);
    else None."""
    cc = find_c_compiler()
    if cc is None or sanitizer_probe(cc):
        return None
    found = []
    for name in ("libasan.so", "libubsan.so"):
        r = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True)
        path = r.stdout.strip()
        if r.returncode or not os.path.isabs(path) or not os.path.exists(path):
            return None
        found.append(path)
    return found


# ------------------------------------------------------------------ the products
AOT_ARGS = ("--arch", "sm_80,sm_90", "--dtypes", "fp16,bf16,fp32", "--variants", "nextvit_small,nextvit_base,nextvit_large",
            "--resolutions", "224,384")


def aot_output(args=AOT_ARGS) -> Path:
    """``python -m nextvit_kernels.aot --out DIR *args`` (the install's kernels by default)."""
    import torch
    import triton

    def build(d):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        r = subprocess.run([sys.executable, "-m", "nextvit_kernels.aot", "-q", "--out", str(d), *args],
                           cwd=ROOT, capture_output=True, text=True, env=env, timeout=BUILD_TIMEOUT)
        if r.returncode:
            raise RuntimeError(f"the AOT compile failed:\n{r.stderr[-4000:]}")

    return cached("aot", [ROOT / "nextvit_kernels", args, triton.__version__, torch.__version__], build)


def c_library(sanitized: bool = False) -> Path:
    """The CMake build folder of libnextvit_kernels.so over ``aot_output()``: plain (Release, with
    the C example) or sanitized (Debug, ``SANITIZE`` flags, without the example); both with the
    Triton backend (``csrc/triton/libtriton_nextvit.so``) where nlohmann/json is installed."""
    from nextvit_kernels import aot
    aot_dir = aot_output()
    flags = " ".join(SANITIZE)
    cmake_args = ["-DNEXTVIT_TRT=OFF"]
    if sanitized:
        cmake_args += ["-DNEXTVIT_BUILD_EXAMPLES=OFF", "-DCMAKE_BUILD_TYPE=Debug", f"-DCMAKE_C_FLAGS={flags}",
                       f"-DCMAKE_CXX_FLAGS={flags}", f"-DCMAKE_SHARED_LINKER_FLAGS={flags}"]

    def build(d):
        aot.build_library(str(d), aot_dir=str(aot_dir), cmake_args=cmake_args,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))

    inputs = [ROOT / "csrc" / "src", ROOT / "csrc" / "include", ROOT / "csrc" / "examples", ROOT / "csrc" / "triton",
              ROOT / "third_party" / "triton", ROOT / "CMakeLists.txt", ROOT / "nextvit_kernels" / "aot.py", str(aot_dir), cmake_args, sys.executable,
              tool_version([find_c_compiler() or "cc"]), tool_version(["cmake"])]
    return cached("clib-sanitized" if sanitized else "clib", inputs, build)


def trt_harness(include: Path, library=None, sanitized: bool = False) -> Path:
    """csrc/trt with NEXTVIT_TRT_TESTS=ON against the TensorRT headers in ``include``: the contract
    harness over the recording stub (``library=None``) or the numeric one over ``library``; the
    build's output is kept in ``build.log`` (the warning check reads it)."""
    from _trt import configure_and_build
    extra = [f"-DNEXTVIT_KERNELS_LIBRARY={library}"] if library else []
    if sanitized:
        flags = " ".join(SANITIZE)
        extra += [f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}", f"-DCMAKE_EXE_LINKER_FLAGS={flags}",
                  f"-DCMAKE_SHARED_LINKER_FLAGS={flags}"]

    def build(d):
        (d / "build.log").write_text(configure_and_build(include, d, extra))

    inputs = [ROOT / "csrc" / "trt", ROOT / "csrc" / "include", include / "NvInferVersion.h", str(include), extra,
              Path(library) if library else None, tool_version(["c++"]), tool_version(["cmake"])]
    kind = f"trt-{'numeric' if library else 'contract'}{'-sanitized' if sanitized else ''}"
    return cached(kind, inputs, build)


def main():
    """Builds what a test run needs, before its workers start (.ci/run): each product and its time."""
    products = [("AOT kernels", aot_output), ("C library", c_library)]
    if sanitizer_runtimes() is not None:
        products.append(("C library, ASan + UBSan", lambda: c_library(sanitized=True)))
    for what, make in products:
        t0 = time.time()
        d = make()
        print(f"{what}: {d} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
