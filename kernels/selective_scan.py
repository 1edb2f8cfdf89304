"""The selective scan of tinylm/core/ssm.py as Numba CUDA kernels, float32, forward and backward; each
call must agree with tinylm.core.ssm.selective_scan_forward / selective_scan_backward (tested within
1e-5 under the CUDA simulator by tests/test_selective_scan_kernel.py).

One thread per (batch row b, channel e) walks the T positions in order, keeping its N states
h[n] in registers (a local array), exactly the recurrence

    h_t = exp(Δ_t A) ∘ h_{t−1} + Δ_t u_t B_t,    y_t = C_t · h_t + D u_t.

Channels never interact, so B·E threads run with no synchronisation; the sequential loop over T
is what makes the cost linear in T. The forward also writes every h_t (B, T, E, N), as the NumPy
cache does, so the backward can read h_{t−1} instead of recomputing it.

The backward walks T in reverse with g = ∂L/∂h_t in registers (g_t = dy_t C_t + exp(Δ_{t+1} A) g_{t+1}).
dB_t and dC_t sum over channels, i.e. over threads: atomic adds. dA and dD sum over b and t: each
thread keeps its own (b, e) partial, summed over b afterwards by the array module.

All arithmetic is float32 with float32 literals: a bare Python float would promote to float64,
which an H100 runs at 1/64 of the float32 rate (kernels_and_signatures feeds the PTX check).
"""
import math

import numpy as np
from numba import cuda, float32

from .launch import C1, C2, C3, C4, array_module, stream

MAX_STATE = 64            # h lives in a per-thread local array, whose size must be a constant
THREADS = 128


def check_inputs(u, delta, A_log, Bm, Cm, D):
    """float32, shapes as in tinylm.core.ssm.selective_scan_forward, d_state at most MAX_STATE."""
    for name, x in dict(u=u, delta=delta, A_log=A_log, Bm=Bm, Cm=Cm, D=D).items():
        if x.dtype != np.float32:
            raise ValueError(f"{name} must be float32 (the kernel's only dtype), got {x.dtype}")
    (B, T, E), N = u.shape, A_log.shape[1]
    if N > MAX_STATE:
        raise ValueError(f"d_state={N} is more than the kernel's MAX_STATE={MAX_STATE}")
    expected = dict(delta=(B, T, E), A_log=(E, N), Bm=(B, T, N), Cm=(B, T, N), D=(E,))
    for name, x in dict(delta=delta, A_log=A_log, Bm=Bm, Cm=Cm, D=D).items():
        if tuple(x.shape) != expected[name]:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {expected[name]}")


@cuda.jit
def scan_forward_kernel(u, delta, A, Bm, Cm, D, h0, y, hs):
    """Thread (b, e): h = h0[b, e]; for t: h = exp(Δ A) h + Δ u B_t; y = C_t·h + D u; hs[b, t, e] = h."""
    Bsz, T, E = u.shape
    N = A.shape[1]
    i = cuda.grid(1)
    if i >= Bsz * E:
        return
    b, e = i // E, i % E
    h = cuda.local.array(MAX_STATE, float32)
    for n in range(N):
        h[n] = h0[b, e, n]
    for t in range(T):
        dt, x = delta[b, t, e], u[b, t, e]
        acc = float32(0.0)
        for n in range(N):
            h[n] = math.exp(dt * A[e, n]) * h[n] + dt * x * Bm[b, t, n]
            hs[b, t, e, n] = h[n]
            acc += Cm[b, t, n] * h[n]
        y[b, t, e] = acc + D[e] * x


