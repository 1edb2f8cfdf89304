"""The small fused kernels a GPU training step needs besides matmul and attention, float32, each
the twin of a NumPy function it is tested against:

    layernorm_forward / layernorm_backward   tinylm.core.layers.layernorm_forward / _backward
    gelu_forward / gelu_backward             tinylm.core.layers.gelu_forward / _backward
    softmax_cross_entropy                    tinylm.core.layers.cross_entropy_forward + _backward, fused
    adamw_update                             tinylm.core.optim.adamw_update, for one tensor
    sum_of_squares, adamw_flat               tinylm.core.optim.clip_and_adamw: clip + guard + AdamW over
                                             every parameter at once (one flat arena), no host read

"Fused": one kernel reads its inputs once and writes its outputs once, where the NumPy code makes
a temporary array per operation (gelu alone makes ~10 passes over memory): these kernels are
memory-bound, so passes are what they cost.

Row kernels (layernorm, cross-entropy) give each row one block of THREADS threads: each thread
sums a strided slice of the row, then the block combines the partial results by a tree reduction
in shared memory (no warp shuffles: the simulator has none).
"""
import math

import numpy as np
from numba import cuda, float32

from .launch import C1, C2, check_float32, empty, n_blocks, stream, zeros

THREADS = 128                        # per row block (a power of two, for the tree reduction)
ELEMENTWISE_THREADS = 256
_row_kernels = {}
# The constants tinylm.core.layers shares (kernels/ imports nothing from tinylm, so they are written
# twice; tests/test_kernels.py asserts both copies agree). NumPy float32 globals are float32
# constants on the device: a Python float would promote the arithmetic to float64.
LAYERNORM_EPS = 1e-5
SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))
GELU_A = np.float32(0.044715)


