"""The opt-in tensor-core GEMM (kernels/matmul_tf32.py) and its instructions (kernels/tensor_core.py).

Under the CUDA simulator the instructions are their NumPy twins; on a GPU (bench/gpu_check.sh's
tests section) the same tests run the real cvt.rna.tf32.f32 and mma.sync against the twins and
float64. The accuracy tests can fail: plain TF32 (passes=1, a_hi·b_hi only) must miss the bound
that the 3xTF32 split meets, by a wide margin."""
import numpy as np
import pytest
from numba import config, cuda

from tinylm import GPT, GPTConfig
from tinylm.core.backend import to_numpy
from tinylm.kernels import matmul_tf32 as mt
from tinylm.kernels import tensor_core as tc
from tinylm.kernels.matmul_tf32 import matmul_tf32
from test_kernels import device  # noqa: E402  (tests/ is on sys.path)

SMALL_TILE = (16, 8, 16, 16, 8)          # one warp, one 16×8 mma tile: the simulator's thread count
TWO_WARPS = (32, 32, 16, 32, 16)         # 2 warps, each 2×2 mma tiles


def rel_error(got, want):
    """‖got − want‖ / ‖want‖ (Frobenius, float64)."""
    return float(np.linalg.norm(to_numpy(got).astype(np.float64) - want) / np.linalg.norm(want))


def operands(rng, M, N, K, trans_a, trans_b):
    a = rng.uniform(-1, 1, size=(K, M) if trans_a else (M, K)).astype(np.float32)
    b = rng.uniform(-1, 1, size=(N, K) if trans_b else (K, N)).astype(np.float32)
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    return a, b, want


# ----------------------------------------------------------------------------- cvt.rna.tf32.f32
KNOWN = {                 # float32 bits -> TF32 bits: 10 mantissa bits, nearest, ties away from zero
    0x3F800000: 0x3F800000,          # 1.0 is a TF32
    0x3F800FFF: 0x3F800000,          # below half of the dropped 13 bits: down
    0x3F801000: 0x3F802000,          # a tie rounds away (to nearest even would give 0x3F800000)
    0xBF801000: 0xBF802000,          # ... on either sign
    0x3F803000: 0x3F804000,
    0x40490FDB: 0x40490000,          # π -> 3.140625
    0x3FFFF000: 0x40000000,          # the carry runs into the exponent: 2.0
    0x7F7FFFFF: 0x7F800000,          # past the largest finite TF32: +inf
    0x7F800000: 0x7F800000,          # inf stays inf
    0x00000001: 0x00000000,          # the smallest subnormal rounds to 0
}


def test_tf32_twin_on_known_bit_patterns():
    got = tc.tf32_bits(np.array(list(KNOWN), dtype=np.uint32))
    assert [hex(g) for g in got] == [hex(w) for w in KNOWN.values()]
    nan = tc.tf32_bits(np.array([0x7FFFFFFF, 0x7FC00000], dtype=np.uint32)).view(np.float32)
    assert np.isnan(nan).all()                  # CUDA's canonical NaN 0x7FFFFFFF must not carry to -0.0


@cuda.jit
def round_kernel(x, hi, lo):
    i = cuda.grid(1)
    if i < x.size:
        hi[i] = tc.tf32_round(x[i])
        lo[i] = tc.tf32_round(x[i] - hi[i])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # inf − inf, under the simulator
def test_tf32_round_and_the_split():
    """The instruction (the twin under the simulator) gives the twin's bits, and the split is exact to
    ~2⁻²²: x − (hi + lo) is below 2⁻²² |x|, while hi alone is off by up to 2⁻¹¹ |x|."""
    x = np.random.default_rng(0).normal(size=256).astype(np.float32)
    x[:len(KNOWN)] = np.array(list(KNOWN), dtype=np.uint32).view(np.float32)
    hi, lo = device(np.zeros_like(x)), device(np.zeros_like(x))
    round_kernel[4, 64](device(x), hi, lo)
    hi, lo = to_numpy(hi), to_numpy(lo)
    assert (hi.view(np.uint32) == tc.tf32_bits(x.view(np.uint32))).all()
    assert (hi.view(np.uint32) & 0x1FFF == 0).all() and (lo.view(np.uint32) & 0x1FFF == 0).all()
    finite = np.isfinite(hi) & (np.abs(x) > 1e-30)
    x64, hi64, lo64 = (v[finite].astype(np.float64) for v in (x, hi, lo))
    assert np.max(np.abs(x64 - hi64) / np.abs(x64)) > 2 ** -13                 # hi alone: TF32's error
    assert np.max(np.abs(x64 - hi64 - lo64) / np.abs(x64)) <= 2 ** -22


# ----------------------------------------------------------------------------- mma.sync m16n8k8
def test_fragment_layout_is_the_ptx_isa_table():
    """The PTX ISA's m16n8k8 .tf32 fragments, entry by entry for lane 13 (group 3, thread 1), and
    every element of A (16×8), B (8×8) and C (16×8) held by exactly one (lane, register)."""
    assert [tc.a_position(13, q) for q in range(4)] == [(3, 1), (11, 1), (3, 5), (11, 5)]
    assert [tc.b_position(13, q) for q in range(2)] == [(1, 3), (5, 3)]
    assert [tc.c_position(13, q) for q in range(4)] == [(3, 2), (3, 3), (11, 2), (11, 3)]
    for position, registers, shape in ((tc.a_position, 4, (16, 8)), (tc.b_position, 2, (8, 8)),
                                       (tc.c_position, 4, (16, 8))):
        held = sorted(position(lane, q) for lane in range(32) for q in range(registers))
        assert held == sorted(np.ndindex(*shape))


