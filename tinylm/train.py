"""Pretraining: next-token prediction with AdamW, warm-up + cosine learning rate and clipping.

lr_at and train_step are the pieces; `pretrain` is the loop built from them (see below).
"""
import math

from .optim import adamw_step, clip_grad_norm


def lr_at(step, max_steps, lr, warmup_steps, min_lr):
    """Learning rate for optimizer step `step` (0-based): linear warm-up from lr/warmup_steps to lr
    over warmup_steps steps, then cosine decay from lr to min_lr at max_steps.

    Warm-up: Adam's second-moment estimates are noise for the first steps, so full-size updates
    then can throw the model far off. Cosine: large steps early, fine ones at the end.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def train_step(model, opt_state, idx, targets, lr, grad_clip=1.0, loss_mask=None, weight_decay=0.1):
    """One optimizer step on a batch -> (loss, grad_norm before clipping).

    loss_and_grads -> clip the global gradient norm to grad_clip (None: no clipping) -> AdamW.
    If the loss or the gradient norm is not finite the parameters and optimizer state are left
    untouched (one bad batch must not poison every weight); the caller sees the value and decides.
    """
    loss, grads = model.loss_and_grads(idx, targets, loss_mask)
    norm = clip_grad_norm(grads, grad_clip)
    if math.isfinite(loss) and math.isfinite(norm):
        adamw_step(model.params, grads, opt_state, lr, weight_decay=weight_decay)
    return loss, norm
