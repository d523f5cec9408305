"""Issue 10's accuracy changes, pinned: pooled variance in per-position statistics, intensity standardisation to
landmarks fitted on the normals, the anomaly map's level weights, and the learning-rate drop under a time limit."""
import time

import numpy as np
import pytest
import torch

from core_helpers import small_volumes
from spmamba.baselines import VoxelwiseStats
from spmamba.detector import Detector
from spmamba.models import SPMamba, get_config
from spmamba.models.anomaly_maps import feature_distance_map
from spmamba.models.config import SPMambaConfig
from spmamba.preprocessing import (LANDMARK_PERCENTILES, Preprocessing, fit_landmarks, intensity_landmarks,
                                   normalise_intensity, standardise_intensity)
from spmamba.train import TrainingBudget, fit, train_detector


# ------------------------------------------------------------------ pooled variance
def test_pooled_variance_is_the_neighbourhood_average_and_leaves_the_mean_alone():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(12, 12, 12)) for _ in range(5)]
    plain = VoxelwiseStats.fit(arrays, std_floor=0.0)
    pooled = VoxelwiseStats.fit(arrays, std_floor=0.0, pool_sigma=2.0)
    np.testing.assert_array_equal(pooled.mean, plain.mean)
    from scipy import ndimage

    expected = np.sqrt(ndimage.gaussian_filter(plain.std.astype(np.float64) ** 2, 2.0))  # no support: everywhere
    np.testing.assert_allclose(pooled.std, expected, rtol=1e-4)
    # a chance low-variance voxel no longer stands out: its z for a unit deviation falls back towards its neighbours'
    assert pooled.std.std() < 0.5 * plain.std.std()
    assert VoxelwiseStats.fit(arrays, std_floor=0.0, pool_sigma=0.0).std.tobytes() == plain.std.tobytes()


def test_pooling_stays_inside_the_support():
    """Background (no variance) outside the normals' support must not pull the rim's variance down."""
    fg = np.zeros((10, 10, 4), bool)
    fg[2:8, 2:8] = True
    rng = np.random.default_rng(1)
    pairs = [(np.where(fg, rng.normal(1.0, 0.2, fg.shape), 0.0), fg) for _ in range(6)]
    st = VoxelwiseStats.fit(pairs, std_floor=0.0, pool_sigma=3.0)
    rim = st.std[2, 2:8, :]
    centre = st.std[4:6, 4:6, :]
    assert rim.mean() == pytest.approx(centre.mean(), rel=0.2)  # ~0.2 everywhere inside, not halved at the rim


def test_position_statistics_of_a_detector_are_pooled(monkeypatch):
    seen = {}
    real_fit = VoxelwiseStats.fit.__func__

    def spy(cls, arrays, std_floor=0.5, pool_sigma=0.0):
        seen["pool"] = pool_sigma
        return real_fit(cls, arrays, std_floor, pool_sigma)

    monkeypatch.setattr(VoxelwiseStats, "fit", classmethod(spy))
    torch.manual_seed(0)
    det = Detector(SPMamba(get_config("tiny")), Preprocessing(), device="cpu")
    det.fit_position_stats(small_volumes(3))
    # 4 mm on 3 mm slices (the slice axis first) and 2 mm rows and columns
    assert seen["pool"] == pytest.approx([4.0 / 3.0, 2.0, 2.0])


# ------------------------------------------------------------------ intensity standardisation
def _contrast(a, knots):
    """A monotone piecewise-linear remap of intensities in [0, 1] (another scanner's contrast)."""
    return np.interp(a, np.linspace(0, 1, len(knots)), knots).astype(np.float32)


