"""`tinylm scaling`: train a ladder of model sizes at a fixed token budget on the default corpus,
fit L(N) = (N_c/N)^α_N and the compute frontier L(C), write DIR/runs.csv, DIR/fit.json and plots."""
import argparse
from dataclasses import replace


def parse_sizes(text):
    """"1x16,2x32" -> ((1, 16), (2, 32)): n_layer x d_model."""
    try:
        sizes = tuple(tuple(int(v) for v in part.lower().split("x")) for part in text.split(","))
    except ValueError:
        sizes = ((),)
    if any(len(size) != 2 for size in sizes):
        raise argparse.ArgumentTypeError(f"--sizes must look like '1x16,2x32,4x64' (n_layer x d_model), got {text!r}")
    return sizes


def add_parser(sub):
    p = sub.add_parser("scaling", help="scaling-law sweep: loss vs parameters and compute, fitted",
                       description=__doc__)
    p.add_argument("--out", required=True, help="directory for runs.csv, fit.json and the PNGs (rerun: skips done runs)")
    p.add_argument("--mixer", default="attention", help="attention, ssm or both (default attention)")
    p.add_argument("--quick", action="store_true", help="4 small sizes, a small budget: about a minute")
    p.add_argument("--sizes", type=parse_sizes, default=None, help="n_layer x d_model list, e.g. 1x16,2x32,4x64")
    p.add_argument("--tokens", type=int, default=None, help="training tokens per run")
    p.add_argument("--n-ctx", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--data", default=None, help="a UTF-8 text file instead of the built-in corpus")
    p.set_defaults(func=run)


def run(args):
    from tqdm import tqdm

    from tinylm.data import load_text
    from tinylm.scaling import (DEFAULT_SIZES, QUICK, QUICK_SIZES, SweepSettings, check_sweep, fit_sweep, plot,
                                sweep, write_fits)

    mixers = ["attention", "ssm"] if args.mixer == "both" else [args.mixer]
    settings = QUICK if args.quick else SweepSettings()
    overrides = {k: v for k, v in dict(tokens=args.tokens, n_ctx=args.n_ctx, batch_size=args.batch_size,
                                       lr=args.lr).items() if v is not None}
    settings = replace(settings, **overrides)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    check_sweep(mixers, sizes, settings)                   # bad input: an error before reading any data
    text = load_text(args.data)
    bar = tqdm(total=len(mixers) * len(sizes), unit="run", desc="scaling")

    def progress(message):
        bar.write(message)
        bar.update()

    rows = sweep(args.out, mixers, sizes, settings, text=text, progress=progress)
    bar.close()
    fits = fit_sweep(rows, mixers)
    if not fits:
        print("too few finished runs to fit (see runs.csv for the failures)")
        return 1
    write_fits(args.out, fits, mixers)
    plot(args.out, rows, fits)
    print(f"{settings.steps * settings.batch_size * settings.n_ctx:,} tokens per run (batch {settings.batch_size} x n_ctx {settings.n_ctx} x "
          f"{settings.steps} steps); Kaplan et al. 2020: α_N ≈ 0.076")
    for mixer, fit in fits.items():
        ci = fit["alpha_N_ci95"]
        ci_text = f", 95% CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        line = f"{mixer}: α_N = {fit['alpha_N']:.3f}{ci_text} over {fit['runs']} runs, N_c = {fit['N_c']:.3g}"
        if fit["alpha_C"]:
            line += f"; frontier α_C = {fit['alpha_C']:.3f}"
        if "with_irreducible" in fit:
            w = fit["with_irreducible"]
            line += f"; with an irreducible term: L = {w['E']:.3f} + (N_c/N)^{w['alpha_N']:.3f}"
        print(line)
    print(f"wrote {args.out}/runs.csv, fit.json, loss_vs_params.png, loss_vs_compute.png")
    return 0
