"""The model's layers on the Numba CUDA kernels of kernels/ (imported as tinylm.kernels): the one module through which tinylm
reaches them. Each pair keeps layers.py's contract (`x_forward(...) -> (out, cache)`,
`x_backward(dout, cache)`), and LAYERS is a layers.Layers made by layer_sets.layer_set from the pairs
below, so a model holding it runs every layer on the kernels with the very code that runs the
NumPy/CuPy layers (GPT(config, kernels=True)):

    linear, LM head      kernels.matmul (trans_a / trans_b read the stored array in place); with
                         GPT(..., tf32="3x") kernels.matmul_tf32 instead (LAYERS_3XTF32): the
                         tensor cores with the 3xTF32 split, opt-in
    layernorm, GELU      kernels.layernorm_*, kernels.gelu_*   (tinylm's layernorm eps passed in)
    flash attention      kernels.flash_attention_*   (attention="auto" picks it at every T)
    cross-entropy        kernels.softmax_cross_entropy: one pass gives nll and the unit-weight gradient
    selective scan       kernels.selective_scan_*
    AdamW                kernels.adamw_update

Naive attention (generation with a KV cache, or attention="naive") and the embedding's backward stay
the reference's (layers.py), on the array library. The arrays are CuPy on a GPU, or NumPy under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1),
which runs the same kernels on the CPU, one Python thread per CUDA thread.
"""
from functools import partial
from typing import NamedTuple

import numpy as np
from numba import config as numba_config

from . import layers
from .backend import array_module
from .kernels import flash_attention as flash, fused, selective_scan
from .kernels.matmul import matmul
from .kernels.matmul_tf32 import matmul_tf32
from .layer_sets import layer_set
from .layers import merge_heads, merge_qkv_grads, split_heads

# Launch sizes: the kernels' own defaults on a GPU. The simulator costs ~35 µs per thread-op and
# more per block, so there the same kernels run with small blocks: a tiny model's step takes seconds.
SIMULATOR = bool(numba_config.ENABLE_CUDASIM)
MATMUL_LAUNCH = {"tile": (16, 32, 16, 16, 32, 1, 1)} if SIMULATOR else {}   # one warp
MATMUL_TF32_LAUNCH = {"tile": (16, 8, 16, 16, 8)} if SIMULATOR else {}       # one warp, one mma tile
FLASH_LAUNCH = {"blocks": flash.Tiles(8, 4, 4, 2)} if SIMULATOR else {}   # 8 threads
ROW_LAUNCH = {"threads": 2} if SIMULATOR else {}
ELEMENTWISE_LAUNCH = {"threads": 32} if SIMULATOR else {}


def check_usable(device, dtype):
    """ValueError unless the kernels can run this model: float32, and CuPy arrays on a GPU or NumPy
    arrays under the simulator."""
    if dtype != "float32":
        raise ValueError(f"kernels=True needs dtype float32 (the kernels' only dtype), got {dtype}; "
                         "use kernels=False (--no-kernels) for float64")
    if device == "cpu" and not SIMULATOR:
        raise ValueError("kernels=True on device='cpu' runs the kernels in Numba's CUDA simulator: set "
                         "NUMBA_ENABLE_CUDASIM=1 before starting Python, or use device='cuda'")
    if device == "cuda" and SIMULATOR:
        raise ValueError("NUMBA_ENABLE_CUDASIM=1 runs the kernels on the CPU, on NumPy arrays: unset it for "
                         "device='cuda', or use kernels=False")


# ----------------------------------------------------------------------------- linear, LM head
def gemm(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b) on the matmul kernel: what LinearCache keeps, so the backward uses it too."""
    xp = array_module(a)
    # Slices such as the ssm's dbc[..., :R] reach here as strided views: the kernels take dense arrays.
    return matmul(xp.ascontiguousarray(a), xp.ascontiguousarray(b), trans_a, trans_b, **MATMUL_LAUNCH)


def gemm_3xtf32(a, b, trans_a=False, trans_b=False):
    """gemm on the tensor cores (kernels.matmul_tf32, the 3xTF32 split: FP32-level error)."""
    xp = array_module(a)
    return matmul_tf32(xp.ascontiguousarray(a), xp.ascontiguousarray(b), trans_a, trans_b, **MATMUL_TF32_LAUNCH)


def linear_forward(x, weight, bias=None, gemm=gemm):
    return layers.linear_forward(x, weight, bias, gemm)


def lm_head_forward(z, wte, gemm=gemm):
    return layers.lm_head_forward(z, wte, gemm)


def lm_loss_forward(z, wte, targets, gemm=gemm):
    """layers.lm_loss_forward on the matmul and cross-entropy kernels (lm_loss_backward is layers.py's:
    its cache names the backwards to run)."""
    return layers.lm_loss_forward(z, wte, targets, gemm, (cross_entropy_forward, cross_entropy_backward))


# ----------------------------------------------------------------------------- layernorm
class LayernormCache(NamedTuple):
    x: object
    mean: object                    # (N,) per row: the kernel recomputes xhat from these
    rstd: object
    weight: object


def layernorm_forward(x, weight, bias):
    y, mean, rstd = fused.layernorm_forward(x, weight, bias, layers.LAYERNORM_EPS, **ROW_LAUNCH)
    return y, LayernormCache(x, mean, rstd, weight)


def layernorm_backward(dy, cache):
    return fused.layernorm_backward(dy, *cache, **ROW_LAUNCH)


# ----------------------------------------------------------------------------- gelu
def gelu_forward(x):
    return fused.gelu_forward(x, **ELEMENTWISE_LAUNCH), x     # the cache is x: the backward recomputes tanh


def gelu_backward(dy, x):
    return fused.gelu_backward(dy, x, **ELEMENTWISE_LAUNCH)


# ----------------------------------------------------------------------------- flash attention
class FlashCache(NamedTuple):
    q: object                       # (B, H, T, hd) each, contiguous
    k: object
    v: object
    o: object
    lse: object                     # (B, H, T)


def flash_attention_forward(qkv, n_head):
    """qkv (B, T, 3C) -> out (B, T, C): layers.attention_forward's result, on the flash kernels."""
    xp = array_module(qkv)
    # Contiguous heads: split_heads gives strided views, which a kernel would read with a stride of 3C.
    q, k, v = (xp.ascontiguousarray(t) for t in split_heads(qkv, n_head))
    o, lse = flash.flash_attention_forward(q, k, v, True, **FLASH_LAUNCH)
    return merge_heads(o), FlashCache(q, k, v, o, lse)


