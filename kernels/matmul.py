"""C = op(A) @ op(B) in float32: a warp-tiled SGEMM, the GPU twin of the `@` in tinylm/core/layers.py's
linear_forward / linear_backward (tinylm/core/kernel_layers.py routes the model's linear layers and LM
head here). bench/gpu_ladder.py builds up to it one idea at a time, as siboehm's SGEMM worklog does.

The block computes one BM×BN tile of C, walking K in slices of BK. Its warps each own a WM×WN
piece of the tile, and in it every lane owns WMITER×WNITER sub-tiles of 4×4, whose rows (and
columns) are 4 consecutive words: one 128-bit shared load (`LDS.128`) fetches 4 operands.
Per k of a slice a thread loads 4·WMITER values of op(A) and 4·WNITER of op(B) and does
(4·WMITER)·(4·WNITER) multiply-adds into its accumulators, which stay in registers.

How the main loop stays almost all FFMA (checked by `python -m tinylm.kernels.report` against
kernels/budgets.toml):
- Compile-time everything: tile sizes, transposes and the vector choice are closure constants of
  make_matmul_kernel, so every per-thread loop has a constant trip count and unrolls; shared
  addresses are a base register plus an immediate.
- 32-bit offsets: kernels/vector.py's helpers take an element offset (int32) from the array's
  start — one multiply-add per address, not Numba's 64-bit index arithmetic.
- 128-bit moves: each thread copies 4 consecutive words of a slice with one `LDG.E.128` (kernels/
  vector.py), and stores them with one `STS.128` where they stay consecutive in the k-major shared
  slice (op(A) stored transposed, op(B) as stored) or 4 scalar stores where the copy transposes.
- Register double buffering, one barrier per slice: two shared slices; while the block multiplies
  slice s, each thread's loads of slice s+1 are already in flight into registers, then land in the
  other shared slice; one barrier ends the step. (The slice in use is never written: the next one
  is written only after the barrier that ended everyone's reading of it two steps earlier.)
- No edge branches in the loop: rows and columns past the matrix edge read a clamped (valid) row
  and only feed outputs that are never written; K's ragged tail is one checked slice after the loop.
The 128-bit loads need each stored matrix's row length to be a multiple of 4 and 16-byte aligned
data; otherwise the same kernel is built with scalar loads (VEC False).
"""
from typing import NamedTuple

import numpy as np
from numba import config, cuda, float32, int32, int64

from .launch import check_float32, empty, n_blocks, stream
from .vector import load4_global, load4_shared, load_global, store4_shared, store_shared


class Tile(NamedTuple):
    """A block's BM×BN tile of C, BK deep per slice; warps of WM×WN, each lane WMITER×WNITER 4×4s."""
    BM: int
    BN: int
    BK: int
    WM: int
    WN: int
    WMITER: int
    WNITER: int


DEFAULT_TILE = Tile(128, 64, 16, 64, 32, 2, 2)   # 4 warps, 128 threads, 64 accumulators each
SUB = 4                                 # a lane's sub-tile is SUB×SUB: one 128-bit load per operand row
PAD = 4                                 # words added to each shared row (keeps 16-byte alignment)
MAX_REGISTERS = 168                     # 128 threads × 168 registers: 3 blocks per SM (65,536 registers)
SCALAR_MAX_REGISTERS = 255              # the scalar-load build needs more address registers: 2 blocks per SM
_kernels = {}


