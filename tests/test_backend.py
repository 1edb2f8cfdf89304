"""The device switch: `import tinylm` loads neither CuPy nor Numba, asking for a GPU without CuPy is
a clear ValueError, and the matmul choice is validated."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.backend import matmul, scatter_add

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_tinylm_needs_no_cupy_and_no_numba():
    code = ("import sys, tinylm, tinylm.flash_attention; "
            "print(sorted(m for m in ('cupy', 'numba', 'kernels') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
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
