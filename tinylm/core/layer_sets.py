"""The registry of layer sets. layers.Layers lists the fields once; REFERENCE fills every one with
the readable pairs (layers.py, flash_attention.py, ssm.py's scan, optim.py's AdamW), the lesson and
the set every other is tested against. Another set names only the pairs it provides:

    LAYERS = layer_set(layernorm_forward=..., layernorm_backward=..., auto_flash_from=1)

and every field it leaves out is REFERENCE's, explicitly. cpu_layers.LAYERS (fused Numba CPU, the CPU
default) and kernel_layers.LAYERS (Numba CUDA) are made so; model.layers_for chooses among them.
"""
from .config import FLASH_MIN_T
from .flash_attention import flash_attention_backward, flash_attention_forward
from .layers import (Layers, attention_backward, attention_forward, embedding_backward, gelu_backward,
                     gelu_forward, layernorm_backward, layernorm_forward, linear_backward, linear_forward,
                     lm_head_backward, lm_head_forward, lm_loss_backward, lm_loss_forward)
from .optim import adamw_update, clip_and_adamw, sum_of_squares
from .ssm import selective_scan_backward, selective_scan_forward

# "auto" attention switches to the blocked flash of flash_attention.py from FLASH_MIN_T positions on
# (same time on NumPy, O(T) memory instead of O(T²)).
REFERENCE = Layers(
    embedding_backward=embedding_backward,
    linear_forward=linear_forward, linear_backward=linear_backward,
    lm_head_forward=lm_head_forward, lm_head_backward=lm_head_backward,
    lm_loss_forward=lm_loss_forward, lm_loss_backward=lm_loss_backward,
    layernorm_forward=layernorm_forward, layernorm_backward=layernorm_backward,
    gelu_forward=gelu_forward, gelu_backward=gelu_backward,
    attention_forward=attention_forward, attention_backward=attention_backward,
    flash_attention_forward=flash_attention_forward, flash_attention_backward=flash_attention_backward,
    selective_scan_forward=selective_scan_forward, selective_scan_backward=selective_scan_backward,
    adamw_update=adamw_update, sum_of_squares=sum_of_squares, clip_and_adamw=clip_and_adamw,
    auto_flash_from=FLASH_MIN_T, block_decode=None)


def layer_set(**provided):
    """REFERENCE with the fields a set provides replaced (a name that is not a Layers field raises
    ValueError: a typo must not fall back to the reference silently)."""
    return REFERENCE._replace(**provided)
