"""Every rung of bench/gpu_ladder.py's SGEMM ladder against NumPy, under the CUDA simulator with
tiles small enough for it (one Python thread per CUDA thread). Rungs 2–5 take shapes their tiles
divide (as siboehm's kernels do); rung 1 and rung 6 (kernels.matmul) ragged ones."""
import os
import sys

import numpy as np
import pytest
from numba import config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import gpu_ladder  # noqa: E402

pytestmark = pytest.mark.skipif(not config.ENABLE_CUDASIM, reason="runs the rungs on NumPy arrays under the simulator")
SMALL = gpu_ladder.SIMULATOR_TILES
RAGGED = {"1 naive", "6 warp-tiled"}


@pytest.mark.parametrize("rung", list(SMALL))
def test_rung_matches_numpy(rung):
    M, N, K = (17, 23, 9) if rung in RAGGED else (16, 16, 8)
    rng = np.random.default_rng(len(rung))
    a, b = rng.normal(size=(M, K)).astype(np.float32), rng.normal(size=(K, N)).astype(np.float32)
    got = gpu_ladder.multiply(rung, a, b, **SMALL[rung])
    np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)


def test_the_ladder_lists_six_rungs_ending_at_kernels_matmul():
    assert list(SMALL) == gpu_ladder.RUNGS_IN_ORDER == [*gpu_ladder.RUNGS, "6 warp-tiled"]
