"""Helpers shared by the tests."""
import sys
import threading

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


def in_threads(n, body):
    """Runs ``body(i)`` for i < n in n threads started together, switching between them every
    few microseconds so that unlocked sections interleave; returns what they raised."""
    errors = []
    start = threading.Barrier(n)

    def run(i):
        start.wait()
        try:
            body(i)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(f"thread {i}: {type(err).__name__}: {err}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    return errors
