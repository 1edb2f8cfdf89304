"""The one place that knows about devices: NumPy on CPU, CuPy on a CUDA GPU.

Model and layer code never branch on the device. Layers that must *create* an array ask
`array_module(x)` for the module that owns their input (the CuPy idiom `get_array_module`);
everything else is written with ufuncs, methods and `@`, which both libraries share.
`import tinylm` never imports CuPy: it is only loaded when a caller asks for device="cuda".
"""
import ctypes
import sys

import numpy as np

DEVICES = ("cpu", "cuda")


def get_xp(device):
    """Return the array module for `device` ("cpu" -> numpy, "cuda" -> cupy)."""
    if device == "cpu":
        return np
    if device == "cuda":
        try:
            import cupy
        except ImportError as e:
            raise ValueError(
                "device='cuda' needs CuPy; install it with `pip install tinylm[gpu]` "
                f"on a machine with an NVIDIA GPU ({e})") from None
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # CuPy installed but no driver / no GPU
            raise ValueError(f"device='cuda' was asked for but no CUDA GPU is usable: {e}") from None
        return cupy
    raise ValueError(f"device must be one of {DEVICES}, got {device!r}")


def array_module(x):
    """numpy, or cupy when x is a CuPy array (CuPy is only consulted if already imported)."""
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return cupy
    return np


def to_numpy(x):
    """A NumPy copy of a NumPy or CuPy array (for saving, printing, comparing)."""
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def keep_freed_memory():
    """Ask glibc's malloc to reuse freed memory instead of handing it back to the OS.

    A training step allocates and frees dozens of multi-megabyte temporaries. By default glibc
    serves each from a fresh mmap and unmaps it when freed, so every new array page-faults on
    first touch: at d_model 256 that costs about a quarter of the step. Serving blocks up to
    32 MiB (glibc's maximum) from the heap and never trimming it makes the pages stay mapped.
    Process-wide, so tinylm's entry points (CLI, benchmarks) call it, not `import tinylm`.
    Returns False where there is no glibc (macOS, musl): nothing changes there.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    ok &= libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    ok &= libc.mallopt(M_TOP_PAD, 64 << 20)
    return bool(ok)


def scatter_add(target, indices, values):
    """target[indices[n]] += values[n] for every n, accumulating repeated indices (in place).
    NumPy spells it np.add.at; CuPy has no ufunc.at and offers cupyx.scatter_add instead."""
    if array_module(target) is np:
        np.add.at(target, indices, values)
    else:
        import cupyx
        cupyx.scatter_add(target, indices, values)


def matmul(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b) for 2-D arrays, op = transpose where asked: the array library's GEMM (BLAS or
    cuBLAS), which reads a transposed view in place. kernel_layers.gemm is the same on the kernels."""
    return (a.T if trans_a else a) @ (b.T if trans_b else b)
