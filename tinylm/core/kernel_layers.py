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
    AdamW                kernels.adamw_update (one tensor); the optimizer step: kernels.sum_of_squares and
                         kernels.adamw_flat over one flat Arena of every parameter (clip_and_adamw)

Naive attention (generation with a KV cache, or attention="naive") and the embedding's backward stay
the reference's (layers.py), on the array library. The arrays are CuPy on a GPU, or NumPy under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1),
which runs the same kernels on the CPU, one Python thread per CUDA thread.
"""
import contextlib
import math
import weakref
from functools import partial
from typing import NamedTuple

import numpy as np
from numba import config as numba_config

from . import layers, optim
from .backend import array_module, to_numpy
from ..kernels import flash_attention as flash, fused, launch, selective_scan
from ..kernels.matmul import matmul
from ..kernels.matmul_tf32 import matmul_tf32
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
REDUCE_LAUNCH = {"threads": 2, "blocks": 4} if SIMULATOR else {}


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


# ----------------------------------------------------------------------------- the optimizer step
# Reads from the device to the host made by the kernel path's optimizer step, each through to_host:
# counting_host_reads() lists them (tests/test_kernel_launches.py asserts one per training step).
_host_reads = []


def to_host(x, what):
    """A NumPy copy of device array x: the host waits for the device here (a synchronisation)."""
    for reads in _host_reads:
        reads.append(what)
    return to_numpy(x)


@contextlib.contextmanager
def counting_host_reads():
    """Yield a list that receives the name of every to_host read made inside the block."""
    reads = []
    _host_reads.append(reads)
    try:
        yield reads
    finally:
        _host_reads.remove(reads)


ALIGN = 64          # floats (256 bytes): every tensor's view starts aligned, so matmul keeps its LDG.128


class Arena(NamedTuple):
    """Every parameter, its gradient and both moments as views of four flat float32 buffers (N,), so
    one launch updates them all. Numba kernels take arrays, not pointer tables (and the simulator has
    no raw pointers), so the tensors are moved into one buffer instead. The decayed tensors come
    first: weight decay is `i < n_decay`, no per-element mask. Gaps between tensors (the alignment)
    stay zero in p, g, m and v, where AdamW leaves them zero."""
    p: object
    g: object
    m: object
    v: object
    n_decay: int
    slices: dict                    # name -> (start, stop) in the flat buffers
    views: tuple                    # (params views, m views, v views): the dicts' arrays, if unchanged
    hyper: object                   # (8,) float32, fused.LR ... MAX_NORM, written by the host per step
    stats: object                   # (2,) float32, fused.SUM_SQ and LOSS, read by the host once per step


def make_arena(params, state):
    """Move params and state's moments into a new Arena and point the dicts at its views (in place:
    model.params and state["m"], state["v"] keep their keys and order; the values are copied once)."""
    xp = array_module(next(iter(params.values())))
    names = sorted(params, key=lambda k: not optim.decays(k, params[k].shape))    # stable: decayed first
    slices, n, n_decay = {}, 0, 0
    for name in names:
        slices[name] = (n, n + params[name].size)
        n = -(-(n + params[name].size) // ALIGN) * ALIGN
        if optim.decays(name, params[name].shape):
            n_decay = n
    flats = [xp.zeros(n, dtype=np.float32) for _ in range(4)]
    views = []
    for flat, tensors in zip((flats[0], flats[2], flats[3]), (params, state["m"], state["v"])):
        for name, (start, stop) in slices.items():
            flat[start:stop] = tensors[name].reshape(-1)
            tensors[name] = flat[start:stop].reshape(params[name].shape)
        views.append(dict(tensors))
    return Arena(*flats, n_decay, slices, tuple(views),
                 xp.zeros(8, dtype=np.float32), xp.zeros(2, dtype=np.float32))


_arenas = weakref.WeakKeyDictionary()       # model -> its Arena, gone with the model


def arena_for(model, state):
    """The model's Arena, made anew when params or moments are not its views any more (a first step,
    a resumed state, params assigned from outside)."""
    arena = _arenas.get(model)
    dicts = (model.params, state["m"], state["v"])
    if arena is None or any(set(d) != set(views) or any(d[k] is not views[k] for k in d)
                            for d, views in zip(dicts, arena.views)):
        arena = _arenas[model] = make_arena(model.params, state)
    return arena


def hyperparameters(lr, step, grad_clip, weight_decay, betas=(0.9, 0.95), eps=1e-8):
    """The host side of fused.adamw_flat's hyper (8,): the bias corrections in float64 as
    optim.adamw_update computes them, then rounded to float32 once."""
    beta1, beta2 = betas
    hyper = [lr, beta1, beta2, eps, weight_decay, 1 - beta1 ** step, 1 - beta2 ** step,
             math.inf if grad_clip is None else grad_clip]
    return np.array(hyper, dtype=np.float32)


def enqueue_update(arena, grads, loss):
    """The device half of the step, with no host read (what a CUDA graph captures): gather the
    gradients into the flat g, stats = (Σ g², loss), then the clipped, guarded AdamW over all of it."""
    xp = array_module(arena.g)
    for name, (start, stop) in arena.slices.items():
        xp.copyto(arena.g[start:stop], grads[name].reshape(-1))
    arena.stats[fused.SUM_SQ] = 0.0
    arena.stats[fused.LOSS] = loss          # a 0-d device array: a device-to-device copy
    fused.sum_of_squares(arena.g, arena.stats, **REDUCE_LAUNCH)
    fused.adamw_flat(arena.p, arena.g, arena.m, arena.v, arena.n_decay, arena.hyper, arena.stats,
                     **ELEMENTWISE_LAUNCH)


def read_step(arena, state):
    """The host half: the step's one read (loss and Σ g² together) -> (loss, norm, stepped); the
    kernel made the same finiteness test, so the host counts the step exactly when the weights moved."""
    sum_sq, loss = (float(x) for x in to_host(arena.stats, "loss and Σ g²"))
    norm = math.sqrt(sum_sq)
    stepped = math.isfinite(loss) and math.isfinite(norm)
    if stepped:
        state["step"] += 1
    return loss, norm, stepped


def copy_to_device(device, host):
    """device[...] = host (a small host-to-device copy: no wait on the device)."""
    if isinstance(device, np.ndarray):
        device[...] = host
    else:
        device.set(host)


def clip_and_adamw(model, grads, state, lr, grad_clip, weight_decay, loss):
    """optim.clip_and_adamw on the device: Σ g² (one launch), then clip, guard and AdamW over every
    parameter (one launch), then one host read of (loss, Σ g²) -> (loss, norm, stepped). The norm is
    summed in float32 (the reference sums in float64) and the grads dict is not scaled in place (the
    kernel scales each gradient as it reads it)."""
    optim.check_grads(model.params, grads)
    arena = arena_for(model, state)
    copy_to_device(arena.hyper, hyperparameters(lr, state["step"] + 1, grad_clip, weight_decay))
    enqueue_update(arena, grads, loss)
    return read_step(arena, state)


LAYERS = layer_set(
    linear_forward=linear_forward,
    lm_head_forward=lm_head_forward, lm_loss_forward=lm_loss_forward,
    layernorm_forward=layernorm_forward, layernorm_backward=layernorm_backward,
    gelu_forward=gelu_forward, gelu_backward=gelu_backward,
    flash_attention_forward=flash_attention_forward, flash_attention_backward=flash_attention_backward,
    selective_scan_forward=selective_scan_forward, selective_scan_backward=selective_scan_backward,
    adamw_update=adamw_update, clip_and_adamw=clip_and_adamw,
    auto_flash_from=1)

# GPT(..., tf32="3x"): the same set with every linear layer and the LM head on the tensor cores (the
# backwards follow: LinearCache keeps the gemm its forward used).
LAYERS_3XTF32 = LAYERS._replace(**{name: partial(getattr(LAYERS, name), gemm=gemm_3xtf32)
                                  for name in ("linear_forward", "lm_head_forward", "lm_loss_forward")})


# ----------------------------------------------------------------------------- the step as a CUDA graph
@contextlib.contextmanager
def checked_on_the_host(model):
    """The model's batch checks off inside the block: GraphStep runs them on the host batch before
    the upload, and on the device copy each min/max would be a read back, an error while capturing."""
    model.check_idx = model.check_targets = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.check_idx, model.check_targets


class GraphStep:
    """optim.train_step (no dropout) as one CUDA graph, captured on the second call and replayed after:
    one non-default CuPy stream that the Numba kernels launch on too (cuda.external_stream), the batch
    copied into static device buffers, the step's temporaries from a private memory pool (the graph
    holds their addresses: nothing else may allocate them), lr and the bias corrections in the arena's
    hyper, and the one host read after the replay. A GPU only, and not measured yet (bench/gpu_step.py
    compares it with the eager step). Every call must pass the same batch shape.

        step = GraphStep(model, opt_state);  result = step(idx, targets, schedule)   # an optim.Step
    """

    def __init__(self, model, opt_state, grad_clip=1.0, weight_decay=0.1):
        if SIMULATOR or model.xp is np:
            raise RuntimeError("GraphStep captures a CUDA graph and needs a GPU (GPT(..., device='cuda', "
                               "kernels=True)); the CUDA simulator cannot capture: use optim.train_step")
        import cupy
        from numba import cuda
        # Numba synchronises on the stream a CuPy array's __cuda_array_interface__ names, once per kernel
        # argument: a host wait per launch, and an error while capturing. One stream orders all of it.
        numba_config.CUDA_ARRAY_INTERFACE_SYNC = False
        self.model, self.state, self.grad_clip, self.weight_decay = model, opt_state, grad_clip, weight_decay
        self.cupy, self.stream = cupy, cupy.cuda.Stream(non_blocking=True)
        self.numba_stream = cuda.external_stream(self.stream.ptr)
        self.pool = cupy.cuda.MemoryPool()
        self.arena = self.inputs = self.graph = None
        self.calls = 0

    def enqueue(self):
        """The device work of one step on the static inputs, on the stream, from the private pool."""
        idx, targets, weights = self.inputs
        with launch.on_stream(self.numba_stream), self.cupy.cuda.using_allocator(self.pool.malloc), \
                checked_on_the_host(self.model):
            loss, grads = self.model.weighted_nll_sum_and_grads(idx, targets, weights)
            enqueue_update(self.arena, grads, loss)

    def __call__(self, idx, targets, schedule, loss_mask=None):
        model, xp = self.model, self.model.xp
        model.check_idx(idx)
        weights = model.mean_weights(idx, targets, loss_mask).astype(np.float32)   # checks targets
        lr = schedule(self.state["step"])
        arena = arena_for(model, self.state)
        if self.arena is None:
            self.arena = arena
            self.inputs = [xp.empty(a.shape, dtype=a.dtype) for a in (np.asarray(idx), np.asarray(targets), weights)]
        if arena is not self.arena:
            raise RuntimeError("GraphStep: the params or moments were replaced since the capture; make a new GraphStep")
        if self.inputs[0].shape != np.shape(idx):
            raise ValueError(f"GraphStep replays batches of shape {self.inputs[0].shape}, got {np.shape(idx)}")
        with self.stream:
            for device, host in zip(self.inputs, (idx, targets, weights)):
                device.set(np.ascontiguousarray(host, dtype=device.dtype), stream=self.stream)
            arena.hyper.set(hyperparameters(lr, self.state["step"] + 1, self.grad_clip, self.weight_decay),
                            stream=self.stream)
            if self.calls == 0:
                self.enqueue()                 # eagerly: compiles every kernel, fills the private pool
            else:
                if self.graph is None:         # the same allocations again, now from the pool's free blocks
                    self.stream.begin_capture()
                    self.enqueue()
                    self.graph = self.stream.end_capture()
                self.graph.launch(self.stream)
            loss, norm, stepped = read_step(arena, self.state)    # the one host read: waits for the stream
        self.calls += 1
        return optim.Step(loss, norm, lr, stepped)
