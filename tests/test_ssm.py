"""The selective state-space mixer (tinylm/core/ssm.py): every layer's backward against central
differences, the whole ssm model's gradients, causality, generation from a fixed-size state that
matches the full forward, its parameter and FLOP counts, and clear errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm import GPT, GPTConfig, count_params, flops_per_token
from tinylm.core.gradcheck import check_gradients
from tinylm.core.model import param_shapes
from tinylm.core.optim import decays
from tinylm.core.layer_sets import REFERENCE
from test_layers import TOL, assert_close, project  # noqa: E402  (tests/ is on sys.path)
from tinylm.core.ssm import (causal_conv_backward, causal_conv_forward, selective_scan_backward,
                        selective_scan_forward, silu_backward, silu_forward, softplus_backward,
                        softplus_forward, ssm_init_param, ssm_mixer_backward, ssm_mixer_forward,
                        ssm_param_shapes, dt_rank)

seeds = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------- layers
@given(seed=seeds, n=st.integers(1, 20), scale=st.sampled_from([1.0, 0.01, 10.0]))
def test_silu_and_softplus_backward_match_finite_differences(seed, n, scale):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(size=n) * scale, rng.normal(size=2)])
    for forward, backward in [(silu_forward, silu_backward), (softplus_forward, softplus_backward)]:
        y, cache = forward(x)
        G, loss = project(y, rng)
        assert_close(check_gradients(lambda: loss(forward(x)[0]), {"x": x}, {"x": backward(G, cache)}))
    assert np.all(softplus_forward(x)[0] > 0)


@given(seed=seeds, B=st.integers(1, 2), T=st.integers(1, 6), E=st.integers(1, 4), K=st.integers(1, 4),
       with_past=st.booleans())
def test_causal_conv_backward_matches_finite_differences(seed, B, T, E, K, with_past):
    rng = np.random.default_rng(seed)
    x, w, b = rng.normal(size=(B, T, E)), rng.normal(size=(K, E)), rng.normal(size=E)
    past = rng.normal(size=(B, K - 1, E)) if with_past else None
    y, cache = causal_conv_forward(x, w, b, past)
    G, loss = project(y, rng)
    dx, dw, db = causal_conv_backward(G, cache)
    f = lambda: loss(causal_conv_forward(x, w, b, past)[0])
    assert_close(check_gradients(f, {"x": x, "w": w, "b": b}, {"x": dx, "w": dw, "b": db}))


def scan_inputs(rng, B, T, E, N, scale=1.0):
    u = rng.normal(size=(B, T, E)) * scale
    delta = np.exp(rng.normal(size=(B, T, E)) - 1.0)            # Δ > 0, as softplus makes it
    A_log = rng.normal(size=(E, N)) * 0.5
    Bm, Cm = rng.normal(size=(B, T, N)), rng.normal(size=(B, T, N))
    D = rng.normal(size=E)
    return {"u": u, "delta": delta, "A_log": A_log, "Bm": Bm, "Cm": Cm, "D": D}


@given(seed=seeds, B=st.integers(1, 2), T=st.integers(1, 7), E=st.integers(1, 3), N=st.integers(1, 3),
       with_h0=st.booleans(), scale=st.sampled_from([1.0, 0.1, 5.0]))
def test_selective_scan_backward_matches_finite_differences(seed, B, T, E, N, with_h0, scale):
    rng = np.random.default_rng(seed)
    inputs = scan_inputs(rng, B, T, E, N, scale)
    h0 = rng.normal(size=(B, E, N)) if with_h0 else None
    y, cache = selective_scan_forward(*inputs.values(), h0)
    G, loss = project(y, rng)
    grads = dict(zip(inputs, selective_scan_backward(G, cache)))
    assert_close(check_gradients(lambda: loss(selective_scan_forward(*inputs.values(), h0)[0]), inputs, grads))


def test_selective_scan_is_the_recurrence():
    """Against the equations written out one position, channel and state at a time."""
    rng = np.random.default_rng(0)
    B, T, E, N = 2, 5, 3, 2
    p = scan_inputs(rng, B, T, E, N)
    A = -np.exp(p["A_log"])
    y = np.zeros((B, T, E))
    for b in range(B):
        for e in range(E):
            h = np.zeros(N)
            for t in range(T):
                h = np.exp(p["delta"][b, t, e] * A[e]) * h + p["delta"][b, t, e] * p["Bm"][b, t] * p["u"][b, t, e]
                y[b, t, e] = p["Cm"][b, t] @ h + p["D"][e] * p["u"][b, t, e]
    np.testing.assert_allclose(selective_scan_forward(*p.values())[0], y, rtol=1e-12, atol=1e-12)


def test_checker_catches_a_scan_backward_without_the_carry():
    """A backward that forgets what h_t passes back to h_{t−1} (decay set to 0) must fail the check."""
    rng = np.random.default_rng(1)
    inputs = scan_inputs(rng, 1, 6, 2, 2)
    y, cache = selective_scan_forward(*inputs.values())
    G, loss = project(y, rng)
    broken = cache[:6] + (np.zeros_like(cache[6]),) + cache[7:]
    grads = dict(zip(inputs, selective_scan_backward(G, broken)))
    errors = check_gradients(lambda: loss(selective_scan_forward(*inputs.values())[0]), inputs, grads)
    assert errors["u"] > 1e-3 and errors["Bm"] > 1e-3


def mixer_params(rng, d_model, d_state, d_conv, expand, scale):
    """ssm_init_param's values, perturbed so every parameter is exercised away from its init."""
    shapes = ssm_param_shapes(d_model, d_state, d_conv, expand)
    return {k: ssm_init_param(k, s, rng, 0.02) + rng.normal(size=s) * scale for k, s in shapes.items()}


