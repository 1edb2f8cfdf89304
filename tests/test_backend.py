"""The device switch: `import tinylm` loads neither CuPy nor Numba, asking for a GPU without CuPy is
a clear ValueError, and the matmul choice is validated."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.core.backend import matmul, scatter_add

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_tinylm_needs_no_cupy_and_no_numba():
    code = ("import sys, tinylm, tinylm.core.flash_attention; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'numba', 'kernels') "
            "or m.startswith('tinylm.kernels.')))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr


def test_cuda_without_cupy_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)          # `import cupy` now raises ImportError
    with pytest.raises(ValueError, match="device='cuda' needs CuPy"):
        GPT(GPTConfig(vocab_size=5, n_ctx=4, n_layer=1, n_head=1, d_model=4), device="cuda")
    with pytest.raises(ValueError, match=r"device must be one of \('cpu', 'cuda'\)"):
        GPT(GPTConfig(vocab_size=5, n_ctx=4, n_layer=1, n_head=1, d_model=4), device="gpu")


def test_matmul_transposes_and_scatter_add_accumulates():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(5, 3))
    np.testing.assert_array_equal(matmul(a, b, trans_b=True), a @ b.T)
    np.testing.assert_array_equal(matmul(a.T, b.T, trans_a=True), a @ b.T)
    target = np.zeros((3, 2))
    scatter_add(target, np.array([1, 1, 2]), np.ones((3, 2)))
    np.testing.assert_array_equal(target, [[0, 0], [2, 2], [1, 1]])


# ----------------------------------------------------------------------------- the CuPy path, run on NumPy
def test_auto_attention_never_runs_the_blocked_flash_on_cupy():
    """On CuPy without kernels "auto" stays naive (cuBLAS) at every T; on NumPy it switches at
    FLASH_MIN_T; explicit "flash" is honoured everywhere."""
    from tinylm.core.model import FLASH_MIN_T, layers_for
    auto, flash = GPTConfig(attention="auto"), GPTConfig(attention="flash")
    cupy_layers, numpy_layers = layers_for("cuda", False, "float32"), layers_for("cpu", False, "float32")
    assert not auto.uses_flash(10**6, cupy_layers.auto_flash_from) and flash.uses_flash(8, cupy_layers.auto_flash_from)
    assert auto.uses_flash(FLASH_MIN_T, numpy_layers.auto_flash_from)
    assert not auto.uses_flash(FLASH_MIN_T - 1, numpy_layers.auto_flash_from)


def test_grad_norm_reads_the_device_once():
    """Clipping syncs the host once per step, not once per parameter: a float() of a device array is
    a sync, so count them on an ndarray subclass that stands in for CuPy's. Checked: the former
    sum of per-parameter float()s reads 4 times here."""
    from tinylm.core.optim import clip_grad_norm
    reads = []

    class DeviceArray(np.ndarray):
        def __float__(self):
            reads.append(1)
            return float(np.asarray(self))
    grads = {name: np.full(3, 2.0).view(DeviceArray) for name in "abcd"}
    assert clip_grad_norm(grads, 1.0) == pytest.approx(np.sqrt(4 * 3 * 4.0))
    assert len(reads) == 1
    np.testing.assert_allclose(np.sqrt(sum(float((g * g).sum()) for g in grads.values())), 1.0, rtol=1e-6)


def test_lm_head_multiplies_by_wte_through_trans_b():
    """No wte.T view (a strided read for a GEMM kernel) and no copy: the head hands wte itself to the
    GEMM with trans_b, and its gradient comes back in wte's (V, C) layout."""
    from tinylm.core.layers import lm_head_backward, lm_head_forward
    calls = []

    def gemm(a, b, trans_a=False, trans_b=False):
        calls.append((b, trans_a, trans_b))
        return matmul(a, b, trans_a, trans_b)
    rng = np.random.default_rng(1)
    z, wte, dlogits = rng.normal(size=(2, 3, 4)), rng.normal(size=(5, 4)), rng.normal(size=(2, 3, 5))
    logits, cache = lm_head_forward(z, wte, gemm)
    assert calls[0][0] is wte and calls[0][2] is True
    np.testing.assert_allclose(logits, z @ wte.T)
    dz, dwte = lm_head_backward(dlogits, cache)
    np.testing.assert_allclose(dz, dlogits @ wte)
    np.testing.assert_allclose(dwte, dlogits.reshape(-1, 5).T @ z.reshape(-1, 4))
    assert dwte.flags.c_contiguous


def test_causal_mask_is_built_in_its_dtype():
    """The T×T mask costs its own float32 bytes at its peak, not a float64 array first and a cast.
    Checked: the former xp.where(future, -inf, 0.0).astype(dtype) peaks at 3× the mask's size."""
    import tracemalloc
    from tinylm.core.layers import causal_mask
    tracemalloc.start()
    mask = causal_mask(np, 512, 512, np.float32)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert mask.dtype == np.float32 and np.isneginf(mask[0, 1]) and mask[1, 0] == 0
    assert peak < 1.6 * mask.nbytes, peak / mask.nbytes


def test_no_kernels_flag_on_every_device_command():
    from tinylm.cli import build_parser
    parser = build_parser()
    for command in (["pretrain"], ["sample"]):
        assert parser.parse_args(command + ["--device", "cuda"]).kernels is None       # GPT's default: kernels on cuda
        assert parser.parse_args(command + ["--device", "cuda", "--no-kernels"]).kernels is False


def test_kernels_on_the_cpu_need_the_simulator():
    code = ("from tinylm import GPT, GPTConfig\n"
            "try:\n    GPT(GPTConfig(vocab_size=5, n_ctx=4, n_layer=1, n_head=1, d_model=4), kernels=True)\n"
            "except ValueError as e:\n    print(e)\n")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert "set NUMBA_ENABLE_CUDASIM=1" in run.stdout, run.stdout + run.stderr
