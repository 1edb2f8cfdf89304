"""GPT-2's layers, each a forward/backward pair written by hand.

Convention (as in llm.c): `name_forward(inputs, params) -> (out, cache)` saves exactly what the
backward needs; `name_backward(dout, cache)` returns the gradients of the inputs and parameters,
in the order they were passed to the forward. B = batch, T = time, C = d_model, H = heads,
V = vocabulary. Every function works on NumPy or CuPy arrays alike. Each cache is a NamedTuple.
`Layers` (at the end) names every pair the model calls, once; tinylm/core/layer_sets.py registers this
module's pairs as the reference set, which the fused CPU set (cpu_layers.py) and the Numba CUDA set
(kernel_layers.py) replace pair by pair.
"""
import math
from typing import Callable, NamedTuple

from .backend import array_module, matmul, scatter_add

LAYERNORM_EPS = 1e-5


class EmbeddingCache(NamedTuple):
    ids: object
    shape: tuple


class LayernormCache(NamedTuple):
    xhat: object
    rstd: object
    weight: object


class LinearCache(NamedTuple):
    x: object
    weight: object
    has_bias: bool
    gemm: Callable                  # the GEMM the forward used: the backward uses the same


class GeluCache(NamedTuple):
    x: object
    t: object                       # the forward's tanh(√(2/π)(x + 0.044715 x³))


class DropoutCache(NamedTuple):
    keep: object                    # bool, True where the input is kept
    scale: float                    # 1 / (1 − p)


class AttentionCache(NamedTuple):
    q: object
    k: object                       # all P + T keys and values (a KV cache's next `past`)
    v: object
    att: object                     # softmax weights (B, H, T, P+T)
    drop: DropoutCache = None       # dropout on att (training only)


class CrossEntropyCache(NamedTuple):
    logp: object
    safe: object                    # targets with −1 replaced by 0 (a valid index)
    valid: object


class LmLossCache(NamedTuple):
    head: LinearCache
    cross_entropy: object
    cross_entropy_backward: Callable    # the backward of the cross-entropy the forward ran


class RewardHeadCache(NamedTuple):
    z_last: object
    last: object
    shape: tuple
    reward_vector: object


# ----------------------------------------------------------------------------- embedding
def embedding_forward(ids, weight):
    """out[b, t] = weight[ids[b, t]].   ids (B, T) int, weight (N, C) -> out (B, T, C)"""
    return weight[ids], EmbeddingCache(ids, weight.shape)


def embedding_backward(dout, cache, dweight=None):
    """dweight[n] = sum of dout over every (b, t) whose id is n. Returns dweight (N, C), plus the
    given dweight (the tied head's dwte) if there is one.

    Ids repeat (the same token twice in a batch), so the rows must be *accumulated*:
    `dweight[ids] += dout` would keep only the last write for a repeated id.
    """
    ids, shape = cache
    grad = array_module(dout).zeros(shape, dtype=dout.dtype)
    scatter_add(grad, ids.reshape(-1), dout.reshape(-1, shape[1]))
    return grad if dweight is None else grad + dweight


# ----------------------------------------------------------------------------- layernorm
def layernorm_forward(x, weight, bias, eps=LAYERNORM_EPS):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis.   x (..., C) -> y (..., C)"""
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(-1, keepdims=True)
    rstd = 1.0 / (var + eps) ** 0.5
    xhat = xc * rstd
    return xhat * weight + bias, LayernormCache(xhat, rstd, weight)


def layernorm_backward(dy, cache):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * weight.

    The last two terms are the gradient flowing through the mean and the variance: every
    output depends on every input of its row. Returns (dx, dweight, dbias).
    """
    xhat, rstd, weight = cache
    axes = tuple(range(dy.ndim - 1))
    dweight = (dy * xhat).sum(axes)
    dbias = dy.sum(axes)
    dxhat = dy * weight
    dx = dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True)
    dx *= rstd
    return dx, dweight, dbias


# ----------------------------------------------------------------------------- linear
def linear_forward(x, weight, bias=None, gemm=matmul):
    """y = x @ weight + bias.   x (..., I), weight (I, O) (GPT-2's Conv1D layout), bias (O,) -> y (..., O)

    gemm(a, b, trans_a, trans_b) = op(a) @ op(b) on 2-D arrays: the array library's by default,
    kernels.matmul on the kernel path (kernel_layers)."""
    # One (B·T, I) @ (I, O) GEMM: a 3-D @ 2-D matmul would run B smaller ones.
    y = gemm(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[1])
    if bias is not None:
        y += bias
    return y, LinearCache(x, weight, bias is not None, gemm)