# ----------------------------------------------------------------------------- index functions
# Plain functions of constants and thread indices: the kernel calls them (as device functions) and
# tests/test_matmul_kernel.py calls them as Python to list one warp's shared-memory addresses.
def threads_per_block(tile):
    return (tile.BM // tile.WM) * (tile.BN // tile.WN) * 32


def lane_origin(tid, tile):
    """Thread tid's first row (of op(A)) and first column (of op(B)) in the block's tile: its warp's
    corner plus its lane's 4×4 sub-tile in the warp's first WSUBM×WSUBN sub-block."""
    BM, BN, BK, WM, WN, WMITER, WNITER = tile
    warp, lane = tid // 32, tid % 32
    lane_cols = WN // WNITER // SUB                  # lanes across one warp sub-block
    warp_row, warp_col = warp // (BN // WN), warp % (BN // WN)
    return warp_row * WM + (lane // lane_cols) * SUB, warp_col * WN + (lane % lane_cols) * SUB


def copy_chunk(e, width, BK, along_k):
    """Chunk e (4 consecutive stored words) of a slice copy -> (kk, r): its first k and row of
    op(A) (column of op(B)). along_k: the stored matrix holds consecutive k together (A not
    transposed, B transposed), so a chunk is 4 k of one row; else 4 rows of one k."""
    if along_k:
        return (e % (BK // SUB)) * SUB, e // (BK // SUB)
    return e // (width // SUB), (e % (width // SUB)) * SUB


def shared_offset(kk, r, width):
    """Word offset of element [kk, r] in a k-major shared slice with padded rows."""
    return kk * (width + PAD) + r


def check_tile(tile):
    BM, BN, BK, WM, WN, WMITER, WNITER = tile
    threads = threads_per_block(tile)
    ok = (BM % WM == 0 and BN % WN == 0 and WM % (WMITER * SUB) == 0 and WN % (WNITER * SUB) == 0
          and (WM // WMITER // SUB) * (WN // WNITER // SUB) == 32 and BK == 16
          and (BM * BK) % (SUB * threads) == 0 and (BN * BK) % (SUB * threads) == 0)
    if not ok:
        raise ValueError(f"tile {tuple(tile)}: warps must tile the block, each warp's lanes cover its "
                         f"WM×WN with WMITER×WNITER 4×4 sub-tiles (32 lanes), BK is 16, and each slice copy "
                         f"(BM·BK, BN·BK words) must be whole 4-word chunks for the {threads} threads")


def make_slice_copy(width, along_k, THREADS, BK, VEC, pad=PAD):
    """A slice copy of one operand, global -> registers -> shared, for a block of THREADS threads:
    fetch: this thread's chunks of the slice at k0 into registers; place: registers -> the k-major
    shared slice `buf` (rows of width + pad words). The stored matrix is X (n_rows, K) (along_k) or
    Xᵀ (K, n_rows), ld its row length. (kernels/matmul_tf32.py's kernel copies with it too.)"""
    chunks = width * BK // (SUB * THREADS)
    chunk_at = cuda.jit(device=True)(copy_chunk)

    @cuda.jit(device=True)
    def fetch(src, ld, start, n_rows, k0, K, stage, checked):
        # Offsets: a 32-bit part fixed for the whole K walk, plus the slice's start in 64 bits.
        k_start = int64(k0) if along_k else int64(int32(k0 * ld))
        for t in range(chunks):
            kk, r = chunk_at(int32(cuda.threadIdx.x) + int32(t * THREADS), width, BK, along_k)
            for q in range(SUB):          # zero the words past K (only the checked tail slice has any)
                stage[t * SUB + q] = float32(0.0)
            if along_k:                   # 4 k of one row; past the edge, a valid row (its outputs unused)
                offset = int64(int32(min(start + r, n_rows - 1) * ld + kk)) + k_start
                if VEC and not checked:
                    stage[t * SUB], stage[t * SUB + 1], stage[t * SUB + 2], stage[t * SUB + 3] = \
                        load4_global(src, offset)
                else:
                    for q in range(SUB):
                        if not checked or k0 + kk + q < K:
                            stage[t * SUB + q] = load_global(src, offset + q)
            elif not checked or k0 + kk < K:   # 4 rows of one k
                if VEC and not checked:   # n_rows = ld is a multiple of 4: the clamp keeps alignment
                    offset = int64(int32(kk * ld + min(start + r, n_rows - SUB))) + k_start
                    stage[t * SUB], stage[t * SUB + 1], stage[t * SUB + 2], stage[t * SUB + 3] = \
                        load4_global(src, offset)
                else:
                    for q in range(SUB):
                        offset = int64(int32(kk * ld + min(start + r + q, n_rows - 1))) + k_start
                        stage[t * SUB + q] = load_global(src, offset)

    @cuda.jit(device=True)
    def place(dst, buf, stage):
        for t in range(chunks):
            kk, r = chunk_at(int32(cuda.threadIdx.x) + int32(t * THREADS), width, BK, along_k)
            # 64-bit from here: the + q·(width + pad) below fold into the stores' immediates
            base = int64(int32((buf * BK + kk) * (width + pad) + r))
            if along_k:                   # 4 k of one row: a column of the k-major slice
                for q in range(SUB):
                    store_shared(dst, base + q * (width + pad), stage[t * SUB + q])
            else:
                store4_shared(dst, base, stage[t * SUB], stage[t * SUB + 1], stage[t * SUB + 2],
                              stage[t * SUB + 3])
    return fetch, place


def make_slice_loop(fetch_a, place_a, fetch_b, place_b, multiply_slice, BK):
    """The K loop every GEMM kernel here runs (matmul's SIMT one and matmul_tf32's): slice 0 placed in
    shared memory, then per slice the next one fetched into registers while multiply_slice works on
    the current one (register double buffering, one barrier a slice), then the ragged tail, zero past K.
    multiply_slice(As, Bs, buf, m0, n0, acc, x, y) adds slice buf's products into acc; x, y are its
    scratch (the kernel's fragment arrays)."""

    @cuda.jit(device=True)
    def slice_loop(a, b, lda, ldb, row0, col0, M, N, K, As, Bs, a_stage, b_stage, m0, n0, acc, x, y):
        full = K // BK                                          # whole slices; the tail comes after
        if full > 0:
            fetch_a(a, lda, row0, M, 0, K, a_stage, False)
            fetch_b(b, ldb, col0, N, 0, K, b_stage, False)
            place_a(As, 0, a_stage)
            place_b(Bs, 0, b_stage)
            cuda.syncthreads()
        for s in range(full):
            buf = s & 1
            k_next = min(s + 1, full - 1) * BK                 # the last step re-fetches: no branch
            fetch_a(a, lda, row0, M, k_next, K, a_stage, False)
            fetch_b(b, ldb, col0, N, k_next, K, b_stage, False)
            multiply_slice(As, Bs, buf, m0, n0, acc, x, y)
            place_a(As, buf ^ 1, a_stage)
            place_b(Bs, buf ^ 1, b_stage)
            cuda.syncthreads()
        if full * BK < K:                                      # the ragged tail, zero past K
            buf = full & 1
            fetch_a(a, lda, row0, M, full * BK, K, a_stage, True)
            fetch_b(b, ldb, col0, N, full * BK, K, b_stage, True)
            place_a(As, buf, a_stage)
            place_b(Bs, buf, b_stage)
            cuda.syncthreads()
            multiply_slice(As, Bs, buf, m0, n0, acc, x, y)

    return slice_loop


def make_matmul_kernel(tile, trans_a, trans_b, VEC):
    """Compile-time tile, transposes and load width are closure constants: fixed shapes and loops."""
    BM, BN, BK, WM, WN, WMITER, WNITER = tile
    THREADS = threads_per_block(tile)
    WSUBM, WSUBN = WM // WMITER, WN // WNITER
    A_WIDTH, B_WIDTH = BM + PAD, BN + PAD            # padded shared rows
    ROWS = 2 * BK                                    # two slices: the one in use and the next
    RM, RN = WMITER * SUB, WNITER * SUB              # a thread's rows and columns of C
    A_CHUNKS, B_CHUNKS = BM * BK // (SUB * THREADS), BN * BK // (SUB * THREADS)
    A_STAGE, B_STAGE = A_CHUNKS * SUB, B_CHUNKS * SUB  # words of the next slice each thread holds
    origin = cuda.jit(device=True)(lane_origin)

    fetch_a, place_a = make_slice_copy(BM, not trans_a, THREADS, BK, VEC)
    fetch_b, place_b = make_slice_copy(BN, trans_b, THREADS, BK, VEC)

    @cuda.jit(device=True)
    def multiply_k(As, Bs, a_row, b_row, acc, a_frag, b_frag):
        """acc += this thread's op(A) rows × op(B) columns at one k, 4 words per shared load."""
        for wm in range(WMITER):
            a_frag[wm * SUB], a_frag[wm * SUB + 1], a_frag[wm * SUB + 2], a_frag[wm * SUB + 3] = \
                load4_shared(As, a_row + wm * WSUBM)
        for wn in range(WNITER):
            b_frag[wn * SUB], b_frag[wn * SUB + 1], b_frag[wn * SUB + 2], b_frag[wn * SUB + 3] = \
                load4_shared(Bs, b_row + wn * WSUBN)
        for i in range(RM):
            for j in range(RN):
                acc[i, j] += a_frag[i] * b_frag[j]

    @cuda.jit(device=True)
    def multiply_eight(As, Bs, a_row, b_row, acc, a_frag, b_frag):
        """Eight consecutive k, written out: Numba has no unroll pragma, and LLVM's unroller stops
        short of a body of 64 FFMA, so a `for kk in range(BK)` would stay a loop with a counter."""
        multiply_k(As, Bs, a_row, b_row, acc, a_frag, b_frag)
        multiply_k(As, Bs, a_row + A_WIDTH, b_row + B_WIDTH, acc, a_frag, b_frag)
        multiply_k(As, Bs, a_row + 2 * A_WIDTH, b_row + 2 * B_WIDTH, acc, a_frag, b_frag)
        multiply_k(As, Bs, a_row + 3 * A_WIDTH, b_row + 3 * B_WIDTH, acc, a_frag, b_frag)
        multiply_k(As, Bs, a_row + 4 * A_WIDTH, b_row + 4 * B_WIDTH, acc, a_frag, b_frag)
        multiply_k(As, Bs, a_row + 5 * A_WIDTH, b_row + 5 * B_WIDTH, acc, a_frag, b_frag)
        multiply_k(As, Bs, a_row + 6 * A_WIDTH, b_row + 6 * B_WIDTH, acc, a_frag, b_frag)
        multiply_k(As, Bs, a_row + 7 * A_WIDTH, b_row + 7 * B_WIDTH, acc, a_frag, b_frag)

    @cuda.jit(device=True)
    def multiply_slice(As, Bs, buf, m0, n0, acc, a_frag, b_frag):
        """The BK = 16 k of one slice, as two written-out runs of eight."""
        # 64-bit offsets here: their constant parts fold into each LDS.128's immediate
        a_row, b_row = int64(int32(buf * BK * A_WIDTH + m0)), int64(int32(buf * BK * B_WIDTH + n0))
        multiply_eight(As, Bs, a_row, b_row, acc, a_frag, b_frag)
        multiply_eight(As, Bs, a_row + 8 * A_WIDTH, b_row + 8 * B_WIDTH, acc, a_frag, b_frag)

    slice_loop = make_slice_loop(fetch_a, place_a, fetch_b, place_b, multiply_slice, BK)

    cap = MAX_REGISTERS if VEC else SCALAR_MAX_REGISTERS

    # the simulator's jit takes no register cap (it has no registers)
    @cuda.jit(**({} if config.ENABLE_CUDASIM else {"max_registers": cap}))
    def matmul_kernel(a, b, c, M, N, K):
        As = cuda.shared.array((ROWS, A_WIDTH), float32)    # As[buf·BK + k, m] = op(A)[row0 + m, k0 + k]
        Bs = cuda.shared.array((ROWS, B_WIDTH), float32)    # Bs[buf·BK + k, n] = op(B)[k0 + k, col0 + n]
        acc = cuda.local.array((RM, RN), float32)
        a_frag = cuda.local.array(RM, float32)
        b_frag = cuda.local.array(RN, float32)
        a_stage = cuda.local.array(A_STAGE, float32)    # the next slice, in flight
        b_stage = cuda.local.array(B_STAGE, float32)
        M, N, K = int32(M), int32(N), int32(K)
        lda, ldb = int32(a.shape[1]), int32(b.shape[1])
        m0, n0 = origin(int32(cuda.threadIdx.x), tile)
        row0, col0 = int32(cuda.blockIdx.y) * BM, int32(cuda.blockIdx.x) * BN
        for i in range(RM):
            for j in range(RN):
                acc[i, j] = float32(0.0)
        slice_loop(a, b, lda, ldb, row0, col0, M, N, K, As, Bs, a_stage, b_stage, m0, n0, acc, a_frag, b_frag)
        for wm in range(WMITER):
            for i in range(SUB):
                m = row0 + m0 + wm * WSUBM + i
                if m < M:
                    for wn in range(WNITER):
                        for j in range(SUB):
                            n = col0 + n0 + wn * WSUBN + j
                            if n < N:
                                c[m, n] = acc[wm * SUB + i, wn * SUB + j]

    matmul_kernel.threads = THREADS
    matmul_kernel.max_registers = cap           # kernels.report assembles with the same cap
    return matmul_kernel


def matmul_kernel_for(tile, trans_a, trans_b, vec=True):
    key = (Tile(*tile), bool(trans_a), bool(trans_b), bool(vec))
    if key not in _kernels:
        check_tile(key[0])
        _kernels[key] = make_matmul_kernel(*key)
    return _kernels[key]


def _address(x):
    interface = getattr(x, "__cuda_array_interface__", None) or x.__array_interface__
    return interface["data"][0]


def _as_stored(x, trans):
    """x as a C-contiguous array and the transpose flag that reads it: a transposed view (F order)
    is read in place as its C-ordered base with the flag flipped; anything else strided is copied."""
    if not x.flags.c_contiguous and x.flags.f_contiguous:
        return x.T, not trans
    if not x.flags.c_contiguous:
        from .launch import array_module
        return array_module(x).ascontiguousarray(x), trans
    return x, trans


def vector_loads_fit(*stored):
    """128-bit loads need every row to start on 16 bytes: row lengths a multiple of 4, aligned data."""
    return all(x.shape[1] % SUB == 0 and _address(x) % 16 == 0 for x in stored)


def operands(a, b, trans_a, trans_b):
    """A GEMM's operands checked -> ((a, trans_a, b, trans_b) as stored, C-contiguous; (M, N, K))."""
    check_float32(a=a, b=b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"matmul takes 2-D arrays, got a {a.shape} and b {b.shape}")
    M, K = a.shape[::-1] if trans_a else a.shape
    Kb, N = b.shape[::-1] if trans_b else b.shape
    if K != Kb:
        raise ValueError(f"inner dimensions differ: op(a) is ({M}, {K}), op(b) is ({Kb}, {N})")
    if max(a.size, b.size, M * N) >= 2 ** 31:
        raise ValueError(f"matmul indexes with 32-bit offsets: ({M}, {K}) @ ({K}, {N}) has an array of 2³¹ "
                         "elements or more; split it")
    return (*_as_stored(a, trans_a), *_as_stored(b, trans_b)), (M, N, K)


def matmul(a, b, trans_a=False, trans_b=False, tile=DEFAULT_TILE):
    """op(a) @ op(b) for 2-D float32 arrays, op = transpose where asked (read in place, no copy).

    a (M, K) or, with trans_a, (K, M); b (K, N) or, with trans_b, (N, K) -> c (M, N)."""
    (a, trans_a, b, trans_b), (M, N, K) = operands(a, b, trans_a, trans_b)
    c = empty((M, N), like=a)
    if M == 0 or N == 0:
        return c
    grid = (n_blocks(N, tile[1]), n_blocks(M, tile[0]))
    kernel = matmul_kernel_for(tile, trans_a, trans_b, vector_loads_fit(a, b))
    kernel[grid, kernel.threads, stream()](a, b, c, np.int32(M), np.int32(N), np.int32(K))
    return c


NAMES = {(False, False): "AB", (False, True): "ABᵀ", (True, False): "AᵀB", (True, True): "AᵀBᵀ"}


def builds(prefix, kernel_for, tile):
    """(name, kernel, signature) for every GEMM specialisation the model launches, with the
    C-contiguous layout its arrays have: AB, ABᵀ and AᵀB, each with 128-bit and scalar loads."""
    C2 = "float32[:, ::1]"
    for (trans_a, trans_b), name in NAMES.items():
        if (trans_a, trans_b) == (True, True):
            continue
        for vec in (True, False):
            yield (f"{prefix} {name}" + ("" if vec else " scalar"), kernel_for(tile, trans_a, trans_b, vec),
                   f"void({C2}, {C2}, {C2}, int32, int32, int32)")


def kernels_and_signatures():
    """builds() at DEFAULT_TILE (for kernels.ptx_check and kernels.report). 'scalar' builds serve row
    lengths not a multiple of 4 (a vocabulary of 50,257 in the LM head's backward)."""
    return builds("matmul", matmul_kernel_for, DEFAULT_TILE)


def launch_threads():
    """{kernel name: threads per block} at DEFAULT_TILE, for kernels.report's blocks per SM."""
    return {name: threads_per_block(DEFAULT_TILE) for name, _, _ in kernels_and_signatures()}
