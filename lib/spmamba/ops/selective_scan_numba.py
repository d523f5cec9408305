"""Compiled CPU kernels of the selective scan (forward and analytic backward), through numba.

The pure-PyTorch chunked scan (``selective_scan``) spends most of a CPU training step in Python-level steps over
small tensors. Here each (batch, channel) row runs the recurrence of ``selective_scan_reference`` in compiled code,
one time step after the other, with its N states in registers/L1; rows run in parallel on the process's threads.
numba ships LLVM in its wheel, so no system compiler is needed (an offline hospital workstation has none); without
numba the PyTorch path is used. Compiled code is cached on disk after the first call (a few seconds per dtype).

Shapes (time-major inside the kernels; the wrapper transposes B and C once):
    u, dt: (b, dim, L)  dt already bias-added and softplus-ed
    A: (dim, N)
    Bt, Ct: (b, G, L, N) with dim divisible by G; channel d uses group d // (dim // G)
Forward: y (b, dim, L) = sum_n C h + (no D; the caller adds D*u).
Backward: per (batch, group) work item, so the sums over the group's channels that make dB and dC need no atomics;
dA is returned per batch (b, dim, N) and summed by the caller.
"""
from __future__ import annotations

import os

import numpy as np

try:
    import numba
    from numba import njit, prange
except Exception:  # not installed (an optional speed-up)
    numba = None

__all__ = ["available", "scan_forward", "scan_backward", "set_threads", "mark_broken", "warm"]

_broken: str = ""  # why the kernels cannot be used in this process (a failed compilation), or ""

_LOG_FLOOR = -80.0  # as in selective_scan: keeps the recurrence out of denormal numbers


def available() -> bool:
    """True when numba imports, its kernels have not failed in this process and ``SPMAMBA_SCAN`` does not ask for
    the PyTorch path."""
    return (numba is not None and not _broken
            and os.environ.get("SPMAMBA_SCAN", "auto").lower() not in ("torch", "pytorch"))


def mark_broken(error: BaseException) -> None:
    """Stop using the kernels in this process (the caller falls back to the PyTorch scan) and say why, once."""
    global _broken
    if not _broken:
        import logging

        _broken = f"{type(error).__name__}: {error}"
        logging.getLogger(__name__).warning(
            "the compiled selective scan failed (%s); using the slower PyTorch scan from now on", _broken)


def warm() -> None:
    """Compile (or load from numba's on-disk cache) the float32 kernels, so a first detection does not pay for it;
    ``scripts/install.sh`` calls it once."""
    if numba is None:
        return
    rng = np.random.default_rng(0)
    u = rng.standard_normal((1, 2, 4)).astype(np.float32)
    A = -np.ones((2, 2), np.float32)
    Bt = rng.standard_normal((1, 1, 4, 2)).astype(np.float32)
    scan_forward(u, np.abs(u), A, Bt, Bt)
    scan_backward(u, np.abs(u), A, Bt, Bt, u)


def set_threads(n: int) -> None:
    """Run the kernels on at most ``n`` threads (the caller passes torch's thread count)."""
    if numba is not None:
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