def linear_backward(dy, cache):
    """dx = dy @ weightᵀ, dweight = xᵀ @ dy (summed over all leading axes), dbias = sum dy.

    Returns (dx, dweight, dbias); dbias is None when the forward had no bias.
    """
    x, weight, has_bias, gemm = cache
    dy2 = dy.reshape(-1, dy.shape[-1])
    dweight = gemm(x.reshape(-1, x.shape[-1]), dy2, trans_a=True)
    dbias = dy2.sum(0) if has_bias else None
    dx = gemm(dy2, weight, trans_b=True).reshape(x.shape)
    return dx, dweight, dbias


def lm_head_forward(z, wte, gemm=matmul):
    """logits = z @ wteᵀ: the output head shares the token embedding (tied weights).
    z (..., C), wte (V, C) -> logits (..., V). wte is read as stored, through trans_b: no transposed
    copy, and no strided wte.T for a GEMM kernel to read column by column."""
    logits = gemm(z.reshape(-1, z.shape[-1]), wte, trans_b=True).reshape(*z.shape[:-1], wte.shape[0])
    return logits, LinearCache(z, wte, False, gemm)


def lm_head_backward(dlogits, cache):
    """dz = dlogits @ wte, dwte = dlogitsᵀ @ z (in wte's own (V, C) layout).   -> (dz, dwte)"""
    z, wte, _, gemm = cache
    dlogits2 = dlogits.reshape(-1, dlogits.shape[-1])
    dwte = gemm(dlogits2, z.reshape(-1, z.shape[-1]), trans_a=True)
    return gemm(dlogits2, wte).reshape(z.shape), dwte


# ----------------------------------------------------------------------------- gelu
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def gelu_forward(x):
    """GPT-2's tanh GELU: y = 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))).   any shape"""
    xp = array_module(x)
    # In place where possible: at d_model 256 every temporary is a fresh 8 MB the OS must fault in.
    t = x * x
    t *= GELU_A
    t += 1.0
    t *= x
    t *= GELU_C
    xp.tanh(t, out=t)
    y = t + 1.0
    y *= x
    y *= 0.5
    return y, GeluCache(x, t)


def gelu_backward(dy, cache):
    """dy/dx = 0.5 (1 + t) + 0.5 x (1 - t²) √(2/π) (1 + 3·0.044715 x²), with t the forward's tanh."""
    x, t = cache
    dx = x * x
    dx *= 3 * GELU_A * GELU_C
    dx += GELU_C
    dx *= x
    dx *= t * t - 1.0                               # -(1 - tanh²)
    dx *= -1.0
    dx += t
    dx += 1.0
    dx *= 0.5
    dx *= dy
    return dx


# ----------------------------------------------------------------------------- dropout
def dropout_forward(x, keep, p):
    """Inverted dropout, out = x ∘ keep / (1 − p), keep ~ Bernoulli(1 − p) drawn by the caller (the
    run's seeded generator; a test fixes it). Scaling the kept entries by 1/(1 − p) keeps E[out] = x,
    so evaluation runs the same network with no dropout and no rescaling.   x, keep (bool): same shape"""
    scale = 1.0 / (1.0 - p)
    return x * keep * scale, DropoutCache(keep, scale)


def dropout_backward(dout, cache):
    """dx = dout ∘ keep / (1 − p): a dropped entry passes no gradient."""
    return dout * cache.keep * cache.scale


# ----------------------------------------------------------------------------- attention
def causal_mask(xp, n_query, n_key, dtype, offset=None):
    """Additive mask (n_query, n_key): 0 where query i (the last n_query of n_key positions) may see
    key j, -inf where j is in its future. `offset` = (position of query 0) − (position of key 0)
    places the queries elsewhere (flash attention's blocks); by default they are the last ones.

    -inf, never a finite -1e4: exp(-inf) is exactly 0, so no probability ever leaks from the
    future however large the scores grow, and a finite constant can be out-bid by a large score.
    """
    offset = n_key - n_query if offset is None else offset
    future = xp.arange(n_key)[None, :] > (xp.arange(n_query)[:, None] + offset)
    # Both branches are 0-d arrays of `dtype`: the mask is built in that dtype, never as a T×T
    # float64 array first (8 bytes per score, then a cast) as xp.where(future, -inf, 0.0) would.
    return xp.where(future, xp.asarray(-math.inf, dtype=dtype), xp.asarray(0.0, dtype=dtype))


