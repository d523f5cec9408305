"""`--conf train_processes 2`: the app's training task trains data-parallel in 2 local processes (torchrun under
the hood, spmamba.launch), with progress in train_stats and the graceful stop of DELETE /train/ as with one."""
from __future__ import annotations

import pytest

from test_app_stop import check_published, infer_version, wait_stats

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def test_two_processes_train_report_progress_and_stop_gracefully(make_app, tiny_data, tiny_model):
    studies = {**{f"n{i}": p for i, p in enumerate(tiny_data["normal"][:4])}, "a0": tiny_data["abnormal"][0]}
    env = make_app(studies, model=tiny_model, curation={k: "normal" if k != "a0" else "abnormal" for k in studies},
                   conf={"train_processes": "2", "stop_grace_s": "60", "stop_max_s": "120", "align": "none"})
    c = env.client
    v0 = infer_version(c)
    assert c.get("/info/").json()["trainers"]["spmamba"]["config"]["train_processes"] == 2
    assert c.post("/train/spmamba", json={"preset": "tiny", "max_epochs": 500}).status_code == 200
    stats = wait_stats(c, lambda s: s.get("status") == "RUNNING" and (s.get("step") or 0) >= 2)
    assert stats["processes"] == 2 and stats["phase"] in ("train", "epoch", "paused")  # rank 0's progress
    task = c.delete("/train/").json()
    det = check_published(env, task, v0)
    training = det.meta["training"]
    assert training["processes"] == 2 and training["stop_reason"] == "stopped" and training["steps"] >= 2
