"""What an install does about the C library (nvk_build.py): the build requirements pip is
asked for when the interpreter being installed into has no torch (a fresh venv), where the
AOT step runs when it has, and the message of a skipped build, through pip's own isolated
build of this checkout."""
import os
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import nvk_build  # noqa: E402


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """The interpreter of a fresh venv: no torch, no triton."""
    d = tmp_path_factory.mktemp("bare_venv")
    venv.EnvBuilder(with_pip=False).create(d)
    return str(d / "bin" / "python")


def _no_build_env_torch(monkeypatch):
    # pip's isolated build environment: torch and triton not importable in the backend itself
    real = nvk_build.versions
    monkeypatch.setattr(nvk_build, "versions", lambda python=None, env=None: (
        {n: None for n in nvk_build.NEEDS} if python is None else real(python, env)))


def test_fresh_venv_asks_pip_for_torch_and_triton(monkeypatch, bare_python):
    monkeypatch.setenv("NEXTVIT_BUILD_CLIB", "1")
    _no_build_env_torch(monkeypatch)
    monkeypatch.setattr(sys, "executable", bare_python)
    assert nvk_build.versions(bare_python, nvk_build.target_env()) == {"torch": None, "triton": None}
    assert nvk_build.aot_runner() == (None, "torch and triton are not importable in the build environment")
    assert nvk_build.extra_requires() == ["torch>=2.4", "triton>=3.0"]
    assert nvk_build.get_requires_for_build_editable()[-2:] == ["torch>=2.4", "triton>=3.0"]


def test_installed_torch_runs_the_aot_step_outside_isolation(monkeypatch):
    from importlib.metadata import version

    monkeypatch.setenv("NEXTVIT_BUILD_CLIB", "1")
    monkeypatch.setenv("PYTHONNOUSERSITE", "1")   # as pip's isolation sets it
    _no_build_env_torch(monkeypatch)
    have = nvk_build.versions(sys.executable, nvk_build.target_env())
    assert have == {"torch": version("torch"), "triton": version("triton")}
    env, where = nvk_build.aot_runner()
    assert "PYTHONNOUSERSITE" not in env and "outside pip's build isolation" in where
    assert nvk_build.extra_requires() == []


def test_not_wanted_asks_for_nothing_and_says_how_to_build(monkeypatch):
    monkeypatch.setenv("NEXTVIT_BUILD_CLIB", "0")
    _no_build_env_torch(monkeypatch)
    assert nvk_build.extra_requires() == []
    msg = nvk_build.dry_run()
    assert "would NOT be built: NEXTVIT_BUILD_CLIB=0" in msg
    assert f"NEXTVIT_BUILD_CLIB=1 pip install -e {ROOT}" in msg
    monkeypatch.delenv("NEXTVIT_BUILD_CLIB")
    monkeypatch.setattr(nvk_build, "c_compiler", lambda environ=None: None)
    assert nvk_build.wanted() == (False, "no C compiler here ($CC, cc, gcc or clang)")
    monkeypatch.undo()
    monkeypatch.delenv("NEXTVIT_BUILD_CLIB", raising=False)
    monkeypatch.setattr(nvk_build.shutil, "which", lambda c: "/usr/bin/cc" if c == "cc" else None)
    assert nvk_build.wanted({}) == (True, "C compiler /usr/bin/cc")  # no nvcc needed


def test_pip_isolated_build_uses_the_backend_and_reports_the_skip(tmp_path):
    """pip wheel of this checkout in pip's isolated build environment (needs PyPI or a pip
    cache for setuptools, cmake, ninja), with the library turned off: the log says
    it was not built, why, and the command that builds it."""
    env = dict(os.environ, NEXTVIT_BUILD_CLIB="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path), ROOT],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "libnextvit_kernels.so) was NOT built: NEXTVIT_BUILD_CLIB=0" in log
    assert f"NEXTVIT_BUILD_CLIB=1 pip install {ROOT}" in log
    assert [f for f in os.listdir(tmp_path) if f.startswith("nextvit_kernels-") and f.endswith(".whl")]
