"""The GEMM rows: kernels.matmul, its opt-in 3xTF32 tensor-core twin kernels.matmul_tf32, cuBLAS, and the SGEMM ladder of bench/gpu_ladder.py, each checked
against float64 and reported in GFLOP/s."""
import numpy as np

from gpu_harness import random_arrays


def matmul_rows(run, method, fn, cases=None, what="matmul", **fields):
    """One row per case (n, trans_a, trans_b), by default sizes["matmul"]: fn(a, b, trans_a, trans_b)
    against float64, in GFLOP/s and as a share of the device's FP32 peak."""
    xp, last = run.dev.xp, None
    for seed, (n, trans_a, trans_b) in enumerate(cases or run.sizes["matmul"]):
        def work():
            a, b = random_arrays(xp, seed, (n, n), (n, n))
            reference = (a.astype(np.float64).T if trans_a else a.astype(np.float64)) @ \
                        (b.astype(np.float64).T if trans_b else b.astype(np.float64))
            result = run.checked_timing(f"{what}:{method}", run.dev, lambda: fn(a, b, trans_a, trans_b),
                                        [reference], lambda c: [c], poison_bytes=2 * 4 * n * n,
                                        timed=run.timed(method))
            if "ms" in result:
                result["gflops"] = 2 * n ** 3 / (result["ms"] / 1e3) / 1e9
                if run.fp32_peak_tflops:
                    result["fp32_peak"] = result["gflops"] / 1e3 / run.fp32_peak_tflops
            return result

        case = f"{n}^3 " + ("T" if trans_a else "N") + ("T" if trans_b else "N")
        estimate = None if last is None else last[1] * (n / last[0]) ** 3
        wall = run.row({"what": what, "case": case, "method": method, **fields}, work, estimate)
        last = (n, wall) if wall is not None else last


def cublas_matmul(xp):
    return lambda a, b, trans_a, trans_b: xp.matmul(a.T if trans_a else a, b.T if trans_b else b)


def section_matmul(run):
    """kernels.matmul (exact FP32 SIMT), then the opt-in tensor-core kernels.matmul_tf32 (3xTF32,
    the "numba 3xtf32" rows: issue 21.4's target is >= 1.5× cuBLAS FP32 within 1e-5 of float64)."""
    from tinylm.kernels.matmul import matmul
    from tinylm.kernels.matmul_tf32 import matmul_tf32
    matmul_rows(run, "numba", matmul)
    matmul_rows(run, "numba 3xtf32", matmul_tf32)




def section_ladder(run):
    """Every rung of bench/gpu_ladder.py at sizes["ladder"] (4096³: the tiles of rungs 2–5 divide it),
    the rows the worklog's table is made of; cuBLAS at the same size is in the baselines section.
    --smoke: the simulator-sized tiles tests/test_kernel_ladder.py uses, checked and not timed."""
    import gpu_ladder
    n = run.sizes["ladder"]
    for rung in gpu_ladder.RUNGS_IN_ORDER:
        tile = gpu_ladder.SIMULATOR_TILES[rung] if run.smoke else {}
        def multiply(a, b, trans_a, trans_b, rung=rung, tile=tile):     # rungs take no transposes
            return gpu_ladder.multiply(rung, a, b, **tile)
        matmul_rows(run, "numba", multiply, cases=[(n, False, False)], what="ladder", rung=rung)
