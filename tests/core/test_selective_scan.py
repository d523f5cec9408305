import pytest
import torch

from spmamba.ops import linear_recurrence, selective_scan, selective_scan_reference
from spmamba.ops.selective_scan import scan_backend


@pytest.fixture(params=["torch", "numba"])
def backend(request, monkeypatch):
    """Both CPU paths: the chunked PyTorch scan and the compiled numba kernels (a requirement of the project)."""
    monkeypatch.setenv("SPMAMBA_SCAN", request.param)
    assert scan_backend() == request.param
    return request.param


def _inputs(b, d, L, N, G, seed, big_steps=False):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    u = torch.randn(b, d, L, generator=g, **f64)
    delta = torch.randn(b, d, L, generator=g, **f64) * (2.0 if big_steps else 0.5)
    A = -(torch.rand(d, N, generator=g, **f64) * (16 if big_steps else 4) + 0.05)
    shape_bc = (b, N, L) if G is None else (b, G, N, L)
    B = torch.randn(*shape_bc, generator=g, **f64)
    C = torch.randn(*shape_bc, generator=g, **f64)
    D = torch.randn(d, generator=g, **f64)
    z = torch.randn(b, d, L, generator=g, **f64)
    bias = torch.randn(d, generator=g, **f64) * 0.1
    return [u, delta, A, B, C, D, z, bias]


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    "b,d,L,N,G,softplus,use_z,use_d,big",
    [
        (2, 8, 37, 4, None, True, True, True, False),
        (1, 6, 100, 5, 3, True, False, True, False),
        (3, 4, 64, 16, None, False, True, False, False),
        (1, 16, 257, 16, 4, True, True, True, True),  # long decays -> exercises the denormal flush
        (2, 3, 1, 2, None, True, False, False, False),  # L = 1
    ],
)
def test_matches_float64_sequential_reference(b, d, L, N, G, softplus, use_z, use_d, big, backend):
    xs = _inputs(b, d, L, N, G, seed=b * 100 + L, big_steps=big)
    if not softplus:
        xs[1] = xs[1].abs() * 0.3  # positive steps when no softplus is applied
    xs = [x.requires_grad_() for x in xs]
    u, delta, A, B, C, D, z, bias = xs
    kw = dict(z=z if use_z else None, delta_bias=bias, delta_softplus=softplus)
    ref = selective_scan_reference(u, delta, A, B, C, D if use_d else None, **kw)
    gy = torch.randn_like(ref)
    used = [u, delta, A, B, C, bias] + ([D] if use_d else []) + ([z] if use_z else [])
    g_ref = torch.autograd.grad(ref, used, gy)

    xs32 = {id(x): x.detach().float().requires_grad_() for x in xs}
    c = lambda x: xs32[id(x)]  # noqa: E731
    kw32 = dict(z=c(z) if use_z else None, delta_bias=c(bias), delta_softplus=softplus)
    out = selective_scan(c(u), c(delta), c(A), c(B), c(C), c(D) if use_d else None, **kw32)
    assert out.dtype == torch.float32 and out.shape == (b, d, L)
    assert _rel(out, ref) < 1e-5
    g32 = torch.autograd.grad(out, [c(x) for x in used], gy.float())
    for name, a, r in zip(["u", "delta", "A", "B", "C", "bias", "D", "z"], g32, g_ref):
        assert a.shape == r.shape
        assert _rel(a, r) < 1e-5, name


def test_float64_inputs_stay_float64_and_gradcheck(backend):
    xs = [x.requires_grad_() for x in _inputs(1, 3, 9, 2, None, seed=3)]
    u, delta, A, B, C, D, z, bias = xs
    assert torch.autograd.gradcheck(
        lambda *a: selective_scan(*a, delta_softplus=True), (u, delta, A, B, C, D), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("L,chunk", [(1, None), (13, 4), (64, 8), (100, None)])
def test_linear_recurrence(L, chunk, reverse):
    g = torch.Generator().manual_seed(L)
    log_a = -torch.rand(L, 3, 2, generator=g, dtype=torch.float64) * 3
    b = torch.randn(L, 3, 2, generator=g, dtype=torch.float64)
    h = linear_recurrence(log_a, b, reverse=reverse, chunk=chunk)
    ref = torch.zeros_like(b)
    state = torch.zeros_like(b[0])
    for t in (range(L - 1, -1, -1) if reverse else range(L)):
        state = torch.exp(log_a[t]) * state + b[t]
        ref[t] = state
    torch.testing.assert_close(h, ref)


def test_shape_errors_are_clear():
    u = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(u, u, torch.zeros(3, 2), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="divisible"):
        selective_scan(u, u, torch.zeros(4, 2), torch.zeros(1, 3, 2, 8), torch.zeros(1, 3, 2, 8))


@pytest.mark.parametrize("failing", ["scan_forward", "scan_backward"])
def test_a_failing_compiled_kernel_falls_back_to_the_pytorch_scan(failing, monkeypatch, caplog):
    """A machine where numba cannot compile still trains and detects: the PyTorch scan takes over, with a warning."""
    from spmamba.ops import selective_scan_numba as nb

    monkeypatch.setenv("SPMAMBA_SCAN", "numba")
    monkeypatch.setattr(nb, "_broken", "")

    def fail(*a, **k):
        raise RuntimeError("no LLVM target here")

    monkeypatch.setattr(nb, failing, fail)
    xs = [x.float().requires_grad_() for x in _inputs(2, 8, 30, 4, 2, seed=5)]
    u, delta, A, B, C, D, z, bias = xs
    out = selective_scan(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True)
    grads = torch.autograd.grad(out.sum(), [u, delta, A, B, C, D])
    assert scan_backend() == "torch" and "no LLVM target here" in nb._broken
    assert "PyTorch scan" in caplog.text
    ref = selective_scan_reference(*(x.detach().double().requires_grad_() for x in (u, delta, A, B, C, D)),
                                   delta_bias=bias.detach().double(), delta_softplus=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert all(torch.isfinite(g).all() for g in grads)


def test_numba_float32_exp_is_within_two_ulp_over_the_decays_range():
    """The compiled scan's float32 decays use a polynomial exp (vectorisable, unlike libm's call per element): it must
    equal exp to float32 rounding over every argument the scan can give it, from the denormal floor (-80) up."""
    np = pytest.importorskip("numpy")
    nb = pytest.importorskip("spmamba.ops.selective_scan_numba")
    if not nb.available():
        pytest.skip("numba not installed")
    x = np.concatenate([np.linspace(-80, 0, 400_001), np.linspace(0, 88, 1001), [-80.0, -1e-7, 0.0, 1e-7]])
    x = x.astype(np.float32)
    out = np.empty_like(x)
    nb._exp_into(x, out, np.empty(x.size, np.int32), True)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(out - exact) / ulp) <= 2.0  # 1.22 measured; rounding alone is 0.5
    # float64 arrays take libm's exp
    x64 = x.astype(np.float64)
    out64 = np.empty_like(x64)
    nb._exp_into(x64, out64, np.empty(x.size, np.int32), False)
    np.testing.assert_allclose(out64, np.exp(x64), rtol=1e-15)
