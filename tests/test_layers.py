"""Every layer's hand-written backward against central differences (float64), as hypothesis
properties over shapes and values, plus proof that the checker catches a wrong backward."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm.core.gradcheck import check_gradients
from tinylm.core.layers import (attention_backward, attention_forward, causal_mask, cross_entropy_backward,
                           cross_entropy_forward, embedding_backward, embedding_forward, gelu_backward,
                           gelu_forward, layernorm_backward, layernorm_forward, linear_backward,
                           linear_forward, reward_head_backward, reward_head_forward)

TOL = 1e-6
seeds = st.integers(0, 2**31 - 1)
scales = st.sampled_from([1.0, 0.01, 30.0])       # small, unit and large-magnitude activations


def project(out, rng):
    """Reduce an output to a scalar loss sum(out · G) with a fixed random G, so dloss/dout = G."""
    G = rng.normal(size=np.shape(out))
    return G, lambda y: float((y * G).sum())


def assert_close(errors):
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert not bad, f"relative gradient error above {TOL}: {bad}"


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 6), V=st.integers(1, 8), C=st.integers(1, 5))
def test_embedding_backward_matches_finite_differences(seed, B, T, V, C):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(B, T))          # small V: repeated ids are the norm
    W = rng.normal(size=(V, C))
    G, loss = project(embedding_forward(ids, W)[0], rng)
    dW = embedding_backward(G, embedding_forward(ids, W)[1])
    assert_close(check_gradients(lambda: loss(embedding_forward(ids, W)[0]), {"W": W}, {"W": dW}))


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 5), C=st.integers(3, 8), scale=scales)
def test_layernorm_backward_matches_finite_differences(seed, B, T, C, scale):
    # (C = 2 is degenerate: xhat is ±1 whatever x is, so dx ≈ 0 and a relative error means nothing)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, C)) * scale + rng.normal() * scale
    w, b = rng.normal(size=C), rng.normal(size=C)
    y, cache = layernorm_forward(x, w, b)
    G, loss = project(y, rng)
    dx, dw, db = layernorm_backward(G, cache)
    f = lambda: loss(layernorm_forward(x, w, b)[0])
    assert_close(check_gradients(f, {"x": x, "w": w, "b": b}, {"x": dx, "w": dw, "b": db}))


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 5), I=st.integers(1, 6), O=st.integers(1, 6),
       bias=st.booleans(), scale=scales)
def test_linear_backward_matches_finite_differences(seed, B, T, I, O, bias, scale):
    rng = np.random.default_rng(seed)
    x, W = rng.normal(size=(B, T, I)) * scale, rng.normal(size=(I, O))
    b = rng.normal(size=O) if bias else None
    y, cache = linear_forward(x, W, b)
    G, loss = project(y, rng)
    dx, dW, db = linear_backward(G, cache)
    inputs, grads = {"x": x, "W": W}, {"x": dx, "W": dW}
    if bias:
        inputs["b"], grads["b"] = b, db
    else:
        assert db is None
    assert_close(check_gradients(lambda: loss(linear_forward(x, W, b)[0]), inputs, grads))


@given(seed=seeds, n=st.integers(1, 20), scale=scales)
def test_gelu_backward_matches_finite_differences(seed, n, scale):
    rng = np.random.default_rng(seed)
    # Two unit-scale entries keep the gradient's norm away from 0: at x = -30 GELU's slope is
    # ~1e-197, and a norm-wise relative error of two near-zero vectors measures only noise.
    x = np.concatenate([rng.normal(size=n) * scale, rng.normal(size=2)])
    y, cache = gelu_forward(x)
    G, loss = project(y, rng)
    assert_close(check_gradients(lambda: loss(gelu_forward(x)[0]), {"x": x}, {"x": gelu_backward(G, cache)}))


def test_gelu_matches_gpt2_formula():
    x = np.linspace(-6, 6, 101)
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(gelu_forward(x)[0], expected, rtol=1e-14, atol=0)


@given(seed=seeds, B=st.integers(1, 2), T=st.integers(1, 6), H=st.integers(1, 3), hd=st.integers(1, 4),
       scale=st.sampled_from([1.0, 0.1, 5.0]))
def test_attention_backward_matches_finite_differences(seed, B, T, H, hd, scale):
    rng = np.random.default_rng(seed)
    qkv = rng.normal(size=(B, T, 3 * H * hd)) * scale
    y, cache = attention_forward(qkv, H)
    G, loss = project(y, rng)
    dqkv = attention_backward(G, cache)
    assert_close(check_gradients(lambda: loss(attention_forward(qkv, H)[0]), {"qkv": qkv}, {"qkv": dqkv}))


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 5), V=st.integers(2, 9),
       scale=st.sampled_from([1.0, 5.0]), ignore=st.booleans())
def test_cross_entropy_backward_matches_finite_differences(seed, B, T, V, scale, ignore):
    # Larger logits saturate the softmax: the true gradient falls below finite-difference noise
    # (~1e-16·|loss|/h), so large magnitudes are tested for finiteness below instead.
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V)) * scale
    targets = rng.integers(0, V, size=(B, T))
    if ignore:
        targets[rng.random((B, T)) < 0.3] = -1
    w = rng.random((B, T))
    nll, cache = cross_entropy_forward(logits, targets)
    assert np.all(nll[targets < 0] == 0)
    dlogits = cross_entropy_backward(w, cache)
    f = lambda: float((cross_entropy_forward(logits, targets)[0] * w).sum())
    assert_close(check_gradients(f, {"logits": logits}, {"logits": dlogits}))


def test_cross_entropy_matches_definition_and_survives_huge_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7))
    targets = rng.integers(0, 7, size=(2, 3))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = -np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])
    np.testing.assert_allclose(cross_entropy_forward(logits, targets)[0], expected, rtol=1e-12)
    for dtype in (np.float32, np.float64):
        big = (rng.normal(size=(2, 3, 7)) * 1e4).astype(dtype)
        nll, cache = cross_entropy_forward(big, targets)
        d = cross_entropy_backward(np.ones((2, 3), dtype), cache)
        assert np.all(np.isfinite(nll)) and np.all(np.isfinite(d))
        assert nll.max() > 1e3                       # really large, not clipped to something small


@given(seed=seeds, B=st.integers(1, 4), T=st.integers(1, 6), C=st.integers(1, 5))
def test_reward_head_backward_matches_finite_differences(seed, B, T, C):
    rng = np.random.default_rng(seed)
    z, w, b = rng.normal(size=(B, T, C)), rng.normal(size=C), np.array(rng.normal())
    last = rng.integers(0, T, size=B)
    r, cache = reward_head_forward(z, last, w, b)
    G, loss = project(r, rng)
    dz, dw, db = reward_head_backward(G, cache)
    f = lambda: loss(reward_head_forward(z, last, w, b)[0])
    assert_close(check_gradients(f, {"z": z, "w": w, "b": b}, {"z": dz, "w": dw, "b": db}))


def test_attention_mask_is_minus_inf_and_rows_sum_to_one():
    rng = np.random.default_rng(0)
    qkv = rng.normal(size=(1, 5, 3 * 2 * 3)) * 1e3   # huge scores: a finite -1e4 mask could leak
    _, (q, k, v, att, _) = attention_forward(qkv, 2)
    assert np.all(att[..., np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] == 0.0)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_causal_mask_by_hand_in_its_dtype_default_and_given_offset(dtype):
    """0 where a query may see the key, -inf in its future, in the dtype asked for. The default
    places 3 queries at the last 3 of 5 positions; offset=0 places them at the first 3 (a flash
    block on the diagonal). An allowed score shifted by +1 would leave softmax unchanged, so the
    mask itself is checked, not only attention."""
    inf = -np.inf
    last = causal_mask(np, 3, 5, dtype)
    assert last.dtype == dtype
    np.testing.assert_array_equal(last, [[0, 0, 0, inf, inf], [0, 0, 0, 0, inf], [0, 0, 0, 0, 0]])
    first = causal_mask(np, 3, 5, dtype, offset=0)
    assert first.dtype == dtype
    np.testing.assert_array_equal(first, [[0, inf, inf, inf, inf], [0, 0, inf, inf, inf], [0, 0, 0, inf, inf]])


# ---------------------------------------------------------------- the checker can fail
def wrong_embedding_backward(dout, cache):
    """The classic bug: fancy-index assignment keeps only one write per repeated id."""
    ids, shape = cache
    dW = np.zeros(shape)
    dW[ids.reshape(-1)] += dout.reshape(-1, shape[1])
    return dW


def wrong_layernorm_backward(dy, cache):
    """Forgets the gradient through the variance (the last term)."""
    xhat, rstd, weight = cache
    dxhat = dy * weight
    return (dxhat - dxhat.mean(-1, keepdims=True)) * rstd


def test_checker_catches_dropped_repeated_ids():
    rng = np.random.default_rng(0)
    ids = np.array([[1, 1, 2, 1]])
    W = rng.normal(size=(4, 3))
    y, cache = embedding_forward(ids, W)
    G, loss = project(y, rng)
    f = lambda: loss(embedding_forward(ids, W)[0])
    assert check_gradients(f, {"W": W}, {"W": embedding_backward(G, cache)})["W"] <= TOL
    assert check_gradients(f, {"W": W}, {"W": wrong_embedding_backward(G, cache)})["W"] > 0.1


def test_checker_catches_missing_layernorm_term():
    rng = np.random.default_rng(1)
    x, w, b = rng.normal(size=(2, 3, 6)), rng.normal(size=6), rng.normal(size=6)
    y, cache = layernorm_forward(x, w, b)
    G, loss = project(y, rng)
    f = lambda: loss(layernorm_forward(x, w, b)[0])
    assert check_gradients(f, {"x": x}, {"x": layernorm_backward(G, cache)[0]})["x"] <= TOL
    assert check_gradients(f, {"x": x}, {"x": wrong_layernorm_backward(G, cache)})["x"] > 0.01


def test_numerical_grad_refuses_float32():
    from tinylm.core.gradcheck import numerical_grad
    with pytest.raises(ValueError, match="float64"):
        numerical_grad(lambda: 0.0, np.zeros(3, np.float32))


def test_every_layer_keeps_float32_forward_and_backward():
    """A float32 model stays float32: no layer's output or gradient is promoted to float64 (a
    dropped `dtype=` in a zeros() or a float64 constant array would double memory and time)."""
    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
    B, T, C, V = 2, 3, 4, 5
    ids, last = rng.integers(0, V, size=(B, T)), np.array([2, 0])
    cases = [
        (embedding_forward, embedding_backward, (ids, f32(V, C)), f32(B, T, C)),
        (layernorm_forward, layernorm_backward, (f32(B, T, C), f32(C), f32(C)), f32(B, T, C)),
        (linear_forward, linear_backward, (f32(B, T, C), f32(C, V), f32(V)), f32(B, T, V)),
        (gelu_forward, gelu_backward, (f32(B, T, C),), f32(B, T, C)),
        (attention_forward, attention_backward, (f32(B, T, 3 * C), 2), f32(B, T, C)),
        (cross_entropy_forward, cross_entropy_backward, (f32(B, T, V), ids), f32(B, T)),
        (reward_head_forward, reward_head_backward, (f32(B, T, C), last, f32(C), np.float32(0.5)), f32(B)),
    ]
    for forward, backward, inputs, dout in cases:
        out, cache = forward(*inputs)
        grads = backward(dout, cache)
        grads = grads if isinstance(grads, tuple) else (grads,)
        assert out.dtype == np.float32, forward.__name__
        assert all(np.asarray(g).dtype == np.float32 for g in grads), (backward.__name__, [np.asarray(g).dtype for g in grads])