def test_standardisation_maps_another_contrast_back_onto_the_landmarks():
    rng = np.random.default_rng(2)
    fg = np.zeros((20, 20, 20), bool)
    fg[3:17, 3:17, 3:17] = True
    base = np.where(fg, rng.uniform(0.0, 1.0, fg.shape), 0.0).astype(np.float32)
    ref_norm, ref_fg = normalise_intensity(base)
    landmarks = fit_landmarks([(ref_norm, ref_fg)])
    assert [p for p, _ in landmarks] == list(LANDMARK_PERCENTILES)
    other = np.where(fg, _contrast(base, [0.0, 0.55, 0.7, 1.0]), 0.0)  # grey levels moved
    norm, f = normalise_intensity(other)
    assert np.abs(intensity_landmarks(norm, f) - [v for _, v in landmarks]).max() > 0.05
    std = standardise_intensity(norm, f, landmarks)
    np.testing.assert_allclose(intensity_landmarks(std, f), [v for _, v in landmarks], atol=0.01)
    assert np.all(std[~f] == norm[~f])  # outside the foreground nothing changes
    assert std.max() <= 2.0 and std.min() >= 0.0
    # monotone: the order of the voxels is kept
    order = np.argsort(norm[f], kind="stable")
    assert np.all(np.diff(std[f][order]) >= -1e-6)


def test_training_fits_landmarks_stores_them_and_detection_uses_them(tmp_path):
    vols = small_volumes(4)
    det = train_detector(vols, config="tiny", max_steps=1, device="cpu")
    lm = det.preprocessing.intensity_landmarks
    assert det.preprocessing.standardise and lm is not None and len(lm) == len(LANDMARK_PERCENTILES)
    assert det.meta["training"]["intensity_landmarks"] == lm
    path = det.save(tmp_path / "m.pt")
    loaded = Detector.load(path, device="cpu")
    assert loaded.preprocessing.intensity_landmarks == lm
    x = vols[0].array * 1.7 + 0.2  # another gain and offset: the same standardised slices
    a, b = loaded.detect(vols[0].array, vols[0].affine).heatmap, loaded.detect(x, vols[0].affine).heatmap
    np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, float(np.abs(a).max())))
    off = train_detector(vols, config="tiny", max_steps=1, device="cpu",
                         preprocessing=Preprocessing(standardise=False))
    assert off.preprocessing.intensity_landmarks is None


def test_model_files_written_before_standardisation_are_not_standardised():
    old = Preprocessing.from_dict({"slice_axis": 2, "min_foreground": 0.02, "batch_size": 16, "intensity_max": 2.0,
                                   "heatmap_sigma_mm": 2.0})
    assert old.standardise is False and old.intensity_landmarks is None
    assert Preprocessing().standardise is True


# ------------------------------------------------------------------ map level weights
def test_level_weights_select_levels_and_equal_weights_are_the_plain_mean():
    torch.manual_seed(0)
    enc = [torch.randn(2, c, s, s) for c, s in ((4, 8), (6, 4), (8, 2))]
    dec = [e + 0.3 * torch.randn_like(e) for e in enc]
    plain = feature_distance_map(enc, dec, 16)
    assert torch.equal(feature_distance_map(enc, dec, 16, (1.0, 1.0, 1.0)), plain)
    assert torch.equal(feature_distance_map(enc, dec, 16, (2.0, 2.0, 2.0)), plain)
    only1 = feature_distance_map(enc, dec, 16, (1.0, 0.0, 0.0))
    assert torch.allclose(only1, feature_distance_map(enc[:1], dec[:1], 16))
    mixed = feature_distance_map(enc, dec, 16, (3.0, 1.0, 0.0))
    assert torch.allclose(mixed, (3 * feature_distance_map(enc[:1], dec[:1], 16)
                                  + feature_distance_map(enc[1:2], dec[1:2], 16)) / 4, atol=1e-6)
    with pytest.raises(ValueError, match="level weights"):
        feature_distance_map(enc, dec, 16, (1.0, 0.0))


