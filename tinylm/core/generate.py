"""Sampling text from a model, one token at a time.

Each step turns the last position's logits into a distribution (temperature, top-k, top-p), draws the
next token, appends it and repeats. Without a cache every step reruns the model over the whole
sequence: step t costs O(t) positions, each attending to t keys, O(t²) in all. With the KV cache
(model.new_kv_cache) the keys and values of earlier positions are kept, so a step feeds only the
one new token, which attends to the t cached keys: O(t).

Context limits: a prompt longer than n_ctx is refused (ValueError): cropping it would silently
change what the model is asked. When prompt + generated tokens fill n_ctx, the oldest tokens
slide out of view: generation continues from the last n_ctx // 2 tokens (the cache is rebuilt
from them once, so each token still costs O(T) on average). The returned array holds every token.
"""
import codecs
import itertools

import numpy as np

from .backend import to_numpy


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """The distribution a draw is made from, in the usual order: temperature -> top-k -> top-p.

    logits (B, V) -> logits / temperature (float64) with the removed ids at -inf. top_k keeps the
    k largest; top_p (nucleus) then keeps the smallest set of likeliest ids whose probability,
    renormalised after top-k, sums to >= top_p (at least one id: the likeliest).
    """
    logits = np.asarray(logits, dtype=np.float64) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = np.partition(logits, -top_k, axis=-1)[:, -top_k, None]
        logits = np.where(logits < kth_largest, -np.inf, logits)   # exp(-inf) = 0: never drawn
    if top_p is not None and top_p < 1:
        order = np.argsort(-logits, axis=-1, kind="stable")
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        sorted_probs = np.take_along_axis(probs, order, -1)
        sorted_probs /= sorted_probs.sum(-1, keepdims=True)
        # An id stays if the ids before it hold less than top_p: the first id always stays, and
        # the id that first reaches top_p is the last one kept.
        mass_before = np.cumsum(sorted_probs, -1) - sorted_probs
        drop = np.zeros(logits.shape, dtype=bool)
        np.put_along_axis(drop, order, mass_before >= top_p, -1)
        logits = np.where(drop, -np.inf, logits)
    return logits


def sample_next(logits, temperature=1.0, top_k=None, rng=None, top_p=None):
    """One token id per row from logits (B, V).

    temperature 0: argmax (greedy). Otherwise p = softmax(filter_logits(...)) (temperature, top-k,
    top-p), and the id is the first whose cumulative probability exceeds u ~ U(0, 1) (inverse-CDF
    sampling).
    """
    if temperature == 0:
        return np.asarray(logits).argmax(-1)
    logits = filter_logits(logits, temperature, top_k, top_p)
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    cdf = np.cumsum(probs, -1)
    u = rng.random((logits.shape[0], 1)) * cdf[:, -1:]      # scaling u instead of cdf normalises p
    # First id with cdf > u; the min guards the float edge u == cdf[-1].
    return np.minimum((cdf <= u).sum(-1), logits.shape[-1] - 1)


def check_sampling_args(max_new_tokens, temperature, top_k, vocab_size, top_p=None):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or not 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be an integer in 1..vocab_size={vocab_size} or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:      # also refuses NaN
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


def generate_steps(model, prompt, max_new_tokens, temperature=1.0, top_k=None, rng=None, eot_id=None,
                   use_cache=True, top_p=None):
    """Yield (tokens (B,), logits (B, V)) for each new position; see `generate`. Rows that have
    emitted eot_id yield eot_id from then on; the loop stops once every row has."""
    n_ctx = model.config.n_ctx
    check_sampling_args(max_new_tokens, temperature, top_k, model.config.vocab_size, top_p)
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
        tokens = sample_next(logits, temperature, top_k, rng, top_p)
        if eot_id is not None:
            tokens[done] = eot_id
            done |= tokens == eot_id
        seq = np.concatenate([seq, tokens[:, None]], axis=1)
        yield tokens, logits
        if done.all():
            return


def generate(model, prompt, max_new_tokens, temperature=1.0, top_k=None, rng=None, eot_id=None, use_cache=True,
             top_p=None):
    """Continue each row of `prompt` (B, T0) ints -> (B, T0 + n) ints, n <= max_new_tokens.

    temperature 0 is greedy; top_k keeps only the k most likely ids, top_p then the smallest set
    holding probability >= top_p (filter_logits); rng is a np.random.Generator
    or an int seed. A row that emits eot_id stops and is padded with eot_id; generation ends when
    every row has stopped or after max_new_tokens. use_cache=False recomputes the whole sequence
    each step (the O(T²) baseline; same tokens). See the module docstring for the n_ctx rules.
    """
    prompt = np.asarray(prompt)
    columns = [tokens for tokens, _ in generate_steps(model, prompt, max_new_tokens, temperature, top_k,
                                                      rng, eot_id, use_cache, top_p)]
    return np.concatenate([prompt.astype(np.int64)] + [c[:, None] for c in columns], axis=1)


def stream_text(chunks, stop=None):
    """Text as it is generated: `chunks` is one bytes object per step (tokenizer.token_bytes of the
    new tokens); yields str pieces of whole UTF-8 characters only (a character split across tokens
    waits for its last byte) and ends just before the first occurrence of `stop`, which is not
    yielded. A tail that could still begin `stop` is held back until it cannot."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    for chunk in itertools.chain(chunks, [None]):       # None marks the end: flush the decoder
        pending += decoder.decode(b"" if chunk is None else chunk, final=chunk is None)
        at = pending.find(stop) if stop else -1
        if at >= 0:
            if at:
                yield pending[:at]
            return
        # Hold back the longest tail that begins `stop`: the next token may complete it.
        held = 0 if chunk is None or not stop else max(
            (n for n in range(1, len(stop)) if pending.endswith(stop[:n])), default=0)
        if len(pending) > held:
            yield pending[:len(pending) - held]
            pending = pending[len(pending) - held:]
