"""kernels/selective_scan.py against the NumPy scan of tinylm/ssm.py within 1e-5 (float32 kernel,
float64 reference), forward and backward, on tiny shapes: under the CUDA simulator by default
(tests/conftest.py), on a real GPU with NUMBA_ENABLE_CUDASIM=0 (CuPy arrays, as bench/gpu_check.sh
runs tests/test_kernels.py). Plus its PTX for sm_90 free of float64 instructions."""
import os
import subprocess
import sys

import numpy as np
import pytest

from test_kernels import close, device  # noqa: E402  (tests/ is on sys.path)
from kernels.selective_scan import selective_scan_backward, selective_scan_forward
from tinylm import ssm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scan_inputs(rng, B, T, E, N):
    """float32 inputs (Δ > 0, as softplus makes it) and their float64 copies for the reference."""
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
    inputs = dict(u=f32(B, T, E), delta=np.exp(f32(B, T, E) - 1), A_log=0.5 * f32(E, N),
                  Bm=f32(B, T, N), Cm=f32(B, T, N), D=f32(E))
    return inputs, [x.astype(np.float64) for x in inputs.values()]


@pytest.mark.parametrize("B,T,E,N,with_h0", [(2, 5, 3, 4, False), (1, 7, 2, 3, True), (1, 1, 1, 1, False)])
def test_kernel_matches_the_numpy_scan(B, T, E, N, with_h0):
    rng = np.random.default_rng(T)
    inputs, args64 = scan_inputs(rng, B, T, E, N)
    h0 = rng.normal(size=(B, E, N)).astype(np.float32) if with_h0 else None
    y_ref, cache = ssm.selective_scan_forward(*args64, None if h0 is None else h0.astype(np.float64))
    on_device = [device(x) for x in inputs.values()]
    h0_device = None if h0 is None else device(h0)
    y, hs = selective_scan_forward(*on_device, h0_device)
    close(y, y_ref)
    close(hs, cache[7])                                   # every state h_t, read by the backward
    dy = rng.normal(size=(B, T, E)).astype(np.float32)
    want = ssm.selective_scan_backward(dy.astype(np.float64), cache)
    got = selective_scan_backward(device(dy), *on_device, hs, h0_device)
    for g, w in zip(got, want):
        close(g, w)


def test_kernel_refuses_float64():
    inputs, _ = scan_inputs(np.random.default_rng(0), 1, 2, 2, 2)
    inputs["u"] = inputs["u"].astype(np.float64)
    with pytest.raises(ValueError, match="u must be float32"):
        selective_scan_forward(*inputs.values())


PTX = r"""
from numba import cuda
from kernels.selective_scan import kernels_and_signatures
for name, kernel, signature in kernels_and_signatures():
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
    f64 = [line for line in ptx.splitlines() if ".f64" in line]
    assert not f64, (name, f64[:5])
    assert ".f32" in ptx and "ex2.approx" in ptx, name          # exp(ΔA) compiled, in float32
print("OK")
"""


def test_kernel_ptx_has_no_float64():
    """compile_ptx needs the real CUDA target (not the simulator) but no GPU: a subprocess."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", PTX], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]
