"""AdamW, gradient clipping, and the parameter / FLOP counts."""
import numpy as np
import pytest

from tinylm import GPT, GPTConfig, adamw_init, adamw_step, clip_grad_norm, count_params, flops_per_token
from tinylm.core.model import param_shapes
from tinylm.core.optim import decays, grad_norm


def test_gpt2_small_parameter_counts_match_the_published_totals():
    n = count_params(GPTConfig())
    assert n["total"] == 124_439_808
    assert n["non_embedding"] == 85_056_000
    assert n["embedding"] == 38_597_376 + 786_432


def test_count_matches_a_built_model():
    config = GPTConfig(vocab_size=37, n_ctx=11, n_layer=3, n_head=2, d_model=6)
    assert count_params(config)["total"] == sum(p.size for p in GPT(config).params.values())


def test_flops_are_two_per_weight_plus_attention_and_head():
    config = GPTConfig(vocab_size=300, n_ctx=64, n_layer=3, n_head=4, d_model=32)
    matmul_weights = sum(np.prod(s) for k, s in param_shapes(config).items()
                         if k.startswith("h.") and len(s) == 2)
    f = flops_per_token(config, seq_len=40)
    assert f["exact_forward"] == 2 * matmul_weights + 3 * 4 * 40 * 32 + 2 * 32 * 300
    assert f["exact_forward_backward"] == 3 * f["exact_forward"]
    n = count_params(config)["non_embedding"]
    assert f["kaplan_forward"] == 2 * n + 2 * 3 * 40 * 32
    assert flops_per_token(config)["seq_len"] == 64


def reference_adamw(p, g, m, v, t, lr, b1, b2, eps, wd):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
    return p - lr * (mhat / (np.sqrt(vhat) + eps) + wd * p), m, v


def test_adamw_matches_the_textbook_update_and_decays_only_matrices():
    rng = np.random.default_rng(0)
    params = {"h.0.mlp.c_fc.weight": rng.normal(size=(3, 4)), "h.0.mlp.c_fc.bias": rng.normal(size=4),
              "wte.weight": rng.normal(size=(5, 3)), "h.0.ln_1.weight": rng.normal(size=3)}
    ref = {k: (v.copy(), np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    state = adamw_init(params)
    for t in range(1, 4):
        grads = {k: rng.normal(size=v.shape) for k, v in params.items()}
        adamw_step(params, grads, state, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)
        for k in params:
            wd = 0.5 if k == "h.0.mlp.c_fc.weight" else 0.0
            p, m, v = reference_adamw(ref[k][0], grads[k], ref[k][1], ref[k][2], t, 0.01, 0.9, 0.99, 1e-8, wd)
            ref[k] = (p, m, v)
            np.testing.assert_allclose(params[k], p, rtol=1e-12)
    assert state["step"] == 3
    assert decays("h.3.attn.c_attn.weight", (4, 12)) and not decays("wte.weight", (5, 3))
    assert not decays("h.0.attn.c_attn.bias", (12,)) and not decays("ln_f.weight", (4,))


def test_adamw_state_round_trips_through_npz(tmp_path):
    """Saving the state and resuming gives bit-identical next steps."""
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(4, 4)).astype(np.float32)}
    state = adamw_init(params)
    adamw_step(params, {"w": rng.normal(size=(4, 4)).astype(np.float32)}, state, lr=0.1)
    np.savez(tmp_path / "s.npz", step=state["step"], m=state["m"]["w"], v=state["v"]["w"], w=params["w"])
    saved = np.load(tmp_path / "s.npz")
    params2 = {"w": saved["w"].copy()}
    state2 = {"step": int(saved["step"]), "m": {"w": saved["m"].copy()}, "v": {"w": saved["v"].copy()}}
    g = {"w": rng.normal(size=(4, 4)).astype(np.float32)}
    adamw_step(params, g, state, lr=0.1)
    adamw_step(params2, g, state2, lr=0.1)
    np.testing.assert_array_equal(params["w"], params2["w"])


def test_adamw_refuses_mismatched_grads():
    with pytest.raises(ValueError, match="missing"):
        adamw_step({"a": np.zeros(2), "b": np.zeros(2)}, {"a": np.zeros(2)}, adamw_init({"a": np.zeros(2)}), lr=0.1)


def test_clip_grad_norm_rescales_only_above_the_limit_and_keeps_direction():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert clip_grad_norm(grads, 10.0) == pytest.approx(5.0)
    assert grad_norm(grads) == pytest.approx(5.0)               # under the limit: untouched
    assert clip_grad_norm(grads, 1.0) == pytest.approx(5.0)
    assert grad_norm(grads) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(grads["a"] / grads["b"][0, 0], [0.75, 0.0])  # direction kept


def test_training_lowers_the_loss():
    config = GPTConfig(vocab_size=16, n_ctx=16, n_layer=2, n_head=2, d_model=32)
    model = GPT(config, seed=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 16, size=(4, 16))
    targets = (idx + 1) % 16                                   # a learnable rule
    state = adamw_init(model.params)
    first, _ = model.loss_and_grads(idx, targets)
    for _ in range(60):
        loss, grads = model.loss_and_grads(idx, targets)
        clip_grad_norm(grads, 1.0)
        adamw_step(model.params, grads, state, lr=3e-3)
    assert loss < 0.3 * first
