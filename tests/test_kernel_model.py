"""GPT(config, kernels=True) against the NumPy model: the same loss and every gradient within 1e-4
relative, for a tiny ragged model (2 layers, T = 3, B = 2, dimensions no block size divides) with
attention and with the ssm mixer. Under the CUDA simulator (tests/conftest.py) the kernels run on
NumPy arrays on the CPU: the very kernel path GPT(config, device="cuda") takes on a GPU, whose
default is kernels=True; one python thread per CUDA thread makes the shapes tiny."""
import numpy as np
import pytest
from numba import config as numba_config

from tinylm import GPT, GPTConfig
from tinylm.optim import adamw_init, adamw_step, clip_grad_norm

pytestmark = pytest.mark.skipif(not numba_config.ENABLE_CUDASIM, reason="runs the kernels on NumPy arrays: "
                                "needs NUMBA_ENABLE_CUDASIM=1 (set by tests/conftest.py)")
TINY = dict(vocab_size=11, n_ctx=8, n_layer=2, n_head=2, d_model=12, d_state=3, d_conv=3, expand=1)


def batch(seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, TINY["vocab_size"], size=(2, 3))
    targets = rng.integers(0, TINY["vocab_size"], size=(2, 3))
    targets[1, 1] = -1                                       # an ignored position
    return idx, targets


def relative_error(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def assert_same_loss_and_grads(kernel_model, numpy_model, idx, targets):
    loss, grads = kernel_model.loss_and_grads(idx, targets)
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
    kernel_model = GPT(config, seed=1, kernels=True)
    reference = GPT(GPTConfig(**TINY, mixer=mixer, dtype="float64"), params=kernel_model.numpy_params())
    assert kernel_model.layers.flash_attention_forward.__module__ == "tinylm.kernel_layers"
    assert_same_loss_and_grads(kernel_model, reference, *batch(0))


def test_checker_catches_a_kernel_layer_bug(monkeypatch):
    """The comparison above can fail: a GELU kernel whose gradient is 1% off is seen."""
    from tinylm import kernel_layers
    config = GPTConfig(**{**TINY, "n_layer": 1})
    reference = GPT(GPTConfig(**{**TINY, "n_layer": 1}, dtype="float64"), seed=1)
    kernel_model = GPT(config, params=reference.numpy_params(), kernels=True)
    monkeypatch.setattr(kernel_model, "layers", kernel_model.layers._replace(
        gelu_backward=lambda dy, x: 1.01 * kernel_layers.gelu_backward(dy, x)))
    with pytest.raises(AssertionError):
        assert_same_loss_and_grads(kernel_model, reference, *batch(0))


def test_a_kernel_training_step_matches_the_numpy_step():
    """Clipping and AdamW (the AdamW kernel, via model.layers.adamw_update) move the weights as the
    NumPy step does."""
    config = GPTConfig(**{**TINY, "n_layer": 1})
    kernel_model = GPT(config, seed=2, kernels=True)
    reference = GPT(GPTConfig(**{**TINY, "n_layer": 1}, dtype="float64"), params=kernel_model.numpy_params())
    assert kernel_model.layers.adamw_update.__module__ == "tinylm.kernel_layers"
    for model in (kernel_model, reference):
        _, grads = model.loss_and_grads(*batch(3))
        clip_grad_norm(grads, 0.05)
        adamw_step(model.params, grads, adamw_init(model.params), lr=0.01, update=model.layers.adamw_update)
    for name, p in reference.params.items():
        np.testing.assert_allclose(kernel_model.params[name], p, rtol=1e-4, atol=1e-6, err_msg=name)


def test_kernel_path_needs_float32():
    with pytest.raises(ValueError, match="kernels=True needs dtype float32"):
        GPT(GPTConfig(**TINY, dtype="float64"), kernels=True)
    with pytest.raises(ValueError, match="kernels must be True, False or None"):
        GPT(GPTConfig(**TINY), kernels="yes")


@pytest.mark.parametrize("mixer", ["attention", "ssm"])
def test_kernel_path_continues_from_a_kv_cache(mixer):
    """Generation: the kernels' caches (flash k, v; the scan's last state) feed the next call."""
    model = GPT(GPTConfig(**{**TINY, "n_layer": 1}, mixer=mixer), seed=4, kernels=True)
    idx = batch(5)[0]                                 # B = 2: hs[:, -1] is a strided view
    cache = model.new_kv_cache()
    stepwise = np.concatenate([model.forward(idx[:, :2], cache), model.forward(idx[:, 2:], cache)], axis=1)
    np.testing.assert_allclose(stepwise, model.forward(idx), rtol=1e-4, atol=1e-5)
