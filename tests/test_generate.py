"""Generation: the KV cache changes the cost, never the result; sampling follows temperature, then
top-k, then top-p; end-of-text stops a row; the context window slides when it fills; streamed text
is whole characters and ends before a stop string."""
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tinylm import GPT, GPTConfig
from tinylm.core.generate import filter_logits, generate, generate_steps, sample_next, stream_text

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


class FixedU:
    """A stand-in rng whose uniform draws are all `u`: puts sample_next on its float edges."""
    def __init__(self, u):
        self.u = u

    def random(self, shape):
        return np.full(shape, self.u)


def test_sample_next_never_draws_a_zero_probability_id_at_the_edges_of_u():
    """u = 0 must skip ids that top-k removed (cdf 0 <= u; with `cdf < u` id 0 would be drawn), and
    u at the top of the range must stay inside the vocabulary (the np.minimum guard)."""
    logits = np.array([[-50.0, 3.0, 2.0, 1.0, 0.0]])       # id 0 falls outside top 3
    assert sample_next(logits, 1.0, 3, FixedU(0.0))[0] == 1
    assert sample_next(logits, 1.0, None, FixedU(1.0))[0] == 4
    assert sample_next(logits, 1.0, 3, FixedU(1.0))[0] == 4   # last id (zero p) only by the guard: in range


def test_sample_next_sums_the_cdf_in_float64_so_tiny_probabilities_keep_their_share():
    """float32 logits [0, -20]: p(1) = 2e-9 is below float32's resolution at cdf = 1, so a float32
    cdf would give id 1 an empty interval; u = 1 - 1e-10 falls inside it in float64."""
    logits = np.array([[0.0, -20.0]], dtype=np.float32)
    assert sample_next(logits, 1.0, None, FixedU(1 - 1e-10))[0] == 1
    assert sample_next(logits, 1.0, None, FixedU(1 - 1e-8))[0] == 0


def test_sample_next_top_k_keeps_the_k_largest_for_any_vocabulary_and_batch():
    """V = 5, k = 2 (kth from the top is not the kth from the bottom, as it is for V = 4), and one
    row at a time (top_k < B must not decide whether top-k applies)."""
    logits = np.repeat(np.log([[0.1, 0.4, 0.05, 0.25, 0.2]]), 20000, axis=0)
    freq = np.bincount(sample_next(logits, 1.0, 2, np.random.default_rng(1)), minlength=5) / 20000
    np.testing.assert_allclose(freq, [0, 0.4 / 0.65, 0, 0.25 / 0.65, 0], atol=0.015)
    for V, k in [(7, 2), (50, 3), (1000, 5)]:           # at V = 1000 partition leaves the tail unsorted
        row = np.random.default_rng(V).normal(size=(1, V)) * 0.1
        drawn = set(sample_next(np.repeat(row, 4000, 0), 1.0, k, np.random.default_rng(0)).tolist())
        assert drawn == set(np.argsort(row[0])[-k:].tolist()), (V, k)
    rng = np.random.default_rng(2)
    draws = [sample_next(logits[:1], 1.0, 1, rng)[0] for _ in range(200)]
    assert set(draws) == {1}


def test_sample_next_is_exact_for_huge_logits_and_rows_of_different_scale():
    """Subtracting each row's own max keeps exp finite (no overflow at 1000) and keeps a row with
    small logits from underflowing to all zeros beside a row with large ones."""
    base = np.log([0.5, 0.3, 0.15, 0.05])
    logits = np.concatenate([np.repeat([base + 1000.0], 10000, 0), np.repeat([base - 1000.0], 10000, 0)])
    ids = sample_next(logits, 1.0, None, np.random.default_rng(3))
    for half in (ids[:10000], ids[10000:]):
        np.testing.assert_allclose(np.bincount(half, minlength=4) / 10000, [0.5, 0.3, 0.15, 0.05], atol=0.02)


