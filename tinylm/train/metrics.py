"""Numbers read off a loss, and the loss a model reaches on held-out windows (the evaluation of
every pretraining run and of the scaling sweep). A leaf module: it imports nothing from tinylm, so
anything may use it."""
import math
from typing import NamedTuple

import numpy as np
from tqdm import tqdm


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


class TextLoss(NamedTuple):
    """The loss over a whole token sequence: nll_sum nats over n_tokens scored tokens (scored marks
    them, (N,) bool), windows `stride` tokens apart."""
    nll_sum: float
    n_tokens: int
    scored: np.ndarray
    stride: int

    @property
    def mean(self):
        return self.nll_sum / self.n_tokens


def sliding_window_loss(model, ids, stride=None, progress=False):
    """Score every token of ids (N,) but the first, each with as much context as n_ctx allows, as
    Hugging Face's perplexity guide does: windows of n_ctx tokens start every `stride` tokens
    (default n_ctx // 2), and each window scores only the tokens no earlier window scored, so a token
    sees at least n_ctx − stride tokens before it (all of them near the start). With stride = n_ctx
    the windows do not overlap and each window's first token is not scored (it has no context).
    Returns a TextLoss; its mean is the loss in nats per token, exp(mean) the perplexity."""
    n_ctx, ids = model.config.n_ctx, np.asarray(ids, dtype=np.int64).reshape(-1)
    stride = max(1, n_ctx // 2) if stride is None else stride
    if not 1 <= stride <= n_ctx:
        raise ValueError(f"stride must be in 1..n_ctx={n_ctx}, got {stride}")
    if len(ids) < 2:
        raise ValueError(f"the text is {len(ids)} token(s) long; scoring needs at least 2 (one to predict from)")
    scored = np.zeros(len(ids), dtype=bool)
    nll_sum, done = 0.0, 0                  # done: the tokens before it are scored or context-only
    starts = range(0, len(ids) - 1, stride)
    for begin in tqdm(starts, desc="eval", unit="window", disable=not progress, dynamic_ncols=True):
        end = min(begin + n_ctx, len(ids))
        targets = ids[begin + 1:end].copy()             # position t of the window predicts token begin+1+t
        targets[:max(done - begin - 1, 0)] = -1         # scored by an earlier window already
        nll, _ = model.token_nll(model.xp.asarray(ids[None, begin:end - 1]), model.xp.asarray(targets[None]))
        nll_sum += float(nll.sum())
        scored[begin + 1:end] |= targets >= 0
        done = end
        if end == len(ids):
            break
    return TextLoss(nll_sum, int(scored.sum()), scored, stride)
