"""kernels/selective_scan.py against the NumPy scan of tinylm/core/ssm.py within 1e-5 (float32 kernel,
float64 reference), forward and backward, on tiny shapes: under the CUDA simulator by default
(tests/conftest.py), on a real GPU with NUMBA_ENABLE_CUDASIM=0 (CuPy arrays, as bench/gpu_check.sh
runs tests/test_kernels.py). Its PTX is checked for float64 by kernels/ptx_check.py."""
import numpy as np
import pytest

from test_kernels import close, device  # noqa: E402  (tests/ is on sys.path)
from tinylm.kernels.selective_scan import selective_scan_backward, selective_scan_forward
from tinylm.core import ssm


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
    close(hs, cache.hs)                                   # every state h_t, read by the backward
    dy = rng.normal(size=(B, T, E)).astype(np.float32)
    want = ssm.selective_scan_backward(dy.astype(np.float64), cache)
    got = selective_scan_backward(device(dy), *on_device, hs, h0_device)
    for g, w in zip(got, want):
        close(g, w)


def test_kernel_matches_over_several_blocks():
    """B·E = 14 threads at 4 per block: 4 blocks, the last one half idle. Checked: with the thread
    index taken as cuda.threadIdx.x instead of cuda.grid(1) (right for one block only), this test
    fails while the single-block ones above pass."""
    rng = np.random.default_rng(9)
    inputs, args64 = scan_inputs(rng, 2, 3, 7, 2)
    y_ref, cache = ssm.selective_scan_forward(*args64)
    on_device = [device(x) for x in inputs.values()]
    y, hs = selective_scan_forward(*on_device, threads=4)
    close(y, y_ref)
    dy = rng.normal(size=(2, 3, 7)).astype(np.float32)
    got = selective_scan_backward(device(dy), *on_device, hs, threads=4)
    for g, w in zip(got, ssm.selective_scan_backward(dy.astype(np.float64), cache)):
        close(g, w)


def test_kernel_refuses_float64():
    inputs, _ = scan_inputs(np.random.default_rng(0), 1, 2, 2, 2)
    inputs["u"] = inputs["u"].astype(np.float64)
    with pytest.raises(ValueError, match="u must be float32"):
        selective_scan_forward(*inputs.values())


# The PTX check (no .f64 in these kernels) is kernels/ptx_check.py's, run by tests/test_kernels.py.
