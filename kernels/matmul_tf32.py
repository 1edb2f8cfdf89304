"""C = op(A) @ op(B) on the tensor cores, opt-in: TF32 mma.sync with the 3xTF32 split, the same
contract as kernels/matmul.py's SIMT SGEMM (the default, exact FP32) and the same shapes.

A TF32 keeps 10 of float32's 23 mantissa bits, so one TF32 product is off by ~2⁻¹¹ (≈ 5e-4)
relative. The 3xTF32 split (CUTLASS's OpMultiplyAddFastF32, used by torch's FP32 memory-efficient
attention) writes each operand as two TF32s,

    a = a_hi + a_lo,   a_hi = tf32(a),   a_lo = tf32(a − a_hi)      (b likewise)

and keeps three of the four products, accumulated in FP32:

    a·b ≈ a_lo·b_hi + a_hi·b_lo + a_hi·b_hi                          (a_lo·b_lo ≈ 2⁻²² a·b dropped)

which is FP32-level accurate (passes=3). passes=1 keeps a_hi·b_hi only: plain TF32, ~1e-3 — the
tests' proof that the split matters.

The block computes a BM×BN tile of C, walking K in slices of BK = 16 exactly as matmul.py's kernel
does (its slice copy, make_slice_copy: 128-bit global loads, register double buffering, one barrier
per slice, clamped edges and a checked ragged tail), so every shape that kernel takes this one
takes: no shape falls back. Its warps each own WM×WN of the tile as (WM/16)×(WN/8) tiles of the
instruction's 16×8; per 8 k a lane loads its A and B fragments from shared memory (kernels/
tensor_core.py's layout), splits them, and issues 3·(WM/16)·(WN/8) mma.sync. Shared rows are padded
to ≡ 8 words (mod 32): a fragment load's lanes (4 k-rows t × 8 columns g) then hit 32 different banks.
"""
from typing import NamedTuple

import numpy as np
from numba import config, cuda, float32, int32

from .launch import empty, n_blocks, stream
from .matmul import SUB, builds, make_slice_copy, make_slice_loop, operands, vector_loads_fit
from .tensor_core import a_position, b_position, c_position, mma_tf32, tf32_round


class TensorTile(NamedTuple):
    """A block's BM×BN tile of C, BK deep per slice; warps of WM×WN, each of 16×8 mma tiles."""
    BM: int
    BN: int
    BK: int
    WM: int
    WN: int


DEFAULT_TILE = TensorTile(128, 64, 16, 64, 32)   # 4 warps; a lane holds 4×4 mma tiles: 64 accumulators
MMA_M, MMA_N, MMA_K = 16, 8, 8
PAD = 8                                          # row stride ≡ 8 words (mod 32): conflict-free fragments
MAX_REGISTERS = 255                              # 128 threads: still 2 blocks per SM
_kernels = {}


