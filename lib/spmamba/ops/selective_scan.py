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


def _chunked_scan(a: torch.Tensor, b: torch.Tensor, chunk_decay: torch.Tensor, reverse: bool) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t (or from the end if reverse) in chunk layout.

    a, b: (T, nc, M) contiguous; chunk_decay: (nc, M) product of a over each chunk. Returns h (T, nc, M).
    Two loops over the T steps (all chunks at once) and one over the nc chunks: ~2*sqrt(L) Python steps.
    """
    T, nc, M = b.shape
    steps = range(T - 1, -1, -1) if reverse else range(T)
    h = b.new_zeros(nc, M)  # pass 1: each chunk from a zero state -> its final state
    for t in steps:
        h = torch.addcmul(b[t], a[t], h)
    start = torch.empty_like(h)  # the true state entering each chunk
    state = h.new_zeros(M)
    for c in (range(nc - 1, -1, -1) if reverse else range(nc)):
        start[c] = state
        state = torch.addcmul(h[c], chunk_decay[c], state)
    out = torch.empty_like(b)  # pass 2: rerun each chunk from its true start
    h = start
    for t in steps:
        h = torch.addcmul(b[t], a[t], h, out=out[t])
    return out


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
    la = _to_chunks(log_a.reshape(L, -1), T)  # padding: log_a = 0 and b = 0 keep a zero state at zero
    bc = _to_chunks(b.reshape(L, -1), T)
    decay = la.sum(0).clamp_min_(_LOG_FLOOR).exp_()
    h = _chunked_scan(la.clamp_min_(_LOG_FLOOR).exp_(), bc, decay, reverse)
    return _from_chunks(h, L).reshape(b.shape)


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


def _group_bc(X: torch.Tensor) -> torch.Tensor:
    """B or C (batch, N, L) or (batch, G, N, L) -> (L, batch, G, N) contiguous (small: no channel axis)."""
    return (X.unsqueeze(1) if X.dim() == 3 else X).permute(3, 0, 1, 2).contiguous()


def _channel_slices(bsz: int, dim: int, G: int, L: int, N: int):
    """Channel ranges processed together: within one B/C group, and small enough that a (batch, channels, L, N)
    working tensor stays within a fixed budget."""
    per = dim // G
    step = max(1, min(per, _GROUP_ELEMENTS // max(1, bsz * L * N)))
    return [(g, s, min(s + step, (g + 1) * per)) for g in range(G) for s in range(g * per, (g + 1) * per, step)]


class _SelectiveScanCore(torch.autograd.Function):
    """y = scan(u, dt, A, B, C) + D*u with dt already bias-added and softplus-ed. Shapes as in selective_scan.

    Works per channel slice in chunk layout (T, nc, batch, channels, N); B and C of a slice's group broadcast
    over its channels.
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C, D):
        bsz, dim, L = u.shape
        N = A.shape[1]
        G = 1 if B.dim() == 3 else B.shape[1]
        T = _chunk_len(L, None)
        u_c = _to_chunks(u.permute(2, 0, 1), T)  # (T, nc, b, dim)
        dt_c = _to_chunks(dt.permute(2, 0, 1), T)
        dt_sum = dt_c.sum(0)  # (nc, b, dim): a chunk's total decay is exp(A * sum dt)
        B_c = _to_chunks(_group_bc(B), T)  # (T, nc, b, G, N)
        C_c = _to_chunks(_group_bc(C), T)
        y_c = u_c.new_empty(u_c.shape)
        for g, s, e in _channel_slices(bsz, dim, G, L, N):
            dts = dt_c[..., s:e, None]  # (T, nc, b, ch, 1)
            a = (dts * A[s:e]).clamp_min_(_LOG_FLOOR).exp_()  # (T, nc, b, ch, N)
            bx = (dts * u_c[..., s:e, None]) * B_c[..., g:g + 1, :]
            decay = (dt_sum[..., s:e, None] * A[s:e]).clamp_min_(_LOG_FLOOR).exp_()
            shape = a.shape
            h = _chunked_scan(a.view(T, shape[1], -1), bx.view(T, shape[1], -1), decay.reshape(shape[1], -1), False)
            y_c[..., s:e] = torch.matmul(h.view(shape), C_c[..., g, :, None]).squeeze(-1)
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
        B_c = _to_chunks(_group_bc(B), T)  # (T, nc, b, G, N)
        C_c = _to_chunks(_group_bc(C), T)
        dt_sum, dtn_sum = dt_c.sum(0), dtn_c.sum(0)
        du_c = torch.empty_like(u_c)
        ddt_c = torch.empty_like(u_c)
        dA = torch.empty_like(A)
        dB_c = torch.zeros_like(B_c)
        dC_c = torch.zeros_like(C_c)
        for g, s, e in _channel_slices(bsz, dim, G, L, N):
            dts = dt_c[..., s:e, None]  # (T, nc, b, ch, 1)
            uc = u_c[..., s:e, None]
            dyc = dy_c[..., s:e, None]
            Ag = A[s:e]
            Bg = B_c[..., g:g + 1, :]  # (T, nc, b, 1, N)
            Cg = C_c[..., g:g + 1, :]
            a = (dts * Ag).clamp_min_(_LOG_FLOOR).exp_()
            dtu = dts * uc
            bx = dtu * Bg
            shape = a.shape
            nc = shape[1]
            flat = lambda x: x.reshape(T, nc, -1)  # noqa: E731
            decay = (dt_sum[..., s:e, None] * Ag).clamp_min_(_LOG_FLOOR).exp_()
            h = _chunked_scan(flat(a), flat(bx), decay.reshape(nc, -1), False).view(shape)
            # g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}: the same recurrence run backwards in time
            a_next = (dtn_c[..., s:e, None] * Ag).clamp_min_(_LOG_FLOOR).exp_()
            decay_next = (dtn_sum[..., s:e, None] * Ag).clamp_min_(_LOG_FLOOR).exp_()
            gr = _chunked_scan(flat(a_next), flat(Cg * dyc), decay_next.reshape(nc, -1), True).view(shape)
            del a_next
            # per-group reductions over channels: dB_t = sum_ch g dt u, dC_t = sum_ch h dy
            dB_c[..., g, :] += torch.matmul(dtu.transpose(-1, -2), gr).squeeze(-2)
            dC_c[..., g, :] += torch.matmul(dyc.transpose(-1, -2), h).squeeze(-2)
            sum_gB = torch.matmul(gr, Bg.transpose(-1, -2)).squeeze(-1)  # (T, nc, b, ch): sum_n g B
            # dL/d(dt*A) = g_t * a_t * h_{t-1} = g_t * (h_t - bx_t)
            q = h.sub_(bx).mul_(gr)
            del bx, gr
            dA[s:e] = (q * dts).sum(dim=(0, 1, 2))
            ddt_c[..., s:e] = torch.linalg.vecdot(q, Ag) + sum_gB * uc[..., 0]
            du_c[..., s:e] = sum_gB * dts[..., 0]
            del q
        du = _from_chunks(du_c, L).permute(1, 2, 0)
        ddt = _from_chunks(ddt_c, L).permute(1, 2, 0).contiguous()
        dD = None
        if D is not None:
            du = du + D.view(1, -1, 1) * dy
            dD = (dy * u).sum(dim=(0, 2))
        dB = _from_chunks(dB_c, L).permute(1, 2, 3, 0)  # (b, G, N, L)
        dC = _from_chunks(dC_c, L).permute(1, 2, 3, 0)
        if B.dim() == 3:
            dB, dC = dB[:, 0], dC[:, 0]
        return du.contiguous(), ddt, dA, dB.contiguous(), dC.contiguous(), dD


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
