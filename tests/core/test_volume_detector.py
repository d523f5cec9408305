import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from spmamba.checkpoint import CheckpointError
from spmamba.detector import Detector
from spmamba.io import Volume, VolumeError, load_volume, save_volume, validate_array
from spmamba.preprocessing import to_canonical
from spmamba.scoring import find_regions
from spmamba.train import TrainingDataError, train_detector


def _phantom(rng, shape=(24, 28, 6)):
    a = np.zeros(shape, np.float32)
    a[4:20, 5:23, :] = 1 + 0.1 * rng.standard_normal((16, 18, shape[2]))
    return a


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    rng = np.random.default_rng(0)
    vols = [Volume(_phantom(rng), np.diag([2.0, 2.0, 3.0, 1.0])) for _ in range(4)]
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    losses = []
    det = train_detector(vols, config="tiny", epochs=3, checkpoint_path=path,
                         progress=lambda d: losses.append(d["loss"]) if d["phase"] == "epoch" else None)
    return det, path, losses


def test_training_lowers_loss_and_calibrates(tiny_detector):
    det, path, losses = tiny_detector
    assert len(losses) == 3 and losses[-1] < losses[0]
    cal = det.calibration
    assert np.isfinite(cal.pixel_threshold) and np.isfinite(cal.volume_threshold) and cal.n_volumes == 1
    assert det.meta["training"]["n_train_volumes"] == 3


def test_checkpoint_round_trip(tiny_detector, tmp_path):
    det, path, _ = tiny_detector
    loaded = Detector.load(path)
    assert loaded.version == det.version
    assert loaded.calibration == det.calibration
    for k, v in det.model.state_dict().items():
        assert torch.equal(v.cpu(), loaded.model.state_dict()[k].cpu()), k
    copy = det.save(tmp_path / "copy.pt")
    assert Detector.load(copy).version == det.version


