"""The error of 3xTF32 and plain TF32 against float64 at a large K, from a NumPy emulation of the
arithmetic kernels/matmul_tf32.py does (no GPU, and the simulator is too slow for K = 4096):

    operands split as tensor_core.tf32_bits does (cvt.rna.tf32.f32), a_hi = tf32(a), a_lo = tf32(a − a_hi);
    per 8 k, each of the passes' m16n8k8 products added to the FP32 accumulator with one rounding
    (the simulator twin's model of mma.sync: the hardware's internal order and rounding are not modelled);
    beside it FP32 SIMT: one float32 multiply-add per k, in order, as kernels.matmul's accumulators.

    python bench/tf32_error.py [--n 256] [--k 4096] [--seed 0]

Inputs are standard normal float32, as bench/gpu_harness.random_arrays; the error is
‖C − C64‖/‖C64‖ (Frobenius), as the GPU harness reports it.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinylm.kernels.tensor_core import tf32_bits  # noqa: E402


def tf32(x):
    return tf32_bits(x.view(np.uint32)).view(np.float32)


def tensor_core_product(a, b, passes):
    """C (M, N) from a (M, K) and b (K, N) in the emulated 3xTF32 (passes=3) or TF32 (passes=1)."""
    a_hi, b_hi = tf32(a), tf32(b)
    a_lo, b_lo = tf32(a - a_hi), tf32(b - b_hi)
    products = [(a_lo, b_hi), (a_hi, b_lo), (a_hi, b_hi)][-passes:]    # small ones first, as the kernel
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for k in range(0, a.shape[1], 8):
        for x, y in products:
            acc = (acc + x[:, k:k + 8].astype(np.float64) @ y[k:k + 8].astype(np.float64)).astype(np.float32)
    return acc


def simt_product(a, b):
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for k in range(a.shape[1]):
        acc += a[:, k:k + 1] * b[k:k + 1]          # float32 multiply, float32 add (FFMA rounds once: close)
    return acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="M = N")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    a = rng.standard_normal((args.n, args.k), dtype=np.float32)
    b = rng.standard_normal((args.k, args.n), dtype=np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64)
    error = lambda c: np.linalg.norm(c - want) / np.linalg.norm(want)    # noqa: E731
    print(f"M = N = {args.n}, K = {args.k}, seed {args.seed}: relative error vs float64")
    print(f"  FP32 SIMT (sequential)   {error(simt_product(a, b)):.2e}")
    print(f"  3xTF32 (emulated)        {error(tensor_core_product(a, b, 3)):.2e}")
    print(f"  1xTF32 (emulated)        {error(tensor_core_product(a, b, 1)):.2e}")


if __name__ == "__main__":
    main()
