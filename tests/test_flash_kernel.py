"""kernels/flash_attention.py against tinylm/core/flash_attention.py (NumPy, float64), forward and
backward, on tiny ragged shapes under the CUDA simulator (tests/conftest.py sets
NUMBA_ENABLE_CUDASIM=1 unless told otherwise; on a GPU the same tests pass CuPy arrays).

Small tiles keep the simulator fast (one Python thread per CUDA thread) while still exercising
what the default tiles do: several row blocks, several streamed tiles, a row split across
threads, the causal skip and mask, T not a multiple of either tile, zero-padding of head_dim up to
its compiled bucket. Planted bugs these tests catch (each tried by hand, 2-4 cases fail):
dropping the `alpha` rescale of acc; masking with `key < query`; starting dk_dv's causal query
loop one tile late; loading dq's K without the folded-in scale; masking the forward only in tiles
past T (not in tiles crossing the diagonal); never masking P in the backward; dropping the last
step of the row max's shuffle butterfly or of the row sum's (7 cases fail); streaming the key tiles
past the diagonal in the forward or in dq, or the query tiles before it in dk_dv (the skip test).
"""
import numpy as np
import pytest

from tinylm.kernels.flash_attention import (DEFAULT_TILES, HEAD_DIMS, Tiles, check_tiles, flash_attention_backward,
                                            flash_attention_forward, head_dim_bucket, kernels_and_signatures,
                                            launch_threads, padded_strides)
from tinylm.core.backend import to_numpy
from tinylm.core.flash_attention import flash_backward, flash_forward
from test_kernels import device  # noqa: E402  (tests/ is on sys.path)

SMALL = Tiles(8, 4, 4, 2)        # 8 threads; each owns 2 rows × 2 keys, a row split over 2 threads


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
    (1, 2, 11, 32, True, Tiles(8, 8, 2, 8)),    # thread_cols 8 like DEFAULT_TILES (TD = HD/8); 128-bit
                                                # loads (16 threads, 8 words a row: 2 rows a pass)
    (2, 1, 7, 64, False, Tiles(8, 4, 4, 4)),    # 128-bit loads at the 64 bucket, one row a pass
])
def test_flash_kernels_match_numpy(B, H, T, hd, causal, tiles):
    rng = np.random.default_rng(T + hd)
    q, k, v, do = (rng.normal(size=(B, H, T, hd)) for _ in range(4))
    o_ref, lse_ref = flash_forward(q, k, v, causal)
    o, lse = flash_attention_forward(device(q), device(k), device(v), causal, tiles)
    assert_close(o, o_ref)
    assert_close(lse, lse_ref)
    grads = flash_attention_backward(device(q), device(k), device(v), o, lse, device(do), causal, tiles)
    for got, want in zip(grads, flash_backward(q, k, v, o_ref, lse_ref, do, causal)):
        assert_close(got, want)


def test_head_dim_buckets_and_tile_checks():
    assert [head_dim_bucket(hd) for hd in (1, 32, 33, 64, 65, 128)] == [32, 32, 64, 64, 128, 128]
    with pytest.raises(ValueError, match="head_dim must be at most 128"):
        head_dim_bucket(129)
    with pytest.raises(ValueError, match="thread_cols dividing"):
        check_tiles((8, 4, 4, 3), 32)
    with pytest.raises(ValueError, match="power of two ≤ 32"):   # a row would span two warps
        check_tiles((64, 64, 1, 64), 64)
    for HD, pair in DEFAULT_TILES.items():          # the tiles the GPU runs divide evenly too
        for tiles in pair:
            assert check_tiles(tiles, HD) == tiles


def test_flash_attention_rejects_bad_input():
    q = np.zeros((1, 1, 4, 129), np.float32)
    with pytest.raises(ValueError, match="head_dim must be at most 128"):
        flash_attention_forward(q, q, q)
    q = np.zeros((1, 1, 4, 8), np.float32)
    with pytest.raises(ValueError, match="k must have shape"):
        flash_attention_forward(q, q[:, :, :3], q)
    with pytest.raises(ValueError, match="float32"):
        flash_attention_forward(q.astype(np.float64), q, q)


def test_registry_lists_every_specialisation_with_its_launch_size():
    """kernels.report compiles what kernels_and_signatures() lists: forward, dk_dv and dq per
    head_dim bucket, plus row_dot, each with the threads per block the entry points launch."""
    names = [name for name, _, _ in kernels_and_signatures()]
    assert len(names) == 3 * len(HEAD_DIMS) + 1 and set(names) == set(launch_threads())
    assert launch_threads()["flash dk_dv hd64"] == DEFAULT_TILES[64][1].thread_rows * DEFAULT_TILES[64][1].thread_cols


