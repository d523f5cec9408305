"""Mamba's selective scan (S6) with ``selective_scan_fn`` semantics.

Recurrence, per batch b, channel d and state n (A is real and negative in practice)::

    dt_t     = softplus(delta_t + delta_bias)            (if delta_softplus) else delta_t + delta_bias
    h_t      = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B_t[n] * u_t
    y_t      = sum_n C_t[n] * h_t[n] + D[d] * u_t
    out_t    = y_t * silu(z_t)                            (if z is given)

Two paths:

* CUDA tensors and ``mamba_ssm`` importable -> mamba-ssm's fused kernel (what the paper uses).
* Otherwise a pure-PyTorch *chunked* scan with a hand-written backward. The sequence of length L is cut into
  chunks of T steps. A short loop over the T positions runs every chunk at once (starting from zero state), a
  second short loop over the L/T chunks carries the state across chunk boundaries, and one vectorised
  correction adds ``cumprod(decay) * carried_state``. That is about 2*sqrt(L) Python steps instead of L, O(L)
  work, every decay factor <= 1 (no overflow, unlike cumsum/exp tricks). Memory stays bounded: channels are
  processed in groups so that a group's (batch, d_group, L, N) state fits a fixed budget, and the backward
  recomputes the states instead of storing them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["selective_scan", "selective_scan_reference", "mamba_ssm_available", "linear_recurrence"]

try:  # optional CUDA kernel
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except Exception:  # ImportError, or a broken CUDA build: fall back to PyTorch
    _mamba_selective_scan_fn = None

# Elements of one (batch, d_group, L, N) float32 working tensor; several live at once in the backward.
_GROUP_ELEMENTS = 1 << 23


def mamba_ssm_available() -> bool:
    """True when mamba-ssm's CUDA kernel could be imported."""
    return _mamba_selective_scan_fn is not None


# exp(x) for x below this is flushed to exactly 0: float32 denormals would make every later multiply ~50x slower,
# and exp(-80) = 1.8e-35 is far below the float32 resolution of any term it is added to.
_LOG_FLUSH = -80.0


