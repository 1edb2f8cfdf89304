"""Sampling text from a model, one token at a time.

Each step turns the last position's logits into a distribution (temperature, top-k), draws the
next token, appends it and repeats. Without a cache every step reruns the model over the whole
sequence: step t costs O(t) positions, each attending to t keys, O(t²) in all. With the KV cache
(model.new_kv_cache) the keys and values of earlier positions are kept, so a step feeds only the
one new token, which attends to the t cached keys: O(t).

Context limits: a prompt longer than n_ctx is refused (ValueError): cropping it would silently
change what the model is asked. When prompt + generated tokens fill n_ctx, the oldest tokens
slide out of view: generation continues from the last n_ctx // 2 tokens (the cache is rebuilt
from them once, so each token still costs O(T) on average). The returned array holds every token.
"""
import numpy as np

from .backend import to_numpy


def sample_next(logits, temperature=1.0, top_k=None, rng=None):
    """One token id per row from logits (B, V).

    temperature 0: argmax (greedy). Otherwise p = softmax(logits / temperature) restricted to the
    top_k largest logits, and the id is the first whose cumulative probability exceeds u ~ U(0, 1)
    (inverse-CDF sampling).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = np.partition(logits, -top_k, axis=-1)[:, -top_k, None]
        logits = np.where(logits < kth_largest, -np.inf, logits)   # exp(-inf) = 0: never drawn
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    cdf = np.cumsum(probs, -1)
    u = rng.random((logits.shape[0], 1)) * cdf[:, -1:]      # scaling u instead of cdf normalises p
    # First id with cdf > u; the min guards the float edge u == cdf[-1].
    return np.minimum((cdf <= u).sum(-1), logits.shape[-1] - 1)


def check_sampling_args(max_new_tokens, temperature, top_k, vocab_size):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or not 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be an integer in 1..vocab_size={vocab_size} or None, got {top_k!r}")


def generate_steps(model, prompt, max_new_tokens, temperature=1.0, top_k=None, rng=None, eot_id=None,
                   use_cache=True):
    """Yield (tokens (B,), logits (B, V)) for each new position; see `generate`. Rows that have
    emitted eot_id yield eot_id from then on; the loop stops once every row has."""
    n_ctx = model.config.n_ctx
    check_sampling_args(max_new_tokens, temperature, top_k, model.config.vocab_size)
    prompt = np.asarray(prompt)
    model.check_idx(prompt, name="prompt")             # also refuses a prompt longer than n_ctx
    rng = np.random.default_rng(rng)
    seq = prompt.astype(np.int64)
    start, cache = 0, None                              # the model sees seq[:, start:]
    done = np.zeros(len(seq), dtype=bool)
    for _ in range(max_new_tokens):
        if seq.shape[1] - start > n_ctx:                # full: keep the newest half in view
            start, cache = seq.shape[1] - max(1, n_ctx // 2), None
        if not use_cache:
            logits = model.forward(model.xp.asarray(seq[:, start:]))
        elif cache is None:
            cache = model.new_kv_cache()
            logits = model.forward(model.xp.asarray(seq[:, start:]), cache)
        else:
            logits = model.forward(model.xp.asarray(seq[:, -1:]), cache)
        logits = to_numpy(logits[:, -1])
        tokens = sample_next(logits, temperature, top_k, rng)
        if eot_id is not None:
            tokens[done] = eot_id
            done |= tokens == eot_id
        seq = np.concatenate([seq, tokens[:, None]], axis=1)
        yield tokens, logits
        if done.all():
            return


def generate(model, prompt, max_new_tokens, temperature=1.0, top_k=None, rng=None, eot_id=None, use_cache=True):
    """Continue each row of `prompt` (B, T0) ints -> (B, T0 + n) ints, n <= max_new_tokens.

    temperature 0 is greedy; top_k keeps only the k most likely ids; rng is a np.random.Generator
    or an int seed. A row that emits eot_id stops and is padded with eot_id; generation ends when
    every row has stopped or after max_new_tokens. use_cache=False recomputes the whole sequence
    each step (the O(T²) baseline; same tokens). See the module docstring for the n_ctx rules.
    """
    prompt = np.asarray(prompt)
    columns = [tokens for tokens, _ in generate_steps(model, prompt, max_new_tokens, temperature, top_k,
                                                      rng, eot_id, use_cache)]
    return np.concatenate([prompt.astype(np.int64)] + [c[:, None] for c in columns], axis=1)
