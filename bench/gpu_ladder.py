"""The SGEMM ladder: C = A @ B (float32, row-major) one idea at a time, as siboehm's CUDA SGEMM
worklog builds it, ending at tinylm's kernels.matmul. Each rung is its own small kernel, kept as
documentation: read them in order, each differs from the last by one idea.

    python bench/gpu_ladder.py            the sm_90 machine code of every rung (no GPU needed):
                                          registers, spills, blocks per SM, the main loop's mix

    1 naive         one thread per C element, every operand from global memory
    2 shared        32×32 tiles of A and B staged in shared memory: each global word read once per tile
    3 1d-tile       each thread computes TM = 8 outputs down a column: one B word feeds 8 FMAs
    4 2d-tile       each thread an 8×8 block of outputs: 16 shared loads feed 64 FMAs
    5 vectorised    as 4, with 128-bit global loads and A stored k-major, so operands come by LDS.128
    6 warp-tiled    kernels.matmul: warp tiles of 4×4 sub-tiles, two shared slices, one barrier each

Rungs 2–5 assume M, N, K multiples of their tile (as the worklog's kernels do); rung 1 and rung 6
take any shape. tests/test_kernel_ladder.py checks each against NumPy under the CUDA simulator;
bench/gpu_sections.py's ladder section times them on a GPU beside cuBLAS.
"""
import os
import sys

from numba import cuda, float32, int32

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinylm.kernels import matmul as warp_tiled            # noqa: E402
from tinylm.kernels.vector import load4_global, load4_shared, store4_shared   # noqa: E402


