"""Mamba's selective scan (S6) with ``selective_scan_fn`` semantics.

Recurrence, per batch b, channel d and state n (A is real and negative in practice)::

    dt_t     = softplus(delta_t + delta_bias)            (if delta_softplus) else delta_t + delta_bias
    h_t      = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B_t[n] * u_t
    y_t      = sum_n C_t[n] * h_t[n] + D[d] * u_t
    out_t    = y_t * silu(z_t)                            (if z is given)

Two paths:

* CUDA tensors and ``mamba_ssm`` importable -> mamba-ssm's fused kernel (what the paper uses).
* Otherwise a pure-PyTorch *chunked* scan with a hand-written backward. The sequence of length L is cut into
  ~sqrt(L) chunks. A loop over the T steps of a chunk advances every chunk at once from a zero state, a loop over
  the chunks carries the true state across their boundaries, and a second pass over the steps rebuilds the states
  from the true chunk starts: about 3*sqrt(L) Python steps instead of L, O(L) work, every decay factor <= 1.
  Decays and inputs are made one step at a time on channel slices small enough for the CPU cache, so the forward
  builds no (batch, dim, L, N) tensor; the backward stores the states once and builds every gradient in one
  reverse pass.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import selective_scan_numba as _numba

__all__ = ["selective_scan", "selective_scan_reference", "mamba_ssm_available", "linear_recurrence", "scan_backend"]

try:  # optional CUDA kernel
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except Exception:  # ImportError, or a broken CUDA build: fall back to PyTorch
    _mamba_selective_scan_fn = None

def mamba_ssm_available() -> bool:
    """True when mamba-ssm's CUDA kernel could be imported."""
    return _mamba_selective_scan_fn is not None


# Decay factors exp(x) are computed as exp(max(x, -80)): exp(-80) = 1.8e-35 is far below the float32 resolution of
# any term it is added to, and the floor keeps the recurrence out of denormal numbers, which would make every later
# multiply ~50x slower on x86 CPUs.
_LOG_FLOOR = -80.0


def _chunk_len(L: int, chunk: Optional[int]) -> int:
    return max(1, min(L, chunk or max(8, int(2 ** round(math.log2(math.sqrt(L)))))))


