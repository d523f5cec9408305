"""Units of the app that need neither a model nor a server: --conf parsing, the datastore's file safety."""
from __future__ import annotations

import json
import sys
import threading

import pytest
from app_helpers import APP_DIR


@pytest.fixture(scope="module")
def applib():
    sys.path.insert(0, str(APP_DIR))
    try:
        import lib.configs as configs
        import lib.datastore as datastore
        import lib.routes as routes

        yield configs, datastore, routes
    finally:
        sys.path.remove(str(APP_DIR))


def test_parse_conf_defaults_and_errors(applib, tmp_path):
    configs = applib[0]
    s = configs.parse_conf(str(tmp_path), str(tmp_path / "studies"), {})
    assert s.preset == "fast" and s.device == "auto" and s.slice_axis is None and s.unflagged_normal is False
    assert s.published_model == str((tmp_path / "model" / "spmamba.pt").resolve())
    s = configs.parse_conf(str(tmp_path), "x", {"slice_axis": "axial", "unflagged_normal": "yes", "model": str(tmp_path / "m.pt")})
    assert s.slice_axis == 2 and s.unflagged_normal is True and s.model.endswith("m.pt")
    assert s.train_processes == 1
    assert configs.parse_conf(str(tmp_path), "x", {"train_processes": "2"}).train_processes == 2
    for bad in ({"slice_axis": "7"}, {"device": "tpu"}, {"unflagged_normal": "perhaps"}, {"epochs": "-1"},
                {"encoder_weights": str(tmp_path / "missing.pt")}, {"train_processes": "0"},
                {"train_processes": "two"}):
        with pytest.raises(ValueError) as e:
            configs.parse_conf(str(tmp_path), "x", bad)
        assert list(bad)[0] in str(e.value)


def test_upload_suffix_is_sanitised(applib):
    routes = applib[2]
    assert routes.upload_suffix("brain.nii.gz") == ".nii.gz"
    assert routes.upload_suffix("a.b.c.nrrd") == ".c.nrrd"
    assert routes.upload_suffix("../../evil.n$ii") == ".nii"
    assert routes.upload_suffix(None) == ".nii.gz"


def _datastore(applib, path):
    return applib[1].CuratedDatastore(str(path), extensions=["*.nii.gz"], auto_reload=False)


def test_two_processes_never_lose_each_others_updates(applib, tmp_path, tiny_data):
    """The server and a scoring subprocess each hold a datastore; both write -> both updates survive."""
    import shutil

    for i in range(3):
        shutil.copy(tiny_data["normal"][i], tmp_path / f"s{i}.nii.gz")
    server, worker = _datastore(applib, tmp_path), _datastore(applib, tmp_path)
    server.update_image_info("s0", {"curation": "normal"})
    worker.update_image_info("s1", {"anomaly": {"score": 1.0}})  # worker's copy predates the server's write
    server.update_image_info("s2", {"curation": "abnormal"})
    data = json.loads((tmp_path / "datastore_v2.json").read_text())["objects"]
    assert data["s0"]["image"]["info"]["curation"] == "normal"
    assert data["s1"]["image"]["info"]["anomaly"] == {"score": 1.0}
    assert data["s2"]["image"]["info"]["curation"] == "abnormal"
    assert server.get_image_info("s1")["anomaly"] == {"score": 1.0}  # reads pick up other writers


def test_concurrent_updates_keep_the_file_valid(applib, tmp_path, tiny_data):
    import shutil

    for i in range(4):
        shutil.copy(tiny_data["normal"][0], tmp_path / f"s{i}.nii.gz")
    stores = [_datastore(applib, tmp_path) for _ in range(4)]

    def hammer(k):
        for j in range(25):
            stores[k].update_image_info(f"s{k}", {"n": j, "curation": "normal" if j % 2 else "excluded"})

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    data = json.loads((tmp_path / "datastore_v2.json").read_text())["objects"]
    assert all(data[f"s{k}"]["image"]["info"]["n"] == 24 for k in range(4))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_curation_csv_seeds_only_unset_states(applib, tmp_path, tiny_data):
    import shutil

    for i in range(3):
        shutil.copy(tiny_data["normal"][i], tmp_path / f"s{i}.nii.gz")
    ds = _datastore(applib, tmp_path)
    ds.update_image_info("s0", {"curation": "excluded"})
    csv = tmp_path / "curation.csv"
    csv.write_text("id,curation\ns0,normal\ns1,normal\ns2,bogus\nmissing,normal\n")
    assert ds.seed_curation(str(csv)) == 1
    assert ds.training_studies(False) == ["s1"]
    assert ds.training_studies(True) == ["s1", "s2"]
    assert ds.curation("s0") == "excluded"


