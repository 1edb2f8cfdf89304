"""The model's layers fused for the CPU with Numba: the set a CPU model runs by default (GPT(config);
GPT(config, reference=True) runs layers.py's). Read layers.py for the lesson: each function here names
the reference it must match, keeps its variable names (mean, rstd, dxhat, lse, dlogits), and is tested
against it layer by layer and whole-model (tests/test_cpu_layers.py).

What changes is how memory is walked, not the math. A NumPy expression such as
`dxhat - dxhat.mean(-1) - xhat * (dxhat * xhat).mean(-1)` makes one pass over memory per operator and
a full-size temporary for each; here a layer is one loop over rows (or elements) that reads its inputs
once and writes its outputs once. GEMMs stay on BLAS.

    LM head + loss  the logits z @ wteᵀ in vocabulary chunks: an online log-sum-exp per row in the
                    forward; the backward turns each chunk into dlogits and hands it to the dz and
                    dwte GEMMs. Up to KEPT_LOGITS logits the forward keeps its chunks for that; above,
                    the backward recomputes each, and no more than a chunk is ever held
    layernorm       forward: mean, variance, normalise, scale in one pass per row; the backward's two
                    row reductions and dweight/dbias in one pass
    GELU            the tanh argument, NumPy's SIMD tanh, the output; the backward in one pass
    attention       q kᵀ and the products with v stay BLAS GEMMs, batched over heads on contiguous
                    copies; scale, causal mask and softmax fused, no T×T mask
    embedding       the backward's scatter-add straight into the tied head's dwte, no dense temporary
    AdamW + clip    one pass per tensor over p, g, m, v that reads g times the clip's factor (no
                    clipping pass of its own); the norm's Σ g² without a g² copy; a large tensor's
                    pass split across the threads (cpu_layers.split)
    decode step     one new token per row with a KV cache: a whole block (layernorm, qkv, attention
                    over the cached keys, proj, MLP) in one compiled call instead of ~15 Python calls

The linear layers, flash attention and the selective scan are the reference's (layer_set's fallback).
Exponentials and tanh are NumPy's, on whole chunks: its SIMD exp/tanh are ~10× faster than the scalar
libm call a Numba loop makes without SVML (bench/RESULTS.md).

Threads: the GEMMs run on as many as the BLAS is told (OPENBLAS_NUM_THREADS, torch's count in the
benchmark); the optimizer's passes over tensors on as many again (threads(), read from the BLAS through
threadpoolctl: one knob), in pieces of a fixed size, so the results do not depend on the thread
count (memory-bound: AdamW over wte's 38.6 M floats 99 ms split, 177 ms serial; bench/RESULTS.md);
the other fused loops on the calling thread. Both choices were measured on the 2-core test
machine (bench/RESULTS.md): Numba's parallel loops cost ~80 µs per call to start (decoding a token ran
5× slower than the reference's), and OpenBLAS's threads spin for a while after each GEMM, so a loop
run in parallel right after one fought them for the cores and ran 2.5× slower than on one thread.
Compiled once per dtype on first use and cached on disk (cache=True): bench/RESULTS.md gives the
first-run and warm start-up times.
"""
import math
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import NamedTuple

import numpy as np
import threadpoolctl
from numba import njit

from . import optim
from .layer_sets import layer_set
from .layers import GELU_A, GELU_C, LAYERNORM_EPS, AttentionCache, GeluCache, merge_qkv_grads, split_heads

# LLVM may reassociate sums (so reductions vectorise) and contract a*b+c into one FMA, but keeps IEEE
# infinities and NaNs ("nnan"/"ninf" are left out): the causal mask is −inf, and a NaN from a diverged
# run must stay visible rather than be optimised away.
FAST = {"reassoc", "contract", "nsz", "arcp", "afn"}
LOGIT_CHUNK = 1 << 20               # logits held at once by the LM loss (4 MB in float32): fits in L2/L3
KEPT_LOGITS = 1 << 25               # up to this many (128 MB in float32) the LM loss keeps its logits for
                                    # the backward instead of recomputing them (lm_loss_forward)



