import numpy as np
import pytest
import torch

from spmamba.models import PRESETS, SPMamba, get_config, prototype_distance, prototype_distance_loop
from spmamba.models.anomaly_maps import concentration_term, contrast_term, image_score
from spmamba.models.mamba_decoder import PatchExpand, SS2D, _lss_split


@pytest.mark.parametrize("B,H,K,C,w", [(2, 4, 3, 8, 3), (1, 8, 5, 16, 3), (3, 5, 2, 4, 5)])
def test_prototype_distance_equals_published_loop(B, H, K, C, w):
    g = torch.Generator().manual_seed(B * H)
    feats = torch.randn(B, H, H, C, generator=g, dtype=torch.float64)
    protos = torch.randn(H * H, K, C, generator=g, dtype=torch.float64)
    fast = prototype_distance(feats, protos, w)
    ref = prototype_distance_loop(feats, protos, w)
    assert fast.shape == (B, H, H)
    torch.testing.assert_close(fast, ref)


def test_prototype_distance_is_zero_when_a_prototype_sits_in_the_window():
    feats = torch.randn(1, 4, 4, 6)
    protos = torch.randn(16, 2, 6)
    protos[5, 1] = feats[0, 2, 2] * 3.0  # position (1,1) has (2,2) in its 3x3 window; cosine ignores scale
    d = prototype_distance(feats, protos, 3)
    assert d[0, 1, 1].abs() < 1e-6
    with pytest.raises(ValueError, match="do not fit"):
        prototype_distance(feats, torch.randn(9, 2, 6))


def test_patch_expand_shapes():
    pe = PatchExpand(16)
    assert pe(torch.randn(2, 4, 4, 32)).shape == (2, 8, 8, 16)


def test_lss_split_follows_mambaad():
    assert [_lss_split(d) for d in (3, 4, 6, 3)] == [[3], [2, 2], [3, 3], [3]]
    assert _lss_split(1) == [1]


def test_ss2d_uses_ch_order_and_directions_are_distinct():
    m = SS2D(8, 8, scan="ch", n_directions=8, d_state=4)
    assert m.perms.shape == (8, 64)
    assert len({tuple(p.tolist()) for p in m.perms}) == 8
    y = m(torch.randn(2, 8, 8, 8))
    assert y.shape == (2, 8, 8, 8)
    assert SS2D(8, 2, scan="ch", n_directions=8).scan_name == "hilbert"  # 2x2 maps have no CH order


def test_presets():
    paper = PRESETS["paper"]
    assert paper.image_size == 256 and paper.decoder_dims == (512, 256, 128, 64)
    assert paper.decoder_depths == (3, 4, 6, 3) and paper.n_prototypes == 5 and paper.prototype_window == 3
    assert paper.n_directions == 8 and paper.scan == "ch" and paper.encoder == "resnet34"
    assert paper.training.lr == pytest.approx(0.005)
    assert get_config(paper.to_dict()) == paper
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("huge")
    with pytest.raises(ValueError, match="power of two"):
        get_config("tiny", image_size=96)


def test_tiny_model_forward_backward_shapes():
    torch.manual_seed(0)
    m = SPMamba("tiny")
    S = m.config.image_size
    out = m(torch.rand(2, 1, S, S))
    assert [tuple(f.shape) for f in out.enc] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    assert [f.shape for f in out.dec] == [f.shape for f in out.enc]
    assert out.proto_distance.shape == (2, 2, 2)
    loss = m.loss(out)
    loss.backward()
    assert all(p.grad is None for p in m.encoder.parameters())  # the teacher is frozen
    assert m.prototypes.prototypes.grad is not None and m.prototypes.prototypes.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.decoder.parameters())
    maps = m.anomaly_map(out)
    assert maps.shape == (2, S, S)
    assert m.image_score(maps).shape == (2,)
    m.train()
    assert not m.encoder.training  # stays in eval mode


@pytest.mark.slow
def test_paper_preset_forward_shapes():
    m = SPMamba("paper").eval()
    with torch.inference_mode():
        out = m(torch.rand(1, 1, 256, 256))
    assert [tuple(f.shape[1:]) for f in out.dec] == [(64, 64, 64), (128, 32, 32), (256, 16, 16)]
    assert out.proto_distance.shape == (1, 8, 8)
    assert m.prototypes.prototypes.shape == (64, 5, 512)


def test_score_terms_follow_the_formula():
    maps = torch.zeros(1, 9, 9, dtype=torch.float64)
    maps[0, 4, 4] = 1.0
    # concentration: mean over pixels of distance to the peak * (A(p) - A(p*))^2
    r, c = np.meshgrid(np.arange(9), np.arange(9), indexing="ij")
    dist = np.sqrt((r - 4) ** 2 + (c - 4) ** 2)
    expected_k = (dist * 1.0).sum() / 81
    assert concentration_term(maps).item() == pytest.approx(expected_k)
    assert contrast_term(maps).item() > 0
    s = image_score(maps, beta=2.0, gamma=-0.5)
    assert s.item() == pytest.approx(1.0 + 2.0 * contrast_term(maps).item() - 0.5 * expected_k)
    assert image_score(maps, use_terms=False).item() == 1.0
