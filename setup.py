"""nextvit_kernels: pure-Python package (always) + the C library and its pybind11 module (when possible).

The C library (libnextvit_kernels.so, nextvit_kernels._C) is built with CMake + Ninja when a
CUDA toolkit (nvcc) and cmake are found and NEXTVIT_BUILD_CLIB is not "0"; otherwise the build
prints why it is skipped and installs the Python package alone. A failed C library build does the
same, with the error, unless NEXTVIT_BUILD_CLIB=1 asks for it explicitly. The build runs the AOT compiler
(python -m nextvit_kernels.aot: Triton, torch, no GPU needed) unless NEXTVIT_AOT_DIR points to a
finished AOT output. NEXTVIT_AOT_ARGS adds arguments to it (e.g. "--dtypes fp16").
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _why_not_clib():
    if os.environ.get("NEXTVIT_BUILD_CLIB", "1") == "0":
        return "NEXTVIT_BUILD_CLIB=0"
    if shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "no CUDA toolkit (nvcc) found"
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            return f"{tool} not found (pip install {tool})"
    return None


class CMakeBuild(build_ext):
    def run(self):
        why = _why_not_clib()
        if why:
            print(f"nextvit_kernels: skipping the C library ({why}); installing the pure-Python package only. "
                  "nextvit_kernels.clib.available() will be False.", file=sys.stderr)
            return
        for ext in self.extensions:
            try:
                self.build_cmake(ext)
            except (OSError, subprocess.CalledProcessError) as err:
                # The Python package works without the C library; only an explicit request makes this fatal.
                if os.environ.get("NEXTVIT_BUILD_CLIB") == "1":
                    raise
                print(f"nextvit_kernels: the C library build failed ({err}); installing the pure-Python package "
                      "only (set NEXTVIT_BUILD_CLIB=1 to make this an error).", file=sys.stderr)

    def build_cmake(self, ext):
        build_temp = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_temp, exist_ok=True)
        pkg_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        os.makedirs(pkg_dir, exist_ok=True)
        cfg = ["cmake", "-S", ROOT, "-B", build_temp, "-G", "Ninja", f"-DPython3_EXECUTABLE={sys.executable}",
               "-DCMAKE_BUILD_TYPE=Release", "-DNEXTVIT_TRT=OFF"]
        try:
            import pybind11
            cfg.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            print("nextvit_kernels: pybind11 not installed: building the C library without nextvit_kernels._C "
                  "(clib.py then uses ctypes)", file=sys.stderr)
        if os.environ.get("NEXTVIT_AOT_DIR"):
            cfg.append(f"-DNEXTVIT_AOT_DIR={os.path.abspath(os.environ['NEXTVIT_AOT_DIR'])}")
        if os.environ.get("NEXTVIT_AOT_ARGS"):
            cfg.append("-DNEXTVIT_AOT_ARGS=" + ";".join(os.environ["NEXTVIT_AOT_ARGS"].split()))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        subprocess.run(cfg, check=True, env=env)
        subprocess.run(["cmake", "--build", build_temp], check=True, env=env)
        for f in os.listdir(build_temp):
            if f == "libnextvit_kernels.so" or (f.startswith("_C.") and f.endswith(".so")):
                shutil.copy2(os.path.join(build_temp, f), os.path.join(pkg_dir, f))


setup(
    name="nextvit_kernels",
    version="0.1.0",
    description="Fused Triton kernels for the Next-ViT vision model, with an AOT C library",
    packages=find_packages(include=["nextvit_kernels", "nextvit_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "triton>=3.0", "numpy"],
    extras_require={
        # timm (the independent oracle) needs torchvision; onnx/onnxruntime for the export tests;
        # pybind11/cmake/ninja for the C library tests; matplotlib for the benchmark plots.
        "test": ["pytest", "timm>=1.0", "torchvision", "safetensors", "onnx", "onnxruntime",
                 "pybind11", "cmake", "ninja", "matplotlib", "pytest-benchmark", "hypothesis"],
        "bench": ["timm>=1.0", "torchvision", "matplotlib"],
    },
    ext_modules=[Extension("nextvit_kernels._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