def mixer_case(seed, B, T, C, N, K, expand, scale):
    """A mixer on x (B, T, C), its loss f() = sum(out · G), and the backward's dx and grads."""
    rng = np.random.default_rng(seed)
    params = mixer_params(rng, C, N, K, expand, scale)
    x = rng.normal(size=(B, T, C))
    out, cache = ssm_mixer_forward(x, params, REFERENCE)
    G, loss = project(out, rng)
    dx, grads = ssm_mixer_backward(G, cache)
    return x, params, lambda: loss(ssm_mixer_forward(x, params, REFERENCE)[0]), dx, grads


@given(seed=seeds, B=st.integers(1, 2), T=st.integers(1, 6), C=st.integers(1, 5), N=st.integers(1, 3),
       K=st.integers(1, 3), expand=st.integers(1, 2), scale=st.sampled_from([0.1, 0.5]))
def test_ssm_mixer_backward_matches_finite_differences(seed, B, T, C, N, K, expand, scale):
    x, params, f, dx, grads = mixer_case(seed, B, T, C, N, K, expand, scale)
    assert set(grads) == set(params)
    assert_close(check_gradients(f, {"x": x, **params}, {"x": dx, **grads}, max_entries=8, seed=seed))


# ---------------------------------------------------------------- the whole model
@st.composite
def ssm_configs(draw, dtype="float64"):
    return GPTConfig(vocab_size=draw(st.integers(2, 12)), n_ctx=draw(st.integers(1, 8)),
                     n_layer=draw(st.integers(1, 2)), n_head=1, d_model=draw(st.integers(3, 6)), dtype=dtype,
                     mixer="ssm", d_state=draw(st.integers(1, 3)), d_conv=draw(st.integers(1, 4)),
                     expand=draw(st.integers(1, 2)))


