"""Hugging Face GPT-2 checkpoints: config.json + model.safetensors, as transformers writes them.

Keys are `transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight` (d, 3d), ... in Conv1D
(in, out) layout, which is exactly tinylm's: loading is renaming, no transposes. The LM head is
tied to wte, so there is no `lm_head.weight` key. Checkpoints published by others may lack the
`transformer.` prefix or carry `attn.bias` / `attn.masked_bias` causal-mask buffers: both are fine.
"""
import json
import os
import re

import numpy as np

from .config import GPTConfig

PREFIX = "transformer."
BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def load_hf(path, dtype="float32"):
    """-> (GPTConfig, params under tinylm's names as NumPy arrays). Raises ValueError on a missing
    file or a config that isn't GPT-2's; GPT.from_pretrained checks the tensors against the config."""
    from safetensors.numpy import load_file
    config_path, weights_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for f in (config_path, weights_path):
        if not os.path.isfile(f):
            raise ValueError(f"checkpoint {path!r}: missing {os.path.basename(f)}")
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except ValueError:
        raise ValueError(f"checkpoint {path!r}: config.json is not valid JSON") from None
    if not isinstance(hf, dict):
        raise ValueError(f"checkpoint {path!r}: config.json must be a JSON object")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"checkpoint {path!r}: activation_function {act!r} is not GPT-2's tanh GELU")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise ValueError(f"checkpoint {path!r}: layer_norm_epsilon {hf['layer_norm_epsilon']} is not 1e-5")
    try:
        config = GPTConfig(vocab_size=hf["vocab_size"], n_ctx=hf.get("n_positions", hf.get("n_ctx")),
                           n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=hf["n_embd"], dtype=dtype)
    except KeyError as e:
        raise ValueError(f"checkpoint {path!r}: config.json lacks {e.args[0]!r}") from None
    except ValueError as e:
        raise ValueError(f"checkpoint {path!r}: config.json: {e}") from None
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # truncated or not a safetensors file
        raise ValueError(f"checkpoint {path!r}: cannot read model.safetensors ({e})") from None
    params = {}
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if BUFFER.match(name):
            continue
        if name == "lm_head.weight":
            # Tied head: fine if it is the embedding again; an untied head isn't GPT-2.
            if "wte.weight" in tensors or PREFIX + "wte.weight" in tensors:
                wte = tensors.get(PREFIX + "wte.weight", tensors.get("wte.weight"))
                if value.shape == wte.shape and np.array_equal(value, wte):
                    continue
            raise ValueError(f"checkpoint {path!r}: lm_head.weight differs from wte.weight; tinylm ties them")
        params[name] = value
    return config, params


def hf_config(config):
    """config.json as transformers' GPT2Config writes it (dropout 0: tinylm has none)."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.n_ctx, "n_ctx": config.n_ctx,
        "n_embd": config.d_model, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        # GPT-2 and tinylm's byte tokenizer both put end-of-text at the last id.
        "bos_token_id": config.vocab_size - 1, "eos_token_id": config.vocab_size - 1,
        "torch_dtype": config.dtype,
    }


def save_hf(path, config, params):
    """Write config.json and model.safetensors (with the `transformer.` prefix, no lm_head: tied)."""
    if config.mixer != "attention":
        raise ValueError(f"a mixer={config.mixer!r} model is not GPT-2: transformers' GPT2LMHeadModel has no "
                         "state-space layers to load it into (only mixer='attention' models export to Hugging Face)")
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    tensors = {PREFIX + k: np.ascontiguousarray(v) for k, v in params.items()}
    # transformers refuses a safetensors file whose metadata doesn't say which framework wrote it.
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config(config), f, indent=2)