def _decay(log_a: torch.Tensor) -> torch.Tensor:
    return torch.where(log_a > _LOG_FLUSH, torch.exp(log_a), 0.0)


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
    out_shape = b.shape
    la2 = log_a.reshape(L, -1)
    b2 = b.reshape(L, -1)
    M = la2.shape[1]
    T = min(L, chunk or max(8, int(2 ** round(math.log2(math.sqrt(L))))))
    nc = -(-L // T)
    pad = nc * T - L
    if pad:  # padding at the end is neutral both ways: b = 0 keeps a zero state at zero
        la2 = torch.cat([la2, la2.new_zeros(pad, M)])
        b2 = torch.cat([b2, b2.new_zeros(pad, M)])
    a3 = _decay(la2).view(nc, T, M)
    b3 = b2.view(nc, T, M)
    # total decay of each chunk, from the log domain (a running product would underflow into denormals)
    decay = _decay(la2.view(nc, T, M).sum(1))
    steps = range(T - 1, -1, -1) if reverse else range(T)
    # pass 1: every chunk from a zero state at once -> its end state
    h = b3.new_zeros(nc, M)
    for t in steps:
        h = torch.addcmul(b3[:, t], a3[:, t], h)
    # carry the true state across chunk boundaries (nc short steps)
    start = torch.empty_like(h)
    state = h.new_zeros(M)
    for c in (range(nc - 1, -1, -1) if reverse else range(nc)):
        start[c] = state
        state = torch.addcmul(h[c], decay[c], state)
    # pass 2: rerun every chunk from its true starting state, writing the output in place
    out = torch.empty_like(b3)
    h = start
    for t in steps:
        h = torch.addcmul(b3[:, t], a3[:, t], h, out=out[:, t])
    out = out.view(nc * T, M)
    if pad:
        out = out[:L]
    return out.reshape(out_shape)


def _bc_time_major(X: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C of shape (batch, N, L) or (batch, G, N, L) -> (L, batch, dim, N) view (no copy of the big tensor)."""
    if X.dim() == 3:
        bsz, N, L = X.shape
        return X.permute(2, 0, 1).unsqueeze(2).expand(L, bsz, dim, N)
    bsz, G, N, L = X.shape
    if dim % G:
        raise ValueError(f"selective_scan: dim {dim} is not divisible by the {G} groups of B/C")
    Xg = X.permute(3, 0, 1, 2).unsqueeze(3).expand(L, bsz, G, dim // G, N)
    return Xg.reshape(L, bsz, dim, N)


def _channel_groups(bsz: int, dim: int, L: int, N: int):
    step = max(1, _GROUP_ELEMENTS // max(1, bsz * L * N))
    return [(s, min(dim, s + step)) for s in range(0, dim, step)]


class _SelectiveScanCore(torch.autograd.Function):
    """y = scan(u, dt, A, B, C) + D*u with dt already bias-added and softplus-ed. Shapes as in selective_scan.

    Internally time-major: (L, batch, channels, N), so that each step of the recurrence reads contiguous memory.
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C, D):
        bsz, dim, L = u.shape
        N = A.shape[1]
        u_tm = u.permute(2, 0, 1)  # (L, b, dim)
        dt_tm = dt.permute(2, 0, 1)
        B_tm = _bc_time_major(B, dim)
        C_tm = _bc_time_major(C, dim)
        y_tm = u.new_empty(L, bsz, dim)
        G = 1 if B.dim() == 3 else B.shape[1]
        per = dim // G
        Cg_tm = (C.unsqueeze(1) if C.dim() == 3 else C).permute(3, 0, 1, 2).contiguous()  # (L, b, G, N)
        for s, e in _channel_groups(bsz, dim, L, N):
            per_group = s // per == (e - 1) // per  # the channel slice lies within one B/C group
            dtg = dt_tm[:, :, s:e, None]  # (L, b, g, 1)
            log_a = dtg * A[s:e]  # (L, b, g, N)
            bx = (dtg * u_tm[:, :, s:e, None]) * B_tm[:, :, s:e]
            h = linear_recurrence(log_a, bx)
            y_tm[:, :, s:e] = torch.matmul(h, Cg_tm[:, :, s // per].unsqueeze(-1)).squeeze(-1) if per_group \
                else (h * C_tm[:, :, s:e]).sum(-1)
        y = y_tm.permute(1, 2, 0)
        if D is not None:
            y = y + D.view(1, -1, 1) * u
        ctx.save_for_backward(u, dt, A, B, C, D)
        return y.contiguous()

    @staticmethod
    def backward(ctx, dy):
        u, dt, A, B, C, D = ctx.saved_tensors
        bsz, dim, L = u.shape
        N = A.shape[1]
        u_tm = u.permute(2, 0, 1)  # (L, b, dim)
        dt_tm = dt.permute(2, 0, 1)
        dy_tm = dy.permute(2, 0, 1)
        G = 1 if B.dim() == 3 else B.shape[1]
        per = dim // G
        # B, C time-major per group without expanding over channels: (L, b, G, N)
        Bg_tm = (B.unsqueeze(1) if B.dim() == 3 else B).permute(3, 0, 1, 2).contiguous()
        B_tm = _bc_time_major(B, dim)
        C_tm = _bc_time_major(C, dim)
        du_tm = u.new_empty(L, bsz, dim)
        ddt_tm = u.new_empty(L, bsz, dim)
        dA = torch.empty_like(A)
        dB_tm = B.new_zeros(L, bsz, G, N)
        dC_tm = C.new_zeros(L, bsz, G, N)
        for s, e in _channel_groups(bsz, dim, L, N):
            dtg = dt_tm[:, :, s:e]  # (L, b, g)
            ug = u_tm[:, :, s:e]
            dyg = dy_tm[:, :, s:e]
            Ag = A[s:e]
            # log a_t and log a_{t+1} as two views of one buffer (a_L = 0 ends the backward recurrence)
            la_buf = u.new_empty((L + 1, bsz, e - s, N))
            torch.mul(dtg.unsqueeze(-1), Ag, out=la_buf[:L])
            la_buf[L] = -math.inf
            dtu = dtg * ug
            bx = dtu.unsqueeze(-1) * B_tm[:, :, s:e]
            h = linear_recurrence(la_buf[:L], bx)
            # g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}: the same recurrence run backwards in time.
            g = linear_recurrence(la_buf[1:], C_tm[:, :, s:e] * dyg.unsqueeze(-1), reverse=True)
            del la_buf
            # channels of this slice belong to B/C groups gi = channel // per
            sum_gB = u.new_empty(L, bsz, e - s)  # sum_n g B
            for gi in range(s // per, (e - 1) // per + 1):
                lo, hi = max(s, gi * per) - s, min(e, (gi + 1) * per) - s
                dB_tm[:, :, gi] += torch.matmul(dtu[:, :, lo:hi].unsqueeze(-2), g[:, :, lo:hi]).squeeze(-2)
                dC_tm[:, :, gi] += torch.matmul(dyg[:, :, lo:hi].unsqueeze(-2), h[:, :, lo:hi]).squeeze(-2)
                sum_gB[:, :, lo:hi] = torch.matmul(g[:, :, lo:hi], Bg_tm[:, :, gi].unsqueeze(-1)).squeeze(-1)
            # dL/d(dt*A) = g_t * a_t * h_{t-1} = g_t * (h_t - bx_t)
            q = h.sub_(bx).mul_(g)
            del bx, g
            dA[s:e] = (q * dtg.unsqueeze(-1)).sum(dim=(0, 1))  # (einsum is ~5x slower here)
            ddt_tm[:, :, s:e] = torch.einsum("lbgn,gn->lbg", q, Ag) + sum_gB * ug
            du_tm[:, :, s:e] = sum_gB * dtg
            del q
        du = du_tm.permute(1, 2, 0)
        ddt = ddt_tm.permute(1, 2, 0).contiguous()
        dD = None
        if D is not None:
            du = du + D.view(1, -1, 1) * dy
            dD = (dy * u).sum(dim=(0, 2))
        if B.dim() == 3:
            dB = dB_tm[:, :, 0].permute(1, 2, 0).contiguous()
            dC = dC_tm[:, :, 0].permute(1, 2, 0).contiguous()
        else:
            dB = dB_tm.permute(1, 2, 3, 0).contiguous()
            dC = dC_tm.permute(1, 2, 3, 0).contiguous()
        return du.contiguous(), ddt, dA, dB, dC, dD


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
    y = _SelectiveScanCore.apply(
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
    Bf = _bc_time_major(B, dim)  # (L, b, dim, N)
    Cf = _bc_time_major(C, dim)
    h = u.new_zeros(bsz, dim, A.shape[1])
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * Bf[t] * u[:, :, t, None]
        ys.append((h * Cf[t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.view(1, -1, 1) * u
    if z is not None:
        y = y * F.silu(z)
    return y
