"""``train_detector(time_limit=...)`` is a wall-time bound on the whole training (reading, encoder norm adaptation,
optimisation, calibration, saving), and its progress reports are meaningful per phase."""
import math
import time

import numpy as np
import pytest
import torch

from core_helpers import small_volumes as _volumes
from spmamba.detector import Detector
from spmamba.models import SPMamba, get_config
from spmamba.preprocessing import Preprocessing
from spmamba.train import calibrate, train_detector


def test_calibration_uses_fewer_volumes_when_its_deadline_comes():
    torch.manual_seed(0)
    det = Detector(SPMamba(get_config("tiny")), Preprocessing(), device="cpu")
    vols = _volumes(3, shape=(24, 28, 3))
    seen = []
    cal = calibrate(det, vols, progress=seen.append, deadline=time.time() - 1.0)
    assert cal.n_volumes == 1 and len(cal.normal_volume_scores) == 1  # the first volume is always used
    assert np.isfinite(cal.pixel_threshold) and np.isfinite(cal.volume_threshold)
    assert [d["step"] for d in seen] == [0, 1] and seen[0]["total_steps"] == 3
    assert calibrate(det, vols).n_volumes == 3


def test_the_time_kept_for_after_training_does_not_shrink_as_training_goes_on():
    """The reserve for position statistics, calibration and saving is fixed by the time limit: all of it when it
    fits in half of the limit, else half of the limit; never half of what happens to be left (it then shrank to a
    few seconds and a 20-minute training fitted its position statistics on 2 of 16 normals)."""
    from spmamba.train import TrainingBudget

    now = time.time()
    late = TrainingBudget(deadline=now + 100, started=now - 900, seconds_per_volume=10.0, n_after=20)
    assert late.reserve() == pytest.approx(1.15 * 10.0 * 20)  # 230 s of a 1000 s limit, though 100 s are left
    short = TrainingBudget(deadline=now + 200, started=now, seconds_per_volume=10.0, n_after=20)
    assert short.reserve() == pytest.approx(100.0)  # half of a 200 s limit
    tiny = TrainingBudget(deadline=now + 10, started=now, seconds_per_volume=10.0, n_after=20)
    assert tiny.reserve() == pytest.approx(11.5)  # never less than one volume
    assert TrainingBudget().reserve() == 0.0
    # position statistics detect training volumes already on the reference grid (no registration): their own time
    aligned = TrainingBudget(deadline=now + 1000, started=now, seconds_per_volume=10.0, n_after=4,
                             seconds_per_aligned_volume=4.0, n_after_aligned=16)
    assert aligned.reserve() == pytest.approx(1.15 * (10.0 * 4 + 4.0 * 16))
    assert aligned.after_seconds(n_aligned=0) == pytest.approx(1.15 * 40.0)


def test_encoder_norm_adaptation_reports_each_batch_and_can_stop_early():
    torch.manual_seed(0)
    model = SPMamba(get_config("tiny"))
    slices = torch.rand(130, 1, 32, 32)
    calls = []
    with torch.no_grad():
        assert model.adapt_encoder_norm(slices, batch_size=64, progress=lambda b, k: calls.append((b, k))) == 130
    assert calls == [(1, 3), (2, 3), (3, 3)]
    with torch.no_grad():
        assert model.adapt_encoder_norm(slices, batch_size=64, should_stop=lambda: True) == 64  # one batch at least


@pytest.mark.slow
def test_time_limit_bounds_the_whole_training_including_calibration(tmp_path):
    limit = 12.0
    vols = _volumes(8)
    events = []
    path = tmp_path / "m.pt"
    t0 = time.time()
    det = train_detector(vols, config="tiny", epochs=100_000, device="cpu", val_fraction=0.5, time_limit=limit,
                         checkpoint_path=path, progress=events.append, origin="test")
    elapsed = time.time() - t0
    assert elapsed <= limit + 3.0 + 0.15 * limit, f"took {elapsed:.1f} s with a {limit:.0f} s limit"

    tr = det.meta["training"]
    assert tr["stop_reason"] == "time_limit" and tr["time_limit_s"] == limit and tr["origin"] == "test"
    assert tr["steps"] >= 1
    cal = det.calibration
    assert 1 <= cal.n_volumes <= 4 and tr["n_calibration_volumes"] == cal.n_volumes and tr["n_held_out_volumes"] == 4
    assert np.isfinite(cal.pixel_threshold) and np.isfinite(cal.volume_threshold)
    saved = Detector.load(path, device="cpu")  # the file is the calibrated model, written within the limit
    assert saved.version == det.version and saved.meta["training"]["stop_reason"] == "time_limit"

    # every phase is announced at step 0 (a progress bar opens when the work starts), then counts its items
    phases = []
    for e in events:
        if e["phase"] in ("epoch", "done"):
            continue
        if not phases or phases[-1][0] != e["phase"]:
            phases.append((e["phase"], []))
        phases[-1][1].append(e)
    names = [p for p, _ in phases]
    assert names[:6] == ["load", "prepare", "measure", "encoder_norm", "teacher_features", "train"]
    assert names[-1] == "calibrate"
    for name, evs in phases:
        first = evs[0].get("global_step", evs[0].get("step")) if name == "train" else evs[0]["step"]
        assert first == 0, (name, evs[0])
    norm = dict(phases)["encoder_norm"]
    n_slices = tr["n_slices"]
    assert norm[0]["total_steps"] == math.ceil(n_slices / 64) and norm[0]["unit"] == "batch"
    assert [e["step"] for e in norm][1:] == list(range(1, len(norm)))
