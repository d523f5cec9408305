import numpy as np
import pytest
import torch

from spmamba.baselines import (VoxelwiseBaseline, VoxelwiseStats, position_normalise, search_zscore, topk_mean,
                               zscore_heatmap)
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


def test_search_zscore_forgives_a_one_voxel_misregistration_and_keeps_a_one_voxel_focus():
    # the normals' anatomy: a bright tissue (1.0) beside a dark one (0.3) at x = 8, every voxel's std 0.05
    mean = np.full((16, 12, 10), 0.3, np.float32)
    mean[:8] = 1.0
    stats = VoxelwiseStats(mean, np.full(mean.shape, 0.05, np.float32), 10)
    # a subject whose boundary sits one voxel off (x = 9), with a one-voxel focus inside the bright tissue
    subject = np.full(mean.shape, 0.3, np.float32)
    subject[:9] = 1.0
    subject[4, 6, 5] = 1.5
    plain = search_zscore(subject, stats, 0)
    np.testing.assert_array_equal(plain, np.abs(stats.zscore(subject)))
    assert plain[8].min() == pytest.approx(14.0)  # the shifted boundary: the plain z-score's highest values
    z = search_zscore(subject, stats, 1)
    assert z.dtype == np.float32 and z.shape == subject.shape and np.all(z <= plain + 1e-6)
    assert np.abs(z[8]).max() == pytest.approx(0.0, abs=1e-5)  # some neighbour holds the bright tissue
    assert z[4, 6, 5] == pytest.approx(10.0)  # the focus departs from every tissue nearby: kept in full
    assert np.count_nonzero(z > 1.0) == 1
    # the search is per axis: without a search along x the shifted boundary stays
    assert search_zscore(subject, stats, (0, 1, 1))[8].min() == pytest.approx(14.0)
    # signed (for maps where only high is abnormal): a dark voxel is below every neighbour's normal
    dark = subject.copy()
    dark[4, 2, 2] = 0.5
    signed = search_zscore(dark, stats, 1, absolute=False)
    assert signed[4, 2, 2] == pytest.approx(-10.0) and signed[4, 6, 5] == pytest.approx(10.0)
    assert position_normalise(dark, stats, search=1)[4, 2, 2] == 0.0
    # through the heatmap: the search comes before the smoothing and the support
    np.testing.assert_allclose(zscore_heatmap(subject, np.ones(mean.shape, bool), stats, 0, search=1), z)
    # a radius beyond the grid (a single slice) searches the grid there is
    one_slice = VoxelwiseStats(mean[:, :, :1], stats.std[:, :, :1], 10)
    np.testing.assert_array_equal(search_zscore(subject[:, :, :1], one_slice, (1, 1, 3)), z[:, :, :1])
    with pytest.raises(ValueError, match="search radius must be >= 0"):
        search_zscore(subject, stats, -1)
    with pytest.raises(ValueError, match="one common grid"):
        search_zscore(subject[:4], stats, 1)


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


def test_support_is_where_most_normals_have_foreground_and_nothing_outside_is_judged():
    """(array, foreground) pairs give the statistics a support (foreground in >= half of the normals); maps are 0
    outside it, where the statistics would compare one subject's tissue with the others' background."""
    rng = np.random.default_rng(3)
    fgs = []
    for i in range(4):
        fg = np.zeros((6, 6, 2), bool)
        fg[1:5, 1:5] = True
        if i == 0:
            fg[5, :, :] = True  # one subject's brain reaches a row no other covers
        if i < 2:
            fg[0, :, :] = True  # two of four (a half) cover row 0
        fgs.append(fg)
    maps = [np.where(fg, rng.normal(1.0, 0.1, fg.shape), 0.0) for fg in fgs]
    st = VoxelwiseStats.fit(zip(maps, fgs))
    expected = np.zeros((6, 6, 2), bool)
    expected[0:5, :, :] = True
    expected[5] = False
    expected[1:5, 0] = expected[1:5, 5] = False
    expected[1:5, 1:5] = True
    np.testing.assert_array_equal(st.support, expected)
    test = np.full((6, 6, 2), 5.0)  # far above normal everywhere
    z = position_normalise(test, st)
    assert z[5].max() == 0 and z[1:5, 1:5].min() > 0
    assert VoxelwiseStats.from_dict(st.to_dict()).support.tolist() == st.support.tolist()
    plain = VoxelwiseStats.fit(maps)  # arrays alone (statistics written before supports): every voxel judged
    assert plain.support is None and position_normalise(test, plain)[5].min() > 0
    with pytest.raises(ValueError, match="foreground"):
        VoxelwiseStats.fit([(maps[0], fgs[0]), maps[1]])


