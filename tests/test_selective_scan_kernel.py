"""kernels/selective_scan.py against the NumPy scan of tinylm/ssm.py, under Numba's CUDA simulator,
and its PTX for sm_90 free of float64. Each runs in a subprocess: NUMBA_ENABLE_CUDASIM must be set
before numba is first imported, and the PTX compiler needs it unset."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIMULATED = r"""
import numpy as np
from kernels.selective_scan import selective_scan_backward, selective_scan_forward
from tinylm import ssm

rng = np.random.default_rng(0)
for B, T, E, N, with_h0 in [(2, 5, 3, 4, False), (1, 7, 2, 3, True), (1, 1, 1, 1, False)]:
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
    u, Bm, Cm, D = f32(B, T, E), f32(B, T, N), f32(B, T, N), f32(E)
    delta = np.exp(f32(B, T, E) - 1).astype(np.float32)
    A_log = (0.5 * f32(E, N)).astype(np.float32)
    h0 = f32(B, E, N) if with_h0 else None
    args64 = [x.astype(np.float64) for x in (u, delta, A_log, Bm, Cm, D)]
    h0_64 = None if h0 is None else h0.astype(np.float64)
    y_ref, cache = ssm.selective_scan_forward(*args64, h0_64)
    y, hs = selective_scan_forward(u, delta, A_log, Bm, Cm, D, h0)
    assert y.dtype == np.float32 and hs.shape == (B, T, E, N)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hs, cache[7], rtol=1e-5, atol=1e-5)
    dy = f32(B, T, E)
    ref = ssm.selective_scan_backward(dy.astype(np.float64), cache)
    got = selective_scan_backward(dy, u, delta, A_log, Bm, Cm, D, hs, h0)
    for name, g, r in zip(["du", "ddelta", "dA_log", "dBm", "dCm", "dD"], got, ref):
        assert g.shape == r.shape, name
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=name)
try:
    selective_scan_forward(u.astype(np.float64), delta, A_log, Bm, Cm, D)
except ValueError as e:
    assert "u must be float32" in str(e), e
else:
    raise AssertionError("float64 input accepted")
print("OK")
"""

PTX = r"""
from numba import cuda
from kernels.selective_scan import kernels_and_signatures
for name, kernel, signature in kernels_and_signatures():
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
    f64 = [line for line in ptx.splitlines() if ".f64" in line]
    assert not f64, (name, f64[:5])
    assert "ex2.approx.f32" in ptx or "ex2.approx.ftz.f32" in ptx, name     # exp ran in float32
print("OK")
"""


def run(script, simulator):
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1" if simulator else "0", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


def test_kernel_matches_numpy_scan_in_the_simulator():
    run(SIMULATED, simulator=True)


def test_kernel_ptx_has_no_float64():
    run(PTX, simulator=False)
