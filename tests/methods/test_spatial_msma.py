"""Spatial-MSMA (spmamba.methods.spatial_msma): its pieces pinned against hand computations and closed forms (noise
schedule, denoising score matching, the score network's scaling, pooled score norms, position encoding, the flow's
log-likelihood), the two-stage training in the shared loop (stage epochs, resume in the flow stage, stop, time
limit), and the method (tiny preset) through train, save, load, detect and the CLI. The app:
tests/app/test_app_spatial_msma.py."""
from __future__ import annotations

import csv
import itertools
import math
import types

import numpy as np
import pytest
import torch

from spmamba.checkpoint import load_checkpoint
from spmamba.detector import Detector
from spmamba.io import load_volume, save_volume
from spmamba.methods import VOLUME, get_method, method_names
from spmamba.methods.spatial_msma import PRESETS, SpatialMSMA, to_working_grid
from spmamba.methods.spatial_msma.network import (ScoreUNet, build_flow, dsm_loss, largest_pairwise_distance,
                                                  pooled_score_norms, position_encoding, sigma_at, sigma_schedule)
from spmamba.train import stage_end_epochs, train_detector
from method_helpers import AFFINE, box_volume  # noqa: E402



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are many small operations: one torch thread is several times faster than two on a busy machine
    (measured: 0.3 s against 30 s for the time-limit test at load 3)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ the pieces
def test_noise_schedule_is_geometric_between_sigma_min_and_sigma_max():
    s = sigma_schedule(0.06, 545.0, 20)
    assert s.shape == (20,) and math.isclose(float(s[0]), 545.0, rel_tol=1e-5)
    assert math.isclose(float(s[-1]), 0.06, rel_tol=1e-5)
    ratios = s[1:] / s[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (0.06 / 545.0) ** (1 / 19)))
    # the VE SDE: sigma(t) = sigma_min (sigma_max / sigma_min) ** t
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(sigma_at(t, 0.06, 545.0), torch.tensor([0.06, math.sqrt(0.06 * 545.0), 545.0]))


def test_sigma_max_is_the_largest_distance_between_training_volumes():
    x = torch.randn(4, 2, 3, 4, 5)
    by_loop = max(float(torch.linalg.vector_norm(a - b)) for a, b in itertools.combinations(x, 2))
    assert math.isclose(largest_pairwise_distance(x), by_loop, rel_tol=1e-6)
    model = SpatialMSMA("tiny")
    assert model.preparation_phase("none") == "noise_scale"
    data = torch.stack([torch.stack([torch.randn(16, 16, 16), torch.ones(16, 16, 16)]) for _ in range(3)])
    note = model.prepare(data)
    assert math.isclose(model.sigma_max, largest_pairwise_distance(data[:, :1]), rel_tol=1e-6) and "sigma_max" in note
    assert model.preparation_phase("none") is None  # set: a resumed or fixed model keeps it
    assert SpatialMSMA(SpatialMSMA.get_config("tiny", sigma_max=50.0)).sigma_max == 50.0


def test_dsm_loss_against_a_hand_computed_case():
    def score(y, s):  # the exact score of N(0, sigma^2): -y / sigma^2
        return -y / s.view(-1, 1, 1, 1, 1) ** 2

    x = torch.tensor([1.0, 0.0]).view(1, 1, 1, 1, 2)
    z = torch.tensor([0.5, -1.0]).view(1, 1, 1, 1, 2)
    # x~ = x + 2 z = (2, -2); score = (-0.5, 0.5); sigma score + z = (-0.5, 0); mean of squares = 0.125
    assert math.isclose(float(dsm_loss(score, x, torch.tensor([2.0]), z)), 0.125, rel_tol=1e-6)
    # data at 0: the exact score makes the loss 0 whatever the noise
    zero = torch.zeros(3, 1, 2, 2, 2)
    assert float(dsm_loss(score, zero, torch.tensor([0.5, 1.0, 4.0]), torch.randn(3, 1, 2, 2, 2))) < 1e-10
    # the batch mean of per-volume voxel means
    two = torch.cat([x, torch.zeros_like(x)])
    assert math.isclose(float(dsm_loss(score, two, torch.tensor([2.0, 2.0]), torch.cat([z, z]))),
                        (0.125 + 0.0) / 2, rel_tol=1e-6)


