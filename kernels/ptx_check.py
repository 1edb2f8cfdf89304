"""Compile every float32 kernel to PTX for sm_90 and list any float64 instruction in it.

    NUMBA_ENABLE_CUDASIM=0 python -m kernels.ptx_check     (needs no GPU: NVVM runs on the CPU)

A Python float literal (0.5 instead of float32(0.5)) or a float64 helper silently promotes a
float32 expression to f64, which runs at 1/64 of the FP32 rate on an H100: the PTX shows it as
`.f64` instructions. Prints one line per kernel and exits 1 if any kernel has one.
"""
import sys
from types import SimpleNamespace

from numba import cuda

from . import flash_attention, fused, matmul_tf32, selective_scan
from .matmul import kernels_and_signatures as matmul_kernels_and_signatures


def kernels_and_signatures():
    """(name, Python function, signature) for every kernel at its default sizes."""
    yield from matmul_kernels_and_signatures()
    yield from matmul_tf32.kernels_and_signatures()
    yield from flash_attention.kernels_and_signatures()
    yield from fused.kernels_and_signatures()
    yield from selective_scan.kernels_and_signatures()


def compile_without_a_gpu():
    """Numba's built-in CUDA target compiles a called device function for the *current* device's
    compute capability, even inside compile_ptx(cc=...), and so asks the driver. Without a GPU,
    answer sm_90 for it (numba-cuda does not need this)."""
    from numba.cuda import dispatcher
    if not cuda.is_available() and hasattr(dispatcher, "get_current_device"):
        dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=(9, 0))


def f64_lines(ptx):
    return [line.strip() for line in ptx.splitlines() if ".f64" in line]


def main():
    from numba import config
    if config.ENABLE_CUDASIM:
        print("ptx_check: set NUMBA_ENABLE_CUDASIM=0 (the simulator cannot compile PTX)")
        return 2
    compile_without_a_gpu()
    bad = 0
    for name, kernel, signature in kernels_and_signatures():
        ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
        lines = f64_lines(ptx)
        bad += bool(lines)
        print(f"{name:20s} {len(ptx.splitlines()):6d} PTX lines, {len(lines)} with .f64" +
              "".join(f"\n    {line}" for line in lines[:5]))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
