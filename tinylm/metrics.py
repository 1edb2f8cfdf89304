"""Numbers read off a loss, and the loss a model reaches on held-out windows (the evaluation of
every pretraining run and of the scaling sweep). A leaf module: it imports nothing from tinylm, so
anything may use it."""
import math

import numpy as np


def perplexity(loss):
    """exp(loss): the mean cross-entropy in nats turned back into "how many equally likely choices".

    A model that spreads its probability evenly over k tokens has loss ln k and perplexity k, so a
    byte-level model starts near 256 and a perfect one reaches 1. loss: a float (nats per token);
    an overflowing loss (> ~709 nats) gives inf.
    """
    return math.exp(loss) if loss < 709.0 else math.inf


def loss_text(loss):
    """A loss as the CLI prints it, with its perplexity beside it: "3.1967 (perplexity 24.45)"."""
    return f"{loss:.4f} (perplexity {perplexity(loss):.2f})"


def estimate_loss(model, dataset, split, batch_size, n_batches, seed=1234):
    """Mean loss over n_batches fixed windows (the same ones at every evaluation, so the curve
    is comparable from one evaluation to the next, and training's data order is untouched)."""
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(n_batches):
        idx, targets = dataset.get_batch(split, batch_size, rng)
        losses.append(model.loss(model.xp.asarray(idx), model.xp.asarray(targets)))
    return float(np.mean(losses))
