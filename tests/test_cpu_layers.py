"""The fast CPU layer set (tinylm/core/cpu_layers.py) tied to the reference (layer_sets.REFERENCE, the pairs
of layers.py): each pair against its reference over shapes (ragged lengths included), float32 and
float64; the whole model, loss and every gradient, after a forward+backward and after 5 AdamW steps,
for both mixers; finite differences on the fast set; and a planted bug the tie must catch."""
import math
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm.core import cpu_layers, layers, optim
from tinylm.core.gradcheck import check_gradients
from tinylm.core.layer_sets import REFERENCE
from tinylm.core.model import GPT, GPTConfig, Placement

DTYPES = ["float32", "float64"]
# float64: the fused loops sum in another order than NumPy's pairwise sums, nothing more.
TOLERANCE = {"float32": 2e-5, "float64": 1e-12}


def assert_close(fast, reference, dtype, what="", scale=0.0):
    """Norm-wise relative agreement: ‖fast − reference‖ ≤ tol · max(‖reference‖, scale) (entries near 0
    don't blow it up). scale: the size of the terms a result is the difference of, where they cancel."""
    fast, reference = np.asarray(fast, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    assert fast.shape == reference.shape, (what, fast.shape, reference.shape)
    error = np.linalg.norm(fast - reference) / max(np.linalg.norm(reference), scale, 1e-30)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.2e} above {TOLERANCE[dtype]}"


def normal(rng, shape, dtype, scale=1.0):
    return (rng.normal(size=shape) * scale).astype(dtype)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 70), st.integers(1, 40))     # B, T (ragged), C
seeds = st.integers(0, 10**6)


@given(shape=shapes, seed=seeds, dtype=st.sampled_from(DTYPES))
def test_layernorm_pair_matches_reference(shape, seed, dtype):
    """dx is rstd·(dxhat − mean(dxhat) − xhat·mean(dxhat·xhat)): at C ≤ 2 its terms cancel exactly
    (dx = 0 up to eps), so it is compared relative to the size of those terms, ‖rstd·dxhat‖."""
    rng = np.random.default_rng(seed)
    x, dy = normal(rng, shape, dtype, 3.0) + 1.0, normal(rng, shape, dtype)
    w, b = normal(rng, shape[-1:], dtype), normal(rng, shape[-1:], dtype)
    y, cache = cpu_layers.layernorm_forward(x, w, b)
    y_ref, cache_ref = layers.layernorm_forward(x, w, b)
    assert y.dtype == x.dtype
    assert_close(y, y_ref, dtype, "y")
    terms = np.linalg.norm(dy * w * cache_ref.rstd)
    for name, g, g_ref in zip(("dx", "dweight", "dbias"), cpu_layers.layernorm_backward(dy, cache),
                              layers.layernorm_backward(dy, cache_ref)):
        assert g.dtype == x.dtype
        assert_close(g, g_ref, dtype, name, terms if name == "dx" else 0.0)


@given(shape=shapes, seed=seeds, dtype=st.sampled_from(DTYPES))
def test_gelu_pair_matches_reference(shape, seed, dtype):
    rng = np.random.default_rng(seed)
    x, dy = normal(rng, shape, dtype, 3.0), normal(rng, shape, dtype)
    y, cache = cpu_layers.gelu_forward(x)
    y_ref, cache_ref = layers.gelu_forward(x)
    assert y.dtype == x.dtype
    assert_close(y, y_ref, dtype, "y")
    assert_close(cpu_layers.gelu_backward(dy, cache), layers.gelu_backward(dy, cache_ref), dtype, "dx")


@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 40), hd=st.integers(1, 9), P=st.integers(0, 5),
       seed=seeds, dtype=st.sampled_from(DTYPES))