# ----------------------------------------------------------------------------- row kernels
def make_row_kernels(THREADS):
    """The row kernels (layernorm forward / backward, softmax cross-entropy) for THREADS threads per
    row, a power of two and a compile-time constant of the shared buffer and the reduction. The model
    runs THREADS = 128; the simulator's tests run fewer (it runs one Python thread per thread)."""

    @cuda.jit(device=True)
    def block_reduce(buf, value, take_max):
        """Σ (or, with take_max, the max) of `value` over the block's THREADS threads, returned to all."""
        t = cuda.threadIdx.x
        buf[t] = value
        cuda.syncthreads()
        stride = THREADS // 2
        while stride > 0:                # halve the live threads each step: log2(THREADS) steps
            if t < stride:
                other = buf[t + stride]
                if not take_max:
                    buf[t] += other
                elif other > buf[t]:
                    buf[t] = other
            cuda.syncthreads()
            stride //= 2
        total = buf[0]
        cuda.syncthreads()               # everyone has read buf[0] before the buffer is reused
        return total

    @cuda.jit
    def layernorm_forward_kernel(x, weight, bias, y, mean, rstd, eps):
        buf = cuda.shared.array(THREADS, float32)
        row, t, C = cuda.blockIdx.x, cuda.threadIdx.x, x.shape[1]
        inv_C = float32(1.0) / float32(C)                # float32 / int64 would promote to float64
        partial = float32(0.0)
        for c in range(t, C, THREADS):
            partial += x[row, c]
        mu = block_reduce(buf, partial, False) * inv_C
        partial = float32(0.0)
        for c in range(t, C, THREADS):   # two passes (mean, then squared deviations): no cancellation
            partial += (x[row, c] - mu) * (x[row, c] - mu)
        r = float32(1.0) / math.sqrt(block_reduce(buf, partial, False) * inv_C + eps)
        for c in range(t, C, THREADS):
            y[row, c] = (x[row, c] - mu) * r * weight[c] + bias[c]
        if t == 0:
            mean[row], rstd[row] = mu, r

    @cuda.jit
    def layernorm_backward_kernel(dy, x, mean, rstd, weight, dx, dweight, dbias):
        buf = cuda.shared.array(THREADS, float32)
        row, t, C = cuda.blockIdx.x, cuda.threadIdx.x, x.shape[1]
        inv_C = float32(1.0) / float32(C)
        mu, r = mean[row], rstd[row]
        sum_dxhat, sum_dxhat_xhat = float32(0.0), float32(0.0)
        for c in range(t, C, THREADS):
            xhat = (x[row, c] - mu) * r
            dxhat = dy[row, c] * weight[c]
            sum_dxhat += dxhat
            sum_dxhat_xhat += dxhat * xhat
            # every row adds into the same C entries: atomics, as rows run in parallel blocks
            cuda.atomic.add(dweight, c, dy[row, c] * xhat)
            cuda.atomic.add(dbias, c, dy[row, c])
        mean_dxhat = block_reduce(buf, sum_dxhat, False) * inv_C
        mean_dxhat_xhat = block_reduce(buf, sum_dxhat_xhat, False) * inv_C
        for c in range(t, C, THREADS):
            xhat = (x[row, c] - mu) * r
            dx[row, c] = r * (dy[row, c] * weight[c] - mean_dxhat - xhat * mean_dxhat_xhat)

    @cuda.jit
    def softmax_cross_entropy_kernel(logits, targets, weights, nll, dlogits):
        buf = cuda.shared.array(THREADS, float32)
        row, t, V = cuda.blockIdx.x, cuda.threadIdx.x, logits.shape[1]
        partial = float32(-math.inf)
        for c in range(t, V, THREADS):
            if logits[row, c] > partial:
                partial = logits[row, c]
        row_max = block_reduce(buf, partial, True)          # subtract the max: exp never overflows
        partial = float32(0.0)
        for c in range(t, V, THREADS):
            partial += math.exp(logits[row, c] - row_max)
        sumexp = block_reduce(buf, partial, False)
        target = targets[row]
        weight = weights[row] if target >= 0 else float32(0.0)    # −1: no target, no loss, no gradient
        for c in range(t, V, THREADS):
            p = math.exp(logits[row, c] - row_max) / sumexp
            dlogits[row, c] = (p - (float32(1.0) if c == target else float32(0.0))) * weight
        if t == 0:
            nll[row] = math.log(sumexp) + row_max - logits[row, target] if target >= 0 else float32(0.0)

    @cuda.jit
    def sum_of_squares_kernel(g, total):
        """total[0] += Σ g² (the caller zeroes it): each thread a grid-stride slice, each block one atomic
        add of its tree-reduced partial (float32: ~1e3 block partials, not 10⁸ terms, meet in the atomics)."""
        buf = cuda.shared.array(THREADS, float32)
        partial = float32(0.0)
        for i in range(cuda.grid(1), g.size, cuda.gridsize(1)):
            partial += g[i] * g[i]
        block_total = block_reduce(buf, partial, False)
        if cuda.threadIdx.x == 0:
            cuda.atomic.add(total, 0, block_total)

    return layernorm_forward_kernel, layernorm_backward_kernel, softmax_cross_entropy_kernel, sum_of_squares_kernel


def row_kernels(threads):
    if threads not in _row_kernels:
        if threads < 1 or threads & (threads - 1):
            raise ValueError(f"threads must be a power of two, got {threads}")
        _row_kernels[threads] = make_row_kernels(threads)
    return _row_kernels[threads]


def as_rows(x):
    """(..., C) -> (N, C), a view for contiguous input."""
    return x.reshape(-1, x.shape[-1])


def layernorm_forward(x, weight, bias, eps=LAYERNORM_EPS, threads=THREADS):
    """x (..., C) -> y (..., C), mean (N,), rstd (N,) over N = all leading positions; one block of
    `threads` threads per row (any C: each thread takes every threads-th column)."""
    check_float32(x=x, weight=weight, bias=bias)
    rows = as_rows(x)
    y, mean, rstd = empty(rows.shape, x), empty(rows.shape[:1], x), empty(rows.shape[:1], x)
    row_kernels(threads)[0][rows.shape[0], threads, stream()](rows, weight, bias, y, mean, rstd, np.float32(eps))
    return y.reshape(x.shape), mean, rstd


def layernorm_backward(dy, x, mean, rstd, weight, threads=THREADS):
    """-> dx (..., C), dweight (C,), dbias (C,)"""
    check_float32(dy=dy, x=x, mean=mean, rstd=rstd, weight=weight)
    rows = as_rows(x)
    dx, dweight, dbias = empty(rows.shape, x), zeros(weight.shape, x), zeros(weight.shape, x)
    row_kernels(threads)[1][rows.shape[0], threads, stream()](as_rows(dy), rows, mean, rstd, weight, dx, dweight, dbias)
    return dx.reshape(x.shape), dweight, dbias


