"""kernels/flash_attention.py against tinylm/flash_attention.py (NumPy, float64), forward and
backward, on tiny ragged shapes under the CUDA simulator (tests/conftest.py sets
NUMBA_ENABLE_CUDASIM=1 unless told otherwise; on a GPU the same tests pass CuPy arrays).

Small tiles keep the simulator fast (one Python thread per CUDA thread) while still exercising
what the default tiles do: several row blocks, several streamed tiles, a row split across
threads, the causal skip and mask, T not a multiple of either tile, zero-padding of head_dim up to
its compiled bucket. Planted bugs these tests catch (each tried by hand, 2-4 cases fail):
dropping the `alpha` rescale of acc; masking with `key < query`; starting dk_dv's causal query
loop one tile late; loading dq's K without the folded-in scale; masking the forward only in tiles
past T (not in tiles crossing the diagonal); never masking P in the backward.
"""
import numpy as np
import pytest
from numba import config

import kernels
from kernels.flash_attention import (DEFAULT_TILES, HEAD_DIMS, Tiles, check_tiles, head_dim_bucket,
                                     kernels_and_signatures, launch_threads)
from tinylm.backend import to_numpy
from tinylm.flash_attention import flash_backward, flash_forward

SMALL = Tiles(8, 4, 4, 2)        # 8 threads; each owns 2 rows × 2 keys, a row split over 2 threads


def device(x):
    """float32 input for a kernel: NumPy under the simulator, CuPy on a real GPU."""
    x = np.asarray(x, dtype=np.float32)
    if config.ENABLE_CUDASIM:
        return x
    import cupy
    return cupy.asarray(x)


def assert_close(got, want):
    """≤ 1e-4 relative to the array's own scale (float32 kernels vs a float64 reference); the 1e-7
    floor only matters where the true gradient is exactly 0 (T = 1: dq = dk = 0)."""
    got = to_numpy(got)
    error, scale = np.abs(got - want).max(), np.abs(want).max()
    assert error <= 1e-4 * scale + 1e-7, f"max error {error:.2e} vs scale {scale:.2e}"


@pytest.mark.parametrize("B,H,T,hd,causal,tiles", [
    (1, 2, 13, 8, True, SMALL),                 # T not a multiple of 8 or 4; B·H = 2
    (2, 1, 11, 6, False, SMALL),                # head_dim 6 zero-padded to the 32 bucket
    (1, 1, 1, 32, True, SMALL),                 # T = 1: one row, one key
    (1, 1, 9, 64, True, Tiles(4, 8, 2, 2)),     # COLS > ROWS; the 64 bucket
    (1, 1, 5, 128, True, Tiles(4, 4, 2, 2)),    # the largest head_dim
    (1, 2, 11, 32, True, Tiles(8, 8, 2, 8)),    # thread_cols 8 like DEFAULT_TILES (TD = HD/8)
])
def test_flash_kernels_match_numpy(B, H, T, hd, causal, tiles):
    rng = np.random.default_rng(T + hd)
    q, k, v, do = (rng.normal(size=(B, H, T, hd)) for _ in range(4))
    o_ref, lse_ref = flash_forward(q, k, v, causal)
    o, lse = kernels.flash_attention_forward(device(q), device(k), device(v), causal, tiles)
    assert_close(o, o_ref)
    assert_close(lse, lse_ref)
    grads = kernels.flash_attention_backward(device(q), device(k), device(v), o, lse, device(do), causal, tiles)
    for got, want in zip(grads, flash_backward(q, k, v, o_ref, lse_ref, do, causal)):
        assert_close(got, want)


def test_head_dim_buckets_and_tile_checks():
    assert [head_dim_bucket(hd) for hd in (1, 32, 33, 64, 65, 128)] == [32, 32, 64, 64, 128, 128]
    with pytest.raises(ValueError, match="head_dim must be at most 128"):
        head_dim_bucket(129)
    with pytest.raises(ValueError, match="thread_cols dividing"):
        check_tiles((8, 4, 4, 3), 32)
    for HD, pair in DEFAULT_TILES.items():          # the tiles the GPU runs divide evenly too
        for tiles in pair:
            assert check_tiles(tiles, HD) == tiles


def test_flash_attention_rejects_bad_input():
    q = np.zeros((1, 1, 4, 129), np.float32)
    with pytest.raises(ValueError, match="head_dim must be at most 128"):
        kernels.flash_attention_forward(q, q, q)
    q = np.zeros((1, 1, 4, 8), np.float32)
    with pytest.raises(ValueError, match="k must have shape"):
        kernels.flash_attention_forward(q, q[:, :, :3], q)
    with pytest.raises(ValueError, match="float32"):
        kernels.flash_attention_forward(q.astype(np.float64), q, q)


def test_registry_lists_every_specialisation_with_its_launch_size():
    """kernels.report compiles what kernels_and_signatures() lists: forward, dk_dv and dq per
    head_dim bucket, plus row_dot, each with the threads per block the entry points launch."""
    names = [name for name, _, _ in kernels_and_signatures()]
    assert len(names) == 3 * len(HEAD_DIMS) + 1 and set(names) == set(launch_threads())
    assert launch_threads()["flash dk_dv hd64"] == DEFAULT_TILES[64][1].thread_rows * DEFAULT_TILES[64][1].thread_cols
