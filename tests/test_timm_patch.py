"""nextvit_kernels.accelerate(model) on timm's own Next-ViT, against that model's unpatched forward.

Most tests run the fused engine with each op's ``bind`` kept (shapes, launch configurations) and
its launch replaced by the op's PyTorch reference (``reference_ops``): what is checked there is the
folding of timm's modules, the dataflow and what each patched method returns, for every variant,
at the cost of the reference math; the op calls are counted. The kernels themselves run under
Triton's interpreter in the ``interpreted`` tests (launches counted), and through the C runtime
under the CPU stand-in in tests/test_runtime.py; GPU-marked tests run them for real.
"""
import copy
import pickle
import threading

import pytest
import torch
from torch import nn

import nextvit_kernels as nk
from nextvit_kernels import ops, timm_patch
from _util import images, interpreted, randomize_, rel_err

timm = pytest.importorskip("timm")
from timm.models.nextvit import NextViT as TimmNextViT  # noqa: E402

TINY = (1, 1, 5, 1)
VARIANTS = {"small": (3, 4, 10, 3), "base": (3, 4, 20, 3), "large": (3, 4, 30, 3)}
OPS = ("conv_bn_relu", "patch_embed", "mhca", "mlp", "e_mhsa", "head")


def _timm(depths=TINY, seed=0, **kw):
    """A timm Next-ViT (or features_only model) with random weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    return randomize_(timm.create_model("nextvit_small", depths=depths, **kw), gain=0.7).eval()


def _close(got, want, tol=2e-5):
    """fp32: every element within tol of the output's scale (the fused graph sums in another order)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.isfinite(got).all()
    assert rel_err(got, want) <= tol, rel_err(got, want)


@pytest.fixture
def reference_ops(monkeypatch):
    """Each op's launch replaced by its reference (the real bind still checks shapes and picks the
    launch configuration); returns the list of op calls made."""
    calls = []
    for name in OPS:
        mod = ops.module(name)
        real_bind, op = mod.bind, getattr(ops, name)

        def bind(x_shape, *tensors, _real=real_bind, _op=op, _name=name, **kwargs):
            _, out_shape = _real(x_shape, *tensors, **kwargs)

            def run(x, x2=None):
                calls.append(_name)
                extra = {} if x2 is None else {"x2": x2}
                out = _op(x, *tensors, impl="reference", **extra, **{k: v for k, v in kwargs.items()
                                                                   if k != "x2_channels"})
                assert out.shape == out_shape
                return out

            return run, out_shape

        monkeypatch.setattr(mod, "bind", bind)
    return calls


def _plan(model):
    return model._nvk.engine.state.plan


def _untouched(model, before_sd, cls):
    assert type(model) is cls and "_nvk" not in model.__dict__
    after = model.state_dict()
    assert list(after) == list(before_sd) and all(torch.equal(after[k], before_sd[k]) for k in after)


# ----------------------------------------------------------------- classifiers, every variant
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_matches_timms_own_forward(variant, reference_ops):
    """logits, forward_features and forward_intermediates (three ways) equal the same object's
    forward before accelerate(); the engine ran one op call per plan step and the head, and no
    timm stage ran."""
    m = _timm(VARIANTS[variant], num_classes=10)
    x = images(2, 40, 33)
    with torch.no_grad():
        want = [m(x), m.forward_features(x), *m.forward_intermediates(x, indices=[0, 3], norm=True),
                m.forward_intermediates(x, indices=2, stop_early=True), m.forward_intermediates(x, intermediates_only=True)]
    assert rel_err(want[0][0], want[0][1]) > 1e-2, "logits do not depend on the input: test is void"
    assert nk.accelerate(m, kernels="triton") is m
    assert isinstance(m, TimmNextViT) and nk.timm_patch.is_accelerated(m)
    stage_runs = []
    m.stages[1].register_forward_hook(lambda *a: stage_runs.append(1))
    with torch.no_grad():
        logits = m(x)
        plan = _plan(m)
        assert reference_ops.count("head") == 1 and len(reference_ops) == len(plan.steps) + 1
        got = [logits, m.forward_features(x), *m.forward_intermediates(x, indices=[0, 3], norm=True),
               m.forward_intermediates(x, indices=2, stop_early=True), m.forward_intermediates(x, intermediates_only=True)]
    assert stage_runs == []
    _close(got[0], want[0])
    _close(got[1], want[1])
    _close(got[2], want[2])
    for g, w in zip(got[3], want[3]):
        _close(g, w)
    _close(got[4][0], want[4][0])
    for g, w in zip(got[4][1], want[4][1]):
        _close(g, w)
    assert len(got[5]) == 4
    for g, w in zip(got[5], want[5]):
        _close(g, w)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_fp16_within_twice_eager_fp16_error(variant, reference_ops):
    """fp16: the folded plan (weights folded in float64, cast once) against timm's fp32 logits,
    within twice the error of timm's own forward in fp16."""
    m = _timm(VARIANTS[variant], num_classes=10)
    x = images(2, 32, 32)
    with torch.no_grad():
        want = m(x)
        eager = copy.deepcopy(m).half()(x.half()).float()
        nk.accelerate(m.half(), kernels="triton")
        got = m(x.half())
    assert got.dtype == torch.float16 and len(reference_ops) == len(_plan(m).steps) + 1
    assert rel_err(got.float(), want) <= 2 * rel_err(eager, want) + 1e-3, (rel_err(got.float(), want), rel_err(eager, want))