# ----------------------------------------------------------------------------- gelu
@cuda.jit
def gelu_forward_kernel(x, y):
    i = cuda.grid(1)
    if i < x.size:
        u = SQRT_2_OVER_PI * (x[i] + GELU_A * x[i] * x[i] * x[i])
        y[i] = float32(0.5) * x[i] * (float32(1.0) + math.tanh(u))


@cuda.jit
def gelu_backward_kernel(dy, x, dx):
    i = cuda.grid(1)
    if i < x.size:
        t = math.tanh(SQRT_2_OVER_PI * (x[i] + GELU_A * x[i] * x[i] * x[i]))
        slope = SQRT_2_OVER_PI * (float32(1.0) + float32(3.0) * GELU_A * x[i] * x[i])
        dx[i] = dy[i] * float32(0.5) * (float32(1.0) + t + x[i] * (float32(1.0) - t * t) * slope)


def elementwise_launch(n, threads):
    return n_blocks(n, threads), threads


def gelu_forward(x, threads=ELEMENTWISE_THREADS):
    """GPT-2's tanh GELU, any shape (contiguous); `threads` per block, one element each."""
    check_float32(x=x)
    y = empty(x.shape, x)
    gelu_forward_kernel[(*elementwise_launch(x.size, threads), stream())](x.reshape(-1), y.reshape(-1))
    return y


def gelu_backward(dy, x, threads=ELEMENTWISE_THREADS):
    check_float32(dy=dy, x=x)
    dx = empty(x.shape, x)
    gelu_backward_kernel[(*elementwise_launch(x.size, threads), stream())](dy.reshape(-1), x.reshape(-1), dx.reshape(-1))
    return dx


# ----------------------------------------------------------------------------- softmax cross-entropy
def softmax_cross_entropy(logits, targets, weights, threads=THREADS):
    """nll = logsumexp(logits) − logits[target] and dlogits = (softmax − onehot)·weight in one pass.

    logits (..., V) float32, targets (...) int (−1: ignored), weights (...) float32 (each
    position's weight in the loss) -> nll (...), dlogits (..., V)."""
    check_float32(logits=logits, weights=weights)
    rows = as_rows(logits)
    nll, dlogits = empty(rows.shape[:1], logits), empty(rows.shape, logits)
    kernel = row_kernels(threads)[2]
    kernel[rows.shape[0], threads, stream()](rows, targets.reshape(-1), weights.reshape(-1), nll, dlogits)
    return nll.reshape(logits.shape[:-1]), dlogits.reshape(logits.shape)


# ----------------------------------------------------------------------------- AdamW
@cuda.jit
def adamw_kernel(p, g, m, v, lr, beta1, beta2, eps, weight_decay, bias1, bias2):
    i = cuda.grid(1)
    if i < p.size:
        m[i] = beta1 * m[i] + (float32(1.0) - beta1) * g[i]
        v[i] = beta2 * v[i] + (float32(1.0) - beta2) * g[i] * g[i]
        p[i] *= float32(1.0) - lr * weight_decay
        p[i] -= (lr / bias1) * m[i] / (math.sqrt(v[i] / bias2) + eps)


def adamw_update(p, g, m, v, lr, step, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, threads=ELEMENTWISE_THREADS):
    """One AdamW step for one tensor, in place on p, m, v (contiguous); `step` counts from 1.
    weight_decay is this tensor's (0 for the ones tinylm.core.optim.decays exempts)."""
    check_float32(p=p, g=g, m=m, v=v)
    beta1, beta2 = betas
    scalars = [np.float32(s) for s in (lr, beta1, beta2, eps, weight_decay, 1 - beta1 ** step, 1 - beta2 ** step)]
    flat = [a.reshape(-1) for a in (p, g, m, v)]
    adamw_kernel[(*elementwise_launch(p.size, threads), stream())](*flat, *scalars)


# ----------------------------------------------------------------------------- AdamW over one flat arena
# hyper: the step's float32 scalars, written by the host before each step (a small copy, so a captured
# graph replays with the new lr); stats: what the step computes on the device and the host reads once.
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, BIAS1, BIAS2, MAX_NORM = range(8)      # hyper[...]
SUM_SQ, LOSS = range(2)                                                    # stats[...]
CLIP_EPS = np.float32(1e-6)                # optim.clip_grad_norm's max_norm / (norm + 1e-6)
REDUCE_BLOCKS = 1024                       # a grid-stride reduction: ~8 blocks per H100 SM


