"""Flash attention forward and backward as Numba CUDA kernels (float32), the GPU twins of
tinylm/flash_attention.py's `flash_forward` / `flash_backward` — same algorithm, same names
(m, l, acc, L = lse, D), and tested against them.

Work split: a thread block owns ROWS consecutive rows of one (batch, head) — one row per thread,
its vectors kept in per-thread arrays — and streams the other operand through shared memory TILE
rows at a time, so each K/V (or Q/dO) row is read from global memory once per block, not once per
row. Scores exist only as one number at a time in a register: nothing T×T is ever stored.

    forward  (grid: query blocks × B·H):  one thread per query row; online softmax over K/V tiles
    backward (three launches):
        row_dot:  D_i = Σ_d dO_id O_id                    one thread per query row
        dk_dv:    one thread per KEY row j; streams Q/dO tiles and sums dK_j, dV_j in registers
        dq:       one thread per QUERY row i; streams K/V tiles and sums dQ_i in registers

dQ is a separate pass, not atomics: in the dk_dv pass every key thread contributes to every dQ_i
it sees, so accumulating dQ there would need a float atomicAdd per (i, j, d) — contention on the
same addresses, and a summation order that changes from run to run (non-deterministic gradients).
The separate pass recomputes S and P once more (the backward's 4 matmuls become 5) but every dQ_i
is summed by one thread in a fixed order: deterministic, and no atomics for the simulator to fake.

Per-thread vectors need a compile-time length, so kernels are compiled per head_dim bucket
(HD = 32, 64 or 128; head_dim ≤ HD is a runtime loop bound). The simulator runs the same kernels
on NumPy arrays; keep its shapes tiny (one Python thread per CUDA thread).
"""
import math

from numba import cuda, float32

from .launch import check_float32, empty, n_blocks

HEAD_DIMS = (32, 64, 128)
DEFAULT_BLOCKS = (64, 32)          # ROWS (threads, rows owned per block), TILE (rows streamed per step)
_kernels = {}


