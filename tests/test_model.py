"""The reference model against timm's Next-ViT (the independent oracle), in fp32 on the CPU."""
import re

import pytest
import torch

import nextvit_kernels as nk
from _util import images, randomize_, rel_err

timm = pytest.importorskip("timm")

VARIANTS = ["nextvit_small", "nextvit_base", "nextvit_large"]
PARAMS = {"nextvit_small": 31_763_368, "nextvit_base": 44_818_856, "nextvit_large": 57_874_344}
# Gain 0.7 keeps activations O(1) through all variants while the logits still
# depend clearly on the input (checked in _inputs' assertion below).
GAIN = 0.7


def _timm(name):
    return randomize_(timm.create_model(name), gain=GAIN).eval()


def _inputs(h, w, b=2):
    return images(b, h, w)


@torch.no_grad()
def _check_logits(ours, ref, x, tol=1e-4):
    a, b = ours(x), ref(x)
    assert a.shape == b.shape
    assert (b[0] - b[1]).abs().max() > 1e-2 * b.abs().max(), "logits do not depend on the input: test is void"
    assert rel_err(a, b) < tol, rel_err(a, b)
    return a


@pytest.fixture(scope="module")
def small_pair():
    t = randomize_(timm.create_model("nextvit_small"), gain=GAIN).eval()
    m = nk.nextvit_small().eval()
    nk.load_checkpoint(m, t.state_dict())
    return m, t


