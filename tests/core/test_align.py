"""Anatomical alignment (spmamba.registration): coordinate conversion, recovery of a known transform, heatmaps back
on the input grid, clear failures, and the detector / training / model-file hooks."""
from dataclasses import asdict

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from spmamba.checkpoint import read_checkpoint_meta, weights_digest
from spmamba.io import Volume, VolumeError
from spmamba.registration import (AffineAligner, AlignmentError, Reference, build_reference, calibrate_floor,
                                  from_sitk, mni152_reference, similarity, to_sitk)

# Tolerance for a recovered transform, as the mean / largest displacement error (mm) over the reference's brain
# voxels: the reference has 4 mm voxels, the input 3 mm; measured errors are about 0.25 / 0.5 mm.
MEAN_TOL_MM, MAX_TOL_MM, SCALE_TOL = 1.0, 1.5, 0.02
INPUT_AFFINE = np.array([[-3.0, 0, 0, 100], [0, -3.0, 0, 100], [0, 0, 3.0, -90], [0, 0, 0, 1]])  # L-P-S axes
INPUT_SHAPE = (68, 80, 64)


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(degrees)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _known_pose(ref: Reference, degrees, shift, scales) -> np.ndarray:
    """4x4 map of reference RAS points to input RAS points: rotation and scaling about the grid centre, then a
    shift."""
    c = ref.affine[:3, :3] @ (np.array(ref.shape) / 2) + ref.affine[:3, 3]
    lin = _rotation((1, 0.5, 0.2), degrees) @ np.diag(scales)
    q = np.eye(4)
    q[:3, :3] = lin
    q[:3, 3] = c + np.asarray(shift, float) - lin @ c
    return q