def test_attention_pair_matches_reference(B, H, T, hd, P, seed, dtype):
    """Forward with and without P cached positions (the KV cache's path), backward without."""
    rng = np.random.default_rng(seed)
    qkv, dout = normal(rng, (B, T, 3 * H * hd), dtype, 2.0), normal(rng, (B, T, H * hd), dtype)
    out, cache = cpu_layers.attention_forward(qkv, H)
    out_ref, cache_ref = layers.attention_forward(qkv, H)
    assert out.dtype == qkv.dtype
    assert_close(out, out_ref, dtype, "out")
    assert np.all(np.triu(cache.att, 1) == 0)                    # no weight on a future key
    dqkv = cpu_layers.attention_backward(dout, cache)
    assert dqkv.dtype == qkv.dtype
    assert_close(dqkv, layers.attention_backward(dout, cache_ref), dtype, "dqkv")
    past = (normal(rng, (B, H, P, hd), dtype), normal(rng, (B, H, P, hd), dtype))
    out, cache = cpu_layers.attention_forward(qkv, H, past)
    out_ref, cache_ref = layers.attention_forward(qkv, H, past)
    assert_close(out, out_ref, dtype, "out with past")
    assert_close(cache.k, cache_ref.k, dtype, "the next past")


def test_decoding_extends_the_kv_cache_in_place_and_a_branch_gets_a_copy():
    """Token by token, the fast attention equals the reference's; after the first extension no step
    allocates a (B, H, P, hd) array (tracemalloc); a step from an older state (a branch) leaves the
    newer state's keys intact."""
    import tracemalloc
    rng = np.random.default_rng(0)
    B, H, hd, steps = 2, 3, 4, 40
    qkvs = [normal(rng, (B, 1, 3 * H * hd), "float64") for _ in range(steps)]
    past = past_ref = (normal(rng, (B, H, 2, hd), "float64"), normal(rng, (B, H, 2, hd), "float64"))
    peaks = []
    for step, qkv in enumerate(qkvs):
        tracemalloc.start()
        out, cache = cpu_layers.attention_forward(qkv, H, past)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        out_ref, cache_ref = layers.attention_forward(qkv, H, past_ref)
        assert_close(out, out_ref, "float64", f"step {step}")
        if step == 20:
            branch = past                                        # an older state, kept
        past, past_ref = (cache.k, cache.v), (cache_ref.k, cache_ref.v)
    assert max(peaks[-8:]) < past[0].nbytes / 2                  # no copy of the keys per token
    kept = past[0].copy()
    cpu_layers.attention_forward(qkvs[0], H, branch)
    assert np.array_equal(past[0], kept)


@given(B=st.integers(1, 3), T=st.integers(1, 20), C=st.integers(1, 12), V=st.integers(1, 300),
       width=st.one_of(st.none(), st.integers(1, 40)), seed=seeds, dtype=st.sampled_from(DTYPES),
       scale=st.sampled_from([1.0, 30.0]), keep=st.booleans())
def test_lm_loss_pair_matches_reference_in_any_vocabulary_chunks(B, T, C, V, width, seed, dtype, scale, keep):
    """The fused head + cross-entropy, in one chunk or many (width columns each, the last ragged), with
    ignored positions (−1), large logits (scale 30) and signed per-position weights (RL's); the
    logits kept for the backward or recomputed there (keep_up_to 0); a second backward agrees."""
    rng = np.random.default_rng(seed)
    z, wte = normal(rng, (B, T, C), dtype, scale / np.sqrt(C)), normal(rng, (V, C), dtype)
    targets = rng.integers(-1, V, size=(B, T))                  # −1: ignored positions
    dnll = normal(rng, (B, T), dtype)
    nll, cache = cpu_layers.lm_loss_forward(z, wte, targets, width, None if keep else 0)
    assert (cache.kept is not None) == keep
    nll_ref, cache_ref = layers.lm_loss_forward(z, wte, targets)
    assert nll.dtype == z.dtype and nll.shape == targets.shape
    assert_close(nll, nll_ref, dtype, "nll")
    assert np.all(nll[targets < 0] == 0)
    dz, dwte = cpu_layers.lm_loss_backward(dnll, cache)
    dz_ref, dwte_ref = layers.lm_loss_backward(dnll, cache_ref)
    assert dz.dtype == dwte.dtype == z.dtype
    assert_close(dz, dz_ref, dtype, "dz")
    assert_close(dwte, dwte_ref, dtype, "dwte")
    assert np.all(dz[targets < 0] == 0)
    assert np.array_equal(cpu_layers.lm_loss_backward(dnll, cache)[1], dwte)


