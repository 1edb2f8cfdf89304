"""Numba CUDA kernels for tinylm (float32), each beside (or pointing at) the NumPy function it must
match. They take CuPy arrays on a GPU and NumPy arrays under the CUDA simulator
(NUMBA_ENABLE_CUDASIM=1), which is how tests/test_kernels.py runs them without a GPU.

    matmul.py           C = op(A) @ op(B), shared-memory tiles + register blocking   (layers.linear_*)
    flash_attention.py  fused causal attention forward / backward         (tinylm/flash_attention.py)
    fused.py            layernorm, gelu, softmax cross-entropy, AdamW     (layers.py, optim.py)
    ptx_check.py        compile each kernel for sm_90 and reject float64 instructions
"""
from .flash_attention import flash_attention_backward, flash_attention_forward
from .fused import (adamw_update, gelu_backward, gelu_forward, layernorm_backward, layernorm_forward,
                    softmax_cross_entropy)
from .matmul import matmul

__all__ = ["matmul", "flash_attention_forward", "flash_attention_backward", "layernorm_forward",
           "layernorm_backward", "gelu_forward", "gelu_backward", "softmax_cross_entropy", "adamw_update"]
