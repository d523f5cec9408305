"""The module Logic's MRML side in a real MRML scene (slicer-core), with heatmap files written by nibabel."""
from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk

nib = pytest.importorskip("nibabel")

from AnomalyDetectionLib import testing  # noqa: E402
from AnomalyDetectionLib.client import DetectionResult  # noqa: E402
from AnomalyDetectionLib.logic import ATTR_IMAGE_ID, HEAT_COLOR_NODE_IDS, AnomalyLogic  # noqa: E402


def _write_nifti(path, array_ijk, affine=None):
    affine = testing.ijk_to_ras() if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(array_ijk, np.float32), affine), str(path))
    return str(path)


@pytest.fixture()
def case(scene, tmp_path):
    """(logic, reference node loaded from a NIfTI file, heatmap .nii.gz path) on the synthetic grid."""
    image, heat = testing.synthetic_arrays()
    logic = AnomalyLogic()
    reference = logic.load_volume(_write_nifti(tmp_path / "case.nii.gz", image), name="case")
    return logic, reference, _write_nifti(tmp_path / "case_anomaly.nii.gz", heat)


def _matrix(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def test_heat_colour_map_is_built_in(scene):
    logic = AnomalyLogic()
    node_id = logic.heat_color_node_id()
    assert node_id == HEAT_COLOR_NODE_IDS[0]
    assert scene.GetNodeByID(node_id) is not None


def test_show_heatmap_overlays_on_reference(case):
    logic, reference, heat_path = case
    heat = logic.show_heatmap(reference, heat_path, threshold=0.5, opacity=0.4)

    # same grid as the reference, values intact (nibabel order [i, j, k] == MRML array [k, j, i] transposed)
    _, heat_ijk = testing.synthetic_arrays()
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heat), np.transpose(heat_ijk, (2, 1, 0)))
    assert heat.GetImageData().GetDimensions() == reference.GetImageData().GetDimensions()
    np.testing.assert_allclose(_matrix(heat), _matrix(reference))
    np.testing.assert_allclose(_matrix(heat), testing.ijk_to_ras(), atol=1e-5)
    assert logic.geometry_warning == ""

    display = heat.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(0.5, abs=1e-6)
    assert display.GetWindowLevelMax() == pytest.approx(0.9, abs=1e-6)
    assert display.GetApplyThreshold()
    assert display.GetLowerThreshold() == pytest.approx(0.5, abs=1e-6)
    assert display.GetUpperThreshold() >= 0.9

    composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
    assert len(composites) == 3
    for c in composites:
        assert c.GetBackgroundVolumeID() == reference.GetID()
        assert c.GetForegroundVolumeID() == heat.GetID()
        assert c.GetForegroundOpacity() == pytest.approx(0.4)

    logic.set_opacity(0.7)
    assert all(c.GetForegroundOpacity() == pytest.approx(0.7) for c in composites)
    logic.set_threshold(heat, 0.65)
    assert display.GetLowerThreshold() == pytest.approx(0.65, abs=1e-6)
    assert display.GetWindowLevelMin() == pytest.approx(0.65, abs=1e-6)


def test_threshold_starts_at_calibrated_pixel_threshold(case):
    logic, reference, heat_path = case
    result = DetectionResult(
        params={"score": 1.7, "threshold": 1.2, "pixel_threshold": 0.55, "verdict": "abnormal",
                "model_version": "abc123"},
        heatmap_path=heat_path, image_id="case",
    )
    heat = logic.show_heatmap(reference, heat_path, result=result)
    assert heat.GetDisplayNode().GetLowerThreshold() == pytest.approx(0.55, abs=1e-6)
    assert heat.GetAttribute("AnomalyDetection.verdict") == "abnormal"
    assert heat.GetAttribute("AnomalyDetection.model_version") == "abc123"
    assert reference.GetAttribute(ATTR_IMAGE_ID) == "case"  # the volume is now known as datastore study "case"


def test_without_threshold_uses_99th_percentile(case):
    logic, reference, heat_path = case
    heat = logic.show_heatmap(reference, heat_path)
    expected = np.percentile(testing.synthetic_arrays()[1], 99.0)
    assert heat.GetDisplayNode().GetLowerThreshold() == pytest.approx(expected, abs=1e-5)


def test_new_heatmap_replaces_the_old_one(case):
    logic, reference, heat_path = case
    first = logic.show_heatmap(reference, heat_path, threshold=0.5)
    logic.make_regions(first, 0.5)
    second = logic.show_heatmap(reference, heat_path, threshold=0.5)
    heatmaps = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                if n.GetAttribute("AnomalyDetection.Role") == "heatmap"]
    assert heatmaps == [second]
    assert not slicer.util.getNodesByClass("vtkMRMLSegmentationNode")  # stale regions went with the old heatmap


