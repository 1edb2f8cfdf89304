"""A Mamba-style selective state-space mixer (Gu & Dao 2023), each piece a forward/backward pair.

It replaces attention in a block (GPTConfig(mixer="ssm")). E = expand·d_model channels, N = d_state,
R = dt_rank, K = d_conv:

    [u | z] = x @ in_proj                       x (B, T, C) -> u, z (B, T, E)
    u = silu(causal_conv(u))                    short depthwise conv: each channel sees K steps back
    [δ | B | C] = u @ x_proj                    δ (B, T, R), B, C (B, T, N): the "selection"
    Δ = softplus(δ @ dt_proj + b_dt)            (B, T, E) > 0, a step size per token and channel
    h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t      A = −exp(A_log) (E, N): h (B, E, N) decays, never grows
    y_t = C_t · h_t + D u_t
    out = (y ∘ silu(z)) @ out_proj

Mixing across time happens only in the conv and the recurrence, both causal, so the cost is linear
in T and generation carries a fixed-size state per layer: the conv's last K−1 inputs and h.
"""
import math
from typing import NamedTuple

import numpy as np

from .backend import array_module


def ssm_param_shapes(d_model, d_state, d_conv, expand):
    """name -> shape of one mixer's parameters (names relative to `h.{i}.ssm.`)."""
    E, R = expand * d_model, dt_rank(d_model)
    return {
        "in_proj.weight": (d_model, 2 * E),
        "conv.weight": (d_conv, E), "conv.bias": (E,),
        "x_proj.weight": (E, R + 2 * d_state),
        "dt_proj.weight": (R, E), "dt_proj.bias": (E,),
        "A_log": (E, d_state), "D": (E,),
        "out_proj.weight": (E, d_model),
    }


def dt_rank(d_model):
    """Δ is computed through a rank-R bottleneck, R = ⌈d_model/16⌉ as in Mamba: a full E×E map would
    cost more parameters than the rest of the mixer."""
    return math.ceil(d_model / 16)


def ssm_init_param(name, shape, rng, out_std):
    """Mamba's initialisation of one mixer parameter (NumPy float64; names as in ssm_param_shapes).

    A_log: A[e, n] = −(n+1) (S4D-real), a spread of decay rates. dt_proj.bias = softplus⁻¹(Δ) with
    Δ log-uniform in [0.001, 0.1], so some channels remember long and others short. D = 1, a skip.
    The depthwise conv and dt_proj get uniform ±1/√fan-in; out_proj writes into the residual stream
    and gets out_std (GPT-2's 0.02/√(2·n_layer)); the other matrices N(0, 0.02).
    """
    if name == "A_log":
        return np.log(np.tile(np.arange(1, shape[1] + 1, dtype=float), (shape[0], 1)))
    if name == "D":
        return np.ones(shape)
    if name == "dt_proj.bias":
        dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), size=shape))
        return dt + np.log(-np.expm1(-dt))                 # softplus⁻¹(dt) = log(e^dt − 1)
    if name in ("conv.weight", "dt_proj.weight"):
        return rng.uniform(-1.0, 1.0, size=shape) / math.sqrt(shape[0])
    if len(shape) == 1:
        return np.zeros(shape)
    return rng.normal(0.0, out_std if name == "out_proj.weight" else 0.02, size=shape)


class SiluCache(NamedTuple):
    x: object
    s: object                       # σ(x)


class ConvCache(NamedTuple):
    xpad: object                    # (B, K−1+T, E): the past inputs, then x
    weight: object


class ScanCache(NamedTuple):
    u: object
    delta: object
    A: object
    Bm: object
    Cm: object
    D: object
    a: object                       # exp(Δ A) per step
    hs: object                      # every state h_t (B, T, E, N)
    h0: object


class MixerCache(NamedTuple):
    in_proj: tuple
    conv: ConvCache
    act: SiluCache
    x_proj: tuple
    dt_proj: tuple
    softplus: object
    scan: tuple                     # the scan's cache, whichever implementation ran (its `hs` = every state)
    y: object
    gate: object
    c_gate: SiluCache
    out_proj: tuple
    layers: object                  # the layers the forward ran: the backward runs their pairs


# ----------------------------------------------------------------------------- elementwise
def sigmoid(x):
    """σ(x) = ½(1 + tanh(x/2)): the tanh form never overflows, for any x."""
    xp = array_module(x)
    return 0.5 * (1.0 + xp.tanh(0.5 * x))


def silu_forward(x):
    """y = x·σ(x).   any shape"""
    s = sigmoid(x)
    return x * s, SiluCache(x, s)


