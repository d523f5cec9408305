"""Metrics on hand-made cases whose answers are known in closed form."""
from __future__ import annotations

import math

import numpy as np
import pytest

from spmamba.metrics import (LesionMetricAccumulator, PixelMetricAccumulator, aupro_from_regions, f1_max,
                             image_metrics, lesion_metrics, operating_point)


def test_image_metrics_known_values():
    # The scikit-learn documentation example: AUROC 0.75, AP 0.8333.
    m = image_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert m["auroc"] == pytest.approx(0.75)
    assert m["ap"] == pytest.approx(0.8333, abs=1e-4)
    # thresholds 0.8 -> F1 2/3, 0.4 -> 1/2, 0.35 -> P 2/3, R 1 -> F1 0.8
    assert m["f1_max"] == pytest.approx(0.8)
    assert m["f1_threshold"] == pytest.approx(0.35)


def test_image_metrics_one_class_is_nan():
    m = image_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(m["auroc"]) and "note" in m


def test_operating_point():
    op = operating_point([1, 1, 0, 0, 0], [1, 0, 1, 0, 0])
    assert op["sensitivity"] == pytest.approx(0.5)
    assert op["specificity"] == pytest.approx(2 / 3)
    assert op["fpr"] == pytest.approx(1 / 3)


def _cube(shape, lo, hi):
    m = np.zeros(shape, dtype=np.uint8)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return m


def test_pixel_metrics_perfect_heatmap():
    mask = _cube((10, 10, 10), (2, 2, 2), (5, 5, 5))
    acc = PixelMetricAccumulator()
    acc.add(mask.astype(np.float32), mask)
    acc.add(np.zeros((10, 10, 10), np.float32), np.zeros((10, 10, 10), np.uint8))  # a normal volume
    out = acc.compute()
    assert out["exact"] is True
    assert out["auroc"] == pytest.approx(1.0)
    assert out["ap"] == pytest.approx(1.0)
    assert out["aupro"] == pytest.approx(1.0)
    assert out["best_dice"] == pytest.approx(1.0)
    assert out["n_regions"] == 1 and out["n_voxels"] == 2000


def test_best_dice_known_value():
    # 8 lesion voxels scored 1, 8 normal voxels also scored 1, all else 0: best Dice = 2*8/(16+8) = 2/3.
    mask = _cube((6, 6, 6), (0, 0, 0), (2, 2, 2))
    heat = mask.astype(np.float32).copy()
    heat[4:6, 4:6, 4:6] = 1.0
    out = PixelMetricAccumulator()
    out.add(heat, mask)
    res = out.compute()
    assert res["best_dice"] == pytest.approx(2 / 3)
    assert res["best_dice_threshold"] == pytest.approx(1.0)
    # AUROC: positives all 1, negatives: 8 at 1 (ties count 1/2), 200 at 0 -> (200 + 8 * 0.5) / 208
    assert res["auroc"] == pytest.approx((200 + 4) / 208)


def test_aupro_half_the_regions_found():
    # Two lesions: one scored above every normal voxel, one below: PRO = 0.5 over the whole FPR range.
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    mask[8:10, 8:10, 8:10] = 1
    heat = np.zeros(mask.shape, np.float32)
    heat[1:3, 1:3, 1:3] = 1.0
    heat[8:10, 8:10, 8:10] = -1.0
    acc = PixelMetricAccumulator()
    acc.add(heat, mask)
    assert acc.compute()["aupro"] == pytest.approx(0.5)


def test_aupro_linear_case():
    # One region, scores uniform on [0, 1) scale with FPR: negatives 0..99 / 100, region all at 0.5
    # -> PRO jumps to 1 once FPR reaches 0.5 > 0.3, so AUPRO (to 0.3) = 0.
    neg = np.arange(100) / 100.0
    assert aupro_from_regions(neg, np.ones(100), [np.full(5, 0.5)]) == pytest.approx(0.0)
    # Region at 0.8: PRO = 1 from FPR 0.2 on -> area (0.3 - 0.2) * 1 + ramp between (FPR .19, 0)-(.2, 1)?
    # The threshold 0.8 gives FPR 0.2 and PRO 1 at the same point; the previous point is (0.19, 0):
    # area = 0.5 * 0.01 * 1 + 0.1 * 1 = 0.105 -> / 0.3 = 0.35
    assert aupro_from_regions(neg, np.ones(100), [np.full(5, 0.8)]) == pytest.approx(0.35)