def test_nrrd_heatmap_and_geometry_snap(scene, tmp_path):
    """A .nrrd heatmap (what MRML/pynrrd write) loads on the reference grid; a tiny offset is snapped away."""
    logic = AnomalyLogic()
    reference, path = testing.make_synthetic_case(logic, str(tmp_path))
    assert path.endswith(".nrrd")
    heat = logic.show_heatmap(reference, path, threshold=0.5)
    np.testing.assert_allclose(_matrix(heat), _matrix(reference))
    assert logic.geometry_warning == ""
    # a float-precision drift (as a NIfTI qform round trip gives) is snapped onto the reference
    affine = testing.ijk_to_ras().copy()
    affine[:3, 3] += 2e-4
    drifted = _write_nifti(tmp_path / "drift.nii.gz", testing.synthetic_arrays()[1], affine)
    heat = logic.show_heatmap(reference, drifted, threshold=0.5)
    np.testing.assert_array_equal(_matrix(heat), _matrix(reference))


def test_heatmap_on_another_grid_is_reported(case, tmp_path):
    logic, reference, _ = case
    other = _write_nifti(tmp_path / "other.nii.gz", np.zeros((5, 6, 7), np.float32) + 0.2)
    logic.show_heatmap(reference, other, threshold=0.1)
    assert "differs" in logic.geometry_warning


@pytest.mark.parametrize("threshold", [0.5, 0.65, 0.8])
def test_regions_to_segmentation_and_table(case, threshold):
    logic, reference, heat_path = case
    heat = logic.show_heatmap(reference, heat_path, threshold=threshold)
    seg, table, regions = logic.make_regions(heat, threshold)
    expected = testing.expected_regions(threshold)

    assert len(regions) == len(expected)
    for got, want in zip(regions, expected):
        assert got.n_voxels == want["n_voxels"]
        assert got.volume_mm3 == pytest.approx(want["volume_mm3"])
        assert got.peak == pytest.approx(want["peak"], abs=1e-6)
        assert got.mean == pytest.approx(want["peak"], abs=1e-6)
        np.testing.assert_allclose(got.centroid_ras, want["centroid_ras"], atol=1e-4)

    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(expected)
    assert seg.GetAttribute("AnomalyDetection.ReferenceNodeID") == reference.GetID()
    # export the segments on the reference grid and count voxels per segment
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    for i in range(segmentation.GetNumberOfSegments()):
        ids.InsertNextValue(segmentation.GetNthSegmentID(i))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg, ids, labelmap, reference)
    labels = slicer.util.arrayFromVolume(labelmap)
    assert labels.shape == slicer.util.arrayFromVolume(reference).shape
    for i, want in enumerate(expected, start=1):
        assert int((labels == i).sum()) == want["n_voxels"]
        assert segmentation.GetNthSegment(i - 1).GetName().startswith(f"Region {i} ")

    assert table.GetNumberOfRows() == len(expected)
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == list(logic.REGION_COLUMNS)
    for row, want in enumerate(expected):
        assert table.GetTable().GetValueByName(row, "Voxels").ToInt() == want["n_voxels"]
        np.testing.assert_allclose(logic.region_centroid_from_table(table, row), want["centroid_ras"], atol=1e-4)


def test_regions_min_voxels_and_empty(case):
    logic, reference, heat_path = case
    heat = logic.show_heatmap(reference, heat_path, threshold=0.5)
    _, _, regions = logic.make_regions(heat, 0.5, min_voxels=2)
    assert [r.n_voxels for r in regions] == [32, 18]  # the 1-voxel blob is dropped
    seg, table, regions = logic.make_regions(heat, 5.0)  # nothing above: an empty segmentation, empty table
    assert regions == [] and seg.GetSegmentation().GetNumberOfSegments() == 0 and table.GetNumberOfRows() == 0
    assert len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == 1  # earlier regions replaced


def test_jump_to_region_centres_slice_views(case):
    logic, reference, heat_path = case
    heat = logic.show_heatmap(reference, heat_path, threshold=0.5)
    _, table, regions = logic.make_regions(heat, 0.5)
    target = logic.region_centroid_from_table(table, 1)
    logic.jump_to(target)
    for slice_node in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())[:3, 3], target,
                                   atol=1e-4)


