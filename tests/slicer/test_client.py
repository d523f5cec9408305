"""The module's client and task runner against small local HTTP servers: formats, errors, timeouts, threads."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from AnomalyDetectionLib.client import (
    AnomalyClient,
    DetectionResult,
    ServerError,
    decode_multipart,
    encode_multipart,
    normalize_url,
    summarize_info,
    train_progress,
)
from AnomalyDetectionLib.tasks import TaskRunner


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Fake:
    """A tiny HTTP server: ``routes[(method, path)] = (status, content_type, body_bytes | callable, delay_s)``."""

    def __init__(self):
        self.routes = {}
        self.requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _serve(self):
                path = self.path.split("?")[0]
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fake.requests.append((self.command, self.path, dict(self.headers), body))
                status, ctype, payload, delay = fake.routes.get((self.command, path), (404, "application/json",
                                                                                     b'{"detail":"Not Found"}', 0))
                if callable(payload):
                    payload = payload(body, self.headers)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fake():
    f = _Fake()
    yield f
    f.close()


def _json(obj, status=200, delay=0):
    return (status, "application/json", json.dumps(obj).encode(), delay)


INFO = {
    "name": "SP-Mamba anomaly detection", "version": "0.1.0",
    "models": {"spmamba": {"type": "others", "labels": []}, "spmamba_seg": {"type": "segmentation"}},
    "strategies": {"most_anomalous": {}, "suspect_normal": {}, "random": {}},
    "trainers": {"spmamba": {}},
    "train_stats": {"spmamba": {"epoch": 3, "total_epochs": 12, "loss": 0.25, "phase": "train"}},
    "spmamba": {"model": {"ready": True, "version": "v1abc"}},
}


def test_normalize_url():
    assert normalize_url("localhost:8000/") == "http://localhost:8000"
    assert normalize_url("") == "http://127.0.0.1:8000"
    assert normalize_url("https://a.b/c/") == "https://a.b/c"


def test_multipart_round_trip(tmp_path):
    f = tmp_path / "x.nii.gz"
    payload = bytes(range(256)) * 10 + b"\r\n--tricky\r\n"
    f.write_bytes(payload)
    body, ctype = encode_multipart({"params": json.dumps({"a": 1})}, {"file": str(f)})
    parts = {p["name"]: p for p in decode_multipart(body, ctype)}
    assert json.loads(parts["params"]["data"]) == {"a": 1}
    assert parts["file"]["filename"] == "x.nii.gz" and parts["file"]["data"] == payload


def test_summarize_info_and_progress():
    s = summarize_info(INFO)
    assert s.models == ["spmamba"]  # the segmentation-type model is not a heatmap model
    assert s.model_version("spmamba") == "v1abc"
    assert s.strategies == ["most_anomalous", "suspect_normal", "random"]
    percent, text = train_progress(s.train_stats, "spmamba")
    assert percent == 25 and "epoch 3/12" in text and "loss 0.25" in text
    assert train_progress({}, "spmamba") == (None, "no training statistics yet")
    # version from the last training's stats when the app has no other place for it
    s2 = summarize_info({"models": {"m": {}}, "train_stats": {"m": {"model_version": "v9"}}})
    assert s2.model_version("m") == "v9"


def test_methods_are_the_infer_tasks_that_return_a_heatmap():
    """The rule of is_heatmap_method: a declared output decides; else type 'others' without labels."""
    info = {
        "models": {
            # what the SP-Mamba app's /info/ says (plus its own fields: model, model_version, result_extensions)
            "spmamba": {"type": "others", "labels": [], "dimension": 3, "description": "SP-Mamba heatmap",
                        "config": {"result_extension": ".nii.gz"}, "model": {"ready": True, "version": "v1"},
                        "model_version": "v1", "result_extensions": [".nii.gz", ".nii", ".nrrd"]},
            "spmamba_seg": {"type": "segmentation", "labels": {"anomaly": 1}, "model_version": "v1"},
            "voxel_baseline": {"type": "others", "labels": [], "description": "voxel-wise z-score baseline",
                               "model_version": "b7"},
            "declared": {"type": "segmentation", "labels": {"x": 1}, "output": "heatmap"},
            "declared_label": {"type": "others", "labels": [], "output": "label"},
            "deepedit": {"type": "deepedit", "labels": {"spleen": 1}},
            "classifier": {"type": "classification", "labels": []},
            "enum_str": {"type": "InferType.OTHERS", "labels": []},
        },
        "trainers": {"spmamba": {}},
    }
    s = summarize_info(info)
    assert s.models == ["spmamba", "voxel_baseline", "declared", "enum_str"]
    assert s.description("voxel_baseline") == "voxel-wise z-score baseline"
    assert s.model_version("voxel_baseline") == "b7" and s.model_version("spmamba") == "v1"
    # a method without a trainer of its own is trained by the app's anomaly trainer
    assert s.train_task("spmamba") == "spmamba" and s.train_task("voxel_baseline") == "spmamba"
    assert summarize_info({"models": {"m": {}}}).train_task("m") == "m"  # no trainers listed: the method itself
    assert summarize_info({"models": {"seg": {"type": "segmentation"}}}).models == []  # never a label model


def test_detection_result_regions():
    regions = [{"label": 1, "n_voxels": 3, "centroid_ras": [0, 0, 0]}]
    r = DetectionResult(params={"regions": regions, "n_regions": 4}, heatmap_path=None)
    assert r.regions == regions and r.n_regions == 4
    assert DetectionResult(params={"regions": regions}, heatmap_path=None).n_regions == 1
    assert DetectionResult(params={}, heatmap_path=None).regions is None
    assert DetectionResult(params={}, heatmap_path=None).n_regions is None


def test_server_down_says_what_to_do():
    client = AnomalyClient(f"http://127.0.0.1:{_free_port()}", timeout=2)
    with pytest.raises(ServerError) as e:
        client.info()
    assert e.value.kind == "unreachable"
    assert "Cannot reach the server" in str(e.value) and "running" in str(e.value)


def test_wrong_url_is_reported(fake):
    fake.routes[("GET", "/")] = (200, "text/html", b"<html>hello</html>", 0)
    with pytest.raises(ServerError) as e:
        AnomalyClient(fake.url).info()  # 404 on /info/: not a MONAI Label server
    assert e.value.kind == "wrong_url" and "check the server URL" in str(e.value)
    fake.routes[("GET", "/info/")] = (200, "text/html", b"<html>hello</html>", 0)
    with pytest.raises(ServerError) as e:
        AnomalyClient(fake.url).info()
    assert e.value.kind == "wrong_url"


def test_timeout_is_reported_quickly(fake):
    fake.routes[("GET", "/info/")] = _json(INFO, delay=1.2)
    client = AnomalyClient(fake.url, timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(ServerError) as e:
        client.info()
    assert time.monotonic() - t0 < 1.0
    assert e.value.kind == "timeout" and "did not answer within" in str(e.value)


def test_detect_parses_multipart_answer(fake, tmp_path):
    heat = b"\x1f\x8b fake nifti bytes \r\n--not-a-boundary"
    result = {"score": 2.5, "threshold": 1.0, "pixel_threshold": 0.3, "verdict": "abnormal", "model_version": "v1"}

    def answer(body, headers):
        return (b"--BOUND\r\nContent-Disposition: form-data; name=\"params\"\r\nContent-Type: application/json\r\n\r\n"
                + json.dumps(result).encode() + b"\r\n--BOUND\r\nContent-Disposition: form-data; name=\"image\"; "
                b"filename=\"tmpabc.nii.gz\"\r\nContent-Type: application/gzip\r\n\r\n" + heat + b"\r\n--BOUND--\r\n")

    fake.routes[("POST", "/infer/spmamba")] = (200, "multipart/form-data; boundary=BOUND", answer, 0)
    r = AnomalyClient(fake.url).detect(image_id="case1", out_dir=str(tmp_path))
    assert r.heatmap_path.endswith("case1_anomaly.nii.gz")
    assert open(r.heatmap_path, "rb").read() == heat
    assert (r.score, r.threshold, r.pixel_threshold, r.abnormal, r.verdict, r.model_version) == (
        2.5, 1.0, 0.3, True, "abnormal", "v1")
    assert r.alignment_text == ""  # a model without alignment says nothing about it

    result["alignment"] = {"reference": "reference built from 16 normals", "similarity": 0.912, "seconds": 2.1}
    r = AnomalyClient(fake.url).detect(image_id="case1", out_dir=str(tmp_path))
    assert r.alignment_text == "aligned to the model's reference built from 16 normals (similarity 0.91)"
    result["alignment"] = {"reference": "mni152", "similarity": 0.712, "method": "deformable",
                           "deformable": {"used": True, "similarity": 0.893}}
    r = AnomalyClient(fake.url).detect(image_id="case1", out_dir=str(tmp_path))
    assert r.alignment_text == "aligned to the model's mni152 (similarity 0.71), then deformed (similarity 0.89)"
    result["alignment"]["deformable"] = {"used": False, "why": "it folds the brain (Jacobian 0.05 < 0.1)"}
    r = AnomalyClient(fake.url).detect(image_id="case1", out_dir=str(tmp_path))
    assert r.alignment_text == ("aligned to the model's mni152 (similarity 0.71); not deformed: it folds the brain "
                                "(Jacobian 0.05 < 0.1)")
    method, path, headers, body = fake.requests[-1]
    assert path == "/infer/spmamba?image=case1"
    parts = {p["name"]: p for p in decode_multipart(body, headers["Content-Type"])}
    assert json.loads(parts["params"]["data"])["result_extension"] == ".nii.gz"


def test_detect_without_heatmap_or_model(fake):
    fake.routes[("POST", "/infer/spmamba")] = _json({"score": 1.0})
    with pytest.raises(ServerError) as e:
        AnomalyClient(fake.url).detect(image_id="a")
    assert e.value.kind == "no_model"
    fake.routes[("POST", "/infer/spmamba")] = _json(
        {"detail": "No SP-Mamba model is available yet: train one first"}, status=409)
    with pytest.raises(ServerError) as e:
        AnomalyClient(fake.url).detect(image_id="a")
    assert e.value.kind == "no_model" and "Start training" in str(e.value)


def test_curation_counts_and_marks(fake):
    fake.routes[("GET", "/datastore/")] = _json({"objects": {
        "a": {"image": {"info": {"curation": "normal"}}}, "b": {"image": {"info": {"curation": "abnormal"}}},
        "c": {"image": {"info": {}}}, "d": {"image": {"info": {"curation": "excluded"}}},
        "e": {"image": {"info": {"curation": "normal"}}}}})
    fake.routes[("PUT", "/datastore/image/info")] = _json({})
    client = AnomalyClient(fake.url)
    assert client.curation_counts() == {"normal": 2, "abnormal": 1, "excluded": 1, "unreviewed": 1}
    client.set_curation("c", "excluded")
    method, path, headers, body = fake.requests[-1]
    assert (method, path) == ("PUT", "/datastore/image/info?image=c")
    parts = {p["name"]: p for p in decode_multipart(body, headers["Content-Type"])}
    assert json.loads(parts["info"]["data"]) == {"curation": "excluded"}
    with pytest.raises(ValueError):
        client.set_curation("c", "maybe")


def test_training_refused_and_status(fake):
    fake.routes[("POST", "/train/spmamba")] = _json({"detail": "a training is already running"}, status=429)
    with pytest.raises(ServerError) as e:
        AnomalyClient(fake.url).start_training()
    assert e.value.kind == "refused" and "Training refused" in str(e.value) and "already running" in str(e.value)
    fake.routes[("POST", "/train/spmamba")] = _json({"detail": "too few normal studies to train"}, status=409)
    with pytest.raises(ServerError) as e:
        AnomalyClient(fake.url).start_training()
    assert e.value.kind == "refused" and "too few normal" in str(e.value)
    # GET /train/ answers 404 when there never was a training
    assert AnomalyClient(fake.url).training_status() is None
    assert AnomalyClient(fake.url).is_training() is False


VERSIONS = {
    "current": "bbb222", "keep_versions": 5,
    "versions": [
        {"version": "bbb222", "preset": "tiny", "created": "2025-02-01T10:30:00+0000", "current": True,
         "training": {"epochs": 1, "steps": 6, "n_studies": 4, "stopped_early": False},
         "calibration": {"pixel_threshold": 0.4, "volume_threshold": 2.0}},
        {"version": "aaa111", "preset": "fast", "created": "2025-01-05T09:00:00+0000", "current": False,
         "training": {"epochs": 12, "steps": 480, "n_studies": 16, "stopped_early": True}},
    ],
}


def test_model_versions_and_rollback(fake):
    from AnomalyDetectionLib.client import describe_version
    from AnomalyDetectionLib.logic import AnomalyLogic

    fake.routes[("GET", "/model/versions")] = _json(VERSIONS)
    fake.routes[("POST", "/model/rollback")] = _json({"version": "aaa111", "previous_version": "bbb222"})
    client = AnomalyClient(fake.url)
    assert [v["version"] for v in client.list_versions()["versions"]] == ["bbb222", "aaa111"]
    assert describe_version(VERSIONS["versions"][0]) == "bbb222  tiny  2025-02-01 10:30  1 epochs, 6 steps, 4 studies  (served)"
    assert describe_version(VERSIONS["versions"][1]).endswith("12 epochs, 480 steps, 16 studies, stopped early")
    assert client.rollback("aaa111")["version"] == "aaa111"
    method, path, _, _ = fake.requests[-1]
    assert (method, path) == ("POST", "/model/rollback?version=aaa111")

    logic = AnomalyLogic(fake.url)
    versions = logic.model_versions()
    assert versions.supported and versions.current == "bbb222" and versions.keep == 5
    assert versions.index_of("aaa111") == 1 and "(served)" in versions.labels[0]
    assert logic.rollback("aaa111")["previous_version"] == "bbb222"
    # errors that say what to do
    fake.routes[("POST", "/model/rollback")] = _json({"detail": "no kept model version 'zzz'"}, status=404)
    with pytest.raises(ServerError) as e:
        logic.rollback("zzz")
    assert e.value.kind == "not_found" and "Connect" in str(e.value)
    fake.routes[("POST", "/model/rollback")] = _json({"detail": "a training is running"}, status=409)
    with pytest.raises(ServerError) as e:
        logic.rollback("aaa111")
    assert e.value.kind == "refused" and "training is running" in str(e.value)
    # an app without version history: the combo box stays empty, no error
    del fake.routes[("GET", "/model/versions")]
    assert logic.model_versions().supported is False


def test_weaker_preset_refusal_and_warning(fake):
    from AnomalyDetectionLib.logic import AnomalyLogic

    fake.routes[("POST", "/train/spmamba")] = _json(
        {"detail": "training refused: the training preset 'tiny' is weaker than the served model's 'fast'"}, 409)
    with pytest.raises(ServerError) as e:
        AnomalyClient(fake.url).start_training(params={"preset": "tiny"})
    assert e.value.kind == "refused" and "Allow a weaker preset" in str(e.value) and "'fast'" in str(e.value)
    info = json.loads(json.dumps(INFO))
    info["train_stats"]["spmamba"].update(status="DONE", warning="the training preset 'tiny' is weaker ...")
    fake.routes[("GET", "/info/")] = _json(info)
    fake.routes[("GET", "/train/")] = _json({"id": "t", "status": "DONE"})
    progress = AnomalyLogic(fake.url).training_progress()
    assert not progress.running and "weaker" in progress.warning


def test_a_submitted_training_counts_as_under_way(fake):
    """Between POST /train/ and the start of its process MONAI Label reports SUBMITTED: the module must keep polling
    (it once reported "Training ended (submitted)" on a loaded machine), and say that it is queued."""
    from AnomalyDetectionLib.logic import AnomalyLogic

    fake.routes[("GET", "/info/")] = _json(INFO)
    fake.routes[("GET", "/train/")] = _json({"id": "t", "status": "SUBMITTED"})
    progress = AnomalyLogic(fake.url).training_progress()
    assert progress.running and progress.status == "SUBMITTED" and progress.text.startswith("submitted: ")
    assert AnomalyClient(fake.url).is_training() is True
    fake.routes[("GET", "/train/")] = _json({"id": "t", "status": "RUNNING"})
    progress = AnomalyLogic(fake.url).training_progress()
    assert progress.running and not progress.text.startswith("running")
    fake.routes[("GET", "/train/")] = _json({"id": "t", "status": "DONE"})
    progress = AnomalyLogic(fake.url).training_progress()
    assert not progress.running and progress.percent == 100 and progress.text.startswith("done: ")
    assert AnomalyClient(fake.url).is_training() is False


def test_next_case_while_studies_are_still_being_scored(fake):
    """The app answers active learning at once; with nothing scored yet the module says so instead of 'none left'."""
    from AnomalyDetectionLib.logic import AnomalyLogic

    msg = "12 studies still being scored in the background; ask again in a minute"
    fake.routes[("POST", "/activelearning/most_anomalous")] = _json(
        {"candidates": 12, "scored": 0, "pending": 12, "complete": False, "message": msg})
    logic = AnomalyLogic(fake.url)
    found = logic.fetch_next_case("most_anomalous")
    assert found.image_id is None and found.pending == 12
    assert found.status_text() == msg

    fake.routes[("POST", "/activelearning/most_anomalous")] = _json({})  # every study reviewed
    found = logic.fetch_next_case("most_anomalous")
    assert found.image_id is None and found.pending == 0
    assert "every study is reviewed" in found.status_text()


def test_task_runner_keeps_caller_free_and_delivers_on_poll():
    runner = TaskRunner()
    got, errors = [], []
    t0 = time.monotonic()
    runner.submit("slow", time.sleep, 0.3, on_done=lambda r: got.append("slept"))
    runner.submit("boom", lambda: 1 / 0, on_error=errors.append)
    assert time.monotonic() - t0 < 0.1  # submit returns at once: the GUI thread is not blocked
    assert runner.busy("slow") and runner.busy()
    assert got == []  # nothing is delivered before poll(): callbacks run on the polling (GUI) thread
    caller = threading.get_ident()
    thread_of_callback = []
    runner.submit("where", lambda: None, on_done=lambda r: thread_of_callback.append(threading.get_ident()))
    runner.wait(5)
    assert got == ["slept"] and isinstance(errors[0], ZeroDivisionError)
    assert thread_of_callback == [caller]
    assert not runner.busy()
    runner.shutdown()


def test_logic_runs_the_chosen_method_and_trains_its_trainer(fake, tmp_path):
    """Detect posts to /infer/{method}; training goes to the method's trainer (the app's 'spmamba' when the method
    has none of its own), and its progress is read from that trainer's stats."""
    from AnomalyDetectionLib.logic import AnomalyLogic, DetectionJob

    heat = b"\x1f\x8b bytes"
    answer = (b"--B\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{\"score\": 1}\r\n--B\r\n"
              b"Content-Disposition: form-data; name=\"image\"; filename=\"h.nii.gz\"\r\n\r\n"
              + heat + b"\r\n--B--\r\n")
    fake.routes[("POST", "/infer/voxel_baseline")] = (200, "multipart/form-data; boundary=B", answer, 0)
    info = {"models": {"spmamba": {"type": "others", "labels": []},
                       "voxel_baseline": {"type": "others", "labels": [], "model_version": "b1"}},
            "trainers": {"spmamba": {}},
            "train_stats": {"spmamba": {"epoch": 1, "total_epochs": 4, "status": "RUNNING"}}}
    fake.routes[("GET", "/info/")] = _json(info)
    fake.routes[("POST", "/train/spmamba")] = _json({"id": "t1", "status": "RUNNING"})
    fake.routes[("GET", "/train/")] = _json({"id": "t1", "status": "RUNNING"})
    logic = AnomalyLogic(fake.url)
    logic._method = "voxel_baseline"  # what set_method does, without a scene for the parameter node
    job = DetectionJob("vtkMRMLScalarVolumeNode1", "case1", None, False, "case1", method="voxel_baseline")
    result = logic.run_detection(job)
    assert fake.requests[-1][1] == "/infer/voxel_baseline?image=case1"
    assert open(result.heatmap_path, "rb").read() == heat
    assert logic.train_task == "voxel_baseline"  # before Connect: the method itself
    logic.connect()
    assert logic.train_task == "spmamba"
    logic.start_training({"max_epochs": 4})
    assert ("POST", "/train/spmamba") in [(m, p) for m, p, _, _ in fake.requests]
    progress = logic.training_progress()
    assert progress.running and progress.percent == 25 and progress.model_version == "b1"


def test_downloaded_files_keep_their_type():
    """A study or heatmap the server sends is saved under its own file type (a 2-D study stays a .png / .dcm)."""
    from AnomalyDetectionLib.client import _result_suffix

    for name, suffix in (("a.nii.gz", ".nii.gz"), ("b.NRRD", ".nrrd"), ("xray.png", ".png"), ("c.JPEG", ".jpeg"),
                         ("chest.dcm", ".dcm"), (None, ".nii.gz"), ("notes.txt", ".nii.gz")):
        assert _result_suffix(name, ".nii.gz") == suffix
