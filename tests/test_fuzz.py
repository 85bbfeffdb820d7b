"""Property-based fuzzing (hypothesis) of every fused op under the interpreter against its
float64 reference: random batch (1 included), H and W (1, odd, prime, non-square), channel
counts (the attention ops' must be multiples of their head size, anything else is a
ValueError; the other ops take any), fp32/fp16, residual on/off, both modes of the two-mode
ops, and inputs handed over as channels_last, NCHW, non-contiguous views and views with a
storage offset (the elements of the backing tensor outside the view are NaN, so a read
outside the view shows up, and the backing tensor must come back unchanged).

The examples are a fixed, derandomized sequence sized to keep this file near 3 minutes on
2 cores. A failure prints the falsifying ``case``, a dict whose ``seed`` fixes every random
value, and a ``@reproduce_failure`` blob. Replay: ``@example(case={...})`` above the test,
or ``test_fuzz_<op>.hypothesis.inner_test(case={...})`` with TRITON_INTERPRET=1.
Environment: NEXTVIT_FUZZ_SCALE=k runs k times as many examples, NEXTVIT_FUZZ_RANDOM=1 a
fresh sequence per run (replay one with ``--hypothesis-seed``), NEXTVIT_FUZZ_SHRINK=1
shrinks a failure to a smaller case (slow under the interpreter).
"""
import contextlib
import importlib
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

from nextvit_kernels import ops
from _util import assert_close, force_split

# The per-op input makers (shapes, weight scales, float64 copies) of the op test files.
import test_conv_bn_relu
import test_e_mhsa
import test_head
import test_mhca
import test_mlp
import test_patch_embed

CL = torch.channels_last
SCALE = float(os.environ.get("NEXTVIT_FUZZ_SCALE", "1"))
# Shrinking reruns the failing op many times under the slow interpreter; the drawn shapes are
# already tiny, so a failure reports the example as found unless shrinking is asked for.
SHRINK = os.environ.get("NEXTVIT_FUZZ_SHRINK") == "1"


def fuzz(max_examples: int):
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else [])
    return settings(max_examples=max(1, round(max_examples * SCALE)), deadline=None, database=None,
                    derandomize=os.environ.get("NEXTVIT_FUZZ_RANDOM") != "1", print_blob=True,
                    phases=phases, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- inputs
# (kind, k): k sets the padding / offset / step of the view.
LAYOUTS = ("nchw", "channels_last", "slice_c", "slice_w", "transposed", "offset_cl", "offset_nchw",
           "batch_step")
layout = st.tuples(st.sampled_from(LAYOUTS), st.integers(1, 3))


def as_layout(x: torch.Tensor, lay):
    """(view, backing tensor): a view with x's values in the given layout; every element of
    the backing tensor outside the view is NaN."""
    kind, k = lay
    b, c, h, w = x.shape

    def nan(*shape, cl=False):
        t = torch.full(shape, float("nan"), dtype=x.dtype)
        return t.contiguous(memory_format=CL) if cl else t

    if kind == "nchw":
        base = view = nan(b, c, h, w)
    elif kind == "channels_last":
        base = view = nan(b, c, h, w, cl=True)
    elif kind == "slice_c":      # channel window of a wider channels_last tensor
        base = nan(b, c + 2 * k, h, w, cl=True)
        view = base[:, k:k + c]
    elif kind == "slice_w":      # column window of a wider NCHW tensor
        base = nan(b, c, h, w + 2 * k)
        view = base[..., k:k + w]
    elif kind == "transposed":   # NWHC memory: channels_last-contiguous when W == 1
        base = nan(b, c, w, h, cl=True)
        view = base.transpose(2, 3)
    elif kind == "offset_cl":    # dense channels_last k elements into its storage
        base = nan(x.numel() + k)
        view = base[k:].view(b, h, w, c).permute(0, 3, 1, 2)
    elif kind == "offset_nchw":
        base = nan(x.numel() + k)
        view = base[k:].view(b, c, h, w)
    elif kind == "batch_step":   # every (k+1)-th image of a larger channels_last batch
        base = nan(b * (k + 1), c, h, w, cl=True)
        view = base[k::k + 1]
    else:
        raise AssertionError(kind)
    view.copy_(x)
    # --hypothesis-show-statistics lists these: how often each layout reached the kernel as is.
    event(f"x {kind}" + (" (kernel reads the view)" if view.is_contiguous(memory_format=CL) and kind != "channels_last"
                         else ""))
    return view, base


def call_checked(what, fn, views_bases, ref, dtype, *args, **kwargs):
    """fn(*args, **kwargs) matches ref (every element) and leaves the backing tensors of
    its inputs bit-for-bit unchanged."""
    before = [base.clone() for _, base in views_bases]
    out = fn(*args, **kwargs)
    for (view, base), old in zip(views_bases, before):
        torch.testing.assert_close(base, old, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{what}: the op wrote into its input: {m}")
    assert out.dtype == dtype, what
    if out.dim() == 4:
        assert out.is_contiguous(memory_format=CL), f"{what}: output not channels_last"
    assert_close(out, ref, dtype, what=what)


def common(**extra):
    """A case: the seed of every random value, dtype, batch, map size, x's layout, + extra
    (which may also replace those)."""
    fields = dict(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.float16]),
                  b=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), x_layout=layout)
    fields.update(extra)
    # Keys in this order in the printed reproducer.
    return st.fixed_dictionaries(fields).map(lambda d: {k: d[k] for k in fields})


