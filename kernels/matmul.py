"""C = op(A) @ op(B) in float32: a tiled SGEMM with register blocking, the GPU twin of the `@` in
tinylm/layers.py's linear_forward / linear_backward (backend.matmul routes there with
`set_matmul("numba")`).

Each thread block computes one BM×BN tile of C. It walks K in slices of BK: the whole block copies
a BM×BK slice of A and a BK×BN slice of B into shared memory (each global element is read once
per block instead of once per output), then every thread multiplies them into its own TM×TN
sub-tile of C, kept in registers. Per k it loads TM values of A and TN of B from shared memory
and does TM·TN multiply-adds: the register tile is what lifts the kernel from memory-bound to
compute-bound (public SGEMM write-ups: shared tiles alone ~13% of cuBLAS, 2-D register tiles ~70%).

Transposed operands (linear backward's xᵀ dy and dy Wᵀ) are read in place: `trans_a` only changes
which index of the stored array is k, and the copy into shared memory is arranged so that
consecutive threads read consecutive addresses (coalesced) in either layout.
Rows and columns past the matrix edge load as 0 and are not written, so any M, N, K works.
"""
from numba import cuda, float32

from .launch import check_float32, empty, n_blocks

DEFAULT_TILE = (128, 128, 8, 8, 8)      # BM, BN, BK, TM, TN: 256 threads, 64 accumulators each
_kernels = {}


def make_matmul_kernel(BM, BN, BK, TM, TN):
    """Compile-time tile sizes are closure constants: shared and local arrays need fixed shapes."""
    THREADS = (BM // TM) * (BN // TN)

    @cuda.jit(device=True)
    def load_slice(dst, src, start, n_rows, k0, K, k_major, width, tid):
        """dst[kk, r] = X[start + r, k0 + kk], 0 past the edges, for the (n_rows, K) matrix X that
        `src` stores as it is or, with k_major, transposed as (K, n_rows). Either way consecutive
        threads read consecutive addresses of `src` (coalesced)."""
        for e in range(tid, width * BK, THREADS):
            if k_major:
                kk, r = e // width, e % width
            else:
                r, kk = e // BK, e % BK
            row, k = start + r, k0 + kk
            value = float32(0.0)
            if row < n_rows and k < K:
                value = src[k, row] if k_major else src[row, k]
            dst[kk, r] = value

    @cuda.jit
    def matmul_kernel(a, b, c, M, N, K, trans_a, trans_b):
        As = cuda.shared.array((BK, BM), float32)      # As[k, m] = op(A)[row0 + m, k0 + k]
        Bs = cuda.shared.array((BK, BN), float32)      # Bs[k, n] = op(B)[k0 + k, col0 + n]
        acc = cuda.local.array((TM, TN), float32)
        a_col = cuda.local.array(TM, float32)
        b_row = cuda.local.array(TN, float32)
        tid = cuda.threadIdx.x
        row0, col0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        ty, tx = tid // (BN // TN), tid % (BN // TN)    # this thread's sub-tile: rows ty·TM.., cols tx·TN..
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = float32(0.0)
        for k0 in range(0, K, BK):
            load_slice(As, a, row0, M, k0, K, trans_a, BM, tid)
            load_slice(Bs, b, col0, N, k0, K, not trans_b, BN, tid)       # B as the rows of op(B)ᵀ
            cuda.syncthreads()                         # the slices are complete before anyone reads
            for kk in range(BK):
                for i in range(TM):
                    a_col[i] = As[kk, ty * TM + i]
                for j in range(TN):
                    b_row[j] = Bs[kk, tx * TN + j]
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] += a_col[i] * b_row[j]
            cuda.syncthreads()                         # everyone is done before the next slice lands
        for i in range(TM):
            for j in range(TN):
                m, n = row0 + ty * TM + i, col0 + tx * TN + j
                if m < M and n < N:
                    c[m, n] = acc[i, j]

    return matmul_kernel


def matmul_kernel_for(tile):
    if tile not in _kernels:
        BM, BN, BK, TM, TN = tile
        if BM % TM or BN % TN:
            raise ValueError(f"tile {tile}: BM must be a multiple of TM and BN of TN")
        _kernels[tile] = make_matmul_kernel(*tile)
    return _kernels[tile]


def matmul(a, b, trans_a=False, trans_b=False, tile=DEFAULT_TILE):
    """op(a) @ op(b) for 2-D float32 arrays, op = transpose where asked (read in place, no copy).

    a (M, K) or, with trans_a, (K, M); b (K, N) or, with trans_b, (N, K) -> c (M, N)."""
    check_float32(a=a, b=b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"matmul takes 2-D arrays, got a {a.shape} and b {b.shape}")
    M, K = a.shape[::-1] if trans_a else a.shape
    Kb, N = b.shape[::-1] if trans_b else b.shape
    if K != Kb:
        raise ValueError(f"inner dimensions differ: op(a) is ({M}, {K}), op(b) is ({Kb}, {N})")
    c = empty((M, N), like=a)
    BM, BN, _, TM, TN = tile
    grid = (n_blocks(N, BN), n_blocks(M, BM))
    matmul_kernel_for(tile)[grid, (BM // TM) * (BN // TN)](a, b, c, M, N, K, trans_a, trans_b)
    return c
