"""Dropout (GPT-2's embd/attn/resid_pdrop), forward and backward by hand: each gradient against
central differences with the masks held fixed (the same seed draws the same masks), a planted
error caught, E[out] = x, and only training drops: evaluation, sampling and p = 0 never do; a run
with dropout resumes bit for bit."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm import GPT, GPTConfig
from tinylm.core import model as model_module
from tinylm.train.checkpoint import load_model
from tinylm.cli import main
from tinylm.core.gradcheck import check_gradients
from tinylm.core.layers import attention_backward, attention_forward, dropout_backward, dropout_forward
from tinylm.core.model import Dropout

from test_layers import assert_close, project  # noqa: E402  (tests/ is on sys.path)

seeds = st.integers(0, 2**31 - 1)
rates = st.sampled_from([0.1, 0.5, 0.9])


@given(seed=seeds, p=rates, shape=st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_dropout_backward_matches_finite_differences(seed, p, shape):
    rng = np.random.default_rng(seed)
    x, keep = rng.normal(size=shape), rng.random(shape) >= p
    G, loss = project(dropout_forward(x, keep, p)[0], rng)
    dx = dropout_backward(G, dropout_forward(x, keep, p)[1])
    assert_close(check_gradients(lambda: loss(dropout_forward(x, keep, p)[0]), {"x": x}, {"x": dx}))


@given(seed=seeds, p=rates, B=st.integers(1, 2), T=st.integers(1, 5), H=st.integers(1, 2), hd=st.integers(1, 3))
def test_attention_with_dropped_weights_matches_finite_differences(seed, p, B, T, H, hd):
    rng = np.random.default_rng(seed)
    qkv = rng.normal(size=(B, T, 3 * H * hd))
    keep = rng.random((B, H, T, T)) >= p
    G, loss = project(attention_forward(qkv, H, None, keep, p)[0], rng)
    dqkv = attention_backward(G, attention_forward(qkv, H, None, keep, p)[1])
    assert_close(check_gradients(lambda: loss(attention_forward(qkv, H, None, keep, p)[0]), {"qkv": qkv},
                                 {"qkv": dqkv}))


def sharp_model(mixer="attention", seed=0):
    config = GPTConfig(vocab_size=7, n_ctx=5, n_layer=2, n_head=2, d_model=6, dtype="float64", mixer=mixer)
    model = GPT(config, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for p in model.params.values():
        p += rng.normal(size=p.shape) * 0.3
    return model


def model_errors(model, p=0.3, seed=0):
    """The model's gradient under dropout against finite differences of the same network: every
    evaluation draws its masks from a fresh generator with one seed, so the masks are fixed."""
    rng = np.random.default_rng(seed)
    idx, targets = rng.integers(0, 7, size=(2, 5)), rng.integers(0, 7, size=(2, 5))
    loss, grads = model.loss_and_grads(idx, targets, dropout=Dropout(p, np.random.default_rng(seed)))
    weights = model.mean_weights(idx, targets)

    def f():
        return float((model.token_nll(idx, targets, Dropout(p, np.random.default_rng(seed)))[0] * weights).sum())
    assert loss == pytest.approx(f(), rel=1e-12)
    assert loss != pytest.approx(model.loss(idx, targets), rel=1e-3)          # something was dropped
    return check_gradients(f, model.params, grads, max_entries=6, seed=seed)


@pytest.mark.parametrize("mixer", ["attention", "ssm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_model_gradients_under_dropout_match_finite_differences(mixer, seed):
    errors = model_errors(sharp_model(mixer, seed), seed=seed)
    bad = {k: e for k, e in errors.items() if not e <= 1e-6}
    assert not bad, f"relative gradient error above 1e-6: {bad}"


@pytest.mark.parametrize("planted", ["no scale", "embedding mask skipped"])
def test_the_check_catches_a_wrong_dropout_backward(planted, monkeypatch):
    real = model_module.drop_backward
    if planted == "no scale":
        monkeypatch.setattr(model_module, "drop_backward",
                            lambda dx, cache: dx if cache is None else dx * cache.keep)
    else:           # the embeddings' mask is the only one of shape (B, T, C) met after every block
        calls = []

        def skip_last(dx, cache):
            calls.append(1)
            return dx if len(calls) % 5 == 0 else real(dx, cache)
        monkeypatch.setattr(model_module, "drop_backward", skip_last)
    errors = model_errors(sharp_model())
    assert max(errors.values()) > 1e-3, errors


def test_dropout_keeps_the_mean_and_drops_a_share_p():
    x = np.ones((400, 500))
    keep = Dropout(0.3, np.random.default_rng(0)).keep(np, x.shape)
    out, _ = dropout_forward(x, keep, 0.3)
    assert abs((~keep).mean() - 0.3) < 0.005 and abs(out.mean() - 1.0) < 0.01
    assert set(np.unique(out)) == {0.0, 1 / 0.7}


def test_without_a_dropout_nothing_is_dropped():
    """Evaluation (model.loss, forward, the KV-cache path) takes no Dropout: the same numbers as a
    training step's loss without one."""
    model = sharp_model()
    idx = np.random.default_rng(3).integers(0, 7, size=(2, 5))
    loss, _ = model.loss_and_grads(idx[:, :-1], idx[:, 1:])
    assert loss == model.loss(idx[:, :-1], idx[:, 1:])
    np.testing.assert_array_equal(model.forward(idx), model.forward(idx))


def test_a_run_with_dropout_resumes_bit_for_bit_and_dropout_changes_it(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 40, encoding="utf-8")
    tiny = ["--data", str(data), "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--n-ctx", "16",
            "--batch-size", "2", "--warmup", "1", "--steps", "6", "--checkpoint-every", "3", "--quiet"]
    for out, extra in [("whole", ["--dropout", "0.2"]), ("split", ["--dropout", "0.2", "--stop-at", "3"]),
                       ("none", [])]:
        assert main(["pretrain", *tiny, *extra, "--out", str(tmp_path / out)]) == 0
    assert main(["pretrain", "--resume", "--out", str(tmp_path / "split"), "--quiet"]) == 0
    whole, split, none = (load_model(str(tmp_path / r))[0] for r in ("whole", "split", "none"))
    for k, p in whole.params.items():
        np.testing.assert_array_equal(split.params[k], p, err_msg=k)
    assert any(not np.array_equal(none.params[k], p) for k, p in whole.params.items())


@pytest.mark.parametrize("value, message", [("1", "must be in [0, 1), got 1"), ("-0.1", "must be in [0, 1), got -0.1")])
def test_a_dropout_outside_0_1_is_refused_by_the_flag(value, message, capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--dropout", value])
    assert f"argument --dropout: {message}" in capsys.readouterr().err
