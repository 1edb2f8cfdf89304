"""AdamW and global-norm gradient clipping, as plain functions over {name: array} dicts, and the one
optimizer step every training loop takes (pretraining, the scaling sweep, the reward model, RLHF, DPO):

    loss, grads = <the loop's own loss>_and_grads(batch)
    optimizer_step(model, grads, state, schedule, grad_clip, weight_decay, loss)

The optimizer state is a dict of arrays plus a step count, so it saves next to the weights.
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np

from .backend import array_module


def decays(name, shape):
    """Default weight-decay rule: decay the matrices that multiply activations (attention and MLP
    weights); leave biases, LayerNorm gains and the embeddings alone, as GPT-2 / nanoGPT do. The ssm
    mixer's A_log is 2-D but holds decay rates, not weights: shrinking it would pull every A to −1."""
    return len(shape) == 2 and not name.startswith(("wte.", "wpe.")) and not name.endswith(".A_log")


def adamw_init(params):
    """Zero first and second moments for every parameter; step 0."""
    def zeros(p):
        return array_module(p).zeros_like(p)
    return {"step": 0, "m": {k: zeros(p) for k, p in params.items()}, "v": {k: zeros(p) for k, p in params.items()}}


def adamw_update(p, g, m, v, lr, step, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
    """AdamW for one tensor, in place on p, m, v; `step` counts from 1 (the reference that
    kernels.adamw_update, the kernel path's update, is tested against):

        m = β1 m + (1−β1) g;   v = β2 v + (1−β2) g²;   m̂ = m/(1−β1ᵗ);   v̂ = v/(1−β2ᵗ)
        θ = θ − lr·(m̂ / (√v̂ + ε) + wd·θ)

    Weight decay is decoupled (Loshchilov & Hutter): it shrinks θ directly instead of being added
    to g, so Adam's per-parameter scaling doesn't weaken it for parameters with large gradients.
    """
    beta1, beta2 = betas
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * (g * g)
    if weight_decay:
        p *= 1 - lr * weight_decay
    p -= (lr / (1 - beta1 ** step)) * m / ((v / (1 - beta2 ** step)) ** 0.5 + eps)


def check_grads(params, grads):
    if set(grads) != set(params):
        missing, extra = sorted(set(params) - set(grads)), sorted(set(grads) - set(params))
        raise ValueError(f"grads must have the params' keys; missing {missing[:5]}, unexpected {extra[:5]}")


def adamw_step(params, grads, state, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, decay=decays,
               update=adamw_update):
    """One AdamW step over every parameter, in place (see adamw_update), with weight decay only
    where decay(name, shape). `update` is the per-tensor update: adamw_update here, or the model's
    (model.layers.adamw_update: the AdamW kernel on the kernel path)."""
    check_grads(params, grads)
    state["step"] += 1
    for name, p in params.items():
        wd = weight_decay if decay(name, p.shape) else 0.0
        update(p, grads[name], state["m"][name], state["v"][name], lr, state["step"], betas, eps, wd)


def sum_of_squares(g):
    """Σ g² of one tensor, summed in float64 (a layer set's fast path may do it without the g² temporary)."""
    return (g * g).sum(dtype=np.float64)


def grad_norm(grads, squares=sum_of_squares):
    """Global L2 norm over every gradient, with one host sync: the per-tensor sums stay on the
    device (float64, so ~150 float32 partial sums add without loss) and only the total is read."""
    return math.sqrt(float(sum(squares(g) for g in grads.values())))


def clip_scale(norm, max_norm):
    """The factor that brings a global gradient norm down to max_norm: 1.0 when it is already at
    most max_norm (or max_norm is None)."""
    return max_norm / (norm + 1e-6) if max_norm is not None and norm > max_norm else 1.0


def clip_grad_norm(grads, max_norm, squares=sum_of_squares):
    """Scale all gradients in place so their global L2 norm is at most max_norm; returns the norm
    before clipping (worth logging: spikes show instability). squares: the per-tensor Σ g²."""
    norm = grad_norm(grads, squares)
    scale = clip_scale(norm, max_norm)
    if scale != 1.0:
        for g in grads.values():
            g *= scale
    return norm


# ----------------------------------------------------------------------------- the one step
@dataclass(frozen=True)
class Schedule:
    """The learning rate of each optimizer step: linear warm-up from lr/warmup_steps to lr over
    warmup_steps steps, then cosine decay from lr to min_lr at max_steps (flat at min_lr after).
    Schedule.constant(lr) is lr at every step (no warm-up, min_lr = lr).

    Warm-up: Adam's second-moment estimates are noise for the first steps, so full-size updates
    then can throw the model far off. Cosine: large steps early, fine ones at the end.
    """
    lr: float
    max_steps: int
    warmup_steps: int
    min_lr: float

    @classmethod
    def constant(cls, lr):
        return cls(lr, max_steps=1, warmup_steps=0, min_lr=lr)

    def __call__(self, step):
        """lr for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


class Step(NamedTuple):
    """What one optimizer step did: the loss it was given, the gradient norm before clipping (worth
    logging: spikes show instability), the learning rate, and whether the weights moved."""
    loss: float
    grad_norm: float
    lr: float
    stepped: bool


def clip_and_adamw(model, grads, state, lr, grad_clip, weight_decay, loss, fold_clip=False):
    """The reference of Layers.clip_and_adamw: clip_grad_norm (one host read of the norm), the guard,
    then adamw_step with the set's per-tensor update (model.layers.adamw_update, sum_of_squares).
    loss: a float, or a 0-d array not yet read. -> (loss, norm, stepped) as floats and a bool.
    fold_clip: instead of scaling the grads in place, hand clip_scale's factor to the set's update as
    its grad_scale, which reads g times it (cpu_layers: one pass over every gradient fewer; the grads
    dict is then left unscaled). The kernel set's (kernel_layers.clip_and_adamw) does all three on the
    device in two launches."""
    check_grads(model.params, grads)    # before the norm: a skipped (non-finite) step still refuses bad keys
    loss = float(loss)
    update = model.layers.adamw_update
    if fold_clip:
        norm = grad_norm(grads, model.layers.sum_of_squares)
        update = partial(update, grad_scale=clip_scale(norm, grad_clip))
    else:
        norm = clip_grad_norm(grads, grad_clip, model.layers.sum_of_squares)
    stepped = math.isfinite(loss) and math.isfinite(norm)
    if stepped:
        adamw_step(model.params, grads, state, lr, weight_decay=weight_decay, update=update)
    return loss, norm, stepped


def optimizer_step(model, grads, state, schedule, grad_clip=1.0, weight_decay=0.1, loss=0.0):
    """clip the global gradient norm to grad_clip (None: no clipping) -> AdamW at schedule(state's
    step) over model.params, through the model's layer set (model.layers.clip_and_adamw: on the
    kernel path one Σ g² kernel and one multi-tensor AdamW kernel, with one host read) -> Step.

    If the loss or the gradient norm is not finite the parameters and optimizer state are left
    untouched (one bad batch must not poison every weight); the caller sees Step.stepped and decides.
    model: anything with .params and .layers (a GPT, a RewardModel); loss: a float or a 0-d array."""
    lr = schedule(state["step"])
    loss, norm, stepped = model.layers.clip_and_adamw(model, grads, state, lr, grad_clip, weight_decay, loss)
    return Step(loss, norm, lr, stepped)


def train_step(model, opt_state, idx, targets, schedule, grad_clip=1.0, loss_mask=None, weight_decay=0.1,
               dropout=None):
    """One next-token step on a batch: loss_and_grads (with model.Dropout `dropout`, if any) ->
    optimizer_step (clip, AdamW at the schedule's rate; nothing moves if the loss or gradient norm
    is not finite) -> optim.Step. The loss stays on the device until optimizer_step reads it (with
    the norm, in one read on the kernel path). idx, targets: host arrays keep the model's checks of
    them off the device (on CuPy arrays each min/max check is a read back)."""
    loss, grads = model.device_loss_and_grads(idx, targets, loss_mask, dropout)
    return optimizer_step(model, grads, opt_state, schedule, grad_clip, weight_decay, loss)
