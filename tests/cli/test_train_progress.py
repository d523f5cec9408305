"""`spmamba train`'s progress bars: one per phase, in the phase's own unit, with rates measured over real work."""
from __future__ import annotations

import io
import time

from spmamba.cli import _TrainProgress


def test_bars_follow_the_phases_with_their_units_and_sane_rates(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    p = _TrainProgress(quiet=False)
    for i in range(4):  # encoder norm adaptation: one update per batch, not a 0/1 bar
        p({"phase": "encoder_norm", "step": i, "total_steps": 3, "unit": "batch"})
    assert p.phase == "encoder_norm" and p.bar.unit == "batch" and (p.bar.n, p.bar.total) == (3, 3)

    p({"phase": "train", "epoch": 1, "total_epochs": 2, "step": 0, "total_steps": 5, "global_step": 0,
       "total_global_steps": 10})  # announced when training starts
    time.sleep(0.25)
    p({"phase": "train", "epoch": 1, "total_epochs": 2, "step": 1, "total_steps": 5, "global_step": 1,
       "total_global_steps": 10, "loss": 1.5})
    bar = p.bar
    assert p.phase == "train" and bar.unit == "step" and (bar.n, bar.total) == (1, 10)
    rate = bar.format_dict["rate"] or bar.n / bar.format_dict["elapsed"]
    assert rate < 10, f"{rate:.0f} steps/s after one step in 0.25 s"

    # resumed training: the bar starts at the steps already done, the rate counts only this run's
    p.close()
    p({"phase": "train", "epoch": 2, "total_epochs": 2, "step": 0, "total_steps": 5, "global_step": 5,
       "total_global_steps": 10})
    assert (p.bar.n, p.bar.total) == (5, 10)

    p({"phase": "calibrate", "step": 0, "total_steps": 2, "unit": "vol"})
    p({"phase": "calibrate", "step": 1, "total_steps": 2, "unit": "vol"})
    assert p.phase == "calibrate" and p.bar.unit == "vol" and p.bar.n == 1
    p({"phase": "done"})
    assert p.bar is None
