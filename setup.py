"""nextvit_kernels: pure-Python package (always) + the C library (when wanted).

The C library (libnextvit_kernels.so, reached from Python through ctypes) is built with CMake + Ninja when
nvk_build.wanted() says so (a C compiler found, or NEXTVIT_BUILD_CLIB=1; NEXTVIT_BUILD_CLIB=0 never);
nvk_build.py explains where its AOT step finds torch and triton. When it is skipped, or fails
(an error only under NEXTVIT_BUILD_CLIB=1), the install says why and how to build it, and the
Python package is installed alone. NEXTVIT_AOT_DIR points to a finished AOT output to embed
instead of compiling; NEXTVIT_AOT_ARGS adds arguments to the AOT step (e.g. "--dtypes fp16").
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
import nvk_build  # noqa: E402


class CMakeBuild(build_ext):
    def run(self):
        editable = getattr(self, "editable_mode", False) or getattr(self, "inplace", False)
        want, reason = nvk_build.wanted()
        why_not = None if want else reason
        if want:
            missing = [t for t in ("cmake", "ninja") if shutil.which(t) is None]
            env, where = nvk_build.aot_runner()
            if missing:
                why_not = f"{' and '.join(missing)} not found (pip install cmake ninja)"
            elif env is None:
                why_not = where
        if why_not:
            nvk_build.tell(nvk_build.skipped(why_not, editable))
            return
        # On the terminal too: otherwise pip's spinner turns for minutes with no word why.
        nvk_build.tell(f"nextvit_kernels: building the C library ({reason}; about 4 minutes on 2 cores, "
                       f"NEXTVIT_BUILD_CLIB=0 skips it); the AOT step runs in {where}")
        for ext in self.extensions:
            try:
                self.build_cmake(ext, env)
            except (OSError, subprocess.CalledProcessError) as err:
                # The Python package works without the C library; only an explicit request makes this fatal.
                if os.environ.get("NEXTVIT_BUILD_CLIB") == "1":
                    raise
                nvk_build.tell(nvk_build.skipped(f"its build failed ({err}; the log above has the output)",
                                                 editable))
                return
        nvk_build.tell("nextvit_kernels: built the C library (libnextvit_kernels.so)")

    def build_cmake(self, ext, env):
        build_temp = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_temp, exist_ok=True)
        pkg_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        os.makedirs(pkg_dir, exist_ok=True)
        cfg = ["cmake", "-S", ROOT, "-B", build_temp, "-G", "Ninja", f"-DPython3_EXECUTABLE={sys.executable}",
               "-DCMAKE_BUILD_TYPE=Release", "-DNEXTVIT_TRT=OFF",
               # pip's build environment (and the ninja in it) is new each time: never the cached one
               f"-DCMAKE_MAKE_PROGRAM={shutil.which('ninja')}"]
        if os.environ.get("NEXTVIT_AOT_DIR"):
            cfg.append(f"-DNEXTVIT_AOT_DIR={os.path.abspath(os.environ['NEXTVIT_AOT_DIR'])}")
        if os.environ.get("NEXTVIT_AOT_ARGS"):
            cfg.append("-DNEXTVIT_AOT_ARGS=" + ";".join(os.environ["NEXTVIT_AOT_ARGS"].split()))
        env = dict(env, PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
        subprocess.run(cfg, check=True, env=env)
        subprocess.run(["cmake", "--build", build_temp], check=True, env=env)
        shutil.copy2(os.path.join(build_temp, "libnextvit_kernels.so"), os.path.join(pkg_dir, "libnextvit_kernels.so"))
        # The Triton server backend (csrc/triton), built where nlohmann/json was found: serve.py runs it.
        backend = os.path.join(build_temp, "csrc", "triton", "libtriton_nextvit.so")
        if os.path.exists(backend):
            shutil.copy2(backend, os.path.join(pkg_dir, "libtriton_nextvit.so"))


setup(
    name="nextvit_kernels",
    version="0.1.0",
    description="Fused Triton kernels for the Next-ViT vision model, with an AOT C library",
    packages=find_packages(include=["nextvit_kernels", "nextvit_kernels.*"]),
    package_data={"nextvit_kernels.testing": ["cpu_driver.c"]},  # compiled on first use
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "triton>=3.0", "numpy"],
    extras_require={
        # timm (the independent oracle) needs torchvision; onnx/onnxruntime for the export tests;
        # cmake/ninja for the C library tests; matplotlib for the benchmark plots;
        # pytest-xdist runs the tests in parallel (and sanitized: tests/conftest.py).
        "test": ["pytest", "pytest-xdist>=3.2", "timm>=1.0", "torchvision", "safetensors", "onnx", "onnxruntime",
                 "cmake", "ninja", "matplotlib", "pytest-benchmark", "hypothesis",
                 "tritonclient[http,grpc]>=2.51", "nlohmann-json"],
        "bench": ["timm>=1.0", "torchvision", "matplotlib"],
        # the Triton Inference Server clients (python -m nextvit_kernels.serve, its tests and load test)
        "serve": ["tritonclient[http,grpc]>=2.51"],
    },
    # No Python extension module: this entry only makes build_ext (CMakeBuild) run and names the
    # package folder the library is copied into.
    ext_modules=[Extension("nextvit_kernels.libnextvit_kernels", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