def sum_of_squares(g, stats, threads=THREADS, blocks=REDUCE_BLOCKS):
    """stats[SUM_SQ] += Σ g² over a flat g (N,), on the device: the clipping norm without a host read."""
    check_float32(g=g, stats=stats)
    kernel = row_kernels(threads)[3]
    kernel[min(blocks, n_blocks(g.size, threads)), threads, stream()](g, stats[SUM_SQ:SUM_SQ + 1])


@cuda.jit
def adamw_flat_kernel(p, g, m, v, n_decay, hyper, stats):
    """optim.clip_and_adamw for every parameter in one launch; p, g, m, v (N,) flat arenas, decayed
    tensors first (weight decay for i < n_decay, none after). With norm = √stats[SUM_SQ]:

        skip everything unless loss and norm are finite (the guard: one bad batch moves nothing)
        scale = max_norm / (norm + 1e-6) if norm > max_norm else 1;   gᵢ ← scale·gᵢ (the clip)
        m = β1 m + (1−β1) g;  v = β2 v + (1−β2) g²;  θ = θ(1 − lr·wd) − lr/bias1 · m / (√(v/bias2) + ε)
    """
    i = cuda.grid(1)
    norm = math.sqrt(stats[SUM_SQ])
    if i >= p.size or not (math.isfinite(norm) and math.isfinite(stats[LOSS])):
        return
    max_norm = hyper[MAX_NORM]                  # +inf: no clipping
    scale = max_norm / (norm + CLIP_EPS) if norm > max_norm else float32(1.0)
    grad = g[i] * scale
    lr, beta1, beta2 = hyper[LR], hyper[BETA1], hyper[BETA2]
    m[i] = beta1 * m[i] + (float32(1.0) - beta1) * grad
    v[i] = beta2 * v[i] + (float32(1.0) - beta2) * grad * grad
    if i < n_decay:
        p[i] *= float32(1.0) - lr * hyper[WEIGHT_DECAY]
    p[i] -= (lr / hyper[BIAS1]) * m[i] / (math.sqrt(v[i] / hyper[BIAS2]) + hyper[EPS])


def adamw_flat(p, g, m, v, n_decay, hyper, stats, threads=ELEMENTWISE_THREADS):
    """One clipped, guarded AdamW step over flat p, g, m, v (N,), in place; hyper (8,) and stats (2,)
    float32 device arrays (indices above). Nothing here reads the device from the host."""
    check_float32(p=p, g=g, m=m, v=v, hyper=hyper, stats=stats)
    adamw_flat_kernel[(*elementwise_launch(p.size, threads), stream())](p, g, m, v, int(n_decay), hyper, stats)


def kernels_and_signatures():
    """For kernels.ptx_check: every kernel here with the argument types the entry points pass."""
    A1, A2, f = C1, C2, "float32"
    layernorm_forward_kernel, layernorm_backward_kernel, softmax_cross_entropy_kernel, sum_of_squares_kernel = \
        row_kernels(THREADS)
    yield "layernorm fwd", layernorm_forward_kernel, f"void({A2}, {A1}, {A1}, {A2}, {A1}, {A1}, {f})"
    yield "layernorm bwd", layernorm_backward_kernel, f"void({A2}, {A2}, {A1}, {A1}, {A1}, {A2}, {A1}, {A1})"
    yield "gelu fwd", gelu_forward_kernel, f"void({A1}, {A1})"
    yield "gelu bwd", gelu_backward_kernel, f"void({A1}, {A1}, {A1})"
    yield "cross-entropy", softmax_cross_entropy_kernel, f"void({A2}, int64[::1], {A1}, {A1}, {A2})"
    yield "adamw", adamw_kernel, f"void({A1}, {A1}, {A1}, {A1}, {', '.join([f] * 7)})"
    yield "sum of squares", sum_of_squares_kernel, f"void({A1}, {A1})"
    yield "adamw flat", adamw_flat_kernel, f"void({A1}, {A1}, {A1}, {A1}, int64, {A1}, {A1})"
