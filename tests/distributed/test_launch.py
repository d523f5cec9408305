"""``spmamba.launch.train_in_processes`` (the app's ``--conf train_processes 2``) when a training process dies:
a process that aborts after rank 0 wrote the calibrated model (what a gloo connection torn down at exit does: SIGABRT)
costs nothing, the model comes back with a warning; one that aborts during training ends the run with a
``LaunchError`` that gives the exit code, and no model.

The processes are torchrun's, out of reach of monkeypatching: a ``sitecustomize`` module on their PYTHONPATH makes
rank 1 abort where the test says (``SPMAMBA_TEST_ABORT``: ``exit`` or ``train``)."""
from __future__ import annotations

import logging

import pytest

pytestmark = pytest.mark.slow

SITECUSTOMIZE = '''
import os
_where = os.environ.get("SPMAMBA_TEST_ABORT")
if _where and os.environ.get("RANK") == "1":
    if _where == "exit":  # after the worker's own end (the model written, the ranks finished together)
        import atexit
        atexit.register(os.abort)
    elif _where == "train":  # at the first optimisation step
        from spmamba.models.spmamba import SPMamba

        def _abort(self, *a, **kw):
            os.abort()

        SPMamba.loss = _abort
'''


@pytest.fixture
def abort_rank1(monkeypatch, tmp_path):
    site = tmp_path / "site_abort"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", str(site))  # train_in_processes puts its own library before it
    return lambda where: monkeypatch.setenv("SPMAMBA_TEST_ABORT", where)


def _train(folder):
    from spmamba.launch import train_in_processes

    return train_in_processes(sorted(folder.glob("*.nii.gz")), processes=2, threads=1, method="spmamba",
                              config="tiny", epochs=1, device="cpu", align="none", max_steps=2)


def test_a_process_that_aborts_after_the_model_was_written_costs_nothing(normal_folder, abort_rank1, caplog):
    abort_rank1("exit")
    with caplog.at_level(logging.WARNING, logger="spmamba.launch"):
        det = _train(normal_folder)
    training = det.meta["training"]
    assert training["processes"] == 2 and training["steps"] >= 1
    assert det.calibration.n_volumes >= 1 and det.calibration.pixel_threshold > 0
    warned = [r.getMessage() for r in caplog.records if r.name == "spmamba.launch" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "exited with code" in warned[0] and "model is used" in warned[0], warned


def test_a_process_that_aborts_during_training_ends_the_run_without_a_model(normal_folder, abort_rank1):
    from spmamba.launch import LaunchError

    abort_rank1("train")
    with pytest.raises(LaunchError, match="exit code 1 and no model"):
        _train(normal_folder)
