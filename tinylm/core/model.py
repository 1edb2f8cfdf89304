"""GPT-2, composed from the layer pairs in layers.py.

forward, top to bottom:                     backward, bottom to top:
    x = wte[idx] + wpe[pos]                     dwte += embedding_backward, dwpe = embedding_backward
    for each block:                             for each block, last first:
        x = x + mixer(ln_1(x))                      dx += ln_2ᵀ(fc ᵀ(geluᵀ(projᵀ(dx))))
        x = x + mlp(ln_2(x))                        dx += ln_1ᵀ(mixerᵀ(dx))
    z = ln_f(x)                                 dz -> ln_fᵀ
    logits = z @ wteᵀ  (head tied to wte)       dlogits -> dz, dwte

The mixer is attention, c_proj(attention(c_attn(·))), or with mixer="ssm" the selective
state-space layer of ssm.py. Parameters are named as Hugging Face's GPT-2 keys without the
`transformer.` prefix, in its Conv1D (in, out) layout, so a checkpoint maps one-to-one onto
`model.params` (an ssm model's `h.{i}.ssm.*` have no GPT-2 counterpart).
"""
import math
from typing import Callable, NamedTuple, Optional

import numpy as np

from .backend import array_module, get_xp, to_numpy
from .config import ATTENTIONS, DTYPES, FLASH_MIN_T, MIXERS, GPTConfig, check_int  # noqa: F401  (re-exported)
from .hf import load_hf, save_hf
from .layer_sets import REFERENCE as ARRAY_LAYERS
from .layers import dropout_backward, dropout_forward, embedding_forward
from .ssm import ssm_init_param, ssm_mixer_backward, ssm_mixer_forward, ssm_param_shapes, ssm_state


class Placement(NamedTuple):
    """Where a model runs and on which layer set: chosen together, so passed on together (training,
    checkpoint loading and the commands take one Placement, not three arguments). device "cpu"
    (NumPy) or "cuda" (CuPy); kernels: every layer on the Numba CUDA kernels (None: the device's
    default, True on "cuda"); reference: on the CPU, layers.py's readable set instead of cpu_layers.py's;
    tf32: "3x" puts the kernels' GEMMs on the tensor cores (None: exact FP32)."""
    device: str = "cpu"
    kernels: Optional[bool] = None
    reference: bool = False
    tf32: Optional[str] = None


def layers_for(device, kernels, dtype, reference=False, tf32=None):
    """The layer set a model runs, chosen once at construction so the model code never branches on
    it: the Numba CUDA kernels (kernel_layers.LAYERS); on the CPU the fused Numba set of cpu_layers.py,
    or with reference=True the readable one of layers.py (layer_sets.REFERENCE), which the fast set is
    tested against. On CuPy (cuBLAS) "auto" attention stays naive at every T: the blocked flash of
    flash_attention.py is written for NumPy and would cost a GPU thousands of tiny launches.
    tf32="3x" (kernels only) puts the kernels' GEMMs on the tensor cores (kernel_layers.LAYERS_3XTF32)."""
    if tf32 not in (None, "3x"):
        raise ValueError(f"tf32 must be None (exact FP32) or '3x' (the 3xTF32 tensor-core GEMMs), got {tf32!r}")
    if tf32 and not kernels:
        raise ValueError("tf32='3x' runs the kernels' tensor-core GEMM: it needs kernels=True")
    if kernels:
        from . import kernel_layers          # loads numba.cuda: only when the kernels are asked for
        kernel_layers.check_usable(device, dtype)
        return kernel_layers.LAYERS_3XTF32 if tf32 else kernel_layers.LAYERS
    if device == "cpu" and not reference:
        from . import cpu_layers             # compiles (or loads from Numba's cache) on first use
        return cpu_layers.LAYERS
    return ARRAY_LAYERS if device == "cpu" else ARRAY_LAYERS._replace(auto_flash_from=math.inf)


class AttentionSublayerCache(NamedTuple):
    c_attn: tuple
    attention: tuple                # the cache of the attention that ran (naive or flash) ...
    attention_backward: Callable    # ... and the backward that matches it
    c_proj: tuple


class BlockCache(NamedTuple):
    ln_1: tuple
    mixer: tuple
    ln_2: tuple
    fc: tuple
    gelu: tuple
    mlp_proj: tuple
    drop_mixer: tuple = None        # training's dropout on each branch before its residual add
    drop_mlp: tuple = None


