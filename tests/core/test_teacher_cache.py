"""SP-Mamba's teacher-feature cache: computed once after the encoder norm adaptation, exact (a step's loss and
gradients are those of the uncached step), used only when the planned steps draw every slice and it fits in memory."""
import pytest
import torch
from core_helpers import small_volumes

from spmamba.models import spmamba as spmamba_module
from spmamba.models.spmamba import SPMamba, TeacherFeatureCache, TeacherFeatures
from spmamba.train import TrainingBudget, build_or_resume, fit, prepare_volumes


def _slices(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 64, 64, generator=g)


def test_cached_step_has_the_loss_and_gradients_of_the_uncached_step():
    torch.manual_seed(0)
    model = SPMamba("tiny")
    data = _slices()
    model.eval()  # no drop-path randomness; the teacher is in eval mode either way
    cache = model.training_samples(data, planned_samples=len(data))
    assert isinstance(cache, TeacherFeatureCache) and len(cache) == len(data)
    idx = torch.tensor([3, 0, 7, 11])
    batch = cache[idx]
    assert isinstance(batch, TeacherFeatures) and torch.equal(batch.x, data[idx])
    params = model.trainable_parameters()
    cached = model.training_loss(batch)
    g_cached = torch.autograd.grad(cached, params, allow_unused=True)
    plain = model.training_loss(data[idx])
    g_plain = torch.autograd.grad(plain, params, allow_unused=True)
    assert cached.item() == pytest.approx(plain.item(), rel=1e-5)
    for a, b in zip(g_cached, g_plain):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_no_cache_when_the_plan_draws_fewer_samples_than_slices():
    model = SPMamba("tiny")
    data = _slices()
    assert model.training_samples(data, planned_samples=len(data) - 1) is data


def test_no_cache_when_it_would_not_fit_in_memory(monkeypatch):
    model = SPMamba("tiny")
    data = _slices()
    monkeypatch.setattr(spmamba_module, "_CACHE_MAX_BYTES", TeacherFeatureCache.nbytes_per_slice(64) * 5)
    assert model.training_samples(data, planned_samples=100) is data


def test_a_stop_request_abandons_the_cache():
    model = SPMamba("tiny")
    data = _slices(130)  # three batches of 64
    calls = []
    out = model.training_samples(data, planned_samples=1000, should_stop=lambda: calls.append(1) or len(calls) > 1)
    assert out is data


def test_fit_uses_the_cache_and_reports_its_phase():
    det, _ = build_or_resume("spmamba", "tiny", device="cpu")
    data = det.model.training_data(prepare_volumes(small_volumes(3), det.preprocessing))
    events = []
    state = fit(det, data, TrainingBudget(progress=events.append), total_epochs=2)
    phases = [e["phase"] for e in events]
    assert "teacher_features" in phases
    cache_events = [e for e in events if e["phase"] == "teacher_features"]
    assert cache_events[0]["step"] == 0 and cache_events[-1]["step"] == cache_events[-1]["total_steps"]
    assert phases.index("encoder_norm") < phases.index("teacher_features") < phases.index("epoch")
    assert state.epochs_done == 2 and all(h == h for h in state.history)  # finite losses
