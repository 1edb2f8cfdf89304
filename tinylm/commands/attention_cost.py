"""`tinylm attention-cost`: time and peak memory of one block's token mixer (naive attention, flash
attention, the ssm), forward + backward, as the sequence length T doubles, with log-log slopes.
One BLAS thread (OPENBLAS_NUM_THREADS=1) gives the steadiest numbers on a shared machine."""
import math
import os
import platform

from tinylm.commands.args import positive


def add_parser(sub):
    p = sub.add_parser("attention-cost", help="time and memory vs sequence length: naive/flash attention, ssm",
                       description=__doc__)
    p.add_argument("--d-model", type=positive(int), default=64, help="model width (default 64)")
    p.add_argument("--n-head", type=positive(int), default=4, help="attention heads; must divide --d-model (default 4)")
    p.add_argument("--batch", type=positive(int), default=1, help="sequences per step (default 1)")
    p.add_argument("--t-min", type=positive(int), default=64, help="shortest sequence length (default 64)")
    p.add_argument("--t-max", type=positive(int), default=2048,
                   help="longest sequence length; T doubles from --t-min (default 2048)")
    p.add_argument("--fit-from-t", type=positive(int), default=512,
                   help="slopes are fitted over T >= this (default 512): small T is overhead, not the trend")
    p.add_argument("--max-seconds", type=positive(float), default=20.0,
                   help="a mixer stops when its next doubling would take about this long (default 20)")
    p.add_argument("--max-gb", type=positive(float), default=1.0,
                   help="a mixer stops when its next doubling would need about this much memory (default 1)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="(default float32)")
    p.set_defaults(func=run)


def run(args):
    import numpy as np

    from tinylm.experiments.attention_cost import report, sweep_lengths
    from tinylm.core.config import GPTConfig

    if args.t_max < args.t_min:
        raise ValueError(f"--t-max ({args.t_max}) must be >= --t-min ({args.t_min})")
    GPTConfig(vocab_size=2, n_ctx=args.t_max, n_layer=1, n_head=args.n_head, d_model=args.d_model)  # checks heads
    Ts = [args.t_min * 2**k for k in range(int(math.log2(args.t_max / args.t_min)) + 1)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print(f"one mixer sublayer, forward + backward: d_model={args.d_model} n_head={args.n_head} B={args.batch} "
          f"{args.dtype}; ssm d_state=16 d_conv=4 expand=2")
    results = sweep_lengths(Ts, args.d_model, args.n_head, args.batch, args.dtype, args.max_seconds,
                            args.max_gb * 2**30, progress=lambda line: print(line, flush=True))
    print()
    print("\n".join(report(results, Ts, args.fit_from_t)))
    return 0