def split_heads(qkv, n_head):
    """(B, T, 3C) -> q, k, v each (B, H, T, C/H): GPT-2's c_attn output is [q | k | v], heads contiguous."""
    B, T, C3 = qkv.shape
    qkv = qkv.reshape(B, T, 3, n_head, C3 // (3 * n_head)).transpose(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(y):
    """(B, H, T, hd) -> (B, T, H·hd)"""
    B, H, T, hd = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * hd)


def attention_forward(qkv, n_head, past=None, keep=None, p=0.0):
    """Causal multi-head self-attention, softmax(q kᵀ / √hd + mask) v.

    qkv (B, T, 3C) -> out (B, T, C). `past` = (k, v), each (B, H, P, hd), holds the keys and values
    of P earlier positions (the KV cache at generation): the T new queries attend to all P + T keys.
    The cache keeps (q, k, v, att) with k, v covering all P + T positions, for the next step or
    the backward. keep (B, H, T, P+T) bool: training's dropout at rate p on the softmax weights,
    where GPT-2 puts it (attn_pdrop): y = dropout(att) v.
    """
    xp = array_module(qkv)
    q, k, v = split_heads(qkv, n_head)
    if past is not None:
        k = xp.concatenate([past[0], k], axis=2)
        v = xp.concatenate([past[1], v], axis=2)
    # Scale q (T·hd entries) rather than the scores (T·(P+T) entries): one pass over less memory.
    att = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(0, 1, 3, 2)   # (B, H, T, P+T)
    att += causal_mask(xp, q.shape[2], k.shape[2], att.dtype)
    # Subtract the row max before exp so no score overflows; each row keeps at least one
    # finite entry (the query's own position), so the max is finite.
    att -= att.max(-1, keepdims=True)
    xp.exp(att, out=att)
    att /= att.sum(-1, keepdims=True)
    dropped, drop = (att, None) if keep is None else dropout_forward(att, keep, p)
    y = dropped @ v                                        # (B, H, T, hd)
    return merge_heads(y), AttentionCache(q, k, v, att, drop)


def attention_backward(dout, cache):
    """Backward of softmax attention (no KV cache: T = P + T).   dout (B, T, C) -> dqkv (B, T, 3C)

    dv = attᵀ dy;  datt = dy vᵀ;  dS = att ∘ (datt − rowsum(datt ∘ att));  dq = dS k / √hd;  dk = dSᵀ q / √hd.
    Masked entries have att = 0, so they receive no gradient. With dropout on att, dv uses the dropped
    weights and datt goes back through the dropout before the softmax's backward.
    """
    q, k, v, att, drop = cache
    B, H, T, hd = q.shape
    dy = dout.reshape(B, T, H, hd).transpose(0, 2, 1, 3)
    dropped = att if drop is None else att * drop.keep * drop.scale
    dv = dropped.transpose(0, 1, 3, 2) @ dy
    datt = dy @ v.transpose(0, 1, 3, 2)
    if drop is not None:
        datt = dropout_backward(datt, drop)               # the gradient on att, before dropout
    datt -= (datt * att).sum(-1, keepdims=True)
    datt *= att
    datt *= 1.0 / math.sqrt(hd)
    dq = datt @ k
    dk = datt.transpose(0, 1, 3, 2) @ q
    return merge_qkv_grads(dq, dk, dv)


def merge_qkv_grads(dq, dk, dv):
    """The inverse of split_heads for gradients: dq, dk, dv each (B, H, T, hd) -> dqkv (B, T, 3C)."""
    B, H, T, hd = dq.shape
    dqkv = array_module(dq).stack([dq, dk, dv])             # (3, B, H, T, hd)
    return dqkv.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * H * hd)


# ----------------------------------------------------------------------------- softmax cross-entropy
def cross_entropy_forward(logits, targets):
    """Per-position negative log-likelihood, nll = logsumexp(logits) − logits[target].

    logits (B, T, V), targets (B, T) int with −1 meaning "no target here" -> nll (B, T) (0 where
    ignored). Log-sum-exp with the row max subtracted keeps it finite for logits of any size.
    """
    xp = array_module(logits)
    shifted = logits - logits.max(-1, keepdims=True)
    sumexp = xp.exp(shifted).sum(-1, keepdims=True)
    logp = shifted - xp.log(sumexp)                        # (B, T, V) log-probabilities
    valid = targets >= 0
    safe = xp.where(valid, targets, 0)
    nll = -xp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    nll *= valid
    return nll, CrossEntropyCache(logp, safe, valid)


