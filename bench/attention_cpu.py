"""NumPy flash attention vs the naive T×T attention on the CPU: time and peak memory, side by side.

    python bench/attention_cpu.py [--seqs 512 1024 2048 4096 8192 16384] [--heads 1] [--head-dim 64]

Both run the model's layer pair (tinylm.core.layers.attention_* and tinylm.core.flash_attention.flash_attention_*)
on qkv (1, T, 3·heads·head_dim) float32, causal. Peak memory is tracemalloc's peak over the call
(NumPy reports its array buffers to tracemalloc) minus what was allocated before it: the
temporaries and the cache the backward keeps, not the inputs.
"""
import argparse
import os
import platform
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tinylm.core.flash_attention import flash_attention_backward, flash_attention_forward  # noqa: E402
from tinylm.core.layers import attention_backward, attention_forward  # noqa: E402


def measure(fn):
    """(seconds, peak bytes allocated during the call beyond what existed before it)."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    return seconds, peak


def forward_backward(forward, backward, qkv, n_head, dout):
    out, cache = forward(qkv, n_head)
    backward(dout, cache)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args(argv)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}; "
          f"B=1 heads={args.heads} head_dim={args.head_dim} float32 causal; time in s, peak memory in MiB")
    print(f"{'T':>6} | {'naive fwd':>9} {'flash fwd':>9} {'ratio':>6} | {'naive f+b':>9} {'flash f+b':>9} {'ratio':>6} | "
          f"{'naive MiB':>9} {'flash MiB':>9} {'ratio':>6}")
    rng = np.random.default_rng(0)
    C = args.heads * args.head_dim
    for T in args.seqs:
        qkv = rng.normal(size=(1, T, 3 * C)).astype(np.float32)
        dout = rng.normal(size=(1, T, C)).astype(np.float32)
        naive_fwd, _ = measure(lambda: attention_forward(qkv, args.heads))
        flash_fwd, _ = measure(lambda: flash_attention_forward(qkv, args.heads))
        naive_fb, naive_mem = measure(lambda: forward_backward(attention_forward, attention_backward, qkv,
                                                               args.heads, dout))
        flash_fb, flash_mem = measure(lambda: forward_backward(flash_attention_forward, flash_attention_backward, qkv,
                                                               args.heads, dout))
        mib = 2 ** 20
        print(f"{T:>6} | {naive_fwd:9.3f} {flash_fwd:9.3f} {naive_fwd / flash_fwd:6.2f} | {naive_fb:9.3f} "
              f"{flash_fb:9.3f} {naive_fb / flash_fb:6.2f} | {naive_mem / mib:9.1f} {flash_mem / mib:9.1f} "
              f"{naive_mem / flash_mem:6.1f}", flush=True)
    print("ratio = naive / flash (above 1: flash is faster / smaller)")


if __name__ == "__main__":
    main()
