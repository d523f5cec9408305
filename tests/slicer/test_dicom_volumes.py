"""Volumes loaded from Slicer's DICOM browser (a scalar volume with no storage node whose subject-hierarchy item
carries the series' DICOM UID): detected by SeriesInstanceUID on a server whose studies are a PACS, as a file
otherwise; label maps are refused."""
from __future__ import annotations

import numpy as np
import pytest
import slicer

from AnomalyDetectionLib.client import ServerSummary  # noqa: E402
from AnomalyDetectionLib.logic import AnomalyLogic  # noqa: E402

SERIES_UID = "1.2.826.0.1.3680043.8.498.1234567890"


def _dicom_volume(scene):
    """What Slicer's DICOMScalarVolumePlugin leaves: a scalar volume (int16, no storage node) and a subject
    hierarchy item with the series' UID under the 'DICOM' name."""
    node = slicer.util.addVolumeFromArray(np.arange(6 * 8 * 10, dtype=np.int16).reshape(6, 8, 10),
                                          ijkToRAS=np.diag([-1.0, -1.0, 2.0, 1.0]), name="3: T1 MPRAGE")
    sh = scene.GetSubjectHierarchyNode()
    item = sh.GetItemByDataNode(node) or sh.CreateItem(sh.GetSceneItemID(), node)
    sh.SetItemUID(item, "DICOM", SERIES_UID)
    return node


def test_a_dicom_volume_goes_by_its_series_uid_to_a_pacs_server(scene):
    logic = AnomalyLogic()
    node = _dicom_volume(scene)
    assert node.GetStorageNode() is None
    assert logic.dicom_series_uid(node) == SERIES_UID
    logic.summary = ServerSummary(studies={"kind": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web"})
    assert logic.study_id(node) == SERIES_UID  # curation works before any detection
    logic.store_in_pacs = True
    job = logic.prepare_detection(node, add_to_studies=True)
    assert job.series_uid == SERIES_UID and job.file_path is None and job.image_id is None
    assert job.add_to_studies is False and job.store_results is True  # the PACS owns the studies


def test_a_series_the_pacs_lacks_goes_as_the_file_written_on_the_main_thread(scene):
    """The worker never reads the scene (MRML is not thread-safe): the file for the fall-back is written by
    prepare_detection; run_detection, in another thread, sends it when the PACS answers 'not found', then removes it."""
    import os
    import threading

    from AnomalyDetectionLib.client import DetectionResult, ServerError

    logic = AnomalyLogic()
    node = _dicom_volume(scene)
    logic.summary = ServerSummary(studies={"kind": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web"})
    job = logic.prepare_detection(node)
    assert job.file_path is None and os.path.isfile(job.fallback_path)
    sent = []

    class Client:
        def detect(self, image_id=None, file_path=None, model=None, out_dir=None, params=None):
            if image_id:
                raise ServerError("no such series", kind="not_found", status=404)
            sent.append((file_path, os.path.isfile(file_path), threading.current_thread() is threading.main_thread()))
            return DetectionResult({}, os.path.join(out_dir, "h.nii.gz"))

    logic.client = Client()
    results = []
    worker = threading.Thread(target=lambda: results.append(logic.run_detection(job)))
    worker.start()
    worker.join(30)
    assert results and sent and sent[0][1] and sent[0][2] is False, (results, sent)
    assert "not in the server's PACS" in job.note
    assert not os.path.exists(sent[0][0])  # removed once sent


def test_a_dicom_volume_is_sent_as_a_file_to_a_folder_server(scene):
    logic = AnomalyLogic()
    node = _dicom_volume(scene)
    logic.summary = ServerSummary(studies={"kind": "local", "folder": "/srv/studies"})
    assert logic.study_id(node) is None
    job = logic.prepare_detection(node, add_to_studies=True)
    assert job.file_path and job.file_path.endswith("3_T1_MPRAGE.nrrd") and job.store_results is False
    written = logic.load_volume(job.file_path)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(written), slicer.util.arrayFromVolume(node))


def test_a_label_map_is_not_an_input(scene):
    logic = AnomalyLogic()
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "seg")
    slicer.util.updateVolumeFromArray(labels, np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="label map"):
        logic.prepare_detection(labels)
