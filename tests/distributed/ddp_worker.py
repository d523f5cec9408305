"""Run by ``torchrun`` in the distributed tests (one copy per rank): scenarios of data-parallel training, each
writing what it saw to ``OUT/<scenario>.rank<R>.json`` (and model files) for the test to compare.

    torchrun --nproc_per_node 2 ddp_worker.py OUT SCENARIO[,SCENARIO...]

Scenarios: ``steps`` (``fit`` on fixed slices: a digest of the parameters after every step, the final weights),
``stops`` (``train_detector`` stopped by a request that only rank 1 sees, at steps 0, 1 and 2; each writes a
model file).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "core"))

from core_helpers import small_volumes  # noqa: E402

from spmamba import distributed  # noqa: E402
from spmamba.detector import Detector  # noqa: E402
from spmamba.train import TrainingBudget, build_or_resume, fit, train_detector  # noqa: E402

#: the slices of the ``steps`` scenario (and of the single-process run the test compares with)
N_SLICES, SEED = 16, 0


def fixed_slices() -> torch.Tensor:
    """(N_SLICES, 1, 64, 64) slices: a bright disc of random radius and texture on a dark background."""
    g = np.random.default_rng(7)
    yy, xx = np.mgrid[:64, :64]
    out = []
    for _ in range(N_SLICES):
        r = g.uniform(14, 24)
        disc = ((yy - 32) ** 2 + (xx - 32) ** 2) < r * r
        out.append(disc * (0.8 + 0.1 * g.standard_normal((64, 64))))
    return torch.tensor(np.array(out), dtype=torch.float32).unsqueeze(1)


def params_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.trainable_parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def run_steps(out: Path, ranks) -> None:
    torch.manual_seed(SEED)
    det, _ = build_or_resume("spmamba", "tiny", device="cpu")
    digests, losses = [], []

    def progress(e: dict) -> None:
        if e.get("phase") == "train" and e.get("loss") is not None:
            digests.append(params_digest(det.model))
            losses.append(e["loss"])

    state = fit(det, fixed_slices(), TrainingBudget(progress=progress), total_epochs=1, max_steps=3, seed=SEED)
    rec = {"digests": digests, "losses": losses, "steps": state.steps, "lr": state.optimizer.param_groups[0]["lr"],
           "buffers": hashlib.sha256(b"".join(b.detach().numpy().tobytes() for b in det.model.buffers()
                                              if b.is_floating_point())).hexdigest()}
    (out / f"steps.rank{ranks.rank}.json").write_text(json.dumps(rec))
    if ranks.main:
        torch.save({k: v.detach().cpu() for k, v in det.model.state_dict().items()}, out / "steps.weights.pt")


def run_stops(out: Path, ranks, data: Path) -> None:
    files = sorted(str(p) for p in data.glob("*.nii.gz"))
    steps = [0]  # optimisation steps of this rank's current training (counted by an optimiser hook)
    register_optimizer_step_post_hook(lambda *a: steps.__setitem__(0, steps[0] + 1))
    for at in (0, 1, 2):
        steps[0] = 0
        det = train_detector(files, config="tiny", epochs=3, device="cpu", val_fraction=0.4, align="none",
                             checkpoint_path=out / f"stop{at}.pt",
                             # the request reaches rank 1 only: the ranks must agree on it
                             should_stop=lambda: ranks.rank == 1 and steps[0] >= at)
        training = det.meta["training"]
        rec = {"steps": training["steps"], "stop_reason": training["stop_reason"], "version": det.version,
               "pixel_threshold": det.calibration.pixel_threshold, "processes": training["processes"]}
        (out / f"stop{at}.rank{ranks.rank}.json").write_text(json.dumps(rec))


def main() -> None:
    out, scenarios = Path(sys.argv[1]), sys.argv[2].split(",")
    ranks, _ = distributed.setup(torch.device("cpu"))
    assert ranks.world == int(os.environ["WORLD_SIZE"]) > 1
    if "steps" in scenarios:
        run_steps(out, ranks)
    if "stops" in scenarios:
        run_stops(out, ranks, Path(sys.argv[3]))


if __name__ == "__main__":
    main()