def _to_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """(L, ...) time-major -> (T, nc, ...) contiguous, zero-padded at the end: step t of every chunk is one
    contiguous slice, so the short loops below read and write contiguous memory."""
    L = x.shape[0]
    nc = -(-L // T)
    if nc * T != L:
        x = torch.cat([x, x.new_zeros((nc * T - L,) + tuple(x.shape[1:]))])
    return x.reshape((nc, T) + tuple(x.shape[1:])).transpose(0, 1).contiguous()


def _from_chunks(x: torch.Tensor, L: int) -> torch.Tensor:
    """(T, nc, ...) -> (L, ...)."""
    T, nc = x.shape[:2]
    return x.transpose(0, 1).reshape((T * nc,) + tuple(x.shape[2:]))[:L]


def linear_recurrence(log_a: torch.Tensor, b: torch.Tensor, reverse: bool = False, chunk: Optional[int] = None) -> torch.Tensor:
    """Solve ``h_t = exp(log_a_t) * h_{t-1} + b_t`` along dim 0 (time-major), zero initial state.

    With ``reverse=True`` solves ``h_t = exp(log_a_t) * h_{t+1} + b_t`` from the end instead.

    Args:
        log_a: log of the decay factors (<= 0 for a stable scan), shape (L, ...).
        b: inputs, same shape.
        chunk: chunk length T (default ~sqrt(L)).
    Returns:
        h: same shape as b.
    """
    L = log_a.shape[0]
    T = _chunk_len(L, chunk)
    la = _to_chunks(log_a.reshape(L, 1, -1), T)  # (T, nc, 1, M); padding log_a = 0, b = 0 is neutral both ways
    bc = _to_chunks(b.reshape(L, 1, -1), T)
    # the selective scan's recurrence with dt = log_a, A = 1 (one state), input dtu * B = b * 1
    h = la.new_empty(la.shape + (1,))
    _scan_states(la, bc, la.new_ones(1, 1), la.new_ones(T, 1, 1, 1, 1), reverse, store=h)
    return _from_chunks(h[..., 0], L).reshape(b.shape)


def _group_bc(X: torch.Tensor) -> torch.Tensor:
    """B or C (batch, N, L) or (batch, G, N, L) -> (L, batch, G, N) contiguous (small: no channel axis)."""
    return (X.unsqueeze(1) if X.dim() == 3 else X).permute(3, 0, 1, 2).contiguous()


def _fused_slices(bsz: int, dim: int, G: int, L: int, N: int, T: int):
    """Channel ranges for the fused scan: within one B/C group, sized so that one step's (nc, batch, channels, N)
    slice (the recurrence's working set) stays small enough for the CPU cache."""
    per = dim // G
    nc = -(-L // T)
    step = max(1, min(per, _SLICE_ELEMENTS // max(1, nc * bsz * N)))
    return [(g, s, min(s + step, (g + 1) * per)) for g in range(G) for s in range(g * per, (g + 1) * per, step)]


# elements of one step's (nc, batch, channels, N) slice in the fused scan (~512 KB of float32)
_SLICE_ELEMENTS = 1 << 17


def _decays(dt_t: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """exp(dt * A) with the denormal floor. dt_t (..., ch), A (ch, N) -> (..., ch, N)."""
    return (dt_t.unsqueeze(-1) * A).clamp_min_(_LOG_FLOOR).exp_()


def _scan_states(dt, dtu, A, Bs, reverse, store=None, C=None, y=None):
    """Fused chunked recurrence h_t = exp(dt_t A) h_{t-1} + dtu_t B_t on one channel slice, chunk layout.

    dt, dtu: (T, nc, b, ch); A: (ch, N); Bs: (T, nc, b, 1, N) (the inputs' B for the forward, C*dy-like terms are
    passed pre-multiplied via ``dtu``/``Bs`` by the caller). Decays and inputs are made one step at a time, so no
    (L, b, ch, N) tensor is built unless ``store`` (T, nc, b, ch, N) asks for the states. With ``C`` (T, nc, b, 1, N)
    and ``y`` (T, nc, b, ch) the readout y_t = sum_n C_t h_t is written as it goes.
    Returns the chunk-start states (nc, b, ch, N) used in the second pass.
    """
    T, nc = dt.shape[:2]
    steps = range(T - 1, -1, -1) if reverse else range(T)
    h = None
    for t in steps:  # pass 1: each chunk from zero
        inp = dtu[t].unsqueeze(-1) * Bs[t]
        h = inp if h is None else torch.addcmul(inp, _decays(dt[t], A), h)
    chunk_decay = _decays(dt.sum(0), A)  # (nc, b, ch, N)
    start = torch.empty_like(h)
    state = torch.zeros_like(h[0])
    for c in (range(nc - 1, -1, -1) if reverse else range(nc)):
        start[c] = state
        state = torch.addcmul(h[c], chunk_decay[c], state)
    h = start
    for t in steps:  # pass 2: from the true chunk starts
        h = torch.addcmul(dtu[t].unsqueeze(-1) * Bs[t], _decays(dt[t], A), h)
        if store is not None:
            store[t] = h
        if y is not None:
            y[t] = torch.matmul(h, C[t].transpose(-1, -2)).squeeze(-1)
    return start


class _SelectiveScanCore(torch.autograd.Function):
    """y = scan(u, dt, A, B, C) + D*u with dt already bias-added and softplus-ed. Shapes as in selective_scan.

    Works per channel slice in chunk layout (T, nc, batch, channels[, N]); B and C of a slice's group broadcast
    over its channels. The forward keeps no state tensor; the backward stores the states once and consumes them
    in one reverse pass that builds all gradients step by step.
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C, D):
        bsz, dim, L = u.shape
        N = A.shape[1]
        G = 1 if B.dim() == 3 else B.shape[1]
        T = _chunk_len(L, None)
        u_c = _to_chunks(u.permute(2, 0, 1), T)  # (T, nc, b, dim)
        dt_c = _to_chunks(dt.permute(2, 0, 1), T)
        dtu_c = dt_c * u_c
        B_c = _to_chunks(_group_bc(B), T).unsqueeze(-2)  # (T, nc, b, G, 1, N)
        C_c = _to_chunks(_group_bc(C), T).unsqueeze(-2)
        y_c = torch.empty_like(u_c)
        for g, s, e in _fused_slices(bsz, dim, G, L, N, T):
            y_s = y_c.new_empty(y_c[..., s:e].shape)
            _scan_states(dt_c[..., s:e].contiguous(), dtu_c[..., s:e].contiguous(), A[s:e], B_c[..., g, :, :],
                         False, C=C_c[..., g, :, :], y=y_s)
            y_c[..., s:e] = y_s
        y = _from_chunks(y_c, L).permute(1, 2, 0)
        if D is not None:
            y = y + D.view(1, -1, 1) * u
        ctx.save_for_backward(u, dt, A, B, C, D)
        return y.contiguous()

    @staticmethod
    def backward(ctx, dy):
        u, dt, A, B, C, D = ctx.saved_tensors
        bsz, dim, L = u.shape
        N = A.shape[1]
        G = 1 if B.dim() == 3 else B.shape[1]
        T = _chunk_len(L, None)
        u_c = _to_chunks(u.permute(2, 0, 1), T)  # (T, nc, b, dim)
        dt_tm = dt.permute(2, 0, 1)
        dt_c = _to_chunks(dt_tm, T)
        # a_{t+1} for the backward recurrence: dt shifted one step back in time (0 past the end: no effect,
        # since the backward state starts at zero there)
        dtn_c = _to_chunks(torch.cat([dt_tm[1:], dt_tm.new_zeros((1,) + tuple(dt_tm.shape[1:]))]), T)
        dy_c = _to_chunks(dy.permute(2, 0, 1), T)
        dtu_c = dt_c * u_c
        B_c = _to_chunks(_group_bc(B), T).unsqueeze(-2)  # (T, nc, b, G, 1, N)
        C_c = _to_chunks(_group_bc(C), T).unsqueeze(-2)
        du_c = torch.empty_like(u_c)
        ddt_c = torch.empty_like(u_c)
        dA = torch.empty_like(A)
        dB_c = torch.zeros_like(B_c)
        dC_c = torch.zeros_like(C_c)
        for g, s, e in _fused_slices(bsz, dim, G, L, N, T):
            dts, dtus, us = (x[..., s:e].contiguous() for x in (dt_c, dtu_c, u_c))
            dys, dtns = dy_c[..., s:e].contiguous(), dtn_c[..., s:e].contiguous()
            As = A[s:e]
            Bg, Cg = B_c[..., g, :, :], C_c[..., g, :, :]  # (T, nc, b, 1, N)
            h_all = dts.new_empty(dts.shape + (N,))  # (T, nc, b, ch, N): the states, stored once
            _scan_states(dts, dtus, As, Bg, False, store=h_all)
            # dC_t = sum_ch dy_t h_t (one batched product over the stored states)
            dC_c[..., g, :, :] += torch.matmul(dys.unsqueeze(-2), h_all)
            # backward states g_t = C_t dy_t + a_{t+1} g_{t+1}: pass 1 and chunk carries, then pass 2 step by step
            start = _scan_states(dtns, dys, As, Cg, True)
            acc_dA = torch.zeros_like(h_all[0])  # sum over steps of q_t * dt_t
            gr = start
            for t in range(T - 1, -1, -1):
                gr = torch.addcmul(dys[t].unsqueeze(-1) * Cg[t], _decays(dtns[t], As), gr)
                Bt = Bg[t]  # (nc, b, 1, N)
                dB_c[t, :, :, g] += torch.matmul(dtus[t].unsqueeze(-2), gr)  # sum_ch g dt u -> (nc, b, 1, N)
                sum_gB = torch.matmul(gr, Bt.transpose(-1, -2)).squeeze(-1)  # (nc, b, ch)
                # q_t = dL/d(dt_t A) = g_t * a_t * h_{t-1} = g_t * (h_t - dt_t u_t B_t)
                # (the product is formed exactly as in the forward, so q is exactly 0 where h_{t-1} is 0)
                q = h_all[t].sub_(dtus[t].unsqueeze(-1) * Bt).mul_(gr)
                acc_dA.addcmul_(q, dts[t].unsqueeze(-1))
                ddt_c[t, ..., s:e] = torch.linalg.vecdot(q, As) + sum_gB * us[t]
                du_c[t, ..., s:e] = sum_gB * dts[t]
            dA[s:e] = acc_dA.sum(dim=(0, 1))
        du = _from_chunks(du_c, L).permute(1, 2, 0)
        ddt = _from_chunks(ddt_c, L).permute(1, 2, 0).contiguous()
        dD = None
        if D is not None:
            du = du + D.view(1, -1, 1) * dy
            dD = (dy * u).sum(dim=(0, 2))
        dB = _from_chunks(dB_c.squeeze(-2), L).permute(1, 2, 3, 0)  # (b, G, N, L)
        dC = _from_chunks(dC_c.squeeze(-2), L).permute(1, 2, 3, 0)
        if B.dim() == 3:
            dB, dC = dB[:, 0], dC[:, 0]
        return du.contiguous(), ddt, dA, dB.contiguous(), dC.contiguous(), dD


class _Saved:
    """Stands in for an autograd context that saved ``tensors`` (to call a backward with other saved tensors)."""

    def __init__(self, tensors):
        self.saved_tensors = tensors


def _keep_torch_threads(n: int) -> None:
    """numba's OpenMP threading layer sets the OpenMP thread count to its own pool size when it starts (the first
    kernel call), which is also torch's count: put back the one the caller had (e.g. ``spmamba.cpu.lower_priority``
    gave a background process 1 thread; without this it would use every core from the first scan on)."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


class _NumbaScan(torch.autograd.Function):
    """The same y = scan(u, dt, A, B, C) + D*u as ``_SelectiveScanCore``, through the compiled CPU kernels of
    ``selective_scan_numba`` (one compiled recurrence per (batch, channel) row, rows in parallel)."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, D):
        grouped = B.dim() == 4
        Bt = (B if grouped else B.unsqueeze(1)).transpose(-1, -2).contiguous()  # (b, G, L, N)
        Ct = (C if grouped else C.unsqueeze(1)).transpose(-1, -2).contiguous()
        threads = torch.get_num_threads()
        _numba.set_threads(threads)
        try:
            y = torch.from_numpy(_numba.scan_forward(u.numpy(), dt.numpy(), A.numpy(), Bt.numpy(), Ct.numpy()))
        except Exception as e:  # e.g. numba cannot compile on this machine: the PyTorch scan from now on
            _numba.mark_broken(e)
            _keep_torch_threads(threads)
            ctx.fallback = True
            return _SelectiveScanCore.forward(ctx, u, dt, A, B, C, D)
        _keep_torch_threads(threads)
        ctx.fallback = False
        if D is not None:
            y = y + D.view(1, -1, 1) * u
        ctx.grouped = grouped
        ctx.save_for_backward(u, dt, A, Bt, Ct, D)
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.fallback:
            return _SelectiveScanCore.backward(ctx, dy)
        u, dt, A, Bt, Ct, D = ctx.saved_tensors
        threads = torch.get_num_threads()
        _numba.set_threads(threads)
        dy_c = dy.contiguous()
        try:
            grads = _numba.scan_backward(u.numpy(), dt.numpy(), A.numpy(), Bt.numpy(), Ct.numpy(), dy_c.numpy())
        except Exception as e:  # the backward kernel failed to compile: PyTorch's backward for this call too
            _numba.mark_broken(e)
            _keep_torch_threads(threads)
            B = Bt.transpose(-1, -2) if ctx.grouped else Bt[:, 0].transpose(-1, -2)
            C = Ct.transpose(-1, -2) if ctx.grouped else Ct[:, 0].transpose(-1, -2)
            return _SelectiveScanCore.backward(_Saved((u, dt, A, B.contiguous(), C.contiguous(), D)), dy)
        _keep_torch_threads(threads)
        du, ddt, dA, dBt, dCt = (torch.from_numpy(x) for x in grads)
        dB = dBt.transpose(-1, -2)
        dC = dCt.transpose(-1, -2)
        if not ctx.grouped:
            dB, dC = dB[:, 0], dC[:, 0]
        dD = None
        if D is not None:
            du = du + D.view(1, -1, 1) * dy_c
            dD = (dy_c * u).sum(dim=(0, 2))
        return du, ddt, dA, dB.contiguous(), dC.contiguous(), dD


def scan_backend() -> str:
    """Which CPU path ``selective_scan`` takes: "numba" (compiled kernels, when numba is installed and
    ``SPMAMBA_SCAN`` is not "torch") or "torch" (the chunked PyTorch scan)."""
    return "numba" if _numba.available() else "torch"


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Selective scan with mamba-ssm's ``selective_scan_fn`` signature.

    Args:
        u: (batch, dim, L) input.
        delta: (batch, dim, L) step sizes (before bias / softplus).
        A: (dim, N) real state matrix (diagonal per channel).
        B, C: (batch, N, L), or (batch, G, N, L) with dim divisible by G (channel group g uses B[:, g]).
        D: optional (dim,) skip.
        z: optional (batch, dim, L) gate: output multiplied by silu(z).
        delta_bias: optional (dim,) added to delta.
        delta_softplus: apply softplus to delta (+ bias).
    Returns:
        (batch, dim, L), dtype of u.
    """
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be (batch, dim, L), got {tuple(u.shape)} and {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"selective_scan: A must be (dim, N) with dim={u.shape[1]}, got {tuple(A.shape)}")
    for name, X in (("B", B), ("C", C)):
        if X.dim() not in (3, 4) or X.shape[0] != u.shape[0] or X.shape[-1] != u.shape[2] or X.shape[-2] != A.shape[1]:
            raise ValueError(f"selective_scan: {name} must be (batch, N, L) or (batch, G, N, L), got {tuple(X.shape)}")
        if X.dim() == 4 and u.shape[1] % X.shape[1]:
            raise ValueError(f"selective_scan: dim {u.shape[1]} is not divisible by the {X.shape[1]} groups of {name}")
    if A.is_complex():
        raise NotImplementedError("selective_scan: complex A is not supported by the PyTorch path")
    if u.is_cuda and _mamba_selective_scan_fn is not None:
        return _mamba_selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    dtype_in = u.dtype
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    dt = delta.to(work)
    if delta_bias is not None:
        dt = dt + delta_bias.to(work).view(1, -1, 1)
    if delta_softplus:
        dt = F.softplus(dt)
    core = _NumbaScan if (u.device.type == "cpu" and _numba.available()) else _SelectiveScanCore
    y = core.apply(
        u.to(work).contiguous(), dt.contiguous(), A.to(work).contiguous(), B.to(work).contiguous(),
        C.to(work).contiguous(), None if D is None else D.to(work).contiguous(),
    )
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(dtype_in)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Sequential reference (a Python loop over L): the definition the fast path is tested against."""
    dt = delta
    if delta_bias is not None:
        dt = dt + delta_bias.view(1, -1, 1)
    if delta_softplus:
        dt = F.softplus(dt)
    bsz, dim, L = u.shape

    def steps(X):  # B or C as L tensors (batch, dim or 1, N); unbind keeps the backward linear in L
        x = X.unsqueeze(1) if X.dim() == 3 else X.repeat_interleave(dim // X.shape[1], dim=1)
        return x.unbind(-1)

    h = u.new_zeros(bsz, dim, A.shape[1])
    ys = []
    for dt_t, u_t, B_t, C_t in zip(dt.unbind(-1), u.unbind(-1), steps(B), steps(C)):
        h = torch.exp(dt_t[..., None] * A) * h + dt_t[..., None] * B_t * u_t[..., None]
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.view(1, -1, 1) * u
    if z is not None:
        y = y * F.silu(z)
    return y