def threads_per_block(tile):
    return (tile.BM // tile.WM) * (tile.BN // tile.WN) * 32


def warp_origin(tid, tile):
    """Thread tid's warp's first row (of op(A)) and column (of op(B)) in the block's tile."""
    warp = tid // 32
    return (warp // (tile.BN // tile.WN)) * tile.WM, (warp % (tile.BN // tile.WN)) * tile.WN


def check_tile(tile):
    BM, BN, BK, WM, WN = tile
    threads = threads_per_block(tile)
    ok = (BM % WM == 0 and BN % WN == 0 and WM % MMA_M == 0 and WN % MMA_N == 0 and BK == 16
          and (BM * BK) % (SUB * threads) == 0 and (BN * BK) % (SUB * threads) == 0)
    if not ok:
        raise ValueError(f"tile {tuple(tile)}: warps must tile the block in 16×8 mma tiles, BK is 16, and each "
                         f"slice copy (BM·BK, BN·BK words) must be whole 4-word chunks for the {threads} threads")


def make_matmul_tf32_kernel(tile, trans_a, trans_b, VEC, PASSES):
    """Tile, transposes, load width and passes (3: the split, 1: a_hi·b_hi only) are closure constants."""
    BM, BN, BK, WM, WN = tile
    THREADS = threads_per_block(tile)
    MI, NI = WM // MMA_M, WN // MMA_N                # mma tiles per warp, down and across
    A_STAGE, B_STAGE = BM * BK // THREADS, BN * BK // THREADS
    ROWS, A_WIDTH, B_WIDTH = 2 * BK, BM + PAD, BN + PAD      # two slices of padded rows
    TILES, B_FRAGMENT = MI * NI, 2 * NI
    fetch_a, place_a = make_slice_copy(BM, not trans_a, THREADS, BK, VEC, PAD)
    fetch_b, place_b = make_slice_copy(BN, trans_b, THREADS, BK, VEC, PAD)
    origin = cuda.jit(device=True)(warp_origin)
    a_at, b_at, c_at = (cuda.jit(device=True)(f) for f in (a_position, b_position, c_position))

    @cuda.jit(device=True)
    def split(x):
        """x -> (x_hi, x_lo), both TF32: x_hi + x_lo = x to ~2⁻²² relative."""
        hi = tf32_round(x)
        return hi, tf32_round(x - hi)

    @cuda.jit(device=True)
    def mma_into(acc, t, a, b):
        """acc[t] (one 16×8 tile's four accumulators) += a · b on the tensor cores."""
        acc[t, 0], acc[t, 1], acc[t, 2], acc[t, 3] = mma_tf32(a, b, (acc[t, 0], acc[t, 1], acc[t, 2], acc[t, 3]))

    @cuda.jit(device=True)
    def a_fragment(As, k, m_tile, lane, q):
        """a_q of the mma tile whose first row is m_tile, k from shared row k on, split."""
        m, kk = a_at(lane, q)
        return split(As[k + kk, m_tile + m])

    @cuda.jit(device=True)
    def multiply_k8(As, Bs, k, m0, n0, lane, acc, b_hi, b_lo):
        """acc += the warp's op(A) rows × op(B) columns over the 8 k from shared row k on."""
        for ni in range(NI):                         # B fragments, split once, used by every mi
            for q in range(2):
                kk, n = b_at(lane, q)
                b_hi[ni * 2 + q], b_lo[ni * 2 + q] = split(Bs[k + kk, n0 + ni * MMA_N + n])
        for mi in range(MI):
            m_tile = m0 + mi * MMA_M
            (h0, l0), (h1, l1) = a_fragment(As, k, m_tile, lane, 0), a_fragment(As, k, m_tile, lane, 1)
            (h2, l2), (h3, l3) = a_fragment(As, k, m_tile, lane, 2), a_fragment(As, k, m_tile, lane, 3)
            for ni in range(NI):
                bh, bl = (b_hi[ni * 2], b_hi[ni * 2 + 1]), (b_lo[ni * 2], b_lo[ni * 2 + 1])
                if PASSES == 3:                      # the small products first, as CUTLASS orders them
                    mma_into(acc, mi * NI + ni, (l0, l1, l2, l3), bh)
                    mma_into(acc, mi * NI + ni, (h0, h1, h2, h3), bl)
                mma_into(acc, mi * NI + ni, (h0, h1, h2, h3), bh)

    @cuda.jit(device=True)
    def multiply_slice(As, Bs, buf, m0, n0, acc, b_hi, b_lo):
        lane = int32(cuda.threadIdx.x) % 32
        multiply_k8(As, Bs, buf * BK, m0, n0, lane, acc, b_hi, b_lo)
        multiply_k8(As, Bs, buf * BK + MMA_K, m0, n0, lane, acc, b_hi, b_lo)

    slice_loop = make_slice_loop(fetch_a, place_a, fetch_b, place_b, multiply_slice, BK)

    # the simulator's jit takes no register cap (it has no registers)
    @cuda.jit(**({} if config.ENABLE_CUDASIM else {"max_registers": MAX_REGISTERS}))
    def matmul_tf32_kernel(a, b, c, M, N, K):
        As = cuda.shared.array((ROWS, A_WIDTH), float32)    # As[buf·BK + k, m] = op(A)[row0 + m, k0 + k]
        Bs = cuda.shared.array((ROWS, B_WIDTH), float32)    # Bs[buf·BK + k, n] = op(B)[k0 + k, col0 + n]
        acc = cuda.local.array((TILES, 4), float32)       # [mi·NI + ni, q]: c_q of mma tile (mi, ni)
        b_hi = cuda.local.array(B_FRAGMENT, float32)
        b_lo = cuda.local.array(B_FRAGMENT, float32)
        a_stage = cuda.local.array(A_STAGE, float32)           # the next slice, in flight
        b_stage = cuda.local.array(B_STAGE, float32)
        M, N, K = int32(M), int32(N), int32(K)
        lda, ldb = int32(a.shape[1]), int32(b.shape[1])
        lane = int32(cuda.threadIdx.x) % 32
        m0, n0 = origin(int32(cuda.threadIdx.x), tile)
        row0, col0 = int32(cuda.blockIdx.y) * BM, int32(cuda.blockIdx.x) * BN
        for t in range(TILES):
            for q in range(4):
                acc[t, q] = float32(0.0)
        # matmul.py's K loop: slice copies, register double buffering, one barrier a slice, the tail
        slice_loop(a, b, lda, ldb, row0, col0, M, N, K, As, Bs, a_stage, b_stage, m0, n0, acc, b_hi, b_lo)
        for mi in range(MI):
            for ni in range(NI):
                for q in range(4):
                    i, j = c_at(lane, q)
                    m, n = row0 + m0 + mi * MMA_M + i, col0 + n0 + ni * MMA_N + j
                    if m < M and n < N:
                        c[m, n] = acc[mi * NI + ni, q]

    matmul_tf32_kernel.threads = THREADS
    matmul_tf32_kernel.max_registers = MAX_REGISTERS      # kernels.report assembles with the same cap
    return matmul_tf32_kernel


def matmul_tf32_kernel_for(tile, trans_a, trans_b, vec=True, passes=3):
    key = (TensorTile(*tile), bool(trans_a), bool(trans_b), bool(vec), int(passes))
    if passes not in (1, 3):
        raise ValueError(f"passes must be 3 (the 3xTF32 split) or 1 (plain TF32), got {passes!r}")
    if key not in _kernels:
        check_tile(key[0])
        _kernels[key] = make_matmul_tf32_kernel(*key)
    return _kernels[key]


def matmul_tf32(a, b, trans_a=False, trans_b=False, tile=DEFAULT_TILE, passes=3):
    """op(a) @ op(b) as kernels.matmul.matmul (same shapes, transposes read in place), on the TF32
    tensor cores: passes=3 the 3xTF32 split (FP32-level error), passes=1 plain TF32 (~1e-3).

    a (M, K) or, with trans_a, (K, M); b (K, N) or, with trans_b, (N, K) -> c (M, N)."""
    (a, trans_a, b, trans_b), (M, N, K) = operands(a, b, trans_a, trans_b)
    c = empty((M, N), like=a)
    if M == 0 or N == 0:
        return c
    grid = (n_blocks(N, tile[1]), n_blocks(M, tile[0]))
    kernel = matmul_tf32_kernel_for(tile, trans_a, trans_b, vector_loads_fit(a, b), passes)
    kernel[grid, kernel.threads, stream()](a, b, c, np.int32(M), np.int32(N), np.int32(K))
    return c


def kernels_and_signatures():
    """The 3xTF32 builds a tf32="3x" model launches, at DEFAULT_TILE (as matmul.kernels_and_signatures)."""
    return builds("matmul 3xtf32", matmul_tf32_kernel_for, DEFAULT_TILE)


def launch_threads():
    return {name: threads_per_block(DEFAULT_TILE) for name, _, _ in kernels_and_signatures()}