def test_default_temperature_is_1_and_the_default_path_uses_the_kv_cache():
    logits = np.repeat(np.log([[0.5, 0.3, 0.15, 0.05]]), 20000, axis=0)
    freq = np.bincount(sample_next(logits, rng=np.random.default_rng(0)), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    model = tiny_model()
    prompt = np.zeros((2, 3), dtype=np.int64)
    np.testing.assert_array_equal(generate(model, prompt, 8, rng=5),
                                  generate(model, prompt, 8, temperature=1.0, rng=5))
    np.testing.assert_array_equal(np.stack([t for t, _ in generate_steps(model, prompt, 8, rng=5)], 1),
                                  generate(model, prompt, 8, temperature=1.0, rng=5)[:, 3:])
    assert fed_lengths(model, prompt, 4)[1] == [3, 1, 1, 1]
    assert fed_lengths(model, prompt, 4, steps_only=True)[1] == [3, 1, 1, 1]


def fed_lengths(model, prompt, n, steps_only=False, **kw):
    """The tokens generate (or generate_steps) makes and every forward call's T: each step's work."""
    seen, forward = [], model.forward

    def spy(idx, kv_cache=None):
        seen.append(idx.shape[1])
        return forward(idx, kv_cache)
    model.forward = spy
    try:
        if steps_only:
            return [t for t, _ in generate_steps(model, prompt, n, temperature=0, **kw)], seen
        return generate(model, prompt, n, temperature=0, **kw), seen
    finally:
        del model.forward


def test_the_cache_feeds_one_token_per_step_and_no_cache_the_whole_window():
    model = tiny_model(n_ctx=32)
    prompt = np.zeros((1, 3), dtype=np.int64)
    assert fed_lengths(model, prompt, 4, use_cache=True)[1] == [3, 1, 1, 1]
    assert fed_lengths(model, prompt, 4, use_cache=False)[1] == [3, 4, 5, 6]


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_full_window_slides_to_the_newest_n_ctx_half(use_cache):
    """n_ctx 8, prompt 5: the model sees seq[start:] with start 0 until the sequence passes 8 tokens,
    then the newest 4 (start 5 at length 9), and again at length 14 (start 10) — listed by hand."""
    model = tiny_model(n_ctx=8)
    prompt = np.random.default_rng(4).integers(0, 23, size=(2, 5))
    out = list(generate_steps(model, prompt, 10, temperature=0, use_cache=use_cache))
    seq = np.concatenate([prompt] + [t[:, None] for t, _ in out], 1)
    for step, start in enumerate([0, 0, 0, 0, 5, 5, 5, 5, 5, 10]):
        expected = model.forward(seq[:, start:5 + step])[:, -1]
        np.testing.assert_allclose(out[step][1], expected, atol=1e-5, rtol=0, err_msg=f"step {step}")


def test_a_one_token_context_generates_from_the_last_token():
    model = tiny_model(n_ctx=1)
    out = generate(model, np.array([[3]]), 5, temperature=0)
    for t in range(1, 6):
        assert out[0, t] == model.forward(out[:, t - 1:t])[0, -1].argmax()


def test_generate_passes_top_k_on():
    """top_k = 1 at temperature 1 is greedy: only the argmax survives the cut."""
    model = tiny_model()
    prompt = np.random.default_rng(6).integers(0, 23, size=(4, 3))
    np.testing.assert_array_equal(generate(model, prompt, 8, temperature=1.0, top_k=1, rng=0),
                                  generate(model, prompt, 8, temperature=0))


@pytest.mark.parametrize("kw, message", [
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer in 1..vocab_size=23"),
    (dict(top_k=True), "top_k must be an integer in 1..vocab_size=23"),
])
def test_non_integer_counts_are_refused(kw, message):
    test_bad_sampling_arguments_are_refused(kw, message)


def test_the_edges_of_the_argument_ranges_are_accepted():
    """max_new_tokens 0 returns the prompt; top_k = vocab_size keeps everything (plain sampling)."""
    model = tiny_model()
    prompt = np.zeros((1, 2), dtype=np.int64)
    np.testing.assert_array_equal(generate(model, prompt, 0), prompt)
    np.testing.assert_array_equal(generate(model, prompt, 6, top_k=23, rng=1), generate(model, prompt, 6, rng=1))


# ----------------------------------------------------------------------------- top-p, the order, streaming
LOGITS = arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 12)),
                elements=st.floats(-6, 6, allow_nan=False).map(lambda x: round(x, 1)))