def test_datastore_lists_every_volume_the_library_reads_with_its_ids(applib, tmp_path, tiny_data):
    """One list of volume suffixes and one id rule (spmamba.io): a detached-header NRRD study is listed too."""
    import shutil

    import nrrd
    from spmamba.io import load_volume

    shutil.copy(tiny_data["normal"][0], tmp_path / "sub-1.v2.nii.gz")
    nrrd.write(str(tmp_path / "head.nhdr"), load_volume(tiny_data["normal"][1]).array)  # + head.raw.gz beside it
    ds = applib[1].CuratedDatastore(str(tmp_path), auto_reload=False)
    assert sorted(ds.list_images()) == ["head", "sub-1.v2"]
    assert ds.get_image_uri("head").endswith("head.nhdr")
    assert load_volume(ds.get_image_uri("head")).array.shape == load_volume(tiny_data["normal"][1]).array.shape


def test_routes_are_module_level_endpoints_put_in_front_once(applib):
    from fastapi import FastAPI

    routes = applib[2]
    app = FastAPI()
    routes.install(app)
    routes.install(app)  # installing again replaces, never duplicates
    names = [r.name for r in app.router.routes if r.name.startswith(routes.ROUTE_PREFIX)]
    assert sorted(names) == sorted(endpoint.__name__ for _, endpoint, _, _ in routes.ROUTES)
    assert all(getattr(routes, endpoint.__name__) is endpoint for _, endpoint, _, _ in routes.ROUTES)
    assert [r.name for r in app.router.routes[: len(names)]] == names  # ahead of every stock route


def _train_detector_arguments(settings, tiny_data, monkeypatch) -> dict:
    """Run the app's training task with ``train_detector`` replaced by a stub that records its keyword arguments and
    stops there (no training in a unit test); returns those arguments."""
    import spmamba.train
    from lib.trainers import AnomalyTrain

    seen = {}

    def fake_train_detector(images, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("not training in a unit test")

    monkeypatch.setattr(spmamba.train, "train_detector", fake_train_detector)
    task = AnomalyTrain(settings)
    monkeypatch.setattr(task, "precheck", lambda request, datastore: [str(p) for p in tiny_data["normal"][:2]])
    with pytest.raises(RuntimeError, match="not training"):
        task({}, datastore=None)
    return seen


def test_slice_axis_is_a_training_setting(applib, tmp_path, tiny_data, tiny_model, monkeypatch):
    """--conf slice_axis sets the axis new models are trained on; detection always uses the served model's."""
    from lib.detection import Detection
    from lib.model_store import ModelStore

    settings = applib[0].parse_conf(str(tmp_path), str(tmp_path / "studies"),
                                    {"slice_axis": "sagittal", "model": str(tiny_model)})
    assert settings.slice_axis == 0
    detection = Detection(settings, ModelStore(settings.published_model, settings.model, "cpu"))
    volume, result, detector, _ = detection.run(str(tiny_data["normal"][0]))
    assert result.slice_axis == detector.preprocessing.slice_axis == 2

    seen = _train_detector_arguments(settings, tiny_data, monkeypatch)
    assert seen["preprocessing"].slice_axis == 0


def test_detection_holds_a_foreground_marker_and_training_pauses_for_it(applib, tmp_path, tiny_data, tiny_model,
                                                                         monkeypatch):
    """An infer-path detection holds a marker in <model_dir>/.foreground while it detects (scoring does not); the
    training task's ``paused`` sees it."""
    import os

    from lib.detection import Detection
    from lib.model_store import ModelStore
    from spmamba.cpu import foreground, foreground_busy
    from spmamba.detector import Detector

    settings = applib[0].parse_conf(str(tmp_path), str(tmp_path / "studies"), {"model": str(tiny_model)})
    assert settings.foreground_dir == os.path.join(settings.model_dir, ".foreground")
    detection = Detection(settings, ModelStore(settings.published_model, settings.model, "cpu"))
    seen_busy = []
    detect = Detector.detect

    def observed(self, *args, **kwargs):  # the real detection, noting whether a marker is held meanwhile
        seen_busy.append(foreground_busy(settings.foreground_dir))
        return detect(self, *args, **kwargs)

    monkeypatch.setattr(Detector, "detect", observed)
    detection.run(str(tiny_data["normal"][0]))
    detection.run(str(tiny_data["normal"][0]), foreground=False)  # scoring's way: background work
    assert seen_busy == [True, False]
    assert not os.listdir(settings.foreground_dir)  # removed after the detection

    seen = _train_detector_arguments(settings, tiny_data, monkeypatch)
    assert seen["paused"]() is False
    with foreground(settings.foreground_dir):
        assert seen["paused"]() is True
    assert seen["paused"]() is False