def test_fast_preset_maps_level1_paper_all_levels_and_old_files_keep_all():
    assert get_config("fast").map_level_weights == (1.0, 0.0, 0.0)
    assert get_config("paper").map_level_weights == (1.0, 1.0, 1.0)
    stored = get_config("fast").to_dict()
    assert stored["map_level_weights"] == [1.0, 0.0, 0.0]
    assert SPMambaConfig.from_dict(stored).map_level_weights == (1.0, 0.0, 0.0)
    del stored["map_level_weights"]  # a file written before the setting existed: the published plain mean
    assert SPMambaConfig.from_dict(stored).map_level_weights == (1.0, 1.0, 1.0)
    for bad in ((0.0, 0.0, 0.0), (1.0, -1.0, 0.0), (1.0, 1.0)):
        with pytest.raises(ValueError, match="map_level_weights"):
            get_config("fast", map_level_weights=bad)


def test_the_model_map_follows_its_level_weights():
    torch.manual_seed(0)
    m = SPMamba(get_config("tiny", map_level_weights=(1.0, 0.0, 0.0), use_prototypes=False,
                           map_blur_sigma=0.0)).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        out = m(x)
        np.testing.assert_allclose(m.anomaly_map(out), feature_distance_map(out.enc[:1], out.dec[:1], 64), atol=1e-6)


# ------------------------------------------------------------------ learning-rate drop under a time limit
class _StepClock:
    """``time`` for spmamba.train whose seconds pass only with the training steps (one per step), so that a time
    limit is reached after a known number of steps however loaded the machine is."""

    def __init__(self):
        self.now = time.time()

    def time(self):
        return self.now

    perf_counter = time

    def sleep(self, seconds):
        self.now += seconds


def _lr_trace(deadline_s, epochs=200, resume_state=None, max_steps=None, monkeypatch=None):
    import spmamba.train as train_module

    torch.manual_seed(0)
    clock = _StepClock()
    if monkeypatch is not None:
        monkeypatch.setattr(train_module, "time", clock)
    det = Detector(SPMamba(get_config("tiny")), Preprocessing(), device="cpu")
    data = torch.rand(8, 1, 64, 64)
    lrs = []

    def progress(e):
        if e.get("phase") == "train" and "lr" in e:
            lrs.append(e["lr"])
            clock.now += 1.0

    budget = TrainingBudget(deadline=None if deadline_s is None else clock.time() + deadline_s, progress=progress,
                            started=clock.time())
    state = fit(det, data, budget, total_epochs=epochs, max_steps=max_steps, prepare=False,
                resume_state=resume_state)
    return lrs, state


def test_a_time_limit_drops_the_learning_rate_once_at_80_percent_of_its_time(monkeypatch):
    lrs, state = _lr_trace(deadline_s=10.0, monkeypatch=monkeypatch)  # one step a second: 10 steps, the drop at 8
    base = get_config("tiny").training.lr
    assert 8 <= len(lrs) <= 11 and lrs[0] == pytest.approx(base)
    assert lrs[-1] == pytest.approx(base * 0.1)  # dropped once, not twice
    assert state.lr_drop_step is not None and 6 <= state.lr_drop_step <= 9 and state.lr_drop_step < state.steps
    assert all(lr in (pytest.approx(base), pytest.approx(base * 0.1)) for lr in lrs)
    # resumed from that state, the drop is not made again
    resumed, _ = _lr_trace(deadline_s=5.0, resume_state=state.training_state(state.epochs_done),
                           monkeypatch=monkeypatch)
    assert resumed and all(lr == pytest.approx(base * 0.1) for lr in resumed)


def test_without_a_time_limit_the_schedule_is_the_epoch_milestone():
    lrs, state = _lr_trace(deadline_s=None, epochs=5)
    base = get_config("tiny").training.lr
    assert state.lr_drop_step is None
    assert lrs[0] == pytest.approx(base) and lrs[-1] == pytest.approx(base * 0.1)  # epoch 4 of 5 (80%)
