"""Detect path of the module against a real MONAI Label server running a minimal test app (tests/slicer/mini_app).

Needs no trained SP-Mamba model: it checks the upload, MONAI Label's own multipart answer, the float heatmap and its
overlay on the input grid, for a study sent by datastore id and for a local volume sent as a file.
"""
from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np
import pytest
import slicer
import vtk

from AnomalyDetectionLib import testing
from AnomalyDetectionLib.logic import AnomalyLogic
from AnomalyDetectionLib.tasks import TaskRunner
from server_utils import monailabel_server

pytestmark = pytest.mark.slow

MINI_APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mini_app")


@pytest.fixture(scope="module")
def mini_server(tmp_path_factory):
    if importlib.util.find_spec("monailabel") is None:
        pytest.skip("monailabel is not installed")
    root = tmp_path_factory.mktemp("mini_server")
    studies = root / "studies"
    studies.mkdir()
    import nibabel as nib

    image, _ = testing.synthetic_arrays()
    nib.save(nib.Nifti1Image(image, testing.ijk_to_ras()), str(studies / "case1.nii.gz"))
    app_dir = root / "mini_app"  # a copy: MONAI Label writes logs/ and model/ into the app folder
    app_dir.mkdir()
    shutil.copy(os.path.join(MINI_APP, "main.py"), str(app_dir / "main.py"))
    with monailabel_server(str(app_dir), str(studies), str(root / "server.log")) as url:
        yield url


def _matrix(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def _detect(logic, job):
    runner = TaskRunner()
    out = []
    runner.submit("detect", logic.run_detection, job, on_done=out.append, on_error=out.append)
    runner.wait(120)
    assert out and not isinstance(out[0], BaseException), out
    return out[0]


def test_detect_by_id_and_by_upload(mini_server, scene, tmp_path):
    logic = AnomalyLogic(mini_server)
    summary = logic.connect()
    assert summary.models == ["spmamba"]

    # a datastore study: download, load, detect by id, overlay
    path = logic.client.download_image("case1", out_dir=str(tmp_path))
    reference = logic.load_case("case1", path)
    job = logic.prepare_detection(reference)
    assert job.image_id == "case1" and job.file_path is None
    result = _detect(logic, job)
    assert (result.pixel_threshold, result.model_version, result.image_id) == (2.0, "mini-1", "case1")
    heat = logic.show_heatmap(reference, result.heatmap_path, result=result)
    assert logic.geometry_warning == ""
    assert heat.GetImageData().GetScalarTypeAsString() == "float"
    np.testing.assert_allclose(_matrix(heat), _matrix(reference))
    ref = slicer.util.arrayFromVolume(reference).astype(np.float64)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heat), np.abs(ref - ref.mean()) / (ref.std() + 1e-6),
                               rtol=1e-4, atol=1e-4)
    assert heat.GetDisplayNode().GetLowerThreshold() == pytest.approx(2.0)
    seg, table, regions = logic.make_regions(heat, 2.0, min_voxels=10)
    sizes = sorted((r.n_voxels for r in regions), reverse=True)
    assert len(sizes) >= 2 and sizes[0] >= 32 and sizes[1] >= 18  # the bright synthetic blobs (plus noise neighbours)
    assert seg.GetSegmentation().GetNumberOfSegments() == len(regions) == table.GetNumberOfRows()

    # a local volume: written as NRRD, uploaded to the studies, then detected by its new id
    local = testing.add_volume(testing.synthetic_arrays(seed=3)[0], "local scan")
    job = logic.prepare_detection(local, add_to_studies=True)
    result = _detect(logic, job)
    assert result.image_id == "local_scan" and "local_scan" in logic.client.curation_states()
    heat = logic.show_heatmap(local, result.heatmap_path, result=result)
    assert logic.geometry_warning == ""
    np.testing.assert_allclose(_matrix(heat), _matrix(local), atol=1e-5)
    assert logic.image_id_of(local) == "local_scan"
    counts = logic.mark("local_scan", "normal")
    assert counts["normal"] == 1

    # a local volume sent with the request only (not added to the studies)
    other = testing.add_volume(testing.synthetic_arrays(seed=4)[0], "other")
    result = _detect(logic, logic.prepare_detection(other, add_to_studies=False))
    assert result.image_id is None and "other" not in logic.client.curation_states()
    logic.show_heatmap(other, result.heatmap_path, result=result)
    assert logic.geometry_warning == ""