def silu_backward(dy, cache):
    """dy/dx = σ(x)·(1 + x·(1 − σ(x)))."""
    x, s = cache
    return dy * s * (1.0 + x * (1.0 - s))


def softplus_forward(x):
    """y = log(1 + eˣ) > 0, computed as logaddexp(0, x) so large x doesn't overflow.   any shape"""
    xp = array_module(x)
    return xp.logaddexp(0.0, x), x


def softplus_backward(dy, cache):
    """dy/dx = σ(x)."""
    return dy * sigmoid(cache)


# ----------------------------------------------------------------------------- causal conv
def causal_conv_forward(x, weight, bias, past=None):
    """Depthwise causal convolution: y[t] = Σ_k weight[k] ∘ x[t − K + 1 + k] + bias.

    x (B, T, E), weight (K, E), bias (E,) -> y (B, T, E). Positions before the start read `past`
    (B, K−1, E), the previous call's last inputs at generation, or zeros: no step sees its future.
    """
    xp = array_module(x)
    K = weight.shape[0]
    if past is None:
        past = xp.zeros((x.shape[0], K - 1, x.shape[2]), dtype=x.dtype)
    xpad = xp.concatenate([past, x], axis=1)                 # (B, K−1+T, E)
    T = x.shape[1]
    y = bias + sum(weight[k] * xpad[:, k:k + T] for k in range(K))
    return y, ConvCache(xpad, weight)


def causal_conv_backward(dy, cache):
    """dx[t − K + 1 + k] += weight[k] ∘ dy[t];  dweight[k] = Σ_{b,t} dy[t] ∘ x[t − K + 1 + k].
    Returns (dx, dweight, dbias)."""
    xpad, weight = cache
    xp = array_module(dy)
    K, T = weight.shape[0], dy.shape[1]
    dxpad = xp.zeros_like(xpad)
    dweight = xp.empty_like(weight)
    for k in range(K):
        dxpad[:, k:k + T] += weight[k] * dy
        dweight[k] = (dy * xpad[:, k:k + T]).sum((0, 1))
    return dxpad[:, K - 1:], dweight, dy.sum((0, 1))


def conv_state(cache):
    """The last K−1 inputs: what the next call's `past` must be."""
    xpad, weight = cache
    return xpad[:, xpad.shape[1] - (weight.shape[0] - 1):]


# ----------------------------------------------------------------------------- selective scan
def selective_scan_forward(u, delta, A_log, Bm, Cm, D, h0=None):
    """The selective state-space recurrence, one step per position:

        h_t = exp(Δ_t A) ∘ h_{t−1} + (Δ_t u_t) ⊗ B_t,   y_t = h_t C_t + D ∘ u_t,   A = −exp(A_log)

    u, delta (B, T, E), A_log (E, N), Bm, Cm (B, T, N), D (E,) -> y (B, T, E). h0 (B, E, N) is the
    state carried in from earlier positions at generation (zeros by default; no gradient flows to
    it). A < 0 and Δ > 0 make every decay factor exp(ΔA) lie in (0, 1): the state cannot blow up.
    """
    xp = array_module(u)
    A = -xp.exp(A_log)
    a = xp.exp(delta[..., None] * A)                         # (B, T, E, N) decay per step
    b = (delta * u)[..., None] * Bm[:, :, None, :]           # (B, T, E, N) input per step
    h = xp.zeros_like(a[:, 0]) if h0 is None else h0
    hs = xp.empty_like(a)
    for t in range(u.shape[1]):                              # the only sequential loop: O(T)
        h = a[:, t] * h + b[:, t]
        hs[:, t] = h
    y = (hs @ Cm[..., None])[..., 0] + D * u                 # (B, T, E, N) @ (B, T, N, 1)
    return y, ScanCache(u, delta, A, Bm, Cm, D, a, hs, h0)


