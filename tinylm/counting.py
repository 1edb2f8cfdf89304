"""Parameter and FLOP counts: tinylm's exact numbers beside Kaplan et al. (2020) Table 1.

A multiply-add is 2 FLOPs. Backward costs twice the forward for every matmul (one matmul for the
input's gradient, one for the weight's), so training is 3x the forward: the familiar 6N per token.
"""
from .model import param_shapes


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
    per_layer = {
        "qkv": 2 * d * 3 * d,
        "attention_scores": 2 * T * d,
        "attention_values": 2 * T * d,
        "attention_proj": 2 * d * d,
        "mlp": 2 * 2 * d * 4 * d,
    }
    forward = L * sum(per_layer.values()) + 2 * d * V     # + the tied output head
    n = count_params(config)["non_embedding"]
    kaplan_forward = 2 * n + 2 * L * T * d
    return {
        "seq_len": T,
        "exact_forward": forward,
        "exact_forward_backward": 3 * forward,
        "kaplan_forward": kaplan_forward,
        "kaplan_forward_backward": 3 * kaplan_forward,
        "per_layer_forward": per_layer,
        "head_forward": 2 * d * V,
    }


def _prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n