def _posed_input(ref: Reference, q: np.ndarray, seed: int = 0, affine: np.ndarray = INPUT_AFFINE,
                 shape: tuple = INPUT_SHAPE) -> np.ndarray:
    """The reference seen through pose ``q`` on another grid (default 3 mm, L-P-S axes) with a scanner gain and
    noise."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    inv = flip @ np.linalg.inv(q) @ flip  # input LPS point -> reference LPS point
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(inv[:3, :3].ravel().tolist())
    tx.SetTranslation(inv[:3, 3].tolist())
    out = sitk.Resample(to_sitk(ref.array * 700.0, ref.affine), to_sitk(np.zeros(shape, np.float32), affine), tx,
                        sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr, aff = from_sitk(out)
    assert np.allclose(aff, affine)
    return arr + np.random.default_rng(seed).normal(0, 5, arr.shape).astype(np.float32) * (arr > 0)


def _errors_mm(ref: Reference, estimated: np.ndarray, truth: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(ref.foreground()).T
    pts = ref.affine[:3, :3] @ ijk + ref.affine[:3, 3:4]
    return np.linalg.norm(estimated[:3, :3] @ pts + estimated[:3, 3:4] - truth[:3, :3] @ pts - truth[:3, 3:4], axis=0)


@pytest.fixture(scope="module")
def reference() -> Reference:
    return mni152_reference(4.0)  # nilearn's MNI152 T1, skull-stripped, 4 mm: 44 x 54 x 46


# ---------------------------------------------------------------------------------------------------------------
# coordinates


@pytest.mark.parametrize("affine", [
    np.diag([2.0, 3.0, 1.5, 1.0]),
    np.array([[0, 0, -3.0, 10], [-2.0, 0, 0, 3], [0, 2.5, 0, -4], [0, 0, 0, 1]]),
    None,
])
def test_sitk_conversion_round_trips_and_agrees_with_nibabel(tmp_path, affine):
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(5, 6, 7)).astype(np.float32)
    if affine is not None:  # an oblique grid as well
        affine = affine.copy()
        affine[:3, :3] = _rotation((0.3, 1, 0.2), 17) @ affine[:3, :3]
    img = to_sitk(arr, affine)
    back, aff = from_sitk(img)
    expected = np.eye(4) if affine is None else affine
    np.testing.assert_array_equal(back, arr)
    np.testing.assert_allclose(aff, expected, atol=1e-6)
    # voxel (i, j, k) of the array is at the RAS point the affine says, in SimpleITK's LPS terms
    for ijk in [(0, 0, 0), (4, 1, 6), (2, 5, 3)]:
        lps = np.asarray(img.TransformIndexToPhysicalPoint(ijk))
        ras = expected[:3, :3] @ ijk + expected[:3, 3]
        np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-6)
        assert img.GetPixel(ijk) == arr[ijk]
    # SimpleITK's NIfTI writer and nibabel agree on the voxels and the affine
    sitk.WriteImage(img, str(tmp_path / "x.nii.gz"))
    nimg = nib.load(tmp_path / "x.nii.gz")
    np.testing.assert_allclose(nimg.affine, expected, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(nimg.dataobj), arr)


def test_a_sheared_grid_is_refused():
    sheared = np.array([[2.0, 0.5, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    with pytest.raises(AlignmentError, match="sheared"):
        to_sitk(np.zeros((4, 4, 4), np.float32), sheared, "s.nii.gz")


# ---------------------------------------------------------------------------------------------------------------
# registration


@pytest.mark.parametrize("degrees,shift,scales", [
    (10.0, (6.0, -5.0, 4.0), (1.08, 1.08, 1.08)),
    (15.0, (10.0, 8.0, -6.0), (1.1, 0.93, 1.0)),
])
def test_a_known_rotation_translation_and_scale_is_recovered(reference, degrees, shift, scales):
    q = _known_pose(reference, degrees, shift, scales)
    al = AffineAligner(reference).align(_posed_input(reference, q), INPUT_AFFINE, name="posed", check_floor=False)
    err = _errors_mm(reference, al.matrix_ras, q)
    assert err.mean() < MEAN_TOL_MM and err.max() < MAX_TOL_MM, (err.mean(), err.max())
    np.testing.assert_allclose(sorted(al.scales), sorted(np.linalg.svd(q[:3, :3], compute_uv=False)),
                               atol=SCALE_TOL)
    assert al.similarity > 0.9 and al.array.shape == reference.shape
    assert np.allclose(al.affine, reference.affine)
    # without alignment the same points are off by about the shift and rotation: the test is not trivial
    assert _errors_mm(reference, np.eye(4), q).mean() > 5 * MEAN_TOL_MM
    s = al.summary()
    assert s["reference"] == "mni152" and s["similarity"] == pytest.approx(al.similarity, abs=1e-4)


def test_registration_is_repeatable_bit_for_bit(reference):
    """Fixed sampling seed and single-threaded ITK registration: the same scan gets the same transform and the same
    resampled volume, run after run (threaded, it moved by up to 1e-3: ITK's partial sums in no fixed order)."""
    import SimpleITK

    arr = _warped_input(reference, _known_pose(reference, 8.0, (3.0, 2.0, -1.0), (1.0, 1.0, 1.0)), amplitude_mm=6.0)
    before = SimpleITK.ProcessObject.GetGlobalDefaultNumberOfThreads()
    runs = [AffineAligner(reference, deformable=True).align(arr, INPUT_AFFINE, check_floor=False) for _ in range(3)]
    assert SimpleITK.ProcessObject.GetGlobalDefaultNumberOfThreads() == before  # the setting is given back
    assert runs[0].deformation is not None
    for again in runs[1:]:
        np.testing.assert_array_equal(again.matrix_ras, runs[0].matrix_ras)
        np.testing.assert_array_equal(again.array, runs[0].array)
        assert again.similarity == runs[0].similarity


def test_heatmaps_land_back_on_the_input_grid(reference):
    q = _known_pose(reference, 12.0, (8.0, -4.0, 5.0), (1.05, 1.05, 1.05))
    al = AffineAligner(reference).align(_posed_input(reference, q), INPUT_AFFINE, check_floor=False)
    # a small blob on the reference grid, around a brain voxel off the centre
    ijk0 = np.array([28, 30, 26])
    ii = np.indices(reference.shape)
    blob = np.exp(-((ii - ijk0[:, None, None, None]) ** 2).sum(0) / 2.0).astype(np.float32)
    on_input = al.to_input(blob)
    assert on_input.shape == INPUT_SHAPE and on_input.dtype == np.float32
    # its centre of mass on the input grid is where the true pose puts the reference point (within a voxel)
    w = on_input / on_input.sum()
    com_vox = (np.indices(INPUT_SHAPE) * w).reshape(3, -1).sum(1)
    com_ras = INPUT_AFFINE[:3, :3] @ com_vox + INPUT_AFFINE[:3, 3]
    expected = q[:3, :3] @ (reference.affine[:3, :3] @ ijk0 + reference.affine[:3, 3]) + q[:3, 3]
    assert np.linalg.norm(com_ras - expected) < 3.0
    # input voxels outside the reference grid get the fill value; masks stay masks
    ones = al.to_input(np.ones(reference.shape, np.float32), fill=-1.0)
    assert (ones == -1.0).any() and np.isclose(ones.max(), 1.0)
    mask = al.to_input(reference.foreground())
    assert mask.dtype == bool and mask.shape == INPUT_SHAPE and mask.any()


def test_empty_constant_and_non_brain_volumes_fail_with_a_clear_message(reference):
    aligner = AffineAligner(reference, metric_floor=0.6)
    with pytest.raises(AlignmentError, match="zeros.nii.gz: the volume is constant"):
        aligner.align(np.zeros(INPUT_SHAPE, np.float32), INPUT_AFFINE, name="zeros.nii.gz")
    speck = np.zeros(INPUT_SHAPE, np.float32)
    speck[30:33, 30:33, 30:33] = 100.0
    with pytest.raises(AlignmentError, match="speck: only 27 foreground voxels; the volume looks empty"):
        aligner.align(speck, INPUT_AFFINE, name="speck")
    noise = np.abs(np.random.default_rng(1).normal(size=INPUT_SHAPE)).astype(np.float32)
    with pytest.raises(AlignmentError, match=r"noise: alignment to the mni152 reference failed: similarity .* below "
                                             r"the floor 0.600.*same anatomy"):
        aligner.align(noise, INPUT_AFFINE, name="noise")
    # a uniform ellipsoid (a brain-sized blob without anatomy)
    ii = np.indices(INPUT_SHAPE) - (np.array(INPUT_SHAPE) / 2)[:, None, None, None]
    blob = (((ii / np.array([22, 26, 20])[:, None, None, None]) ** 2).sum(0) < 1).astype(np.float32) * 500
    with pytest.raises(AlignmentError, match="blob: alignment .* failed: similarity"):
        aligner.align(blob, INPUT_AFFINE, name="blob")
    with pytest.raises(AlignmentError, match="2-D: 1 slice"):
        aligner.align(np.ones((40, 40), np.float32), None, name="2-D")
    assert issubclass(AlignmentError, VolumeError)  # the faces already report VolumeErrors per input


def test_an_absurd_scale_is_refused(reference):
    q = _known_pose(reference, 0.0, (0.0, 0.0, 0.0), (1.3, 1.3, 1.3))
    arr = _posed_input(reference, q)
    with pytest.raises(AlignmentError, match=r"absurd scale 1\.3"):
        AffineAligner(reference, scale_range=(0.8, 1.25)).align(arr, INPUT_AFFINE, name="big")


def test_similarity_and_floor():
    a = np.zeros((10, 10, 10), np.float32)
    a[2:8, 2:8, 2:8] = np.linspace(0.2, 1.0, 6)[:, None, None]
    assert similarity(a, a) == pytest.approx(1.0)
    assert similarity(a, np.roll(a, 3, axis=1)) < 0.5
    assert similarity(a, np.zeros_like(a)) < 0.5
    assert calibrate_floor([0.9, 0.85, 0.95]) == pytest.approx(0.75)
    assert calibrate_floor([0.55]) == 0.5  # never below the absolute floor


def test_a_lesion_does_not_make_a_well_aligned_scan_look_misaligned(reference):
    """The similarity leaves out the voxels that differ most: an abnormal scan is what the product must accept."""
    brain = reference.array.copy()
    ijk = np.argwhere(reference.foreground())
    centre = ijk.mean(0)
    n_lesion = int(0.03 * len(ijk))  # a bright lesion of 3% of the brain
    nearest = ijk[np.argsort(((ijk - centre) ** 2).sum(1))[:n_lesion]]
    brain[tuple(nearest.T)] = 1.5
    plain = similarity(reference.array, brain, trim=0.0)
    assert plain < 0.9  # a plain correlation would call it a poor alignment ...
    assert similarity(reference.array, brain) > 0.97  # ... the trimmed one sees the same anatomy
    assert similarity(reference.array, np.roll(reference.array, 3, axis=1)) < similarity(reference.array, brain)


# ---------------------------------------------------------------------------------------------------------------
# references


def test_reference_from_normals_is_their_aligned_mean(reference):
    poses = [(0.0, (0, 0, 0), (1.0, 1.0, 1.0)), (8.0, (5, -3, 2), (1.05, 1.0, 0.97)),
             (-6.0, (-4, 4, 0), (0.97, 1.02, 1.0))]
    vols = [Volume(_posed_input(reference, _known_pose(reference, *p), seed=i), INPUT_AFFINE, f"n{i}")
            for i, p in enumerate(poses)]
    ref = build_reference(vols)
    assert ref.name == "normals" and ref.array.dtype == np.float32
    # on the grid of one of the normals, in RAS voxel order; sharp enough that every normal aligns well to it
    assert ref.shape == (INPUT_SHAPE[0], INPUT_SHAPE[1], INPUT_SHAPE[2]) and np.all(np.diag(ref.affine)[:3] > 0)
    aligner = AffineAligner(ref)
    assert min(aligner.align(v.array, v.affine, name=v.path).similarity for v in vols) > 0.9
    meta, tensor = ref.to_payload()
    again = Reference.from_payload(meta, tensor)
    np.testing.assert_array_equal(again.array, ref.array)
    np.testing.assert_allclose(again.affine, ref.affine)


# ---------------------------------------------------------------------------------------------------------------
# detector and model files


@pytest.fixture(scope="module")
def tiny_model():
    from spmamba.models import SPMamba

    return SPMamba("tiny")


def test_detector_with_alignment_maps_heatmaps_back_and_keeps_it_in_the_model_file(reference, tiny_model, tmp_path):
    from spmamba.detector import Detector

    det = Detector(tiny_model, device="cpu", alignment=AffineAligner(reference, metric_floor=0.8))
    q = _known_pose(reference, 10.0, (6.0, -5.0, 4.0), (1.08, 1.08, 1.08))
    arr = _posed_input(reference, q)
    res = det.detect(arr, INPUT_AFFINE, name="posed.nii.gz")
    assert res.heatmap.shape == INPUT_SHAPE and res.heatmap.dtype == np.float32
    assert res.foreground.shape == INPUT_SHAPE and res.foreground.dtype == bool
    assert np.all(res.heatmap[~res.foreground] == 0) and res.heatmap[res.foreground].max() > 0
    assert res.alignment["similarity"] > 0.9 and res.alignment["metric_floor"] == 0.8
    assert "align_s" in res.timings
    # the heatmap's support is the brain where the input has it
    assert (res.foreground & (arr > 0)).sum() > 0.9 * res.foreground.sum()

    path = det.save(tmp_path / "aligned.pt")
    meta = read_checkpoint_meta(path)
    assert meta["alignment"]["method"] == "affine" and meta["alignment"]["reference"]["name"] == "mni152"
    assert meta["alignment"]["metric_floor"] == 0.8 and "alignment_reference" not in meta
    loaded = Detector.load(path, device="cpu")
    assert loaded.version == det.version
    assert loaded.version != Detector(tiny_model, device="cpu").version
    np.testing.assert_array_equal(loaded.alignment.reference.array, reference.array)
    again = loaded.detect(arr, INPUT_AFFINE)
    np.testing.assert_allclose(again.heatmap, res.heatmap, atol=1e-3)
    with pytest.raises(AlignmentError, match="empty.nii.gz: the volume is constant"):
        loaded.detect(np.zeros(INPUT_SHAPE, np.float32), INPUT_AFFINE, name="empty.nii.gz")


def test_model_files_without_alignment_load_and_detect_as_before(tiny_model, tmp_path):
    from spmamba.checkpoint import save_checkpoint
    from spmamba.detector import Calibration, Detector

    det = Detector(tiny_model, calibration=Calibration(1.0, 2.0, n_volumes=1), device="cpu")
    payload = det.checkpoint_payload()
    assert "alignment" not in payload and "alignment_reference" not in payload
    # the version is the hash it always was (weights + calibration)
    assert det.version == weights_digest(tiny_model.state_dict(), asdict(det.calibration))
    path = save_checkpoint(tmp_path / "old.pt", payload)
    old = Detector.load(path, device="cpu")
    assert old.alignment is None and old.version == det.version
    assert "alignment" not in read_checkpoint_meta(path)
    rng = np.random.default_rng(0)
    vol = np.zeros((24, 28, 8), np.float32)
    vol[4:20, 5:23, :] = 1 + 0.2 * rng.standard_normal((16, 18, 8))
    a, b = det.detect(vol, np.diag([2.0, 2.0, 2.0, 1.0])), old.detect(vol, np.diag([2.0, 2.0, 2.0, 1.0]))
    np.testing.assert_array_equal(a.heatmap, b.heatmap)
    assert a.score == b.score and a.alignment is None and "align_s" not in a.timings


def test_training_with_alignment_builds_a_reference_and_normalises_per_position(reference):
    from spmamba.train import TrainingDataError, train_detector

    poses = [(0.0, (0, 0, 0), (1.0, 1.0, 1.0)), (6.0, (4, -3, 2), (1.04, 1.0, 0.97)),
             (-5.0, (-3, 3, 0), (0.97, 1.02, 1.0))]
    coarse = np.array([[-5.0, 0, 0, 100], [0, -5.0, 0, 100], [0, 0, 5.0, -90], [0, 0, 0, 1]])  # small and quick
    shape = (41, 48, 38)
    vols = [Volume(_posed_input(reference, _known_pose(reference, *p), i, coarse, shape), coarse, f"n{i}.nii.gz")
            for i, p in enumerate(poses)]
    phases = set()
    det = train_detector(vols, config="tiny", max_steps=1, device="cpu", align="affine", align_reference="normals",
                         progress=lambda d: phases.add(d["phase"]))
    info = det.meta["training"]["alignment"]
    assert {"reference", "align", "position_stats"} <= phases
    assert info["method"] == "affine" and info["reference"] == "normals"
    assert 0.5 <= det.alignment.metric_floor <= info["similarity"]["min"]
    assert det.position_stats is not None and det.meta["training"]["position_normalise"] is True
    # the position statistics live on the reference grid (slice axis first), whatever the input grid
    assert det.position_stats.mean.shape == (reference_shape := det.alignment.reference.shape)[2:] + reference_shape[:2]
    res = det.detect(vols[1].array, vols[1].affine)
    assert res.heatmap.shape == shape and res.alignment["reference"] == "normals"

    empty = Volume(np.zeros(shape, np.float32), coarse, "blank.nii.gz")
    with pytest.raises(TrainingDataError, match="blank.nii.gz: the volume is constant"):
        train_detector(vols + [empty], config="tiny", max_steps=1, device="cpu", align="affine",
                       align_reference="normals")
    with pytest.raises(ValueError, match="align='rigid'"):
        train_detector(vols, config="tiny", max_steps=1, device="cpu", align="rigid")


def test_resuming_keeps_the_models_alignment_setting(reference, tiny_model):
    from spmamba.detector import Detector
    from spmamba.train import TrainingDataError, _prepare_alignment

    det = Detector(tiny_model, device="cpu", alignment=AffineAligner(reference))
    with pytest.raises(TrainingDataError, match="resumed model aligns its inputs"):
        _prepare_alignment(det, "none", "normals", [], [], lambda d: None)
    plain = Detector(tiny_model, device="cpu")
    assert _prepare_alignment(plain, None, "normals", ["v"], ["w"], lambda d: None) == (["v"], ["w"], None)


def _boxes(n: int, seed: int) -> list:
    """``n`` volumes that are not brains: a bright box in noise, on the input grid."""
    rng = np.random.default_rng(seed)
    boxes = []
    for i in range(n):
        a = (rng.random((40, 40, 30)) * 0.05).astype(np.float32)
        a[8:30, 5:35, 4:26] += 1.0
        boxes.append(Volume(a, INPUT_AFFINE, f"box{i}"))
    return boxes


def test_auto_reference_takes_mni152_only_for_brains_that_register_to_it(reference):
    from spmamba.registration import mni152_fits

    boxes = _boxes(3, seed=0)
    assert mni152_fits(boxes, AffineAligner(reference)) is False
    brains = [Volume(_posed_input(reference, _known_pose(reference, 8.0 * i, (3.0 * i, -2.0, 1.0), (1.0, 1.0, 1.0)),
                                  seed=i), INPUT_AFFINE, f"brain{i}") for i in range(3)]
    assert mni152_fits(brains, AffineAligner(reference)) is True


def test_auto_alignment_trains_without_it_for_non_brains_and_resumed_models_follow_their_own(tiny_model, caplog):
    """align="auto" (the CLI's and the app's default): non-brains (and 2-D images) get no alignment, said in the
    log; a resumed model keeps its own setting; auto picks its reference itself."""
    import logging

    from spmamba.detector import Detector
    from spmamba.registration import auto_spacing
    from spmamba.train import _prepare_alignment

    boxes = _boxes(4, seed=1)
    plain = Detector(tiny_model, device="cpu")
    with caplog.at_level(logging.WARNING, logger="spmamba.train"):
        assert _prepare_alignment(plain, "auto", "auto", boxes[:3], boxes[3:], lambda d: None) == (
            boxes[:3], boxes[3:], None)
    assert "no alignment: the normals are not brains" in caplog.text and plain.alignment is None
    images = [Volume(np.ones((32, 32), np.float32), np.eye(4), "xray")] * 3
    assert _prepare_alignment(plain, "auto", "auto", images, images, lambda d: None)[2] is None
    assert _prepare_alignment(plain, "auto", "auto", ["v"], ["w"], lambda d: None, resumed=True) == (
        ["v"], ["w"], None)
    with pytest.raises(ValueError, match="chooses its own reference"):
        _prepare_alignment(plain, "auto", "normals", boxes[:3], boxes[3:], lambda d: None)
    # the automatic reference's grid: the normals' voxel size, between 2 and 8 mm
    assert auto_spacing(boxes) == pytest.approx(float(np.mean(np.abs(np.diag(INPUT_AFFINE)[:3]))))
    assert auto_spacing([Volume(b.array, np.diag([0.8, 0.8, 1.0, 1.0])) for b in boxes]) == 2.0
    assert auto_spacing([Volume(b.array, np.diag([9.0, 9.0, 12.0, 1.0])) for b in boxes]) == 8.0


def test_normals_that_fail_to_align_are_left_out_and_reported(reference, tiny_model, monkeypatch):
    from spmamba.detector import Detector
    from spmamba.train import TrainingDataError, _prepare_alignment

    vols = [Volume(_posed_input(reference, _known_pose(reference, 3.0 * i, (i, 0.0, 0.0), (1.0, 1.0, 1.0)), seed=i),
                   INPUT_AFFINE, f"n{i}.nii.gz") for i in range(6)]
    real_align = AffineAligner.align

    def align(self, array, affine=None, name="volume", check_floor=True):
        if name in ("n2.nii.gz", "n5.nii.gz"):
            raise AlignmentError(f"{name}: alignment failed (test)")
        return real_align(self, array, affine, name, check_floor)

    monkeypatch.setattr(AffineAligner, "align", align)
    det = Detector(tiny_model, device="cpu", alignment=AffineAligner(reference))
    with pytest.raises(TrainingDataError, match="2 of 6 normals fail to align"):  # over a fifth of them
        _prepare_alignment(det, "affine", "mni152:4", vols[:5], vols[5:], lambda d: None)
    vols.append(Volume(vols[0].array, INPUT_AFFINE, "n6.nii.gz"))
    vols.append(Volume(vols[1].array, INPUT_AFFINE, "n7.nii.gz"))
    vols.append(Volume(vols[3].array, INPUT_AFFINE, "n8.nii.gz"))
    vols.append(Volume(vols[4].array, INPUT_AFFINE, "n9.nii.gz"))
    det = Detector(tiny_model, device="cpu", alignment=AffineAligner(reference))
    train, val, info = _prepare_alignment(det, "affine", "mni152:4", vols[:8], vols[8:], lambda d: None)
    assert info["excluded"] == ["n2.nii.gz", "n5.nii.gz"]
    assert len(train) == 6 and [v.path for v in val] == ["n8.nii.gz", "n9.nii.gz"]


# ---------------------------------------------------------------------------------------------------------------
# deformable stage


def _warped_input(ref: Reference, q: np.ndarray, amplitude_mm: float = 4.0, seed: int = 0) -> np.ndarray:
    """The reference seen through pose ``q`` and a smooth non-linear warp (a displacement of up to
    ``amplitude_mm``, one bump per ~40 mm), on the 3 mm L-P-S input grid."""
    rng = np.random.default_rng(seed)
    shape = ref.shape
    coarse = rng.normal(size=(3, 5, 5, 5))
    from scipy import ndimage

    field = np.stack([ndimage.zoom(c, [s / 5 for s in shape], order=3)[: shape[0], : shape[1], : shape[2]]
                      for c in coarse])
    field *= amplitude_mm / np.abs(field).max()
    ii = np.indices(shape).astype(np.float64) + field / np.asarray(ref.affine.diagonal()[:3]).reshape(3, 1, 1, 1)
    warped = ndimage.map_coordinates(ref.array, ii, order=1, mode="constant")
    return _posed_input(Reference(warped.astype(np.float32), ref.affine, "warped"), q, seed)


def _mismatch(reference: Reference, moved: np.ndarray) -> float:
    """Mean absolute difference of the two images (each divided by its brain's median) over their foregrounds."""
    a = reference.array / np.median(reference.array[reference.array > 0.1 * reference.array.max()])
    b = moved / np.median(moved[moved > 0.1 * moved.max()])
    region = (a > 0.2) | (b > 0.2)
    return float(np.abs(a - b)[region].mean())


def test_deformable_alignment_matches_a_warped_brain_better_than_affine_and_maps_back(reference):
    q = _known_pose(reference, 8.0, (5.0, -3.0, 4.0), (1.04, 1.04, 1.04))
    arr = _warped_input(reference, q, amplitude_mm=8.0)
    affine_only = AffineAligner(reference).align(arr, INPUT_AFFINE, check_floor=False)
    al = AffineAligner(reference, deformable=True).align(arr, INPUT_AFFINE, check_floor=False)
    d = al.summary()["deformable"]
    assert al.summary()["method"] == "deformable" and d["used"] and al.deformation is not None
    # the floor checks the affine stage, the same in both (the deformed similarity differs by ~5e-3)
    assert al.similarity == affine_only.similarity
    assert al.similarity != pytest.approx(d["similarity"], abs=1e-3)
    # the deformation takes out a good part of the warp the affine stage cannot (measured: mismatch 0.097 -> 0.071;
    # the same brain without the warp, aligned affinely, 0.045: noise and 3 mm -> 4 mm resampling). The trimmed
    # similarity hardly moves at 4 mm (0.95 -> 0.96): a few-mm warp is a small share of a 4 mm grid's voxels.
    assert _mismatch(reference, al.array) < 0.85 * _mismatch(reference, affine_only.array)
    assert d["similarity"] > 0.9
    assert 0.0 < d["max_displacement_mm"] < 15.0 and d["min_jacobian"] > 0.1
    # the resampled volume is the deformed one; maps go back onto the input grid through the inverse
    assert al.array.shape == reference.shape and not np.allclose(al.array, affine_only.array)
    back = al.to_input(al.array)
    fg = arr > 0.3 * arr.max()
    assert back.shape == INPUT_SHAPE
    assert np.median(np.abs(back[fg] - arr[fg])) < 0.1 * arr[fg].mean()  # round trip: close to the input
    assert al.to_input(reference.foreground()).dtype == bool


def test_a_deformation_that_fails_its_checks_is_left_out_and_the_affine_alignment_stands(reference, caplog):
    arr = _warped_input(reference, _known_pose(reference, 5.0, (2.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    strict = AffineAligner(reference, deformable=True, max_displacement_mm=0.01)
    with caplog.at_level("WARNING"):
        al = strict.align(arr, INPUT_AFFINE, name="warped.nii.gz", check_floor=False)
    d = al.summary()["deformable"]
    assert not d["used"] and "moves brain voxels" in d["why"] and al.deformation is None
    assert "warped.nii.gz: deformable stage left out" in caplog.text
    np.testing.assert_array_equal(al.array, AffineAligner(reference).align(arr, INPUT_AFFINE, check_floor=False).array)


def test_deformable_settings_live_in_the_model_file_under_their_own_method_name(reference):
    al = AffineAligner(reference, deformable=True, demons_sigma=2.5, metric_floor=0.6)
    meta, tensor = al.to_payload()
    assert meta["method"] == "deformable" and meta["demons_sigma"] == 2.5
    back = AffineAligner.from_payload(meta, tensor)
    assert back.method == "deformable" and back.demons_sigma == 2.5 and back.demons_iterations == al.demons_iterations
    plain_meta, _ = AffineAligner(reference).to_payload()
    assert plain_meta["method"] == "affine" and "demons_sigma" not in plain_meta  # affine files are as before
    assert AffineAligner.from_payload(plain_meta, tensor).method == "affine"
    with pytest.raises(ValueError, match="not supported"):
        AffineAligner.from_payload({**meta, "method": "elastic"}, tensor)
