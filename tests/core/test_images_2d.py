"""2-D images as volumes with one slice (spmamba.io, spmamba.preprocessing): PNG, JPEG and single DICOM files read
with ITK's geometry, colour as grey, bad files refused with a clear error, and a single-slice image lying across
another axis sliced as the image itself."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from spmamba.io import IMAGE_SUFFIXES, VolumeError, is_volume_file, load_volume, save_volume, volume_id
from spmamba.preprocessing import Preprocessing, prepare_slices, to_canonical


def write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", orientation=None, position=None,
                imager_spacing=None):
    """A minimal DX DICOM file (pydicom) with ``pixels`` (rows, columns) as 16-bit unsigned values."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "anon"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if orientation is not None:
        ds.ImageOrientationPatient, ds.ImagePositionPatient = list(orientation), list(position)
    if imager_spacing is not None:
        ds.ImagerPixelSpacing = list(imager_spacing)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(str(path), write_like_original=False)
    return path


@pytest.fixture()
def grey():
    """(rows 20, columns 30) uint8 with distinct values."""
    return (np.arange(20 * 30).reshape(20, 30) % 251).astype(np.uint8)


def test_png_is_a_one_slice_volume_with_itk_geometry(tmp_path, grey):
    Image.fromarray(grey).save(tmp_path / "xray.png")
    v = load_volume(tmp_path / "xray.png")
    assert v.array.shape == (30, 20, 1) and v.array.dtype == np.float32
    np.testing.assert_array_equal(v.array[:, :, 0], grey.T)  # (columns, rows)
    # ITK (and so 3D Slicer): 1 mm pixels, origin 0, columns towards patient left, rows towards posterior
    np.testing.assert_array_equal(v.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert volume_id(tmp_path / "xray.png") == "xray" and all(is_volume_file(f"a{s.upper()}") for s in IMAGE_SUFFIXES)
    # 16-bit grey keeps its values
    deep = (np.arange(20 * 30).reshape(20, 30) * 97).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(load_volume(tmp_path / "deep.png").array[:, :, 0], deep.T.astype(np.float32))


def test_colour_images_are_read_as_luminance(tmp_path, grey):
    rgb = np.stack([grey, grey // 2, grey // 3], axis=-1)
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    Image.fromarray(rgb).save(tmp_path / "colon.png")
    Image.fromarray(np.dstack([rgb, np.full(grey.shape, 255, np.uint8)])).save(tmp_path / "alpha.png")
    for name in ("colon.png", "alpha.png"):
        v = load_volume(tmp_path / name)
        assert v.array.shape == (30, 20, 1)
        np.testing.assert_allclose(v.array[:, :, 0], luma.T, atol=1e-3)
    Image.fromarray(rgb).save(tmp_path / "colon.jpg", quality=98)
    v = load_volume(tmp_path / "colon.jpg")
    assert v.array.shape == (30, 20, 1) and np.abs(v.array[:, :, 0] - luma.T).mean() < 3.0  # lossy


def test_dicom_geometry_and_monochrome1(tmp_path):
    pixels = np.arange(12 * 16).reshape(12, 16)
    # coronal (a chest X-ray): columns towards patient left, rows towards feet
    v = load_volume(write_dicom(tmp_path / "cor.dcm", pixels, orientation=[1, 0, 0, 0, 0, -1],
                                position=[-100, 50, 200], imager_spacing=[0.5, 0.25]))
    assert v.array.shape == (16, 12, 1)
    np.testing.assert_array_equal(v.array[:, :, 0], pixels.T)
    ras_origin = v.affine @ [0, 0, 0, 1]
    np.testing.assert_allclose(ras_origin[:3], [100, -50, 200])  # LPS (-100, 50, 200)
    np.testing.assert_allclose(v.affine[:3, 0] / np.linalg.norm(v.affine[:3, 0]), [-1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(v.affine[:3, 1] / np.linalg.norm(v.affine[:3, 1]), [0, 0, -1], atol=1e-6)
    # MONOCHROME1 (bright = little signal) arrives inverted (by GDCM): bright means dense, as in MONOCHROME2
    m1 = load_volume(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1")).array[:, :, 0]
    assert np.corrcoef(m1.ravel(), pixels.T.ravel())[0, 1] < -0.999


@pytest.mark.parametrize("name, data, words", [
    ("bad.png", b"not a png at all" * 10, ("not a readable image",)),
    ("bad.dcm", b"x" * 300, ("not a readable DICOM",)),
    ("bad.jpg", b"\xff\xd8\xff" + b"garbage" * 20, ("JPEG", "readable", "corrupt")),
])
def test_bad_image_files_are_refused_with_their_name(tmp_path, name, data, words):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(VolumeError) as e:
        load_volume(tmp_path / name)
    assert name in str(e.value) and any(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_images_are_refused(tmp_path, suffix):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 160)).astype(np.uint8)).save(tmp_path / f"full{suffix}")
    data = (tmp_path / f"full{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="truncated or corrupt"):
        load_volume(tmp_path / f"cut{suffix}")


def test_heatmaps_of_images_are_written_as_nifti_with_their_geometry(tmp_path, grey):
    Image.fromarray(grey).save(tmp_path / "xray.png")
    v = load_volume(tmp_path / "xray.png")
    out = save_volume(v.array / 255.0, v.affine, tmp_path / "xray_anomaly.nii.gz")
    back = load_volume(out)
    assert back.array.shape == v.array.shape and np.allclose(back.affine, v.affine)
    with pytest.raises(VolumeError, match="cannot write"):
        save_volume(v.array, v.affine, tmp_path / "x.png")


@pytest.mark.parametrize("affine", [
    np.diag([-1.0, -1.0, 1.0, 1.0]),  # PNG: the slice lies across S (axial)
    np.array([[-1.0, 0, 0, 100], [0, 0, -1, -50], [0, -1, 0, 200], [0, 0, 0, 1]]),  # coronal DICOM
    np.array([[0, 0, 2.0, 0], [0, -1.5, 0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 1]]),  # sagittal, voxel axes permuted
])
@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_single_slice_images_are_sliced_as_the_image_on_any_slice_axis(affine, slice_axis):
    rng = np.random.default_rng(1)
    img = rng.random((16, 12, 1)).astype(np.float32) + 1.0
    canon = to_canonical(img, affine, slice_axis)
    assert canon.array.shape[slice_axis] == 1
    np.testing.assert_array_equal(canon.to_file_order(canon.array), img)  # back to the file's voxel order
    norm, fg, keep, c = prepare_slices(img, affine, Preprocessing(slice_axis=slice_axis, standardise=False))
    assert norm.shape[0] == 1 and sorted(norm.shape[1:]) == [12, 16] and keep == [0]
    # the in-plane pixel sizes go with the in-plane axes
    spacing = c.spacing_slice_first(slice_axis)
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    assert spacing[0] == pytest.approx(sizes[2]) and sorted(spacing[1:]) == pytest.approx(sorted(sizes[:2]))
    # volumes are untouched by the rule
    vol = rng.random((6, 5, 4)).astype(np.float32)
    assert to_canonical(vol, affine, slice_axis).plane_swap is None
