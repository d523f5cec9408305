import numpy as np
import pytest
import torch

from spmamba.baselines import VoxelwiseBaseline, VoxelwiseStats, position_normalise, topk_mean
from spmamba.models import SPMamba, get_config


def test_voxelwise_stats_match_numpy_and_floor_std():
    rng = np.random.default_rng(0)
    arrs = [rng.normal(size=(4, 5, 3)) for _ in range(6)]
    arrs[0][0, 0, 0] = arrs[1][0, 0, 0] = 0.0
    st = VoxelwiseStats.fit(arrs, std_floor=0.0)
    np.testing.assert_allclose(st.mean, np.mean(arrs, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st.std, np.std(arrs, 0, ddof=1), rtol=1e-4, atol=1e-6)
    const = VoxelwiseStats.fit([np.zeros((2, 2)), np.zeros((2, 2)), np.ones((2, 2))], std_floor=0.5)
    assert np.all(const.std > 0)
    st2 = VoxelwiseStats.from_dict(st.to_dict())
    np.testing.assert_array_equal(st2.mean, st.mean)
    with pytest.raises(ValueError, match="one grid"):
        VoxelwiseStats.fit([np.zeros((2, 2)), np.zeros((3, 2))])
    with pytest.raises(ValueError, match="at least 2"):
        VoxelwiseStats.fit([np.zeros((2, 2))])
    with pytest.raises(ValueError, match="grid"):
        st.zscore(np.zeros((2, 2)))


def test_position_normalise_removes_a_fixed_hotspot_and_keeps_a_new_one():
    rng = np.random.default_rng(1)
    normal_maps = []
    for _ in range(8):
        m = rng.normal(0.1, 0.01, size=(8, 8, 4))
        m[1, 1, 1] += 1.0  # anatomy-driven hot spot present in every normal
        normal_maps.append(m)
    st = VoxelwiseStats.fit(normal_maps)
    test = rng.normal(0.1, 0.01, size=(8, 8, 4))
    test[1, 1, 1] += 1.0
    test[5, 5, 2] += 0.5  # a real anomaly, weaker than the hot spot in raw units
    z = position_normalise(test, st)
    assert np.unravel_index(np.argmax(z), z.shape) == (5, 5, 2)
    assert z.min() >= 0
    region = np.zeros_like(test, dtype=bool)
    assert position_normalise(test, st, region).max() == 0


def test_voxelwise_baseline_finds_a_bright_blob_and_topk():
    rng = np.random.default_rng(2)

    def vol():
        v = np.zeros((24, 24, 8), np.float32)  # lesion < 0.5% of the foreground: normalisation unchanged
        ramp = np.linspace(0.0, 1.0, 20)[:, None, None]  # anatomy: an intensity ramp, plus a little noise
        v[2:22, 2:22, 1:7] = 1.0 + ramp + 0.02 * rng.normal(size=(20, 20, 6))
        return v

    base = VoxelwiseBaseline(smooth_sigma=0.0, top_k=8).fit([vol() for _ in range(5)])
    normal_h, normal_s = base.detect(vol())
    ab = vol()
    ab[10:12, 6:8, 3:5] = 0.2  # dark lesion
    h, s = base.detect(ab)
    assert s > normal_s
    assert h[10:12, 6:8, 3:5].mean() > 3 * h[10:12, 12:14, 3:5].mean()
    assert h[0, 0, 0] == 0  # background stays 0
    assert topk_mean(np.arange(10.0), 3) == pytest.approx(8.0)
    with pytest.raises(RuntimeError):
        VoxelwiseBaseline().heatmap(vol())


def test_cnn_decoder_option_matches_encoder_levels_and_default_is_mamba():
    assert get_config("fast").decoder == "mamba"
    cfg = get_config("tiny", decoder="cnn", use_prototypes=False)
    m = SPMamba(cfg).eval()
    out = m(torch.rand(2, 1, 64, 64))
    assert [tuple(d.shape) for d in out.dec] == [tuple(e.shape) for e in out.enc]
    assert m.anomaly_map(out).shape == (2, 64, 64)
    with pytest.raises(ValueError, match="decoder"):
        get_config("tiny", decoder="transformer")


def test_detector_position_normalisation_round_trip(tmp_path):
    from spmamba.detector import Detector
    from spmamba.train import train_detector
    from spmamba.io import Volume

    rng = np.random.default_rng(0)

    def phantom(shape=(24, 28, 6)):
        a = np.zeros(shape, np.float32)
        a[4:20, 5:23, :] = 1 + 0.1 * rng.standard_normal((16, 18, shape[2]))
        return a

    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    vols = [Volume(phantom(), aff) for _ in range(4)]
    det = train_detector(vols, config="tiny", max_steps=1, position_normalise=True)
    assert det.position_stats is not None and det.position_stats.n == 3
    assert det.meta["training"]["position_normalise"] is True
    res = det.detect(vols[0].array, aff)
    assert res.heatmap.shape == vols[0].array.shape and res.heatmap.min() >= 0
    assert np.isfinite(det.calibration.pixel_threshold)
    path = det.save(tmp_path / "pn.pt")
    loaded = Detector.load(path)
    assert loaded.version == det.version
    np.testing.assert_array_equal(loaded.position_stats.std, det.position_stats.std)
    np.testing.assert_allclose(loaded.detect(vols[0].array, aff).heatmap, res.heatmap, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="template grid"):
        det.detect(phantom((20, 28, 6)), aff)
