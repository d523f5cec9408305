"""Model versions: a publish keeps the model it replaces (pruned to keep_versions), GET /model/versions lists them,
POST /model/rollback serves one again; a weaker preset is refused unless forced; train_stats end with the
training's own steps."""
from __future__ import annotations

import json
import os
import sys
import time

import pytest
from app_helpers import APP_DIR, wait_for_training

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def applib():
    sys.path.insert(0, str(APP_DIR))
    try:
        import lib.configs as configs
        import lib.trainers as trainers
        import lib.versions as versions

        yield configs, versions, trainers
    finally:
        sys.path.remove(str(APP_DIR))


def make_detector(preset: str, seed: int, **training):
    """An untrained detector of ``preset`` with distinct weights (so a distinct version) and some metadata."""
    import torch
    from spmamba.detector import Calibration, Detector
    from spmamba.models import SPMamba, get_config

    torch.manual_seed(seed)
    det = Detector(SPMamba(get_config(preset)), device="cpu",
                   calibration=Calibration(pixel_threshold=0.5 + seed, volume_threshold=2.0 + seed, n_volumes=1))
    det.meta["created"] = f"2025-01-{seed:02d}T00:00:00"
    det.meta["training"] = {"epochs": seed, "total_epochs": seed, "steps": 3 * seed, "stopped_early": False,
                            **training}
    return det


def history(applib, model_dir, keep=5, explicit=None):
    return applib[1].VersionHistory(str(model_dir), str(model_dir / "spmamba.pt"), keep, explicit)


def studies_of(tiny_data):
    s = {f"n{i}": p for i, p in enumerate(tiny_data["normal"][:4])}
    s["a0"] = tiny_data["abnormal"][0]
    return s


CURATION = {"n0": "normal", "n1": "normal", "n2": "normal", "n3": "normal", "a0": "abnormal"}


def infer_version(client, image="a0"):
    r = client.post("/infer/spmamba", params={"image": image, "output": "json"})
    assert r.status_code == 200, r.text
    return r.json()["model_version"]


# ------------------------------------------------------------------------------------------------ history (units)
def test_publish_keeps_the_replaced_model_and_prunes_to_keep_versions(applib, tmp_path):
    md = tmp_path / "model"
    first = make_detector("fast", 1)
    first.save(str(md / "spmamba.pt"))  # e.g. the demo's model, published by `spmamba demo`, not by a training
    h = history(applib, md, keep=3)
    published = []
    for seed in (2, 3, 4, 5):
        det = make_detector("tiny", seed)
        entry = h.publish(det, extra={"n_studies": 4})
        assert entry["version"] == det.version
        assert entry["previous_version"] == (published[-1] if published else first.version)
        published.append(det.version)
    kept = h.list(current=published[-1])
    assert [v["version"] for v in kept] == published[::-1][:3]  # newest first, 3 kept
    assert kept[0]["current"] and not any(v["current"] for v in kept[1:])
    files = sorted(p.name for p in (md / "versions").glob("*.pt"))
    assert files == sorted(f"{v}.pt" for v in published[-3:])
    newest = kept[0]
    assert newest["preset"] == "tiny" and newest["created"] == "2025-01-05T00:00:00"
    assert newest["training"]["steps"] == 15 and newest["training"]["n_studies"] == 4
    assert newest["training"]["stopped_early"] is False
    assert newest["calibration"]["pixel_threshold"] == 5.5 and newest["calibration"]["volume_threshold"] == 7.0
    assert newest["published"] and newest["size_bytes"] > 0
    # the demo's model was kept at the first publish (with its metadata read from the file) and pruned later
    log = h.log()
    assert log[0]["previous"] == first.version and first.version in log[2]["pruned"]
    json.loads((md / "versions" / "index.json").read_text())  # valid JSON


def test_keep_versions_zero_keeps_nothing(applib, tmp_path):
    md = tmp_path / "model"
    h = history(applib, md, keep=0)
    for seed in (1, 2):
        h.publish(make_detector("tiny", seed))
    assert h.list() == [] and not list((md / "versions").glob("*.pt"))
    assert (md / "spmamba.pt").is_file()


