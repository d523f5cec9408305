"""Model versions from the Slicer module against a real SP-Mamba MONAI Label server: list, roll back, detect.

Two untrained tiny models are published into the server's model folder before it starts (no training needed); the
module's Logic lists them, rolls back to the older one and the next detection answers with that version.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import pytest

from AnomalyDetectionLib import testing
from AnomalyDetectionLib.client import ServerError
from AnomalyDetectionLib.logic import AnomalyLogic
from AnomalyDetectionLib.tasks import TaskRunner
from server_utils import monailabel_server

pytestmark = pytest.mark.slow

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
APP_DIR = os.path.join(REPO, "apps", "spmamba_app")


def _detector(seed: int):
    import torch
    from spmamba.detector import Calibration, Detector
    from spmamba.models import SPMamba, get_config

    torch.manual_seed(seed)
    det = Detector(SPMamba(get_config("tiny")), device="cpu",
                   calibration=Calibration(pixel_threshold=1.0 + seed, volume_threshold=1.0 + seed, n_volumes=1))
    det.meta["created"] = f"2025-01-0{seed}T12:00:00"
    det.meta["training"] = {"epochs": seed, "steps": 5 * seed, "stopped_early": False}
    return det


@pytest.fixture(scope="module")
def versions_server(tmp_path_factory):
    if importlib.util.find_spec("monailabel") is None:
        pytest.skip("monailabel is not installed")
    root = tmp_path_factory.mktemp("versions_server")
    studies = root / "studies"
    studies.mkdir()
    import nibabel as nib

    image, _ = testing.synthetic_arrays()
    nib.save(nib.Nifti1Image(image, testing.ijk_to_ras()), str(studies / "case1.nii.gz"))
    app_dir = root / "app"  # a copy: MONAI Label writes logs/ into the app folder
    shutil.copytree(APP_DIR, app_dir, ignore=shutil.ignore_patterns("model", "logs", "__pycache__", "*.pt"))
    model_dir = root / "model"
    sys.path.insert(0, str(app_dir))
    try:
        from lib.versions import VersionHistory
    finally:
        sys.path.remove(str(app_dir))
    history = VersionHistory(str(model_dir), str(model_dir / "spmamba.pt"), keep=5)
    old, new = _detector(1), _detector(2)
    history.publish(old, extra={"n_studies": 3})
    history.publish(new, extra={"n_studies": 4})
    conf = {"model_dir": str(model_dir), "auto_score": "false", "device": "cpu"}
    with monailabel_server(str(app_dir), str(studies), str(root / "server.log"), conf=conf) as url:
        yield url, old.version, new.version


def _run(fn, *args):
    runner = TaskRunner()
    out = []
    runner.submit("job", fn, *args, on_done=out.append, on_error=out.append)
    runner.wait(120)
    assert out and not isinstance(out[0], BaseException), out
    return out[0]


def test_list_roll_back_and_detect_with_the_restored_version(versions_server, scene, tmp_path):
    url, old, new = versions_server
    logic = AnomalyLogic(url)
    assert logic.connect().model_version("spmamba") == new

    versions = _run(logic.model_versions)
    assert versions.supported and versions.current == new
    assert [v["version"] for v in versions.versions] == [new, old]
    assert versions.labels[0].startswith(f"{new}  tiny  2025-01-02 12:00") and versions.labels[0].endswith("(served)")
    assert "1 epochs, 5 steps, 3 studies" in versions.labels[1]

    answer = _run(logic.rollback, old)
    assert answer["version"] == old and answer["previous_version"] == new
    assert logic.connect().model_version("spmamba") == old
    assert _run(logic.model_versions).current == old

    path = logic.client.download_image("case1", out_dir=str(tmp_path))
    reference = logic.load_case("case1", path)
    result = _run(logic.run_detection, logic.prepare_detection(reference))
    assert result.model_version == old  # the restored model answers

    with pytest.raises(ServerError) as e:
        logic.rollback("0123456789ab")
    assert e.value.kind == "not_found"
