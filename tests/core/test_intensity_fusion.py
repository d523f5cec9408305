"""Intensity fusion (issue 10): the position-normalised model map fused with the |z| map of the voxel intensities
against the normals at that position (``scoring.fuse_maps``, ``Detector.intensity_stats``)."""
import numpy as np
import pytest
import torch

from core_helpers import small_volumes
from spmamba.baselines import position_normalise, zscore_heatmap
from spmamba.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from spmamba.detector import DEFAULT_FUSION, Detector, search_voxels
from spmamba.preprocessing import prepare_slices
from spmamba.scoring import FUSIONS, fuse_maps, smooth_within_mask
from spmamba.train import train_detector


def test_fuse_maps_formulas_clip_negatives_and_refuse_bad_input():
    m = np.array([[4.0, 0.0, 1.0, -2.0]], np.float32)
    i = np.array([[1.0, 9.0, 1.0, 4.0]], np.float32)
    np.testing.assert_allclose(fuse_maps(m, i, "geometric"), [[2.0, 0.0, 1.0, 0.0]])
    np.testing.assert_allclose(fuse_maps(m, i, "mean"), [[2.5, 4.5, 1.0, 2.0]])
    np.testing.assert_allclose(fuse_maps(m, i, "max"), [[4.0, 9.0, 1.0, 4.0]])
    assert all(fuse_maps(m, i, f).dtype == np.float32 for f in FUSIONS)
    # geometric: the ranking of voxels does not depend on either map's scale
    rng = np.random.default_rng(0)
    a, b = rng.random(50), rng.random(50)
    np.testing.assert_array_equal(np.argsort(fuse_maps(a, b)), np.argsort(fuse_maps(3.0 * a, 0.2 * b)))
    with pytest.raises(ValueError, match="shapes"):
        fuse_maps(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="unknown fusion 'sum'"):
        fuse_maps(m, i, "sum")


def _trained(fusion=None, position_normalise=True, method=None, **kwargs):
    torch.manual_seed(0)
    return train_detector(small_volumes(4), method=method, config="tiny" if method is None else None, max_steps=1,
                          device="cpu", position_normalise=position_normalise, fusion=fusion, **kwargs)


def test_training_fits_the_default_fusion_and_detection_applies_it(tmp_path):
    det = _trained()
    assert det.intensity_stats is not None and det.fusion == DEFAULT_FUSION == "geometric"
    assert det.intensity_stats.n == det.position_stats.n == 3  # the training share of the 4 normals
    assert det.intensity_stats.mean.shape == det.position_stats.mean.shape
    assert det.meta["training"]["fusion"] == "geometric"
    assert det.intensity_search_mm == Detector.INTENSITY_SEARCH_MM == 4.0
    assert det.meta["training"]["intensity_search_mm"] == 4.0
    v = small_volumes(1, seed=5)[0]
    a = v.array.copy()
    a[10:12, 12:14, 2:4] = 1.8  # a bright focus (0.5% of the box: above its 99th percentile landmark)
    res = det.detect(a, v.affine)

    # the same map by hand: the model's map, smoothed, position-normalised, fused with the intensity |z| map
    prep = det.preprocessing
    norm, fg, keep, canon = prepare_slices(a, v.affine, prep)
    heat, _, _ = det._model_maps(norm, fg, keep, canon, None)
    heat = smooth_within_mask(heat, fg, prep.heatmap_sigma_mm / canon.spacing_slice_first(prep.slice_axis))
    zm = position_normalise(heat, det.position_stats, fg)
    spacing = canon.spacing_slice_first(prep.slice_axis)
    assert search_voxels(4.0, spacing) == [1, 2, 2]  # 4 mm on 3 mm slices and 2 mm rows and columns
    zi = zscore_heatmap(norm, fg, det.intensity_stats, [Detector.INTENSITY_SMOOTH_MM / s for s in spacing],
                        search=[1, 2, 2])
    expected = canon.to_file_order(np.moveaxis(fuse_maps(zm, zi, "geometric"), 0, prep.slice_axis))
    np.testing.assert_allclose(res.heatmap, expected, rtol=1e-5, atol=1e-6)
    zi_file = canon.to_file_order(np.moveaxis(zi, 0, prep.slice_axis))
    focus = np.zeros(a.shape, bool)
    focus[10:12, 12:14, 2:4] = True
    inside = zi_file > 0
    assert zi_file[focus].mean() > 3 * zi_file[inside & ~focus].mean()  # the bright focus stands out in z_i

    # saved and loaded: the same maps and version; the fusion is part of the version
    path = det.save(tmp_path / "fused.pt")
    loaded = Detector.load(path, device="cpu")
    assert loaded.fusion == "geometric" and loaded.version == det.version and loaded.intensity_search_mm == 4.0
    np.testing.assert_array_equal(loaded.intensity_stats.std, det.intensity_stats.std)
    np.testing.assert_array_equal(loaded.intensity_stats.support, det.intensity_stats.support)
    np.testing.assert_allclose(loaded.detect(a, v.affine).heatmap, res.heatmap, rtol=1e-5, atol=1e-6)
    v0 = loaded.version
    loaded.fusion = "mean"
    loaded.invalidate_version()
    assert loaded.version != v0
    np.testing.assert_allclose(loaded.detect(a, v.affine).heatmap,
                               canon.to_file_order(np.moveaxis(fuse_maps(zm, zi, "mean"), 0, prep.slice_axis)),
                               rtol=1e-5, atol=1e-6)


