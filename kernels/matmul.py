"""C = op(A) @ op(B) in float32: a tiled SGEMM with register blocking, the GPU twin of the `@` in
tinylm/layers.py's linear_forward / linear_backward (tinylm/kernel_layers.py routes the model's
linear layers and LM head here).

Each thread block computes one BM×BN tile of C. It walks K in slices of BK: the whole block copies
a BM×BK slice of op(A) and a BK×BN slice of op(B) into shared memory, both stored k-major (As[k, m],
Bs[k, n]) so the inner loop reads both along rows; then every thread multiplies them into its own
TM×TN sub-tile of C, kept in registers. Per k it loads TM values of A and TN of B from shared memory
and does TM·TN multiply-adds: the register tile lifts the kernel from memory-bound to compute-bound
(siboehm's SGEMM worklog: shared tiles alone ~13% of cuBLAS, 2-D register tiles ~70%).

Why it is fast by construction (checked by `python -m tinylm.kernels.report` and tests/test_matmul_kernel.py):
- Specialised per (trans_a, trans_b) and tile at compile time: every per-thread loop has a constant
  trip count and unrolls, so the accumulators and operand rows are registers (no local memory), and
  the transposes cost no branch in the loop.
- Threads own interleaved rows and columns, `ty + RY·i` and `tx + CX·j` (not `tx·TN + j`): one warp's
  reads of a shared row hit CX consecutive words (distinct banks) and RY broadcast words — one
  wavefront per access. The shared rows are padded by PAD words so the transposing copies (a
  row-major A read along k, stored k-major) land in distinct banks too. The index functions below
  are plain Python used by the kernel AND by the test that counts wavefronts.
- The k loop is an unsigned while loop: Numba's signed range loop keeps a 64-bit counter with
  negative-index fix-ups that LLVM will not unroll; this form unrolls and every shared load becomes
  a base register plus an immediate offset, so the loop is almost all FFMA.
- 256 threads with a 128-register cap: two blocks (16 warps) per SM.
Rows and columns past the matrix edge load as 0 and are not written, so any M, N, K works.
"""
from numba import config, cuda, float32, int64, uint32

from .launch import check_float32, empty, n_blocks

DEFAULT_TILE = (128, 128, 8, 8, 8)      # BM, BN, BK, TM, TN: 256 threads, 64 accumulators each
PAD = 4                                 # words added to each shared row (keeps 16-byte alignment)
MAX_REGISTERS = 128                     # 256 threads × 128 registers: 2 blocks per SM (65,536 registers)
# the simulator's jit takes no register cap (it has no registers)
JIT_OPTIONS = {} if config.ENABLE_CUDASIM else {"max_registers": MAX_REGISTERS}
_kernels = {}


# ----------------------------------------------------------------------------- index functions
# Plain functions of constants and thread indices: the kernel calls them (as device functions) and
# tests/test_matmul_kernel.py calls them as Python to list one warp's shared-memory addresses.
def thread_grid(tid, CX):
    """Thread tid's (ty, tx) in the (THREADS/CX) × CX grid of sub-tiles."""
    return tid // CX, tid % CX


def copy_position(e, width, BK, along_k):
    """Element e of a slice copy -> (kk, r): the slice's k index and its row (of op(A)) or column (of
    op(B)). along_k: the stored matrix holds consecutive k next to each other (A not transposed,
    B transposed), so consecutive threads walk k first (coalesced reads); else they walk r."""
    if along_k:
        return e % BK, e // BK
    return e // width, e % width


def shared_offset(kk, r, width):
    """Word offset of element [kk, r] in a k-major shared slice with padded rows."""
    return kk * (width + PAD) + r


