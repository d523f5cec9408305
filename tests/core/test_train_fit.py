"""The training loop's steps called one by one (split_normals, build_or_resume, prepare_volumes, fit, calibrate,
publish), as a caller that wants its own loop around them would: ``fit`` with a ``TrainingBudget``."""
from core_helpers import small_volumes as _volumes  # tests/core is on sys.path (pytest's default import mode)

from spmamba.detector import Detector
from spmamba.train import (FitState, TrainingBudget, build_or_resume, calibrate, fit, prepare_volumes, publish,
                           split_normals)


def test_steps_one_by_one_with_fit(tmp_path):
    vols = _volumes(5)
    train_idx, val_idx = split_normals(len(vols), 0.4, seed=0)
    det, resumed = build_or_resume("spmamba", "tiny", device="cpu")
    assert resumed is None
    data = det.model.training_data(prepare_volumes([vols[i] for i in train_idx], det.preprocessing))
    events = []
    state = fit(det, data, TrainingBudget(progress=events.append), total_epochs=3, max_steps=2)
    assert isinstance(state, FitState)
    assert state.steps == 2 and state.stopped and state.stop_reason == "max_steps"
    assert state.history and state.training_state(state.epochs_done)["epoch"] == state.epochs_done
    assert {e["phase"] for e in events} >= {"train", "epoch"}
    assert not det.model.training  # left in eval mode
    det.calibration = calibrate(det, [vols[i] for i in val_idx])
    path = publish(det, tmp_path / "m.pt", state.training_state(state.epochs_done))
    assert Detector.load(path, device="cpu").version == det.version


def test_fit_stops_at_once_on_a_stop_request():
    vols = _volumes(4)
    det, _ = build_or_resume("spmamba", "tiny", device="cpu")
    data = det.model.training_data(prepare_volumes(vols, det.preprocessing))
    budget = TrainingBudget(should_stop=lambda: True)
    state = fit(det, data, budget, total_epochs=5)
    assert state.stop_reason == "stopped" and state.step_total == 0 and state.epochs_done == 0
    assert budget.stop() and budget.stop_seen_at is not None


def test_fit_calls_on_epoch_after_each_full_epoch():
    vols = _volumes(3)
    det, _ = build_or_resume("spmamba", "tiny", device="cpu")
    data = det.model.training_data(prepare_volumes(vols, det.preprocessing))
    seen = []
    state = fit(det, data, total_epochs=1, on_epoch=lambda st, e: seen.append((e, st.steps)))
    assert seen == [(1, state.steps_per_epoch)] and state.stop_reason is None and state.epochs_done == 1
