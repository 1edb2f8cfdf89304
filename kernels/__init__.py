"""Numba CUDA kernels for tinylm (float32), each beside (or pointing at) the NumPy function it must
match. They take CuPy arrays on a GPU and NumPy arrays under the CUDA simulator
(NUMBA_ENABLE_CUDASIM=1), which is how tests/test_kernels.py runs them without a GPU.

    matmul.py           C = op(A) @ op(B), shared-memory tiles + register blocking   (layers.linear_*)
    flash_attention.py  fused causal attention forward / backward         (tinylm/flash_attention.py)
    fused.py            layernorm, gelu, softmax cross-entropy, AdamW     (layers.py, optim.py)
    selective_scan.py   Mamba's selective scan forward / backward         (tinylm/ssm.py)
    ptx_check.py        the list of every kernel specialisation; compile each for sm_90, reject float64
    report.py           `python -m kernels.report`: registers, spills, local/shared bytes, blocks per SM,
                        the main loop's FFMA share, read from the sm_90 machine code without a GPU
"""
from .flash_attention import flash_attention_backward, flash_attention_forward
from .fused import (adamw_update, gelu_backward, gelu_forward, layernorm_backward, layernorm_forward,
                    softmax_cross_entropy)
from .matmul import matmul
from .selective_scan import selective_scan_backward, selective_scan_forward

__all__ = ["matmul", "flash_attention_forward", "flash_attention_backward", "layernorm_forward",
           "layernorm_backward", "gelu_forward", "gelu_backward", "softmax_cross_entropy", "adamw_update",
           "selective_scan_forward", "selective_scan_backward"]
