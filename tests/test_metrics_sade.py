"""The public Spatial-MSMA code's lesion protocol (spmamba.metrics_sade): each step against hand-made volumes, and
the folder evaluation through `spmamba evaluate --protocol sade`."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from spmamba.io import save_volume
from spmamba.metrics import EvaluationError
from spmamba.metrics_sade import (ball, brain_masks, evaluate_sade, normal_values, post_process, volume_metrics,
                                  voxel_threshold)


def test_brain_mask_is_eroded_by_a_ball_of_radius_two():
    img = np.zeros((15, 15, 15))
    img[2:13, 2:13, 2:13] = 1.0
    brain, eroded = brain_masks(img)
    assert brain.sum() == 11 ** 3 and eroded.sum() == 7 ** 3  # a cube shrinks by 2 on each side
    assert ball(2).sum() == 33 and ball(1).sum() == 7


def test_post_processing_drops_small_18_connected_components_and_dilates():
    m = np.zeros((9, 9, 9), bool)
    m[1, 1, 1] = m[1, 2, 2] = True  # 2 voxels joined by an edge (18-connected): dropped (< 3)
    m[5, 5, 5] = m[6, 6, 5] = m[5, 6, 6] = True  # 3 voxels, edge-joined: kept
    m[7, 1, 1] = m[8, 2, 2] = m[7, 3, 3] = True  # corner-joined only: 3 single voxels, all dropped
    out = post_process(m)
    assert out.sum() == 3 and out[5, 5, 5] and not out[1, 1, 1] and not out[7, 1, 1]
    dil = post_process(m, dilate=True)  # each kept voxel grows by its 6 face neighbours
    offsets = [(0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    expected = {(x + a, y + b, z + c) for x, y, z in zip(*np.nonzero(out)) for a, b, c in offsets}
    assert set(zip(*(i.tolist() for i in np.nonzero(dil)))) == expected
    single = np.zeros((5, 5, 5), bool)
    single[2, 2, 1:4] = True
    assert post_process(single, dilate=True).sum() == 3 + 4 * 3 + 2  # a 3-voxel rod: +4 around each, +2 at the ends


def test_thresholds_at_a_voxel_false_positive_rate_of_normal_heatmaps():
    heat = np.arange(1.0, 11.0).reshape(1, 1, 10) + 5.0  # min 6
    eroded = np.ones_like(heat, bool)
    eroded[..., 0] = False
    vals = normal_values(heat, eroded)
    np.testing.assert_allclose(np.sort(vals), np.arange(1.0, 10.0))  # shifted to 0, the zero (minimum) left out
    t = voxel_threshold(np.arange(1.0, 101.0), 0.1)
    assert (np.arange(1.0, 101.0) > t).mean() == pytest.approx(0.1, abs=0.011)
    with pytest.raises(EvaluationError, match="no normal heatmap values"):
        voxel_threshold(np.array([]), 0.1)


def test_volume_metrics_count_as_the_code_and_measure_from_the_ground_truth():
    gt = np.zeros((20, 20, 20), bool)
    gt[2:5, 2:5, 2:5] = True  # lesion 1: found
    gt[12:15, 12:15, 12:15] = True  # lesion 2: missed
    pred = np.zeros_like(gt)
    pred[3:6, 3:6, 3:6] = True  # touches lesion 1
    pred[2:4, 15:18, 2:4] = True  # a false positive
    pred[16:18, 2:4, 16:18] = True  # another
    r = volume_metrics(pred, gt, spacing=(2.0, 2.0, 2.0))
    assert (r["tp"], r["fn"], r["fp"], r["n_gt"], r["n_pred"]) == (1, 1, 2, 2, 3)
    assert r["tpr"] == 0.5 and r["ppv"] == pytest.approx(1 / 3)  # TP / (TP + FP), the code's definition
    assert r["hd99_mm"] == pytest.approx(2 * r["hd99_vox"]) and r["msd_mm"] == pytest.approx(2 * r["msd_vox"])
    # directed from the ground truth: a prediction holding each lesion exactly is at distance 0 from it, whatever
    # else it predicts far away (the symmetric distance would see the false positives)
    extra = np.zeros_like(gt)
    extra[2:4, 15:18, 2:4] = extra[16:18, 2:4, 16:18] = True
    r2 = volume_metrics(gt | extra, gt)
    assert r2["hd99_vox"] < 1e-6 and r2["msd_vox"] < 1e-6 and r2["tpr"] == 1.0 and r2["fp"] == 2
    empty = volume_metrics(np.zeros_like(gt), gt)
    assert empty["tpr"] == 0.0 and math.isnan(empty["ppv"]) and math.isnan(empty["hd99_vox"])


def _folder(root, name, heats, images, masks=None):
    pred = root / name
    pred.mkdir()
    with open(pred / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "score"])
        for sid in heats:
            w.writerow([sid, 0.0])
    for sid, h in heats.items():
        save_volume(h.astype(np.float32), np.eye(4), pred / f"{sid}_anomaly.nii.gz")
        save_volume(images[sid].astype(np.float32), np.eye(4), root / f"{name}_images" / f"{sid}.nii.gz")
        if masks is not None:
            save_volume(masks[sid].astype(np.uint8), np.eye(4), root / f"{name}_masks" / f"{sid}.nii.gz")
    return pred, root / f"{name}_images", root / f"{name}_masks"


def test_folder_evaluation_and_the_cli(tmp_path, capsys):
    from spmamba.cli import main

    rng = np.random.default_rng(0)
    img = np.zeros((24, 24, 24))
    img[2:22, 2:22, 2:22] = 1.0
    normals = {f"n{i}": rng.random((24, 24, 24)) for i in range(3)}
    npred, nimg, _ = _folder(tmp_path, "normal", normals, {k: img for k in normals})
    lesion = np.zeros((24, 24, 24), bool)
    lesion[9:13, 9:13, 9:13] = True
    heat = rng.random((24, 24, 24))
    heat[lesion] += 5.0
    pred, images, masks = _folder(tmp_path, "test", {"a0": heat, "clean": rng.random((24, 24, 24))},
                                  {"a0": img, "clean": img}, {"a0": lesion, "clean": np.zeros_like(lesion)})
    res = evaluate_sade(pred, masks, images, npred, nimg)
    assert set(res["at_fpr"]) == {"0.05", "0.1"} and res["not_evaluated"] == ["clean"]
    assert res["thresholds"]["0.05"] > res["thresholds"]["0.1"]
    row = res["per_volume"]["0.05"][0]
    assert row["id"] == "a0" and row["tp"] == 1 and row["fn"] == 0
    assert row["hd99_vox"] <= 2.0  # the lesion found, its edge within the one-voxel dilation (and a diagonal)
    assert res["at_fpr"]["0.05"]["tpr"] == 1.0
    # the CLI: options checked, table and JSON written
    assert main(["evaluate", "--pred", str(pred), "--masks", str(masks), "--protocol", "sade", "-q"]) == 2
    assert "--protocol sade needs --images, --normal-pred, --normal-images" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(pred), "--masks", str(masks), "--voxel-fpr", "0.1", "-q"]) == 2
    assert "belong to --protocol sade" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(pred), "--masks", str(masks), "--protocol", "sade", "--images",
                 str(images), "--normal-pred", str(npred), "--normal-images", str(nimg), "--voxel-fpr", "0.02",
                 "-q"]) == 0
    out = capsys.readouterr().out
    assert "lesion TPR" in out and "0.02" in out
    saved = json.loads((pred / "metrics_sade.json").read_text())
    assert list(saved["at_fpr"]) == ["0.02"]
    assert main(["evaluate", "--pred", str(pred), "--masks", str(masks), "--protocol", "sade", "--images",
                 str(images), "--normal-pred", str(npred), "--normal-images", str(nimg), "--voxel-fpr", "1.5",
                 "-q"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