def test_fusion_none_and_methods_that_do_not_fuse():
    off = _trained(fusion="none")
    assert off.intensity_stats is None and off.position_stats is not None
    assert off.meta["training"]["fusion"] == "none"
    mean = _trained(fusion="mean")
    assert mean.fusion == "mean" and mean.intensity_stats is not None
    # no position statistics, no fusion by default; asking for one is refused with the reason
    plain = _trained(position_normalise=False)
    assert plain.intensity_stats is None and plain.position_stats is None
    with pytest.raises(ValueError, match="needs position-aware normalisation"):
        _trained(fusion="geometric", position_normalise=False)
    with pytest.raises(ValueError, match="unknown fusion 'sum'"):
        _trained(fusion="sum")
    # the voxel-wise method's map is the intensity |z| map already: it does not fuse by default
    vw = train_detector(small_volumes(4), method="voxelwise", device="cpu", position_normalise=True)
    assert vw.position_stats is not None and vw.intensity_stats is None


def test_fit_position_stats_switches_fusion_on_and_off():
    det = _trained(fusion="none")
    det.fit_position_stats(small_volumes(3, seed=2), fusion="max")
    assert det.fusion == "max" and det.intensity_stats is not None
    det.fit_position_stats(small_volumes(3, seed=2))
    assert det.intensity_stats is None
    with pytest.raises(ValueError, match="unknown fusion"):
        det.fit_position_stats(small_volumes(3, seed=2), fusion="sum")


def test_files_with_an_unknown_fusion_or_intensity_statistics_alone_are_refused(tmp_path):
    det = _trained()
    payload = det.checkpoint_payload()
    payload["intensity_stats"]["fusion"] = "harmonic"
    save_checkpoint(tmp_path / "bad.pt", payload)
    with pytest.raises(CheckpointError, match="unknown intensity fusion 'harmonic'"):
        Detector.load(tmp_path / "bad.pt", device="cpu")
    payload = det.checkpoint_payload()
    del payload["position_stats"]
    save_checkpoint(tmp_path / "alone.pt", payload)
    with pytest.raises(CheckpointError, match="without position statistics"):
        Detector.load(tmp_path / "alone.pt", device="cpu")
    # a file written before fusion existed has no intensity statistics and no fusion
    payload = det.checkpoint_payload()
    del payload["intensity_stats"]
    save_checkpoint(tmp_path / "old.pt", payload)
    old = Detector.load(tmp_path / "old.pt", device="cpu")
    assert old.intensity_stats is None
    assert "intensity_stats" not in load_checkpoint(tmp_path / "old.pt")


def test_the_intensity_search_distance_is_a_setting_of_the_model_and_old_files_keep_the_plain_map(tmp_path):
    det = _trained()
    v = small_volumes(1, seed=5)[0]
    searched = det.detect(v.array, v.affine).heatmap
    # a training without the search, and the same model switched off by hand: the plain |z| map, another version
    plain = _trained(intensity_search_mm=0)
    assert plain.intensity_search_mm == 0.0 and plain.meta["training"]["intensity_search_mm"] == 0.0
    assert plain.version != det.version
    np.testing.assert_array_equal(plain.intensity_stats.mean, det.intensity_stats.mean)
    flat = plain.detect(v.array, v.affine).heatmap
    assert np.all(searched <= flat + 1e-5) and searched.sum() < flat.sum()  # the search only ever lowers |z|
    # a file written before the search existed: no search_mm -> the plain map, and the version it always had
    payload = plain.checkpoint_payload()
    del payload["intensity_stats"]["search_mm"]
    save_checkpoint(tmp_path / "before.pt", payload)
    before = Detector.load(tmp_path / "before.pt", device="cpu")
    assert before.intensity_search_mm == 0.0 and before.version == plain.version
    np.testing.assert_allclose(before.detect(v.array, v.affine).heatmap, flat, rtol=1e-6, atol=1e-6)
    payload["intensity_stats"]["search_mm"] = -2.0
    save_checkpoint(tmp_path / "bad.pt", payload)
    with pytest.raises(CheckpointError, match="search distance -2.0"):
        Detector.load(tmp_path / "bad.pt", device="cpu")
    # refused where it cannot apply, and with a bad distance
    with pytest.raises(ValueError, match="applies to the fused intensity map"):
        _trained(fusion="none", intensity_search_mm=4.0)
    with pytest.raises(ValueError, match=">= 0 mm"):
        _trained(intensity_search_mm=-1.0)