def two_mode_case(draw, c_in: int, drawn: dict, **fields):
    """A case of mlp, mhca or e_mhsa: common() + the values already drawn + fields, with or
    without the residual (which needs c_out == c_in), in the fused or the split mode."""
    residual = draw(st.booleans())
    return draw(common(**{k: st.just(v) for k, v in drawn.items()}, **fields, residual=st.just(residual),
                       c_out=st.just(c_in) if residual else st.sampled_from([32, 48, 96]),
                       split=st.booleans()))


@contextlib.contextmanager
def split_mode(module_name: str, split: bool):
    """Runs a two-mode op in its fused or its split mode (tests/_util.force_split)."""
    event("split mode" if split else "fused mode")
    with pytest.MonkeyPatch.context() as mp:
        force_split(mp, importlib.import_module(f"nextvit_kernels.ops.{module_name}"), split)
        yield


# --------------------------------------------------------------------------- conv_bn_relu
@fuzz(150)
@given(case=common(c_in=st.sampled_from([3, 16, 32, 64]), c_out=st.sampled_from([32, 64]),
                   stride=st.sampled_from([1, 2])))
def test_fuzz_conv_bn_relu(case):
    torch.manual_seed(case["seed"])
    (x, wt, bias), args64 = test_conv_bn_relu.make(case["b"], case["c_in"], case["c_out"], case["h"],
                                                   case["w"], case["dtype"])
    vb = as_layout(x, case["x_layout"])
    ref = test_conv_bn_relu.mod.reference(*args64, case["stride"])
    call_checked(f"conv_bn_relu {case}", ops.conv_bn_relu, [vb], ref, case["dtype"], vb[0], wt, bias,
                 stride=case["stride"], impl="triton")


# --------------------------------------------------------------------------- patch_embed
@fuzz(200)
@given(case=common(c_in=st.sampled_from([32, 40, 64, 96]), c_out=st.sampled_from([32, 64, 96]),
                   stride=st.sampled_from([1, 2]), w4d=st.booleans()))
def test_fuzz_patch_embed(case):
    torch.manual_seed(case["seed"])
    (x, wt, bias), args64 = test_patch_embed.make_case(case["b"], case["c_in"], case["c_out"], case["h"],
                                                       case["w"], case["dtype"])
    vb = as_layout(x, case["x_layout"])
    if case["w4d"]:
        wt = wt[:, :, None, None]
    ref = test_patch_embed.oracle(args64, case["stride"])
    call_checked(f"patch_embed {case}", ops.patch_embed, [vb], ref, case["dtype"], vb[0], wt, bias,
                 stride=case["stride"], impl="triton")


# --------------------------------------------------------------------------- mhca
@st.composite
def mhca_cases(draw):
    c = draw(st.sampled_from([32, 64, 96]))
    return two_mode_case(draw, c, dict(c=c), proj_4d=st.booleans())


@pytest.mark.slow
@fuzz(150)
@given(case=mhca_cases())
def test_fuzz_mhca(case):
    torch.manual_seed(case["seed"])
    args, args64 = test_mhca.make(case["b"], case["c"], case["h"], case["w"], case["c_out"], case["dtype"],
                                  proj_4d=case["proj_4d"])
    vb = as_layout(args[0], case["x_layout"])
    ref = test_mhca.oracle(args64, case["residual"])
    with split_mode("mhca", case["split"]):
        call_checked(f"mhca {case}", ops.mhca, [vb], ref, case["dtype"], vb[0], *args[1:],
                     residual=case["residual"], impl="triton")


# --------------------------------------------------------------------------- mlp
@st.composite
def mlp_cases(draw):
    c1 = draw(st.sampled_from([32, 40, 64, 96]))
    c2 = draw(st.sampled_from([0, 32, 64]))
    return two_mode_case(draw, c1 + c2, dict(c1=c1, c2=c2), x2_layout=layout,
                         hidden=st.sampled_from([32, 64, 96, 128]), w4d=st.booleans())


@fuzz(200)
@given(case=mlp_cases())
def test_fuzz_mlp(case):
    torch.manual_seed(case["seed"])
    t, t64 = test_mlp.make_case(case["b"], case["c1"], case["c2"], case["hidden"], case["c_out"], case["h"],
                                case["w"], case["dtype"])
    x, x2, w1, b1, w2, b2 = t
    views = [as_layout(x, case["x_layout"])]
    if x2 is not None:
        views.append(as_layout(x2, case["x2_layout"]))
    if case["w4d"]:
        w1, w2 = w1[:, :, None, None], w2[:, :, None, None]
    ref = test_mlp.oracle(t64, case["residual"])
    with split_mode("mlp", case["split"]):
        call_checked(f"mlp {case}", ops.mlp, views, ref, case["dtype"], views[0][0], w1, b1, w2, b2,
                     x2=views[1][0] if x2 is not None else None, residual=case["residual"], impl="triton")