def perturbed_model(config, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    model = GPT(config, seed=seed)
    for p in model.params.values():
        p += rng.normal(size=p.shape) * scale
    return model, rng


@given(config=ssm_configs(), seed=st.integers(0, 10**6), masked=st.booleans())
def test_ssm_model_gradients_match_finite_differences(config, seed, masked):
    model, rng = perturbed_model(config, seed)
    T = int(rng.integers(1, config.n_ctx + 1))
    idx = rng.integers(0, config.vocab_size, size=(2, T))
    targets = rng.integers(0, config.vocab_size, size=(2, T))
    targets[rng.random(targets.shape) < 0.2] = -1
    targets[0, -1] = 0
    mask = None
    if masked:
        mask = (rng.random(idx.shape) < 0.7).astype(float)
        mask[0, -1] = 1.0
    loss, grads = model.loss_and_grads(idx, targets, mask)
    assert set(grads) == set(model.params) and any(".ssm." in k for k in grads)
    errors = check_gradients(lambda: model.loss(idx, targets, mask), model.params, grads, max_entries=5, seed=seed)
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert not bad, f"relative gradient error above {TOL}: {bad}"


@given(config=ssm_configs(), seed=st.integers(0, 10**6))
def test_ssm_changing_token_t_leaves_earlier_positions_unchanged(config, seed):
    """Changing token t never changes z at positions < t, and does change it at t."""
    model, rng = perturbed_model(config, seed)
    T = int(rng.integers(1, config.n_ctx + 1))
    idx = rng.integers(0, config.vocab_size, size=(1, T))
    t = int(rng.integers(0, T))
    changed = idx.copy()
    changed[0, t] = (idx[0, t] + 1) % config.vocab_size
    z0, z1 = model.hidden(idx)[0], model.hidden(changed)[0]
    np.testing.assert_array_equal(z0[:, :t], z1[:, :t])
    assert not np.array_equal(z0[:, t:], z1[:, t:])


@given(config=ssm_configs(), seed=st.integers(0, 10**6), data=st.data())
def test_ssm_generation_from_a_fixed_size_state_matches_the_full_forward(config, seed, data):
    """Feeding the tokens in chunks (a prompt, then one at a time) through the KV cache, which for
    the ssm holds only (conv inputs, h) per layer, gives the full forward's logits; the state's size
    never grows with the number of positions seen."""
    model, rng = perturbed_model(config, seed)
    T = config.n_ctx
    idx = rng.integers(0, config.vocab_size, size=(2, T))
    prompt = data.draw(st.integers(1, T))
    cache = model.new_kv_cache()
    parts = [model.forward(idx[:, :prompt], cache)]
    E = config.expand * config.d_model
    shapes = [(2, config.d_conv - 1, E), (2, E, config.d_state)]
    for t in range(prompt, T):
        assert [s.shape for layer in cache.layers for s in layer] == shapes * config.n_layer
        parts.append(model.forward(idx[:, t:t + 1], cache))
    np.testing.assert_allclose(np.concatenate(parts, axis=1), model.forward(idx), rtol=1e-12, atol=1e-12)
    assert len(cache) == T
    with pytest.raises(ValueError, match=f"n_ctx={T}"):
        model.forward(idx[:, :1], cache)


def test_ssm_float32_forward_matches_float64():
    config = GPTConfig(vocab_size=30, n_ctx=16, n_layer=2, n_head=1, d_model=16, mixer="ssm", dtype="float64")
    m64, rng = perturbed_model(config, 0, 0.1)
    m32 = GPT(GPTConfig(**{**config.to_dict(), "dtype": "float32"}), params=m64.params)
    idx = rng.integers(0, 30, size=(2, 16))
    l32, l64 = m32.forward(idx), m64.forward(idx)
    assert l32.dtype == np.float32
    assert np.linalg.norm(l32 - l64) / np.linalg.norm(l64) <= 1e-5


def test_fresh_ssm_model_loss_is_log_vocab():
    config = GPTConfig(vocab_size=257, n_ctx=32, n_layer=2, n_head=1, d_model=64, mixer="ssm")
    idx = np.random.default_rng(0).integers(0, 257, size=(4, 32))
    loss = GPT(config, seed=1).loss(idx, np.roll(idx, -1, 1))
    assert abs(loss - np.log(257)) <= 0.1


# ---------------------------------------------------------------- counts
def test_ssm_counts_match_a_built_model():
    config = GPTConfig(vocab_size=37, n_ctx=11, n_layer=3, n_head=2, d_model=40, mixer="ssm",
                       d_state=5, d_conv=3, expand=2)
    model = GPT(config)
    n = count_params(config)
    assert n["total"] == sum(p.size for p in model.params.values())
    assert n["non_embedding"] == n["total"] - 37 * 40 - 11 * 40
    # Forward FLOPs: 2 per weight of every block matrix (projections, the depthwise conv counts one
    # multiply-add per tap and channel too) except A_log, which the scan uses elementwise;
    # the scan 6·E·N + 3·E and the gate E per layer; the tied head 2·d·V.
    E, N = 80, 5
    matmul = sum(p.size for k, p in model.params.items() if k.startswith("h.") and p.ndim == 2
                 and not k.endswith("A_log"))
    f = flops_per_token(config, seq_len=7)
    assert f["exact_forward"] == 2 * matmul + 3 * (6 * E * N + 3 * E + E) + 2 * 40 * 37
    assert f["exact_forward_backward"] == 3 * f["exact_forward"]
    assert f["kaplan_forward"] == 2 * n["non_embedding"]                 # no T term: linear in T
    assert flops_per_token(config, seq_len=1000)["exact_forward"] == f["exact_forward"]


def test_a_log_is_not_weight_decayed():
    shapes = param_shapes(GPTConfig(vocab_size=10, n_ctx=4, n_layer=1, n_head=1, d_model=8, mixer="ssm"))
    assert not decays("h.0.ssm.A_log", shapes["h.0.ssm.A_log"])
    assert decays("h.0.ssm.in_proj.weight", shapes["h.0.ssm.in_proj.weight"])


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, message", [
    (dict(mixer="rnn"), r"mixer must be one of \('attention', 'ssm'\), got 'rnn'"),
    (dict(d_state=0), "d_state must be a positive integer"),
    (dict(d_conv=1.5), "d_conv must be a positive integer"),
    (dict(expand=-1), "expand must be a positive integer"),
])
def test_bad_ssm_config_is_refused_with_a_message(change, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**dict(vocab_size=10, n_ctx=8, n_layer=1, n_head=1, d_model=4, mixer="ssm"), **change})