def test_rollback_is_served_even_over_an_explicit_conf_model(applib, tmp_path):
    """The served file is the newest of --conf model and spmamba.pt: a rollback must end up the newest."""
    from spmamba.checkpoint import read_checkpoint_meta

    versions = applib[1]
    md = tmp_path / "model"
    explicit = tmp_path / "explicit.pt"
    ex = make_detector("tiny", 7)
    ex.save(str(explicit))
    h = history(applib, md, keep=5, explicit=str(explicit))
    a, b = make_detector("tiny", 1), make_detector("tiny", 2)
    h.publish(a)
    os.utime(explicit, (time.time() + 100, time.time() + 100))  # someone replaced the --conf model file
    assert versions.served_path(str(md / "spmamba.pt"), str(explicit)) == str(explicit)
    entry = h.publish(b)  # the explicit model was the one served: it is kept too
    assert entry["previous_version"] == ex.version
    assert {a.version, b.version, ex.version} <= {v["version"] for v in h.list()}
    h.rollback(a.version, current=b.version)
    served = versions.served_path(str(md / "spmamba.pt"), str(explicit))
    assert served == str(md / "spmamba.pt")
    assert read_checkpoint_meta(served)["version"] == a.version
    with pytest.raises(versions.UnknownVersion):
        h.rollback("0123456789ab")
    # a kept file overwritten in place (not by this app) is refused instead of serving the wrong model
    from spmamba.checkpoint import CheckpointError

    (md / "versions" / f"{ex.version}.pt").write_bytes((md / "versions" / f"{b.version}.pt").read_bytes())
    with pytest.raises(CheckpointError, match="overwritten"):
        h.rollback(ex.version)
    assert read_checkpoint_meta(served)["version"] == a.version


# ------------------------------------------------------------------------------------------------ REST
def test_rest_lists_versions_and_rollback_restores_the_previous_model(make_app, tiny_data, tmp_path, applib):
    md = tmp_path / "published"
    h = history(applib, md)
    v1, v2 = make_detector("tiny", 1), make_detector("tiny", 2)
    h.publish(v1, extra={"n_studies": 3})
    h.publish(v2, extra={"n_studies": 4})
    env = make_app(studies_of(tiny_data), conf={"model_dir": str(md)})
    c = env.client
    assert infer_version(c) == v2.version

    r = c.get("/model/versions")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["current"] == v2.version and body["keep_versions"] == 5
    assert [v["version"] for v in body["versions"]] == [v2.version, v1.version]
    assert [v["current"] for v in body["versions"]] == [True, False]
    old = body["versions"][1]
    assert old["preset"] == "tiny" and old["created"] and old["training"]["n_studies"] == 3
    assert old["calibration"]["volume_threshold"] == 3.0
    assert c.get("/info/").json()["spmamba"]["versions"] == [v2.version, v1.version]

    r = c.post("/model/rollback", params={"version": v1.version})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == v1.version and r.json()["previous_version"] == v2.version
    assert infer_version(c) == v1.version  # detection uses the restored model, no restart
    assert c.get("/info/").json()["spmamba"]["model"]["version"] == v1.version
    body = c.get("/model/versions").json()
    assert body["current"] == v1.version and [v["current"] for v in body["versions"]] == [False, True]
    assert body["log"][-1]["action"] == "rollback"
    # and forward again
    assert c.post("/model/rollback", params={"version": v2.version}).status_code == 200
    assert infer_version(c) == v2.version

    r = c.post("/model/rollback", params={"version": "0123456789ab"})
    assert r.status_code == 404 and v1.version in r.json()["detail"]
    assert c.post("/model/rollback", params={"version": "../spmamba"}).status_code == 400
    assert c.post("/model/rollback").status_code == 422  # version is required

    from monailabel.utils.async_tasks.utils import background_tasks

    fake = {"id": "fake-running-training", "status": "RUNNING"}
    background_tasks.setdefault("train", []).append(fake)
    try:
        r = c.post("/model/rollback", params={"version": v1.version})
        assert r.status_code == 409 and "training" in r.json()["detail"]
    finally:
        background_tasks["train"].remove(fake)
    assert infer_version(c) == v2.version


