"""Parameter and FLOP counts: tinylm's exact numbers beside Kaplan et al. (2020) Table 1.

A multiply-add is 2 FLOPs. Backward costs twice the forward for every matmul (one matmul for the
input's gradient, one for the weight's), so training is 3x the forward: the familiar 6N per token.
"""
from .model import param_shapes
from .ssm import dt_rank


def count_params(config):
    """-> {"total", "embedding", "non_embedding"}. Non-embedding is Kaplan's N: everything but wte
    and wpe (the tied head adds nothing). GPT-2 small: 124,439,808 total, 85,056,000 non-embedding."""
    sizes = {name: _prod(shape) for name, shape in param_shapes(config).items()}
    total = sum(sizes.values())
    embedding = sizes["wte.weight"] + sizes["wpe.weight"]
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def flops_per_token(config, seq_len=None):
    """FLOPs per token at context length seq_len (default n_ctx).

    exact_*: tinylm's own matmuls. Its attention computes the full T x T score matrix and then
    masks it, so each token pays 2·T·d for q·kᵀ and 2·T·d for att·v in every layer.
    kaplan_*: Table 1: C_fwd = 2N + 2·n_layer·n_ctx·d_attn (N non-embedding; the attention term
    counts the causal half) and training ≈ 3·C_fwd = 6N + ...; it leaves out the de-embedding
    2·d·V, which matters for small models with a large vocabulary.
    """
    T = config.n_ctx if seq_len is None else seq_len
    d, L, V = config.d_model, config.n_layer, config.vocab_size
    per_layer = _ssm_flops(config) if config.mixer == "ssm" else {
        "qkv": 2 * d * 3 * d,
        "attention_scores": 2 * T * d,
        "attention_values": 2 * T * d,
        "attention_proj": 2 * d * d,
    }
    per_layer["mlp"] = 2 * 2 * d * 4 * d
    forward = L * sum(per_layer.values()) + 2 * d * V     # + the tied output head
    n = count_params(config)["non_embedding"]
    # The ssm mixer has no T-dependent term: its cost per token is the same at any context length.
    kaplan_forward = 2 * n + (0 if config.mixer == "ssm" else 2 * L * T * d)
    return {
        "seq_len": T,
        "exact_forward": forward,
        "exact_forward_backward": 3 * forward,
        "kaplan_forward": kaplan_forward,
        "kaplan_forward_backward": 3 * kaplan_forward,
        "per_layer_forward": per_layer,
        "head_forward": 2 * d * V,
    }


def _ssm_flops(config):
    """Forward FLOPs per token of one ssm mixer (see ssm.py): 2 per weight of each projection and
    of the depthwise conv, and for the scan, per channel e and state n: Δ·A (1), ·B (1),
    a·h + b (2), C·h (2), plus per channel Δ·u (1), D·u + (2) and the gate product y·silu(z) (1).
    Exponentials, softplus and SiLU are not counted, as GELU and softmax are not for attention."""
    d, N, K = config.d_model, config.d_state, config.d_conv
    E, R = config.expand * d, dt_rank(d)
    return {
        "in_proj": 2 * d * 2 * E,
        "conv": 2 * K * E,
        "x_proj": 2 * E * (R + 2 * N),
        "dt_proj": 2 * R * E,
        "scan": 6 * E * N + 3 * E,
        "gate": E,
        "out_proj": 2 * E * d,
    }


def _prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n