def test_save_pretrained_refuses_an_ssm_model(tmp_path):
    model = GPT(GPTConfig(vocab_size=10, n_ctx=8, n_layer=1, n_head=1, d_model=4, mixer="ssm"))
    with pytest.raises(ValueError, match="mixer='ssm' model is not GPT-2"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_generate_with_the_ssm_state_matches_generation_without_cache():
    """tinylm.core.generate drives the ssm through the same KV-cache interface as attention."""
    from tinylm.core.generate import generate
    config = GPTConfig(vocab_size=20, n_ctx=12, n_layer=2, n_head=1, d_model=8, mixer="ssm", dtype="float64")
    model, _ = perturbed_model(config, 5)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    out = [generate(model, prompt, 15, top_k=1, rng=np.random.default_rng(0), use_cache=c) for c in (True, False)]
    np.testing.assert_array_equal(out[0], out[1])
    assert np.asarray(out[0]).shape[1] == 18               # past n_ctx: the sliding context rebuilds the state


@settings(max_examples=100)
@given(seed=seeds, B=st.integers(1, 2), T=st.integers(2, 6), C=st.integers(2, 5), N=st.integers(1, 3),
       K=st.integers(1, 3), expand=st.integers(1, 2), scale=st.sampled_from([0.1, 0.5]))
def test_checker_catches_10_percent_error_in_smallest_ssm_gradients(seed, B, T, C, N, K, expand, scale):
    """test_ssm_mixer's draws (Mamba's initialisation, perturbed), where A_log's and dt_proj.bias's
    gradients reach 1e-8…1e-13, under the old floor 1e-3·max(1, |f|) (which caught dA_log × 0.9 on
    72 of 150 draws): judged on their own scale, the true gradients pass and each scaled by 0.9
    fails, on all 100 draws. T ≥ 2: at T = 1, A never multiplies a state and its gradient is 0;
    C ≥ 2: at C = 1 it can fall to 1e-18 ≈ 1e-15·|f|, under float64's resolution for any checker."""
    _, params, f, _, grads = mixer_case(seed, B, T, C, N, K, expand, scale)
    small = {k: params[k] for k in ("A_log", "dt_proj.bias")}
    assert_close(check_gradients(f, small, grads, seed=seed))
    wrong = check_gradients(f, small, {k: 0.9 * grads[k] for k in small}, seed=seed)
    assert min(wrong.values()) > TOL, (wrong, {k: float(np.abs(grads[k]).max()) for k in small})


def test_dt_rank_is_ceil_of_d_model_over_16():
    assert [dt_rank(c) for c in (1, 16, 17, 32, 33, 768)] == [1, 1, 2, 2, 3, 48]


def test_ssm_init_is_mambas():
    """A_log = log(1..N) on every channel; D = 1; softplus(dt_proj.bias) = Δ log-uniform in
    [0.001, 0.1]; conv and dt_proj uniform in ±1/√fan-in (fan-in = shape[0]); out_proj N(0, out_std);
    in_proj and x_proj N(0, 0.02); conv.bias 0. Large shapes, so the ranges and stds are sharp."""
    rng = np.random.default_rng(0)
    shapes = ssm_param_shapes(d_model=64, d_state=8, d_conv=4, expand=2)        # E = 128, R = 4
    p = {name: ssm_init_param(name, shape, rng, out_std=0.005) for name, shape in shapes.items()}
    assert {k: v.shape for k, v in p.items()} == shapes
    np.testing.assert_array_equal(p["A_log"], np.log(np.tile(np.arange(1.0, 9.0), (128, 1))))
    assert np.all(p["D"] == 1.0) and np.all(p["conv.bias"] == 0.0)
    dt = softplus_forward(p["dt_proj.bias"])[0]
    assert dt.min() >= 1e-3 * (1 - 1e-9) and dt.max() <= 0.1 * (1 + 1e-9)
    assert abs(np.log(dt).mean() - np.log(1e-2)) < 0.3          # log-uniform: centred at √(0.001·0.1)
    for name in ("conv.weight", "dt_proj.weight"):
        bound = 1 / np.sqrt(shapes[name][0])
        w = p[name]
        assert np.abs(w).max() <= bound and w.max() > 0.9 * bound and w.min() < -0.9 * bound, name
    for name, std in (("out_proj.weight", 0.005), ("in_proj.weight", 0.02), ("x_proj.weight", 0.02)):
        assert abs(p[name].mean()) < 0.1 * std and abs(p[name].std() / std - 1) < 0.05, name