def test_voxelwise_method_keeps_to_the_support_and_reads_files_without_one(tmp_path):
    """The voxelwise method stores the normals' support; a model file written before it existed loads and detects
    as it did (every foreground voxel judged)."""
    from spmamba.checkpoint import save_checkpoint
    from spmamba.detector import Detector
    from spmamba.io import Volume
    from spmamba.train import train_detector

    rng = np.random.default_rng(4)

    def head(extra_row: bool = False):
        a = np.zeros((20, 20, 8), np.float32)
        a[3:17, 3:17, 1:7] = 1 + 0.05 * rng.standard_normal((14, 14, 6))
        if extra_row:
            a[17, 3:17, 1:7] = 1.0  # tissue where no normal has any
        return a

    aff = np.eye(4)
    det = train_detector([Volume(head(), aff) for _ in range(5)], method="voxelwise")
    support = det.model.support.numpy()
    assert support.any() and support.sum() < support.size
    res = det.detect(head(extra_row=True), aff)
    assert res.foreground[17, 3:17, 1:7].all() and res.heatmap[17].max() == 0
    payload = det.checkpoint_payload()
    del payload["state_dict"]["support"]  # as written before the support existed
    save_checkpoint(tmp_path / "old.pt", payload)
    old = Detector.load(tmp_path / "old.pt")
    assert old.model.support.numel() == 0
    assert old.detect(head(extra_row=True), aff).heatmap[17].max() > 0


def test_voxelwise_method_searches_by_default_and_files_without_the_setting_keep_the_plain_map(tmp_path):
    from spmamba.checkpoint import save_checkpoint
    from spmamba.cli import CLIError, config_with_settings
    from spmamba.detector import Detector
    from spmamba.io import Volume
    from spmamba.train import train_detector

    rng = np.random.default_rng(6)

    def head():
        a = np.zeros((20, 20, 8), np.float32)
        a[3:17, 3:17, 1:7] = 1 + 0.05 * rng.standard_normal((14, 14, 6))
        a[3:17, 10:17, 1:7] += 0.5  # a second tissue: a boundary inside
        return a

    aff = np.eye(4)
    det = train_detector([Volume(head(), aff) for _ in range(5)], method="voxelwise")
    assert det.config.search == 2
    x = np.roll(head(), 1, axis=1)  # the boundary one voxel off
    searched = det.detect(x, aff).heatmap
    payload = det.checkpoint_payload()
    del payload["config"]["search"]  # as written before the search existed
    save_checkpoint(tmp_path / "old.pt", payload)
    old = Detector.load(tmp_path / "old.pt")
    assert old.config.search == 0
    plain = old.detect(x, aff).heatmap
    assert plain[:, 10].max() > 3 * searched[:, 10].max()  # the shifted boundary: flagged only without the search
    assert config_with_settings("voxelwise", "default", {"search": 0}).search == 0
    with pytest.raises(CLIError, match="search is a whole number of voxels"):
        config_with_settings("voxelwise", "default", {"search": -1})


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
    assert det.position_stats.support is not None and det.position_stats.support.any()
    np.testing.assert_array_equal(loaded.position_stats.support, det.position_stats.support)
    np.testing.assert_allclose(loaded.detect(vols[0].array, aff).heatmap, res.heatmap, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="template grid"):
        det.detect(phantom((20, 28, 6)), aff)