def rows(x):
    """x (..., C) as a C-contiguous (N, C) array: a view when x is already contiguous."""
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------- embedding
@njit(cache=True)
def scatter_add_rows(dweight, ids, dout):
    """dweight[ids[n]] += dout[n] for every n, in order n = 0, 1, … (repeated ids accumulate)."""
    for n in range(ids.shape[0]):
        for c in range(dweight.shape[1]):
            dweight[ids[n], c] += dout[n, c]


def embedding_backward(dout, cache, dweight=None):
    """layers.embedding_backward: dweight[n] += dout over every (b, t) whose id is n, in place in the
    given dweight (the tied head's dwte), so no (N, C) temporary is added to it."""
    ids, shape = cache
    dweight = np.zeros(shape, dtype=dout.dtype) if dweight is None else dweight
    scatter_add_rows(dweight, np.ascontiguousarray(ids).reshape(-1), rows(dout))
    return dweight


# ----------------------------------------------------------------------------- layernorm
class LayernormCache(NamedTuple):
    x: object                       # (N, C): xhat is recomputed from x, mean, rstd in the backward
    mean: object                    # (N,)
    rstd: object                    # (N,)
    weight: object


@njit(cache=True, fastmath=FAST)
def layernorm_rows_forward(x, weight, bias, eps, y, mean, rstd):
    N, C = x.shape
    for n in range(N):
        mu = 0.0                    # float64 accumulators, whatever the dtype
        for c in range(C):
            mu += x[n, c]
        mu /= C
        var = 0.0
        for c in range(C):
            xc = x[n, c] - mu
            var += xc * xc
        var /= C
        r = 1.0 / math.sqrt(var + eps)
        for c in range(C):
            y[n, c] = (x[n, c] - mu) * r * weight[c] + bias[c]
        mean[n] = mu
        rstd[n] = r


def layernorm_forward(x, weight, bias, eps=LAYERNORM_EPS):
    """layers.layernorm_forward: y = (x - mean) / sqrt(var + eps) * weight + bias, one pass per row."""
    x2 = rows(x)
    y = np.empty_like(x2)
    mean = np.empty(x2.shape[0], dtype=x.dtype)
    rstd = np.empty(x2.shape[0], dtype=x.dtype)
    layernorm_rows_forward(x2, weight, bias, eps, y, mean, rstd)
    return y.reshape(x.shape), LayernormCache(x2, mean, rstd, weight)


@njit(cache=True, fastmath=FAST)
def layernorm_rows_backward(dy, x, mean, rstd, weight, dx, dweight, dbias):
    N, C = x.shape
    for n in range(N):
        dxhat_mean = 0.0
        dxhat_xhat_mean = 0.0
        for c in range(C):
            xhat = (x[n, c] - mean[n]) * rstd[n]
            dxhat = dy[n, c] * weight[c]
            dxhat_mean += dxhat
            dxhat_xhat_mean += dxhat * xhat
            dweight[c] += dy[n, c] * xhat
            dbias[c] += dy[n, c]
        dxhat_mean /= C
        dxhat_xhat_mean /= C
        for c in range(C):
            xhat = (x[n, c] - mean[n]) * rstd[n]
            dxhat = dy[n, c] * weight[c]
            dx[n, c] = (dxhat - dxhat_mean - xhat * dxhat_xhat_mean) * rstd[n]


def layernorm_backward(dy, cache):
    """layers.layernorm_backward: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
    dxhat = dy * weight; dweight = Σ dy·xhat, dbias = Σ dy (float64 sums).  -> (dx, dweight, dbias)"""
    x, mean, rstd, weight = cache
    dy2 = rows(dy)
    dx = np.empty_like(dy2)
    dweight, dbias = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    layernorm_rows_backward(dy2, x, mean, rstd, weight, dx, dweight, dbias)
    return dx.reshape(dy.shape), dweight.astype(dy.dtype), dbias.astype(dy.dtype)


