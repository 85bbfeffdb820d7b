import os

import torch

# Kernels run under Triton's interpreter where there is no GPU; this must be
# set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long CPU test")


def pytest_collection_modifyitems(config, items):
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