def make_kernels(HD, ROWS, TILE):
    """The four kernels for head_dim ≤ HD, ROWS rows per block and TILE-row shared-memory tiles."""

    @cuda.jit(device=True)
    def load_tile(dst_a, dst_b, src_a, src_b, b, h, start, T, hd):
        """dst[r, :] = src[b, h, start + r, :] for r < TILE, two arrays at once, 0 past T: the whole
        block copies, consecutive threads taking consecutive elements (coalesced reads)."""
        for e in range(cuda.threadIdx.x, TILE * hd, ROWS):
            r, d = e // hd, e % hd
            inside = start + r < T
            dst_a[r, d] = src_a[b, h, start + r, d] if inside else float32(0.0)
            dst_b[r, d] = src_b[b, h, start + r, d] if inside else float32(0.0)

    @cuda.jit(device=True)
    def load_row(dst_a, dst_b, src_a, src_b, b, h, row, T, hd):
        """This thread's own row of two arrays into its per-thread vectors (0 past T)."""
        for d in range(hd):
            dst_a[d] = src_a[b, h, row, d] if row < T else float32(0.0)
            dst_b[d] = src_b[b, h, row, d] if row < T else float32(0.0)

    @cuda.jit(device=True)
    def keys_end(row0, T, causal):
        """End of the keys rows row0..row0+ROWS−1 attend to: causal rows see no later key."""
        if causal and row0 + ROWS < T:
            return row0 + ROWS
        return T

    @cuda.jit
    def forward_kernel(q, k, v, o, lse, H, T, hd, scale, causal):
        Ks = cuda.shared.array((TILE, HD), float32)
        Vs = cuda.shared.array((TILE, HD), float32)
        q_row = cuda.local.array(HD, float32)
        acc = cuda.local.array(HD, float32)
        s = cuda.local.array(TILE, float32)
        b, h = cuda.blockIdx.y // H, cuda.blockIdx.y % H
        row0 = cuda.blockIdx.x * ROWS
        i = row0 + cuda.threadIdx.x
        live = i < T
        for d in range(hd):
            q_row[d] = q[b, h, i, d] * scale if live else float32(0.0)
            acc[d] = float32(0.0)
        m, l = float32(-math.inf), float32(0.0)
        for j0 in range(0, keys_end(row0, T, causal), TILE):
            load_tile(Ks, Vs, k, v, b, h, j0, T, hd)
            cuda.syncthreads()
            if live:
                m_new = m
                for r in range(TILE):
                    j = j0 + r
                    score = float32(-math.inf)             # −inf: exp gives exactly 0 for the future
                    if j < T and (not causal or j <= i):
                        score = float32(0.0)
                        for d in range(hd):
                            score += q_row[d] * Ks[r, d]
                    s[r] = score
                    if score > m_new:
                        m_new = score
                # tile 0 holds key 0, visible to every row: m_new is finite from the first tile on
                alpha = math.exp(m - m_new)
                l *= alpha
                for d in range(hd):
                    acc[d] *= alpha
                for r in range(TILE):
                    p = math.exp(s[r] - m_new)
                    l += p
                    for d in range(hd):
                        acc[d] += p * Vs[r, d]
                m = m_new
            cuda.syncthreads()                             # the tile is used up before it is replaced
        if live:
            for d in range(hd):
                o[b, h, i, d] = acc[d] / l
            lse[b, h, i] = m + math.log(l)

    @cuda.jit
    def row_dot_kernel(do, o, D, H, T, hd):
        b, h = cuda.blockIdx.y // H, cuda.blockIdx.y % H
        i = cuda.blockIdx.x * ROWS + cuda.threadIdx.x
        if i < T:
            total = float32(0.0)
            for d in range(hd):
                total += do[b, h, i, d] * o[b, h, i, d]
            D[b, h, i] = total

    @cuda.jit
    def dk_dv_kernel(q, k, v, lse, do, D, dk, dv, H, T, hd, scale, causal):
        Qs = cuda.shared.array((TILE, HD), float32)
        dOs = cuda.shared.array((TILE, HD), float32)
        Ls = cuda.shared.array(TILE, float32)
        Ds = cuda.shared.array(TILE, float32)
        k_row = cuda.local.array(HD, float32)
        v_row = cuda.local.array(HD, float32)
        dk_row = cuda.local.array(HD, float32)
        dv_row = cuda.local.array(HD, float32)
        b, h = cuda.blockIdx.y // H, cuda.blockIdx.y % H
        row0 = cuda.blockIdx.x * ROWS
        j = row0 + cuda.threadIdx.x
        live = j < T
        load_row(k_row, v_row, k, v, b, h, j, T, hd)
        for d in range(hd):
            dk_row[d] = float32(0.0)
            dv_row[d] = float32(0.0)
        q_start = (row0 // TILE) * TILE if causal else 0   # causal: queries before row0 see none of these keys
        for i0 in range(q_start, T, TILE):
            load_tile(Qs, dOs, q, do, b, h, i0, T, hd)
            for r in range(cuda.threadIdx.x, TILE, ROWS):
                inside = i0 + r < T
                Ls[r] = lse[b, h, i0 + r] if inside else float32(0.0)
                Ds[r] = D[b, h, i0 + r] if inside else float32(0.0)
            cuda.syncthreads()
            if live:
                for r in range(TILE):
                    i = i0 + r
                    if i < T and (not causal or j <= i):
                        score, dp = float32(0.0), float32(0.0)
                        for d in range(hd):
                            score += Qs[r, d] * k_row[d]
                            dp += dOs[r, d] * v_row[d]
                        p = math.exp(score * scale - Ls[r])        # the forward's softmax, recomputed
                        ds = p * (dp - Ds[r]) * scale
                        for d in range(hd):
                            dv_row[d] += p * dOs[r, d]
                            dk_row[d] += ds * Qs[r, d]
            cuda.syncthreads()
        if live:
            for d in range(hd):
                dk[b, h, j, d] = dk_row[d]
                dv[b, h, j, d] = dv_row[d]

    @cuda.jit
    def dq_kernel(q, k, v, lse, do, D, dq, H, T, hd, scale, causal):
        Ks = cuda.shared.array((TILE, HD), float32)
        Vs = cuda.shared.array((TILE, HD), float32)
        q_row = cuda.local.array(HD, float32)
        do_row = cuda.local.array(HD, float32)
        dq_row = cuda.local.array(HD, float32)
        b, h = cuda.blockIdx.y // H, cuda.blockIdx.y % H
        row0 = cuda.blockIdx.x * ROWS
        i = row0 + cuda.threadIdx.x
        live = i < T
        load_row(q_row, do_row, q, do, b, h, i, T, hd)
        for d in range(hd):
            dq_row[d] = float32(0.0)
        L_i = lse[b, h, i] if live else float32(0.0)
        D_i = D[b, h, i] if live else float32(0.0)
        for j0 in range(0, keys_end(row0, T, causal), TILE):
            load_tile(Ks, Vs, k, v, b, h, j0, T, hd)
            cuda.syncthreads()
            if live:
                for r in range(TILE):
                    j = j0 + r
                    if j < T and (not causal or j <= i):
                        score, dp = float32(0.0), float32(0.0)
                        for d in range(hd):
                            score += q_row[d] * Ks[r, d]
                            dp += do_row[d] * Vs[r, d]
                        ds = math.exp(score * scale - L_i) * (dp - D_i) * scale
                        for d in range(hd):
                            dq_row[d] += ds * Ks[r, d]
            cuda.syncthreads()
        if live:
            for d in range(hd):
                dq[b, h, i, d] = dq_row[d]

    return forward_kernel, row_dot_kernel, dk_dv_kernel, dq_kernel


def kernels_for(hd, blocks):
    """The compiled kernel set for this head_dim's bucket and these block sizes."""
    if hd > HEAD_DIMS[-1]:
        raise ValueError(f"head_dim must be at most {HEAD_DIMS[-1]}, got {hd}")
    HD = next(size for size in HEAD_DIMS if size >= hd)
    key = (HD,) + tuple(blocks)
    if key not in _kernels:
        _kernels[key] = make_kernels(*key)
    return _kernels[key]


def check_qkv(**arrays):
    check_float32(**arrays)
    shape = arrays["q"].shape
    if len(shape) != 4:
        raise ValueError(f"q must be (B, H, T, head_dim), got shape {shape}")
    for name, x in arrays.items():
        expected = shape[:3] if name == "lse" else shape
        if tuple(x.shape) != tuple(expected):
            raise ValueError(f"{name} must have shape {tuple(expected)} (q is {tuple(shape)}), got {tuple(x.shape)}")


def launch_shape(q, blocks):
    """(grid, threads): one block per ROWS rows of each (batch, head)."""
    B, H, T, _ = q.shape
    return (n_blocks(T, blocks[0]), B * H), blocks[0]


def flash_attention_forward(q, k, v, causal=True, blocks=DEFAULT_BLOCKS):
    """q, k, v (B, H, T, hd) float32 -> o (B, H, T, hd), lse (B, H, T).
    Matches tinylm.flash_attention.flash_forward."""
    check_qkv(q=q, k=k, v=v)
    B, H, T, hd = q.shape
    o, lse = empty(q.shape, like=q), empty(q.shape[:3], like=q)
    grid, threads = launch_shape(q, blocks)
    forward_kernel = kernels_for(hd, blocks)[0]
    forward_kernel[grid, threads](q, k, v, o, lse, H, T, hd, float32(1 / math.sqrt(hd)), causal)
    return o, lse


def flash_attention_backward(q, k, v, o, lse, do, causal=True, blocks=DEFAULT_BLOCKS):
    """Gradients of sum(do · o) -> dq, dk, dv (B, H, T, hd). Matches tinylm.flash_attention.flash_backward."""
    check_qkv(q=q, k=k, v=v, o=o, do=do, lse=lse)
    B, H, T, hd = q.shape
    _, row_dot_kernel, dk_dv_kernel, dq_kernel = kernels_for(hd, blocks)
    grid, threads = launch_shape(q, blocks)
    scale = float32(1 / math.sqrt(hd))
    D = empty(q.shape[:3], like=q)
    row_dot_kernel[grid, threads](do, o, D, H, T, hd)
    dq, dk, dv = empty(q.shape, like=q), empty(q.shape, like=q), empty(q.shape, like=q)
    dk_dv_kernel[grid, threads](q, k, v, lse, do, D, dk, dv, H, T, hd, scale, causal)
    dq_kernel[grid, threads](q, k, v, lse, do, D, dq, H, T, hd, scale, causal)
    return dq, dk, dv
