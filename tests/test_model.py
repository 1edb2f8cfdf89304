"""The whole model: gradients against finite differences, float32 vs float64, causality, the
fresh-model loss, the KV cache, and clear errors for bad input."""
import math
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm import GPT, GPTConfig
from tinylm.core.gradcheck import check_gradients


@st.composite
def configs(draw, dtype="float64"):
    n_head = draw(st.integers(1, 3))
    # d_model >= 3: LayerNorm over 1 or 2 features is degenerate (xhat is 0 or ±1 whatever x is).
    head_dim = draw(st.integers(-(-3 // n_head), 4))
    return GPTConfig(vocab_size=draw(st.integers(2, 12)), n_ctx=draw(st.integers(1, 8)),
                     n_layer=draw(st.integers(1, 2)), n_head=n_head,
                     d_model=n_head * head_dim, dtype=dtype)


def batch(config, rng, B=None, T=None):
    B = B or int(rng.integers(1, 4))
    T = T or int(rng.integers(1, config.n_ctx + 1))
    # vocab_size is small, so ids repeat inside a batch: the embedding backward must accumulate.
    idx = rng.integers(0, config.vocab_size, size=(B, T))
    targets = rng.integers(0, config.vocab_size, size=(B, T))
    return idx, targets


def scale_params(model, rng, scale):
    """Perturb the fresh init so LayerNorm gains, biases and large activations are all exercised."""
    for k, p in model.params.items():
        p += rng.normal(size=p.shape) * (scale if p.ndim == 2 else 0.5)


@given(config=configs(), seed=st.integers(0, 10**6), scale=st.sampled_from([0.02, 0.3, 1.0]),
       masked=st.booleans())
def test_model_gradients_match_finite_differences(config, seed, scale, masked):
    rng = np.random.default_rng(seed)
    model = GPT(config, seed=seed)
    scale_params(model, rng, scale)
    idx, targets = batch(config, rng)
    targets[rng.random(targets.shape) < 0.2] = -1
    targets[0, -1] = rng.integers(0, config.vocab_size)      # at least one position counts
    mask = None
    if masked:
        mask = (rng.random(idx.shape) < 0.7).astype(float)
        mask[0, -1] = 1.0
    loss, grads = model.loss_and_grads(idx, targets, mask)
    assert set(grads) == set(model.params)
    assert all(grads[k].shape == model.params[k].shape for k in grads)
    errors = check_gradients(lambda: model.loss(idx, targets, mask), model.params, grads, max_entries=6, seed=seed)
    bad = {k: e for k, e in errors.items() if not e <= 1e-6}
    assert not bad, f"relative gradient error above 1e-6: {bad}"


@given(config=configs(), seed=st.integers(0, 10**6))
def test_hidden_backward_matches_finite_differences(config, seed):
    """The documented z API: a gradient given on z backpropagates to every trunk parameter."""
    rng = np.random.default_rng(seed)
    model = GPT(config, seed=seed)
    scale_params(model, rng, 0.3)
    idx, _ = batch(config, rng)
    z, cache = model.hidden(idx)
    G = rng.normal(size=z.shape)
    grads = model.hidden_backward(G, cache)
    assert set(grads) == set(model.params)
    errors = check_gradients(lambda: float((model.hidden(idx)[0] * G).sum()), model.params, grads,
                             max_entries=5, seed=seed)
    assert max(errors.values()) <= 1e-6, errors


@given(config=configs(), seed=st.integers(0, 10**6))
def test_float32_forward_matches_float64(config, seed):
    rng = np.random.default_rng(seed)
    m64 = GPT(config, seed=seed)
    scale_params(m64, rng, 0.3)
    m32 = GPT(GPTConfig(**{**config.to_dict(), "dtype": "float32"}), params=m64.params)
    idx, _ = batch(config, rng)
    l64, l32 = m64.forward(idx), m32.forward(idx)
    assert l32.dtype == np.float32 and l64.dtype == np.float64
    rel = np.linalg.norm(l32 - l64) / np.linalg.norm(l64)
    assert rel <= 1e-5, rel


@given(config=configs(), seed=st.integers(0, 10**6))
def test_changing_token_t_leaves_earlier_positions_unchanged(config, seed):
    """Changing token t never changes logits or z at positions < t."""
    rng = np.random.default_rng(seed)
    model = GPT(config, seed=seed)
    scale_params(model, rng, 0.3)
    idx, _ = batch(config, rng, B=1)
    T = idx.shape[1]
    t = int(rng.integers(0, T))
    changed = idx.copy()
    changed[0, t] = (idx[0, t] + 1) % config.vocab_size
    z0, z1 = model.hidden(idx)[0], model.hidden(changed)[0]
    np.testing.assert_array_equal(model.forward(idx)[:, :t], model.forward(changed)[:, :t])
    np.testing.assert_array_equal(z0[:, :t], z1[:, :t])
    if config.vocab_size > 1:
        assert not np.array_equal(z0[:, t:], z1[:, t:])     # ...but it does change position t


@pytest.mark.parametrize("vocab_size", [65, 256, 1000])
def test_fresh_model_loss_is_log_vocab(vocab_size):
    config = GPTConfig(vocab_size=vocab_size, n_ctx=32, n_layer=2, n_head=4, d_model=64)
    rng = np.random.default_rng(0)
    idx, targets = batch(config, rng, B=4, T=32)
    loss, _ = GPT(config, seed=1).loss_and_grads(idx, targets)
    assert abs(loss - math.log(vocab_size)) <= 0.1


def test_kv_cache_logits_match_full_forward():
    config = GPTConfig(vocab_size=50, n_ctx=16, n_layer=2, n_head=2, d_model=16, dtype="float64")
    model = GPT(config, seed=3)
    idx = np.random.default_rng(0).integers(0, 50, size=(2, 12))
    full = model.forward(idx)
    cache = model.new_kv_cache()
    parts = [model.forward(idx[:, :5], cache)] + [model.forward(idx[:, t:t + 1], cache) for t in range(5, 12)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-12, atol=1e-12)
    assert len(cache) == 12
    with pytest.raises(ValueError, match=r"^idx has T=5 after 12 cached positions, more than n_ctx=16$"):
        model.forward(idx[:, :5], cache)


# ---------------------------------------------------------------- bad input
SMALL = dict(vocab_size=10, n_ctx=8, n_layer=1, n_head=2, d_model=4)


@pytest.mark.parametrize("change, message", [
    (dict(d_model=5), "d_model=5 must be divisible by n_head=2"),
    (dict(n_head=0), "n_head must be a positive integer"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=-3), "vocab_size must be a positive integer"),
    (dict(n_ctx=2.5), "n_ctx must be a positive integer"),
    (dict(dtype="float16"), "dtype must be one of"),
])
def test_bad_config_is_refused_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**SMALL, **change})