def naive():
    @cuda.jit
    def naive_kernel(a, b, c, M, N, K):
        m, n = cuda.grid(2)
        if m < M and n < N:
            acc = float32(0.0)
            for k in range(K):
                acc += a[m, k] * b[k, n]
            c[m, n] = acc
    return naive_kernel, lambda M, N: ((-(-M // 16), -(-N // 16)), (16, 16))


def shared(T=32):
    @cuda.jit
    def shared_kernel(a, b, c, M, N, K):
        As = cuda.shared.array((T, T), float32)
        Bs = cuda.shared.array((T, T), float32)
        ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
        m, n = cuda.blockIdx.y * T + ty, cuda.blockIdx.x * T + tx
        acc = float32(0.0)
        for k0 in range(0, K, T):
            As[ty, tx] = a[m, k0 + tx]
            Bs[ty, tx] = b[k0 + ty, n]
            cuda.syncthreads()
            for k in range(T):
                acc += As[ty, k] * Bs[k, tx]
            cuda.syncthreads()
        c[m, n] = acc
    return shared_kernel, lambda M, N: ((N // T, M // T), (T, T))


def tile_1d(BM=64, BN=64, BK=8, TM=8):
    THREADS = BM * BN // TM                  # one thread per TM outputs of a column

    @cuda.jit
    def tile_1d_kernel(a, b, c, M, N, K):
        As = cuda.shared.array((BM, BK), float32)
        Bs = cuda.shared.array((BK, BN), float32)
        t = cuda.threadIdx.x
        row, col = (t // BN) * TM, t % BN     # this thread's first output row, its column
        m0, n0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        acc = cuda.local.array(TM, float32)
        for i in range(TM):
            acc[i] = float32(0.0)
        for k0 in range(0, K, BK):
            for e in range(t, BM * BK, THREADS):
                As[e // BK, e % BK] = a[m0 + e // BK, k0 + e % BK]
            for e in range(t, BK * BN, THREADS):
                Bs[e // BN, e % BN] = b[k0 + e // BN, n0 + e % BN]
            cuda.syncthreads()
            for k in range(BK):
                b_k = Bs[k, col]              # one shared load, TM FMAs
                for i in range(TM):
                    acc[i] += As[row + i, k] * b_k
            cuda.syncthreads()
        for i in range(TM):
            c[m0 + row + i, n0 + col] = acc[i]
    return tile_1d_kernel, lambda M, N: ((N // BN, M // BM), THREADS)


def tile_2d(BM=128, BN=128, BK=8, TM=8, TN=8, vectorised=False):
    THREADS = (BM // TM) * (BN // TN)
    CX = BN // TN                            # threads across the tile

    @cuda.jit
    def tile_2d_kernel(a, b, c, M, N, K):
        As = cuda.shared.array((BK, BM), float32)     # k-major: a thread's TM rows are consecutive words
        Bs = cuda.shared.array((BK, BN), float32)
        t = int32(cuda.threadIdx.x)
        row, col = (t // CX) * TM, (t % CX) * TN
        m0, n0 = int32(cuda.blockIdx.y) * BM, int32(cuda.blockIdx.x) * BN
        acc = cuda.local.array((TM, TN), float32)
        a_frag = cuda.local.array(TM, float32)
        b_frag = cuda.local.array(TN, float32)
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = float32(0.0)
        for k0 in range(0, K, BK):
            if vectorised:                    # 4 words per load; A's 4 k land in a column of As
                for e in range(t, BM * BK // 4, THREADS):
                    r, k = e // (BK // 4), (e % (BK // 4)) * 4
                    x = load4_global(a, int32((m0 + r) * K + k0 + k))
                    for q in range(4):
                        As[k + q, r] = x[q]
                for e in range(t, BK * BN // 4, THREADS):
                    k, n = e // (BN // 4), (e % (BN // 4)) * 4
                    x0, x1, x2, x3 = load4_global(b, int32((k0 + k) * N + n0 + n))
                    store4_shared(Bs, int32(k * BN + n), x0, x1, x2, x3)
            else:
                for e in range(t, BM * BK, THREADS):
                    As[e % BK, e // BK] = a[m0 + e // BK, k0 + e % BK]
                for e in range(t, BK * BN, THREADS):
                    Bs[e // BN, e % BN] = b[k0 + e // BN, n0 + e % BN]
            cuda.syncthreads()
            for k in range(BK):
                if vectorised:
                    for i in range(0, TM, 4):
                        a_frag[i], a_frag[i + 1], a_frag[i + 2], a_frag[i + 3] = load4_shared(As, int32(k * BM + row + i))
                    for j in range(0, TN, 4):
                        b_frag[j], b_frag[j + 1], b_frag[j + 2], b_frag[j + 3] = load4_shared(Bs, int32(k * BN + col + j))
                else:
                    for i in range(TM):
                        a_frag[i] = As[k, row + i]
                    for j in range(TN):
                        b_frag[j] = Bs[k, col + j]
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] += a_frag[i] * b_frag[j]
            cuda.syncthreads()
        for i in range(TM):
            for j in range(TN):
                c[m0 + row + i, n0 + col + j] = acc[i, j]
    return tile_2d_kernel, lambda M, N: ((N // BN, M // BM), THREADS)


def vectorised(**tile):
    return tile_2d(**tile, vectorised=True)


RUNGS = {"1 naive": naive, "2 shared": shared, "3 1d-tile": tile_1d, "4 2d-tile": tile_2d,
         "5 vectorised": vectorised}
RUNGS_IN_ORDER = [*RUNGS, "6 warp-tiled"]
# Tiles small enough for the CUDA simulator (one Python thread per CUDA thread), for
# tests/test_kernel_ladder.py and gpu_check --smoke; on a GPU each rung runs its default tile.
SIMULATOR_TILES = {"1 naive": {}, "2 shared": dict(T=4), "3 1d-tile": dict(BM=8, BN=8, BK=4, TM=4),
                   "4 2d-tile": dict(BM=8, BN=8, BK=4, TM=4, TN=4), "5 vectorised": dict(BM=8, BN=8, BK=4, TM=4, TN=4),
                   "6 warp-tiled": dict(tile=(16, 32, 16, 16, 32, 1, 1))}


def multiply(rung, a, b, **tile):
    """c = a @ b on one rung (C-contiguous float32 a (M, K), b (K, N)); rung 6 is kernels.matmul."""
    if rung == "6 warp-tiled":
        return warp_tiled.matmul(a, b, **tile)
    kernel, launch = RUNGS[rung](**tile)
    (M, K), N = a.shape, b.shape[1]
    c = warp_tiled.empty((M, N), like=a)
    grid, threads = launch(M, N)
    kernel[grid, threads](a, b, c, int32(M), int32(N), int32(K))
    return c


def main():
    from tinylm.kernels import report
    C2 = "float32[:, ::1]"
    signature = f"void({C2}, {C2}, {C2}, int32, int32, int32)"
    print("SGEMM ladder, sm_90 machine code (python bench/gpu_ladder.py)")
    print(report.HEADER)
    for rung, make in [*RUNGS.items(), ("6 warp-tiled", None)]:
        if make is None:
            kernel = warp_tiled.matmul_kernel_for(warp_tiled.DEFAULT_TILE, False, False)
            threads, cap = kernel.threads, kernel.max_registers
        else:
            kernel, launch = make()
            grid_threads = launch(4096, 4096)[1]
            threads, cap = (grid_threads[0] * grid_threads[1] if isinstance(grid_threads, tuple) else grid_threads), None
        r, _ = report.row(rung, kernel, signature, threads, cap)
        print(report.table_line(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
