"""The module's Logic and client against a real MONAI Label server running apps/spmamba_app on 127.0.0.1.

The server is started once for this file (``python -m monailabel.main start_server ...``) on a free port with a
temporary studies folder of small volumes, and stopped at the end. It runs a copy of the app folder: MONAI Label
writes logs/ and the trained model/ into the folder of the app it runs, and a model left in the repository's
apps/spmamba_app/model would be served by `spmamba serve` afterwards (tests/conftest.py fails the run if that
folder changes). The curation part needs only the app; the train -> publish -> detect -> overlay part also needs
the core library's detector and trainer.
"""
from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import pytest

from AnomalyDetectionLib.client import ServerError
from AnomalyDetectionLib.logic import AnomalyLogic
from AnomalyDetectionLib.tasks import TaskRunner
from app_folder_guard import app_copy
from server_utils import monailabel_server

pytestmark = pytest.mark.slow

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
APP_DIR = os.path.join(REPO, "apps", "spmamba_app")
N_STUDIES = 5
SHAPE = (32, 32, 8)


def _phantom(seed: int, lesion: bool = False) -> np.ndarray:
    """A smooth ellipsoid 'organ' with mild noise; ``lesion`` adds a bright blob."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    organ = ((x / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 1.2) ** 2) < 1.0
    vol = 100.0 * organ + rng.normal(0, 3.0, SHAPE)
    if lesion:
        vol[18:23, 10:15, 3:6] += 120.0
    return vol.astype(np.float32)


def _write(path: str, array: np.ndarray) -> str:
    import nibabel as nib

    affine = np.diag([1.2, 1.2, 3.0, 1.0])
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not os.path.isfile(os.path.join(APP_DIR, "main.py")):
        pytest.skip("apps/spmamba_app is not in this checkout yet")
    if importlib.util.find_spec("monailabel") is None:
        pytest.skip("monailabel is not installed")
    root = tmp_path_factory.mktemp("slicer_server")
    studies = root / "studies"
    studies.mkdir()
    for i in range(N_STUDIES):
        _write(str(studies / f"study{i}.nii.gz"), _phantom(i, lesion=(i == N_STUDIES - 1)))
    log_path = str(root / "server.log")
    app = app_copy(root / "app")
    conf = {"min_normals": "2", "epochs": "1", "auto_score": "false", "stop_grace_s": "5",
            "model_dir": str(root / "model")}
    with monailabel_server(str(app), str(studies), log_path, conf) as url:
        yield {"url": url, "studies": str(studies), "root": str(root), "log": log_path}


def _log_tail(server) -> str:
    with open(server["log"], errors="replace") as f:
        return f.read()[-4000:]


def test_connect_curate_and_next_case(server, scene, tmp_path):
    logic = AnomalyLogic(server["url"])
    summary = logic.connect()
    assert "spmamba" in summary.models and "spmamba_seg" not in summary.models
    assert "spmamba" in summary.trainers
    assert summary.strategies, "the app lists its active-learning strategies"

    counts = logic.curation_counts()
    assert sum(counts.values()) == N_STUDIES and counts["unreviewed"] == N_STUDIES

    # curation through the client, as the three buttons do
    assert logic.mark("study0", "normal")["normal"] == 1
    assert logic.mark("study1", "abnormal")["abnormal"] == 1
    counts = logic.mark("study2", "excluded")
    assert counts == {"normal": 1, "abnormal": 1, "excluded": 1, "unreviewed": N_STUDIES - 3}
    assert logic.client.image_info("study1")["curation"] == "abnormal"
    with pytest.raises(ServerError, match="not a study on the server"):
        logic.mark(None, "normal")

    # too few normals: the server refuses the training with a message saying why
    with pytest.raises(ServerError) as e:
        logic.start_training({"max_epochs": 1})
    assert e.value.kind == "refused" and "normal" in str(e.value)

    # "Next suspicious case" with a strategy that needs no model, loaded into the scene by its datastore id
    strategy = "random" if "random" in summary.strategies else summary.strategies[0]
    runner = TaskRunner()
    found = []
    runner.submit("next", logic.fetch_next_case, strategy, on_done=found.append, on_error=found.append)
    runner.wait(60)
    assert found and not isinstance(found[0], BaseException), found
    image_id, path = found[0].image_id, found[0].path
    assert image_id.startswith("study") and os.path.isfile(path)
    node = logic.load_case(image_id, path)
    assert logic.image_id_of(node) == image_id
    assert node.GetImageData().GetDimensions() == SHAPE
    assert not os.path.exists(path) and os.listdir(logic.work_dir) == []  # the download is gone once loaded
    logic.close()



def test_train_publish_detect_and_overlay(server, scene, tmp_path):
    missing = [m for m in ("spmamba.io", "spmamba.detector", "spmamba.train") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the core library has not landed in this checkout yet (missing {', '.join(missing)})")
    logic = AnomalyLogic(server["url"])
    for i in (0, 1, 3):
        logic.mark(f"study{i}", "normal")
    version_before = logic.connect().model_version("spmamba")
    logic.start_training({"max_epochs": 1})
    with pytest.raises(ServerError) as e:  # one training at a time
        logic.start_training({"max_epochs": 1})
    assert e.value.kind == "refused"

    deadline = time.time() + 240
    seen_running = False
    while True:
        progress = logic.training_progress()
        seen_running |= progress.running
        if not progress.running and progress.status:
            break
        assert time.time() < deadline, f"training did not finish:\n{_log_tail(server)}"
        time.sleep(1.0)
    assert progress.status == "DONE", f"{progress}\n{_log_tail(server)}"
    assert progress.percent == 100
    assert progress.model_version and progress.model_version != version_before
    assert logic.connect().model_version("spmamba") == progress.model_version

    # detect on the study with a lesion, by datastore id, and show it over the downloaded study
    image_id = f"study{N_STUDIES - 1}"
    reference = logic.load_case(image_id, logic.client.download_image(image_id, out_dir=str(tmp_path)))
    job = logic.prepare_detection(reference)
    assert job.image_id == image_id and job.file_path is None
    result = logic.run_detection(job)
    assert result.score is not None and result.pixel_threshold is not None
    assert result.verdict in ("normal", "abnormal")
    heat = logic.show_heatmap(reference, result.heatmap_path, result=result)
    assert logic.geometry_warning == ""
    assert heat.GetImageData().GetDimensions() == SHAPE
    assert heat.GetImageData().GetScalarTypeAsString() == "float"
    assert heat.GetDisplayNode().GetLowerThreshold() == pytest.approx(result.pixel_threshold, rel=1e-5, abs=1e-6)
    seg, table, regions = logic.make_regions(heat, result.pixel_threshold)
    assert seg.GetSegmentation().GetNumberOfSegments() == len(regions) == table.GetNumberOfRows()
    if result.regions is not None:  # the app's regions are used: matched to the segments made here, none missing
        assert logic.regions_source in ("server", "server+heatmap"), logic.regions_note
        assert len(regions) == result.n_regions
        assert [r.n_voxels for r in regions[:len(result.regions)]] == [r["n_voxels"] for r in result.regions]

    # a local volume sent as a file (not added to the studies)
    from AnomalyDetectionLib import testing

    assert not os.path.exists(result.heatmap_path)  # removed once in the scene
    local = testing.add_volume(_phantom(7), "another scan")
    job = logic.prepare_detection(local, add_to_studies=False)
    result = logic.run_detection(job)
    assert result.image_id is None and os.path.isfile(result.heatmap_path)
    assert not os.path.exists(job.file_path)  # the copy written for the upload: removed once sent
    assert "another_scan" not in logic.client.curation_states()

    # a local volume goes up to the datastore (so that it can be curated) when detection starts
    local = testing.add_volume(_phantom(42), "local scan")
    result = logic.run_detection(logic.prepare_detection(local, add_to_studies=True))
    assert result.image_id == "local_scan" and logic.client.curation_states()["local_scan"] == "unreviewed"
    logic.mark("local_scan", "excluded")

    # stop answers even when nothing runs
    logic.stop_training()
