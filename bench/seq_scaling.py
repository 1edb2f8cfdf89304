"""How a block's token mixer scales with sequence length T: forward + backward time and peak memory
of naive attention (the T×T matrix), flash attention (blocked, never holds T×T) and the selective
state-space mixer (a scan over T), all at the same width d_model, as one GPT block's mixer sublayer
(the model's own mixer_forward / mixer_backward, projections included). Fits the log-log slope of
each: cost ∝ T^slope.

    python bench/seq_scaling.py [--d-model 64 --n-head 4 --t-min 256 --t-max 16384 --max-seconds 60 --max-gb 4]

A mixer stops growing T when its last step took over max-seconds/4 or its peak memory times 4
would pass --max-gb (the next doubling would cost about that for a quadratic method).
"""
import argparse
import math
import os
import platform
import sys
import time
import tracemalloc

# One BLAS thread unless told otherwise: this measures how cost grows with T, and on a shared
# 2-core machine a second BLAS thread that waits for a busy core makes small matmuls 10x slower
# at random (measured: naive attention at T=256 took 18-31 ms with one thread, 77-1033 ms with two).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tinylm import GPT, GPTConfig  # noqa: E402
from tinylm.backend import keep_freed_memory  # noqa: E402

MIXERS = {"naive attention": dict(mixer="attention", attention="naive"),
          "flash attention": dict(mixer="attention", attention="flash"),
          "ssm": dict(mixer="ssm")}


def mixer_step(model, x, dout):
    """One forward + backward of block 0's mixer sublayer."""
    out, cache, _ = model.mixer_forward(x, 0)
    model.mixer_backward(dout, cache, 0, {})


def measure(model, T, batch, repeats):
    """-> (seconds: best of `repeats` after a warm-up, peak bytes allocated during one step, from
    tracemalloc). The warm-up step also measures memory: NumPy reports its buffers to tracemalloc,
    and tracing slows Python, so it is never timed."""
    rng = np.random.default_rng(0)
    C = model.config.d_model
    x = rng.normal(size=(batch, T, C)).astype(model.config.dtype)
    dout = rng.normal(size=(batch, T, C)).astype(model.config.dtype)
    tracemalloc.start()
    mixer_step(model, x, dout)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mixer_step(model, x, dout)
        seconds.append(time.perf_counter() - t0)
    return min(seconds), peak


def slope(Ts, values):
    """Least-squares slope of log(value) against log(T)."""
    return float(np.polyfit(np.log(Ts), np.log(values), 1)[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--t-min", type=int, default=256)
    ap.add_argument("--t-max", type=int, default=16384)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--max-gb", type=float, default=4.0)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    if args.t_min < 1 or args.t_max < args.t_min:
        raise SystemExit(f"need 1 <= --t-min <= --t-max, got {args.t_min}, {args.t_max}")
    Ts = [args.t_min * 2**k for k in range(int(math.log2(args.t_max / args.t_min)) + 1)]
    kept = keep_freed_memory()          # as every tinylm entry point: freed temporaries stay mapped

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
          f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}, keep_freed_memory={kept}")
    print(f"one mixer sublayer, forward + backward: d_model={args.d_model} n_head={args.n_head} B={args.batch} "
          f"{args.dtype}; ssm d_state=16 d_conv=4 expand=2")
    results = {name: [] for name in MIXERS}
    for name, kind in MIXERS.items():
        for T in Ts:
            config = GPTConfig(vocab_size=2, n_ctx=T, n_layer=1, n_head=args.n_head, d_model=args.d_model,
                               dtype=args.dtype, **kind)
            seconds, peak = measure(GPT(config, seed=0), T, args.batch, repeats=3 if T <= 2048 else 1)
            results[name].append((T, seconds, peak))
            print(f"  {name:16s} T={T:6d}  {seconds * 1000:10.1f} ms  peak {peak / 2**20:9.1f} MiB", flush=True)
            if seconds * 4 > args.max_seconds or peak * 4 > args.max_gb * 2**30:
                break

    print(f"\n{'T':>6s} " + " ".join(f"{n + ' ms':>20s}" for n in MIXERS) + "   naive/flash  naive/ssm  (time)")
    for T in Ts:
        row = {n: next((r for r in results[n] if r[0] == T), None) for n in MIXERS}
        cells = [f"{row[n][1] * 1000:20.1f}" if row[n] else f"{'not measured':>20s}" for n in MIXERS]
        ratio = lambda a, b: f"{row[a][1] / row[b][1]:11.2f}" if row[a] and row[b] else f"{'-':>11s}"
        print(f"{T:6d} " + " ".join(cells) + f"   {ratio('naive attention', 'flash attention')} "
              f"{ratio('naive attention', 'ssm')}")
    print(f"\n{'T':>6s} " + " ".join(f"{n + ' MiB':>20s}" for n in MIXERS))
    for T in Ts:
        row = {n: next((r for r in results[n] if r[0] == T), None) for n in MIXERS}
        print(f"{T:6d} " + " ".join(f"{row[n][2] / 2**20:20.1f}" if row[n] else f"{'not measured':>20s}"
                                    for n in MIXERS))
    print("\nlog-log slopes (cost ∝ T^slope), least squares over the measured T >= 1024 (all T if fewer than 2):")
    for name, rows in results.items():
        big = [r for r in rows if r[0] >= 1024]
        rows = big if len(big) >= 2 else rows
        if len(rows) < 2:
            print(f"  {name:16s} not measured (fewer than 2 sizes)")
            continue
        T, s, m = (np.array(c, dtype=float) for c in zip(*rows))
        print(f"  {name:16s} time {slope(T, s):.2f}   peak memory {slope(T, m):.2f}   "
              f"(T = {int(T[0])}..{int(T[-1])})")


if __name__ == "__main__":
    main()