# ----------------------------------------------------------------------------- gelu
@njit(cache=True, fastmath=FAST)
def gelu_flat_tanh_argument(x, t):
    for i in range(x.shape[0]):
        t[i] = GELU_C * (x[i] + GELU_A * x[i] * x[i] * x[i])


@njit(cache=True, fastmath=FAST)
def gelu_flat_forward(x, t, y):
    for i in range(x.shape[0]):
        y[i] = 0.5 * x[i] * (1.0 + t[i])


def gelu_forward(x):
    """layers.gelu_forward: y = 0.5 x (1 + t), t = tanh(√(2/π) (x + 0.044715 x³))."""
    x = np.ascontiguousarray(x)
    y, t = np.empty_like(x), np.empty_like(x)
    gelu_flat_tanh_argument(x.reshape(-1), t.reshape(-1))
    np.tanh(t, out=t)
    gelu_flat_forward(x.reshape(-1), t.reshape(-1), y.reshape(-1))
    return y, GeluCache(x, t)


@njit(cache=True, fastmath=FAST)
def gelu_flat_backward(dy, x, t, dx):
    for i in range(x.shape[0]):
        dx[i] = dy[i] * (0.5 * (1.0 + t[i])
                         + 0.5 * x[i] * (1.0 - t[i] * t[i]) * GELU_C * (1.0 + 3.0 * GELU_A * x[i] * x[i]))


def gelu_backward(dy, cache):
    """layers.gelu_backward: dy/dx = 0.5 (1 + t) + 0.5 x (1 - t²) √(2/π) (1 + 3·0.044715 x²)."""
    x, t = cache
    dy = np.ascontiguousarray(dy)
    dx = np.empty_like(x)
    gelu_flat_backward(dy.reshape(-1), x.reshape(-1), t.reshape(-1), dx.reshape(-1))
    return dx


# ----------------------------------------------------------------------------- attention
@njit(cache=True, fastmath=FAST)
def causal_scores_shift(att, scale, n_query):
    """In place on att (N, n_key), row r = query r % n_query: att·scale − row max over the keys it may
    see (j ≤ i + P, P = n_key − n_query earlier positions), −inf for the keys in its future, so that
    np.exp turns the row into unnormalised softmax weights with exact zeros in the future."""
    n_key = att.shape[1]
    for r in range(att.shape[0]):
        seen = r % n_query + n_key - n_query + 1          # keys 0 .. seen−1 are visible
        row_max = -np.inf
        for j in range(seen):
            row_max = max(row_max, att[r, j])
        for j in range(seen):
            att[r, j] = (att[r, j] - row_max) * scale
        for j in range(seen, n_key):
            att[r, j] = -np.inf


@njit(cache=True, fastmath=FAST)
def normalise_rows(att):
    for r in range(att.shape[0]):
        total = 0.0
        for j in range(att.shape[1]):
            total += att[r, j]
        inverse = 1.0 / total
        for j in range(att.shape[1]):
            att[r, j] *= inverse


def heads_view(out, n_head):
    """out (B, T, H·hd) seen as (B, H, T, hd): a GEMM writing there writes merge_heads' layout."""
    B, T, C = out.shape
    return out.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


class KVBuffer(np.ndarray):
    """Keys or values (B, H, capacity, hd) whose first `filled` positions are in use: the KV cache
    holds views of its front, and a decoded token's keys are written after them in place."""
    filled = 0


def with_room(past, T):
    """A KVBuffer whose first P positions are past (B, H, P, hd) and which has room for T more: past's
    own buffer when past is its front and nothing else has been appended to it (a cache branched from
    an older state gets a copy); else a new one with room for as many positions again, so a
    generation copies its keys log-many times, not at every token."""
    P = past.shape[2]
    buffer = past.base
    if not (isinstance(buffer, KVBuffer) and buffer.filled == P and buffer.shape[2] >= P + T):
        B, H, _, hd = past.shape
        buffer = np.empty((B, H, 2 * (P + T), hd), dtype=past.dtype).view(KVBuffer)
        buffer[:, :, :P] = past
    return buffer