def test_warp_mma_twin_is_a_times_b_plus_c():
    rng = np.random.default_rng(1)
    A, B, C = rng.normal(size=(16, 8)), rng.normal(size=(8, 8)), rng.normal(size=(16, 8))
    fragments = [(tuple(A[tc.a_position(lane, q)] for q in range(4)), tuple(B[tc.b_position(lane, q)] for q in range(2)),
                  tuple(C[tc.c_position(lane, q)] for q in range(4))) for lane in range(32)]
    D = np.zeros((16, 8))
    for lane, d in enumerate(tc.warp_mma(fragments)):
        for q in range(4):
            D[tc.c_position(lane, q)] = d[q]
    np.testing.assert_allclose(D, A @ B + C, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the GEMM
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_3xtf32_matches_float64_and_plain_tf32_does_not(trans_a, trans_b):
    """(20, 12, 40): rows a multiple of 4 (the 128-bit-load build), two whole slices and a ragged
    tail, two blocks each way. 3xTF32 is within 1e-6 of float64 (float32 rounding alone is ~1e-7
    here); a_hi·b_hi alone is ~3e-4, past 1e-4."""
    a, b, want = operands(np.random.default_rng(2), 20, 12, 40, trans_a, trans_b)
    error3 = rel_error(matmul_tf32(device(a), device(b), trans_a, trans_b, tile=SMALL_TILE), want)
    assert error3 < 1e-6, error3
    if (trans_a, trans_b) == (False, False):
        error1 = rel_error(matmul_tf32(device(a), device(b), tile=SMALL_TILE, passes=1), want)
        assert error1 > 1e-4 and error1 > 100 * error3, (error1, error3)


def test_3xtf32_scalar_loads_and_two_warps():
    """Row lengths not a multiple of 4 (scalar loads, as the LM head's vocabulary) with 2×2 mma
    tiles per warp in a two-warp block."""
    a, b, want = operands(np.random.default_rng(3), 33, 19, 37, True, False)
    assert rel_error(matmul_tf32(device(a), device(b), True, False, tile=TWO_WARPS), want) < 1e-6


def test_matmul_tf32_rejects_bad_input():
    a = device(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="passes"):
        matmul_tf32(a, a, tile=SMALL_TILE, passes=2)
    with pytest.raises(ValueError, match="16×8 mma tiles"):
        matmul_tf32(a, a, tile=(16, 8, 16, 12, 8))
    with pytest.raises(ValueError, match="inner dimensions"):
        matmul_tf32(a, device(np.zeros((3, 4))))


BANKS = 32


def fragment_passes(width, pad):
    """Shared-memory passes one warp's fragment load needs (most distinct words in one bank), over
    every register of A (k-major rows of width + pad words)."""
    worst = 0
    for q in range(4):
        words = [kk * (width + pad) + m for m, kk in (tc.a_position(lane, q) for lane in range(32))]
        per_bank = {}
        for w in set(words):
            per_bank.setdefault(w % BANKS, set()).add(w)
        worst = max(worst, max(len(v) for v in per_bank.values()))
    return worst


def test_fragment_loads_are_one_pass_and_the_counter_sees_a_conflict():
    tile = mt.DEFAULT_TILE
    assert fragment_passes(tile.BM, mt.PAD) == fragment_passes(tile.BN, mt.PAD) == 1
    assert fragment_passes(tile.BM, 4) == 2            # matmul.py's padding of 4 words would conflict


# ----------------------------------------------------------------------------- the model flag
TINY = dict(vocab_size=11, n_ctx=8, n_layer=1, n_head=2, d_model=16)


@pytest.mark.skipif(not config.ENABLE_CUDASIM, reason="a CPU model: the simulator's arrays")
def test_gpt_tf32_3x_trains_like_exact_fp32():
    """GPT(config, kernels=True, tf32="3x") runs the tensor-core set, and its loss and gradients match
    the float64 reference model's to float32 level (measured 5e-7; the exact FP32 set's 3e-7); the
    default stays the exact FP32 set."""
    from tinylm.core import kernel_layers
    config64 = GPTConfig(**TINY, dtype="float64")
    reference = GPT(config64, device="cpu", kernels=False, reference=True, seed=4)
    model = GPT(GPTConfig(**TINY), device="cpu", kernels=True, tf32="3x", seed=4)
    assert model.layers is kernel_layers.LAYERS_3XTF32 and model.copy().layers is kernel_layers.LAYERS_3XTF32
    assert GPT(GPTConfig(**TINY), device="cpu", kernels=True).layers is kernel_layers.LAYERS
    idx, targets = np.random.default_rng(5).integers(0, TINY["vocab_size"], size=(2, 2, 5))
    loss, grads = model.loss_and_grads(idx, targets)
    loss64, grads64 = reference.loss_and_grads(idx, targets)
    assert abs(loss - loss64) < 1e-6 * abs(loss64)
    for name, g64 in grads64.items():
        assert rel_error(grads[name], to_numpy(g64)) < 2e-6, name


def test_tf32_flag_is_checked():
    with pytest.raises(ValueError, match="needs kernels=True"):
        GPT(GPTConfig(**TINY), device="cpu", kernels=False, tf32="3x")
    with pytest.raises(ValueError, match="tf32 must be"):
        GPT(GPTConfig(**TINY), device="cpu", kernels=True, tf32="1x")
