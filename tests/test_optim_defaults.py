"""AdamW's defaults, the decay rule, the error message and gradient clipping at its edges: each test
kills a mutant that survived `mutmut run "tinylm.core.optim*"` (see TESTING.md)."""
import numpy as np
import pytest

from tinylm.core.optim import adamw_init, adamw_step, adamw_update, clip_grad_norm, decays


def test_adamw_update_defaults_are_eps_1e_8_and_no_weight_decay():
    """One step from m = v = 0 moves p by lr·g/(|g| + ε): with g = 1e-7 the ε = 1e-8 shows (0.909…)."""
    p, g = np.array([2.0]), np.array([1e-7])
    adamw_update(p, g, np.zeros(1), np.zeros(1), lr=0.1, step=1)
    assert p[0] == pytest.approx(2.0 - 0.1 * 1e-7 / (1e-7 + 1e-8), rel=1e-14)


def test_adamw_step_default_weight_decay_is_0_1_on_matrices_only():
    """With zero gradients only the decay moves p: matrices shrink by lr·0.1, vectors don't."""
    params = {"h.0.mlp.c_fc.weight": np.ones((2, 3)), "h.0.mlp.c_fc.bias": np.ones(3)}
    grads = {k: np.zeros_like(p) for k, p in params.items()}
    adamw_step(params, grads, adamw_init(params), lr=0.5)
    np.testing.assert_array_equal(params["h.0.mlp.c_fc.weight"], np.full((2, 3), 1 - 0.5 * 0.1))
    np.testing.assert_array_equal(params["h.0.mlp.c_fc.bias"], np.ones(3))


@pytest.mark.parametrize("name, decayed", [("wte.weight", False), ("wpe.weight", False),
                                           ("h.0.ssm.A_log", False), ("h.0.attn.c_attn.weight", True)])
def test_embeddings_and_A_log_are_not_decayed(name, decayed):
    assert decays(name, (4, 3)) is decayed


def test_key_mismatch_message_lists_at_most_five_names_of_each_kind():
    params = {f"p{i}": np.zeros(1) for i in range(7)}
    grads = {f"g{i}": np.zeros(1) for i in range(7)}
    with pytest.raises(ValueError) as error:
        adamw_step(params, grads, adamw_init(params), lr=0.1)
    assert "p4" in str(error.value) and "p5" not in str(error.value)
    assert "g4" in str(error.value) and "g5" not in str(error.value)


def test_clipping_leaves_a_norm_equal_to_max_norm_untouched_and_never_exceeds_it():
    at_max = {"a": np.array([3.0, 4.0])}
    assert clip_grad_norm(at_max, 5.0) == 5.0
    np.testing.assert_array_equal(at_max["a"], [3.0, 4.0])
    above = {"a": np.array([30.0, 40.0])}
    clip_grad_norm(above, 5.0)
    assert np.linalg.norm(above["a"]) <= 5.0


def test_grad_norm_accumulates_float32_squares_in_float64():
    """One large gradient beside a million small ones: summed in float32 the norm is off by ~4e-8
    (relative); grad_norm's float64 sums keep it to float64 rounding."""
    from tinylm.core.optim import grad_norm
    g = np.full(1_000_001, 0.1, dtype=np.float32)
    g[0] = 1e4
    exact = np.sqrt((g * g).astype(np.float64).sum())         # float32 squares, float64 sum
    assert grad_norm({"w": g}) == pytest.approx(exact, rel=1e-12)