@pytest.mark.parametrize("idx, message", [
    (np.array([[1, 10]]), "token id 10 is out of range for vocab_size=10"),
    # a valid 0 beside a bad id: the message names the bad one
    (np.array([[0, 10]]), r"^idx: token id 10 is out of range for vocab_size=10 \(allowed 0..9\)$"),
    (np.zeros((0, 3), dtype=int), r"^idx must have at least one row and one position, got shape \(0, 3\)$"),
    (np.zeros((2, 0), dtype=int), r"^idx must have at least one row and one position, got shape \(2, 0\)$"),
    ([[1, 2]], r"^idx must be an integer array of shape \(B, T\), got list$"),
    # has a dtype but is no array (no ndim): refused up front, not an AttributeError later
    (types.SimpleNamespace(dtype=np.dtype(int)), "^idx must be an integer array of shape \\(B, T\\), got SimpleNamespace$"),
    (np.array([[-1, 2]]), "token id -1 is out of range"),
    (np.array([[1.0, 2.0]]), "must hold integers"),
    (np.array([1, 2]), r"must be 2-D \(B, T\)"),
    (np.zeros((1, 9), dtype=int), "T=9, more than n_ctx=8"),
    ([[1, 2]], "must be an integer array"),
])
def test_bad_idx_is_refused_with_a_message(idx, message):
    with pytest.raises(ValueError, match=message):
        GPT(GPTConfig(**SMALL)).forward(idx)