def threads_per_block(tile):
    """One thread per TM×TN sub-tile of the BM×BN block."""
    BM, BN, _, TM, TN = tile
    return (BM // TM) * (BN // TN)


def make_matmul_kernel(BM, BN, BK, TM, TN, trans_a, trans_b):
    """Compile-time tile sizes and transposes are closure constants: fixed shared shapes and loops."""
    CX, RY = BN // TN, BM // TM                  # the thread grid: RY rows × CX columns of threads
    THREADS = CX * RY
    A_WIDTH, B_WIDTH = BM + PAD, BN + PAD        # padded shared rows (compile-time constants)
    A_LOADS, B_LOADS = BM * BK // THREADS, BN * BK // THREADS   # elements each thread copies per slice
    A_ALONG_K, B_ALONG_K = not trans_a, trans_b  # does the stored array hold consecutive k together?
    grid_of = cuda.jit(device=True)(thread_grid)
    position = cuda.jit(device=True)(copy_position)

    @cuda.jit(device=True)
    def load_slice(dst, src, start, n_rows, k0, K, along_k, width, loads):
        """dst[kk, r] = X[start + r, k0 + kk], 0 past the edges, where X (n_rows, K) is op(A) or op(B)ᵀ
        and `src` stores it as (n_rows, K) (along_k) or transposed as (K, n_rows). Each thread copies
        `loads` elements (a constant: the loop unrolls); a slice wholly inside skips the edge checks."""
        inside = start + width <= n_rows and k0 + BK <= K
        for t in range(loads):
            kk, r = position(uint32(cuda.threadIdx.x) + uint32(t * THREADS), uint32(width), uint32(BK), along_k)
            row, k = start + int64(r), k0 + int64(kk)
            value = float32(0.0)
            if inside or (row < n_rows and k < K):
                value = src[row, k] if along_k else src[k, row]
            dst[kk, r] = value

    @cuda.jit(**JIT_OPTIONS)
    def matmul_kernel(a, b, c, M, N, K):
        As = cuda.shared.array((BK, A_WIDTH), float32)      # As[k, m] = op(A)[row0 + m, k0 + k]
        Bs = cuda.shared.array((BK, B_WIDTH), float32)      # Bs[k, n] = op(B)[k0 + k, col0 + n]
        acc = cuda.local.array((TM, TN), float32)
        a_val = cuda.local.array(TM, float32)
        b_val = cuda.local.array(TN, float32)
        ty, tx = grid_of(uint32(cuda.threadIdx.x), uint32(CX))
        row0, col0 = int64(cuda.blockIdx.y) * BM, int64(cuda.blockIdx.x) * BN
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = float32(0.0)
        k0 = int64(0)
        while k0 < K:
            load_slice(As, a, row0, M, k0, K, A_ALONG_K, BM, A_LOADS)
            load_slice(Bs, b, col0, N, k0, K, B_ALONG_K, BN, B_LOADS)
            cuda.syncthreads()                         # the slices are complete before anyone reads
            kk = uint32(0)
            while kk < uint32(BK):
                for i in range(TM):
                    a_val[i] = As[kk, ty + uint32(RY * i)]
                for j in range(TN):
                    b_val[j] = Bs[kk, tx + uint32(CX * j)]
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] += a_val[i] * b_val[j]
                kk += uint32(1)
            cuda.syncthreads()                         # everyone is done before the next slice lands
            k0 += BK
        for i in range(TM):
            m = row0 + int64(ty) + RY * i
            if m < M:
                for j in range(TN):
                    n = col0 + int64(tx) + CX * j
                    if n < N:
                        c[m, n] = acc[i, j]

    matmul_kernel.threads = THREADS
    return matmul_kernel


def matmul_kernel_for(tile, trans_a, trans_b):
    key = (tuple(tile), bool(trans_a), bool(trans_b))
    if key not in _kernels:
        BM, BN, BK, TM, TN = tile
        threads = threads_per_block(tile)
        if BM % TM or BN % TN or (BM * BK) % threads or (BN * BK) % threads:
            raise ValueError(f"tile {tile}: BM must be a multiple of TM, BN of TN, and each slice "
                             f"(BM·BK, BN·BK) a multiple of the {threads} threads")
        _kernels[key] = make_matmul_kernel(BM, BN, BK, TM, TN, bool(trans_a), bool(trans_b))
    return _kernels[key]


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
    kernel = matmul_kernel_for(tile, trans_a, trans_b)
    kernel[grid, kernel.threads](a, b, c, M, N, K)
    return c


def kernels_and_signatures():
    """(name, kernel, signature) for every specialisation the model uses, at DEFAULT_TILE
    (for kernels.ptx_check: compile for sm_90 without a GPU)."""
    A2 = "float32[:, :]"
    for trans_a, trans_b in ((False, False), (False, True), (True, False)):
        name = "matmul " + ("Aᵀ" if trans_a else "A") + ("Bᵀ" if trans_b else "B")
        yield name, make_matmul_kernel(*DEFAULT_TILE, trans_a, trans_b), f"void({A2}, {A2}, {A2}, int64, int64, int64)"


def launch_threads():
    """{kernel name: threads per block} at DEFAULT_TILE, for kernels.report's blocks per SM."""
    return {name: threads_per_block(DEFAULT_TILE) for name, _, _ in kernels_and_signatures()}