def test_reparameterized_and_headless_and_other_pooling(reference_ops):
    """A reparameterized model (timm's own BatchNorm merge), num_classes=0 (pooled features: the
    body fused, timm's norm and pooling after it) and global_pool='max' (timm's head after the
    fused body) each give what they gave before accelerate()."""
    x = images(2, 32, 32)
    for kw, reparam in (({}, True), (dict(num_classes=0), False), (dict(global_pool="max"), False)):
        m = _timm(**kw)
        if reparam:
            for blk in m.modules():
                if hasattr(blk, "reparameterize"):
                    blk.reparameterize()
        with torch.no_grad():
            want, want_f = m(x), m.forward_features(x)
            nk.accelerate(m, kernels="triton")
            reference_ops.clear()
            got = m(x)
            heads = reference_ops.count("head")
            got_f = m.forward_features(x)
        _close(got, want)
        _close(got_f, want_f)
        assert heads == (1 if timm_patch.fused_head(m.head) else 0), kw
        assert (_plan(m).head is None) == (not timm_patch.fused_head(m.head))
        assert len(reference_ops) >= 2 * len(_plan(m).steps), kw  # both forwards ran the plan


# ----------------------------------------------------------------- backbones
@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3)])
def test_features_only_returns_timms_feature_maps(out_indices, reference_ops):
    m = _timm(features_only=True, out_indices=out_indices)
    x = images(2, 48, 40)
    with torch.no_grad():
        want = m(x)
        nk.accelerate(m, kernels="triton")
        got = m(x)
    assert len(reference_ops) == len(_plan(m).steps) and "head" not in reference_ops
    assert _plan(m).head is None
    assert len(got) == len(want) == len(out_indices)
    for g, w in zip(got, want):
        _close(g, w)


# ----------------------------------------------------------------- weights, training, copies
def test_weight_changes_and_timms_own_rewrites_are_seen(reference_ops):
    """In-place weight updates, load_state_dict, reparameterize() and reset_classifier() between
    eval calls: each next call matches an unpatched twin given the same change."""
    m = _timm(num_classes=10)
    twin = copy.deepcopy(m)
    nk.accelerate(m, kernels="triton")
    x = images(2, 32, 32)

    def both(change):
        change(m), change(twin)
        with torch.no_grad():
            _close(m(x), twin(x))

    both(lambda t: None)
    with torch.no_grad():  # in place, as an optimizer or an EMA writes (a write through .data is not seen)
        both(lambda t: t.head.fc.bias.add_(1.0))
        both(lambda t: t.stages[2].blocks[4].mlp.fc2.weight.mul_(1.5))
        both(lambda t: t.stages[2].blocks[4].e_mhsa.norm.running_var.mul_(2.0))
    sd = _timm(num_classes=10, seed=1).state_dict()
    both(lambda t: t.load_state_dict(sd))
    both(lambda t: [b.reparameterize() for b in t.modules() if hasattr(b, "reparameterize")])
    both(lambda t: (torch.manual_seed(3), t.reset_classifier(7)))
    with torch.no_grad():
        assert m(x).shape == (2, 7)
    both(lambda t: t.reset_classifier(0))


