"""NumPy flash attention: the same numbers as the naive attention (forward and backward, causal or
not, T not a multiple of the block), its own finite-difference check, and the model's choice of it."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm import GPT, GPTConfig
from tinylm.core.flash_attention import (flash_attention_backward, flash_attention_forward, flash_backward,
                                    flash_forward)
from tinylm.core.gradcheck import check_gradients
from tinylm.core.layers import attention_backward, attention_forward

seeds = st.integers(0, 2**31 - 1)


def softmax_attention(q, k, v, causal):
    """Textbook reference on (B, H, T, hd): o = softmax(q kᵀ/√hd + mask) v, lse = log Σ exp(scores)."""
    s = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.triu(np.ones(s.shape[-2:], bool), 1), -np.inf, s)
    lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    return np.exp(s - lse[..., None]) @ v, lse


@given(seed=seeds, B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 40), hd=st.integers(1, 6),
       block=st.integers(1, 16), scale=st.sampled_from([1.0, 5.0]))
def test_flash_layer_equals_naive(seed, B, H, T, hd, block, scale):
    rng = np.random.default_rng(seed)
    qkv = rng.normal(size=(B, T, 3 * H * hd)) * scale
    out, cache = attention_forward(qkv, H)
    flash_out, flash_cache = flash_attention_forward(qkv, H, block=block)
    np.testing.assert_allclose(flash_out, out, rtol=0, atol=1e-10)
    dout = rng.normal(size=out.shape)
    np.testing.assert_allclose(flash_attention_backward(dout, flash_cache), attention_backward(dout, cache),
                               rtol=0, atol=1e-10)


@given(seed=seeds, T=st.integers(1, 30), hd=st.integers(1, 8), block=st.integers(1, 12), causal=st.booleans())
def test_flash_heads_match_reference_and_lse(seed, T, hd, block, causal):
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(3, 2, 2, T, hd))
    o, lse = flash_forward(q, k, v, causal=causal, block=block)
    o_ref, lse_ref = softmax_attention(q, k, v, causal)
    np.testing.assert_allclose(o, o_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(lse, lse_ref, rtol=0, atol=1e-10)


@given(seed=seeds, T=st.integers(1, 9), block=st.integers(1, 4), causal=st.booleans())
def test_flash_backward_matches_finite_differences(seed, T, block, causal):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(1, 2, T, 3)) for _ in range(3))
    G = rng.normal(size=q.shape)
    o, lse = flash_forward(q, k, v, causal, block)
    dq, dk, dv = flash_backward(q, k, v, o, lse, G, causal, block)
    f = lambda: float((flash_forward(q, k, v, causal, block)[0] * G).sum())
    errors = check_gradients(f, {"q": q, "k": k, "v": v}, {"q": dq, "k": dk, "v": dv})
    assert all(e <= 1e-6 for e in errors.values()), errors


def test_gradcheck_catches_a_flash_backward_without_D():
    """Dropping D = rowsum(dO ∘ O) (the softmax's normalisation term) must fail the check."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 1, 6, 3)) for _ in range(3))
    G = rng.normal(size=q.shape)
    o, lse = flash_forward(q, k, v, True, 4)
    f = lambda: float((flash_forward(q, k, v, True, 4)[0] * G).sum())
    dq = flash_backward(q, k, v, o, lse, G, True, 4)[0]
    dq_wrong = flash_backward(q, k, v, np.zeros_like(o), lse, G, True, 4)[0]   # o only enters through D
    assert check_gradients(f, {"q": q}, {"q": dq})["q"] <= 1e-6
    assert check_gradients(f, {"q": q}, {"q": dq_wrong})["q"] > 1e-2


def test_flash_memory_is_linear_in_T():
    """Only (T, hd) arrays and one block×block score matrix live at a time: tracemalloc's peak for
    T = 512 in blocks of 64 stays far below the 512² scores the naive attention allocates."""
    import tracemalloc
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(3, 1, 1, 512, 8))
    tracemalloc.start()
    o, lse = flash_forward(q, k, v, block=64)
    flash_backward(q, k, v, o, lse, o, block=64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 512 * 512 * 8 / 4, peak


def test_nonpositive_block_is_refused():
    q = np.zeros((1, 1, 4, 2))
    with pytest.raises(ValueError, match="block"):
        flash_forward(q, q, q, block=0)


def test_model_with_flash_matches_naive():
    kw = dict(vocab_size=11, n_ctx=12, n_layer=2, n_head=2, d_model=6, dtype="float64")
    naive, flash = GPT(GPTConfig(**kw, attention="naive")), GPT(GPTConfig(**kw, attention="flash"))
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 11, size=(2, 12)), rng.integers(0, 11, size=(2, 12))
    loss, grads = naive.loss_and_grads(idx, targets)
    flash_loss, flash_grads = flash.loss_and_grads(idx, targets)
    assert abs(loss - flash_loss) < 1e-12
    for name in grads:
        np.testing.assert_allclose(flash_grads[name], grads[name], rtol=0, atol=1e-12)
    # the KV cache fills from a flash prefill and continues with the naive path
    cache = flash.new_kv_cache()
    flash.forward(idx[:, :7], cache)
    np.testing.assert_allclose(flash.forward(idx[:, 7:], cache)[:, -1], naive.forward(idx)[:, -1], atol=1e-12)