if numba is not None:
    _opts = dict(parallel=True, fastmath=True, cache=True, nogil=True)

    # inlined at numba IR level: as a call per step the kernels ran ~60% slower
    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def _advance(h, decay, u, dt, A, Bt, Ct, i, d, g, t, fl):  # pragma: no cover - compiled
        """One step of the recurrence of row (i, d) at time t, in place: decay_n = exp(max(dt_t A_n, floor)),
        h_n <- decay_n h_n + dt_t u_t B_t,n; returns the output y_t = sum_n C_t,n h_n. ``h``, ``decay``: (N,)."""
        dtt = dt[i, d, t]
        x = dtt * u[i, d, t]
        acc = fl - fl
        for n in range(h.shape[0]):
            at = np.exp(max(dtt * A[d, n], fl))
            decay[n] = at
            h[n] = at * h[n] + x * Bt[i, g, t, n]
            acc += Ct[i, g, t, n] * h[n]
        return acc

    @njit(**_opts)
    def _forward(u, dt, A, Bt, Ct, y, floor):  # pragma: no cover - compiled
        # every scalar stays in the arrays' dtype: ``floor`` is a 1-element array of it (a float literal would
        # promote float32 work to float64, twice as slow)
        fl = floor[0]
        b, dim, L = u.shape
        G = Bt.shape[1]
        N = A.shape[1]
        per = dim // G
        for r in prange(b * dim):
            i = r // dim
            d = r - i * dim
            g = d // per
            h = np.zeros(N, dtype=u.dtype)
            decay = np.empty(N, dtype=u.dtype)
            for t in range(L):
                y[i, d, t] = _advance(h, decay, u, dt, A, Bt, Ct, i, d, g, t, fl)

    @njit(**_opts)
    def _backward(u, dt, A, Bt, Ct, dy, du, ddt, dA_b, dBt, dCt, floor):  # pragma: no cover - compiled
        fl = floor[0]
        zero = fl - fl
        b, dim, L = u.shape
        G = Bt.shape[1]
        N = A.shape[1]
        per = dim // G
        for w in prange(b * G):
            i = w // G
            g = w - i * G
            hs = np.empty((L, N), dtype=u.dtype)  # states h_t of one channel
            dec = np.zeros((L + 1, N), dtype=u.dtype)  # decays a_t; row L is 0 (nothing after the end)
            gr = np.empty(N, dtype=u.dtype)
            for d in range(g * per, (g + 1) * per):
                # the forward recurrence again, keeping states and decays (recomputed: storing them per row
                # for the whole batch would cost b * dim * L * N floats)
                gr[:] = zero  # h_{t-1} here
                for t in range(L):
                    _advance(gr, dec[t], u, dt, A, Bt, Ct, i, d, g, t, fl)
                    for n in range(N):
                        hs[t, n] = gr[n]
                # reverse: g_t = C_t dy_t + a_{t+1} g_{t+1}
                gr[:] = zero
                for t in range(L - 1, -1, -1):
                    dyt = dy[i, d, t]
                    dtt = dt[i, d, t]
                    ut = u[i, d, t]
                    x = dtt * ut
                    sum_gb = zero
                    s_qa = zero
                    for n in range(N):
                        gn = dec[t + 1, n] * gr[n] + Ct[i, g, t, n] * dyt
                        gr[n] = gn
                        dCt[i, g, t, n] += dyt * hs[t, n]
                        dBt[i, g, t, n] += gn * x
                        sum_gb += gn * Bt[i, g, t, n]
                        hp = hs[t - 1, n] if t > 0 else zero
                        q = gn * hp * dec[t, n]  # dL/d(dt_t A_n)
                        s_qa += q * A[d, n]
                        dA_b[i, d, n] += q * dtt
                    du[i, d, t] = sum_gb * dtt
                    ddt[i, d, t] = s_qa + sum_gb * ut


def scan_forward(u: np.ndarray, dt: np.ndarray, A: np.ndarray, Bt: np.ndarray, Ct: np.ndarray) -> np.ndarray:
    """y (b, dim, L) = sum_n C_t h_t; arrays C-contiguous, one float dtype."""
    y = np.empty_like(u)
    _forward(u, dt, A, Bt, Ct, y, np.full(1, _LOG_FLOOR, dtype=u.dtype))
    return y


def scan_backward(u, dt, A, Bt, Ct, dy):
    """Gradients of sum(dy * y) w.r.t. u, dt, A, Bt, Ct: (du, ddt, dA (dim, N), dBt, dCt)."""
    b, dim, L = u.shape
    du = np.empty_like(u)
    ddt = np.empty_like(u)
    dA_b = np.zeros((b,) + A.shape, dtype=u.dtype)
    dBt = np.zeros_like(Bt)
    dCt = np.zeros_like(Ct)
    _backward(u, dt, A, Bt, Ct, dy, du, ddt, dA_b, dBt, dCt, np.full(1, _LOG_FLOOR, dtype=u.dtype))
    return du, ddt, dA_b.sum(0), dBt, dCt
