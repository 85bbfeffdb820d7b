import os

import torch

# Kernels run under Triton's interpreter where there is no GPU; this must be
# set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import _arena  # noqa: E402
import _util  # noqa: E402
import _workers  # noqa: E402

# CPython's frame stack otherwise maps and unmaps a chunk per call in the interpreter's hot loops.
_arena.install()

# Under pytest-xdist: sanitized workers for the C suites, plain ones for the rest (_workers.py).
_workers.enter_worker()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than ~10 s on a 2-core machine (the quick tier, "
                                       "-m 'not slow', leaves it out)")
    if _workers.is_controller(config):
        _workers.configure_controller(config)


def pytest_xdist_make_scheduler(config, log):
    return _workers.make_scheduler(config, log)


def pytest_sessionstart(session):
    # The first libnextvit_kernels.so a process loads is what every later library that links it by
    # SONAME (the TensorRT plugins) binds to: in a sanitized worker, make it the sanitized one.
    if _util.sanitized() and not _util.USER_CLIB:
        import ctypes
        session.config._nvk_library = ctypes.CDLL(_util.sanitized_c_library())


def pytest_sessionfinish(session, exitstatus):
    if _workers.reports(session.config) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    _workers.summarize(terminalreporter, config)


def pytest_collection_modifyitems(config, items):
    # The longest first: parallel workers then finish together (a stable sort keeps the file order).
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every op output starts as NaN, so an element a kernel never writes fails."""
    from nextvit_kernels.ops import _common

    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)
    yield


@pytest.fixture(autouse=True)
def fresh_seed(request):
    # A different seed per test (and per run unless NEXTVIT_TEST_SEED is set),
    # printed on failure so a failing case can be replayed.
    seed = int(os.environ.get("NEXTVIT_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
