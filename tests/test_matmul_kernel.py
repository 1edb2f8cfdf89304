"""The matmul kernel's shared-memory traffic, counted from the kernel's own index functions (plain
Python the kernel also calls): its main loop's 128-bit reads take one pass per quarter-warp, its
128-bit copies too, and its transposing scalar copies at most two. (The machine-code budgets —
FFMA share, LDS.128, barriers, spills, blocks per SM — are tests/test_kernel_report.py's.)"""
import importlib

mm = importlib.import_module("tinylm.kernels.matmul")
TILE = mm.DEFAULT_TILE
THREADS = mm.threads_per_block(TILE)
BANKS = 32


def wavefronts(word_addresses):
    """Passes one warp's 4-byte shared accesses need: the most distinct words in one bank
    (the same word read by several threads is a broadcast, one pass)."""
    per_bank = {}
    for w in set(word_addresses):
        per_bank.setdefault(w % BANKS, set()).add(w)
    return max(len(words) for words in per_bank.values())


def wavefronts128(first_words):
    """Passes one warp's 16-byte shared accesses need: the hardware serves them a quarter-warp
    (8 threads, up to 128 bytes) at a time, so the most passes any quarter needs, where one
    quarter's distinct 4-word chunks conflict when they share banks."""
    return max(max(len({w for w in set(first_words[q:q + 8]) if (w // 4) % 8 == group}) for group in range(8))
               for q in range(0, 32, 8))


def warps():
    return [range(w * 32, w * 32 + 32) for w in range(THREADS // 32)]


def test_main_loop_reads_are_one_pass_per_quarter_warp():
    BM, BN, BK, WM, WN, WMITER, WNITER = TILE
    for warp in warps():
        origins = [mm.lane_origin(t, TILE) for t in warp]
        for kk in range(BK):
            for wm in range(WMITER):
                assert wavefronts128([mm.shared_offset(kk, m0 + wm * WM // WMITER, BM) for m0, _ in origins]) == 1
            for wn in range(WNITER):
                assert wavefronts128([mm.shared_offset(kk, n0 + wn * WN // WNITER, BN) for _, n0 in origins]) == 1


def copies(width, along_k):
    """Per warp and chunk: the shared words one copy step writes (4 per thread)."""
    BK = TILE.BK
    for warp in warps():
        for t in range(width * BK // (4 * THREADS)):
            chunks = [mm.copy_chunk(e + t * THREADS, width, BK, along_k) for e in warp]
            yield [[mm.shared_offset(kk + q, r, width) if along_k else mm.shared_offset(kk, r + q, width)
                    for kk, r in chunks] for q in range(4)]


def test_copies_into_shared_memory():
    """The 128-bit stores (a chunk of 4 rows at one k) take one pass per quarter-warp; the
    transposing scalar stores (4 k of one row, into a column) at most two passes."""
    for width in (TILE.BM, TILE.BN):
        assert max(wavefronts128(words[0]) for words in copies(width, along_k=False)) == 1, width
        assert max(wavefronts(words[q]) for words in copies(width, along_k=True) for q in range(4)) <= 2, width


def test_counter_sees_a_conflict():
    """The counters can fail: unpadded rows put the transposing stores 4 ways into one bank, and
    lanes 4 words apart in one quarter-warp's 128-bit reads collide."""
    BK, width = TILE.BK, TILE.BM
    unpadded = [kk * width + r for kk, r in (mm.copy_chunk(e, width, BK, True) for e in range(32))]
    assert wavefronts(unpadded) == 4
    assert wavefronts128([32 * lane for lane in range(32)]) == 8