def test_score_network_is_noise_conditioned_and_divided_by_sigma():
    torch.manual_seed(0)
    net = ScoreUNet(1, channels=(4, 8), blocks=1, groups=2, emb_dim=8)
    for p in net.parameters():  # leave the zero init (residual branches start off): a generic network
        torch.nn.init.normal_(p, std=0.2)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    seen = {}
    net.conv_out.register_forward_hook(lambda m, i, o: seen.__setitem__("raw", o))
    x = torch.randn(2, 1, 8, 8, 8)
    sigma = torch.tensor([0.5, 3.0])
    out = net(x, sigma)
    assert out.shape == x.shape
    raw = seen["raw"]
    torch.testing.assert_close(out * sigma.view(-1, 1, 1, 1, 1), raw)
    # the same input at another noise level gives another (FiLM-modulated) output, not just a rescaled one
    net(x, torch.tensor([1.0, 1.0]))
    assert not torch.allclose(seen["raw"], raw, atol=1e-4)


def test_pooled_score_norms_against_an_explicit_loop():
    torch.manual_seed(1)
    s = torch.randn(1, 2, 3, 4, 5, 3)  # (B, L, C, D, H, W)
    got = pooled_score_norms(s)
    assert got.shape == (1, 2, 4, 5, 3)
    want = torch.zeros_like(got)
    for lvl, d, h, w in itertools.product(range(2), range(4), range(5), range(3)):
        total = 0.0
        for dd, hh, ww in itertools.product((-1, 0, 1), repeat=3):
            if 0 <= d + dd < 4 and 0 <= h + hh < 5 and 0 <= w + ww < 3:
                total += float((s[0, lvl, :, d + dd, h + hh, w + ww] ** 2).sum())
        want[0, lvl, d, h, w] = math.sqrt(total)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_position_encoding_is_sinusoidal_per_axis():
    coords = torch.tensor([[0.0, 0.0, 0.0], [3.0, 5.0, 7.0]])
    enc = position_encoding(coords, 12)
    assert enc.shape == (2, 12)
    # 4 channels per axis: frequencies 1 and 1 / 100, each as (sin, cos)
    for axis, c in enumerate((3.0, 5.0, 7.0)):
        part = enc[1, 4 * axis:4 * axis + 4]
        want = [math.sin(c), math.cos(c), math.sin(c / 100), math.cos(c / 100)]
        torch.testing.assert_close(part, torch.tensor(want), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(enc[0], torch.tensor([0.0, 1.0] * 6))


def test_flow_log_likelihood_is_the_change_of_variables_formula():
    """log p(x | c) = log N(f^-1(x | c); 0, I) + log |det d f^-1 / dx|, with the Jacobian by autograd, for a flow
    with random (non-identity) weights."""
    torch.manual_seed(2)
    flow = build_flow(3, context=4, hidden=8, blocks=1).double()
    for p in flow.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, c = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)

    def inverse(v, ctx):
        z = v
        for layer in reversed(flow.flows):
            z, _ = layer.inverse(z, context=ctx)
        return z

    got = flow.log_prob(x, context=c).detach()
    for i in range(5):
        z = inverse(x[i:i + 1], c[i:i + 1])[0].detach()
        jac = torch.autograd.functional.jacobian(lambda v: inverse(v[None], c[i:i + 1])[0], x[i])
        want = -0.5 * float((z ** 2).sum()) - 1.5 * math.log(2 * math.pi) + float(torch.linalg.slogdet(jac)[1])
        assert math.isclose(float(got[i]), want, rel_tol=1e-6, abs_tol=1e-6)


def test_flow_fits_a_conditional_gaussian_to_its_closed_form_likelihood():
    """x | c ~ N((2c, -c), diag(0.5^2, 0.25^2)): after maximum-likelihood training the mean log-likelihood of held-out
    samples is the Gaussian's closed form, -1/2 sum(1 + log(2 pi s^2)), and the flow beats the unconditional fit."""
    torch.manual_seed(3)

    def sample(n):
        c = torch.rand(n, 1) * 2 - 1
        x = torch.cat([2 * c, -c], 1) + torch.randn(n, 2) * torch.tensor([0.5, 0.25])
        return x, c

    flow = build_flow(2, context=1, hidden=16, blocks=1)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(150):
        x, c = sample(128)
        loss = -flow.log_prob(x, context=c).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, c = sample(4000)
    with torch.no_grad():
        ll = float(flow.log_prob(x, context=c).mean())
    closed = -0.5 * sum(1 + math.log(2 * math.pi * s ** 2) for s in (0.5, 0.25))
    assert abs(ll - closed) < 0.1, (ll, closed)


def test_stage_epochs():
    assert stage_end_epochs((0.7, 0.3), 10) == [7]
    assert stage_end_epochs((0.5, 0.5), 2) == [1]
    assert stage_end_epochs((0.99, 0.01), 4) == [3]  # each stage at least one epoch
    assert stage_end_epochs((0.01, 0.99), 4) == [1]
    with pytest.raises(ValueError, match="2 stages: epochs must be >= 2"):
        stage_end_epochs((0.5, 0.5), 1)


