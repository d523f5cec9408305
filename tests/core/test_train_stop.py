"""``train_detector(should_stop=..., stop_time_limit=...)``: a stop request (during training or while calibrating)
ends with a calibrated model within the stop's time limit; calibration then uses fewer held-out volumes."""
import time

import numpy as np
import torch

from core_helpers import small_volumes as _volumes
from spmamba.detector import Detector
from spmamba.train import calibrate, train_detector


def _slow_detect(monkeypatch, seconds, on_call=None):
    orig = Detector.detect

    def slow(self, *a, **kw):
        if on_call:
            on_call()
        time.sleep(seconds)
        return orig(self, *a, **kw)

    monkeypatch.setattr(Detector, "detect", slow)


def test_calibrate_follows_a_deadline_that_appears_while_it_runs():
    from spmamba.models import SPMamba, get_config

    torch.manual_seed(0)
    det = Detector(SPMamba(get_config("tiny")), device="cpu")
    vols = _volumes(4, shape=(24, 28, 3))
    asked = []

    def deadline():  # no limit for the first two volumes, then one already past
        asked.append(1)
        return None if len(asked) <= 2 else time.time() - 1.0

    cal = calibrate(det, vols, deadline=deadline)
    assert cal.n_volumes == 2 and np.isfinite(cal.pixel_threshold) and np.isfinite(cal.volume_threshold)


def test_stop_while_calibrating_bounds_calibration(monkeypatch):
    """A stop arriving during a slow calibration: the model is still calibrated (>= 1 volume), in time."""
    flag = {"stop": False}
    _slow_detect(monkeypatch, 0.6, on_call=lambda: flag.update(stop=True))
    t0 = time.time()
    det = train_detector(_volumes(10), config="tiny", epochs=1, device="cpu", val_fraction=0.5, max_steps=1,
                         should_stop=lambda: flag["stop"], stop_time_limit=1.0)
    took = time.time() - t0
    cal = det.calibration
    assert 1 <= cal.n_volumes < 5, cal.n_volumes  # 5 held out, cut short by the stop's time limit
    assert len(cal.normal_volume_scores) == cal.n_volumes and np.isfinite(cal.pixel_threshold)
    assert det.meta["training"]["n_calibration_volumes"] == cal.n_volumes
    assert det.meta["training"]["n_held_out_volumes"] == 5
    assert took < 30, took


def test_stop_during_training_calibrates_within_the_stop_limit(monkeypatch):
    _slow_detect(monkeypatch, 0.5)
    steps = []
    det = train_detector(_volumes(10), config="tiny", epochs=50, device="cpu", val_fraction=0.5,
                         should_stop=lambda: len(steps) >= 1, stop_time_limit=0.8,
                         progress=lambda p: steps.append(1) if p.get("phase") == "train" and p.get("step") else None)
    training = det.meta["training"]
    assert training["stopped_early"] is True and training["stop_reason"] == "stopped"
    assert 1 <= det.calibration.n_volumes <= 2
    # without a stop limit, every held-out volume is used
    det = train_detector(_volumes(10), config="tiny", epochs=50, device="cpu", val_fraction=0.5,
                         should_stop=lambda: True)
    assert det.meta["training"]["stop_reason"] == "stopped" and det.calibration.n_volumes == 5
