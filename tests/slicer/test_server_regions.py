"""Regions: the server's rows when it sent them for the threshold in use, the heatmap's otherwise; one rule
(``heatmap >= threshold``) for the regions, the overlay and the library."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import slicer
import vtk

nib = pytest.importorskip("nibabel")

from AnomalyDetectionLib import testing  # noqa: E402
from AnomalyDetectionLib.client import DetectionResult  # noqa: E402
from AnomalyDetectionLib.logic import AnomalyLogic, at_or_above, display_lower_bound, same_threshold  # noqa: E402

SERVER_T = 0.55


def _write_nifti(path, array_ijk):
    nib.save(nib.Nifti1Image(np.asarray(array_ijk, np.float32), testing.ijk_to_ras()), str(path))
    return str(path)


def _server_regions(threshold=SERVER_T):
    """What the app sends: the library's regions. The means are marked (+0.001) so a test can tell the server's
    rows from rows computed here."""
    regions = copy.deepcopy(testing.expected_regions(threshold))
    for r in regions:
        r["mean"] = r["mean"] + 0.001
        r["centroid_ras"] = list(r["centroid_ras"])
    return regions


@pytest.fixture()
def case(scene, tmp_path):
    image, heat = testing.synthetic_arrays()
    logic = AnomalyLogic()
    reference = logic.load_volume(_write_nifti(tmp_path / "case.nii.gz", image), name="case")
    return logic, reference, _write_nifti(tmp_path / "case_anomaly.nii.gz", heat)


def _show(logic, reference, heat_path, regions, n_regions=None, threshold=SERVER_T):
    params = {"score": 1.0, "threshold": 0.5, "pixel_threshold": threshold, "verdict": "abnormal"}
    if regions is not None:
        params.update(regions=regions, n_regions=len(regions) if n_regions is None else n_regions)
    result = DetectionResult(params=params, heatmap_path=heat_path, image_id="case")
    return logic.show_heatmap(reference, heat_path, result=result)


def _segment_voxels(seg, reference):
    segmentation = seg.GetSegmentation()
    ids = vtk.vtkStringArray()
    for i in range(segmentation.GetNumberOfSegments()):
        ids.InsertNextValue(segmentation.GetNthSegmentID(i))
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg, ids, labelmap, reference)
    labels = slicer.util.arrayFromVolume(labelmap)
    return [int((labels == i).sum()) for i in range(1, segmentation.GetNumberOfSegments() + 1)]


def test_server_regions_fill_the_table_at_the_servers_threshold(case):
    logic, reference, heat_path = case
    server = _server_regions()
    heat = _show(logic, reference, heat_path, server)
    seg, table, regions = logic.make_regions(heat)  # threshold: the display's = the server's pixel threshold
    assert logic.regions_source == "server" and logic.regions_note == ""
    assert [r.source for r in regions] == ["server"] * len(server)
    assert [r.mean for r in regions] == pytest.approx([r["mean"] for r in server])  # the server's numbers
    for got, want in zip(regions, server):
        assert got.n_voxels == want["n_voxels"] and got.volume_mm3 == pytest.approx(want["volume_mm3"])
        np.testing.assert_allclose(got.centroid_ras, want["centroid_ras"])
        np.testing.assert_allclose(got.centroid_ijk, want["centroid_voxel"])  # same axes here (a right-handed grid)
    # the segments still come from the heatmap's voxels, one per row, in the same order
    assert _segment_voxels(seg, reference) == [r["n_voxels"] for r in server]
    assert table.GetAttribute("AnomalyDetection.regionsSource") == "server"
    assert table.GetTable().GetValueByName(0, "Mean").ToDouble() == pytest.approx(server[0]["mean"])
    np.testing.assert_allclose(logic.region_centroid_from_table(table, 1), server[1]["centroid_ras"])


def test_threshold_moved_away_recomputes_from_the_heatmap(case):
    logic, reference, heat_path = case
    heat = _show(logic, reference, heat_path, _server_regions())
    logic.set_threshold(heat, 0.65)  # the slider moved
    _, _, regions = logic.make_regions(heat)
    assert logic.regions_source == "heatmap" and "not the server's" in logic.regions_note
    expected = testing.expected_regions(0.65)
    assert [r.n_voxels for r in regions] == [r["n_voxels"] for r in expected]
    assert [r.mean for r in regions] == pytest.approx([r["mean"] for r in expected])  # not the server's means
    assert {r.source for r in regions} == {"heatmap"}
    # back at the server's value (as the parameter node stores it): the server's rows again
    logic.set_threshold(heat, SERVER_T)
    logic.make_regions(heat)
    assert logic.regions_source == "server"


def test_server_without_regions_falls_back(case):
    logic, reference, heat_path = case
    heat = _show(logic, reference, heat_path, None)  # an older app: no "regions" in the JSON
    assert logic.server_regions(heat) is None
    _, _, regions = logic.make_regions(heat)
    assert logic.regions_source == "heatmap" and logic.regions_note == ""
    assert [r.n_voxels for r in regions] == [r["n_voxels"] for r in testing.expected_regions(SERVER_T)]


def test_truncated_server_list_is_completed_from_the_heatmap(case):
    """The app lists its top_regions strongest regions only; the rest are computed here, after them."""
    logic, reference, heat_path = case
    server = _server_regions()[:2]
    heat = _show(logic, reference, heat_path, server, n_regions=3)
    seg, _, regions = logic.make_regions(heat)
    assert logic.regions_source == "server+heatmap"
    assert [r.source for r in regions] == ["server", "server", "heatmap"]
    assert [r.label for r in regions] == [1, 2, 3]
    assert _segment_voxels(seg, reference) == [32, 18, 1]


def test_min_voxels_filters_the_server_rows_too(case):
    logic, reference, heat_path = case
    heat = _show(logic, reference, heat_path, _server_regions())
    _, _, regions = logic.make_regions(heat, min_voxels=2)
    assert logic.regions_source == "server" and [r.n_voxels for r in regions] == [32, 18]


def test_server_regions_that_do_not_match_are_not_used(case):
    logic, reference, heat_path = case
    server = _server_regions()
    server[1]["n_voxels"] += 5  # e.g. a server that thresholds differently, or another heatmap
    heat = _show(logic, reference, heat_path, server)
    _, _, regions = logic.make_regions(heat)
    assert logic.regions_source == "heatmap" and "do not match" in logic.regions_note
    assert [r.n_voxels for r in regions] == [32, 18, 1]


def test_server_regions_without_ras_centroids_match_by_voxel_centroid(case):
    logic, reference, heat_path = case
    server = _server_regions()
    for r in server:
        r.pop("centroid_ras")
    heat = _show(logic, reference, heat_path, server)
    _, _, regions = logic.make_regions(heat)
    assert logic.regions_source == "server"
    want = [r["centroid_ras"] for r in testing.expected_regions(SERVER_T)]
    np.testing.assert_allclose([r.centroid_ras for r in regions], want, atol=1e-4)  # from this volume's geometry


def test_server_regions_elsewhere_are_not_used(case):
    logic, reference, heat_path = case
    server = _server_regions()
    server[0]["centroid_ras"][0] += 3.0  # another position: not this heatmap's region
    heat = _show(logic, reference, heat_path, server)
    logic.make_regions(heat)
    assert logic.regions_source == "heatmap" and "do not match" in logic.regions_note


# ------------------------------------------------------------------------------------------------ one rule: ">="
def test_threshold_rule_is_at_or_above_in_the_heatmaps_type():
    below = np.nextafter(np.float32(0.35), np.float32(0))
    values = np.array([0.1, below, 0.35, 0.9], np.float32)
    assert at_or_above(values, 0.35).tolist() == [False, False, True, True]  # 0.35 compared as float32
    assert at_or_above(values, float(np.float32(0.35))).tolist() == [False, False, True, True]
    assert display_lower_bound(0.35, np.float32) == float(np.float32(0.35))
    assert display_lower_bound(2.5, np.int16) == 3.0 and display_lower_bound(2.0, np.int16) == 2.0
    assert same_threshold(0.35, float(np.float32(0.35)), np.float32)
    assert not same_threshold(0.35, 0.3501, np.float32)


@pytest.mark.parametrize("threshold", [0.6, float(np.float32(0.7)), 0.65, 0.9])
def test_a_blob_at_the_threshold_is_a_region_and_shown(case, threshold):
    """A voxel equal to the threshold is anomalous: in the regions and drawn in the overlay; below it, neither."""
    logic, reference, heat_path = case
    heat = logic.show_heatmap(reference, heat_path, threshold=threshold)
    _, _, regions = logic.make_regions(heat, threshold)
    expected = testing.expected_regions(threshold)
    assert [r.n_voxels for r in regions] == [r["n_voxels"] for r in expected]
    # run the display node's own pipeline (what the slice views draw): alpha > 0 exactly above the threshold
    display = heat.GetDisplayNode()
    display.SetInputImageDataConnection(heat.GetImageDataConnection())
    producer = display.GetOutputImageDataConnection().GetProducer()
    producer.Update()
    rgba = vtk.util.numpy_support.vtk_to_numpy(producer.GetOutputDataObject(0).GetPointData().GetScalars())
    shown = rgba[:, 3] > 0
    heat_values = slicer.util.arrayFromVolume(heat).ravel()
    np.testing.assert_array_equal(shown, at_or_above(heat_values, threshold))
    assert int(shown.sum()) == sum(r["n_voxels"] for r in expected)


@pytest.mark.parametrize("threshold", [0.1, 0.55, 0.6, float(np.float32(0.7)), 0.9])
def test_regions_agree_with_the_library(case, threshold):
    scoring = pytest.importorskip("spmamba.scoring")
    logic, reference, heat_path = case
    heat = logic.show_heatmap(reference, heat_path, threshold=threshold)
    _, _, regions = logic.make_regions(heat, threshold)
    _, heat_ijk = testing.synthetic_arrays()
    lib = scoring.find_regions(heat_ijk, threshold, testing.ijk_to_ras())
    assert [r.n_voxels for r in regions] == [r["n_voxels"] for r in lib]
    for got, want in zip(regions, lib):
        np.testing.assert_allclose(got.centroid_ras, want["centroid_ras"], atol=1e-4)
        assert got.peak == pytest.approx(want["peak"]) and got.mean == pytest.approx(want["mean"])


def test_regions_table_reads_back(case):
    """What the panel shows after a scene load: the table node's rows."""
    logic, reference, heat_path = case
    heat = _show(logic, reference, heat_path, _server_regions())
    _, table, regions = logic.make_regions(heat)
    assert logic.regions_table(reference) is table
    back = logic.regions_from_table(table)
    assert [(r.label, r.n_voxels, r.source) for r in back] == [(r.label, r.n_voxels, "server") for r in regions]
    for got, want in zip(back, regions):
        assert got.mean == pytest.approx(want.mean) and got.volume_mm3 == pytest.approx(want.volume_mm3)
        np.testing.assert_allclose(got.centroid_ras, want.centroid_ras)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_library_written_heatmap_and_regions_match(scene, tmp_path, suffix):
    """The app's conventions end to end without a server: the heatmap written by ``spmamba.io.save_volume``
    (NIfTI, or NRRD in LPS) on an oblique grid and its regions from ``spmamba.scoring.find_regions`` (voxel indices
    of that array, RAS centroids from its affine) are matched to the segments made here, and agree with them."""
    scoring = pytest.importorskip("spmamba.scoring")
    volume_io = pytest.importorskip("spmamba.io")
    _, heat_ijk = testing.synthetic_arrays()
    c, s_ = np.cos(0.3), np.sin(0.3)
    affine = np.array([[-1.5 * c, 2.0 * s_, 0, 12.0], [1.5 * s_, 2.0 * c, 0, -7.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    image_path, heat_path = tmp_path / f"img{suffix}", tmp_path / f"heat{suffix}"
    volume_io.save_volume(heat_ijk * 0 + 1.0, affine, image_path)
    volume_io.save_volume(heat_ijk, affine, heat_path)
    logic = AnomalyLogic()
    reference = logic.load_volume(str(image_path), name="img")
    server = scoring.find_regions(heat_ijk, 0.55, affine)
    result = DetectionResult(params={"pixel_threshold": 0.55, "regions": server, "n_regions": len(server)},
                             heatmap_path=str(heat_path))
    heat = logic.show_heatmap(reference, str(heat_path), result=result)
    _, _, regions = logic.make_regions(heat)
    assert logic.regions_source == "server", logic.regions_note
    local = logic.compute_regions(heat, 0.55)[1]
    assert [r.n_voxels for r in regions] == [r.n_voxels for r in local] == [32, 18, 1]
    for got, mine in zip(regions, local):
        np.testing.assert_allclose(got.centroid_ras, mine.centroid_ras, atol=1e-3)  # same world position