def cross_entropy_backward(dnll, cache):
    """Fused softmax + cross-entropy backward: dlogits = (softmax(logits) − onehot(target)) · dnll.

    dnll (B, T) is the weight of each position in the loss (1/count for a mean); ignored
    positions get no gradient whatever their weight.   -> dlogits (B, T, V)
    """
    logp, safe, valid = cache
    xp = array_module(dnll)
    dlogits = xp.exp(logp)
    V = dlogits.shape[-1]
    flat = dlogits.reshape(-1, V)                           # a view: writes land in dlogits
    flat[xp.arange(flat.shape[0]), safe.reshape(-1)] -= 1.0
    dlogits *= (dnll * valid)[..., None]
    return dlogits


# ----------------------------------------------------------------------------- the LM loss
def lm_loss_forward(z, wte, targets, gemm=matmul, cross_entropy=(cross_entropy_forward, cross_entropy_backward)):
    """nll = cross_entropy(z @ wteᵀ, targets): the tied LM head and its loss as one pair, so that a
    layer set may fuse them (cpu_layers.py never holds all B·T×V logits). z (B, T, C), wte (V, C),
    targets (B, T) -> nll (B, T). gemm and the cross-entropy pair: another set's (kernel_layers)."""
    logits, head = lm_head_forward(z, wte, gemm)
    nll, c_ce = cross_entropy[0](logits, targets)
    return nll, LmLossCache(head, c_ce, cross_entropy[1])


def lm_loss_backward(dnll, cache):
    """dlogits = cross_entropy_backward(dnll), then the head's dz, dwte.   -> (dz, dwte)"""
    return lm_head_backward(cache.cross_entropy_backward(dnll, cache.cross_entropy), cache.head)


# ----------------------------------------------------------------------------- reward head
def reward_head_forward(z, last, reward_vector, reward_bias):
    """r[b] = z[b, last[b]] · reward_vector + reward_bias.   z (B, T, C), last (B,) int -> r (B,)

    Reads the final-layer vector of each sequence's last real token: under the causal mask
    only that position has seen the whole instruction and response (z at position 1 has not).
    """
    xp = array_module(z)
    z_last = z[xp.arange(z.shape[0]), last]                # (B, C)
    return z_last @ reward_vector + reward_bias, RewardHeadCache(z_last, last, z.shape, reward_vector)


def reward_head_backward(dr, cache):
    """dz is zero except at each sequence's last real token, where it is dr·reward_vector.
    Returns (dz (B, T, C), dreward_vector (C,), dreward_bias ())."""
    z_last, last, shape, reward_vector = cache
    xp = array_module(dr)
    dz = xp.zeros(shape, dtype=z_last.dtype)
    dz[xp.arange(shape[0]), last] = dr[:, None] * reward_vector
    return dz, z_last.T @ dr, dr.sum()


# ----------------------------------------------------------------------------- a set of layers
class Layers(NamedTuple):
    """Every layer pair the model calls, each with this module's contract, plus the one policy that
    differs between sets: the field list, written once. The model holds one set, chosen once at
    construction (model.layers_for) from the registry of tinylm/core/layer_sets.py: layer_sets.REFERENCE
    (this module's pairs, on NumPy or CuPy arrays) or a set made by layer_set(**provided) from it.
    Parameters are float arrays; adamw_update(p, g, m, v, lr, step, betas, eps, weight_decay)
    updates one tensor in place; clip_and_adamw(model, grads, state, lr, grad_clip, weight_decay, loss)
    -> (loss, norm, stepped) is the whole optimizer step (optim.clip_and_adamw, which uses the two)."""
    embedding_backward: Callable
    linear_forward: Callable
    linear_backward: Callable
    lm_head_forward: Callable             # logits, for generation
    lm_head_backward: Callable
    lm_loss_forward: Callable             # the head and its cross-entropy, for training
    lm_loss_backward: Callable
    layernorm_forward: Callable
    layernorm_backward: Callable
    gelu_forward: Callable
    gelu_backward: Callable
    attention_forward: Callable           # naive, with an optional KV cache (generation)
    attention_backward: Callable
    flash_attention_forward: Callable     # without a KV cache
    flash_attention_backward: Callable
    selective_scan_forward: Callable
    selective_scan_backward: Callable
    adamw_update: Callable
    sum_of_squares: Callable              # Σ g² of one gradient (float64), for the clipping norm
    clip_and_adamw: Callable              # clip + guard + AdamW over every parameter (optim.optimizer_step)
    auto_flash_from: float                # attention="auto" runs flash from this T on (inf: never)
    block_decode: Callable                # a whole block for one new token with a KV cache, or None:
                                          # the model composes the pairs above (model.block_forward)
