"""DICOM in and out: a series folder read as one volume (and refused with a clear message when it is not one), and
detection results written as a Parametric Map and a Segmentation that reference the series and read back equal."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pydicom
import pytest

from spmamba.data.dicom import write_dicom_series
from spmamba.dicom_results import (PARAMETRIC_MAP_STORAGE, SEGMENTATION_STORAGE, DicomResultError, parametric_map,
                                   read_derived_volume, segmentation)
from spmamba.io import VolumeError, inspect_dicom_series, is_dicom_folder, load_volume


def _oblique_affine() -> np.ndarray:
    a = 0.4
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.5, 2.0, 3.0])
    aff[:3, 3] = [10.0, -20.0, 5.0]
    return aff


@pytest.fixture()
def series(tmp_path):
    rng = np.random.default_rng(0)
    array = (rng.random((20, 16, 6)) * 400 - 100).astype(np.float32)
    info = write_dicom_series(array, _oblique_affine(), tmp_path / "series", modality="MR")
    return array, info, tmp_path / "series"


def test_a_series_folder_is_one_volume_on_its_own_grid(series):
    array, info, folder = series
    assert is_dicom_folder(folder)
    vol = load_volume(folder)
    assert vol.array.shape == array.shape and vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.affine, _oblique_affine(), atol=1e-6)
    assert np.abs(vol.array - array).max() <= info["slope"] / 2 + 1e-4  # 16-bit quantisation only
    found = inspect_dicom_series(folder)
    assert found.series_uid == info["series_uid"] and found.sop_class == "MR Image Storage"
    # slices in any file order: sorted along the normal
    for i, f in enumerate(sorted(folder.iterdir())):
        f.rename(folder / f"z{5 - i}_{f.name}")
    np.testing.assert_array_equal(load_volume(folder).array, vol.array)


def test_what_is_not_one_image_series_is_refused_with_what_to_do(series, tmp_path):
    array, info, folder = series
    # a second series in the folder
    two = tmp_path / "two"
    shutil.copytree(folder, two)
    write_dicom_series(array[:, :, :3], np.eye(4), two / "x")
    for f in (two / "x").iterdir():
        f.rename(two / f"other_{f.name}")
    (two / "x").rmdir()
    with pytest.raises(VolumeError, match="holds 2 DICOM series.*own folder"):
        load_volume(two)
    # a non-image object (a Segmentation of the series) beside the images
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in info["files"]]
    vol = load_volume(folder)
    seg = segmentation(vol.array > 0, vol.affine, sources, model_version="v1")
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    seg.save_as(str(mixed / "seg.dcm"))
    with pytest.raises(VolumeError, match="not images: Segmentation Storage"):
        load_volume(mixed)
    # a missing slice
    gap = tmp_path / "gap"
    shutil.copytree(folder, gap)
    (gap / "slice_0003.dcm").unlink()
    with pytest.raises(VolumeError, match="not evenly spaced"):
        load_volume(gap)
    # one file of the series, an empty folder, a folder of text
    with pytest.raises(VolumeError, match="single DICOM file"):
        load_volume(info["files"][0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="no DICOM files"):
        load_volume(tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not dicom")
    assert not is_dicom_folder(tmp_path / "notes")


def test_results_as_parametric_map_and_segmentation_read_back_equal(series):
    array, info, folder = series
    vol = load_volume(folder)
    heat = np.random.default_rng(1).random(vol.array.shape).astype(np.float32)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in info["files"]]
    pm = parametric_map(heat, vol.affine, sources[::-1], model_version="abc123", pixel_threshold=0.9)
    seg = segmentation(heat >= np.float32(0.9), vol.affine, sources, model_version="abc123")
    for ds, sop in ((pm, PARAMETRIC_MAP_STORAGE), (seg, SEGMENTATION_STORAGE)):
        buf = io.BytesIO()
        ds.save_as(buf)
        buf.seek(0)
        back = pydicom.dcmread(buf)
        assert back.SOPClassUID == sop
        assert back.StudyInstanceUID == info["study_uid"] and back.FrameOfReferenceUID == info["frame_of_reference_uid"]
        assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == info["series_uid"]
        assert back.NumberOfFrames == array.shape[2]
        got = read_derived_volume(back, vol.affine, vol.array.shape)
        want = heat if sop == PARAMETRIC_MAP_STORAGE else (heat >= np.float32(0.9)).astype(np.uint8)
        np.testing.assert_array_equal(got, want)
    assert pm.Modality == "OT" and seg.Modality == "SEG"
    # a heatmap on another grid is refused, not silently misplaced
    shifted = vol.affine.copy()
    shifted[:3, 3] += 0.5 * vol.affine[:3, 0]  # half a voxel off
    with pytest.raises(DicomResultError, match="grid"):
        parametric_map(heat, shifted, sources, model_version="abc123")
    with pytest.raises(DicomResultError, match="outside"):
        parametric_map(heat, vol.affine @ np.diag([1.0, 1.0, 0.5, 1.0]), sources, model_version="abc123")


def test_single_dicom_files_are_2d_images_unless_one_slice_of_a_series(series, tmp_path):
    """A slice lying beside the rest of its series is refused (give the folder); the same slice alone is a one-slice
    image; a folder of DICOM X-rays is a folder of 2-D images, not a series."""
    from test_images_2d import write_dicom

    array, info, folder = series
    with pytest.raises(VolumeError, match=r"single DICOM file, one slice of a MR series of 6 files.*give the folder"):
        load_volume(info["files"][2])
    alone = tmp_path / "alone"
    alone.mkdir()
    one = shutil.copy(info["files"][2], alone / "slice.dcm")
    vol = load_volume(one)
    assert vol.array.shape == (20, 16, 1)
    np.testing.assert_allclose(vol.array[:, :, 0], load_volume(folder).array[:, :, 2], atol=info["slope"] / 2 + 1e-4)
    xrays = tmp_path / "xrays"
    xrays.mkdir()
    for i in range(3):
        write_dicom(xrays / f"chest{i}.dcm", np.full((8, 10), 100 * i, np.uint16))
    assert not is_dicom_folder(xrays) and is_dicom_folder(folder)
    assert load_volume(xrays / "chest1.dcm").array.shape == (10, 8, 1)
