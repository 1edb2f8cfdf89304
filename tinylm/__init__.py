"""tinylm: a GPT-2 language model in NumPy with every gradient written by hand."""
import importlib.machinery as _machinery
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

# The CUDA kernels are the sub-package tinylm.kernels, never a top-level `kernels` (Hugging Face's kernel
# hub owns that name, and transformers imports it). A wheel installs the repository's kernels/ folder as
# tinylm/kernels (pyproject's package-dir); a source checkout has no such folder, so here the sub-package
# is declared with the top-level kernels/ as its search path. Nothing is imported until a kernel is used.
_here = _Path(__file__).resolve().parent
_checkout_kernels = _here.parent / "kernels"         # a folder of modules, not a package (no __init__.py)
if not (_here / "kernels").is_dir() and (_checkout_kernels / "matmul.py").is_file() and not (
        _checkout_kernels / "__init__.py").exists():
    _spec = _machinery.ModuleSpec(f"{__name__}.kernels", None, is_package=True)
    _spec.submodule_search_locations = [str(_checkout_kernels)]
    kernels = _sys.modules[_spec.name] = _util.module_from_spec(_spec)

from .core.counting import count_params, flops_per_token
from .core.model import GPT, GPTConfig, KVCache, Placement
from .core.optim import adamw_init, adamw_step, clip_grad_norm

__all__ = ["GPT", "GPTConfig", "KVCache", "Placement", "count_params", "flops_per_token",
           "adamw_init", "adamw_step", "clip_grad_norm"]
__version__ = "0.1.0"