# --------------------------------------------------------------------------- e_mhsa
@st.composite
def e_mhsa_cases(draw):
    head_dim = draw(st.sampled_from([16, 32, 64]))
    c = head_dim * draw(st.integers(1, 96 // head_dim))
    # Maps up to 12x12 so that some examples have more than 64 key tokens (online softmax).
    return two_mode_case(draw, c, dict(c=c, head_dim=head_dim), h=st.integers(1, 12), w=st.integers(1, 12),
                         sr_ratio=st.integers(1, 3), w4d=st.booleans())


@pytest.mark.slow
@fuzz(150)
@given(case=e_mhsa_cases())
# More than 64 key tokens: the online-softmax path (key tiles), in both modes.
@example(case=dict(seed=1, dtype=torch.float32, b=2, h=9, w=8, x_layout=("slice_c", 1), c=32, head_dim=32,
                   sr_ratio=1, residual=True, c_out=32, split=False, w4d=False))
@example(case=dict(seed=2, dtype=torch.float16, b=1, h=9, w=9, x_layout=("transposed", 1), c=64, head_dim=16,
                   sr_ratio=1, residual=False, c_out=48, split=True, w4d=True))
def test_fuzz_e_mhsa(case):
    torch.manual_seed(case["seed"])
    sr, hd = case["sr_ratio"], case["head_dim"]
    x, params, x64, params64 = test_e_mhsa.make_case(case["b"], case["c"], case["h"], case["w"], case["c_out"],
                                                     case["dtype"], channels_last=False)
    vb = as_layout(x, case["x_layout"])
    if case["w4d"]:
        params = [p[:, :, None, None] if p.dim() == 2 else p for p in params]
    kwargs = dict(sr_ratio=sr, head_dim=hd, residual=case["residual"], impl="triton")
    if case["h"] * case["w"] < sr * sr:  # not even one pooling window of key tokens
        event("rejected: fewer tokens than sr_ratio^2")
        with pytest.raises(ValueError, match="fewer than one pooling window"):
            ops.e_mhsa(vb[0], *params, **kwargs)
        return
    event("one key tile" if case["h"] * case["w"] // (sr * sr) <= 64 else "online softmax (several key tiles)")
    ref = test_e_mhsa.mod.reference(x64, *params64, sr, hd, case["residual"])
    with split_mode("e_mhsa", case["split"]):
        call_checked(f"e_mhsa {case}", ops.e_mhsa, [vb], ref, case["dtype"], vb[0], *params, **kwargs)


# --------------------------------------------------------------------------- head
@fuzz(200)
@given(case=common(c=st.sampled_from([32, 40, 64, 96]), n=st.sampled_from([1, 10, 17, 32]),
                   w4d=st.booleans()))
def test_fuzz_head(case):
    torch.manual_seed(case["seed"])
    (x, wt, bias), t64 = test_head.make(case["b"], case["c"], case["h"], case["w"], case["n"], case["dtype"])
    vb = as_layout(x, case["x_layout"])
    if case["w4d"]:
        wt = wt[:, :, None, None]
    call_checked(f"head {case}", ops.head, [vb], test_head.oracle(*t64), case["dtype"], vb[0], wt, bias,
                 impl="triton")


# --------------------------------------------------------------------------- rejection
# The attention ops cut channels into heads: any other channel count is a one-line ValueError
# (raised before any kernel runs, so these are cheap).
@fuzz(50)
@given(c=st.integers(1, 200).filter(lambda c: c % 32), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_fuzz_mhca_rejects_channels_not_multiple_of_32(c, seed, dtype):
    torch.manual_seed(seed)
    args, _ = test_mhca.make(1, c, 3, 3, c, dtype)
    with pytest.raises(ValueError, match=f"^mhca: x has {c} channels, which is not a multiple of 32$"):
        ops.mhca(*args, impl="triton")


@fuzz(50)
@given(data=st.data(), head_dim=st.sampled_from([16, 32, 64, 128]), seed=st.integers(0, 2**31 - 1))
def test_fuzz_e_mhsa_rejects_channels_not_multiple_of_head_dim(data, head_dim, seed):
    c = data.draw(st.integers(1, 200).filter(lambda c: c % head_dim), label="c")
    torch.manual_seed(seed)
    x, params, _, _ = test_e_mhsa.make_case(1, c, 3, 3)
    with pytest.raises(ValueError, match=f"^e_mhsa: x has {c} channels, which is not a multiple of {head_dim}$"):
        ops.e_mhsa(x, *params, sr_ratio=1, head_dim=head_dim, impl="triton")