def flash_attention_backward(dout, cache):
    """dout (B, T, C) -> dqkv (B, T, 3C)"""
    q, k, v, o, lse = cache
    B, H, T, hd = q.shape
    do = array_module(dout).ascontiguousarray(dout.reshape(B, T, H, hd).transpose(0, 2, 1, 3))
    return merge_qkv_grads(*flash.flash_attention_backward(q, k, v, o, lse, do, True, **FLASH_LAUNCH))


# ----------------------------------------------------------------------------- cross-entropy
def cross_entropy_forward(logits, targets):
    """nll (B, T) and, from the same pass, dlogits for unit weights (0 where the target is −1)."""
    xp = array_module(logits)
    targets = xp.asarray(targets)
    nll, dlogits = fused.softmax_cross_entropy(logits, targets, xp.ones(targets.shape, dtype=np.float32),
                                                 **ROW_LAUNCH)
    return nll, dlogits


def cross_entropy_backward(dnll, dlogits):
    """dlogits · dnll: each position's unit-weight gradient times its weight in the loss."""
    return dlogits * dnll[..., None]


# ----------------------------------------------------------------------------- selective scan
class ScanCache(NamedTuple):
    u: object
    delta: object
    A_log: object
    Bm: object
    Cm: object
    D: object
    hs: object                      # every state h_t (B, T, E, N), as ssm.ScanCache.hs
    h0: object


def selective_scan_forward(u, delta, A_log, Bm, Cm, D, h0=None):
    xp = array_module(u)
    Bm, Cm = xp.ascontiguousarray(Bm), xp.ascontiguousarray(Cm)     # slices of the x_proj output
    h0 = None if h0 is None else xp.ascontiguousarray(h0)           # hs[:, -1] of the previous call
    y, hs = selective_scan.selective_scan_forward(u, delta, A_log, Bm, Cm, D, h0)
    return y, ScanCache(u, delta, A_log, Bm, Cm, D, hs, h0)


def selective_scan_backward(dy, cache):
    u, delta, A_log, Bm, Cm, D, hs, h0 = cache
    return selective_scan.selective_scan_backward(dy, u, delta, A_log, Bm, Cm, D, hs, h0)


# ----------------------------------------------------------------------------- AdamW
def adamw_update(p, g, m, v, lr, step, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
    """optim.adamw_update's contract, on the AdamW kernel (p, m, v contiguous, updated in place)."""
    fused.adamw_update(p, g, m, v, lr, step, betas, eps, weight_decay, **ELEMENTWISE_LAUNCH)


LAYERS = layer_set(
    linear_forward=linear_forward,
    lm_head_forward=lm_head_forward, lm_loss_forward=lm_loss_forward,
    layernorm_forward=layernorm_forward, layernorm_backward=layernorm_backward,
    gelu_forward=gelu_forward, gelu_backward=gelu_backward,
    flash_attention_forward=flash_attention_forward, flash_attention_backward=flash_attention_backward,
    selective_scan_forward=selective_scan_forward, selective_scan_backward=selective_scan_backward,
    adamw_update=adamw_update,
    auto_flash_from=1)

# GPT(..., tf32="3x"): the same set with every linear layer and the LM head on the tensor cores (the
# backwards follow: LinearCache keeps the gemm its forward used).
LAYERS_3XTF32 = LAYERS._replace(**{name: partial(getattr(LAYERS, name), gemm=gemm_3xtf32)
                                  for name in ("linear_forward", "lm_head_forward", "lm_loss_forward")})
