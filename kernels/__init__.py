"""Numba CUDA kernels for tinylm, each beside (or pointing at) the NumPy function it must match."""
