"""Flash attention forward and backward as Numba CUDA kernels (float32), the GPU twins of
tinylm/core/flash_attention.py's `flash_forward` / `flash_backward` — same algorithm, same names
(m, l, acc, L = lse, D), and tested against them (tests/test_flash_kernel.py).

Work partition (FlashAttention-2): one thread block per (tile of ROWS rows, head, batch). The block
keeps its own rows in shared memory and streams the other operand through shared memory COLS rows
at a time, so every K/V (or Q/dO) row read from global memory serves ROWS rows of work.

    forward  (block owns query rows):  S = Q Kᵀ·scale, online softmax (m, l), acc += P V
    backward (three launches):
        row_dot:  D_i = Σ_d dO_id O_id                       one thread per query row
        dk_dv:    block owns KEY rows j; streams Q/dO tiles:  dV_j += Pᵀ dO,  dK_j += dSᵀ Q·scale
        dq:       block owns QUERY rows i; streams K/V tiles: dQ_i += dS K·scale

dQ is a separate pass, not atomics: in dk_dv every key block contributes to every dQ_i below it, so
accumulating there needs a float atomicAdd per (key block, i, d) — T/COLS adds to each address, a
summation order that changes from run to run (non-deterministic gradients). The separate pass
recomputes S and dP (the backward's 5 tile products become 7) but sums each dQ_i in a fixed order.

The forward overlaps the next K/V tile's loads with math using one shared buffer per operand: the
next K tile is stored while P·V runs (Ks is free once the scores are made), the next V tile while
the next scores run, two barriers a tile. A second buffer each (true double buffering) does not fit:
hd64 would need 45,056 + 17,408 bytes, past the 48 KB of static shared memory.

Causal: a query tile stops at the last key tile that reaches its diagonal, a key tile starts at the
first query tile that reaches it — tiles entirely above the diagonal are never loaded. The −inf /
zero mask is applied only in tiles that cross the diagonal or the end of the sequence.

Registers, not local memory: the kernels are built per head_dim HD (32, 64, 128) by a factory, so
every per-thread loop has a compile-time trip count, unrolls, and its arrays become registers.
A row is split across thread_cols threads (a thread grid of thread_rows × thread_cols): for a
ROWS × COLS score tile each thread owns a TM × TN micro-tile — rows ty + thread_rows·a and columns
tx + thread_cols·b (interleaved, so one warp's shared reads fall in distinct banks) — and for the
ROWS × HD accumulator the TM × TD micro-tile of the same rows, columns tx + thread_cols·e. Both are
register-blocked tile products (`tile_product`): every shared value loaded feeds TN or TM FFMAs.
The softmax's row max is combined across the thread_cols threads of a row by warp shuffles
(kernels/shuffle.py: a butterfly of SHFL.BFLY, log2(thread_cols) per row and tile, no shared memory
and no barrier; the simulator runs a twin); the row sum l stays a per-thread partial sum, combined
the same way once at the end.

Tiles come from global memory 128 bits at a time (LDG.128 → STS.128, kernels/vector.py) when the
head_dim is a bucket's own (32, 64, 128); a smaller head_dim gets the padded build, whose loads zero
the columns past it one element at a time. Each build holds one of the two loops.

Shared arrays are row-major with padded rows (see HDP, COLSP), so one warp's reads and writes of
a tile, along a row or down a column, fall in distinct banks (or broadcast). The simulator runs
the same kernels on NumPy arrays; keep its shapes tiny (one Python thread per CUDA thread).
"""
import math
from collections import namedtuple

from numba import cuda, float32, int32, int64, uint32

from .launch import C3, C4, check_float32, empty, n_blocks, stream
from .shuffle import shuffle_xor
from .vector import load4_global, load_global, store4_shared

# rows: rows a block owns; cols: rows streamed per step; a thread grid of thread_rows × thread_cols.
Tiles = namedtuple("Tiles", "rows cols thread_rows thread_cols")
HEAD_DIMS = (32, 64, 128)
# Per head_dim: (forward tiles, backward tiles), sized for ≤ 48 KB of static shared memory per
# block (the limit without a dynamic-shared-memory opt-in, which Numba does not expose).
DEFAULT_TILES = {
    32: (Tiles(64, 64, 16, 8), Tiles(32, 32, 8, 8)),
    64: (Tiles(64, 32, 16, 8), Tiles(32, 32, 16, 8)),
    128: (Tiles(32, 16, 8, 8), Tiles(16, 16, 8, 8)),
}
ROW_DOT_THREADS = 128
_kernels = {}


