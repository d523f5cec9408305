"""Active learning never blocks the server: unscored studies are scored in the background (MONAI Label's scoring
task, one at a time, low priority) and the answer says how many are still being scored."""
from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.filterwarnings("ignore")

CURATION = {"n0": "normal", "n1": "normal", "n2": "normal"}


def studies_of(tiny_data):
    s = {f"n{i}": p for i, p in enumerate(tiny_data["normal"][:5])}
    s.update({f"a{i}": p for i, p in enumerate(tiny_data["abnormal"][:2])})
    return s


#: each detection of the background scoring is made this much slower (``slow_scoring``), and an answer that does not
#: wait for the scoring must come within ANSWER_S: well under one slowed detection, yet with room for a loaded CPU
SLOW_DETECTION_S = 3.0
ANSWER_S = 2.0


def timed(call, *args, **kwargs):
    t0 = time.perf_counter()
    r = call(*args, **kwargs)
    return r, time.perf_counter() - t0


def stored_scores(env, ids):
    objects = env.datastore_json()["objects"]
    return {i: objects[i]["image"]["info"]["anomaly"]["score"] for i in ids}


def wait_complete(client, strategy, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r, dt = timed(client.post, f"/activelearning/{strategy}")
        assert r.status_code == 200 and dt < ANSWER_S, (r.text, dt)
        if r.json().get("complete"):
            return r.json()
        time.sleep(0.3)
    raise AssertionError(f"scoring did not finish in {timeout} s: {r.json()}")


@pytest.fixture
def slow_scoring(monkeypatch):
    """MONAI Label's background task machinery as is (task list, one-worker executor), but the scoring runs in a
    thread of this process instead of a subprocess, and each detection takes SLOW_DETECTION_S longer."""
    from monailabel.interfaces.utils.app import app_instance
    from monailabel.utils.async_tasks import utils as task_utils

    calls = []

    def in_process_task(task, method, callback=None):
        assert method == "scoring"
        task["status"] = "RUNNING"
        calls.append(task["request"])
        try:
            app_instance().scoring(dict(task["request"]))
            task["status"] = "DONE"
        except Exception as e:  # noqa: BLE001
            task["status"] = "ERROR"
            task["details"] = [repr(e)]

    monkeypatch.setattr(task_utils, "_task_func", in_process_task)

    def slow_down():
        det = app_instance().detection
        run = det.run

        def slow_run(*a, **kw):
            time.sleep(SLOW_DETECTION_S)
            return run(*a, **kw)

        monkeypatch.setattr(det, "run", slow_run)

    yield slow_down, calls
    # let a still running scoring end before the next test's app starts
    deadline = time.time() + 60
    busy = ("SUBMITTED", "RUNNING")
    while time.time() < deadline and any(t.get("status") in busy for t in task_utils.tasks("scoring")):
        time.sleep(0.2)


def test_active_learning_answers_at_once_while_studies_are_scored(make_app, tiny_data, tiny_model, slow_scoring):
    slow_down, calls = slow_scoring
    env = make_app(studies_of(tiny_data), model=tiny_model, curation=CURATION)
    slow_down()
    c = env.client
    unreviewed = ["a0", "a1", "n3", "n4"]

    r, dt = timed(c.post, "/activelearning/most_anomalous")
    assert r.status_code == 200, r.text
    assert dt < ANSWER_S, f"the answer waited {dt:.1f} s for scoring"
    first = r.json()
    assert first["pending"] >= 1 and first["candidates"] == 4 and first["complete"] is False
    assert "still being scored" in first["message"] and str(first["pending"]) in first["message"]
    assert first["scoring"] in ("started", "running")

    # the server keeps answering while the studies are scored; a second request starts no second scoring
    r, dt = timed(c.get, "/info/")
    assert r.status_code == 200 and dt < ANSWER_S
    assert r.json()["spmamba"]["scoring"]["running"] is True
    r, dt = timed(c.post, "/activelearning/suspect_normal")
    assert r.status_code == 200 and dt < ANSWER_S
    assert r.json().get("pending", 0) == 0 or r.json()["scoring"] == "running"

    final = wait_complete(c, "most_anomalous", timeout=90)
    assert final["pending"] == 0 and final["scored"] == 4 and "message" not in final
    scores = stored_scores(env, unreviewed)
    assert final["id"] == max(scores, key=scores.get) and final["score"] == max(scores.values())
    normal = wait_complete(c, "suspect_normal", timeout=90)
    scores = stored_scores(env, list(CURATION))
    assert normal["id"] == max(scores, key=scores.get)
    assert len(calls) == 1  # one background scoring served both strategies
    info = c.get("/info/").json()["spmamba"]["scoring"]
    assert info == {"running": False, "unscored": 0}


def test_a_new_model_is_scored_in_the_background_too(make_app, tiny_data, tiny_model, slow_scoring):
    """After a training publishes a new model, the stored scores are stale: answered at once, rescored behind."""
    import dataclasses
    import os

    from spmamba.detector import Detector

    slow_down, calls = slow_scoring
    env = make_app(studies_of(tiny_data), model=tiny_model, curation=CURATION)
    c = env.client
    assert c.post("/scoring/anomaly", params={"run_sync": True}).json()["scored"] == 7
    assert wait_complete(c, "most_anomalous", timeout=5)["scored"] == 4
    slow_down()
    det = Detector.load(str(tiny_model), device="cpu")
    det.calibration = dataclasses.replace(det.calibration, volume_threshold=det.calibration.volume_threshold + 1e-3)
    det.invalidate_version()  # a different model version, as a training would publish
    tmp = env.model_dir / ".incoming.pt"
    det.save(str(tmp))
    os.replace(tmp, env.model_dir / "spmamba.pt")
    r, dt = timed(c.post, "/activelearning/most_anomalous")
    assert r.status_code == 200 and dt < ANSWER_S + 0.5, dt  # + 0.5: includes loading the new model
    assert r.json()["pending"] >= 1 and r.json()["model_version"] == det.version
    final = wait_complete(c, "most_anomalous", timeout=90)
    assert final["model_version"] == det.version and final["scored"] == 4


@pytest.mark.slow
def test_background_scoring_runs_in_monailabels_subprocess_at_low_priority(make_app, tiny_data, tiny_model):
    """The real thing: MONAI Label's scoring subprocess, niced, while the server answers."""
    import psutil
    from monailabel.utils.async_tasks.utils import processes, tasks

    env = make_app(studies_of(tiny_data), model=tiny_model, curation=CURATION)
    c = env.client
    r, dt = timed(c.post, "/activelearning/most_anomalous")
    assert r.status_code == 200 and dt < ANSWER_S, (r.text, dt)
    assert r.json()["pending"] == 4 and r.json()["scoring"] == "started" and "id" not in r.json()
    nice_seen = set()
    deadline = time.time() + 240
    while time.time() < deadline:
        for proc in list(processes("scoring").values()):
            try:
                nice_seen.add(psutil.Process(proc.pid).nice())
            except psutil.Error:
                pass
        r, dt = timed(c.get, "/info/")
        assert r.status_code == 200 and dt < ANSWER_S, dt
        if tasks("scoring") and tasks("scoring")[-1]["status"] not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(0.1)
    assert tasks("scoring")[-1]["status"] == "DONE", list(tasks("scoring")[-1].get("details", []))
    assert 10 in nice_seen, nice_seen  # the subprocess lowered its priority
    final = wait_complete(c, "most_anomalous", timeout=10)
    scores = stored_scores(env, ["a0", "a1", "n3", "n4"])
    assert final["id"] == max(scores, key=scores.get) and final["pending"] == 0
