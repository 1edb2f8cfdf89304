"""Generation speed with and without the KV cache, same model, same tokens, one run.

Without the cache, step t reruns the model over all t positions (O(t²) attention, O(t) matmul
rows); with it, step t feeds one token that attends to t cached keys. Greedy decoding, so both
produce the same tokens (checked).

    python bench/generate.py [--new-tokens 256 --prompt-len 1 --d-model 256 --n-layer 4 --n-head 4]
                             [--reference] [--hf]

--hf also times Hugging Face's GPT2LMHeadModel.generate (greedy, its KV cache) on the same weights
(written by save_pretrained) and checks that it produces the same tokens.
"""
import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tinylm import GPT, GPTConfig  # noqa: E402
from tinylm.core.generate import generate_steps  # noqa: E402


def timed_steps(model, prompt, n, use_cache):
    """-> tokens (n,), seconds per step (n,)."""
    tokens, seconds = [], []
    t0 = time.perf_counter()
    for t, _ in generate_steps(model, prompt, n, temperature=0, use_cache=use_cache):
        t1 = time.perf_counter()
        tokens.append(int(t[0]))
        seconds.append(t1 - t0)
        t0 = t1
    return np.array(tokens), np.array(seconds)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=257)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-kernels", dest="kernels", action="store_false", default=None,
                    help="with --device cuda: CuPy/cuBLAS layers instead of the Numba kernels")
    ap.add_argument("--reference", action="store_true", help="on the CPU, layers.py's set instead of cpu_layers.py's")
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate on the same weights")
    ap.add_argument("--cached-only", action="store_true", help="skip the run without the KV cache (GPT-2 small: minutes)")
    args = ap.parse_args(argv)

    T = args.prompt_len + args.new_tokens          # the context is never full: no window sliding
    config = GPTConfig(vocab_size=args.vocab, n_ctx=T, n_layer=args.n_layer, n_head=args.n_head,
                       d_model=args.d_model, dtype="float32")
    model = GPT(config, seed=0, device=args.device, kernels=args.kernels, reference=args.reference)
    prompt = np.random.default_rng(0).integers(0, args.vocab, size=(1, args.prompt_len))
    list(generate_steps(model, prompt, 4, temperature=0))          # warm-up
    cached, t_cached = timed_steps(model, prompt, args.new_tokens, use_cache=True)
    full, t_full = (cached, np.full(args.new_tokens, np.nan)) if args.cached_only else \
        timed_steps(model, prompt, args.new_tokens, use_cache=False)
    if not np.array_equal(cached, full):
        raise SystemExit("the cached and uncached runs produced different tokens")
    n = args.new_tokens
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}")
    print(f"model: d_model={args.d_model} n_layer={args.n_layer} n_head={args.n_head} vocab={args.vocab} float32 "
          f"device={args.device}{' (reference set)' if args.reference else ''}; load {os.getloadavg()[0]:.2f}; prompt {args.prompt_len} token(s), {n} new tokens (context reaches {T}); "
          f"greedy, identical tokens: {'not compared (--cached-only)' if args.cached_only else 'yes'}")
    k = min(32, n // 2)
    for name, s in (("KV cache", t_cached), ("no cache", t_full)):
        print(f"{name:9s}: {n / s.sum():8.1f} tokens/s ({s.sum():.2f} s); ms per token: first {k} "
              f"{1000 * s[:k].mean():.2f}, last {k} {1000 * s[-k:].mean():.2f}")
    print(f"speed-up with the KV cache: {t_full.sum() / t_cached.sum():.1f}x")
    if args.hf:
        hf_seconds = hf_generate_seconds(model, prompt, cached)
        print(f"transformers generate: {n / hf_seconds:8.1f} tokens/s ({hf_seconds:.2f} s), identical tokens: yes; "
              f"tinylm's KV cache / transformers: {hf_seconds / t_cached.sum():.2f}x its tokens/s")


def hf_generate_seconds(model, prompt, expected):
    """Seconds for transformers' greedy generate of len(expected) tokens on the model's weights."""
    import tempfile

    import torch
    from transformers import GPT2LMHeadModel
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        hf = GPT2LMHeadModel.from_pretrained(path).eval()
    ids = torch.from_numpy(prompt)
    kwargs = dict(do_sample=False, max_new_tokens=len(expected), min_new_tokens=len(expected),
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.no_grad():
        hf.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})     # warm-up
        t0 = time.perf_counter()
        out = hf.generate(ids, **kwargs)
        seconds = time.perf_counter() - t0
    if not np.array_equal(out[0, prompt.shape[1]:].numpy(), expected):
        raise SystemExit("transformers' generate produced different tokens")
    return seconds


if __name__ == "__main__":
    main()
