"""The library's one-place rules: atomic writes, volume file names and ids, what a heatmap calls abnormal, the
detect output folder, and label maps written for Slicer."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from spmamba.atomic import atomic_path, write_json, write_text
from spmamba.io import VOLUME_SUFFIXES, is_volume_file, load_volume, save_volume, volume_id
from spmamba.metrics import lesion_metrics
from spmamba.results import (DetectOutputWriter, ResultsError, heatmap_path, read_detect_meta, read_scores)
from spmamba.scoring import abnormal_voxels, find_regions


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------ atomic writes
def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "sub" / "state.json"
    write_json(target, {"a": np.float32(0.5), "n": np.int64(3), "v": np.arange(2)})
    assert json.loads(target.read_text()) == {"a": 0.5, "n": 3, "v": [0, 1]}
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("crash while writing")
    assert json.loads(target.read_text())["n"] == 3  # untouched
    assert _names(target.parent) == ["state.json"]  # no temporary file left


def test_atomic_path_into_a_hard_link_of_the_target_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "model.pt"
    write_text(target, "v1")
    with atomic_path(target, suffix=".part", fsync=True) as tmp:
        os.link(target, tmp)  # rename(2) between two links of one file is a no-op that keeps both names
    assert target.read_text() == "v1" and _names(tmp_path) == ["model.pt"]


# ------------------------------------------------------------------------------------------------ volume names
@pytest.mark.parametrize("name, sid", [
    ("a/b/case-01.nii.gz", "case-01"), ("x.NRRD", "x"), ("y.nii", "y"), ("head.nhdr", "head"),
    ("CASE.NII.GZ", "CASE"), ("case.01", "case.01"), ("sub-1.v2.nii.gz", "sub-1.v2"),
])
def test_volume_id(name, sid):
    assert volume_id(name) == sid


def test_volume_suffixes():
    assert VOLUME_SUFFIXES == (".nii.gz", ".nii", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".dcm")
    assert all(is_volume_file(f"x{s.upper()}") for s in VOLUME_SUFFIXES)
    assert not is_volume_file("x.raw") and not is_volume_file("x.nii.gz.part")


# ------------------------------------------------------------------------------------------------ abnormal voxels
def test_a_voxel_at_the_threshold_is_abnormal_everywhere():
    """The one rule: at or above the calibrated threshold is abnormal (regions, label maps, lesion metrics)."""
    hm = np.zeros((8, 8, 8), np.float32)
    hm[2:4, 2:4, 2:4] = 0.5  # exactly the threshold
    hm[6, 6, 6] = 0.49
    mask = np.zeros(hm.shape, np.uint8)
    mask[2:4, 2:4, 2:4] = 1
    assert abnormal_voxels(hm, 0.5).sum() == 8
    # compared in the heatmap's type: float32(0.7) is below the float64 0.7, yet it is the threshold's value
    assert abnormal_voxels(np.float32([0.7, 0.69]), np.float64(0.7)).tolist() == [True, False]
    assert [r["n_voxels"] for r in find_regions(hm, 0.5)] == [8]
    row = lesion_metrics(hm, mask, 0.5)
    assert row["pred_voxels"] == 8 and row["n_gt_detected"] == 1 and row["dice"] == 1.0


# ------------------------------------------------------------------------------------------------ detect output
def test_detect_output_round_trip_keeps_the_documented_format(tmp_path):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    with DetectOutputWriter(tmp_path) as out:
        out.add("case-1", np.ones((4, 5, 6), np.float32), aff, 1.23456789, 0.5, True)
        out.add("case-2", np.zeros((4, 5, 6), np.float32), aff, 0.25, 0.5, False)
        out.finish(model="m.pt", version="abc", pixel_threshold=np.float32(0.75), n_inputs=3, n_done=2,
                   failed=[("bad.nii.gz", "truncated")], seconds=1.234)
    assert (tmp_path / "scores.csv").read_text().splitlines() == [
        "id,score,threshold,abnormal", "case-1,1.23457,0.5,1", "case-2,0.25,0.5,0"]
    meta = read_detect_meta(tmp_path)
    assert meta == {"model": "m.pt", "version": "abc", "pixel_threshold": 0.75, "n_inputs": 3, "n_done": 2,
                    "n_failed": 1, "failed": [{"path": "bad.nii.gz", "error": "truncated"}], "seconds": 1.23}
    assert read_scores(tmp_path) == {"case-1": {"score": 1.23457, "threshold": 0.5, "abnormal": True},
                                     "case-2": {"score": 0.25, "threshold": 0.5, "abnormal": False}}
    heat = load_volume(heatmap_path(tmp_path, "case-1"))
    assert heatmap_path(tmp_path, "case-1").name == "case-1_anomaly.nii.gz"
    assert heat.array.shape == (4, 5, 6) and np.allclose(heat.affine, aff)


def test_detect_output_readers_name_the_file(tmp_path):
    with pytest.raises(ResultsError, match="scores.csv: not found"):
        read_scores(tmp_path)
    (tmp_path / "scores.csv").write_text("id,score\nx,high\n")
    with pytest.raises(ResultsError, match="line 2"):
        read_scores(tmp_path)
    assert read_detect_meta(tmp_path) == {}
    (tmp_path / "detect.json").write_text("{")
    with pytest.raises(ResultsError, match="detect.json: not valid JSON"):
        read_detect_meta(tmp_path)


# ------------------------------------------------------------------------------------------------ label maps
def test_label_map_nrrd_is_uint8_in_lps_like_slicer_writes(tmp_path):
    import nrrd

    aff = np.array([[0.0, 0.0, 3.0, 10.0], [-2.0, 0.0, 0.0, 20.0], [0.0, 1.5, 0.0, -5.0], [0, 0, 0, 1]])
    mask = np.zeros((4, 5, 6), bool)
    mask[1, 2, 3] = True
    path = save_volume(mask, aff, tmp_path / "label.nrrd", dtype=np.uint8)
    data, header = nrrd.read(str(path))
    assert data.dtype == np.uint8 and data[1, 2, 3] == 1 and data.sum() == 1
    assert header["space"] == "left-posterior-superior"
    lps = np.diag([-1.0, -1.0, 1.0]) @ aff[:3]
    assert np.allclose(header["space directions"], lps[:, :3].T) and np.allclose(header["space origin"], lps[:, 3])
    back = load_volume(path)
    assert np.allclose(back.affine, aff) and back.array[1, 2, 3] == 1
    assert _names(tmp_path) == ["label.nrrd"]