class TrunkCache(NamedTuple):
    tok: tuple
    pos: tuple
    blocks: list
    ln_f: tuple
    drop: tuple = None              # training's dropout on the embeddings


class Dropout(NamedTuple):
    """Training's dropout: rate p where GPT-2 applies its three (embd_pdrop, attn_pdrop, resid_pdrop:
    one rate for all, as GPT-2 sets them), masks drawn from rng, the run's seeded generator, so a
    resumed run draws the same masks. Evaluation and sampling pass none."""
    p: float
    rng: np.random.Generator

    def keep(self, xp, shape):
        return xp.asarray(self.rng.random(shape, dtype=np.float32) >= self.p)


def drop_forward(x, dropout, xp):
    """x, or dropout(x) at training time -> (out, cache or None)."""
    return (x, None) if dropout is None else dropout_forward(x, dropout.keep(xp, x.shape), dropout.p)


def drop_backward(dx, cache):
    return dx if cache is None else dropout_backward(dx, cache)


class NllCache(NamedTuple):
    trunk: TrunkCache
    lm_loss: tuple


def param_shapes(config):
    """name -> shape, in GPT-2's order and layout."""
    C, V = config.d_model, config.vocab_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (config.n_ctx, C)}
    for i in range(config.n_layer):
        h = f"h.{i}."
        shapes.update({h + "ln_1.weight": (C,), h + "ln_1.bias": (C,)})
        if config.mixer == "ssm":
            ssm = ssm_param_shapes(C, config.d_state, config.d_conv, config.expand)
            shapes.update({h + "ssm." + k: s for k, s in ssm.items()})
        else:
            shapes.update({h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
                           h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,)})
        shapes.update({
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes


def check_tensors(params, shapes, where):
    """Every expected tensor present with its shape, nothing extra, every value finite; else one
    ValueError naming them (a NaN in a loaded weight would otherwise sample garbage silently)."""
    missing = sorted(set(shapes) - set(params))
    extra = sorted(set(params) - set(shapes))
    wrong = [f"{k} {tuple(params[k].shape)} (expected {shapes[k]})"
             for k in shapes if k in params and tuple(params[k].shape) != tuple(shapes[k])]
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if extra:
        problems.append("unexpected tensors: " + ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))
    if wrong:
        problems.append("mis-shaped tensors: " + ", ".join(wrong[:8]))
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    for k in shapes:
        if not np.isfinite(params[k]).all():
            raise ValueError(f"{where}: tensor {k} holds NaN or Inf values")


def init_params(config, seed=0):
    """GPT-2's initialisation: N(0, 0.02) weights and embeddings, zero biases, unit LayerNorm gains;
    the two projections that write into the residual stream get 0.02/√(2·n_layer) so the stream's
    variance doesn't grow with depth. SSM mixer parameters: see ssm_init_param."""
    rng = np.random.default_rng(seed)
    out_std = 0.02 / math.sqrt(2 * config.n_layer)
    params = {}
    for name, shape in param_shapes(config).items():
        if ".ssm." in name:
            p = ssm_init_param(name.split(".ssm.")[1], shape, rng, out_std)
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p = np.ones(shape)
        elif len(shape) == 1:
            p = np.zeros(shape)
        else:
            std = out_std if name.endswith("c_proj.weight") else 0.02
            p = rng.normal(0.0, std, size=shape)
        params[name] = p.astype(config.dtype)
    return params


class KVCache:
    """What each layer keeps of the positions already seen, so generation feeds only new tokens:
    keys and values for attention (O(T) per new token instead of recomputing all T positions), or
    the fixed-size state (conv inputs, h) for the ssm mixer. len() is the number of positions seen."""

    def __init__(self, n_layer):
        self.layers = [None] * n_layer
        self.length = 0

    def __len__(self):
        return self.length


class GPT:
    """A GPT-2 language model whose every gradient is computed by hand (see layers.py).

    model.params: dict name -> array. model.forward(idx) -> logits. model.loss_and_grads(idx,
    targets) -> (loss, grads). model.hidden(idx) -> (z, cache) and model.hidden_backward(dz, cache)
    expose the final-layer vectors z for heads other than the LM's (the reward model).

    device "cpu" (NumPy) or "cuda" (CuPy). kernels: run every layer on the Numba CUDA kernels
    (kernel_layers) instead of the array library's (layers.py; cuBLAS on a GPU); default True on
    "cuda", False on "cpu", where True runs the kernels in Numba's CUDA simulator. On the CPU the
    layers are cpu_layers.py's fused ones unless reference=True asks for layers.py's (the lesson, and
    what the fast set is tested against); checkpoints are the same either way. model.layers is the
    set chosen, and model.layers.adamw_update the matching per-tensor AdamW for optim.adamw_step.
    tf32="3x" (opt-in, with the kernels) runs the linear layers and LM head on the tensor cores with
    the 3xTF32 split (kernels/matmul_tf32.py, FP32-level error); the default None is exact FP32.
    """

    def __init__(self, config, seed=0, device="cpu", params=None, kernels=None, reference=False, tf32=None):
        if kernels not in (None, True, False):
            raise ValueError(f"kernels must be True, False or None (the device's default), got {kernels!r}")
        self.config = config
        self.device = device
        self.xp = get_xp(device)
        self.kernels = device == "cuda" if kernels is None else kernels
        self.reference = reference
        self.tf32 = tf32
        self.layers = layers_for(device, self.kernels, config.dtype, reference, tf32)
        params = init_params(config, seed) if params is None else params
        self.params = {k: self.xp.asarray(v, dtype=config.dtype) for k, v in params.items()}
        # The token mixer of every block, chosen once: the block code doesn't branch on it.
        self.mixer_forward, self.mixer_backward = {
            "attention": (self.attention_sublayer_forward, self.attention_sublayer_backward),
            "ssm": (self.ssm_sublayer_forward, self.ssm_sublayer_backward)}[config.mixer]

    # ------------------------------------------------------------------ input checks
    def check_idx(self, idx, name="idx", past=0):
        """Token ids must be a 2-D integer array (B, T) of ids in [0, vocab_size) with P + T <= n_ctx."""
        cfg = self.config
        if not hasattr(idx, "dtype") or not hasattr(idx, "ndim"):
            raise ValueError(f"{name} must be an integer array of shape (B, T), got {type(idx).__name__}")
        if idx.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integers, got dtype {idx.dtype}")
        if idx.ndim != 2:
            raise ValueError(f"{name} must be 2-D (B, T), got shape {tuple(idx.shape)}")
        if idx.shape[0] < 1 or idx.shape[1] < 1:
            raise ValueError(f"{name} must have at least one row and one position, got shape {tuple(idx.shape)}")
        if past + idx.shape[1] > cfg.n_ctx:
            raise ValueError(f"{name} has T={idx.shape[1]}" + (f" after {past} cached positions" if past else "")
                             + f", more than n_ctx={cfg.n_ctx}")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: token id {bad} is out of range for vocab_size={cfg.vocab_size} "
                             f"(allowed 0..{cfg.vocab_size - 1})")

    def check_targets(self, idx, targets):
        """Targets: same shape as idx, integers in [0, vocab_size) or -1 for "no target"."""
        if not hasattr(targets, "dtype") or targets.dtype.kind not in "iu":
            raise ValueError(f"targets must be an integer array, got {getattr(targets, 'dtype', type(targets))}")
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from idx shape {tuple(idx.shape)}")
        lo, hi = int(targets.min()), int(targets.max())
        if lo < -1 or hi >= self.config.vocab_size:
            bad = lo if lo < -1 else hi
            raise ValueError(f"targets: id {bad} is out of range for vocab_size={self.config.vocab_size} "
                             f"(allowed 0..{self.config.vocab_size - 1}, or -1 to ignore a position)")

    # ------------------------------------------------------------------ token mixers
    def attention_sublayer_forward(self, a, i, past=None, dropout=None):
        """c_proj(attention(c_attn(a))).   a (B, T, C) -> (out, cache, (k, v) for the KV cache)"""
        L, p, h = self.layers, self.params, f"h.{i}.attn."
        a, c_attn = L.linear_forward(a, p[h + "c_attn.weight"], p[h + "c_attn.bias"])
        if past is None and dropout is None and self.config.uses_flash(a.shape[1], L.auto_flash_from):
            a, c_att = L.flash_attention_forward(a, self.config.n_head)
            backward = L.flash_attention_backward
        elif dropout is None:   # generation with a KV cache: the naive path, which attends to past keys
            a, c_att = L.attention_forward(a, self.config.n_head, past)
            backward = L.attention_backward
        else:   # training's dropout on the softmax weights: layers.py's pair on every set (none fuses it)
            B, T, H = a.shape[0], a.shape[1], self.config.n_head
            a, c_att = ARRAY_LAYERS.attention_forward(a, H, past, dropout.keep(self.xp, (B, H, T, T)), dropout.p)
            backward = ARRAY_LAYERS.attention_backward
        a, c_aproj = L.linear_forward(a, p[h + "c_proj.weight"], p[h + "c_proj.bias"])
        return a, AttentionSublayerCache(c_attn, c_att, backward, c_aproj), (c_att.k, c_att.v)

    def attention_sublayer_backward(self, da, cache, i, grads):
        L, h = self.layers, f"h.{i}.attn."
        da, grads[h + "c_proj.weight"], grads[h + "c_proj.bias"] = L.linear_backward(da, cache.c_proj)
        da = cache.attention_backward(da, cache.attention)
        da, grads[h + "c_attn.weight"], grads[h + "c_attn.bias"] = L.linear_backward(da, cache.c_attn)
        return da

    def ssm_sublayer_forward(self, a, i, past=None, dropout=None):
        """The selective state-space mixer of ssm.py.   a (B, T, C) -> (out, cache, fixed-size state)
        (it has no attention weights to drop; the block's dropout still applies to its output)."""
        h = f"h.{i}.ssm."
        params = {k[len(h):]: v for k, v in self.params.items() if k.startswith(h)}
        a, cache = ssm_mixer_forward(a, params, self.layers, past)
        return a, cache, ssm_state(cache)

    def ssm_sublayer_backward(self, da, cache, i, grads):
        da, mixer_grads = ssm_mixer_backward(da, cache)
        grads.update({f"h.{i}.ssm.{k}": g for k, g in mixer_grads.items()})
        return da

    # ------------------------------------------------------------------ blocks
    def block_forward(self, x, i, past=None, dropout=None):
        """One pre-LN block: x + mixer(ln_1(x)), then + mlp(ln_2(·)).   x (B, T, C)
        Returns (x, cache, the mixer's state for the KV cache). With a Dropout (training), each
        branch is dropped before its residual add (GPT-2's resid_pdrop). Decoding one token with a
        KV cache, a set with a fused block_decode (cpu_layers) runs the whole block in one call; the
        cache it returns is then None (inference only)."""
        L, p, h = self.layers, self.params, f"h.{i}."
        if past is not None and x.shape[1] == 1 and L.block_decode is not None and self.config.mixer == "attention":
            x, state = L.block_decode(x, p, h, past)
            return x, None, state
        a, c_ln1 = L.layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
        a, c_mix, state = self.mixer_forward(a, i, past, dropout)
        a, c_drop_mix = drop_forward(a, dropout, self.xp)
        x = x + a
        m, c_ln2 = L.layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
        m, c_fc = L.linear_forward(m, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])
        m, c_gelu = L.gelu_forward(m)
        m, c_mproj = L.linear_forward(m, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
        m, c_drop_mlp = drop_forward(m, dropout, self.xp)
        x = x + m
        return x, BlockCache(c_ln1, c_mix, c_ln2, c_fc, c_gelu, c_mproj, c_drop_mix, c_drop_mlp), state

    def block_backward(self, dx, cache, i, grads):
        """The block's forward in reverse; the residual adds pass dx through unchanged."""
        c_ln1, c_mix, c_ln2, c_fc, c_gelu, c_mproj, c_drop_mix, c_drop_mlp = cache
        L, h = self.layers, f"h.{i}."
        dm = drop_backward(dx, c_drop_mlp)
        dm, grads[h + "mlp.c_proj.weight"], grads[h + "mlp.c_proj.bias"] = L.linear_backward(dm, c_mproj)
        dm = L.gelu_backward(dm, c_gelu)
        dm, grads[h + "mlp.c_fc.weight"], grads[h + "mlp.c_fc.bias"] = L.linear_backward(dm, c_fc)
        dm, grads[h + "ln_2.weight"], grads[h + "ln_2.bias"] = L.layernorm_backward(dm, c_ln2)
        dx = dx + dm
        da = self.mixer_backward(drop_backward(dx, c_drop_mix), c_mix, i, grads)
        da, grads[h + "ln_1.weight"], grads[h + "ln_1.bias"] = L.layernorm_backward(da, c_ln1)
        return dx + da

    # ------------------------------------------------------------------ trunk: idx -> z
    def hidden(self, idx, kv_cache=None, dropout=None):
        """Final-layer vectors z = ln_f(blocks(embed(idx))).   idx (B, T) -> z (B, T, C), cache

        With a KVCache the positions continue after the cached ones and the cache is extended
        (inference only: the returned cache is then not valid for hidden_backward). dropout: a
        Dropout at training time (GPT-2's embd_pdrop after the embeddings, and see block_forward).
        """
        past = 0 if kv_cache is None else len(kv_cache)
        self.check_idx(idx, past=past)
        xp, p = self.xp, self.params
        idx = xp.asarray(idx)          # checked where it came from: a host batch costs the GPU no read back
        tok, c_tok = embedding_forward(idx, p["wte.weight"])
        pos, c_pos = embedding_forward(xp.arange(past, past + idx.shape[1]), p["wpe.weight"])
        x, c_drop = drop_forward(tok + pos, dropout, xp)
        c_blocks = []
        for i in range(self.config.n_layer):
            layer_past = None if kv_cache is None else kv_cache.layers[i]
            x, c_block, state = self.block_forward(x, i, layer_past, dropout)
            if kv_cache is not None:
                kv_cache.layers[i] = state
            c_blocks.append(c_block)
        if kv_cache is not None:
            kv_cache.length += idx.shape[1]
        z, c_lnf = self.layers.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])
        return z, TrunkCache(c_tok, c_pos, c_blocks, c_lnf, c_drop)

    def hidden_backward(self, dz, cache, grads=None):
        """Backpropagate a gradient dz (B, T, C) given on z through the trunk.

        Returns grads: dict name -> array for every trunk parameter. If `grads` is given (e.g. it
        already holds the head's dwte), the trunk's gradients are added into it.
        """
        c_tok, c_pos, c_blocks, c_lnf, c_drop = cache
        grads = {} if grads is None else grads
        dx, grads["ln_f.weight"], grads["ln_f.bias"] = self.layers.layernorm_backward(dz, c_lnf)
        for i in reversed(range(self.config.n_layer)):
            dx = self.block_backward(dx, c_blocks[i], i, grads)
        dx = drop_backward(dx, c_drop)
        grads["wpe.weight"] = self.layers.embedding_backward(dx.sum(0), c_pos)
        grads["wte.weight"] = self.layers.embedding_backward(dx, c_tok, grads.get("wte.weight"))
        return grads

    # ------------------------------------------------------------------ head: z -> logits
    def head_forward(self, z):
        """logits = z @ wteᵀ: the output head shares the token embedding (tied weights)."""
        return self.layers.lm_head_forward(z, self.params["wte.weight"])

    # ------------------------------------------------------------------ public API
    def forward(self, idx, kv_cache=None):
        """idx (B, T) int -> logits (B, T, V). With a KVCache, idx holds only the new tokens."""
        z, _ = self.hidden(idx, kv_cache)
        return self.head_forward(z)[0]

    def token_nll(self, idx, targets, dropout=None):
        """Per-position negative log-likelihood (B, T) of targets (−1: ignored, nll 0), and the cache
        that `nll_backward` needs (dropout: a Dropout at training time)."""
        self.check_targets(idx, targets)
        z, c_trunk = self.hidden(idx, dropout=dropout)
        targets = self.xp.asarray(targets)
        # The head and the loss as one pair: a set may fuse them (no B·T×V logits on the fast CPU set).
        nll, c_loss = self.layers.lm_loss_forward(z, self.params["wte.weight"], targets)
        return nll, NllCache(c_trunk, c_loss)

    def nll_backward(self, dnll, cache):
        """Gradients of sum(dnll · nll): dnll (B, T) is each position's weight in the loss."""
        dz, dwte = self.layers.lm_loss_backward(dnll, cache.lm_loss)
        return self.hidden_backward(dz, cache.trunk, {"wte.weight": dwte})

    def weighted_nll_and_grads(self, idx, targets, weights, dropout=None):
        """loss = Σ weights · nll and its gradients; weights (B, T). The policy gradient and DPO use
        this with per-token weights; the LM loss is the special case weights = mask / count."""
        loss, grads = self.weighted_nll_sum_and_grads(idx, targets, weights, dropout)
        return float(loss), grads

    def weighted_nll_sum_and_grads(self, idx, targets, weights, dropout=None):
        """weighted_nll_and_grads with the loss left a 0-d array on the model's device, unread: a GPU
        step reads it once, with the gradient norm (optim.train_step)."""
        nll, cache = self.token_nll(idx, targets, dropout)
        weights = self.xp.asarray(weights, dtype=nll.dtype)
        if weights.shape != nll.shape:
            raise ValueError(f"weights shape {tuple(weights.shape)} differs from idx shape {tuple(nll.shape)}")
        return (weights * nll).sum(), self.nll_backward(weights, cache)

    def mean_weights(self, idx, targets, loss_mask=None):
        """Per-position weights (B, T) that turn Σ weights·nll into the mean over the positions that
        count (loss_mask 1 and target != −1)."""
        self.check_targets(idx, targets)
        counts = (targets >= 0).astype(self.config.dtype)
        if loss_mask is not None:
            loss_mask = array_module(counts).asarray(loss_mask)       # on the targets' side: host or device
            if loss_mask.shape != idx.shape:
                raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} differs from idx shape {tuple(idx.shape)}")
            counts = counts * loss_mask
        n = float(counts.sum())
        if n == 0:
            raise ValueError("no position counts towards the loss (loss_mask is all 0 or every target is -1)")
        return counts / n

    def loss_and_grads(self, idx, targets, loss_mask=None, dropout=None):
        """Mean cross-entropy over the positions that count (loss_mask 1 and target != −1), and
        the gradient of every parameter (same keys as params). dropout: a Dropout (training only)."""
        return self.weighted_nll_and_grads(idx, targets, self.mean_weights(idx, targets, loss_mask), dropout)

    def device_loss_and_grads(self, idx, targets, loss_mask=None, dropout=None):
        """loss_and_grads with the loss a 0-d array not yet read (see weighted_nll_sum_and_grads)."""
        return self.weighted_nll_sum_and_grads(idx, targets, self.mean_weights(idx, targets, loss_mask), dropout)

    def loss(self, idx, targets, loss_mask=None):
        """The loss alone (no backward): the same mean as loss_and_grads."""
        weights = self.mean_weights(idx, targets, loss_mask)
        return float((self.token_nll(idx, targets)[0] * weights).sum())

    def token_logprobs(self, idx, targets):
        """log p(targets[b, t] | idx[b, :t+1]) for each position (0 where the target is −1)."""
        return -self.token_nll(idx, targets)[0]

    def new_kv_cache(self):
        return KVCache(self.config.n_layer)

    # ------------------------------------------------------------------ copies and checkpoints
    def copy(self):
        return GPT(self.config, params={k: v.copy() for k, v in self.params.items()}, **self.placement._asdict())

    @property
    def placement(self):
        """The Placement this model was built with (kernels resolved to True or False)."""
        return Placement(self.device, self.kernels, self.reference, self.tf32)

    def numpy_params(self):
        return {k: to_numpy(v) for k, v in self.params.items()}

    @classmethod
    def from_pretrained(cls, path, dtype="float32", **placement):
        """Load a Hugging Face GPT-2 checkpoint directory (config.json + model.safetensors). placement:
        GPT's device, kernels, reference and tf32 (a Placement's fields), passed on as they are.
        tinylm's own checkpoints (any mixer) load with checkpoint.load_model."""
        placement = Placement(**placement)              # a name that is no field: TypeError, before any I/O
        config, params = load_hf(path, dtype)
        check_tensors(params, param_shapes(config), f"checkpoint {str(path)!r}")
        return cls(config, params=params, **placement._asdict())

    def save_pretrained(self, path):
        """Write config.json + model.safetensors in the layout transformers' GPT2LMHeadModel reads
        (attention models only: `tinylm export-hf`)."""
        save_hf(path, self.config, self.numpy_params())