def test_weaker_preset_is_refused_unless_forced(make_app, tiny_data, tmp_path):
    from monailabel.utils.async_tasks.utils import processes

    env = make_app(studies_of(tiny_data), curation=CURATION, conf={"stop_grace_s": "0"})
    make_detector("fast", 1).save(str(env.model_dir / "spmamba.pt"))  # the demo serves a fast model
    c = env.client
    r = c.post("/train/spmamba", json={"preset": "tiny", "max_epochs": 1})
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert "weaker" in detail and "'fast'" in detail and "force" in detail and "rollback" in detail
    assert not processes("train")

    r = c.post("/train/spmamba", json={"preset": "tiny", "max_epochs": 1, "force": True})
    assert r.status_code == 200, r.text
    assert "weaker" in r.json()["warning"]
    deadline = time.time() + 60
    while not processes("train") and time.time() < deadline:  # stop it once it has really started
        time.sleep(0.2)
    c.delete("/train/")


# ------------------------------------------------------------------------------------------------ train_stats
class _Datastore:
    def __init__(self, paths):
        self.paths = {f"s{i}": str(p) for i, p in enumerate(paths)}

    def training_studies(self, unflagged_normal):
        return list(self.paths)

    def get_image_uri(self, image_id):
        return self.paths[image_id]


def test_final_train_stats_show_the_trainings_steps(applib, tmp_path, tiny_data):
    """The last progress report is the calibration's (step 1 of 1): the final stats must keep the training's."""
    configs, versions, trainers = applib
    md = tmp_path / "model"
    previous = make_detector("tiny", 9)
    previous.save(str(md / "spmamba.pt"))
    settings = configs.parse_conf(str(APP_DIR), str(tmp_path / "studies"), {
        "model_dir": str(md), "preset": "tiny", "epochs": "1", "device": "cpu", "min_normals": "2"})
    task = trainers.AnomalyTrain(settings)
    stats = task({"model": "spmamba"}, _Datastore(tiny_data["normal"][:4]))
    saved = json.loads((md / "train_stats.json").read_text())
    assert saved["status"] == "DONE"
    from spmamba.checkpoint import read_checkpoint_meta

    training = read_checkpoint_meta(md / "spmamba.pt")["meta"]["training"]
    assert training["steps"] > 1  # several optimisation steps (the bug showed calibration's 1 / 1)
    for s in (stats, saved):
        assert s["step"] == s["total_steps"] == training["steps"] == training["total_steps"]
        assert s["steps_per_epoch"] == training["steps_per_epoch"] and s["epoch"] == s["total_epochs"] == 1
        assert s["phase_step"] == s["phase_total_steps"] == 1  # the calibration's own count, kept apart
        assert s["previous_version"] == previous.version and s["versions_kept"] == 2
        assert "warning" not in s


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_docs_example_tiny_over_fast_is_warned_kept_and_rolled_back(make_app, tiny_data):
    """The issue's story: the demo serves `fast`, the docs' example trains `tiny`; now it must be forced, says so
    in train_stats, and the fast model comes back with one call."""
    env = make_app(studies_of(tiny_data), curation=CURATION)
    fast = make_detector("fast", 1)
    fast.save(str(env.model_dir / "spmamba.pt"))
    c = env.client
    assert infer_version(c) == fast.version
    r = c.post("/train/spmamba", json={"preset": "tiny", "max_epochs": 1, "force": True})
    assert r.status_code == 200, r.text
    assert "weaker" in r.json()["warning"]
    task = wait_for_training(c)
    assert task["status"] == "DONE", list(task.get("details", []))[-10:]
    stats = c.get("/info/").json()["train_stats"]["spmamba"]
    assert stats["status"] == "DONE" and "weaker" in stats["warning"]
    assert stats["step"] == stats["total_steps"] > 1 and stats["previous_version"] == fast.version
    tiny_version = stats["model_version"]
    assert infer_version(c) == tiny_version
    body = c.get("/model/versions").json()
    assert [(v["version"], v["preset"]) for v in body["versions"]] == [(tiny_version, "tiny"), (fast.version, "fast")]
    assert body["versions"][0]["training"]["steps"] == stats["step"]
    r = c.post("/model/rollback", params={"version": fast.version})
    assert r.status_code == 200, r.text
    assert infer_version(c) == fast.version
    assert c.get("/info/").json()["spmamba"]["model"]["preset"] == "fast"