def test_presets_and_their_checks():
    assert "spatial_msma" in method_names() and get_method("spatial_msma") is SpatialMSMA
    assert SpatialMSMA.kind == VOLUME and list(PRESETS) == ["paper", "fast", "tiny"]
    paper = SpatialMSMA.get_config("paper")
    assert (paper.sigma_min, paper.levels, paper.training.grad_clip, paper.training.lr) == (0.06, 20, 1.0, 2e-4)
    fast = SpatialMSMA.get_config("fast")
    assert fast.levels == 10 and fast.grid == (48, 56, 48)
    cfg = SpatialMSMA.get_config("tiny", levels=4, epochs=6)
    assert cfg.levels == 4 and cfg.training.epochs == 6
    assert SpatialMSMA.get_config(cfg.to_dict()) == cfg  # as stored in a model file
    for bad, words in (({"grid": (15, 16, 16)}, "multiple of 2"), ({"levels": 1}, "levels must be >= 2"),
                       ({"position_dim": 8}, "multiple of 6"), ({"sigma_max": 0.01}, "sigma_min < sigma_max"),
                       ({"score_share": 1.0}, "score_share")):
        with pytest.raises(ValueError, match=words):
            SpatialMSMA.get_config("tiny", **bad)
    with pytest.raises(ValueError, match="unknown preset 'huge' for method spatial_msma"):
        SpatialMSMA.get_config("huge")
    with pytest.raises(ValueError, match="unknown spatial_msma settings"):
        SpatialMSMA.get_config({"name": "x", "nosuch": 1})


def test_working_grid_keeps_the_foreground_box():
    norm = np.zeros((10, 12, 6), np.float32)
    fg = np.zeros(norm.shape, bool)
    norm[2:8, 3:9, 1:5], fg[2:8, 3:9, 1:5] = 0.5, True
    work = to_working_grid(norm, fg, (8, 8, 8))
    assert work.shape == (2, 8, 8, 8)
    assert bool((work[1] == 1).all())  # the box is all foreground here
    torch.testing.assert_close(work[0], torch.zeros(8, 8, 8))  # 0.5 -> 0 in [-1, 1]


# ------------------------------------------------------------------------------------------------ the method
@pytest.fixture(scope="module")
def trained(normals, tmp_path_factory):
    path = tmp_path_factory.mktemp("msma") / "msma.pt"
    events = []
    det = train_detector(normals, method="spatial_msma", config="tiny", device="cpu", checkpoint_path=path,
                         progress=events.append)
    return det, path, events


def test_two_stage_training_save_load_detect(normals, trained):
    det, path, events = trained
    assert det.method_name == "spatial_msma" and det.config.name == "tiny"
    meta = det.meta["training"]
    # tiny: 4 epochs, half of them for the score network, then the flow
    assert meta["epochs"] == 4 and meta["stage"] == "flow"
    assert meta["stage_changes"] == [{"stage": "flow", "epoch": 2, "step": 4}]
    stage_events = [e for e in events if e["phase"] == "stage"]
    assert [(e["stage"], e["epoch"]) for e in stage_events] == [("flow", 3)]
    assert any(e["phase"] == "score_features" for e in events) and "sigma_max" in det.meta["noise_scale"]
    assert det.model.stage_index == 1 and bool(det.model.standardised)
    cal = det.calibration
    assert np.isfinite(cal.pixel_threshold) and np.isfinite(cal.volume_threshold) and cal.n_volumes == 1
    obj = load_checkpoint(path)
    assert obj["method"] == "spatial_msma" and obj["config"]["name"] == "tiny" and "training_state" in obj
    loaded = Detector.load(path, device="cpu")
    x = box_volume(np.random.default_rng(5), lesion=True)
    a, b = det.detect(x, AFFINE), loaded.detect(x, AFFINE)
    assert loaded.version == det.version and np.array_equal(a.heatmap, b.heatmap) and a.score == b.score
    assert a.heatmap.shape == x.shape and np.isfinite(a.heatmap).all()
    assert (a.heatmap[~a.foreground] == 0).all() and a.heatmap[a.foreground].max() > 0
    assert np.array_equal(det.detect(x, AFFINE).heatmap, a.heatmap)  # deterministic (no noise at test time)


def test_resume_in_the_flow_stage_leaves_the_score_network_as_it_was(normals, trained):
    det, path, _ = trained
    before = {k: v.clone() for k, v in det.model.score_net.state_dict().items()}
    flow_before = {k: v.clone() for k, v in det.model.flow.state_dict().items()}
    events = []
    more = train_detector(normals, resume=path, epochs=6, device="cpu", progress=events.append)
    assert more.meta["training"]["epochs"] == 6 and more.model.stage_index == 1
    assert not [e for e in events if e["phase"] in ("stage", "noise_scale")]  # no stage 1 again
    for k, v in more.model.score_net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, flow_before[k]) for k, v in more.model.flow.state_dict().items())
    torch.testing.assert_close(more.model.feature_mean, det.model.feature_mean)  # kept, not refitted
    with pytest.raises(ValueError, match="spatial_msma"):
        train_detector(normals, method="spmamba", resume=path, device="cpu")