def test_lm_loss_never_holds_more_than_a_chunk_of_logits():
    """GPT-2's vocabulary, more logits than KEPT_LOGITS: the forward's and backward's largest temporary
    is one chunk (LOGIT_CHUNK logits), not B·T×V; the peak is read from NumPy's allocation tracing."""
    import tracemalloc
    rng = np.random.default_rng(0)
    N, C, V = 1024, 16, 50257
    z, wte = normal(rng, (1, N, C), "float32"), normal(rng, (V, C), "float32")
    targets = rng.integers(0, V, size=(1, N))
    tracemalloc.start()
    nll, cache = cpu_layers.lm_loss_forward(z, wte, targets)
    forward_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    dz, dwte = cpu_layers.lm_loss_backward(np.ones((1, N), np.float32), cache)
    backward_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    logits_bytes, chunk_bytes = N * V * 4, cpu_layers.LOGIT_CHUNK * 4
    assert len(cache.chunks) > 1 and cache.kept is None and N * V > cpu_layers.KEPT_LOGITS
    assert forward_peak < chunk_bytes * 1.5 < logits_bytes / 10
    assert backward_peak < wte.nbytes + chunk_bytes * 1.5            # dwte itself, plus one chunk


@given(N=st.integers(1, 12), C=st.integers(1, 40), n_ids=st.integers(1, 60), seed=seeds,
       dtype=st.sampled_from(DTYPES), into=st.booleans())