def padded_strides(HD, COLS, CX):
    """Row strides, in 4-byte words, of the shared (rows, HD) tiles and of the (rows, COLS) P/dS tile
    (32 banks of one word; tests/test_flash_kernel.py counts one warp's wavefronts with them).

    HD + 4: a row starts 4 banks after the previous one and on a 16-byte boundary, so the score
    products read 2-4 consecutive k at once (LDS.64/LDS.128 in the SASS) and the CX threads of a row
    group read CX distinct rows from distinct banks. COLS + CX: a warp writes the P/dS tile as
    32/CX row groups × CX columns; shifting each row by CX banks puts the 32 stores in 32 distinct
    banks (a +1 pad would give a 4-way conflict)."""
    return HD + 4, COLS + CX


def make_kernels(HD, tiles, padded):
    """forward, dk_dv and dq kernels for head_dim HD (padded=False) or head_dim < HD (padded=True:
    rows zero-padded to HD as they are loaded) with these tiles."""
    ROWS, COLS, RY, CX = tiles
    THREADS = RY * CX
    TM, TN, TD = ROWS // RY, COLS // CX, HD // CX      # per-thread rows, streamed columns, head columns
    HDP, COLSP = padded_strides(HD, COLS, CX)
    QUADS = HD // 4                                     # 16-byte words in a row of a (rows, HD) tile
    STEP = THREADS // QUADS                             # rows one pass of the block loads
    VECTOR_LOADS = not padded and THREADS % QUADS == 0  # every default tile; tiny test tiles may not

    @cuda.jit(device=True)
    def load_rows(dst, src, b, h, start, n_rows, T, hd, scale):
        """dst[r, :HD] = src[b, h, start + r, :]·scale for r < n_rows, zero past T and past hd: the
        whole block copies, consecutive threads taking consecutive elements (coalesced reads).

        Unpadded (hd == HD, the head dims GPT-2 uses): every row is a whole number of 16-byte words,
        so each thread moves four floats at a time (LDG.128 → STS.128), down a fixed column, one
        64-bit offset added to per pass. Padded (hd < HD): one element at a time, the zero fill
        checked per element. The choice is made when the kernel is built (VECTOR_LOADS), so the
        binary that runs holds only one of the two loops."""
        if VECTOR_LOADS:
            # A thread keeps one 4-wide column d; QUADS threads cover a row, STEP rows per pass.
            r, d = uint32(cuda.threadIdx.x) // uint32(QUADS), uint32(cuda.threadIdx.x) % uint32(QUADS) * uint32(4)
            offset = ((int64(b) * int64(src.shape[1]) + int64(h)) * int64(T) + int64(start) + int64(r)) * int64(HD) + int64(d)
            rows_left = T - start
            while r < uint32(n_rows):
                x0 = x1 = x2 = x3 = float32(0.0)
                if int64(r) < rows_left:
                    x0, x1, x2, x3 = load4_global(src, offset)
                store4_shared(dst, r * uint32(HDP) + d, x0 * scale, x1 * scale, x2 * scale, x3 * scale)
                r += uint32(STEP)
                offset += int64(STEP * HD)
            return
        e = uint32(cuda.threadIdx.x)
        while e < uint32(n_rows * HD):          # unsigned: no negative-index fix-ups, shifts for // and %
            r, d = e // uint32(HD), e % uint32(HD)
            inside = start + int64(r) < T and int64(d) < hd   # signed vs signed: u64 < i64 is an f64 compare
            dst[r, d] = src[uint32(b), uint32(h), uint32(start) + r, d] * scale if inside else float32(0.0)
            e += uint32(THREADS)

    @cuda.jit(device=True)
    def load_vector(dst, src, b, h, start, n, T):
        """dst[r] = src[b, h, start + r] for r < n, zero past T: one flat 64-bit offset stepped per
        pass (Numba's signed range loop and 3-D index cost ~30 integer instructions a word)."""
        r = uint32(cuda.threadIdx.x)
        offset = (int64(b) * int64(src.shape[1]) + int64(h)) * int64(T) + int64(start) + int64(r)
        rows_left = T - start
        while r < uint32(n):
            dst[r] = load_global(src, offset) if int64(r) < rows_left else float32(0.0)
            r += uint32(THREADS)
            offset += int64(THREADS)

    def make_tile_product(M, N, K, b_k_major):
        """acc[a, n] += Σ_{k<K} A_s[ty + RY·a, k] · B(tx + CX·n, k) for this thread's M × N micro-tile,
        B(c, k) = B_s[k, c] if b_k_major else B_s[c, k]: a register-blocked tile product reading each
        shared value once per thread for M or N FFMAs."""
        @cuda.jit(device=True)
        def tile_product(A_s, B_s, acc):
            # Unsigned indices and a plain while loop: Numba's signed range loop compiles to a 64-bit
            # counter and negative-index fix-ups that LLVM will not unroll; this form unrolls (×8 in
            # the SASS) and every shared load becomes a base register plus an immediate offset.
            ty, tx = uint32(cuda.threadIdx.x // CX), uint32(cuda.threadIdx.x % CX)
            a_val = cuda.local.array(M, float32)
            b_val = cuda.local.array(N, float32)
            k = uint32(0)
            while k < uint32(K):
                for a in range(M):
                    a_val[a] = A_s[ty + uint32(RY * a), k]
                for n in range(N):
                    c = tx + uint32(CX * n)
                    b_val[n] = B_s[k, c] if b_k_major else B_s[c, k]
                for a in range(M):
                    for n in range(N):
                        acc[a, n] += a_val[a] * b_val[n]
                k += uint32(1)
        return tile_product

    scores = make_tile_product(TM, TN, HD, False)       # S = A Bᵀ, over head_dim
    times_tile = make_tile_product(TM, TD, COLS, True)  # acc += P V (or Pᵀ dO, dSᵀ Q, dS K)

    # A row's thread_cols threads are lanes tx = 0 .. CX-1 of one aligned group (t = ty·CX + tx, CX a
    # power of two ≤ 32), so a butterfly over lane masks CX/2, ..., 1 combines the row in registers.
    BUTTERFLY = tuple(CX >> (step + 1) for step in range(CX.bit_length() - 1))
    LANES = (1 << min(THREADS, 32)) - 1                 # the lanes a warp of this block has

    @cuda.jit(device=True)
    def row_max(x):
        """max of x over the CX threads of this thread's row, in every one of them (SHFL.BFLY)."""
        for lane_mask in BUTTERFLY:
            x = max(x, shuffle_xor(LANES, x, lane_mask))
        return x

    @cuda.jit(device=True)
    def row_sum(x):
        """sum of x over the CX threads of this thread's row, in every one of them."""
        for lane_mask in BUTTERFLY:
            x += shuffle_xor(LANES, x, lane_mask)
        return x

    @cuda.jit(device=True)
    def zero(x, M, N):
        for a in range(M):
            for n in range(N):
                x[a, n] = float32(0.0)

    @cuda.jit(device=True)
    def visible(query, key, T, causal):
        """Query `query` attends to key `key`: the key exists and (causal) is not in its future.
        Padding query rows (query ≥ T) still see key 0, so their softmax stays finite."""
        return key < T and (not causal or key <= query)

    @cuda.jit(device=True)
    def store_rows(dst, acc, b, h, row0, T, hd):
        """dst[b, h, row0 + r, c] = acc[a, e] for this thread's rows r and head columns c."""
        ty, tx = cuda.threadIdx.x // CX, cuda.threadIdx.x % CX
        for a in range(TM):
            i = row0 + ty + RY * a
            for e in range(TD):
                c = tx + CX * e
                if i < T and c < hd:
                    dst[b, h, i, c] = acc[a, e]

    @cuda.jit(device=True)
    def last_rows_first():
        """row0 of this block's query tile, the last tile first: under a causal mask the last tiles
        have the most keys to stream, and starting them first leaves the short ones for the tail."""
        return (cuda.gridDim.x - 1 - cuda.blockIdx.x) * ROWS

    @cuda.jit
    def forward_kernel(q, k, v, o, lse, H, T, hd, scale, causal):
        Qs = cuda.shared.array((ROWS, HDP), float32)
        Ks = cuda.shared.array((COLS, HDP), float32)
        Vs = cuda.shared.array((COLS, HDP), float32)
        Ps = cuda.shared.array((ROWS, COLSP), float32)
        s = cuda.local.array((TM, TN), float32)
        acc = cuda.local.array((TM, TD), float32)
        m = cuda.local.array(TM, float32)
        l = cuda.local.array(TM, float32)
        b, h = cuda.blockIdx.y // H, cuda.blockIdx.y % H
        ty, tx = cuda.threadIdx.x // CX, cuda.threadIdx.x % CX
        row0 = last_rows_first()
        load_rows(Qs, q, b, h, row0, ROWS, T, hd, scale)          # scale folded into Q once
        zero(acc, TM, TD)
        for a in range(TM):
            m[a], l[a] = float32(-math.inf), float32(0.0)
        keys_end = min(T, row0 + ROWS) if causal else T            # causal: later keys are unseen
        # Loads overlap math, with one buffer per operand and two barriers a tile: Ks is free once
        # every thread has its scores (barrier 1), so the next K tile is stored while P·V runs;
        # Vs and Ps are free after P·V (barrier 2), so the next V tile is stored while the next
        # scores run. Each store is seen by the reads after the following barrier.
        load_rows(Ks, k, b, h, 0, COLS, T, hd, float32(1.0))
        load_rows(Vs, v, b, h, 0, COLS, T, hd, float32(1.0))
        cuda.syncthreads()
        for j0 in range(0, keys_end, COLS):
            has_next = j0 + COLS < keys_end                         # the same in every thread
            zero(s, TM, TN)
            scores(Qs, Ks, s)
            crosses = j0 + COLS > T or (causal and j0 + COLS - 1 > row0)
            for a in range(TM):
                tile_max = float32(-math.inf)
                for n in range(TN):
                    if crosses and not visible(row0 + ty + RY * a, j0 + tx + CX * n, T, causal):
                        s[a, n] = float32(-math.inf)    # −inf: exp gives exactly 0 for the future
                    tile_max = max(tile_max, s[a, n])
                # tile 0 holds key 0, visible to every row: m_new is finite from the first tile on
                m_new = max(m[a], row_max(tile_max))
                alpha = math.exp(m[a] - m_new)
                l[a] *= alpha
                for e in range(TD):
                    acc[a, e] *= alpha
                for n in range(TN):
                    p = math.exp(s[a, n] - m_new)
                    l[a] += p                       # this thread's share of the row sum
                    Ps[ty + RY * a, tx + CX * n] = p
                m[a] = m_new
            cuda.syncthreads()                      # barrier 1: Ps written, Ks read
            if has_next:
                load_rows(Ks, k, b, h, j0 + COLS, COLS, T, hd, float32(1.0))
            times_tile(Ps, Vs, acc)
            cuda.syncthreads()                      # barrier 2: Ps and Vs read, next Ks stored
            if has_next:
                load_rows(Vs, v, b, h, j0 + COLS, COLS, T, hd, float32(1.0))
        for a in range(TM):
            l[a] = row_sum(l[a])                    # the threads' shares, once, at the end
            i = row0 + ty + RY * a
            if tx == 0 and i < T:
                lse[b, h, i] = m[a] + math.log(l[a])
            for e in range(TD):
                acc[a, e] /= l[a]
        store_rows(o, acc, b, h, row0, T, hd)

    @cuda.jit(device=True)
    def probabilities(s, dp, L, D, row0, col0, keys_are_rows, T, causal):
        """s <- P = exp(S − L), dp <- dS = P ∘ (dP − D), zero where masked. The micro-tile's rows are
        keys (dk_dv: L, D per query = per column, in shared) or queries (dq: per row, in registers)."""
        ty, tx = cuda.threadIdx.x // CX, cuda.threadIdx.x % CX
        crosses = max(row0 + ROWS, col0 + COLS) > T or (causal and (
            row0 + ROWS - 1 > col0 if keys_are_rows else col0 + COLS - 1 > row0))
        for a in range(TM):
            for n in range(TN):
                row, col = row0 + ty + RY * a, col0 + tx + CX * n
                if keys_are_rows:
                    L_i, D_i, shown = L[tx + CX * n], D[tx + CX * n], col < T and visible(col, row, T, causal)
                else:
                    L_i, D_i, shown = L[a], D[a], visible(row, col, T, causal)
                p = math.exp(s[a, n] - L_i)         # the forward's softmax, recomputed
                if crosses and not shown:
                    p = float32(0.0)
                s[a, n] = p
                dp[a, n] = p * (dp[a, n] - D_i)

    @cuda.jit(device=True)
    def store_micro_tile(dst, x):
        ty, tx = cuda.threadIdx.x // CX, cuda.threadIdx.x % CX
        for a in range(TM):
            for n in range(TN):
                dst[ty + RY * a, tx + CX * n] = x[a, n]

    @cuda.jit
    def dk_dv_kernel(q, k, v, lse, do, D, dk, dv, H, T, hd, scale, causal):
        Ks = cuda.shared.array((ROWS, HDP), float32)
        Vs = cuda.shared.array((ROWS, HDP), float32)
        Qs = cuda.shared.array((COLS, HDP), float32)
        dOs = cuda.shared.array((COLS, HDP), float32)
        Ps = cuda.shared.array((ROWS, COLSP), float32)      # Pᵀ: rows are keys
        dSs = cuda.shared.array((ROWS, COLSP), float32)     # dSᵀ
        Ls = cuda.shared.array(COLS, float32)
        Ds = cuda.shared.array(COLS, float32)
        s = cuda.local.array((TM, TN), float32)
        dp = cuda.local.array((TM, TN), float32)
        dk_acc = cuda.local.array((TM, TD), float32)
        dv_acc = cuda.local.array((TM, TD), float32)
        b, h = cuda.blockIdx.y // H, cuda.blockIdx.y % H
        row0 = cuda.blockIdx.x * ROWS      # causal: the first key tiles see the most queries
        load_rows(Ks, k, b, h, row0, ROWS, T, hd, float32(1.0))
        load_rows(Vs, v, b, h, row0, ROWS, T, hd, float32(1.0))
        zero(dk_acc, TM, TD)
        zero(dv_acc, TM, TD)
        # causal: queries before row0 see none of these keys (start at the tile holding query row0)
        for i0 in range((row0 // COLS) * COLS if causal else 0, T, COLS):
            load_rows(Qs, q, b, h, i0, COLS, T, hd, scale)         # scale folded into Q: dK needs Q·scale
            load_rows(dOs, do, b, h, i0, COLS, T, hd, float32(1.0))
            load_vector(Ls, lse, b, h, i0, COLS, T)
            load_vector(Ds, D, b, h, i0, COLS, T)
            cuda.syncthreads()
            zero(s, TM, TN)
            zero(dp, TM, TN)
            scores(Ks, Qs, s)                      # Sᵀ = K (Q·scale)ᵀ
            scores(Vs, dOs, dp)                    # dPᵀ = V dOᵀ
            probabilities(s, dp, Ls, Ds, row0, i0, True, T, causal)
            store_micro_tile(Ps, s)
            store_micro_tile(dSs, dp)
            cuda.syncthreads()
            times_tile(Ps, dOs, dv_acc)
            times_tile(dSs, Qs, dk_acc)
            cuda.syncthreads()
        store_rows(dk, dk_acc, b, h, row0, T, hd)
        store_rows(dv, dv_acc, b, h, row0, T, hd)

    @cuda.jit
    def dq_kernel(q, k, v, lse, do, D, dq, H, T, hd, scale, causal):
        Qs = cuda.shared.array((ROWS, HDP), float32)
        dOs = cuda.shared.array((ROWS, HDP), float32)
        Ks = cuda.shared.array((COLS, HDP), float32)
        Vs = cuda.shared.array((COLS, HDP), float32)
        dSs = cuda.shared.array((ROWS, COLSP), float32)
        s = cuda.local.array((TM, TN), float32)
        dp = cuda.local.array((TM, TN), float32)
        dq_acc = cuda.local.array((TM, TD), float32)
        L_row = cuda.local.array(TM, float32)
        D_row = cuda.local.array(TM, float32)
        b, h = cuda.blockIdx.y // H, cuda.blockIdx.y % H
        ty = cuda.threadIdx.x // CX
        row0 = last_rows_first()
        load_rows(Qs, q, b, h, row0, ROWS, T, hd, float32(1.0))
        load_rows(dOs, do, b, h, row0, ROWS, T, hd, float32(1.0))
        for a in range(TM):
            i = row0 + ty + RY * a
            L_row[a] = lse[b, h, i] if i < T else float32(0.0)
            D_row[a] = D[b, h, i] if i < T else float32(0.0)
        zero(dq_acc, TM, TD)
        keys_end = min(T, row0 + ROWS) if causal else T
        for j0 in range(0, keys_end, COLS):
            load_rows(Ks, k, b, h, j0, COLS, T, hd, scale)          # scale folded into K: dQ needs K·scale
            load_rows(Vs, v, b, h, j0, COLS, T, hd, float32(1.0))
            cuda.syncthreads()
            zero(s, TM, TN)
            zero(dp, TM, TN)
            scores(Qs, Ks, s)                      # S = Q (K·scale)ᵀ
            scores(dOs, Vs, dp)                    # dP = dO Vᵀ
            probabilities(s, dp, L_row, D_row, row0, j0, False, T, causal)
            store_micro_tile(dSs, dp)
            cuda.syncthreads()
            times_tile(dSs, Ks, dq_acc)
            cuda.syncthreads()
        store_rows(dq, dq_acc, b, h, row0, T, hd)

    return forward_kernel, dk_dv_kernel, dq_kernel


@cuda.jit
def row_dot_kernel(do, o, D, H, T, hd):
    """D[b, h, i] = Σ_d do[b, h, i, d]·o[b, h, i, d], one thread per row (memory-bound, no reuse)."""
    b, h = cuda.blockIdx.y // H, cuda.blockIdx.y % H
    i = cuda.blockIdx.x * ROW_DOT_THREADS + cuda.threadIdx.x
    if i < T:
        total = float32(0.0)
        for d in range(hd):
            total += do[b, h, i, d] * o[b, h, i, d]
        D[b, h, i] = total


def head_dim_bucket(hd):
    """The compiled head_dim that covers hd (inputs are zero-padded up to it)."""
    if hd > HEAD_DIMS[-1]:
        raise ValueError(f"head_dim must be at most {HEAD_DIMS[-1]}, got {hd}")
    return next(size for size in HEAD_DIMS if size >= hd)


def check_tiles(tiles, HD):
    """Tiles that divide evenly (every thread owns whole micro-tiles) and rows that warp shuffles
    can reduce."""
    rows, cols, thread_rows, thread_cols = tiles
    if rows % thread_rows or cols % thread_cols or HD % thread_cols:
        raise ValueError(f"tiles {tuple(tiles)} must have thread_rows dividing rows and thread_cols "
                         f"dividing cols and head_dim {HD}")
    if thread_cols & (thread_cols - 1) or thread_cols > 32:
        raise ValueError(f"tiles {tuple(tiles)}: thread_cols must be a power of two ≤ 32 (a row's "
                         f"threads are one aligned group of lanes, reduced by warp shuffles)")
    return Tiles(*tiles)


def kernels_for(hd, blocks):
    """(forward tiles, backward tiles, (forward, dk_dv, dq) kernels) for this head_dim: the build for
    HD = hd exactly, or the padded build of the next bucket. blocks: None for DEFAULT_TILES, or one
    Tiles 4-tuple used by the forward and the backward."""
    HD = head_dim_bucket(hd)
    padded = hd != HD
    forward_tiles, backward_tiles = DEFAULT_TILES[HD] if blocks is None else (blocks, blocks)
    forward_tiles, backward_tiles = check_tiles(forward_tiles, HD), check_tiles(backward_tiles, HD)
    for tiles in {forward_tiles, backward_tiles}:
        if (HD, tiles, padded) not in _kernels:
            _kernels[HD, tiles, padded] = make_kernels(HD, tiles, padded)
    forward = _kernels[HD, forward_tiles, padded][0]
    _, dk_dv, dq = _kernels[HD, backward_tiles, padded]
    return forward_tiles, backward_tiles, (forward, dk_dv, dq)


def check_qkv(**arrays):
    check_float32(**arrays)
    shape = arrays["q"].shape
    if len(shape) != 4:
        raise ValueError(f"q must be (B, H, T, head_dim), got shape {shape}")
    for name, x in arrays.items():
        expected = shape[:3] if name == "lse" else shape
        if tuple(x.shape) != tuple(expected):
            raise ValueError(f"{name} must have shape {tuple(expected)} (q is {tuple(shape)}), got {tuple(x.shape)}")


def launch_shape(q, tiles):
    """(grid, threads): one block per tiles.rows rows of each (batch, head)."""
    B, H, T, _ = q.shape
    return (n_blocks(T, tiles.rows), B * H), tiles.thread_rows * tiles.thread_cols


def flash_attention_forward(q, k, v, causal=True, blocks=None):
    """q, k, v (B, H, T, hd) float32 -> o (B, H, T, hd), lse (B, H, T).
    Matches tinylm.core.flash_attention.flash_forward. blocks: None (DEFAULT_TILES) or a Tiles 4-tuple."""
    check_qkv(q=q, k=k, v=v)
    B, H, T, hd = q.shape
    tiles, _, (forward_kernel, _, _) = kernels_for(hd, blocks)
    o, lse = empty(q.shape, like=q), empty(q.shape[:3], like=q)
    grid, threads = launch_shape(q, tiles)
    forward_kernel[grid, threads, stream()](q, k, v, o, lse, H, T, hd, float32(1 / math.sqrt(hd)), causal)
    return o, lse


def flash_attention_backward(q, k, v, o, lse, do, causal=True, blocks=None):
    """Gradients of sum(do · o) -> dq, dk, dv (B, H, T, hd). Matches tinylm.core.flash_attention.flash_backward."""
    check_qkv(q=q, k=k, v=v, o=o, do=do, lse=lse)
    B, H, T, hd = q.shape
    _, tiles, (_, dk_dv_kernel, dq_kernel) = kernels_for(hd, blocks)
    scale = float32(1 / math.sqrt(hd))
    D = empty(q.shape[:3], like=q)
    row_dot_kernel[(n_blocks(T, ROW_DOT_THREADS), B * H), ROW_DOT_THREADS, stream()](do, o, D, H, T, hd)
    dq, dk, dv = empty(q.shape, like=q), empty(q.shape, like=q), empty(q.shape, like=q)
    grid, threads = launch_shape(q, tiles)
    dk_dv_kernel[grid, threads, stream()](q, k, v, lse, do, D, dk, dv, H, T, hd, scale, causal)
    dq_kernel[grid, threads, stream()](q, k, v, lse, do, D, dq, H, T, hd, scale, causal)
    return dq, dk, dv


def kernels_and_signatures():
    """(name, Python function, signature) for every kernel specialisation the entry points launch:
    the forward, dk_dv and dq kernels at each head_dim's DEFAULT_TILES, and row_dot.
    For kernels.ptx_check and kernels.report (compile for sm_90 without a GPU)."""
    A3, A4 = C3, C4
    attention_args = "int64, int64, int64, float32, boolean"
    for HD in HEAD_DIMS:
        _, _, (forward, dk_dv, dq) = kernels_for(HD, None)
        yield f"flash forward hd{HD}", forward, f"void({A4}, {A4}, {A4}, {A4}, {A3}, {attention_args})"
        yield f"flash dk_dv hd{HD}", dk_dv, f"void({A4}, {A4}, {A4}, {A3}, {A4}, {A3}, {A4}, {A4}, {attention_args})"
        yield f"flash dq hd{HD}", dq, f"void({A4}, {A4}, {A4}, {A3}, {A4}, {A3}, {A4}, {attention_args})"
    yield "flash row_dot", row_dot_kernel, f"void({A4}, {A4}, {A3}, int64, int64, int64)"


def launch_threads():
    """{name: threads per block} for every kernel kernels_and_signatures() names (resident blocks
    per SM depend on it)."""
    threads = {"flash row_dot": ROW_DOT_THREADS}
    for HD, (forward_tiles, backward_tiles) in DEFAULT_TILES.items():
        threads[f"flash forward hd{HD}"] = forward_tiles.thread_rows * forward_tiles.thread_cols
        for name in ("dk_dv", "dq"):
            threads[f"flash {name} hd{HD}"] = backward_tiles.thread_rows * backward_tiles.thread_cols
    return threads