def test_load_case_remembers_datastore_id(scene, tmp_path):
    logic = AnomalyLogic()
    path = _write_nifti(tmp_path / "study7.nii.gz", testing.synthetic_arrays()[0])
    node = logic.load_case("study7", path)
    assert logic.image_id_of(node) == "study7"
    assert all(c.GetBackgroundVolumeID() == node.GetID() for c in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"))
    job = logic.prepare_detection(node)
    assert job.image_id == "study7" and job.file_path is None  # sent by id, no upload


def test_prepare_detection_writes_local_volume(scene, tmp_path):
    logic = AnomalyLogic()
    image, _ = testing.synthetic_arrays()
    node = testing.add_volume(image, "my scan (T1)")
    job = logic.prepare_detection(node, add_to_studies=False)
    assert job.image_id is None and job.upload_name == "my_scan_T1"
    back = nib.load(job.file_path) if job.file_path.endswith(".nii.gz") else None
    reread = logic.load_volume(job.file_path)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(reread), slicer.util.arrayFromVolume(node))
    np.testing.assert_allclose(_matrix(reread), _matrix(node), atol=1e-5)
    assert back is None  # written as NRRD


def test_unreadable_file_gives_clear_error(scene, tmp_path):
    from AnomalyDetectionLib.client import ServerError

    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(ServerError, match="Could not read"):
        AnomalyLogic().load_volume(str(bad))
    assert not slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")


def test_work_files_are_removed_once_loaded_and_at_close(scene, tmp_path):
    """Scans and heatmaps that pass through the logic's work folder do not stay on disk (patient data): a file
    loaded from there goes with its folder, also when it cannot be read; the user's own files stay; close() removes
    the folder and what is left in it."""
    import os
    import tempfile

    from AnomalyDetectionLib.client import ServerError

    logic = AnomalyLogic()
    image, heat = testing.synthetic_arrays()
    own = _write_nifti(tmp_path / "own.nii.gz", image)
    reference = logic.load_volume(own)
    downloaded = tempfile.mkdtemp(dir=logic.work_dir)
    logic.show_heatmap(reference, _write_nifti(os.path.join(downloaded, "own_anomaly.nii.gz"), heat), threshold=0.5)
    assert not os.path.exists(downloaded) and os.path.isfile(own)
    broken = tempfile.mkdtemp(dir=logic.work_dir)
    with open(os.path.join(broken, "bad.nii.gz"), "wb") as f:
        f.write(b"not an image")
    with pytest.raises(ServerError, match="Could not read"):
        logic.load_volume(os.path.join(broken, "bad.nii.gz"))
    assert os.listdir(logic.work_dir) == []
    logic.discard(own)  # not in the work folder: left alone
    logic.discard(logic.work_dir)
    assert os.path.isfile(own) and os.path.isdir(logic.work_dir)
    job = logic.prepare_detection(testing.add_volume(image, "unsaved scan"), add_to_studies=False)
    assert os.path.isfile(job.file_path)  # the upload's copy, until run_detection has sent it
    logic.close()
    assert not os.path.exists(logic.work_dir)
    logic.close()


@pytest.mark.parametrize("name", ["xray.png", "colon.jpg", "chest.dcm"])
def test_2d_images_load_as_one_slice_volumes_and_take_the_servers_heatmap(scene, tmp_path, name):
    """A 2-D study (PNG/JPEG/DICOM, as the server serves it) loads with the geometry the server's reader gives it
    (spmamba.io, ITK's), so the heatmap the server writes for it overlays without a geometry warning."""
    from PIL import Image

    from spmamba.io import load_volume, save_volume

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 200, (20, 30)).astype(np.uint8)  # (rows, columns)
    path = tmp_path / name
    if name.endswith(".dcm"):
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(pixels.astype(np.int16))
        img.SetSpacing((0.5, 0.25))
        sitk.WriteImage(img, str(path))
    else:
        Image.fromarray(np.stack([pixels] * 3, -1) if name.endswith(".jpg") else pixels).save(path, quality=100)
    server = load_volume(path)  # what the server reads
    logic = AnomalyLogic()
    node = logic.load_volume(str(path), image_id="study1")
    assert node.GetName() == name.split(".")[0] and node.GetImageData().GetDimensions() == (30, 20, 1)
    np.testing.assert_allclose(_matrix(node), server.affine, atol=1e-6)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node)[0].T, server.array[:, :, 0], atol=1e-3)
    import os

    assert os.listdir(logic.work_dir) == []  # the NRRD the image was converted to is gone once read
    heat = np.zeros(server.array.shape, np.float32)
    heat[4, 7, 0] = 1.0
    heat_node = logic.show_heatmap(node, str(save_volume(heat, server.affine, tmp_path / "heat.nii.gz")),
                                   threshold=0.5)
    assert logic.geometry_warning == ""
    assert np.argwhere(slicer.util.arrayFromVolume(heat_node) > 0.5).tolist() == [[0, 7, 4]]


def test_unreadable_2d_image_is_a_clear_error(scene, tmp_path):
    from AnomalyDetectionLib.client import ServerError

    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ServerError, match="bad.png"):
        AnomalyLogic().load_volume(str(tmp_path / "bad.png"))
    assert not slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
