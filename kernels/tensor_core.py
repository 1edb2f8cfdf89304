"""TF32 tensor-core instructions, which Numba has no API for (numba issue 5899), as inline PTX:

    tf32_round(x) -> float32                 cvt.rna.tf32.f32: x rounded to TF32 (10 mantissa bits,
                                             to nearest, ties away from zero), kept in a float32
    mma_tf32(a, b, c) -> d                   mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32:
                                             D (16×8) = A (16×8) · B (8×8) + C, the warp together

mma_tf32 is a warp-wide instruction: each of the 32 lanes passes its own fragments, a = (a0..a3),
b = (b0, b1), c = (c0..c3) as float32 tuples, and gets its d = (d0..d3) back. Which element of A,
B and C/D a lane holds is the PTX ISA's fragment layout for m16n8k8 with .tf32 (section "Matrix
Fragments for mma.m16n8k8"), written once below as a_position / b_position / c_position (group
g = lane // 4, t = lane % 4):

    a0 (g, t)    a1 (g+8, t)    a2 (g, t+4)    a3 (g+8, t+4)       A[row, k]
    b0 (t, g)    b1 (t+4, g)                                       B[k, col]
    c0 (g, 2t)   c1 (g, 2t+1)   c2 (g+8, 2t)   c3 (g+8, 2t+1)      C[row, col], D likewise

The kernels call these functions to place fragments, and the simulator's twin of mma_tf32 calls the
same ones to gather the warp's matrices, so the simulator cannot tell a wrong transcription of the
table from a right one: tests/test_matmul_tf32_kernel.py pins the table entry by entry, and on a
GPU the same tests compare the real instruction with float64.

Under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) the names are plain Python: tf32_round on the
float32 bit pattern in NumPy; mma_tf32 gathers the whole warp's fragments through a scratch table
and a block barrier (the simulator runs one Python thread per CUDA thread and has no warp
primitives), so every thread of the block must call it equally often — as every warp of a GEMM
does. The twin sums each output's eight exact TF32 products and c in float64 and rounds once to
float32; the hardware's accumulation order and rounding inside the instruction are not modelled.
"""
import numpy as np
from numba import config


def a_position(lane, q):
    """(row, k) of A held as a_q by this lane."""
    return lane // 4 + 8 * (q % 2), lane % 4 + 4 * (q // 2)


def b_position(lane, q):
    """(k, col) of B held as b_q by this lane."""
    return lane % 4 + 4 * q, lane // 4


def c_position(lane, q):
    """(row, col) of C (and D) held as c_q by this lane."""
    return lane // 4 + 8 * (q // 2), 2 * (lane % 4) + q % 2


def tf32_bits(bits):
    """uint32 float32 bit patterns -> the patterns cvt.rna.tf32.f32 gives: add half of the 13
    dropped bits' weight to the magnitude, then clear them (a tie carries up: away from zero; past
    the largest finite float the carry reaches the exponent: ±inf). NaN stays NaN."""
    bits = np.asarray(bits, dtype=np.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, bits, (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).astype(np.uint32)


def warp_mma(fragments):
    """The simulator's m16n8k8: fragments[lane] = (a, b, c) for 32 lanes -> [d for each lane]."""
    A, B, C = np.zeros((16, 8)), np.zeros((8, 8)), np.zeros((16, 8))
    for lane, (a, b, c) in enumerate(fragments):
        for q in range(4):
            A[a_position(lane, q)] = a[q]
            C[c_position(lane, q)] = c[q]
        for q in range(2):
            B[b_position(lane, q)] = b[q]
    D = (A @ B + C).astype(np.float32)       # TF32 products are exact in float64; one rounding
    return [tuple(D[c_position(lane, q)] for q in range(4)) for lane in range(32)]


if config.ENABLE_CUDASIM:
    import threading

    from numba.cuda.simulator.kernel import _get_kernel_context

    _fragments = {}                 # (warp, call parity) -> its 32 lanes' (a, b, c); one block runs at a time
    _calls = threading.local()      # this thread's count of calls (a simulator thread lives for one block)

    def tf32_round(x):
        return tf32_bits(np.float32(x).view(np.uint32)).view(np.float32)[()]

    def mma_tf32(a, b, c):
        cuda = _get_kernel_context()
        tid = cuda.threadIdx.x + cuda.blockDim.x * (cuda.threadIdx.y + cuda.blockDim.y * cuda.threadIdx.z)
        # Two tables, used by alternate calls: a lane that writes call n+2's fragments has passed call
        # n+1's barrier, which every lane reaches only after reading call n's. One barrier a call.
        _calls.n = getattr(_calls, "n", 0) + 1
        warp = _fragments.setdefault((tid // 32, _calls.n % 2), [None] * 32)
        warp[tid % 32] = tuple(tuple(np.float32(x) for x in f) for f in (a, b, c))
        cuda.syncthreads()                  # every lane's fragments are in
        return warp_mma(warp)[tid % 32]

else:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.cuda.extending import intrinsic

    F32, I32 = ir.FloatType(), ir.IntType(32)
    FOUR, TWO = types.UniTuple(types.float32, 4), types.UniTuple(types.float32, 2)
    MMA = ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
           "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};")

    @intrinsic
    def tf32_round(typingctx, x):
        if x != types.float32:
            return None                     # float32 only: a float64 argument is a typing error
        signature = types.float32(x)

        def codegen(context, builder, sig, args):
            cvt = ir.InlineAsm(ir.FunctionType(I32, [F32]), "cvt.rna.tf32.f32 $0, $1;", "=r,f")
            return builder.bitcast(builder.call(cvt, [args[0]]), F32)   # a TF32 is a float32 pattern
        return signature, codegen

    @intrinsic
    def mma_tf32(typingctx, a, b, c):
        if (a, b, c) != (FOUR, TWO, FOUR):
            return None
        signature = FOUR(a, b, c)

        def codegen(context, builder, sig, args):
            a, b, c = (cgutils.unpack_tuple(builder, t) for t in args)
            operands = [builder.bitcast(x, I32) for x in (*a, *b)] + list(c)   # A and B in b32 registers
            function = ir.FunctionType(ir.LiteralStructType([F32] * 4), [I32] * 6 + [F32] * 4)
            # side_effect: like CUTLASS's `asm volatile`, a warp-synchronous instruction is never
            # moved or dropped by LLVM
            mma = ir.InlineAsm(function, MMA, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", side_effect=True)
            d = builder.call(mma, operands)
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(d, i) for i in range(4)])
        return signature, codegen