@pytest.mark.parametrize("targets, message", [
    (np.array([[1, 2, 3]]), r"targets shape \(1, 3\) differs from idx shape \(1, 2\)"),
    (np.array([[1.0, 2.0]]), "^targets must be an integer array, got float64$"),
    ([[1, 2]], "^targets must be an integer array, got <class 'list'>$"),
    # an ignored position (-1) beside a bad id: the message names the bad id, not the -1
    (np.array([[-1, 10]]), r"^targets: id 10 is out of range for vocab_size=10 \(allowed 0..9, or -1 to ignore a position\)$"),
    (np.array([[1, 10]]), "targets: id 10 is out of range"),
    (np.array([[-2, 1]]), "targets: id -2 is out of range"),
    (np.array([[-1, -1]]), r"^no position counts towards the loss \(loss_mask is all 0 or every target is -1\)$"),
])
def test_bad_targets_are_refused_with_a_message(targets, message):
    with pytest.raises(ValueError, match=message):
        GPT(GPTConfig(**SMALL)).loss_and_grads(np.array([[1, 2]]), targets)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_loss_is_mean_nll_over_masked_valid_positions(seed):
    """Against log-softmax of forward()'s logits, averaged by hand over the positions where
    loss_mask is 1 and the target is not −1. Dividing by every valid target (ignoring the mask),
    or by every position, fails here."""
    rng = np.random.default_rng(seed)
    config = GPTConfig(vocab_size=7, n_ctx=6, n_layer=1, n_head=2, d_model=6, dtype="float64")
    model = GPT(config, seed=seed)
    idx, targets = batch(config, rng, B=3, T=6)
    targets[0, :2] = -1
    loss_mask = (rng.random(idx.shape) < 0.5).astype(np.float64)
    loss_mask[1, 3] = 1.0
    logits = model.forward(idx)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    terms = [-logp[b, t, targets[b, t]] for b in range(3) for t in range(6) if loss_mask[b, t] and targets[b, t] >= 0]
    expected = sum(terms) / len(terms)
    assert model.loss(idx, targets, loss_mask) == pytest.approx(expected, rel=1e-12)
    assert model.loss_and_grads(idx, targets, loss_mask)[0] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mixer", ["attention", "ssm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_checker_catches_10_percent_error_in_every_parameter_gradient(mixer, seed):
    """Every parameter of every layer, the smallest gradients included (the ssm's A_log and
    dt_proj.bias, LayerNorm biases deep in the stack), scaled by 0.9 one at a time: each must
    fail the check that its true gradient passes."""
    rng = np.random.default_rng(seed)
    config = GPTConfig(vocab_size=7, n_ctx=5, n_layer=2, n_head=1, d_model=4, dtype="float64", mixer=mixer,
                       d_state=2, d_conv=2, expand=2)
    model = GPT(config, seed=seed)
    for p in model.params.values():
        p += rng.normal(size=p.shape) * 0.3
    idx, targets = batch(config, rng, B=2, T=5)
    _, grads = model.loss_and_grads(idx, targets)
    f = lambda: model.loss(idx, targets)
    assert max(check_gradients(f, model.params, grads, max_entries=5, seed=seed).values()) <= 1e-6
    wrong = check_gradients(f, model.params, {k: 0.9 * g for k, g in grads.items()}, max_entries=5, seed=seed)
    missed = {k: (e, float(np.abs(grads[k]).max())) for k, e in wrong.items() if not e > 1e-6}
    assert not missed, missed


