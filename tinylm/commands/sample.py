"""`tinylm sample`: continue a prompt with a trained model (default: runs/default) or a Hugging
Face GPT-2 directory (its vocab.json + merges.txt give the BPE tokenizer). Token by token, with
temperature, then top-k, then top-p (nucleus), and a KV cache; the text is streamed to stdout as it
is made, whole UTF-8 characters at a time. When prompt + new tokens pass n_ctx, the oldest tokens
slide out of view (generation goes on from the newest n_ctx/2); a prompt longer than n_ctx is refused."""
import argparse
import os
import time

import numpy as np

from .args import add_layer_set_arguments, at_least, placement, positive, probability
from .pretrain import DEFAULT_OUT
from .terminal import note


def add_parser(sub):
    p = sub.add_parser("sample", help="generate text from a checkpoint", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=DEFAULT_OUT,
                   help="run, checkpoint or Hugging Face directory")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=positive(int), default=300,
                   help="tokens to generate; past n_ctx the window slides (the newest n_ctx/2 tokens stay in view)")
    p.add_argument("--temperature", type=at_least(0, float), default=0.8, help="0 = greedy; higher = more random")
    p.add_argument("--top-k", type=at_least(0), default=40, help="sample among the k likeliest tokens; 0 = all")
    p.add_argument("--top-p", type=probability, default=1.0,
                   help="nucleus, after top-k: the smallest set of likeliest tokens holding this much probability, "
                        "in (0, 1]; 1 = all")
    p.add_argument("--stop", default=None, metavar="STRING",
                   help="end a sample at the first occurrence of STRING (not printed)")
    p.add_argument("--num-samples", type=positive(int), default=1, help="independent samples, one after another")
    p.add_argument("--seed", type=at_least(0), default=0, help="sampling seed: the same seed, the same text")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each token (slow; O(T²))")
    add_layer_set_arguments(p)
    p.set_defaults(func=run)


def run(args):
    from tinylm.train.checkpoint import load_model
    from tinylm.core.generate import generate_steps, stream_text
    from tinylm.core.tokenizer import load_tokenizer
    if args.checkpoint == DEFAULT_OUT and not os.path.isdir(DEFAULT_OUT):
        raise ValueError(f"no run in {DEFAULT_OUT} yet: train one with `tinylm pretrain`, or name a checkpoint")
    model, ckpt_dir, state = load_model(args.checkpoint, placement(args))
    tokenizer = load_tokenizer(ckpt_dir, model.config.vocab_size)
    prompt = tokenizer.encode(args.prompt)
    if len(prompt) == 0:
        raise ValueError("--prompt is empty; give at least one character")
    if len(prompt) > model.config.n_ctx:
        raise ValueError(f"--prompt is {len(prompt)} tokens, more than the model's n_ctx={model.config.n_ctx}; "
                         "shorten it (prompts are never cropped silently)")
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(tokenizer.decode(prompt), end="", flush=True)
        steps = generate_steps(model, prompt[None], args.max_new_tokens, args.temperature, args.top_k or None, rng,
                               tokenizer.eot_id, not args.no_cache, args.top_p)
        for piece in stream_text((tokenizer.token_bytes(tokens) for tokens, _ in steps), args.stop):
            print(piece, end="", flush=True)
        print()
    seconds = time.perf_counter() - t0
    step = f"step {state['step']}" if state else "Hugging Face weights"
    note("sample", f"{ckpt_dir} ({step}, mixer={model.config.mixer}), {args.num_samples} sample(s) "
                   f"in {seconds:.1f}s")
    return 0
