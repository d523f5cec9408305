"""Unregistered ("scanner") phantoms: own grid per subject, pose recorded, masks on their lesions, determinism, and
the default (registered) path unchanged."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from spmamba.data.synthetic import (ORIENTATIONS, SCANNER_POSE, load_template, make_dataset, make_subject)

SP = 6.0  # coarse grid keeps these tests to seconds; the default is 2 mm


def _world_centroid(img: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(img > 0).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def test_default_path_unchanged():
    # values made by the code before the scanner pose existed (main at 4c62633), same seed, index and spacing
    normal = make_subject(2, 3, abnormal=False, spacing=SP, role="test")
    abn = make_subject(2, 3, abnormal=True, family="infarct", spacing=SP, role="test")
    assert normal.image.shape == abn.image.shape == load_template(SP).shape == (30, 36, 31)
    assert float(normal.image.astype(np.float64).sum()) == pytest.approx(3273285.6689435244, rel=1e-9)
    assert float(abn.image.astype(np.float64).sum()) == pytest.approx(3253488.7239362, rel=1e-9)
    assert int(abn.mask.sum()) == 84
    assert "pose" not in abn.params
    explicit = make_subject(2, 3, abnormal=True, family="infarct", spacing=SP, role="test", pose="registered")
    np.testing.assert_array_equal(explicit.image, abn.image)
    np.testing.assert_array_equal(explicit.mask, abn.mask)
    np.testing.assert_array_equal(explicit.affine, load_template(SP).affine)


def test_unknown_pose():
    with pytest.raises(ValueError, match="unknown pose"):
        make_subject(0, 0, spacing=SP, pose="tilted")


def test_own_grid_and_pose_in_range():
    tpl = load_template(SP)
    shapes, orientations = set(), set()
    for i in range(6):
        s = make_subject(1, i, abnormal=False, spacing=SP, role="train", pose="scanner")
        p = s.params["pose"]
        assert s.image.shape == s.mask.shape == tuple(p["shape"])
        assert not np.allclose(s.affine, tpl.affine)
        assert np.allclose(np.abs(np.diag(s.affine)[:3]), SP)  # SP mm voxels, axis-aligned, some axes flipped
        assert np.sign(np.diag(s.affine)[:3]).tolist() == list(ORIENTATIONS[p["orientation"]])
        assert max(abs(a) for a in p["rotation_deg"]) <= SCANNER_POSE["max_rotation_deg"]
        assert max(abs(t) for t in p["shift_mm"]) <= SCANNER_POSE["max_shift_mm"]
        lo, hi = SCANNER_POSE["scale"]
        assert all(lo <= x <= hi for x in p["scale"])
        shapes.add(s.image.shape)
        orientations.add(p["orientation"])
        # the whole head is inside its field of view: every outer face is background
        for axis in range(3):
            for face in (0, -1):
                assert not (np.take(s.image, face, axis) > 0).any()
        # the recorded pose maps the template's brain onto this subject's brain (up to the warp)
        pose = np.asarray(p["template_to_scanner"])
        base = make_subject(1, i, abnormal=False, spacing=SP, role="train")  # registered twin: template frame
        moved = pose[:3, :3] @ _world_centroid(base.image, base.affine) + pose[:3, 3]
        assert np.linalg.norm(moved - _world_centroid(s.image, s.affine)) < 8.0
        unposed = _world_centroid(base.image, base.affine)
        if max(abs(t) for t in p["shift_mm"]) > 8.0:  # a real shift: the header alone does not align the brains
            assert np.linalg.norm(unposed - _world_centroid(s.image, s.affine)) > 4.0
    assert len(shapes) >= 4  # the field of view varies by subject
    assert len(orientations) >= 2


@pytest.mark.parametrize("family", ["tumour", "ms", "infarct", "haemorrhage"])
def test_mask_on_its_lesion(family):
    abn = make_subject(4, 2, abnormal=True, family=family, spacing=4.0, role="test", pose="scanner")
    twin = make_subject(4, 2, abnormal=False, spacing=4.0, role="test", pose="scanner")  # same pose and anatomy
    assert abn.params["pose"] == twin.params["pose"]
    np.testing.assert_array_equal(abn.affine, twin.affine)
    assert abn.lesion_voxels > 0 and abn.mask.shape == abn.image.shape
    assert (abn.image[abn.mask > 0] > 0).mean() > 0.9  # in the brain
    wm = np.median(twin.image[twin.image > 0])
    rel = np.abs(abn.image - twin.image)[abn.mask > 0].mean() / wm
    assert rel > 0.15  # the mask covers voxels whose intensity the lesion changed
    changed = np.abs(abn.image - twin.image) > 0.15 * wm
    if family != "tumour":  # (the tumour's mass effect moves tissue around it as well)
        dist = ndimage.distance_transform_edt(abn.mask == 0)
        assert changed[dist > 3].sum() == 0  # nothing changes away from the mask


def test_deterministic():
    a = make_subject(9, 5, abnormal=True, family="haemorrhage", spacing=SP, role="test", pose="scanner")
    b = make_subject(9, 5, abnormal=True, family="haemorrhage", spacing=SP, role="test", pose="scanner")
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.params == b.params
    c = make_subject(9, 6, abnormal=True, family="haemorrhage", spacing=SP, role="test", pose="scanner")
    assert c.params["pose"] != a.params["pose"]


def test_make_dataset_unregistered(tmp_path):
    root = tmp_path / "u"
    summary = make_dataset(root, n_train=2, n_test=4, seed=3, spacing=SP, progress=False, unregistered=True)
    assert summary["unregistered"] and summary["shape"] is None
    rows = list(csv.DictReader(open(root / "test" / "labels.csv")))
    assert list(rows[0]) == ["id", "abnormal", "family", "lesion_voxels", "n_lesions", "shape", "orientation",
                             "max_rotation_deg", "shift_mm", "scale_min", "scale_max", "warp_mm"]
    poses = json.loads((root / "poses.json").read_text())["subjects"]
    assert sorted(poses) == ["test/case-0000", "test/case-0001", "test/case-0002", "test/case-0003",
                             "train/normal-0000", "train/normal-0001"]
    shapes = set()
    for r in rows:
        img = nib.load(root / "test" / "images" / f"{r['id']}.nii.gz")
        msk = nib.load(root / "test" / "masks" / f"{r['id']}.nii.gz")
        assert img.shape == msk.shape == tuple(poses[f"test/{r['id']}"]["shape"])
        assert "x".join(map(str, img.shape)) == r["shape"]
        assert np.allclose(img.affine, msk.affine)
        assert int(np.asarray(msk.dataobj).sum()) == int(r["lesion_voxels"])
        assert (int(r["lesion_voxels"]) > 0) == (r["abnormal"] == "1")
        shapes.add(img.shape)
    for p in (root / "train").glob("*.nii.gz"):
        shapes.add(nib.load(p).shape)
    assert len(shapes) >= 3
    # the registered dataset keeps its layout: no pose file, the original columns
    make_dataset(tmp_path / "r", n_train=0, n_test=2, seed=3, spacing=SP, progress=False)
    assert not (tmp_path / "r" / "poses.json").exists()
    assert list(next(csv.DictReader(open(tmp_path / "r" / "test" / "labels.csv")))) == [
        "id", "abnormal", "family", "lesion_voxels", "n_lesions"]


def test_cli_synth_unregistered(tmp_path, capsys):
    from spmamba.cli import main

    rc = main(["synth", str(tmp_path / "c"), "--n-train", "1", "--n-test", "2", "--spacing", "8", "--unregistered",
               "-q"])
    assert rc == 0
    assert "unregistered" in capsys.readouterr().out
    assert (tmp_path / "c" / "poses.json").exists()
    assert len(list((tmp_path / "c" / "test" / "masks").glob("*.nii.gz"))) == 2