def test_embedding_backward_accumulates_repeated_ids_like_reference(N, C, n_ids, seed, dtype, into):
    """Repeated ids accumulate; with a dweight given (the head's dwte) the rows are added into it."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, N, size=(1, n_ids))                  # ids repeat when n_ids > N
    dout = normal(rng, (1, n_ids, C), dtype)
    dweight = normal(rng, (N, C), dtype) if into else None
    cache = layers.embedding_forward(ids, np.zeros((N, C), dtype))[1]
    want = layers.embedding_backward(dout, cache, dweight)
    got = cpu_layers.embedding_backward(dout, cache, None if dweight is None else dweight.copy())
    assert got.dtype == np.dtype(dtype)
    assert_close(got, want, dtype)


@given(shape=st.sampled_from([(1,), (7,), (5, 3), (33, 2)]), seed=seeds, dtype=st.sampled_from(DTYPES),
       weight_decay=st.sampled_from([0.0, 0.1]))
def test_adamw_update_matches_reference_over_steps(shape, seed, dtype, weight_decay):
    rng = np.random.default_rng(seed)
    fast = [normal(rng, shape, dtype), np.zeros(shape, dtype), np.zeros(shape, dtype)]     # p, m, v
    reference = [a.copy() for a in fast]
    for step in range(1, 6):
        g = normal(rng, shape, dtype)
        cpu_layers.adamw_update(fast[0], g, fast[1], fast[2], 1e-2, step, weight_decay=weight_decay)
        optim.adamw_update(reference[0], g, reference[1], reference[2], 1e-2, step, weight_decay=weight_decay)
    for name, a, a_ref in zip("pmv", fast, reference):
        assert a.dtype == np.dtype(dtype)
        assert_close(a, a_ref, dtype, name)


@given(shape=st.sampled_from([(1,), (7,), (5, 3), (300, 41)]), seed=seeds, dtype=st.sampled_from(DTYPES),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_sum_of_squares_matches_reference(shape, seed, dtype, scale):
    g = normal(np.random.default_rng(seed), shape, dtype, scale)
    got = cpu_layers.sum_of_squares(g)
    assert isinstance(got, float)                               # float64, not the gradient's dtype
    assert abs(got - optim.sum_of_squares(g)) <= 1e-12 * optim.sum_of_squares(g)
    exact = float((g.astype(np.float64) ** 2).sum())            # each g² rounds to float32 in both sets
    assert abs(got - exact) <= {"float32": 1e-6, "float64": 1e-12}[dtype] * exact


@pytest.fixture
def split_small(monkeypatch):
    """cpu_layers.split cuts passes into pieces of 4 elements dealt to 3 threads, as large ones are cut."""
    monkeypatch.setattr(cpu_layers, "PIECE", 4)
    monkeypatch.setattr(cpu_layers, "threads", lambda: 3)


def test_split_covers_every_index_once_in_order_across_threads(split_small):
    seen = []
    pieces = cpu_layers.split(lambda start, stop: seen.append((start, stop)) or (start, stop), 11)
    assert pieces == [(0, 4), (4, 8), (8, 11)] and sorted(seen) == pieces
    assert cpu_layers.split(lambda start, stop: (start, stop), 3) == [(0, 3)]
    assert cpu_layers.split(lambda start, stop: (start, stop), 0) == []


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_and_adamw_matches_clipping_then_the_reference_step_on_split_tensors(split_small, dtype):
    """The fast optimizer step, with its tensors split across threads, equals the reference's: clip
    the grads in place (norm 10× the limit), then AdamW; and its grads dict is left unscaled."""
    rng = np.random.default_rng(3)
    shapes = {"h.0.mlp.c_fc.weight": (5, 7), "h.0.mlp.c_fc.bias": (7,), "wte.weight": (4, 3), "x": (2,)}
    params = {k: normal(rng, s, dtype) for k, s in shapes.items()}
    models = [types.SimpleNamespace(params={k: p.copy() for k, p in params.items()}, layers=layers)
              for layers in (cpu_layers.LAYERS, REFERENCE)]
    states = [optim.adamw_init(m.params) for m in models]
    for step in range(3):
        grads = {k: normal(rng, s, dtype) for k, s in shapes.items()}
        limit = 0.1 * optim.grad_norm(grads)
        given = {k: g.copy() for k, g in grads.items()}
        results = [m.layers.clip_and_adamw(m, g, st, 1e-2, limit, 0.1, 2.5)
                   for m, g, st in zip(models, (given, {k: g.copy() for k, g in grads.items()}), states)]
        assert results[0][0] == results[1][0] == 2.5 and results[0][2] and results[1][2]
        assert abs(results[0][1] - results[1][1]) <= 1e-12 * results[1][1]
        assert all(np.array_equal(given[k], grads[k]) for k in grads)        # not scaled in place
        for name in shapes:
            for a, b, what in ((models[0].params, models[1].params, "p"), (states[0]["m"], states[1]["m"], "m"),
                               (states[0]["v"], states[1]["v"], "v")):
                assert_close(a[name], b[name], dtype, f"{what} {name} step {step}")
    assert states[0]["step"] == states[1]["step"] == 3


def test_clip_and_adamw_leaves_everything_as_it_was_on_a_non_finite_norm():
    params = {"w": np.ones((3, 3), np.float32)}
    model = types.SimpleNamespace(params={"w": params["w"].copy()}, layers=cpu_layers.LAYERS)
    state = optim.adamw_init(model.params)
    grads = {"w": np.full((3, 3), np.inf, np.float32)}
    assert cpu_layers.clip_and_adamw(model, grads, state, 1e-2, 1.0, 0.1, 1.0)[2] is False
    assert np.array_equal(model.params["w"], params["w"]) and state["step"] == 0 and not state["m"]["w"].any()


@pytest.mark.parametrize("layers", [cpu_layers.LAYERS, REFERENCE], ids=["fast", "reference"])
@pytest.mark.parametrize("loss", [1.0, math.nan])
def test_clip_and_adamw_refuses_grads_with_other_keys_before_touching_anything(layers, loss):
    """A grads dict missing a parameter (and holding a stray one) is an error naming both, on a step
    that would run and on one the non-finite loss would skip; params, grads and state stay as they were."""
    model = types.SimpleNamespace(params={"w": np.ones((3, 3)), "b": np.ones(3)}, layers=layers)
    state = optim.adamw_init(model.params)
    grads = {"w": np.full((3, 3), 50.0), "stray": np.ones(2)}
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \['stray'\]"):
        layers.clip_and_adamw(model, grads, state, 1e-2, 1.0, 0.1, loss)
    assert (model.params["w"] == 1).all() and (grads["w"] == 50).all() and state["step"] == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_of_squares_in_pieces_matches_reference_and_not_the_thread_count(split_small, monkeypatch, dtype):
    g = normal(np.random.default_rng(4), (9, 13), dtype)
    three = cpu_layers.sum_of_squares(g)
    assert abs(three - optim.sum_of_squares(g)) <= 1e-12 * optim.sum_of_squares(g)
    monkeypatch.setattr(cpu_layers, "threads", lambda: 1)
    assert cpu_layers.sum_of_squares(g) == three          # bitwise: the same pieces, on one thread


def test_adamw_update_refuses_a_strided_tensor_it_could_not_update_in_place():
    p = np.zeros((4, 4))[:, ::2]
    with pytest.raises(ValueError, match="^adamw_update updates p in place and needs it C-contiguous$"):
        cpu_layers.adamw_update(p, p, p.copy(), p.copy(), 1e-3, 1)


def test_fast_set_names_only_what_it_provides_the_rest_is_the_reference():
    provided = {f for f in REFERENCE._fields if getattr(cpu_layers.LAYERS, f) is not getattr(REFERENCE, f)}
    assert provided == {"embedding_backward", "lm_loss_forward", "lm_loss_backward", "layernorm_forward",
                        "layernorm_backward", "gelu_forward", "gelu_backward", "attention_forward",
                        "attention_backward", "adamw_update", "sum_of_squares", "clip_and_adamw", "block_decode"}
    assert all(getattr(cpu_layers.LAYERS, f).__module__ == "tinylm.core.cpu_layers" for f in provided)


# ----------------------------------------------------------------------------- whole model
CONFIGS = {
    "attention": dict(vocab_size=37, n_ctx=24, d_model=24, n_layer=2, n_head=3),
    "ssm": dict(vocab_size=37, n_ctx=24, d_model=16, n_layer=2, n_head=2, mixer="ssm", d_state=4),
}


def model_pair(mixer, dtype, seed=0):
    config = GPTConfig(**CONFIGS[mixer], dtype=dtype)
    return GPT(config, seed=seed), GPT(config, seed=seed, reference=True)


def ragged_batch(config, rng):
    """Rows of different lengths: targets −1 after each row's end, as pack() pads them."""
    idx = rng.integers(0, config.vocab_size, size=(3, 19))
    targets = rng.integers(0, config.vocab_size, size=idx.shape)
    lengths = np.array([19, 11, 4])
    targets[np.arange(19)[None] >= lengths[:, None]] = -1
    return idx, targets


