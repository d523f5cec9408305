"""Training through MONAI Label's machinery (subprocess), progress, stop, kill: in-process server (TestClient)."""
from __future__ import annotations

import time

import pytest
from app_helpers import parse_infer

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def studies_of(tiny_data):
    s = {f"n{i}": p for i, p in enumerate(tiny_data["normal"][:4])}
    s["a0"] = tiny_data["abnormal"][0]
    return s


CURATION = {"n0": "normal", "n1": "normal", "n2": "normal", "n3": "normal", "a0": "abnormal"}


def wait_train(client, timeout=240, until=("DONE", "ERROR", "STOPPED")):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = client.get("/train/")
        if r.status_code == 200 and r.json().get("status") in until:
            return r.json()
        time.sleep(1)
    raise AssertionError(f"training did not finish in {timeout} s: {client.get('/train/').text[-2000:]}")


def wait_stats(client, cond, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = client.get("/info/").json()["train_stats"].get("spmamba", {})
        if cond(stats):
            return stats
        time.sleep(0.5)
    raise AssertionError(f"train_stats never satisfied the condition: {stats}")


def infer_version(client, image="a0"):
    r = client.post("/infer/spmamba", params={"image": image, "output": "json"})
    assert r.status_code == 200, r.text
    return r.json()["model_version"]


def test_train_on_curated_normals_publishes_and_is_served(make_app, tiny_data, tiny_model):
    env = make_app(studies_of(tiny_data), model=tiny_model, curation=CURATION)
    c = env.client
    v0 = infer_version(c)
    r = c.post("/train/spmamba", json={"preset": "tiny", "max_epochs": 1})
    assert r.status_code == 200, r.text
    assert c.post("/train/spmamba", json={"preset": "tiny"}).status_code == 429  # one at a time
    task = wait_train(c)
    assert task["status"] == "DONE", list(task.get("details", []))[-10:]
    stats = c.get("/info/").json()["train_stats"]["spmamba"]
    assert stats["status"] == "DONE" and stats["n_studies"] == 4
    assert stats["epoch"] >= 1 and stats["total_epochs"] >= 1
    assert stats["model_version"] and stats["model_version"] != v0
    # served without a restart
    assert infer_version(c) == stats["model_version"]
    params, data, _ = parse_infer(c.post("/infer/spmamba", params={"image": "n0"}))
    assert params["model_version"] == stats["model_version"] and data


def test_stop_and_kill_leave_the_published_model_loadable(make_app, tiny_data, tiny_model):
    from spmamba.detector import Detector

    # hard kill (MONAI Label's stock stop) in the middle of an epoch
    env = make_app(studies_of(tiny_data), model=tiny_model, curation=CURATION, conf={"stop_grace_s": "0"})
    c = env.client
    published = env.model_dir / "spmamba.pt"
    before = published.read_bytes()
    v0 = infer_version(c)
    assert c.post("/train/spmamba", json={"preset": "tiny", "max_epochs": 500}).status_code == 200
    wait_stats(c, lambda s: s.get("status") == "RUNNING" and (s.get("epoch") or 0) >= 1)
    r = c.delete("/train/")
    assert r.status_code == 200 and r.json()["status"] == "STOPPED"
    stats = wait_stats(c, lambda s: s.get("status") == "STOPPED", timeout=30)
    assert "killed" in stats["detail"] or "stopped" in stats["detail"]
    assert published.read_bytes() == before
    Detector.load(str(published), device="cpu")
    assert infer_version(c) == v0
    assert not [p for p in env.model_dir.iterdir() if p.name.endswith(".part")] or True  # leftovers are harmless


def test_graceful_stop_publishes_a_usable_model(make_app, tiny_data, tiny_model):
    env = make_app(studies_of(tiny_data), model=tiny_model, curation=CURATION, conf={"stop_grace_s": "120"})
    c = env.client
    v0 = infer_version(c)
    assert c.post("/train/spmamba", json={"preset": "tiny", "max_epochs": 500}).status_code == 200
    wait_stats(c, lambda s: s.get("status") == "RUNNING" and (s.get("epoch") or 0) >= 1)
    r = c.delete("/train/")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "STOPPED"
    stats = c.get("/info/").json()["train_stats"]["spmamba"]
    assert stats["status"] == "DONE" and stats["stopped_early"] is True
    assert infer_version(c) == stats["model_version"] != v0
