"""Encoder BatchNorm adaptation (AdaBN) and intensity headroom: the two things a random offline encoder needs to see
lesions that differ from their surroundings only in brightness."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spmamba.io import Volume
from spmamba.models import SPMamba
from spmamba.models.encoder import ResNetEncoder
from spmamba.preprocessing import Preprocessing, normalise_intensity
from spmamba.train import train_detector


def _uniform(value: float, size: int = 64) -> torch.Tensor:
    return torch.full((1, 3, size, size), value)


def _interior_cosine(enc: ResNetEncoder, a: float, b: float) -> list[float]:
    """Mean cosine similarity between the features of two uniform images, away from the zero-padded border."""
    with torch.no_grad():
        fa, fb = enc(_uniform(a)), enc(_uniform(b))
    return [float(F.cosine_similarity(x, y, dim=1)[..., 1:-1, 1:-1].mean()) for x, y in zip(fa[:2], fb[:2])]


def _textured_batches(n: int = 3, size: int = 64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, size, size, generator=g) * 0.8 + 0.3 for _ in range(n)]


def test_random_encoder_is_blind_to_brightness_until_its_norm_is_adapted():
    torch.manual_seed(0)
    enc = ResNetEncoder("resnet18", "none")
    x = _textured_batches(1)[0]
    with torch.no_grad():
        # identity BatchNorm + bias-free convolutions + ReLU: f(2x) = 2 f(x) exactly up to layer1 (MONAI's
        # shortcut convolutions in layer2/3 carry a small bias), so a brighter region's features only scale
        assert torch.allclose(enc(2 * x)[0], 2 * enc(x)[0], rtol=1e-4, atol=1e-4)
        assert enc.adapt_batchnorm(_textured_batches()) == 24
        assert not any(torch.allclose(a2, 2 * a, rtol=1e-2, atol=1e-2) for a, a2 in zip(enc(x), enc(2 * x)))
    assert max(_interior_cosine(enc, 0.8, 1.6)) < 0.99


def test_adapted_statistics_are_the_data_averages_and_the_encoder_stays_frozen():
    torch.manual_seed(0)
    enc = ResNetEncoder("resnet18", "none")
    batches = _textured_batches(2)
    enc.adapt_batchnorm(batches)
    conv1, bn1 = enc.stem[0], enc.stem[1]
    with torch.no_grad():
        means = torch.stack([conv1(b).mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    assert torch.allclose(bn1.running_mean, means, atol=1e-5)
    assert not bn1.training and bn1.momentum == 0.1  # back to eval with the default momentum
    assert not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(ValueError, match="at least one batch"):
        enc.adapt_batchnorm([])


def _phantom(rng, shape=(24, 28, 6)):
    a = np.zeros(shape, np.float32)
    a[4:20, 5:23, :] = 1 + 0.1 * rng.standard_normal((16, 18, shape[2]))
    return a


@pytest.mark.parametrize("weights_norm, adapted", [("auto", True), ("frozen", False)])
def test_training_adapts_a_random_encoder_unless_told_not_to(weights_norm, adapted):
    rng = np.random.default_rng(0)
    vols = [Volume(_phantom(rng), np.diag([2.0, 2.0, 3.0, 1.0])) for _ in range(3)]
    det = train_detector(vols, config={**SPMamba("tiny").config.to_dict(), "encoder_norm": weights_norm},
                         epochs=1, max_steps=1)
    bn1 = det.model.encoder.stem[1]
    assert bool((bn1.running_mean.abs() > 0).any()) is adapted
    assert ("adapted on" in det.meta["training"]["encoder_norm"]) is adapted


def test_intensity_headroom_keeps_hyperintense_lesions_distinct():
    rng = np.random.default_rng(0)
    vol = np.zeros((40, 40, 40), np.float32)
    vol[5:35, 5:35, 5:35] = rng.uniform(100, 200, (30, 30, 30))
    vol[18:21, 18:21, 18:21] = 260.0  # a small focus 1.3x brighter than the brightest normal tissue
    norm, fg = normalise_intensity(vol)
    assert fg[20, 20, 20] and norm[20, 20, 20] > 1.2
    assert np.percentile(norm[fg], 50) < 1.0
    clipped, _ = normalise_intensity(vol, max_value=1.0)
    assert clipped.max() == 1.0
    with pytest.raises(ValueError, match="max_value"):
        normalise_intensity(vol, max_value=0.5)


def test_model_files_without_the_headroom_setting_keep_the_old_scaling():
    assert Preprocessing.from_dict({"slice_axis": 2}).intensity_max == 1.0
    assert Preprocessing.from_dict({}).intensity_max == Preprocessing().intensity_max == 2.0
