"""GPT(config, kernels=True) against the NumPy model: the same loss and every gradient within 1e-4
relative, for a tiny ragged model (2 layers, T = 3, B = 2, dimensions no block size divides) with
attention and with the ssm mixer. Under the CUDA simulator (tests/conftest.py) the kernels run on
NumPy arrays on the CPU: the very kernel path GPT(config, device="cuda") takes on a GPU, whose
default is kernels=True; one python thread per CUDA thread makes the shapes tiny. With
NUMBA_ENABLE_CUDASIM=0 and CuPy on a GPU the same tests run GPT(config, device="cuda")."""
import importlib.util

import numpy as np
import pytest
from numba import config as numba_config

from tinylm import GPT, GPTConfig
from tinylm.core.backend import to_numpy
from tinylm.core.optim import adamw_init, adamw_step, clip_grad_norm

DEVICE = "cpu" if numba_config.ENABLE_CUDASIM else "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and importlib.util.find_spec("cupy") is None,
                                reason="the kernels need NUMBA_ENABLE_CUDASIM=1 (tests/conftest.py) or CuPy and a GPU")
TINY = dict(vocab_size=11, n_ctx=8, n_layer=2, n_head=2, d_model=12, d_state=3, d_conv=3, expand=1)


def batch(seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, TINY["vocab_size"], size=(2, 3))
    targets = rng.integers(0, TINY["vocab_size"], size=(2, 3))
    targets[1, 1] = -1                                       # an ignored position
    return idx, targets


def relative_error(got, want):
    return float(np.abs(to_numpy(got) - want).max() / max(np.abs(want).max(), 1e-30))


def kernel_gpt(config, **kwargs):
    return GPT(config, device=DEVICE, kernels=True, **kwargs)


def assert_same_loss_and_grads(kernel_model, numpy_model, idx, targets):
    loss, grads = kernel_model.loss_and_grads(kernel_model.xp.asarray(idx), kernel_model.xp.asarray(targets))
    loss_ref, grads_ref = numpy_model.loss_and_grads(idx, targets)
    assert abs(loss - loss_ref) <= 1e-4 * abs(loss_ref)
    assert set(grads) == set(grads_ref)
    errors = {name: relative_error(grads[name], grads_ref[name]) for name in grads_ref}
    assert max(errors.values()) <= 1e-4, sorted(errors.items(), key=lambda e: -e[1])[:3]


@pytest.mark.parametrize("mixer", ["attention", "ssm"])
def test_kernel_path_matches_the_numpy_model(mixer):
    """attention="auto" puts the flash kernels at every T on the kernel path (T = 3 here); the
    NumPy reference (float64, same weights) runs naive attention."""
    config = GPTConfig(**TINY, mixer=mixer)
    kernel_model = kernel_gpt(config, seed=1)
    reference = GPT(GPTConfig(**TINY, mixer=mixer, dtype="float64"), params=kernel_model.numpy_params())
    assert kernel_model.layers.flash_attention_forward.__module__ == "tinylm.core.kernel_layers"
    assert_same_loss_and_grads(kernel_model, reference, *batch(0))


def test_checker_catches_a_kernel_layer_bug(monkeypatch):
    """The comparison above can fail: a GELU kernel whose gradient is 1% off is seen."""
    from tinylm.core import kernel_layers
    config = GPTConfig(**{**TINY, "n_layer": 1})
    reference = GPT(GPTConfig(**{**TINY, "n_layer": 1}, dtype="float64"), seed=1)
    kernel_model = kernel_gpt(config, params=reference.numpy_params())
    monkeypatch.setattr(kernel_model, "layers", kernel_model.layers._replace(
        gelu_backward=lambda dy, x: 1.01 * kernel_layers.gelu_backward(dy, x)))
    with pytest.raises(AssertionError):
        assert_same_loss_and_grads(kernel_model, reference, *batch(0))


def test_a_kernel_training_step_matches_the_numpy_step():
    """Clipping and AdamW (the AdamW kernel, via model.layers.adamw_update) move the weights as the
    NumPy step does."""
    config = GPTConfig(**{**TINY, "n_layer": 1})
    kernel_model = kernel_gpt(config, seed=2)
    reference = GPT(GPTConfig(**{**TINY, "n_layer": 1}, dtype="float64"), params=kernel_model.numpy_params())
    assert kernel_model.layers.adamw_update.__module__ == "tinylm.core.kernel_layers"
    for model in (kernel_model, reference):
        _, grads = model.loss_and_grads(*(model.xp.asarray(a) for a in batch(3)))
        clip_grad_norm(grads, 0.05)
        adamw_step(model.params, grads, adamw_init(model.params), lr=0.01, update=model.layers.adamw_update)
    for name, p in reference.params.items():
        np.testing.assert_allclose(to_numpy(kernel_model.params[name]), p, rtol=1e-4, atol=1e-6, err_msg=name)


def test_the_kernel_train_step_matches_the_numpy_train_step():
    """optim.train_step on each path, three steps with the clip active (norm > 0.05): on the kernel path
    one Σ g² launch and one multi-tensor AdamW over the flat arena (kernel_layers.clip_and_adamw), with
    the clip scale applied on the device; the same Step numbers and weights as the float64 NumPy step."""
    from tinylm.core.optim import Schedule, train_step
    config = GPTConfig(**{**TINY, "n_layer": 1})
    kernel_model = kernel_gpt(config, seed=2)
    reference = GPT(GPTConfig(**{**TINY, "n_layer": 1}, dtype="float64"), params=kernel_model.numpy_params())
    states = {model: adamw_init(model.params) for model in (kernel_model, reference)}
    for seed in (3, 4, 5):
        got, want = (train_step(model, state, *batch(seed), Schedule(0.01, 3, 1, 0.001), grad_clip=0.05)
                     for model, state in states.items())
        assert got.stepped and want.stepped and got.lr == want.lr and want.grad_norm > 0.05
        assert got.loss == pytest.approx(want.loss, rel=1e-5) and got.grad_norm == pytest.approx(want.grad_norm, rel=1e-4)
    assert states[kernel_model]["step"] == 3
    for name, p in reference.params.items():
        np.testing.assert_allclose(to_numpy(kernel_model.params[name]), p, rtol=1e-4, atol=1e-6, err_msg=name)


def test_kernel_path_needs_float32():
    with pytest.raises(ValueError, match="kernels=True needs dtype float32"):
        kernel_gpt(GPTConfig(**TINY, dtype="float64"))
    with pytest.raises(ValueError, match="kernels must be True, False or None"):
        GPT(GPTConfig(**TINY), kernels="yes")


@pytest.mark.parametrize("mixer", ["attention", "ssm"])
def test_kernel_path_continues_from_a_kv_cache(mixer):
    """Generation: the kernels' caches (flash k, v; the scan's last state) feed the next call."""
    model = kernel_gpt(GPTConfig(**{**TINY, "n_layer": 1}, mixer=mixer), seed=4)
    idx = model.xp.asarray(batch(5)[0])                                 # B = 2: hs[:, -1] is a strided view
    cache = model.new_kv_cache()
    stepwise = [to_numpy(model.forward(idx[:, :2], cache)), to_numpy(model.forward(idx[:, 2:], cache))]
    np.testing.assert_allclose(np.concatenate(stepwise, axis=1), to_numpy(model.forward(idx)), rtol=1e-4, atol=1e-5)
