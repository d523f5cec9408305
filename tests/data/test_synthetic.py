"""The MNI152-based phantoms: grid, determinism, lesion masks, dataset layout."""
from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from spmamba.data.synthetic import LESION_FAMILIES, load_template, make_dataset, make_subject

SP = 4.0  # coarse grid keeps these tests fast; the default is 2 mm


def test_template_grid():
    tpl = load_template(SP)
    assert len(tpl.shape) == 3 and all(20 < s < 80 for s in tpl.shape)
    assert np.allclose(np.diag(tpl.affine)[:3], SP)
    # the grid covers the MNI brain (origin near the anterior commissure is inside)
    origin_vox = np.linalg.inv(tpl.affine) @ np.array([0, 0, 0, 1.0])
    assert np.all(origin_vox[:3] > 0) and np.all(origin_vox[:3] < np.array(tpl.shape))
    csf, gm, wm = tpl.tissue_t1
    assert csf < gm < wm  # T1 contrast


def test_normal_subject():
    s = make_subject(3, 0, abnormal=False, spacing=SP)
    assert s.image.dtype == np.float32 and s.mask.dtype == np.uint8
    assert s.image.shape == s.mask.shape == load_template(SP).shape
    assert s.mask.sum() == 0 and s.family == "none" and not s.abnormal
    assert np.isfinite(s.image).all() and s.image.min() >= 0
    fg = s.image > 0
    assert 0.15 < fg.mean() < 0.7  # a skull-stripped brain with zero background
    wm = np.median(s.image[fg])
    for axis in range(3):  # the whole brain is inside the grid: the outer faces are (almost) background
        for face in (0, -1):
            assert (np.take(s.image, face, axis) > 0.2 * wm).mean() < 0.005


def test_deterministic_and_varied():
    a = make_subject(7, 1, abnormal=True, family="tumour", spacing=SP)
    b = make_subject(7, 1, abnormal=True, family="tumour", spacing=SP)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    c = make_subject(7, 2, abnormal=False, spacing=SP)
    d = make_subject(8, 1, abnormal=False, spacing=SP)
    n1 = make_subject(7, 1, abnormal=False, spacing=SP)
    for other in (c, d):
        assert np.abs(other.image - n1.image).mean() > 0.02 * n1.image.max()  # subjects differ


@pytest.mark.parametrize("family", LESION_FAMILIES)
def test_lesion_families(family):
    abn = make_subject(11, 4, abnormal=True, family=family, spacing=SP)
    assert abn.abnormal and abn.family == family
    assert abn.lesion_voxels > 0
    assert set(np.unique(abn.mask)) <= {0, 1}
    assert (abn.image[abn.mask > 0] > 0).mean() > 0.9  # lesions lie in the brain
    twin = make_subject(11, 4, abnormal=False, spacing=SP)  # same anatomy, noise and bias field
    wm = np.median(twin.image[twin.image > 0])
    changed = np.abs(abn.image - twin.image) > 0.15 * wm
    if family != "tumour":  # the tumour also pushes tissue around it (mass effect)
        near = ndimage.binary_dilation(abn.mask > 0, iterations=1)
        dist = ndimage.distance_transform_edt(abn.mask == 0)
        assert changed[~near].sum() <= max(3, 0.05 * abn.lesion_voxels)  # only the soft rim is unlabelled
        assert changed[dist > 4].sum() == 0  # nothing changes away from the lesion
    # intensities inside the mask clearly differ from the normal twin
    rel = np.abs(abn.image - twin.image)[abn.mask > 0].mean() / wm
    assert rel > 0.15


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown lesion family"):
        make_subject(0, 0, abnormal=True, family="wart", spacing=SP)


def test_make_dataset_layout(tmp_path):
    calls = []
    summary = make_dataset(tmp_path / "d", n_train=2, n_test=4, seed=5, spacing=SP,
                           progress=lambda done, total, sid: calls.append((done, total, sid)))
    root = tmp_path / "d"
    assert summary["n_abnormal"] == 2 and [c[0] for c in calls] == list(range(1, 7))
    assert sorted(p.name for p in (root / "train").iterdir()) == ["normal-0000.nii.gz", "normal-0001.nii.gz"]
    rows = list(csv.DictReader(open(root / "test" / "labels.csv")))
    assert [r["id"] for r in rows] == [f"case-{i:04d}" for i in range(4)]
    assert sum(int(r["abnormal"]) for r in rows) == 2
    assert set(rows[0]) >= {"id", "abnormal", "family", "lesion_voxels"}
    for r in rows:
        img = nib.load(root / "test" / "images" / f"{r['id']}.nii.gz")
        msk = nib.load(root / "test" / "masks" / f"{r['id']}.nii.gz")
        assert img.shape == msk.shape == tuple(summary["shape"])
        assert np.allclose(img.affine, msk.affine) and np.allclose(np.diag(img.affine)[:3], SP)
        assert img.get_data_dtype() == np.float32 and msk.get_data_dtype() == np.uint8
        m = np.asarray(msk.dataobj)
        assert int(m.sum()) == int(r["lesion_voxels"])
        assert (m.sum() > 0) == (r["abnormal"] == "1")
    # same arguments -> same files
    make_dataset(tmp_path / "e", n_train=1, n_test=4, seed=5, spacing=SP, progress=False)
    for rel in ("train/normal-0000.nii.gz", "test/images/case-0001.nii.gz", "test/masks/case-0002.nii.gz"):
        a = np.asarray(nib.load(root / rel).dataobj)
        b = np.asarray(nib.load(tmp_path / "e" / rel).dataobj)
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "e" / "test" / "labels.csv").read_text() == (root / "test" / "labels.csv").read_text()