def test_sampling_is_close_to_exact():
    rng = np.random.default_rng(0)
    exact, sampled = PixelMetricAccumulator(), PixelMetricAccumulator(max_negatives_per_volume=3000,
                                                                      max_samples=20000, seed=1)
    for _ in range(6):
        mask = np.zeros((30, 30, 30), np.uint8)
        c = rng.integers(5, 25, size=3)
        mask[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 3:c[2] + 3] = 1
        heat = rng.normal(size=mask.shape).astype(np.float32) + 1.5 * mask
        exact.add(heat, mask)
        sampled.add(heat, mask)
    a, b = exact.compute(), sampled.compute()
    assert a["exact"] and not b["exact"]
    assert b["n_samples"] < 30000
    for k, tol in (("auroc", 0.01), ("ap", 0.03), ("aupro", 0.03), ("best_dice", 0.03)):
        assert b[k] == pytest.approx(a[k], abs=tol), k


def test_pixel_region_restricts_voxels():
    mask = _cube((8, 8, 8), (0, 0, 0), (2, 2, 2))
    heat = mask.astype(np.float32)
    heat[6:, 6:, 6:] = 5.0  # a hot spot outside the region of interest
    region = np.ones(mask.shape, bool)
    region[5:, 5:, 5:] = False
    acc = PixelMetricAccumulator()
    acc.add(heat, mask, region)
    assert acc.compute()["auroc"] == pytest.approx(1.0)


def test_lesion_tpr_ppv():
    gt = np.zeros((20, 20, 20), np.uint8)
    gt[2:5, 2:5, 2:5] = 1          # found
    gt[14:17, 14:17, 14:17] = 1    # missed
    heat = np.zeros(gt.shape, np.float32)
    heat[3:6, 3:6, 3:6] = 1.0      # overlaps the first lesion
    heat[10:12, 2:4, 2:4] = 1.0    # a false positive region
    r = lesion_metrics(heat, gt, threshold=0.5)
    assert (r["n_gt"], r["n_gt_detected"], r["n_pred"], r["n_pred_true"]) == (2, 1, 2, 1)
    acc = LesionMetricAccumulator(threshold=0.5)
    acc.add(heat, gt)
    acc.add(np.zeros_like(heat), np.zeros_like(gt))  # a normal volume, clean prediction
    out = acc.compute()
    assert out["tpr"] == pytest.approx(0.5) and out["ppv"] == pytest.approx(0.5)
    # min_region_voxels drops the 8-voxel false positive (the true one has 27 voxels)
    r2 = lesion_metrics(heat, gt, threshold=0.5, min_region_voxels=10)
    assert (r2["n_pred"], r2["n_pred_true"]) == (1, 1)


def test_surface_distances_known_values():
    gt = np.zeros((12, 12, 12), np.uint8)
    gt[2, 5, 5] = 1
    pred = np.zeros_like(gt, dtype=np.float32)
    pred[5, 5, 5] = 1.0  # 3 voxels away along axis 0, spacing 2 mm -> 6 mm
    r = lesion_metrics(pred, gt, threshold=0.5, spacing=(2.0, 1.0, 1.0))
    assert r["hd99_mm"] == pytest.approx(6.0)
    assert r["msd_mm"] == pytest.approx(6.0)
    assert r["dice"] == 0.0
    same = lesion_metrics(_cube((12, 12, 12), (3, 3, 3), (8, 8, 8)).astype(np.float32),
                          _cube((12, 12, 12), (3, 3, 3), (8, 8, 8)), threshold=0.5)
    assert same["hd99_mm"] == pytest.approx(0.0) and same["msd_mm"] == pytest.approx(0.0)
    assert same["dice"] == pytest.approx(1.0)


def test_empty_prediction_reports_nan_distances():
    gt = _cube((8, 8, 8), (2, 2, 2), (4, 4, 4))
    r = lesion_metrics(np.zeros(gt.shape, np.float32), gt, threshold=0.5)
    assert math.isnan(r["hd99_mm"]) and r["n_gt_detected"] == 0
    acc = LesionMetricAccumulator(threshold=0.5)
    acc.add(np.zeros(gt.shape, np.float32), gt)
    out = acc.compute()
    assert out["n_abnormal_with_empty_prediction"] == 1 and math.isnan(out["ppv"])


def test_f1_max_weighted_equals_repeated():
    y = np.array([0, 1, 0, 1, 1])
    s = np.array([0.2, 0.9, 0.6, 0.4, 0.7])
    w = np.array([3, 1, 2, 1, 1])
    f_w, t_w = f1_max(y, s, sample_weight=w)
    f_r, t_r = f1_max(np.repeat(y, w), np.repeat(s, w))
    assert f_w == pytest.approx(f_r) and t_w == pytest.approx(t_r)
