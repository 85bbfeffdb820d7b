"""How installing nextvit_kernels builds the C library (libnextvit_kernels.so), and the
project's PEP 517 build backend (setuptools', plus build requirements chosen per machine).

    python nvk_build.py     # what `pip install .` would do about the C library here, and why

Building the C library runs the AOT compiler (``python -m nextvit_kernels.aot``), which needs
torch and triton. pip builds in an isolated environment that has neither, and in a fresh
venv they are not installed yet when the build runs (pip builds the project before it
installs its dependencies). So, when the library is wanted:
- if the build environment can import torch and triton (``--no-build-isolation``), the AOT
  step runs there;
- else if the interpreter being installed into already has them, the AOT step runs with that
  interpreter, outside pip's isolation;
- else the backend asks pip for torch and triton as build requirements (the versions already
  installed, if any), so that the first install builds the library too.

The library is wanted unless ``NEXTVIT_BUILD_CLIB=0``: by default wherever a C compiler is found
(``$CC``, ``cc``, ``gcc`` or ``clang``), which is all the build needs besides what pip provides:
CMake and Ninja are build requirements, the kernels are compiled by Triton with its own ptxas, and
the library dlopens the CUDA driver at run time, so no CUDA toolkit and no GPU are involved. It is
what makes the whole-model C runtime (no JIT on the first forward) and the TensorRT plugins work,
and, on a CPU, what the CPU driver stand-in tests run. ``NEXTVIT_BUILD_CLIB=1`` makes a failed
build an error. When the install skips or fails the library it says why and prints the command
that builds it, on the terminal as well as in the build log: pip shows a successful build's
output only with ``-v``.
"""
import json
import os
import shutil
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the PEP 517 hooks not overridden here)

ROOT = os.path.dirname(os.path.abspath(__file__))
NEEDS = ("torch", "triton")
MINIMUM = {"torch": "2.4", "triton": "3.0"}   # as install_requires in setup.py
# Variables through which pip's build isolation hides the target interpreter's site-packages.
_ISOLATION_VARS = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")


def c_compiler(environ=None):
    """Path of the C compiler the build would use, or None."""
    environ = os.environ if environ is None else environ
    for c in ([environ["CC"]] if environ.get("CC") else []) + ["cc", "gcc", "clang"]:
        found = shutil.which(c)
        if found:
            return found
    return None


def wanted(environ=None):
    """(build the C library?, why)."""
    environ = os.environ if environ is None else environ
    flag = environ.get("NEXTVIT_BUILD_CLIB", "")
    if flag == "0":
        return False, "NEXTVIT_BUILD_CLIB=0"
    if flag == "1":
        return True, "NEXTVIT_BUILD_CLIB=1"
    found = c_compiler(environ)
    if found is None:
        return False, "no C compiler here ($CC, cc, gcc or clang)"
    return True, f"C compiler {found}"


def target_env(environ=None):
    """The environment of the interpreter pip installs into, without pip's build isolation."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k not in _ISOLATION_VARS}


_PROBE = ("import importlib.util, importlib.metadata, json\n"
          "print(json.dumps({n: importlib.metadata.version(n) if importlib.util.find_spec(n) else None "
          "for n in %r}))" % (NEEDS,))


def versions(python=None, env=None):
    """{package: version or None} for torch and triton, in this process (``python=None``) or
    in ``python`` run with ``env``."""
    if python is None:
        import importlib.metadata
        return {n: importlib.metadata.version(n) if importlib.util.find_spec(n) else None for n in NEEDS}
    try:
        r = subprocess.run([python, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
        return json.loads(r.stdout) if r.returncode == 0 else {n: None for n in NEEDS}
    except (OSError, subprocess.SubprocessError, ValueError):
        return {n: None for n in NEEDS}


def aot_runner():
    """(environment to run the AOT step with ``sys.executable`` in, where that is), or
    (None, why not)."""
    if all(versions().values()):
        return dict(os.environ), "the build environment"
    env = target_env()
    if all(versions(sys.executable, env).values()):
        return env, f"{sys.executable} (outside pip's build isolation)"
    return None, "torch and triton are not importable in the build environment"


def extra_requires():
    """Build requirements beyond setuptools': torch and triton when the library is wanted and
    neither the build environment nor the target interpreter can run the AOT step."""
    if not wanted()[0] or aot_runner()[0] is not None:
        return []
    have = versions(sys.executable, target_env())
    # Pin what is installed already, so that pip reuses that wheel instead of fetching another.
    return [f"{n}=={v.split('+')[0]}" if v else f"{n}>={MINIMUM[n]}" for n, v in have.items()]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + extra_requires()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + extra_requires()


def build_command(editable):
    return f"NEXTVIT_BUILD_CLIB=1 pip install {'-e ' if editable else ''}{ROOT}"


def skipped(why, editable, done=True):
    return (f"nextvit_kernels: the C library (libnextvit_kernels.so) {'was' if done else 'would'} NOT "
            f"{'' if done else 'be '}built: {why}. "
            f"The Python package works without it. To build it (about 4 minutes on 2 cores, no GPU "
            f"needed): {build_command(editable)}")


def tell(msg):
    """Prints ``msg`` to the build log and to the terminal: pip hides a successful build's
    output unless run with -v, and the person at the terminal should still see this."""
    print(msg, file=sys.stderr, flush=True)
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(f"\n{msg}\n")
    except OSError:  # no controlling terminal (CI, a service): the log has it
        pass


def dry_run():
    """What an install would do about the C library here."""
    want, why = wanted()
    if not want:
        return skipped(why, editable=True, done=False)
    tools = [t for t in ("cmake", "ninja") if shutil.which(t) is None]
    env, where = aot_runner()
    lines = [f"nextvit_kernels: an install builds the C library ({why})."]
    if env is not None:
        lines.append(f"The AOT step runs in {where}.")
    else:
        lines.append(f"Inside pip's isolated build, {where}; pip is asked for "
                     f"{' '.join(extra_requires()) or 'torch and triton'} as build requirements.")
    if tools:
        lines.append(f"{' and '.join(tools)} not on PATH here: pip installs them into its build environment.")
    return " ".join(lines)


if __name__ == "__main__":
    print(dry_run())
