"""Flash attention in NumPy: causal softmax attention computed block by block, never holding the
T×T score matrix (Dao et al. 2022). The same numbers as layers.attention_forward, with peak memory
O(T·block) per head instead of O(T²). kernels/flash_attention.py runs this algorithm on a GPU and is
tested against `flash_forward` / `flash_backward` here.

Forward, for each block of queries Q_i, streaming the key/value blocks K_j, V_j:

    S = Q_i K_jᵀ·scale;  m' = max(m, rowmax S);  P = exp(S − m')
    l = l·e^(m−m') + rowsum P;  acc = acc·e^(m−m') + P V_j;  m = m'
    at the end  O_i = acc / l  and only  L_i = m + log l  (the row's log-sum-exp) is kept.

Backward, with D = rowsum(dO ∘ O), recomputing P = exp(S − L) one block at a time:

    dV_j += Pᵀ dO_i;  dP = dO_i V_jᵀ;  dS = P ∘ (dP − D_i);  dQ_i += dS K_j·scale;  dK_j += dSᵀ Q_i·scale

With a causal mask, blocks entirely above the diagonal (every key after every query) are skipped.
"""
import math
from typing import NamedTuple

from .backend import array_module
from .layers import causal_mask, merge_heads, merge_qkv_grads, split_heads

BLOCK = 64


class FlashAttentionCache(NamedTuple):
    q: object
    k: object
    v: object
    o: object
    lse: object                     # (B, H, T) log-sum-exp per row: all the backward needs of the softmax
    block: int


def check_block(block):
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")


def block_scores(q_i, k_j, i0, j0, scale, causal):
    """S = q_i k_jᵀ·scale for queries i0.. and keys j0.., with −inf where a key is in a query's future."""
    s = q_i @ k_j.swapaxes(-1, -2)
    s *= scale
    if causal and j0 + k_j.shape[-2] - 1 > i0:             # the block crosses the diagonal
        s += causal_mask(array_module(s), q_i.shape[-2], k_j.shape[-2], s.dtype, offset=i0 - j0)
    return s


def flash_forward(q, k, v, causal=True, block=BLOCK):
    """q, k, v (B, H, T, hd) -> o (B, H, T, hd), lse (B, H, T): o = softmax(q kᵀ/√hd + mask) v and
    lse = log Σ_j exp(s_ij), the only statistic the backward needs."""
    check_block(block)
    xp = array_module(q)
    T, hd = q.shape[-2:]
    scale = 1.0 / math.sqrt(hd)
    o = xp.empty_like(q)
    lse = xp.empty(q.shape[:-1], dtype=q.dtype)
    for i0 in range(0, T, block):
        i1 = min(i0 + block, T)
        q_i = q[..., i0:i1, :]
        m = xp.full(q_i.shape[:-1] + (1,), -xp.inf, dtype=q.dtype)
        l = xp.zeros_like(m)
        acc = xp.zeros_like(q_i)
        for j0 in range(0, i1 if causal else T, block):     # causal: keys after i1 are unseen
            j1 = min(j0 + block, T)
            s = block_scores(q_i, k[..., j0:j1, :], i0, j0, scale, causal)
            # Key block 0 gives every row a finite score (key 0 is nobody's future), so m' is
            # finite from the first block on and e^(m−m') = e^(−inf) = 0 clears the empty start.
            m_new = xp.maximum(m, s.max(-1, keepdims=True))
            alpha = xp.exp(m - m_new)
            s -= m_new
            p = xp.exp(s, out=s)
            l *= alpha
            l += p.sum(-1, keepdims=True)
            acc *= alpha
            acc += p @ v[..., j0:j1, :]
            m = m_new
        o[..., i0:i1, :] = acc / l
        lse[..., i0:i1] = (m + xp.log(l))[..., 0]
    return o, lse


def flash_backward(q, k, v, o, lse, do, causal=True, block=BLOCK):
    """Gradients of sum(do · o) for o = flash_forward(q, k, v)[0].   -> dq, dk, dv (B, H, T, hd)

    Outer loop over key blocks (dK_j, dV_j finish in registers on a GPU), inner over the query
    blocks that can see them; dQ_i is accumulated across the outer loop."""
    check_block(block)
    xp = array_module(q)
    T, hd = q.shape[-2:]
    scale = 1.0 / math.sqrt(hd)
    D = (do * o).sum(-1, keepdims=True)                    # (B, H, T, 1) = rowsum(dP ∘ P)
    dq, dk, dv = xp.zeros_like(q), xp.empty_like(k), xp.empty_like(v)
    for j0 in range(0, T, block):
        j1 = min(j0 + block, T)
        k_j, v_j = k[..., j0:j1, :], v[..., j0:j1, :]
        dk_j, dv_j = xp.zeros_like(k_j), xp.zeros_like(v_j)
        for i0 in range(j0 if causal else 0, T, block):     # causal: queries before j0 see none of them
            i1 = min(i0 + block, T)
            q_i, do_i = q[..., i0:i1, :], do[..., i0:i1, :]
            s = block_scores(q_i, k_j, i0, j0, scale, causal)
            s -= lse[..., i0:i1, None]
            p = xp.exp(s, out=s)                            # the forward's softmax, recomputed
            dv_j += p.swapaxes(-1, -2) @ do_i
            ds = do_i @ v_j.swapaxes(-1, -2)
            ds -= D[..., i0:i1, :]
            ds *= p
            ds *= scale
            dq[..., i0:i1, :] += ds @ k_j
            dk_j += ds.swapaxes(-1, -2) @ q_i
        dk[..., j0:j1, :], dv[..., j0:j1, :] = dk_j, dv_j
    return dq, dk, dv


# ----------------------------------------------------------------------------- the model's layer
def flash_attention_forward(qkv, n_head, block=BLOCK):
    """Drop-in for layers.attention_forward (without a KV cache).   qkv (B, T, 3C) -> out (B, T, C)

    The cache starts (q, k, v) like the naive one's, so a KV cache can be filled from either."""
    q, k, v = split_heads(qkv, n_head)
    o, lse = flash_forward(q, k, v, causal=True, block=block)
    return merge_heads(o), FlashAttentionCache(q, k, v, o, lse, block)


def flash_attention_backward(dout, cache):
    """dout (B, T, C) -> dqkv (B, T, 3C), recomputing the attention weights block by block."""
    q, k, v, o, lse, block = cache
    B, H, T, hd = q.shape
    do = dout.reshape(B, T, H, hd).transpose(0, 2, 1, 3)
    return merge_qkv_grads(*flash_backward(q, k, v, o, lse, do, causal=True, block=block))
