"""Time one training step (forward + backward + AdamW) and compare it with NumPy's own float32
matmul speed measured in the same run: the ratio is the model-FLOPs utilisation (MFU).

    python bench/train_step.py [--d-model 256 --n-layer 4 --n-head 4 --seq 256 --batch 8 --vocab 256]
                               [--device cpu|cuda [--no-kernels] --attention naive|flash|auto] [--reference]
"""
import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tinylm import GPT, GPTConfig, adamw_init, flops_per_token  # noqa: E402
from tinylm.core.backend import DEVICES, keep_freed_memory  # noqa: E402
from tinylm.core.model import ATTENTIONS  # noqa: E402
from tinylm.core.optim import Schedule  # noqa: E402
from tinylm.train.loop import train_step  # noqa: E402


def matmul_gflops(n=2048, repeats=5, dtype="float32"):
    """Best-of-`repeats` GFLOP/s of an n×n×n matmul (2n³ FLOPs), the machine's practical peak."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(n, n)).astype(dtype), rng.normal(size=(n, n)).astype(dtype)
    out = np.empty((n, n), dtype)
    np.matmul(a, b, out=out)
    best = min(_timed(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def seconds_per_step(config, batch, device="cpu", steps=10, seed=0, kernels=None, reference=False):
    """Median wall time of one training step (loss_and_grads + clipping + AdamW), after a warm-up.
    kernels, reference: GPT's (None: the Numba kernels on "cuda"; on "cpu" cpu_layers' set, or
    layers.py's with reference=True)."""
    model = GPT(config, seed=seed, device=device, kernels=kernels, reference=reference)
    xp = model.xp
    rng = np.random.default_rng(seed)
    idx = xp.asarray(rng.integers(0, config.vocab_size, size=(batch, config.n_ctx)))
    targets = xp.asarray(rng.integers(0, config.vocab_size, size=(batch, config.n_ctx)))
    state = adamw_init(model.params)

    def step():
        loss = train_step(model, state, idx, targets, Schedule.constant(1e-4)).loss   # every loop's one step
        if xp is not np:                                    # GPU work is asynchronous: wait for it
            xp.cuda.runtime.deviceSynchronize()
        return loss

    step()                                                  # warm-up: first-touch page faults, BLAS init, kernel compiles
    return float(np.median([_timed(step) for _ in range(steps)]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu", choices=DEVICES)
    ap.add_argument("--no-kernels", dest="kernels", action="store_false", default=None,
                    help="with --device cuda: every layer on CuPy/cuBLAS instead of the Numba kernels (the baseline)")
    ap.add_argument("--attention", default="auto", choices=ATTENTIONS)
    ap.add_argument("--reference", action="store_true", help="on the CPU, layers.py's set instead of cpu_layers.py's")
    ap.add_argument("--no-keep-freed-memory", action="store_true",
                    help="leave glibc's malloc at its defaults (fresh, page-faulting memory for each temporary)")
    args = ap.parse_args(argv)
    kept = False if args.no_keep_freed_memory else keep_freed_memory()

    config = GPTConfig(vocab_size=args.vocab, n_ctx=args.seq, n_layer=args.n_layer, n_head=args.n_head,
                       d_model=args.d_model, dtype=args.dtype, attention=args.attention)
    ms = 1000 * seconds_per_step(config, args.batch, args.device, args.steps, kernels=args.kernels,
                                 reference=args.reference)
    tokens = args.batch * args.seq
    flops = flops_per_token(config, args.seq)["exact_forward_backward"] * tokens
    achieved = flops / (ms / 1000) / 1e9
    peak = matmul_gflops(dtype=args.dtype)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}")
    print(f"config: d_model={args.d_model} n_layer={args.n_layer} n_head={args.n_head} T={args.seq} "
          f"B={args.batch} vocab={args.vocab} {args.dtype} device={args.device} kernels={args.kernels is not False and args.device == 'cuda'} "
          f"attention={args.attention} reference={args.reference} keep_freed_memory={kept}; load {os.getloadavg()[0]:.2f}")
    print(f"train step: {ms:.1f} ms/step (median of {args.steps}), {tokens / (ms / 1000):,.0f} tokens/s, "
          f"{achieved:.1f} GFLOP/s ({flops / 1e9:.2f} GFLOP/step)")
    print(f"numpy {args.dtype} 2048x2048 matmul: {peak:.1f} GFLOP/s")
    print(f"MFU (train step / matmul): {achieved / peak:.1%}")


if __name__ == "__main__":
    main()