def test_corrupt_or_foreign_checkpoints_are_refused(tiny_detector, tmp_path):
    _, path, _ = tiny_detector
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        Detector.load(tmp_path / "trunc.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an spmamba checkpoint"):
        Detector.load(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        Detector.load(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError):
        Detector.load(tmp_path / "text.pt")


def test_checkpoint_meta_without_tensors_and_the_trainings_steps(tiny_detector, tmp_path):
    from spmamba.checkpoint import read_checkpoint_meta

    det, path, _ = tiny_detector
    meta = read_checkpoint_meta(path)
    assert meta["version"] == det.version and meta["config"]["name"] == "tiny"
    assert "state_dict" not in meta and "training_state" not in meta and meta["has_training_state"] is True
    assert meta["calibration"]["volume_threshold"] == det.calibration.volume_threshold
    training = meta["meta"]["training"]
    assert training["epochs"] == 3 and training["steps"] == training["total_steps"] == 3 * training["steps_per_epoch"]
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    for bad, words in (("trunc.pt", "corrupt|truncated"), ("missing.pt", "does not exist")):
        with pytest.raises(CheckpointError, match=words):
            read_checkpoint_meta(tmp_path / bad)


@pytest.mark.parametrize("affine", [np.diag([2.0, 2.0, 3.0, 1.0]),
                                    np.array([[0, 0, -3.0, 10], [-2.0, 0, 0, 3], [0, 2.0, 0, -4], [0, 0, 0, 1]])])
def test_heatmap_has_the_input_shape_in_any_orientation(tiny_detector, affine):
    det, _, _ = tiny_detector
    rng = np.random.default_rng(1)
    vol = _phantom(rng, (20, 30, 7)).astype(np.int16) * 100  # other dtype, other shape
    res = det.detect(vol, affine)
    assert res.heatmap.shape == vol.shape and res.heatmap.dtype == np.float32
    assert np.isfinite(res.heatmap).all()
    assert isinstance(res.abnormal, bool) and np.isfinite(res.score)
    assert len(res.slice_scores) > 0
    # a 2-D image is a one-slice volume
    res2 = det.detect(vol[:, :, 3].astype(np.float32))
    assert res2.heatmap.shape == (20, 30)


def test_empty_slices_are_skipped(tiny_detector):
    det, _, _ = tiny_detector
    vol = _phantom(np.random.default_rng(2), (24, 28, 8))
    vol[:, :, :3] = 0
    res = det.detect(vol, np.eye(4))
    assert {i for i, _ in res.slice_scores} == set(range(3, 8))
    assert np.all(res.heatmap[:, :, :3] == 0)


def test_too_few_volumes_is_refused():
    with pytest.raises(TrainingDataError, match="at least 3"):
        train_detector([Volume(np.ones((8, 8, 2), np.float32), np.eye(4))] * 2, config="tiny")


def test_canonical_round_trip():
    a = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    aff = np.array([[0, 0, -2.0, 0], [0, -1.5, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    c = to_canonical(a, aff)
    assert c.array.shape == (7, 6, 5)
    np.testing.assert_array_equal(c.to_file_order(c.array), a)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_save_and_load_keep_data_and_affine(tmp_path, suffix):
    a = np.random.default_rng(0).random((6, 7, 5)).astype(np.float32)
    aff = np.array([[0, 0, -2.0, 10], [-1.5, 0, 0, 3], [0, 1.0, 0, -4], [0, 0, 0, 1]])
    p = save_volume(a, aff, tmp_path / f"v{suffix}")
    v = load_volume(p)
    np.testing.assert_array_equal(v.array, a)
    np.testing.assert_allclose(v.affine, aff)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp files left


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(VolumeError, match="no such file"):
        load_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "text.nii.gz").write_text("not an image")
    with pytest.raises(VolumeError, match="text.nii.gz"):
        load_volume(tmp_path / "text.nii.gz")
    good = save_volume(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4), tmp_path / "good.nii.gz")
    raw = gzip.decompress(good.read_bytes())
    (tmp_path / "trunc.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(VolumeError, match="truncated or corrupt"):
        load_volume(tmp_path / "trunc.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(VolumeError, match="4-D"):
        load_volume(tmp_path / "4d.nii.gz")
    nan = np.ones((4, 4, 4), np.float32)
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(VolumeError, match="NaN"):
        load_volume(tmp_path / "nan.nii.gz")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4, 4, 4))
    hdr.set_data_dtype(np.float32)
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4), hdr)
    nib.save(img, tmp_path / "big.nii")
    b = bytearray((tmp_path / "big.nii").read_bytes())
    np.frombuffer(b, dtype=np.int16, count=8, offset=40)  # dim[] lives at byte 40
    b[42:48] = np.array([30000, 30000, 30000], np.int16).tobytes()
    (tmp_path / "big.nii").write_bytes(bytes(b))
    with pytest.raises(VolumeError, match="absurd size"):
        load_volume(tmp_path / "big.nii")
    (tmp_path / "x.bmp").write_bytes(b"BM")
    with pytest.raises(VolumeError, match="unsupported file type"):
        load_volume(tmp_path / "x.bmp")
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(VolumeError, match="x.png: not a readable image file"):
        load_volume(tmp_path / "x.png")
    with pytest.raises(VolumeError, match="1-D"):
        validate_array(np.zeros(10))
    with pytest.raises(VolumeError, match="complex"):
        validate_array(np.zeros((4, 4, 4), np.complex64))


def test_find_regions():
    hm = np.zeros((10, 10, 10), np.float32)
    hm[1:3, 1:3, 1:3] = 2.0  # 8 voxels, peak 2
    hm[6:9, 6:9, 6:9] = 3.0  # 27 voxels, peak 3
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [10, 20, 30]
    regions = find_regions(hm, 1.0, aff)
    assert [r["n_voxels"] for r in regions] == [27, 8]
    assert regions[0]["peak"] == 3.0 and regions[0]["label"] == 1
    assert regions[0]["volume_mm3"] == pytest.approx(27 * 8)
    assert regions[0]["centroid_voxel"] == [7.0, 7.0, 7.0]
    assert regions[0]["centroid_ras"] == [24.0, 34.0, 44.0]
    assert find_regions(hm, 5.0, aff) == []
    assert len(find_regions(hm, 1.0, aff, min_voxels=10)) == 1


def test_detection_reports_the_foreground_it_scored(tiny_detector):
    det, _, _ = tiny_detector
    vol = _phantom(np.random.default_rng(3), (24, 28, 6))
    res = det.detect(vol, np.diag([2.0, 2.0, 3.0, 1.0]))
    assert res.foreground.shape == vol.shape and res.foreground.dtype == bool
    # the phantom's box is tissue, its border is background
    assert res.foreground[10, 10, 3] and not res.foreground[0, 0, 0]