def kept_probs(filtered):
    """softmax over the ids a filter kept (0 for the removed ones)."""
    p = np.exp(filtered - filtered.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


@given(LOGITS, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_of_likeliest_ids_with_mass_at_least_p(logits, top_p):
    kept = np.isfinite(filter_logits(logits, 1.0, None, top_p))
    p = kept_probs(logits)
    for row_p, row_kept in zip(p, kept):
        assert row_kept.any()
        mass = row_p[row_kept].sum()
        assert mass >= top_p - 1e-12                                   # enough mass ...
        assert mass - row_p[row_kept].min() < top_p + 1e-12            # ... and one id fewer is not
        if not row_kept.all():                                         # the likeliest ids, none skipped
            assert row_p[row_kept].min() >= row_p[~row_kept].max()


@given(LOGITS, st.floats(0.1, 3.0), st.integers(1, 12), st.floats(0.01, 1.0))
def test_temperature_then_top_k_then_top_p(logits, temperature, top_k, top_p):
    """The combined filter is top-p applied to the top-k survivors of logits / temperature, with
    top-p's mass measured after top-k's renormalisation."""
    top_k = min(top_k, logits.shape[1])
    both = filter_logits(logits, temperature, top_k, top_p)
    after_k = filter_logits(logits, temperature, top_k, None)
    np.testing.assert_array_equal(both, filter_logits(after_k, 1.0, None, top_p))
    np.testing.assert_allclose(after_k[np.isfinite(after_k)], (logits / temperature)[np.isfinite(after_k)])
    assert (np.isfinite(both) <= np.isfinite(after_k)).all()
    assert (np.isfinite(after_k).sum(-1) >= top_k).all()


def test_top_p_order_matters_and_is_measured_after_top_k():
    """p = [0.4, 0.3, 0.2, 0.1], top-k 2 then top-p 0.5: renormalised [0.57, 0.43], so one id
    suffices; measured before top-k (0.4 < 0.5) it would take two."""
    logits = np.log([[0.4, 0.3, 0.2, 0.1]])
    assert np.isfinite(filter_logits(logits, 1.0, 2, 0.5)).sum() == 1
    assert np.isfinite(filter_logits(logits, 1.0, None, 0.5)).sum() == 2
    assert np.isfinite(filter_logits(logits, 1.0, None, 1.0)).all()


def test_sampling_follows_the_nucleus():
    logits = np.repeat(np.log([[0.5, 0.3, 0.15, 0.05]]), 20000, axis=0)
    freq = np.bincount(sample_next(logits, 1.0, None, np.random.default_rng(0), top_p=0.75), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)


@given(st.integers(0, 2 ** 16), st.integers(1, 23), st.floats(0.05, 1.0))
def test_temperature_0_is_greedy_whatever_top_k_and_top_p_and_equals_the_cache_free_argmax(seed, top_k, top_p):
    model = tiny_model(n_ctx=12)
    prompt = np.random.default_rng(seed).integers(0, 23, size=(2, 3))
    out = generate(model, prompt, 6, temperature=0, top_k=top_k, top_p=top_p, rng=seed)
    for t in range(3, 9):
        np.testing.assert_array_equal(out[:, t], model.forward(out[:, :t]).argmax(-1)[:, -1])


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5, float("nan")])
def test_top_p_outside_0_1_is_refused(top_p):
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\]"):
        generate(tiny_model(), np.zeros((1, 2), dtype=np.int64), 3, top_p=top_p)


TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=30)


def byte_chunks(data, cuts):
    cuts = sorted(set(c % (len(data) + 1) for c in cuts))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


@given(TEXT, st.lists(st.integers(0, 200), max_size=10))
def test_streamed_pieces_are_whole_characters_and_join_to_the_text(text, cuts):
    pieces = list(stream_text(byte_chunks(text.encode("utf-8"), cuts)))
    assert "".join(pieces) == text            # no piece ended inside a character (that would add U+FFFD)


@given(TEXT, st.text("ab\u00e9", min_size=1, max_size=3), st.lists(st.integers(0, 200), max_size=10))
def test_stop_ends_before_its_first_occurrence(text, stop, cuts):
    pieces = list(stream_text(byte_chunks(text.encode("utf-8"), cuts), stop))
    at = text.find(stop)
    assert "".join(pieces) == (text if at < 0 else text[:at])


def test_stream_yields_as_soon_as_a_character_is_whole_and_stops_pulling_at_stop():
    pulled = []

    def chunks():
        for c in [b"a", b"\xc3", b"\xa9", b"E", b"N", b"D", b"never"]:
            pulled.append(c)
            yield c
    stream = stream_text(chunks(), "END")
    assert next(stream) == "a" and pulled == [b"a"]               # printed before the next token exists
    assert next(stream) == "\u00e9" and pulled == [b"a", b"\xc3", b"\xa9"]   # half a character waits
    assert list(stream) == [] and pulled[-1] == b"D"              # "E", "N" held, then dropped with the stop
