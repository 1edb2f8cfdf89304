"""What every entry point shares: checking its inputs and allocating its outputs beside them.

A kernel receives CuPy arrays as they are (Numba reads their __cuda_array_interface__: device
pointer, shape, strides; no host copy); under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) the
same call gets NumPy arrays. Outputs are allocated with the inputs' own module, so a CuPy caller
gets CuPy arrays back and a NumPy caller NumPy arrays.
"""
import contextlib
import sys
from typing import NamedTuple

import numpy as np


# The layouts the kernels are launched with: every array they receive is C-contiguous (the entry
# points make it so), and Numba compiles a different binary per layout (float32[:, :] 'A' reads
# through strides, float32[:, ::1] 'C' does not), so these are the signatures kernels.report builds.
C1, C2, C3, C4 = "float32[::1]", "float32[:, ::1]", "float32[:, :, ::1]", "float32[:, :, :, ::1]"


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


# The stream every launch of fused.py and selective_scan.py goes on: 0, the legacy default stream,
# unless inside on_stream(). A CUDA graph is captured from one non-default stream, and a launch on the
# legacy stream while it captures is an error (cudaErrorStreamCaptureImplicit), so the step's kernels
# and CuPy's work must share one stream (tinylm.core.kernel_layers.GraphStep sets both).
_streams = [0]


def stream():
    return _streams[-1]


@contextlib.contextmanager
def on_stream(numba_stream):
    """Launch on numba_stream inside the block (e.g. cuda.external_stream(cupy_stream.ptr))."""
    _streams.append(numba_stream)
    try:
        yield numba_stream
    finally:
        _streams.pop()


class Launch(NamedTuple):
    kernel: str                     # the kernel's Python function name
    argument_types: tuple           # Numba's types of the arguments, as the dispatcher types them
    stream: object = 0              # the stream of kernel[grid, threads, stream] (0: the legacy default)


def kernel_name(kernel):
    """The Python function's name of a compiled kernel (a GPU dispatcher or the simulator's)."""
    return getattr(kernel, "py_func", None).__name__ if hasattr(kernel, "py_func") else kernel.__name__


@contextlib.contextmanager
def recording_launches():
    """Under the CUDA simulator: yield a list that receives a Launch per kernel launch made inside
    the block. What it records is what a GPU's dispatcher would specialise on (numba.typeof of
    each argument: C-contiguous float32[:, ::1] for a fresh array, int64 for a Python int)."""
    import numba
    from numba import config
    if not config.ENABLE_CUDASIM:
        raise RuntimeError("recording_launches() needs NUMBA_ENABLE_CUDASIM=1")
    from numba.cuda.simulator import kernel as simulator
    launches, call, configure = [], simulator.FakeCUDAKernel.__call__, simulator.FakeCUDAKernel.__getitem__

    def recorded(self, *args):
        if not (self._device or simulator._kernel_context):          # a launch, not a device call
            launches.append(Launch(self.fn.__name__, tuple(numba.typeof(a) for a in args), self.stream))
        return call(self, *args)

    def configured(self, configuration):            # the simulator keeps no stream: note it here
        self.stream = configuration[2] if len(configuration) > 2 else 0
        return configure(self, configuration)

    simulator.FakeCUDAKernel.__call__, simulator.FakeCUDAKernel.__getitem__ = recorded, configured
    try:
        yield launches
    finally:
        simulator.FakeCUDAKernel.__call__, simulator.FakeCUDAKernel.__getitem__ = call, configure
