"""What every entry point shares: checking its inputs and allocating its outputs beside them.

A kernel receives CuPy arrays as they are (Numba reads their __cuda_array_interface__: device
pointer, shape, strides; no host copy); under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) the
same call gets NumPy arrays. Outputs are allocated with the inputs' own module, so a CuPy caller
gets CuPy arrays back and a NumPy caller NumPy arrays.
"""
import sys

import numpy as np


def array_module(x):
    """The module that made x: numpy for a NumPy array, cupy for a CuPy array (kernels/ imports
    nothing from tinylm, and never imports CuPy itself: a CuPy array means CuPy is loaded)."""
    return sys.modules[type(x).__module__.split(".")[0]]


def check_float32(**arrays):
    """The kernels are float32 only: every named array must be float32."""
    for name, x in arrays.items():
        if x.dtype != np.float32:
            raise ValueError(f"{name} must be float32 (the kernels' only dtype), got {x.dtype}")


def empty(shape, like):
    """An uninitialised float32 array on `like`'s device."""
    return array_module(like).empty(shape, dtype=np.float32)


def zeros(shape, like):
    return array_module(like).zeros(shape, dtype=np.float32)


def n_blocks(n, per_block):
    """Blocks needed to cover n items, per_block to a block (the last one partly idle)."""
    return (n + per_block - 1) // per_block
