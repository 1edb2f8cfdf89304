"""tinylm: a GPT-2 language model in NumPy with every gradient written by hand."""
from .counting import count_params, flops_per_token
from .model import GPT, GPTConfig, KVCache
from .optim import adamw_init, adamw_step, clip_grad_norm

__all__ = ["GPT", "GPTConfig", "KVCache", "count_params", "flops_per_token",
           "adamw_init", "adamw_step", "clip_grad_norm"]
__version__ = "0.1.0"