@cuda.jit
def scan_backward_kernel(u, delta, A, Bm, Cm, D, h0, hs, dy, du, ddelta, dA_part, dBm, dCm, dD_part):
    """Thread (b, e), t from T−1 down to 0: g += dy_t C_t; the local gradients; g *= exp(Δ_t A)."""
    Bsz, T, E = u.shape
    N = A.shape[1]
    i = cuda.grid(1)
    if i >= Bsz * E:
        return
    b, e = i // E, i % E
    g = cuda.local.array(MAX_STATE, float32)
    dA = cuda.local.array(MAX_STATE, float32)
    for n in range(N):
        g[n] = float32(0.0)
        dA[n] = float32(0.0)
    dD = float32(0.0)
    for t in range(T - 1, -1, -1):
        dt, x, dyt = delta[b, t, e], u[b, t, e], dy[b, t, e]
        gB = float32(0.0)
        d_delta = float32(0.0)
        for n in range(N):
            g[n] += dyt * Cm[b, t, n]
            cuda.atomic.add(dCm, (b, t, n), dyt * hs[b, t, e, n])
            h_prev = hs[b, t - 1, e, n] if t > 0 else h0[b, e, n]
            a = math.exp(dt * A[e, n])
            dlog_a = g[n] * h_prev * a                    # ∂L/∂(Δ A)
            d_delta += dlog_a * A[e, n]
            dA[n] += dlog_a * dt
            gB += g[n] * Bm[b, t, n]
            cuda.atomic.add(dBm, (b, t, n), g[n] * dt * x)
            g[n] *= a                                     # what h_{t−1} receives through the decay
        ddelta[b, t, e] = d_delta + gB * x
        du[b, t, e] = gB * dt + dyt * D[e]
        dD += dyt * x
    for n in range(N):
        dA_part[b, e, n] = dA[n]
    dD_part[b, e] = dD


def prepare(u, delta, A_log, Bm, Cm, D, h0):
    """Checked inputs -> (array module, A = −exp(A_log), h0 or zeros (B, E, N))."""
    check_inputs(u, delta, A_log, Bm, Cm, D)
    xp = array_module(u)
    A = (-xp.exp(A_log)).astype(np.float32)
    return xp, A, xp.zeros((u.shape[0], u.shape[2], A_log.shape[1]), dtype=np.float32) if h0 is None else h0


def n_blocks(n, threads):
    return (n + threads - 1) // threads


def selective_scan_forward(u, delta, A_log, Bm, Cm, D, h0=None, threads=THREADS):
    """Same arguments as tinylm.core.ssm.selective_scan_forward (float32 NumPy arrays under the
    simulator, CuPy arrays on a GPU). -> y (B, T, E), hs (B, T, E, N): every state, for the backward
    (hs[:, -1] is the state to carry on at generation). One thread per (b, e), `threads` per block."""
    xp, A, h0 = prepare(u, delta, A_log, Bm, Cm, D, h0)
    (B, T, E), N = u.shape, A_log.shape[1]
    y = xp.empty((B, T, E), dtype=np.float32)
    hs = xp.empty((B, T, E, N), dtype=np.float32)
    scan_forward_kernel[n_blocks(B * E, threads), threads, stream()](u, delta, A, Bm, Cm, D, h0, y, hs)
    return y, hs


def selective_scan_backward(dy, u, delta, A_log, Bm, Cm, D, hs, h0=None, threads=THREADS):
    """-> (du, ddelta, dA_log, dBm, dCm, dD), as tinylm.core.ssm.selective_scan_backward returns them."""
    xp, A, h0 = prepare(u, delta, A_log, Bm, Cm, D, h0)
    if dy.dtype != np.float32 or dy.shape != u.shape:
        raise ValueError(f"dy must be float32 of u's shape {tuple(u.shape)}, got {dy.dtype} {tuple(dy.shape)}")
    B, E, N = u.shape[0], u.shape[2], A_log.shape[1]
    du, ddelta = xp.empty_like(u), xp.empty_like(u)
    dBm, dCm = xp.zeros_like(Bm), xp.zeros_like(Cm)        # atomics add into them
    dA_part = xp.empty((B, E, N), dtype=np.float32)
    dD_part = xp.empty((B, E), dtype=np.float32)
    scan_backward_kernel[n_blocks(B * E, threads), threads, stream()](u, delta, A, Bm, Cm, D, h0, hs, dy,
                                                    du, ddelta, dA_part, dBm, dCm, dD_part)
    return du, ddelta, dA_part.sum(0) * A, dBm, dCm, dD_part.sum(0)


def kernels_and_signatures():
    """(name, Python function, signature) of each kernel, for kernels/ptx_check.py."""
    A1, A2, A3, A4 = C1, C2, C3, C4
    inputs = f"{A3}, {A3}, {A2}, {A3}, {A3}, {A1}, {A3}"          # u, delta, A, Bm, Cm, D, h0
    yield "scan forward", scan_forward_kernel, f"void({inputs}, {A3}, {A4})"
    yield "scan backward", scan_backward_kernel, f"void({inputs}, {A4}, {A3}, {A3}, {A3}, {A3}, {A3}, {A3}, {A2})"