def test_check_tensors_lists_at_most_eight_of_each_kind_then_dots():
    """One message for a broken set of tensors: each kind names up to 8, ", "-separated, with " ..."
    only when more were left out; kinds joined by "; "; a NaN names its tensor."""
    from tinylm.core.model import check_tensors
    shapes = {f"t{i}": (2,) for i in range(9)}

    def message(params):
        with pytest.raises(ValueError) as e:
            check_tensors(params, shapes, "here")
        return str(e.value)
    listed = ", ".join(f"t{i}" for i in range(8))
    good = {k: np.zeros(2) for k in shapes}
    assert message({}) == f"here: missing tensors: {listed} ..."                      # 9 missing
    assert message({"t8": np.zeros(2)}) == f"here: missing tensors: {listed}"         # exactly 8
    extra = {f"e{i}": np.zeros(2) for i in range(9)}
    assert message({**good, **extra}) == "here: unexpected tensors: " + ", ".join(f"e{i}" for i in range(8)) + " ..."
    del extra["e8"]
    assert message({**good, **extra}) == "here: unexpected tensors: " + ", ".join(f"e{i}" for i in range(8))
    wrong = ", ".join(f"t{i} (3,) (expected (2,))" for i in range(8))
    assert message({k: np.zeros(3) for k in shapes}) == f"here: mis-shaped tensors: {wrong}"
    assert message({"t0": np.zeros(2), "e0": np.zeros(2)}) == \
        "here: missing tensors: " + ", ".join(f"t{i}" for i in range(1, 9)) + "; unexpected tensors: e0"
    assert message({**good, "t3": np.array([0.0, np.nan])}) == "here: tensor t3 holds NaN or Inf values"


def test_float32_model_keeps_float32_weights_and_grads_whatever_the_weights_dtype():
    """The per-position weights are cast to the model's dtype: float64 weights (a Python caller's
    default) must not turn a float32 model's gradients into float64."""
    config = GPTConfig(**SMALL)
    model = GPT(config)
    idx, targets = np.array([[1, 2, 3]]), np.array([[2, 3, -1]])
    weights = model.mean_weights(idx, targets)
    assert weights.dtype == np.float32
    np.testing.assert_array_equal(weights, [[0.5, 0.5, 0.0]])
    _, grads = model.weighted_nll_and_grads(idx, targets, np.full((1, 3), 0.25, dtype=np.float64))
    assert {g.dtype for g in grads.values()} == {np.dtype(np.float32)}


def test_weights_and_loss_mask_of_another_shape_are_refused_naming_both_shapes():
    model = GPT(GPTConfig(**SMALL))
    idx, targets = np.array([[1, 2, 3]]), np.array([[2, 3, 4]])
    with pytest.raises(ValueError, match=r"^weights shape \(1, 2\) differs from idx shape \(1, 3\)$"):
        model.weighted_nll_and_grads(idx, targets, np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"^loss_mask shape \(3,\) differs from idx shape \(1, 3\)$"):
        model.loss(idx, targets, np.ones(3))


def test_token_logprobs_are_log_softmax_at_the_targets_and_zero_where_ignored():
    config = GPTConfig(**{**SMALL, "dtype": "float64"})
    model = GPT(config, seed=2)
    idx, targets = np.array([[1, 2, 3], [4, 5, 6]]), np.array([[2, 3, 4], [5, -1, 7]])
    logits = model.forward(idx)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = np.where(targets >= 0, np.take_along_axis(logp, np.maximum(targets, 0)[..., None], -1)[..., 0], 0.0)
    np.testing.assert_allclose(model.token_logprobs(idx, targets), expected, rtol=1e-12, atol=0)


def test_copy_is_an_independent_model_with_the_same_outputs_and_settings():
    model = GPT(GPTConfig(**SMALL), seed=4)
    twin = model.copy()
    idx = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(twin.forward(idx), model.forward(idx))
    assert (twin.config, twin.device, twin.kernels) == (model.config, model.device, model.kernels)
    twin.params["wte.weight"] += 1.0
    assert not np.array_equal(twin.forward(idx), model.forward(idx))
    assert all(np.array_equal(p, GPT(GPTConfig(**SMALL), seed=4).params[k]) for k, p in model.params.items())
    assert GPT(GPTConfig(**SMALL), kernels=True).copy().kernels is True     # not the device's default