def wavefronts(words):
    """Shared-memory passes one warp's 4-byte access takes: the most distinct words in one of the
    32 banks (threads reading the same word share it: a broadcast)."""
    per_bank = {}
    for word in set(words):
        per_bank.setdefault(word % 32, set()).add(word)
    return max(len(distinct) for distinct in per_bank.values())


def warp_accesses(HD, tiles, strides):
    """{access: worst wavefronts} for warp 0 of a kernel with these tiles, using the kernels' index
    expressions: thread (ty, tx) = (t // CX, t % CX) owns rows ty + RY·a and columns tx + CX·n."""
    ROWS, COLS, RY, CX = tiles
    HDP, COLSP = strides
    TM, TN, TD = ROWS // RY, COLS // CX, HD // CX
    warp = [(t // CX, t % CX) for t in range(32)]
    worst = {}

    def record(name, words):
        worst[name] = max(worst.get(name, 0), wavefronts(words))

    for k in range(3):
        for a in range(TM):
            record("scores A[r, k]", [(ty + RY * a) * HDP + k for ty, tx in warp])
            record("P·V A = P[r, k]", [(ty + RY * a) * COLSP + k for ty, tx in warp])
            for n in range(TN):
                record("P store", [(ty + RY * a) * COLSP + tx + CX * n for ty, tx in warp])
        for n in range(TN):
            record("scores B[c, k]", [(tx + CX * n) * HDP + k for ty, tx in warp])
        for e in range(TD):
            record("P·V B = V[k, c]", [k * HDP + tx + CX * e for ty, tx in warp])
    threads = RY * CX
    for j in range(3):
        record("tile copy", [(e // HD) * HDP + e % HD for e in (t + threads * j for t in range(32))])
    return worst


def test_shared_memory_accesses_are_conflict_free():
    """Every shared access of one warp, at every default tile, takes one pass. Without the padding
    the same accounting finds the conflicts it exists to prevent (so this test can fail)."""
    for HD, pair in DEFAULT_TILES.items():
        for tiles in pair:
            worst = warp_accesses(HD, tiles, padded_strides(HD, tiles.cols, tiles.thread_cols))
            assert set(worst.values()) == {1}, (HD, tiles, worst)
    unpadded = warp_accesses(64, DEFAULT_TILES[64][0], (64, 32))
    assert unpadded["scores B[c, k]"] == 8 and unpadded["P store"] > 1
    plus_one = warp_accesses(64, DEFAULT_TILES[64][0], (65, 33))
    assert plus_one["P store"] == 4


def test_causal_tiles_above_the_diagonal_are_skipped():
    """A causal query tile reads no key tile past its diagonal, a key tile no query tile before it
    (forward, dq and dk_dv). NaN planted in exactly those tiles must not reach the rows that skip
    them: had a kernel streamed them (masking P to 0), 0·NaN = NaN would. T = 16, SMALL tiles:
    query block 0 owns rows 0-7, key block 1 keys 8-15, both ending on a tile boundary."""
    rng = np.random.default_rng(7)
    q, k, v, do = (rng.normal(size=(1, 1, 16, 8)) for _ in range(4))
    o_ref, lse_ref = flash_forward(q, k, v, True)
    dq_ref, dk_ref, dv_ref = flash_backward(q, k, v, o_ref, lse_ref, do, True)
    o, lse = flash_attention_forward(device(q), device(k), device(v), True, SMALL)

    late_k, late_v = k.copy(), v.copy()
    late_k[:, :, 8:], late_v[:, :, 8:] = np.nan, np.nan          # keys only rows 8+ may see
    o_late, _ = flash_attention_forward(device(q), device(late_k), device(late_v), True, SMALL)
    assert_close(to_numpy(o_late)[:, :, :8], o_ref[:, :, :8])
    dq_late, _, _ = flash_attention_backward(device(q), device(late_k), device(late_v), o, lse, device(do), True, SMALL)
    assert_close(to_numpy(dq_late)[:, :, :8], dq_ref[:, :, :8])

    early_q, early_do = q.copy(), do.copy()
    early_q[:, :, :8], early_do[:, :, :8] = np.nan, np.nan      # queries keys 8+ never meet
    _, dk_early, dv_early = flash_attention_backward(device(early_q), device(k), device(v), o, lse,
                                                     device(early_do), True, SMALL)
    assert_close(to_numpy(dk_early)[:, :, 8:], dk_ref[:, :, 8:])
    assert_close(to_numpy(dv_early)[:, :, 8:], dv_ref[:, :, 8:])