def assert_models_agree(fast, reference, idx, targets, loss_tol=1e-5, grad_tol=1e-4):
    """Loss within loss_tol and every gradient within grad_tol (norm-wise, per tensor), relative.
    Returns both models' grads."""
    loss, grads = fast.loss_and_grads(idx, targets)
    loss_ref, grads_ref = reference.loss_and_grads(idx, targets)
    assert abs(loss - loss_ref) <= loss_tol * abs(loss_ref), (loss, loss_ref)
    errors = {k: np.linalg.norm(grads[k] - g) / max(np.linalg.norm(g), 1e-30) for k, g in grads_ref.items()}
    bad = {k: e for k, e in errors.items() if not e <= grad_tol}
    assert set(grads) == set(grads_ref) and not bad, f"gradients differ: {bad}"
    return grads, grads_ref


@pytest.mark.parametrize("mixer", ["attention", "ssm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_model_matches_reference_before_and_after_five_adamw_steps(mixer, dtype):
    fast, reference = model_pair(mixer, dtype)
    assert fast.layers is cpu_layers.LAYERS and reference.layers is REFERENCE
    rng = np.random.default_rng(1)
    idx, targets = ragged_batch(fast.config, rng)
    tol = {"float32": (1e-5, 1e-4), "float64": (1e-12, 1e-10)}[dtype]
    states = {m: optim.adamw_init(m.params) for m in (fast, reference)}
    for _ in range(5):
        grads, grads_ref = assert_models_agree(fast, reference, idx, targets, *tol)
        optim.optimizer_step(fast, grads, states[fast], optim.Schedule.constant(1e-2))
        optim.optimizer_step(reference, grads_ref, states[reference], optim.Schedule.constant(1e-2))
    assert_models_agree(fast, reference, idx, targets, *tol)
    assert not np.array_equal(fast.params["wte.weight"], GPT(fast.config).params["wte.weight"])  # it trained


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_decode_matches_the_reference_token_by_token(dtype):
    """Greedy generation with the KV cache on the fast set (cpu_layers.block_decode, one call per block
    and token) gives the reference's tokens and logits, over enough tokens that the KV buffers grow
    twice, for a batch of prompts; the fused step is what runs, and a decode from an older cache state
    (a branch) gets the reference's logits too."""
    from tinylm.core.generate import generate_steps
    config = GPTConfig(vocab_size=37, n_ctx=48, d_model=24, n_layer=2, n_head=3, dtype=dtype)
    fast, reference = GPT(config, seed=2), GPT(config, seed=2, reference=True)
    rng = np.random.default_rng(2)
    for p in fast.params.values():          # away from the init, so the logits are not all alike
        p += rng.normal(size=p.shape).astype(dtype) * 0.2
    reference.params = {k: v.copy() for k, v in fast.params.items()}
    prompt = rng.integers(0, 37, size=(2, 3))
    calls = []
    fast.layers = fast.layers._replace(block_decode=lambda *a: calls.append(1) or cpu_layers.block_decode(*a))
    steps = list(generate_steps(fast, prompt, 40, temperature=0))
    steps_ref = list(generate_steps(reference, prompt, 40, temperature=0))
    assert len(calls) == 39 * config.n_layer                  # every token after the prompt's
    for (tokens, logits), (tokens_ref, logits_ref) in zip(steps, steps_ref):
        np.testing.assert_array_equal(tokens, tokens_ref)
        assert_close(logits, logits_ref, dtype, "logits")
    cache, cache_ref = fast.new_kv_cache(), reference.new_kv_cache()
    fast.forward(prompt, cache), reference.forward(prompt, cache_ref)
    for t in range(5):
        fast.forward(prompt[:, :1], cache), reference.forward(prompt[:, :1], cache_ref)
        if t == 1:
            older = (list(cache.layers), cache.length)
    branch = fast.new_kv_cache()
    branch.layers, branch.length = older
    branch_ref = reference.new_kv_cache()
    branch_ref.layers, branch_ref.length = [tuple(a[:, :, :older[1]] for a in s) for s in cache_ref.layers], older[1]
    newest = [s[0].copy() for s in cache.layers]
    assert_close(fast.forward(prompt[:, 1:2], branch), reference.forward(prompt[:, 1:2], branch_ref), dtype, "branch")
    assert all(np.array_equal(s[0], k) for s, k in zip(cache.layers, newest))   # the newer state intact


def test_fast_model_gradients_match_finite_differences():
    """The FD checker on the fast set (tests/test_model.py's FD tests run it too: GPT's default)."""
    fast, _ = model_pair("attention", "float64", seed=3)
    rng = np.random.default_rng(3)
    for p in fast.params.values():
        p += rng.normal(size=p.shape) * (0.3 if p.ndim == 2 else 0.5)
    idx, targets = ragged_batch(fast.config, rng)
    grads = fast.loss_and_grads(idx, targets)[1]
    errors = check_gradients(lambda: fast.loss(idx, targets), fast.params, grads, max_entries=5)
    assert max(errors.values()) <= 1e-6, errors


def test_the_tie_catches_a_planted_bug_in_a_fast_layer():
    """A fast layernorm backward that forgets the gradient through the variance (the
    −xhat·mean(dxhat·xhat) term): small at init, but the whole-model tie must still fail."""
    def forgets_variance(dy, cache):
        dx, dweight, dbias = cpu_layers.layernorm_backward(dy, cache)
        x, mean, rstd, weight = cache
        xhat = (x - mean[:, None]) * rstd[:, None]
        dxhat = cpu_layers.rows(dy) * weight
        dx = dx + (xhat * (dxhat * xhat).mean(-1, keepdims=True) * rstd[:, None]).reshape(dx.shape)
        return dx, dweight, dbias
    fast, reference = model_pair("attention", "float64")
    idx, targets = ragged_batch(fast.config, np.random.default_rng(1))
    assert_models_agree(fast, reference, idx, targets)
    fast.layers = fast.layers._replace(layernorm_backward=forgets_variance)
    with pytest.raises(AssertionError, match="gradients differ"):
        assert_models_agree(fast, reference, idx, targets)


# ----------------------------------------------------------------------------- the CLI and resuming
def test_reference_flag_reaches_the_model_through_pretrain_and_sample(tmp_path):
    """`--reference` builds layers.py's set; without it the CLI runs the fast set."""
    from tinylm.train import loop as train
    from tinylm.cli import build_parser
    for command in (["pretrain"], ["sample", str(tmp_path)]):
        assert build_parser().parse_args(command + ["--reference"]).reference is True
        assert build_parser().parse_args(command).reference is False
    assert train.new_run(tmp_path / "a", train.starting_point(train.TrainConfig(), {}), Placement(reference=True)).model.layers is REFERENCE
    assert train.new_run(tmp_path / "b", train.starting_point(train.TrainConfig(), {})).model.layers is cpu_layers.LAYERS


def test_a_copy_keeps_the_placement_and_the_layer_set():
    """Placement travels as one: GPT's three arguments, the model's .placement, its copies."""
    model = GPT(GPTConfig(vocab_size=11, n_ctx=8, n_layer=1, n_head=2, d_model=8), reference=True)
    assert model.placement == Placement("cpu", False, True)
    assert model.copy().placement == model.placement and model.copy().layers is REFERENCE
    assert GPT(model.config, **Placement()._asdict()).layers is cpu_layers.LAYERS


def test_a_run_resumes_bit_for_bit_within_a_set_and_may_switch_sets(tmp_path):
    """6 steps straight = 3 + 3 resumed on the same set, weight for weight; resumed on the other set
    instead, the run continues from the same checkpoint to weights within rounding of the straight
    run's (and not identical: the other set did run)."""
    from tinylm.train.checkpoint import load_model
    from tinylm.train.loop import pretrain
    from test_pretrain import TINY
    data = tmp_path / "data.txt"
    data.write_text(" ".join(np.random.default_rng(0).choice("the quick brown fox jumps".split(), 600)))
    settings = {**TINY, "data": str(data), "max_steps": 6, "checkpoint_every": 3}

    def final_weights(name, resume_reference=None):
        out = str(tmp_path / name)
        if resume_reference is None:
            pretrain(out, settings, progress=False)
        else:
            pretrain(out, settings, stop_at=3, progress=False)
            pretrain(out, {}, resume=True, progress=False, placement=Placement(reference=resume_reference))
        return load_model(out)[0].params
    straight = final_weights("straight")
    assert all(np.array_equal(p, straight[k]) for k, p in final_weights("same set", False).items())
    switched = final_weights("switched", resume_reference=True)
    differences = [float(np.abs(p - straight[k]).max()) for k, p in switched.items()]
    assert 0 < max(differences) <= 1e-5
