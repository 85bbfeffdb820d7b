"""Behaviour that the interpreter hides unless it is asked for: NaN through the fused ReLUs,
CUDA grid limits at extreme input sizes, and launching on the tensors' device."""
import os

import pytest
import torch
from triton.runtime import interpreter, jit

import nextvit_kernels as nk
from nextvit_kernels import fused, ops
from _util import force_split

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                       reason="CPU kernels need the interpreter")),
           pytest.param("cuda", marks=pytest.mark.gpu)]


def _with_nan(t, *index):
    t = t.clone()
    t[index] = float("nan")
    return t


def _nan_cases(device):
    """(name, op, args, kwargs, module, split) with a NaN in the input of the op's ReLU."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    x = _with_nan(r(2, 64, 5, 6, scale=1.0), 1, 3, 2, 4).contiguous(memory_format=torch.channels_last)
    cases = [("conv_bn_relu", ops.conv_bn_relu, (x, r(32, 64, 3, 3, scale=0.05), r(32)), dict(stride=1), None)]
    for split in (False, True):
        cases.append(("mhca", ops.mhca, (x, r(64, 32, 3, 3, scale=0.1), r(64), r(96, 64, scale=0.1)),
                      dict(residual=False), split))
        cases.append(("mlp", ops.mlp, (x, r(128, 64, scale=0.1), r(128), r(320 if split else 96, 128, scale=0.1),
                                       r(320 if split else 96)), dict(residual=False), split))
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_fused_relus_propagate_nan_like_torch(device, monkeypatch):
    """torch.relu(NaN) is NaN. A GPU max returns the non-NaN operand unless told otherwise,
    which would turn a NaN (or an out-of-bounds read of a NaN guard band) into 0."""
    for name, fn, args, kwargs, split in _nan_cases(device):
        if split is not None:
            force_split(monkeypatch, ops.module(name), split)
        ref = ops.module(name).reference(*[a.double().cpu() for a in args], **kwargs)
        out = fn(*args, **kwargs, impl="triton").double().cpu()
        assert ref.isnan().any(), name
        assert torch.equal(out.isnan(), ref.isnan()), f"{name} split={split}: NaN pattern differs from torch"
        ok = ~ref.isnan()
        assert torch.allclose(out[ok], ref[ok], rtol=1e-4, atol=1e-4), name
        monkeypatch.undo()


# ----------------------------------------------------------------------- grid limits
def _record_grids(monkeypatch):
    """Every kernel[grid] taken while binding is recorded and launches nothing."""
    grids = []

    def getitem(self, grid):
        grids.append((self.fn.__name__, tuple(grid)))
        return lambda *args, **kwargs: None

    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        monkeypatch.setattr(cls, "__getitem__", getitem)
    return grids


@pytest.mark.parametrize("variant", ["nextvit_small", "nextvit_large"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_grids_fit_cuda_limits_at_extreme_inputs(variant, dtype, monkeypatch):
    """Only grid x may grow with the input (limit 2^31 - 1); y and z (limit 65535) depend on
    the channel counts alone. Computed by binding every op, without running a kernel."""
    model = getattr(nk, variant)().eval()
    plan = model.fused_plan(torch.device("cpu"), dtype)
    grids = _record_grids(monkeypatch)
    per_shape = {}
    for shape in [(1, 3, 224, 224), (65536, 3, 32, 32), (1, 3, 4096, 4096), (3, 3, 4099, 31)]:
        grids.clear()
        for features in (False, True):
            fused.Program(plan, shape, features)
        per_shape[shape] = list(grids)
        for kernel, grid in grids:
            assert 1 <= len(grid) <= 3 and all(g >= 1 for g in grid), (kernel, grid)
            assert grid[0] <= 2**31 - 1, f"{kernel} at {shape}: grid x {grid[0]}"
            assert all(g <= 65535 for g in grid[1:]), f"{kernel} at {shape}: grid {grid} exceeds y/z 65535"
    assert {k for k, _ in per_shape[(65536, 3, 32, 32)]} >= {"_kv_kernel", "_attn_kernel", "_attn_heads_kernel"}


# ------------------------------------------------------------------ devices (GPU)
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_model_runs_on_its_device_not_the_current_one():
    m = nk.nextvit_small().eval().half()
    x = torch.randn(2, 3, 224, 224).half()
    with torch.inference_mode():
        ref = m.to("cuda:0")(x.to("cuda:0")).cpu()
        torch.cuda.set_device(0)
        m1 = m.to("cuda:1")
        for _ in range(3):  # eager, capture, replay
            out = m1(x.to("cuda:1"))
            assert out.device == torch.device("cuda:1") and torch.equal(out.cpu(), ref)
        args = [t.to("cuda:1") for t in (torch.randn(1, 96, 4, 4), torch.randn(288, 96) * 0.1, torch.randn(288),
                                         torch.randn(96, 288) * 0.05, torch.randn(96))]
        y = ops.mlp(*args, impl="triton")
        assert y.device == torch.device("cuda:1")
        assert torch.allclose(y, ops.mlp(*args, impl="reference"), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_reject_tensors_on_two_devices():
    x = torch.randn(1, 64, 4, 4, device="cuda:0")
    with pytest.raises(ValueError, match="is on cuda:1 but the input is on cuda:0"):
        ops.patch_embed(x, torch.randn(32, 64, device="cuda:1"), torch.randn(32, device="cuda:0"), stride=1)


def test_model_input_errors_are_clear():
    m = nk.NextViT(depths=(1, 1, 5, 1), num_classes=10, kernels="reference").eval()
    with pytest.raises(ValueError, match="looks like NHWC"):
        m(torch.randn(1, 32, 32, 3))
    with pytest.raises(ValueError, match="input is torch.float64 on cpu but the model is torch.float32"):
        m(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    m.kernels = "auto"
    with pytest.raises(ValueError, match="input is torch.float16 on cpu but the model is torch.float32"), \
            torch.no_grad():
        m(torch.randn(1, 3, 32, 32, dtype=torch.float16))