@pytest.mark.parametrize("name", VARIANTS)
def test_param_counts(name):
    m = getattr(nk, name)()
    assert sum(p.numel() for p in m.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("size", [(224, 224), (192, 256), (230, 230)])
def test_logits_match_timm(name, size):
    t = _timm(name)
    m = getattr(nk, name)().eval()
    res = nk.load_checkpoint(m, t.state_dict())
    assert res.format == "timm" and not res.missing and not res.unexpected
    _check_logits(m, t, _inputs(*size))


@pytest.mark.parametrize("size", [(224, 224), (97, 131)])
def test_stage_features_match_timm(small_pair, size):
    m, t = small_pair
    x = _inputs(*size)
    with torch.no_grad():
        ours = m.forward_features(x)
        ref = t.forward_intermediates(x, intermediates_only=True)
    h, w = size
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape[1] == [96, 256, 512, 1024][i]
        assert a.shape[2:] == (-(-h // 2 ** (i + 2)), -(-w // 2 ** (i + 2)))
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-4, (i, rel_err(a, b))


def _official_dict(timm_model):
    m = nk.nextvit_small()
    nk.load_checkpoint(m, timm_model.state_dict())
    return m.state_dict()


def test_official_formats_and_plain_load_state_dict(small_pair, tmp_path):
    m_ref, t = small_pair
    official = _official_dict(t)
    assert len(official) == 472
    x = _inputs(224, 224)
    plain = nk.nextvit_small().eval()
    plain.load_state_dict(official)  # published names: plain strict loading works
    _check_logits(plain, t, x)
    torch.save({"model": official}, tmp_path / "wrapped.pth")
    for src in (official, {"model": official}, str(tmp_path / "wrapped.pth")):
        m = nk.nextvit_small().eval()
        res = nk.load_checkpoint(m, src)
        assert res.format == "official" and not res.merged and not res.missing and not res.unexpected
        _check_logits(m, t, x)


def test_timm_reparameterized_dict(small_pair):
    _, t = small_pair
    fused = _timm("nextvit_small")
    fused.load_state_dict(t.state_dict())
    for blk in fused.modules():
        if hasattr(blk, "reparameterize"):
            blk.reparameterize()
    sd = fused.state_dict()
    assert not any(".norm1." in k or ".norm2." in k for k in sd)
    m = nk.nextvit_small().eval()
    res = nk.load_checkpoint(m, sd)
    assert res.format == "timm" and res.merged and not res.missing and not res.unexpected
    _check_logits(m, t, _inputs(224, 224))


def test_backbone_dict(small_pair):
    _, t = small_pair
    official = _official_dict(t)
    extra = nk.nextvit_small(with_extra_norm=True)
    randomize_(extra.extra_norm_list)
    sd = {"backbone." + k: v for k, v in official.items() if not k.startswith(("norm.", "proj_head."))}
    sd.update({"backbone." + k: v for k, v in extra.state_dict().items() if k.startswith("extra_norm_list.")})
    sd["neck.lateral_convs.0.conv.weight"] = torch.zeros(4, 96, 1, 1)
    ckpt = {"meta": {"epoch": 12}, "state_dict": sd}
    x = _inputs(160, 160)
    with torch.no_grad():
        ref = t.forward_intermediates(x, intermediates_only=True)

    m = nk.nextvit_small().eval()
    res = nk.load_checkpoint(m, ckpt)
    assert res.format == "backbone"
    assert set(res.missing) >= {"proj_head.0.weight", "norm.weight"}
    assert "neck.lateral_convs.0.conv.weight" in res.unexpected
    assert any(k.startswith("extra_norm_list.") for k in res.unexpected)
    with torch.no_grad():
        for a, b in zip(m.forward_features(x), ref):
            assert rel_err(a, b) < 1e-4

    m2 = nk.nextvit_small(with_extra_norm=True).eval()
    res2 = nk.load_checkpoint(m2, ckpt)
    assert not any(k.startswith("extra_norm_list.") for k in res2.missing + res2.unexpected)
    with torch.no_grad():
        stage0 = m2.forward_features(x)[0]
        assert rel_err(stage0, extra.extra_norm_list[0].eval()(ref[0])) < 1e-4


def test_merge_bn_keeps_logits_and_round_trips(small_pair):
    m_ref, t = small_pair
    x = _inputs(224, 224)
    m = nk.nextvit_small().eval()
    nk.load_checkpoint(m, m_ref.state_dict())
    with torch.no_grad():
        before = m(x)
    m.merge_bn()
    assert m.is_bn_merged
    with torch.no_grad():
        after = m(x)
    assert rel_err(after, before) < 1e-5
    sd = m.state_dict()
    assert not any(re.match(r"features\.\d+\.(norm|norm1|norm2|e_mhsa\.norm)\.", k) for k in sd)
    assert any(k.endswith(".mhca.norm.weight") for k in sd)  # BatchNorms after a conv stay
    fresh = nk.nextvit_small().eval()
    res = nk.load_checkpoint(fresh, sd)
    assert res.merged and fresh.is_bn_merged and not res.missing and not res.unexpected
    with torch.no_grad():
        again = fresh(x)
    assert torch.equal(again, after), "merged state_dict reloaded must give identical outputs"
    _check_logits(fresh, t, x)


def test_checkpoint_errors(small_pair):
    _, t = small_pair
    official = _official_dict(t)
    bad = dict(official)
    bad["features.0.mlp.conv1.weight"] = torch.zeros(5, 96, 1, 1)
    with pytest.raises(ValueError, match=r"shape mismatch.*features\.0\.mlp\.conv1\.weight"):
        nk.load_checkpoint(nk.nextvit_small(), bad)
    with pytest.raises(ValueError, match=r"unknown checkpoint format.*encoder\.weight"):
        nk.load_checkpoint(nk.nextvit_small(), {"encoder.weight": torch.zeros(3)})
    partial = {k: v for k, v in official.items() if not k.startswith("features.1.norm.")}
    with pytest.raises(ValueError, match=r"features\.1\.norm\.weight"):
        nk.load_checkpoint(nk.nextvit_small(), partial)
    lacking = {k: v for k, v in official.items() if k != "features.2.mhca.projection.weight"}
    with pytest.raises(ValueError, match=r"missing.*features\.2\.mhca\.projection\.weight"):
        nk.load_checkpoint(nk.nextvit_small(), lacking)
    res = nk.load_checkpoint(nk.nextvit_small(), lacking, strict=False)
    assert res.missing == ["features.2.mhca.projection.weight"]
    with pytest.raises(ValueError, match="shape mismatch.*proj_head"):
        nk.load_checkpoint(nk.nextvit_small(num_classes=10), official)
    merged = nk.nextvit_small().merge_bn()
    with pytest.raises(ValueError, match="un-merged"):
        nk.load_checkpoint(merged, official)
    with pytest.raises(ValueError, match="no such file"):
        nk.load_checkpoint(nk.nextvit_small(), "/nonexistent/ckpt.pth")


def test_bad_inputs():
    m = nk.nextvit_small().eval()
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="3 input channels, got 4"):
        m(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="too small"):
        m(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="floating-point"):
        m(torch.zeros(1, 3, 64, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="too small"):
        m.forward_features(torch.randn(1, 3, 24, 24))
    with pytest.raises(ValueError, match="too small"):
        m(torch.randn(1, 3, 64, 8))  # stage 2 is 4x1 tokens, fewer than a 2x2 window
    with torch.no_grad():
        assert m(torch.randn(1, 3, 25, 25)).shape == (1, 1000)  # the smallest square input


def test_training_mode_autograd_and_drop_path():
    m = nk.nextvit_small(path_dropout=0.5).train()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    a = m(x)
    a.float().pow(2).mean().backward()
    params = [p for p in m.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in params)
    assert sum(p.grad.abs().sum().item() > 0 for p in params) > 0.9 * len(params)
    torch.manual_seed(1)
    with torch.no_grad():
        b = m(x)
    assert not torch.allclose(a, b), "drop path should make two training forwards differ"
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