def extended(past, new):
    """past (B, H, P, hd) then new (B, H, T, hd) along the positions -> a (B, H, P + T, hd) view of a
    KVBuffer (with_room's: in place after P where it can be)."""
    P, T = past.shape[2], new.shape[2]
    buffer = with_room(past, T)
    buffer[:, :, P:P + T] = new
    buffer.filled = P + T
    return buffer[:, :, :P + T]


def attention_forward(qkv, n_head, past=None):
    """layers.attention_forward: softmax(q kᵀ / √hd + mask) v, with the scale, causal mask and row max
    fused into one pass over the scores and y written straight into the (B, T, C) output.
    qkv (B, T, 3C) -> out (B, T, C); `past` = (k, v) as in layers.py, extended in place (KVBuffer)."""
    # Contiguous heads: NumPy's batched matmul on split_heads' strided views skips BLAS (25× slower
    # at d_model 256, bench/RESULTS.md); the copies cost one pass over qkv.
    q, k, v = (np.ascontiguousarray(t) for t in split_heads(qkv, n_head))
    if past is not None:
        k, v = extended(past[0], k), extended(past[1], v)
    B, H, T, hd = q.shape
    att = q @ np.asarray(k).transpose(0, 1, 3, 2)                      # (B, H, T, P+T)
    flat = att.reshape(-1, att.shape[-1])
    causal_scores_shift(flat, 1.0 / math.sqrt(hd), T)
    np.exp(att, out=att)
    normalise_rows(flat)
    out = np.empty((B, T, H * hd), dtype=qkv.dtype)
    np.matmul(att, np.asarray(v), out=heads_view(out, n_head))
    return out, AttentionCache(q, k, v, att)


@njit(cache=True, fastmath=FAST)
def softmax_rows_backward(datt, att, scale):
    """In place on datt (N, T): dS = att ∘ (datt − rowsum(datt ∘ att)) · scale, over the visible keys
    j ≤ i; the masked ones have att = 0 and get 0."""
    T = att.shape[1]
    for r in range(att.shape[0]):
        seen = r % T + 1
        dot = 0.0
        for j in range(seen):
            dot += datt[r, j] * att[r, j]
        for j in range(seen):
            datt[r, j] = att[r, j] * (datt[r, j] - dot) * scale
        for j in range(seen, T):
            datt[r, j] = 0.0


def attention_backward(dout, cache):
    """layers.attention_backward: dv = attᵀ dy; datt = dy vᵀ; dS = att ∘ (datt − rowsum(datt ∘ att));
    dq = dS k / √hd; dk = dSᵀ q / √hd, the softmax's backward fused into one pass per row."""
    q, k, v, att = cache.q, cache.k, cache.v, cache.att    # its dropout field: never set here
    B, H, T, hd = q.shape
    dy = np.ascontiguousarray(heads_view(dout, H))       # contiguous, for BLAS (see attention_forward)
    dv = att.transpose(0, 1, 3, 2) @ dy
    datt = dy @ v.transpose(0, 1, 3, 2)
    softmax_rows_backward(datt.reshape(-1, T), att.reshape(-1, T), 1.0 / math.sqrt(hd))
    dq = datt @ k
    dk = datt.transpose(0, 1, 3, 2) @ q
    return merge_qkv_grads(dq, dk, dv)


# ----------------------------------------------------------------------------- the LM loss
class LmLossCache(NamedTuple):
    z: object                       # (N, C)
    wte: object
    lse: object                     # (N,) log-sum-exp of each row's logits
    targets: object                 # (N,) with −1 meaning "no target here"
    chunks: list                    # the vocabulary ranges [v0, v1) the forward used
    kept: object                    # the chunks' exp(logits − row_max), chunk after chunk, or None:
    row_maxes: list                 # ... the backward recomputes each chunk's logits from z and wte


