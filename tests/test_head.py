"""ops.head: global average pool + Linear (final BatchNorm folded into the Linear)."""
import pytest
import torch

from nextvit_kernels import ops
from _util import assert_close, rand_like_dtype


def oracle(x64, w64, b64):
    # Independent of ops.head.reference: explicit sum over pixels, then a matmul.
    pooled = x64.sum(dim=(2, 3)) / (x64.shape[2] * x64.shape[3])
    return pooled @ w64.T + b64


def make(b, c, h, w, n, dtype, device="cpu"):
    x, x64 = rand_like_dtype(b, c, h, w, dtype=dtype, device=device)
    wt, w64 = rand_like_dtype(n, c, dtype=dtype, device=device, scale=c ** -0.5)
    bias, b64 = rand_like_dtype(n, dtype=dtype, device=device)
    return (x, wt, bias), (x64, w64, b64)


CASES = [(1, 32, 1, 1, 10), (2, 96, 7, 7, 1000), (3, 160, 3, 5, 17), (1, 1024, 9, 9, 130)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_head_matches_float64(case, dtype, impl):
    t, t64 = make(*case, dtype)
    x, w, b = t
    out = ops.head(x, w, b, impl=impl)
    assert out.shape == (case[0], case[4]) and out.dtype == dtype
    assert_close(out, oracle(*t64), dtype)
    nchw = ops.head(x.contiguous(), w.reshape(*w.shape, 1, 1), b, impl=impl)
    assert_close(nchw, oracle(*t64), dtype)


def test_head_errors():
    x = torch.randn(2, 64, 3, 3)
    w, b = torch.randn(10, 64), torch.randn(10)
    with pytest.raises(ValueError, match="4-D"):
        ops.head(x[0], w, b)
    with pytest.raises(ValueError, match=r"w has shape \[10, 32\]"):
        ops.head(x, w[:, :32], b)
    with pytest.raises(ValueError, match="b has shape"):
        ops.head(x, w, b[:5])
    with pytest.raises(ValueError, match="dtype"):
        ops.head(x, w.half(), b)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.head(x, w, b, impl="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_head_gpu(dtype):
    for case in CASES + [(256, 1024, 7, 7, 1000), (8, 1024, 12, 12, 1000)]:
        t, t64 = make(*case, dtype, device="cuda")
        assert_close(ops.head(*t), oracle(*t64), dtype)


@pytest.mark.gpu
def test_head_cuda_graph():
    t, t64 = make(4, 1024, 7, 7, 1000, torch.float16, device="cuda")
    ops.head(*t)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.head(*t)
    t[0].copy_(torch.randn_like(t[0]))
    g.replay()
    assert_close(out, oracle(t[0].double().cpu(), t64[1], t64[2]), torch.float16)
