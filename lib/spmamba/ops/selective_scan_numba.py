"""Compiled CPU kernels of the selective scan (forward and analytic backward), through numba.

The pure-PyTorch chunked scan (``selective_scan``) spends most of a CPU training step in Python-level steps over
small tensors. Here each (batch, channel) row runs the recurrence of ``selective_scan_reference`` in compiled code:
first all its decays exp(dt_t A_n) in one vectorised pass (a polynomial exp in float32, see ``_exp_into``), then the
recurrence one time step after the other, its N states in L1; rows run in parallel on the process's threads.
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

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def _exp_into(x, out, bits, fast):  # pragma: no cover - compiled
        """out = exp(x) elementwise, x (M,) <= 88. ``fast`` (float32 only): Cody-Waite reduction x = k ln2 + r,
        |r| <= ln2/2, Cephes' degree-6 polynomial for exp(r) and 2^k from the exponent bits (``bits``: (M,) int32
        scratch), within 1.3 ulp; written without calls so LLVM vectorises it, where libm's exp, one call per
        element, was ~40% of the scan. Otherwise (float64) libm's exp."""
        M = x.shape[0]
        if not fast:
            for j in range(M):
                out[j] = np.exp(x[j])
            return
        for j in range(M):
            v = min(x[j], np.float32(88.0))
            k = np.floor(v * np.float32(1.44269504088896341) + np.float32(0.5))
            r = v - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
            p = (((((np.float32(1.9875691500e-4) * r + np.float32(1.3981999507e-3)) * r
                    + np.float32(8.3334519073e-3)) * r + np.float32(4.1665795894e-2)) * r
                  + np.float32(1.6666665459e-1)) * r + np.float32(5.0000001201e-1))
            out[j] = p * (r * r) + r + np.float32(1.0)
            bits[j] = (np.int32(k) + np.int32(127)) << np.int32(23)
        scale = bits.view(np.float32)
        for j in range(M):
            out[j] = out[j] * scale[j]

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def _decays_into(dtr, Ar, fl, arg, dec, bits, fast):  # pragma: no cover - compiled
        """dec[t N + n] = exp(max(dt_t A_n, floor)) for one channel: dtr (L,), Ar (N,); arg, dec (>= L N,)."""
        N = Ar.shape[0]
        for t in range(dtr.shape[0]):
            dtt = dtr[t]
            for n in range(N):
                arg[t * N + n] = max(dtt * Ar[n], fl)
        _exp_into(arg, dec, bits, fast)

    @njit(**_opts)
    def _forward(u, dt, A, Bt, Ct, y, floor, fast):  # pragma: no cover - compiled
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
            Bf = Bt[i, g].ravel()  # (L N,) views
            Cf = Ct[i, g].ravel()
            dtr = dt[i, d]
            ur = u[i, d]
            yr = y[i, d]
            arg = np.empty(L * N, dtype=u.dtype)
            dec = np.empty(L * N, dtype=u.dtype)
            bits = np.empty(L * N, dtype=np.int32)
            # all decays of the row first, vectorised; the recurrence is then multiply-adds over n
            _decays_into(dtr, A[d], fl, arg, dec, bits, fast)
            h = np.zeros(N, dtype=u.dtype)
            for t in range(L):
                x = dtr[t] * ur[t]
                acc = fl - fl
                for n in range(N):
                    hn = dec[t * N + n] * h[n] + x * Bf[t * N + n]
                    h[n] = hn
                    acc += Cf[t * N + n] * hn
                yr[t] = acc

    @njit(**_opts)
    def _backward(u, dt, A, Bt, Ct, dy, du, ddt, dA_b, dBt, dCt, floor, fast):  # pragma: no cover - compiled
        fl = floor[0]
        zero = fl - fl
        b, dim, L = u.shape
        G = Bt.shape[1]
        N = A.shape[1]
        per = dim // G
        LN = L * N
        for w in prange(b * G):
            i = w // G
            g = w - i * G
            Bf = Bt[i, g].ravel()  # (L N,) views, row t at t N
            Cf = Ct[i, g].ravel()
            dBf = dBt[i, g].ravel()
            dCf = dCt[i, g].ravel()
            # one channel at a time (recomputed: storing them per row for the whole batch would cost b dim L N floats)
            hs = np.zeros(LN + N, dtype=u.dtype)  # hs[(t + 1) N + n] = h_t; first row h_{-1} = 0
            dec = np.zeros(LN + N, dtype=u.dtype)  # dec[t N + n] = a_t; last row 0 (nothing after the end)
            gs = np.zeros(LN + N, dtype=u.dtype)  # gs[t N + n] = dLoss/dh_t; last row 0
            arg = np.empty(LN, dtype=u.dtype)
            bits = np.empty(LN, dtype=np.int32)
            dA_d = np.empty(N, dtype=u.dtype)
            for d in range(g * per, (g + 1) * per):
                dtr = dt[i, d]
                ur = u[i, d]
                dyr = dy[i, d]
                Ar = A[d]
                _decays_into(dtr, Ar, fl, arg, dec, bits, fast)
                # the two recurrences alone (their latency bounds the kernel), then every gradient in one pass
                for t in range(L):  # h_t = a_t h_{t-1} + dt_t u_t B_t
                    x = dtr[t] * ur[t]
                    for n in range(N):
                        hs[(t + 1) * N + n] = dec[t * N + n] * hs[t * N + n] + x * Bf[t * N + n]
                for s in range(L):  # g_t = C_t dy_t + a_{t+1} g_{t+1}, t from L - 1 down
                    t = L - 1 - s
                    dyt = dyr[t]
                    for n in range(N):
                        gs[t * N + n] = dec[(t + 1) * N + n] * gs[(t + 1) * N + n] + Cf[t * N + n] * dyt
                for n in range(N):
                    dA_d[n] = zero
                for t in range(L):
                    dyt = dyr[t]
                    dtt = dtr[t]
                    ut = ur[t]
                    x = dtt * ut
                    sum_gb = zero
                    s_qa = zero
                    for n in range(N):
                        j = t * N + n
                        gn = gs[j]
                        dCf[j] += dyt * hs[j + N]
                        dBf[j] += gn * x
                        sum_gb += gn * Bf[j]
                        q = gn * hs[j] * dec[j]  # dLoss/d(dt_t A_n)
                        s_qa += q * Ar[n]
                        dA_d[n] += q * dtt
                    du[i, d, t] = sum_gb * dtt
                    ddt[i, d, t] = s_qa + sum_gb * ut
                for n in range(N):
                    dA_b[i, d, n] += dA_d[n]


def scan_forward(u: np.ndarray, dt: np.ndarray, A: np.ndarray, Bt: np.ndarray, Ct: np.ndarray) -> np.ndarray:
    """y (b, dim, L) = sum_n C_t h_t; arrays C-contiguous, one float dtype."""
    y = np.empty_like(u)
    _forward(u, dt, A, Bt, Ct, y, np.full(1, _LOG_FLOOR, dtype=u.dtype), u.dtype == np.float32)
    return y


def scan_backward(u, dt, A, Bt, Ct, dy):
    """Gradients of sum(dy * y) w.r.t. u, dt, A, Bt, Ct: (du, ddt, dA (dim, N), dBt, dCt)."""
    b, dim, L = u.shape
    du = np.empty_like(u)
    ddt = np.empty_like(u)
    dA_b = np.zeros((b,) + A.shape, dtype=u.dtype)
    dBt = np.zeros_like(Bt)
    dCt = np.zeros_like(Ct)
    _backward(u, dt, A, Bt, Ct, dy, du, ddt, dA_b, dBt, dCt, np.full(1, _LOG_FLOOR, dtype=u.dtype),
              u.dtype == np.float32)
    return du, ddt, dA_b.sum(0), dBt, dCt