def selective_scan_backward(dy, cache):
    """Backward by a reverse-time scan. g_t = ∂L/∂h_t collects y_t's direct term and what h_{t+1}
    passes back through its decay:

        g_t = dy_t ⊗ C_t + exp(Δ_{t+1} A) ∘ g_{t+1}

    then, per position, everything is local: d(exp(ΔA)) = g_t ∘ h_{t−1}, d(Δ u ⊗ B) = g_t.
    Returns (du, ddelta, dA_log, dBm, dCm, dD).
    """
    u, delta, A, Bm, Cm, D, a, hs, h0 = cache
    xp = array_module(dy)
    G = dy[..., None] * Cm[:, :, None, :]                    # (B, T, E, N) ∂y_t/∂h_t part
    gs = xp.empty_like(G)
    g = xp.zeros_like(G[:, 0])
    for t in reversed(range(dy.shape[1])):
        g = G[:, t] + g
        gs[:, t] = g
        g = g * a[:, t]                                      # what h_{t−1} receives through the decay
    h_prev = xp.concatenate([xp.zeros_like(hs[:, :1]) if h0 is None else h0[:, None], hs[:, :-1]], axis=1)
    dlog_a = gs * h_prev * a                                 # ∂L/∂(ΔA): a = exp(ΔA)
    gB = (gs @ Bm[..., None])[..., 0]                        # (B, T, E) Σ_n g ∘ B
    ddelta = (dlog_a * A).sum(-1) + gB * u
    dA_log = (dlog_a * delta[..., None]).sum((0, 1)) * A     # dA/dA_log = A
    dBm = ((delta * u)[:, :, None, :] @ gs)[:, :, 0]         # (B, T, N)
    dCm = (dy[:, :, None, :] @ hs)[:, :, 0]                  # (B, T, N)
    du = gB * delta + dy * D
    dD = (dy * u).sum((0, 1))
    return du, ddelta, dA_log, dBm, dCm, dD


def scan_state(cache):
    """h after the last position (B, E, N): the next call's h0."""
    return cache.hs[:, -1]


# ----------------------------------------------------------------------------- the mixer
def ssm_mixer_forward(x, params, layers, state=None):
    """The whole mixer (see the module docstring).   x (B, T, C) -> out (B, T, C)

    params: the names of ssm_param_shapes. state: (conv inputs (B, K−1, E), h (B, E, N)) carried
    from earlier positions at generation, or None. ssm_state(cache) gives the state after x.
    layers: the layers.Layers set that linear_* and selective_scan_* come from (the model's own;
    layer_sets.REFERENCE for these NumPy ones).
    """
    p, L = params, layers
    E = p["D"].shape[0]
    N = p["A_log"].shape[1]
    conv_past, h0 = (None, None) if state is None else state
    uz, c_in = L.linear_forward(x, p["in_proj.weight"])
    u, z = uz[..., :E], uz[..., E:]
    u, c_conv = causal_conv_forward(u, p["conv.weight"], p["conv.bias"], conv_past)
    u, c_act = silu_forward(u)
    dbc, c_x = L.linear_forward(u, p["x_proj.weight"])
    R = dbc.shape[-1] - 2 * N
    dt, c_dt = L.linear_forward(dbc[..., :R], p["dt_proj.weight"], p["dt_proj.bias"])
    delta, c_sp = softplus_forward(dt)
    y, c_scan = L.selective_scan_forward(u, delta, p["A_log"], dbc[..., R:R + N], dbc[..., R + N:], p["D"], h0)
    gate, c_gate = silu_forward(z)
    out, c_out = L.linear_forward(y * gate, p["out_proj.weight"])
    return out, MixerCache(c_in, c_conv, c_act, c_x, c_dt, c_sp, c_scan, y, gate, c_gate, c_out, L)


def ssm_mixer_backward(dout, cache):
    """The mixer's forward in reverse. -> (dx, grads: dict with the names of ssm_param_shapes)"""
    c_in, c_conv, c_act, c_x, c_dt, c_sp, c_scan, y, gate, c_gate, c_out, L = cache
    xp = array_module(dout)
    grads = {}
    dyg, grads["out_proj.weight"], _ = L.linear_backward(dout, c_out)
    dz = silu_backward(dyg * y, c_gate)
    du, ddelta, grads["A_log"], dBm, dCm, grads["D"] = L.selective_scan_backward(dyg * gate, c_scan)
    ddt = softplus_backward(ddelta, c_sp)
    ddt_low, grads["dt_proj.weight"], grads["dt_proj.bias"] = L.linear_backward(ddt, c_dt)
    du_x, grads["x_proj.weight"], _ = L.linear_backward(xp.concatenate([ddt_low, dBm, dCm], axis=-1), c_x)
    du = silu_backward(du + du_x, c_act)
    du, grads["conv.weight"], grads["conv.bias"] = causal_conv_backward(du, c_conv)
    dx, grads["in_proj.weight"], _ = L.linear_backward(xp.concatenate([du, dz], axis=-1), c_in)
    return dx, grads


def ssm_state(cache):
    """The fixed-size state after the positions the forward saw: (conv inputs (B, K−1, E), h (B, E, N))."""
    return conv_state(cache.conv), scan_state(cache.scan)
