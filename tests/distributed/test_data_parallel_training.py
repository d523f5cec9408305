"""Data-parallel training on 2 local processes (torchrun, gloo, CPU): the ranks hold the same parameters after every
step; the result is that of one process with the batch of both (tolerance below); a stop request seen by one rank
at any step ends both with the same loadable model; a 2-rank checkpoint resumes on 1 process; two torchrun
launchers meet through a c10d rendezvous on 127.0.0.1 (`--nnodes 2`).

Tolerance: one process on the same slices with batch 8 = 2 x 4 (synchronised BatchNorm makes the ranks' batch
statistics those of the whole batch, DistributedDataParallel averages the gradients) gives losses equal to 1e-5
(relative) and parameters within 5% of the update (AdamW's first steps divide each gradient by its own size, which
magnifies float rounding in gradients that nearly cancel: measured 2%); one process with a batch of 4 ends 150%
of the update away."""
from __future__ import annotations

import json

import pytest
import torch

from ddp_helpers import HERE, finish, start, torchrun_cmd

pytestmark = pytest.mark.slow


def _read(out, name):
    return [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]


def _single_process(batch_size):
    """``fit`` in this process on the worker's slices with ``batch_size``: (initial, final weights, losses)."""
    from ddp_worker import SEED, fixed_slices
    from spmamba.models import get_config
    from spmamba.train import TrainingBudget, build_or_resume, fit

    torch.manual_seed(SEED)
    det, _ = build_or_resume("spmamba", get_config("tiny", batch_size=batch_size), device="cpu")
    init = {k: v.detach().clone() for k, v in det.model.named_parameters()}
    losses = []
    fit(det, fixed_slices(), TrainingBudget(progress=lambda e: losses.append(e["loss"]) if e.get("phase") == "train"
                                            and e.get("loss") is not None else None),
        total_epochs=1, max_steps=3, seed=SEED)
    return init, {k: v.detach() for k, v in det.model.named_parameters()}, losses


def _distance(a, b, init):
    """|a - b| / |b - init| over the trainable parameters."""
    num = sum(float((a[k] - b[k]).norm()) ** 2 for k in init)
    den = sum(float((b[k] - init[k]).norm()) ** 2 for k in init)
    return (num / den) ** 0.5


def test_two_ranks_train_as_one_process_with_both_batches(tmp_path, normal_folder):
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "torchrun.log"
    finish([start(torchrun_cmd(str(HERE / "ddp_worker.py"), str(out), "steps,stops", str(normal_folder)),
                  tmp_path, log)], [log])

    # identical parameters (and BatchNorm statistics) on both ranks after every step
    r0, r1 = _read(out, "steps")
    assert r0["steps"] == 2 and len(r0["digests"]) == 2  # 16 slices, 2 x 4 a step
    assert r0["digests"] == r1["digests"] and r0["buffers"] == r1["buffers"] and r0["losses"] == r1["losses"]

    # = one process with batch 8 (the learning rate scaled x2 for it), not one with batch 4
    ddp = torch.load(out / "steps.weights.pt")
    init, single, losses = _single_process(8)
    assert len(losses) == 2 and losses == pytest.approx(r0["losses"], rel=1e-5)
    assert _distance(ddp, single, init) < 0.05
    init4, single4, _ = _single_process(4)
    assert _distance(ddp, single4, init4) > 0.5

    # a stop request that only rank 1 sees, at step 0, 1 or 2: both ranks end there with the same calibrated model
    from spmamba.detector import Detector

    for at in (0, 1, 2):
        s0, s1 = _read(out, f"stop{at}")
        assert s0 == s1 and s0["steps"] == at and s0["stop_reason"] == "stopped" and s0["processes"] == 2
        det = Detector.load(out / f"stop{at}.pt", device="cpu")
        assert det.version == s0["version"] and det.meta["training"]["steps"] == at

    # a 2-rank checkpoint resumes on 1 process: the learning rate follows the batch (halved), training goes on
    from spmamba.train import train_detector

    first = Detector.load(out / "stop1.pt", device="cpu").meta["training"]
    det = train_detector(sorted(normal_folder.glob("*.nii.gz")), resume=out / "stop1.pt", max_steps=1, device="cpu",
                         val_fraction=0.4, align="none")
    again = det.meta["training"]
    assert again["processes"] == 1 and again["lr"] == pytest.approx(first["lr"] / 2)
    assert again["steps"] == again["steps_per_epoch"] * 1 + 1 and again["stop_reason"] == "max_steps"


def test_two_nodes_meet_through_a_c10d_rendezvous(tmp_path, normal_folder):
    """Two torchrun launchers (`--nnodes 2`, one process each) on 127.0.0.1 train one model with `spmamba train
    --batch-size 2`; position statistics and calibration are shared out between them."""
    port = tmp_path / "model.pt"
    cmd = torchrun_cmd("-m", "spmamba", "train", "--normal", str(normal_folder), "--out", str(port),
                       "--config", "tiny", "--batch-size", "2", "--epochs", "2", "--align", "none",
                       "--position-normalise",
                       "--val-fraction", "0.4", nproc=1, nnodes=2)
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    finish([start(cmd, tmp_path, logs[0]), start(cmd, tmp_path, logs[1])], logs)
    from spmamba.detector import Detector

    det = Detector.load(port, device="cpu")
    t = det.meta["training"]
    # 2 processes x 2 samples a step: the learning rate of batch 4 (base 0.005 x 4 / 16)
    assert t["processes"] == 2 and t["step_batch"] == 4 and t["lr"] == pytest.approx(0.00125)
    assert t["epochs"] == 2 and not t["stopped_early"] and det.config.training.batch_size == 2
    assert det.position_stats is not None and det.calibration.n_volumes == 2
    said = "".join(log.read_text() for log in logs)
    assert said.count("saved ") == 1 and "by 2 processes" in said  # rank 0 alone reports
    assert not (tmp_path / "model.pt.partial").exists()
