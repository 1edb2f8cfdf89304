"""Generation: the KV cache changes the cost, never the result; sampling follows temperature and
top-k; end-of-text stops a row; the context window slides when it fills."""
import os

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.generate import generate, generate_steps, sample_next

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf_tiny")


def tiny_model(n_ctx=16, vocab_size=23, dtype="float32", seed=0):
    config = GPTConfig(vocab_size=vocab_size, n_ctx=n_ctx, n_layer=2, n_head=2, d_model=16, dtype=dtype)
    model = GPT(config, seed=seed)
    rng = np.random.default_rng(seed)
    for p in model.params.values():       # sharper logits than the fresh init: greedy ties can't hide bugs
        p += rng.normal(size=p.shape).astype(p.dtype) * 0.3
    return model


def steps(model, prompt, n, **kw):
    out = list(generate_steps(model, prompt, n, **kw))
    return np.stack([t for t, _ in out], 1), np.stack([lg for _, lg in out], 1)


@pytest.mark.parametrize("n_ctx, n_new", [(32, 20), (8, 25)])     # the second slides the window 5 times
def test_greedy_with_and_without_cache_agree(n_ctx, n_new):
    model = tiny_model(n_ctx=n_ctx)
    prompt = np.random.default_rng(1).integers(0, 23, size=(3, 5))
    tokens_c, logits_c = steps(model, prompt, n_new, temperature=0, use_cache=True)
    tokens_f, logits_f = steps(model, prompt, n_new, temperature=0, use_cache=False)
    np.testing.assert_array_equal(tokens_c, tokens_f)
    np.testing.assert_allclose(logits_c, logits_f, atol=1e-5, rtol=0)
    assert tokens_c.shape == (3, n_new)
    out = generate(model, prompt, n_new, temperature=0)
    np.testing.assert_array_equal(out, np.concatenate([prompt, tokens_c], 1))


def test_greedy_picks_the_full_forward_argmax():
    """Independent of generate's bookkeeping: each greedy token is argmax of a plain forward."""
    model = tiny_model(n_ctx=32)
    prompt = np.array([[1, 2, 3]])
    out = generate(model, prompt, 6, temperature=0)
    for t in range(3, 9):
        assert out[0, t] == model.forward(out[:, :t])[0, -1].argmax()


def test_sampling_with_a_seed_is_reproducible_and_cache_independent():
    model = tiny_model()
    prompt = np.zeros((2, 3), dtype=np.int64)
    a = generate(model, prompt, 10, temperature=1.0, top_k=5, rng=7)
    b = generate(model, prompt, 10, temperature=1.0, top_k=5, rng=np.random.default_rng(7), use_cache=False)
    np.testing.assert_array_equal(a, b)


def test_sample_next_frequencies_follow_softmax_and_top_k():
    logits = np.repeat(np.log([[0.5, 0.3, 0.15, 0.05]]), 20000, axis=0)     # 20000 independent rows
    rng = np.random.default_rng(0)

    def frequencies(temperature, top_k):
        return np.bincount(sample_next(logits, temperature, top_k, rng), minlength=4) / 20000
    np.testing.assert_allclose(frequencies(1.0, None), [0.5, 0.3, 0.15, 0.05], atol=0.015)
    np.testing.assert_allclose(frequencies(1.0, 2), [0.625, 0.375, 0, 0], atol=0.015)
    p = np.sqrt([0.5, 0.3, 0.15, 0.05])                 # temperature 2 flattens: p ∝ sqrt(p)
    np.testing.assert_allclose(frequencies(2.0, None), p / p.sum(), atol=0.015)
    assert (frequencies(0, None) == [1, 0, 0, 0]).all()


def test_eot_stops_a_row_and_pads_it():
    model = tiny_model(vocab_size=5)
    prompt = np.zeros((8, 2), dtype=np.int64)
    out = generate(model, prompt, 30, temperature=1.0, rng=3, eot_id=4)
    gen = out[:, 2:]
    stopped = 0
    for row in gen:
        hits = np.flatnonzero(row == 4)
        if hits.size:
            stopped += 1
            assert (row[hits[0]:] == 4).all()
    assert stopped >= 1
    # the loop ends as soon as every row has stopped: the last column is not all eot twice
    if gen.shape[1] < 30:
        assert (gen[:, -1] == 4).all() and not (gen[:, -2] == 4).all()


def test_prompt_longer_than_n_ctx_is_refused():
    model = tiny_model(n_ctx=8)
    with pytest.raises(ValueError, match="prompt has T=9, more than n_ctx=8"):
        generate(model, np.zeros((1, 9), dtype=np.int64), 3)
    assert generate(model, np.zeros((1, 8), dtype=np.int64), 3).shape == (1, 11)


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be an integer in 1..vocab_size=23"),
    (dict(top_k=24), "top_k must be an integer in 1..vocab_size=23"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
])
def test_bad_sampling_arguments_are_refused(kw, message):
    model = tiny_model()
    kw = {"max_new_tokens": 3, **kw}
    with pytest.raises(ValueError, match=message):
        generate(model, np.zeros((1, 2), dtype=np.int64), **kw)


def test_generate_from_a_hugging_face_checkpoint():
    model = GPT.from_pretrained(FIXTURE, dtype="float64")
    prompt = np.array([[1, 2, 3, 4]])
    cached, _ = steps(model, prompt, 20, temperature=0)          # n_ctx 16: slides once
    full, _ = steps(model, prompt, 20, temperature=0, use_cache=False)
    np.testing.assert_array_equal(cached, full)