def test_init_is_gpt2s_seeded_and_in_the_configs_dtype():
    """N(0, 0.02) weights, 0.02/√(2·n_layer) for the two residual projections, zero biases, unit
    LayerNorm gains; the default seed is 0 and the seed is used; the ssm's parameters come from
    ssm_init_param (A_log = log(1..N))."""
    from tinylm.core.model import init_params
    config = GPTConfig(vocab_size=64, n_ctx=16, n_layer=3, n_head=2, d_model=64, dtype="float32")
    params = init_params(config)
    assert {p.dtype for p in params.values()} == {np.dtype(np.float32)}
    assert all(np.array_equal(p, init_params(config, 0)[k]) for k, p in params.items())
    assert not np.array_equal(init_params(config, 1)["wte.weight"], params["wte.weight"])
    out_std = 0.02 / math.sqrt(2 * 3)
    for name, p in params.items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert np.all(p == 1.0), name
        elif p.ndim == 1:
            assert np.all(p == 0.0), name
        else:           # ≥ 4096 draws each: the sample std is within ~2% of the true one
            expected = out_std if name.endswith("c_proj.weight") else 0.02
            assert abs(p.std() / expected - 1) < 0.05, (name, p.std(), expected)
    ssm = init_params(GPTConfig(vocab_size=8, n_ctx=4, n_layer=1, n_head=1, d_model=4, mixer="ssm", d_state=3))
    np.testing.assert_allclose(ssm["h.0.ssm.A_log"][0], np.log([1.0, 2.0, 3.0]))
    assert np.all(ssm["h.0.ssm.D"] == 1.0)


def test_model_seed_device_and_kernels_settings_are_kept_and_checked():
    from tinylm.core import cpu_layers, kernel_layers
    from tinylm.core.config import FLASH_MIN_T
    from tinylm.core.model import ARRAY_LAYERS, layers_for
    config = GPTConfig(**SMALL)
    default = GPT(config)
    assert (default.device, default.kernels, default.layers) == ("cpu", False, cpu_layers.LAYERS)
    assert GPT(config, reference=True).layers is ARRAY_LAYERS
    assert default.copy().layers is cpu_layers.LAYERS and GPT(config, reference=True).copy().reference
    assert default.layers.auto_flash_from == FLASH_MIN_T
    assert all(np.array_equal(p, GPT(config, seed=0).params[k]) for k, p in default.params.items())
    assert not np.array_equal(GPT(config, seed=3).params["wte.weight"], default.params["wte.weight"])
    assert GPT(config, kernels=False).kernels is False
    on_kernels = GPT(config, kernels=True)         # the simulator (tests/conftest.py)
    assert on_kernels.kernels is True and on_kernels.layers is kernel_layers.LAYERS
    with pytest.raises(ValueError, match="^kernels=True needs dtype float32"):
        GPT(GPTConfig(**{**SMALL, "dtype": "float64"}), kernels=True)
    with pytest.raises(ValueError, match=r"^kernels must be True, False or None \(the device's default\), got 'yes'$"):
        GPT(config, kernels="yes")
    # On CuPy, "auto" attention never switches to the NumPy-shaped flash (thousands of tiny launches).
    assert layers_for("cuda", False, "float32").auto_flash_from == math.inf


def test_auto_attention_switches_at_the_layer_sets_threshold_on_positions():
    """"auto" runs flash from layers.auto_flash_from positions T on; the switch reads T (not the
    width 3C of c_attn's output) and the model's own layer set's threshold."""
    from tinylm.core.flash_attention import flash_attention_backward
    model = GPT(GPTConfig(**{**SMALL, "d_model": 8}))          # 3C = 24 > T
    attention_backward = model.layers.attention_backward       # the set's naive attention
    idx = np.array([[1, 2, 3, 4]])

    def attention_run(auto_from):
        model.layers = model.layers._replace(auto_flash_from=auto_from)
        return model.hidden(idx)[1].blocks[0].mixer.attention_backward
    assert attention_run(5) is attention_backward
    assert attention_run(4) is flash_attention_backward


def test_ssm_mixer_runs_on_the_models_layer_set():
    """The ssm blocks call the model's layers (the kernels when kernels=True), not the module default."""
    from tinylm.core.layers import linear_forward
    model = GPT(GPTConfig(vocab_size=8, n_ctx=4, n_layer=1, n_head=1, d_model=4, mixer="ssm"))
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return linear_forward(*args, **kwargs)
    model.layers = model.layers._replace(linear_forward=counted)
    model.forward(np.array([[1, 2]]))
    assert len(calls) == 6           # the mixer's in_proj, x_proj, dt_proj, out_proj; the MLP's c_fc, c_proj