def test_auto_uses_flash_only_for_long_sequences():
    from tinylm.core.model import FLASH_MIN_T
    config = GPTConfig(attention="auto")
    assert not config.uses_flash(FLASH_MIN_T - 1) and config.uses_flash(FLASH_MIN_T)
    assert GPTConfig(attention="flash").uses_flash(1) and not GPTConfig(attention="naive").uses_flash(10**6)


def test_attention_option_is_validated():
    with pytest.raises(ValueError, match=r"attention must be one of \('naive', 'flash', 'auto'\)"):
        GPTConfig(attention="fast")


def count_tiles(monkeypatch):
    """Count block_scores calls: one per (query block, key block) tile the loops visit."""
    import tinylm.core.flash_attention as fa
    calls, inner = [], fa.block_scores

    def spy(q_i, k_j, i0, j0, scale, causal):
        calls.append((i0, j0))
        return inner(q_i, k_j, i0, j0, scale, causal)
    monkeypatch.setattr(fa, "block_scores", spy)
    return calls


def test_causal_tiles_above_the_diagonal_are_skipped_and_each_block_is_visited_once(monkeypatch):
    """T = 10 in blocks of 4: blocks 0-3, 4-7, 8-9. Causal: the forward visits tiles (i, j) with
    j <= i — 6 of 9 — and so does the backward; not causal, all 9. The layer passes its block on."""
    calls = count_tiles(monkeypatch)
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(3, 1, 2, 10, 3))
    o, lse = flash_forward(q, k, v, causal=True, block=4)
    assert calls == [(0, 0), (4, 0), (4, 4), (8, 0), (8, 4), (8, 8)]
    calls.clear()
    flash_backward(q, k, v, o, lse, o, causal=True, block=4)
    assert sorted(calls) == [(0, 0), (4, 0), (4, 4), (8, 0), (8, 4), (8, 8)]
    calls.clear()
    flash_forward(q, k, v, causal=False, block=4)
    assert len(calls) == 9
    calls.clear()
    out, cache = flash_attention_forward(rng.normal(size=(1, 10, 3 * 6)), 2, block=4)
    flash_attention_backward(np.ones_like(out), cache)
    assert len(calls) == 12


def test_defaults_are_causal():
    rng = np.random.default_rng(1)
    q, k, v = rng.normal(size=(3, 1, 2, 7, 3))
    o, lse = flash_forward(q, k, v, block=3)
    np.testing.assert_allclose(o, softmax_attention(q, k, v, True)[0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(flash_backward(q, k, v, o, lse, o, block=3)[0],
                                  flash_backward(q, k, v, o, lse, o, True, 3)[0])


def test_each_row_is_stabilised_by_its_own_max():
    """One head's scores near 10^4, the other's near 1: a max shared across rows or heads would
    underflow the small head's exp to 0 (0/0 = nan); each row's own max keeps both exact."""
    rng = np.random.default_rng(2)
    q, k, v = rng.normal(size=(3, 1, 2, 6, 4))
    q[:, 0] *= 3000.0
    o, lse = flash_forward(q, k, v, causal=True, block=2)
    o_ref, lse_ref = softmax_attention(q, k, v, True)
    np.testing.assert_allclose(o, o_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-12)


def test_float32_in_float32_out():
    rng = np.random.default_rng(3)
    q, k, v = rng.normal(size=(3, 1, 2, 5, 4)).astype(np.float32)
    o, lse = flash_forward(q, k, v, block=2)
    assert o.dtype == lse.dtype == np.float32
    assert {g.dtype for g in flash_backward(q, k, v, o, lse, o, block=2)} == {np.dtype(np.float32)}


@pytest.mark.parametrize("block", [2.5, True, -1])
def test_non_integer_or_negative_blocks_are_refused(block):
    q = np.zeros((1, 1, 4, 2))
    with pytest.raises(ValueError, match=f"block must be a positive integer, got {block!r}"):
        flash_forward(q, q, q, block=block)