def test_a_time_limit_shares_the_optimisation_time_between_the_stages(monkeypatch):
    """On a clock whose seconds pass with the steps (one per step; no real time, so a loaded machine changes
    nothing): a 10 s limit gives the score stage its share (0.5 for tiny: ~5 steps), then the flow trains until the
    time is up, with the samples made again (the feature cache) at the change."""
    import spmamba.train as train_module
    from spmamba.preprocessing import Preprocessing
    from spmamba.train import TrainingBudget, fit

    now = [1000.0]
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(
        time=lambda: now[0], perf_counter=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)))
    torch.manual_seed(0)
    det = Detector(SpatialMSMA("tiny"), Preprocessing(), device="cpu")
    vols = torch.stack([to_working_grid(box_volume(np.random.default_rng(i)), box_volume(np.random.default_rng(i)) > 0,
                                        (16, 16, 16)) for i in range(4)])
    events = []

    def progress(e):
        events.append(e)
        if e.get("phase") == "train" and "loss" in e:
            now[0] += 1.0

    budget = TrainingBudget(deadline=now[0] + 10.0, progress=progress, started=now[0])
    state = fit(det, vols, budget, total_epochs=10_000)
    assert state.stop_reason == "time_limit" and det.model.stage_index == 1
    (change,) = state.stage_changes
    assert change["stage"] == "flow" and 4 <= change["step"] <= 6 and state.steps >= change["step"] + 3
    assert [e["phase"] for e in events].count("score_features") == len(vols)  # the cache, once, at the change


def test_stop_and_too_few_epochs(normals, tmp_path):
    # a stop during the score stage: a calibrated, loadable model, still in that stage (a resume goes on there)
    calls = itertools.count()
    det = train_detector(normals, method="spatial_msma", config="tiny", device="cpu",
                         should_stop=lambda: next(calls) >= 1, checkpoint_path=tmp_path / "stopped.pt")
    assert det.meta["training"]["stop_reason"] == "stopped" and det.meta["training"]["stage"] == "score"
    assert np.isfinite(det.calibration.pixel_threshold)
    assert Detector.load(tmp_path / "stopped.pt", device="cpu").model.stage_index == 0
    with pytest.raises(ValueError, match="2 stages: epochs must be >= 2"):
        train_detector(normals, method="spatial_msma", config="tiny", epochs=1, device="cpu")


def test_cli_trains_and_detects(tmp_path, capsys):
    from spmamba.cli import main
    from spmamba.demo import describe_model

    normal = tmp_path / "normal"
    rng = np.random.default_rng(1)
    for i in range(4):
        save_volume(box_volume(rng), AFFINE, normal / f"n{i}.nii.gz")
    save_volume(box_volume(rng, lesion=True), AFFINE, tmp_path / "test" / "a0.nii.gz")
    (tmp_path / "test" / "broken.nii.gz").write_bytes(b"not a volume")
    out = tmp_path / "m.pt"
    assert main(["train", "--method", "spatial_msma", "--config", "nosuch", "--normal", str(normal), "--out",
                 str(out), "-q"]) == 2
    assert "not a preset of method spatial_msma; choose one of paper, fast, tiny" in capsys.readouterr().err
    assert main(["train", "--method", "spatial_msma", "--config", "tiny", "--epochs", "1", "--normal", str(normal),
                 "--out", str(out), "-q"]) == 2
    assert "epochs must be >= 2" in capsys.readouterr().err
    assert main(["train", "--method", "spatial_msma", "--config", "tiny", "--epochs", "2", "--normal", str(normal),
                 "--out", str(out), "-q"]) == 0
    assert load_checkpoint(out)["method"] == "spatial_msma" and "method spatial_msma" in describe_model(out)
    rc = main(["detect", "--model", str(out), str(tmp_path / "test"), "--out", str(tmp_path / "pred"), "-q"])
    assert rc == 2 and "broken.nii.gz" in capsys.readouterr().err  # the bad file named, the other scored
    rows = list(csv.DictReader(open(tmp_path / "pred" / "scores.csv")))
    assert [r["id"] for r in rows] == ["a0"] and np.isfinite(float(rows[0]["score"]))
    assert load_volume(tmp_path / "pred" / "a0_anomaly.nii.gz").array.shape == (20, 24, 8)