def vocabulary_chunks(N, V, width=None):
    """Column ranges [v0, v1) of `width` columns; by default LOGIT_CHUNK logits' worth (at least 256
    columns, so the GEMMs stay efficient)."""
    width = min(V, max(256, LOGIT_CHUNK // max(N, 1))) if width is None else width
    return [(v0, min(V, v0 + width)) for v0 in range(0, V, width)]


def chunk_logits(z, wte, v0, v1, buffer, at=0):
    """z @ wte[v0:v1]ᵀ (N, v1 − v0) into `buffer` from element `at` on, kept contiguous for the GEMM."""
    logits = buffer[at:at + z.shape[0] * (v1 - v0)].reshape(z.shape[0], v1 - v0)
    return np.matmul(z, wte[v0:v1].T, out=logits)


def target_rows(targets, v0, v1):
    """The rows whose target lies in [v0, v1), and the target's column within the chunk."""
    inside = np.flatnonzero((targets >= v0) & (targets < v1))
    return inside, targets[inside] - v0


def lm_loss_forward(z, wte, targets, chunk_width=None, keep_up_to=None):
    """layers.lm_loss_forward: nll = lse − logits[target], lse = log Σ_v exp(logits), logits = z @ wteᵀ,
    a vocabulary chunk at a time. Per row, the online log-sum-exp (flash attention's, over the
    vocabulary): m' = max(m, rowmax chunk); s = s·e^(m−m') + Σ e^(chunk − m').
    z (B, T, C), wte (V, C), targets (B, T) -> nll (B, T) (0 where the target is −1);
    chunk_width: columns per chunk (vocabulary_chunks' default). Up to keep_up_to logits (KEPT_LOGITS)
    the chunks' e^(chunk − m') are kept for the backward, which then needs no logits GEMM of its own
    (at GPT-2 small, 512 positions: 103 MB kept, one 39.5-GFLOP GEMM saved); above it the backward
    recomputes them and only a chunk is ever held."""
    z2, targets2 = rows(z), np.ascontiguousarray(targets).reshape(-1)
    chunks = vocabulary_chunks(z2.shape[0], wte.shape[0], chunk_width)
    N, V = z2.shape[0], wte.shape[0]
    keep = N * V <= (KEPT_LOGITS if keep_up_to is None else keep_up_to)
    buffer = np.empty(N * (V if keep else chunks[0][1] - chunks[0][0]), dtype=z.dtype)
    row_max = np.full(N, -np.inf, dtype=z.dtype)
    row_maxes = []
    sumexp = np.zeros(N, dtype=z.dtype)
    picked = np.zeros(N, dtype=z.dtype)                     # logits[n, target[n]]
    for v0, v1 in chunks:
        logits = chunk_logits(z2, wte, v0, v1, buffer, N * v0 if keep else 0)
        inside, columns = target_rows(targets2, v0, v1)
        picked[inside] = logits[inside, columns]
        new_max = np.maximum(row_max, logits.max(1))
        logits -= new_max[:, None]
        np.exp(logits, out=logits)
        sumexp *= np.exp(row_max - new_max)
        sumexp += logits.sum(1)
        row_max = new_max
        row_maxes.append(row_max)
    lse = row_max + np.log(sumexp)
    nll = np.where(targets2 >= 0, lse - picked, 0).astype(z.dtype)
    return nll.reshape(targets.shape), LmLossCache(z2, wte, lse, targets2, chunks, buffer if keep else None,
                                                   row_maxes)


def lm_loss_backward(dnll, cache):
    """layers.lm_loss_backward: dlogits = (softmax(logits) − onehot(target)) · dnll, chunk by chunk,
    each consumed at once: dz += dlogits @ wte[chunk], dwte[chunk] = dlogitsᵀ @ z. softmax is
    e^(logits − lse): recomputed from the chunk's logits, or from the kept e^(logits − m) as
    e^(logits − m) · e^(m − lse).   -> (dz, dwte)"""
    z, wte, lse, targets, chunks, kept, row_maxes = cache
    weight = np.where(targets >= 0, np.ascontiguousarray(dnll).reshape(-1), 0).astype(z.dtype)
    N = z.shape[0]
    buffer = np.empty(N * (chunks[0][1] - chunks[0][0]), dtype=z.dtype)
    dz = np.zeros_like(z)
    dz_chunk = np.empty_like(z)
    dwte = np.empty_like(wte)
    for (v0, v1), row_max in zip(chunks, row_maxes):
        if kept is None:
            dlogits = chunk_logits(z, wte, v0, v1, buffer)
            dlogits -= lse[:, None]
            np.exp(dlogits, out=dlogits)                    # softmax
            dlogits *= weight[:, None]
        else:
            dlogits = buffer[:N * (v1 - v0)].reshape(N, v1 - v0)
            np.multiply(kept[N * v0:N * v1].reshape(N, v1 - v0), (np.exp(row_max - lse) * weight)[:, None],
                        out=dlogits)                         # softmax · weight, the cache left as it was
        inside, columns = target_rows(targets, v0, v1)
        dlogits[inside, columns] -= weight[inside]
        np.matmul(dlogits.T, z, out=dwte[v0:v1])
        dz += np.matmul(dlogits, wte[v0:v1], out=dz_chunk)
    return dz.reshape(*dnll.shape, z.shape[1]), dwte


# ----------------------------------------------------------------------------- AdamW and the clip
PIECE = 1 << 18                     # elements per piece of a split pass (a fixed size: see split)


@cache
def threads():
    """The BLAS's thread count (threadpoolctl; OPENBLAS_NUM_THREADS sets it), read once per process:
    one knob for the GEMMs and for the optimizer's split passes."""
    counts = [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
    return max(1, min(counts, default=1))


@cache
def pool():
    return ThreadPoolExecutor(max(1, threads() - 1), thread_name_prefix="tinylm-split")


def split(kernel, n, *args):
    """kernel(*args, start, stop) over [0, n) in pieces of PIECE elements (the last one ragged), dealt
    to threads() threads in contiguous runs, the first run on the calling thread (the kernels are
    nogil: the runs go at once) -> the pieces' results, in order. The pieces depend on n alone, not
    on the thread count, so a sum of them is the same on one thread as on two."""
    bounds = list(range(0, n, PIECE)) + [n]
    pieces = list(zip(bounds[:-1], bounds[1:]))
    parts = max(1, min(threads(), len(pieces)))
    runs = [pieces[len(pieces) * i // parts:len(pieces) * (i + 1) // parts] for i in range(parts)]

    def run(pieces):
        return [kernel(*args, start, stop) for start, stop in pieces]
    rest = [pool().submit(run, r) for r in runs[1:]]
    return run(runs[0]) + [result for f in rest for result in f.result()]


@njit(cache=True, fastmath=FAST, nogil=True)
def adamw_flat(p, g, m, v, grad_scale, lr, beta1, beta2, eps, weight_decay, step, start, stop):
    bias1 = 1.0 - beta1 ** step
    bias2 = 1.0 - beta2 ** step
    for i in range(start, stop):
        gi = g[i] * grad_scale      # in g's dtype, as the reference's clip (g *= scale) rounds it
        m[i] = beta1 * m[i] + (1.0 - beta1) * gi
        v[i] = beta2 * v[i] + (1.0 - beta2) * (gi * gi)
        p[i] = p[i] * (1.0 - lr * weight_decay) - (lr / bias1) * m[i] / (math.sqrt(v[i] / bias2) + eps)


def adamw_update(p, g, m, v, lr, step, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, grad_scale=1.0):
    """optim.adamw_update for one tensor in place, one pass over p, g, m, v, with g read as
    g·grad_scale (the clip's factor, so clipping costs no pass of its own):
    m = β1 m + (1−β1) g;  v = β2 v + (1−β2) g²;  θ = θ(1 − lr·wd) − lr·m̂ / (√v̂ + ε)."""
    for name, a in (("p", p), ("m", m), ("v", v)):
        if not a.flags.c_contiguous:
            raise ValueError(f"adamw_update updates {name} in place and needs it C-contiguous")
    flat = [a.reshape(-1) for a in (p, np.ascontiguousarray(g), m, v)]
    split(adamw_flat, p.size, *flat, g.dtype.type(grad_scale), float(lr), float(betas[0]), float(betas[1]),
          float(eps), float(weight_decay), float(step))


@njit(cache=True, fastmath=FAST, nogil=True)
def sum_of_squares_flat(g, start, stop):
    total = 0.0                     # float64, whatever the dtype
    for i in range(start, stop):
        total += g[i] * g[i]
    return total


def sum_of_squares(g):
    """optim.sum_of_squares: Σ g² in float64, one pass over g and no g² temporary (GPT-2 small's would
    be 500 MB per step); the pieces' partial sums are added in order."""
    return sum(split(sum_of_squares_flat, g.size, np.ascontiguousarray(g).reshape(-1)))


def clip_and_adamw(model, grads, state, lr, grad_clip, weight_decay, loss):
    """optim.clip_and_adamw with the clip folded into AdamW (fold_clip): the norm from sum_of_squares,
    then each tensor's update reads g·optim.clip_scale(norm, grad_clip), so clipping is not a pass over
    every gradient of its own and the grads dict is left unscaled (as on the kernel set)."""
    return optim.clip_and_adamw(model, grads, state, lr, grad_clip, weight_decay, loss, fold_clip=True)


# ----------------------------------------------------------------------------- one-token decode step
@njit(cache=True, fastmath=FAST)
def layernorm_row(x, weight, bias, eps, y):
    """layernorm_rows_forward for one row x (C,) -> y (C,)."""
    C = x.shape[0]
    mu = 0.0
    for c in range(C):
        mu += x[c]
    mu /= C
    var = 0.0
    for c in range(C):
        var += (x[c] - mu) * (x[c] - mu)
    r = 1.0 / math.sqrt(var / C + eps)
    for c in range(C):
        y[c] = (x[c] - mu) * r * weight[c] + bias[c]


@njit(cache=True, fastmath=FAST)
def vector_matrix(x, weight, bias, y):
    """y = x @ weight + bias for one row: x (I,), weight (I, O) -> y (O,). Row by row of weight
    (y += x[i] · weight[i]), so every pass is contiguous and vectorises; at one row this is bound by
    reading weight, which a serial loop does as fast as BLAS's gemv (bench/RESULTS.md)."""
    for o in range(y.shape[0]):
        y[o] = bias[o]
    for i in range(weight.shape[0]):
        xi = x[i]
        for o in range(y.shape[0]):
            y[o] += xi * weight[i, o]


@njit(cache=True, fastmath=FAST)
def attend_one(q, k, v, P, scale, scores, y):
    """One query against keys 0..P of one head: y = softmax(q kᵀ · scale) v.
    q (hd,), k and v (capacity, hd) with positions 0..P in use, scores (≥ P + 1,) scratch."""
    hd = q.shape[0]
    row_max = -np.inf
    for j in range(P + 1):
        dot = q[0] * k[j, 0]            # in the arrays' dtype, as BLAS's q kᵀ: float32 SIMD lanes
        for d in range(1, hd):
            dot += q[d] * k[j, d]
        scores[j] = dot
        row_max = max(row_max, dot)
    total = 0.0
    for j in range(P + 1):
        scores[j] = math.exp((scores[j] - row_max) * scale)
        total += scores[j]
    inverse = 1.0 / total
    for j in range(P + 1):
        scores[j] *= inverse            # stored in the dtype, so the sum below runs in it too
    for d in range(hd):
        y[d] = 0.0
    for j in range(P + 1):
        for d in range(hd):
            y[d] += scores[j] * v[j, d]


@njit(cache=True, fastmath=FAST)
def decode_block_rows(x, ln_1_weight, ln_1_bias, c_attn_weight, c_attn_bias, c_proj_weight, c_proj_bias,
                      ln_2_weight, ln_2_bias, c_fc_weight, c_fc_bias, mlp_proj_weight, mlp_proj_bias,
                      k_buffer, v_buffer, P, eps, out):
    """One pre-LN block for one new token per row, the cache's positions 0..P−1 already in
    k_buffer/v_buffer (B, H, capacity, hd); writes the new keys and values at position P.
    x (B, C) -> out (B, C) = x1 + mlp(ln_2(x1)), x1 = x + c_proj(attention(c_attn(ln_1(x))))."""
    B, C = x.shape
    H, hd = k_buffer.shape[1], k_buffer.shape[3]
    a, y, x1 = np.empty(C, x.dtype), np.empty(C, x.dtype), np.empty(C, x.dtype)
    qkv, m = np.empty(3 * C, x.dtype), np.empty(c_fc_weight.shape[1], x.dtype)
    scores = np.empty(P + 1, x.dtype)
    scale = 1.0 / math.sqrt(hd)
    for b in range(B):
        layernorm_row(x[b], ln_1_weight, ln_1_bias, eps, a)
        vector_matrix(a, c_attn_weight, c_attn_bias, qkv)             # q | k | v, heads side by side
        for h in range(H):
            for d in range(hd):
                k_buffer[b, h, P, d] = qkv[C + h * hd + d]
                v_buffer[b, h, P, d] = qkv[2 * C + h * hd + d]
            attend_one(qkv[h * hd:(h + 1) * hd], k_buffer[b, h], v_buffer[b, h], P, scale, scores,
                       y[h * hd:(h + 1) * hd])
        vector_matrix(y, c_proj_weight, c_proj_bias, x1)
        for c in range(C):
            x1[c] += x[b, c]
        layernorm_row(x1, ln_2_weight, ln_2_bias, eps, a)
        vector_matrix(a, c_fc_weight, c_fc_bias, m)
        for i in range(m.shape[0]):                                  # GELU (gelu_forward's tanh form)
            m[i] = 0.5 * m[i] * (1.0 + math.tanh(GELU_C * (m[i] + GELU_A * m[i] * m[i] * m[i])))
        vector_matrix(m, mlp_proj_weight, mlp_proj_bias, out[b])
        for c in range(C):
            out[b, c] += x1[c]


def block_decode(x, params, prefix, past):
    """model.block_forward for one new token per row with a KV cache, fused into one compiled call (the
    per-layer path costs ~15 Python calls per block, most of a token's time at small widths).
    x (B, 1, C); params: the model's, this block's under `prefix` ("h.3."); past (k, v), each
    (B, H, P, hd), as attention_forward returns them. -> (out (B, 1, C), (k, v) with P + 1 positions), as block_forward's state."""
    k, v = (with_room(t, 1) for t in past)
    P = past[0].shape[2]
    p = [params[prefix + name] for name in BLOCK_PARAMS]
    out = np.empty_like(x)
    decode_block_rows(x[:, 0], *p, np.asarray(k), np.asarray(v), P, LAYERNORM_EPS, out[:, 0])
    k.filled = v.filled = P + 1
    return out, (k[:, :, :P + 1], v[:, :, :P + 1])


BLOCK_PARAMS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                "mlp.c_proj.weight", "mlp.c_proj.bias")


LAYERS = layer_set(
    embedding_backward=embedding_backward,
    lm_loss_forward=lm_loss_forward, lm_loss_backward=lm_loss_backward,
    layernorm_forward=layernorm_forward, layernorm_backward=layernorm_backward,
    gelu_forward=gelu_forward, gelu_backward=gelu_backward,
    attention_forward=attention_forward, attention_backward=attention_backward,
    adamw_update=adamw_update, sum_of_squares=sum_of_squares, clip_and_adamw=clip_and_adamw,
    block_decode=block_decode)