def _train_step(m, x, seed):
    m.train()
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # drop path draws from it
    out = m(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_training_is_timms_bit_for_bit_after_accelerate_and_after_restore(kernels, reference_ops):
    m = _timm(num_classes=10)
    x = images(2, 32, 32)
    before_out, before_grads = _train_step(m, x, 5)
    sd = m.state_dict()
    nk.accelerate(m, kernels=kernels)
    assert list(m.state_dict()) == list(sd)
    during_out, during_grads = _train_step(m, x, 5)
    nk.restore(m)
    assert type(m) is TimmNextViT and "_nvk" not in m.__dict__
    after_out, after_grads = _train_step(m, x, 5)
    assert reference_ops == []  # no fused forward in training
    for out, grads in ((during_out, during_grads), (after_out, after_grads)):
        assert torch.equal(out, before_out)
        assert all(torch.equal(g, w) for g, w in zip(grads, before_grads))


def test_copies_pickles_settings_and_restore(reference_ops):
    m = _timm(num_classes=10)
    x = images(1, 32, 32)
    with torch.no_grad():
        want = m(x)
    nk.accelerate(m, kernels="triton", cuda_graphs="off")
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(other) is type(m) and other._nvk.engine.settings()["cuda_graphs"] == "off"
        assert other._nvk.engine is not m._nvk.engine
        with torch.no_grad():
            _close(other(x), want)
    assert nk.accelerate(m, kernels="reference") is m  # again: new settings
    reference_ops.clear()
    with torch.no_grad():
        assert torch.equal(m(x), want)  # timm's own forward
    assert reference_ops == []
    nk.restore(m)
    with pytest.raises(ValueError, match="was not accelerated"):
        nk.restore(m)
    with pytest.warns(DeprecationWarning, match="kernels='clib' is now spelled kernels='runtime'"):
        nk.accelerate(m, kernels="clib")
    assert m._nvk.engine.kernels == "runtime"


def test_inference_mode_and_threads(reference_ops):
    """Under inference_mode, and from 6 threads on one model (two input shapes), every result is
    its own input's."""
    m = nk.accelerate(_timm(num_classes=10), kernels="triton")
    inputs = [images(1 + i % 2, 32, 32 + 8 * (i % 2)) for i in range(6)]
    twin = copy.deepcopy(m)
    nk.restore(twin)
    with torch.no_grad():
        want = [twin(x) for x in inputs]
    with torch.inference_mode():
        _close(m(inputs[0]), want[0])
    got, errors = [None] * 6, []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(3):
                    got[i] = m(inputs[i])
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for g, w in zip(got, want):
        _close(g, w)


# ----------------------------------------------------------------- refusals
def _refused(model, match, **kw):
    before, cls = model.state_dict(), type(model)
    with pytest.raises(ValueError, match=match):
        nk.accelerate(model, **kw)
    _untouched(model, before, cls)


def test_refusals_leave_the_model_as_it_was(monkeypatch):
    _refused(nk.NextViT(depths=TINY), "nextvit_kernels' own NextViT runs the fused engine itself")
    _refused(nn.Sequential(nn.Conv2d(3, 8, 3)), "takes a timm Next-ViT")
    _refused(_timm(features_only=True, out_indices=(0, 1)), r"out_indices \(0, 1\) end at stage 1")
    pruned = _timm()
    pruned.prune_intermediate_layers(indices=(1, 2))
    _refused(pruned, "has 3 stages, not 4")
    _refused(_timm(in_chans=4), r"4-channel images")
    _refused(_timm(act_layer="gelu"), r"stem.0.act is GELU\(.*\) where the published Next-ViT has ReLU")
    _refused(_timm(head_dim=16), r"head_dim=16: the fused kernels take the published 32-channel heads")
    other = _timm()
    other.stages[2].blocks[1].mhca.norm = nn.LayerNorm(384)  # a structure timm never builds
    _refused(other, r"stages.2.blocks.1.mhca.norm is LayerNorm")
    other = _timm()
    del other.stages[1].blocks[0].mlp  # a part missing
    _refused(other, r"stages.1.blocks.0.mlp.act is missing where the published Next-ViT has ReLU")
    del other.stages[1].blocks
    _refused(other, r"not the Next-ViT that timm builds \(AttributeError")
    _refused(_timm(), "kernels must be one of", kernels="fast")
    _refused(_timm(), "cuda_graphs must be one of", cuda_graphs="on")

    # A timm whose Next-ViT code differs (here one block's forward) is refused by name.
    real = timm.models.nextvit.NextConvBlock.forward

    def forward(self, x):
        return real(self, x) * 1.0

    monkeypatch.setattr(timm.models.nextvit.NextConvBlock, "forward", forward)
    _refused(_timm(), r"Next-ViT code differs .* in NextConvBlock\.forward")


def test_fingerprints_of_the_installed_timm_are_known_and_the_tool_prints_them(capsys):
    """The installed timm's checked methods are all known (CI's timm is a release this module was
    checked against); the fingerprint tool reads source files and marks nothing of them new."""
    import importlib

    assert timm_patch._changed_code() == []
    paths = sorted({importlib.import_module(mod).__file__ for mod, _, _ in timm_patch.KNOWN_CODE})
    assert timm_patch.main(["--fingerprint", *paths]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) >= len(timm_patch.KNOWN_CODE) - 1 and not any(line.endswith("(new)") for line in out)


# ----------------------------------------------------------------- the kernels under the interpreter
def _count_launches(monkeypatch):
    from triton.runtime import interpreter

    launched = []
    getitem = interpreter.InterpretedFunction.__getitem__

    def counted(self, grid):
        launched.append(self.fn.__name__)
        return getitem(self, grid)

    monkeypatch.setattr(interpreter.InterpretedFunction, "__getitem__", counted)
    return launched


@pytest.mark.slow
def test_interpreted_kernels_classifier_and_backbone(monkeypatch):
    """The Triton kernels (interpreter): a classifier's logits (fp32) and a backbone's feature maps
    match timm's, with exactly the launches the plan counts."""
    interpreted()
    launched = _count_launches(monkeypatch)
    m = _timm(num_classes=10)
    x = images(2, 32, 32)
    with torch.no_grad():
        want = m(x)
        nk.accelerate(m, kernels="triton")
        got = m(x)
    assert len(launched) == _plan(m).launches(2, 32, 32), launched
    _close(got, want)
    launched.clear()
    b = _timm(features_only=True, out_indices=(1, 2, 3))
    x = images(1, 36, 28)
    with torch.no_grad():
        want = b(x)
        nk.accelerate(b, kernels="triton")
        got = b(x)
    assert len(launched) == _plan(b).launches(1, 36, 28) - 1  # no head
    for g, w in zip(got, want):
        _close(g, w)


@pytest.mark.slow
def test_interpreted_kernels_fp16_and_torch_compile():
    """fp16 through the kernels within twice timm's own fp16 error; torch.compile(fullgraph) of the
    accelerated model traces the registered ops and equals the eager call."""
    interpreted()
    m = _timm(num_classes=10)
    x = images(1, 32, 32)
    with torch.no_grad():
        want = m(x)
        eager = copy.deepcopy(m).half()(x.half()).float()
        nk.accelerate(m.half(), kernels="triton")
        m.requires_grad_(False)
        got = m(x.half())
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True, backend="eager")(x.half())
    assert rel_err(got.float(), want) <= 2 * rel_err(eager, want) + 1e-3, (rel_err(got.float(), want), rel_err(eager, want))
    assert torch.equal(compiled, got)


