"""Every block is "mix tokens, then an MLP": x + mixer(ln_1(x)), then x + mlp(ln_2(x)). Any causal
token mixer plugs into that same block (GPT.block_forward / block_backward, unchanged): attention,
the selective state-space model, and here a trivial third, the causal running mean, whose forward
and backward are written below. Each one keeps the model causal, has exact gradients and trains.

The third mixer plugs in through GPT's one hook for it: the bound pair `model.mixer_forward(a, i,
past, dropout) -> (out, cache, state)` / `model.mixer_backward(da, cache, i, grads) -> da` chosen in
GPT.__init__ (dropout: training's model.Dropout or None, for a mixer with weights to drop); no
model.py edit."""
import numpy as np
import pytest

from tinylm.core.gradcheck import check_gradients
from tinylm.core.model import GPT, GPTConfig
from tinylm.core.optim import Schedule, adamw_init
from tinylm.core.optim import train_step


def running_mean_forward(x):
    """y_t = (1/(t+1))·Σ_{s≤t} x_s: each position sees the average of itself and its past.
    x (B, T, C) -> y (B, T, C), cache = the counts t+1 (T, 1)."""
    counts = np.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
    return np.cumsum(x, axis=1) / counts, counts


def running_mean_backward(dy, counts):
    """dx_s = Σ_{t≥s} dy_t/(t+1): the forward is a lower-triangular averaging matrix, so its
    transpose sums the scaled gradients of every later position (a reversed cumulative sum)."""
    scaled = dy / counts
    return np.flip(np.cumsum(np.flip(scaled, axis=1), axis=1), axis=1)


class RunningMeanGPT(GPT):
    """GPT whose token mixer is the parameter-free running mean: the attention weights are dropped
    and the same blocks call the running mean through the mixer hook."""

    def __init__(self, config, seed=0):
        super().__init__(config, seed)
        self.params = {k: v for k, v in self.params.items() if ".attn." not in k}
        self.mixer_forward, self.mixer_backward = self.mean_sublayer_forward, self.mean_sublayer_backward

    def mean_sublayer_forward(self, a, i, past=None, dropout=None):      # no attention weights to drop
        if past is not None:
            raise ValueError("the running-mean mixer keeps no generation state")
        out, counts = running_mean_forward(a)
        return out, counts, None

    def mean_sublayer_backward(self, da, cache, i, grads):
        return running_mean_backward(da, cache)


def tiny_model(kind, dtype="float64", seed=0):
    config = GPTConfig(vocab_size=11, n_ctx=12, n_layer=2, n_head=2, d_model=16, dtype=dtype, d_state=4,
                       mixer="ssm" if kind == "ssm" else "attention")
    return RunningMeanGPT(config, seed) if kind == "running mean" else GPT(config, seed)


MIXER_KINDS = ["attention", "ssm", "running mean"]


def broken_running_mean_backward(dy, counts):
    """Planted bug: a forward cumulative sum (the forward's pattern) instead of the transpose's."""
    return np.cumsum(dy / counts, axis=1)


@pytest.mark.parametrize("backward, ok", [(running_mean_backward, True), (broken_running_mean_backward, False)])
def test_running_mean_gradient_matches_finite_differences(backward, ok):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(2, 7, 3)), rng.normal(size=(2, 7, 3))
    y, counts = running_mean_forward(x)
    errors = check_gradients(lambda: float((running_mean_forward(x)[0] * w).sum()), {"x": x},
                             {"x": backward(w, counts)})
    assert (errors["x"] < 1e-8) == ok, errors


def test_running_mean_is_the_mean_of_the_prefix():
    x = np.random.default_rng(1).normal(size=(2, 5, 3))
    y, _ = running_mean_forward(x)
    for t in range(5):
        assert np.allclose(y[:, t], x[:, :t + 1].mean(axis=1))


@pytest.mark.parametrize("kind", MIXER_KINDS)
def test_every_mixer_uses_the_same_block(kind):
    """The block code is GPT's own; only the mixer's parameters differ between kinds."""
    model = tiny_model(kind)
    assert type(model).block_forward is GPT.block_forward and type(model).block_backward is GPT.block_backward
    shared = {k for k in tiny_model("attention").params if ".attn." not in k}
    assert shared <= set(model.params)
    assert all(".attn." in k or ".ssm." in k for k in set(model.params) - shared)


def sees_the_future(model):
    """Whether changing token 7 changes any logit before position 7."""
    idx = np.random.default_rng(2).integers(0, 11, size=(2, 12))
    changed = idx.copy()
    changed[:, 7] = (changed[:, 7] + 1) % 11
    a, b = model.forward(idx), model.forward(changed)
    assert not np.allclose(a[:, 7:], b[:, 7:])
    return not np.allclose(a[:, :7], b[:, :7])


@pytest.mark.parametrize("kind", MIXER_KINDS)
def test_every_mixer_keeps_the_model_causal(kind):
    assert not sees_the_future(tiny_model(kind))


def test_a_mixer_that_sees_the_future_is_caught():
    """Planted bug: the mean over every position instead of the prefix."""
    model = tiny_model("running mean")
    model.mixer_forward = lambda a, i, past=None, dropout=None: (
        np.broadcast_to(a.mean(axis=1, keepdims=True), a.shape), None, None)
    assert sees_the_future(model)


@pytest.mark.parametrize("kind", MIXER_KINDS)
def test_every_mixer_gives_exact_gradients_through_the_block(kind):
    model = tiny_model(kind)
    rng = np.random.default_rng(3)
    idx, targets = rng.integers(0, 11, size=(2, 6)), rng.integers(0, 11, size=(2, 6))
    _, grads = model.loss_and_grads(idx, targets)
    assert set(grads) == set(model.params)
    names = ["h.0.ln_1.weight", "h.0.mlp.c_fc.weight", "h.1.ln_2.bias", "wte.weight"]
    errors = check_gradients(lambda: model.loss(idx, targets), {n: model.params[n] for n in names},
                             {n: grads[n] for n in names}, max_entries=8)
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("kind", MIXER_KINDS)
def test_every_mixer_trains(kind):
    """A repeating pattern, 60 AdamW steps: the loss falls well below the untrained ln 11 ≈ 2.4."""
    model = tiny_model(kind, dtype="float32")
    opt = adamw_init(model.params)
    pattern = np.array([3, 7, 1, 9, 4, 0, 8, 2, 10, 5, 6])         # each token has one successor
    rng = np.random.default_rng(4)
    losses = []
    for _ in range(60):
        starts = rng.integers(0, len(pattern), size=8)
        seq = pattern[(starts[:, None] + np.arange(13)) % len(pattern)]
        losses.append(train_step(model, opt, seq[:, :-1], seq[:, 1:], Schedule.constant(1e-2)).loss)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), (losses[:5], losses[-5:])