# ----------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gpu_every_variant_fp16_and_backbone(variant):
    """fp16 logits within twice timm eager fp16's error (kernels="auto": the C runtime where built,
    automatic CUDA graphs from the second call), a backbone's maps likewise, torch.compile."""
    m = _timm(VARIANTS[variant], num_classes=1000).cuda()
    x = images(4, 224, 224).cuda()
    with torch.no_grad():
        want = m(x)
        eager = copy.deepcopy(m).half()(x.half()).float()
        nk.accelerate(m.half())
        m.requires_grad_(False)
        outs = [m(x.half()) for _ in range(3)]
        compiled = torch.compile(m, fullgraph=True)(x.half())
    for got in outs + [compiled]:
        assert rel_err(got.float(), want) <= 2 * rel_err(eager, want) + 1e-3, (rel_err(got.float(), want), rel_err(eager, want))
    b = _timm(VARIANTS[variant], features_only=True, out_indices=(1, 2, 3)).cuda()
    with torch.no_grad():
        want = b(x)
        eager = copy.deepcopy(b).half()(x.half())
        nk.accelerate(b.half())
        got = b(x.half())
    for g, w, e in zip(got, want, eager):
        assert rel_err(g.float(), w) <= 2 * rel_err(e.float(), w) + 1e-3
