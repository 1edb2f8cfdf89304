"""`tinylm scaling`: train a ladder of model sizes and token budgets on the default corpus, each at a
few learning rates keeping the best, fit L(N), L(D), Kaplan's joint L(N, D) and the compute-optimal
frontier; write DIR/runs.csv, DIR/fit.json and plots. Losses are in nats per byte, perplexity = e^loss."""
import argparse
import sys
from dataclasses import replace

from tinylm.commands.args import at_least, positive
from tinylm.experiments.scaling import DEFAULT_DATA_SIZES, DEFAULT_SIZES, QUICK, QUICK_DATA_SIZES, QUICK_SIZES, SweepSettings

DEFAULT = SweepSettings()


def parse_sizes(text):
    """"1x16,2x32" -> ((1, 16), (2, 32)): n_layer x d_model; "none" -> ()."""
    if text.lower() == "none":
        return ()
    try:
        sizes = tuple(tuple(int(v) for v in part.lower().split("x")) for part in text.split(","))
    except ValueError:
        sizes = ((),)
    if any(len(size) != 2 for size in sizes):
        raise argparse.ArgumentTypeError(f"must look like '1x16,2x32,4x64' (n_layer x d_model), got {text!r}")
    return sizes


def positive_floats(text):
    """"1e-3,3e-3" -> (0.001, 0.003), each a finite number > 0."""
    return tuple(positive(float)(part) for part in text.split(","))


def shown(sizes):
    return ",".join(f"{n}x{d}" for n, d in sizes) or "none"


def numbers(values):
    return ",".join(f"{v:g}" for v in values)


def add_parser(sub):
    p = sub.add_parser("scaling", help="scaling-law sweep: loss vs parameters, data and compute, fitted",
                       description=__doc__)
    p.add_argument("--out", required=True, help="directory for runs.csv, fit.json and the PNGs (rerun: skips done runs)")
    p.add_argument("--mixer", default="attention", choices=("attention", "ssm", "both"),
                   help="token mixer of the models (default attention)")
    p.add_argument("--quick", action="store_true",
                   help="the small sweep (sizes, budget, context below): about a minute on 2 cores")
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help=f"n_layer x d_model list for L(N) (default {shown(DEFAULT_SIZES)}; quick {shown(QUICK_SIZES)})")
    p.add_argument("--data-sizes", type=parse_sizes, default=None,
                   help=f"sizes also trained at every --data-scales budget for L(D), or 'none' "
                        f"(default {shown(DEFAULT_DATA_SIZES)}; quick {shown(QUICK_DATA_SIZES)})")
    p.add_argument("--tokens", type=positive(int), default=None,
                   help=f"base training tokens per run (default {DEFAULT.tokens:,}; quick {QUICK.tokens:,})")
    p.add_argument("--data-scales", type=positive_floats, default=None,
                   help=f"L(D) budgets as multiples of --tokens (default {numbers(DEFAULT.data_scales)}; "
                        f"quick {numbers(QUICK.data_scales)})")
    p.add_argument("--lrs", type=positive_floats, default=None,
                   help=f"peak learning rates tried at every point; each keeps its best "
                        f"(default {numbers(DEFAULT.lrs)}; quick {numbers(QUICK.lrs)})")
    p.add_argument("--n-ctx", type=positive(int), default=None,
                   help=f"context length of every model (default {DEFAULT.n_ctx}; quick {QUICK.n_ctx})")
    p.add_argument("--batch-size", type=positive(int), default=None,
                   help=f"sequences per step (default {DEFAULT.batch_size}; quick {QUICK.batch_size})")
    p.add_argument("--seed", type=at_least(0), default=None,
                   help=f"initialisation and data-order seed (default {DEFAULT.seed})")
    p.add_argument("--data", default=None, help="a UTF-8 text file instead of the built-in corpus (default: built-in)")
    p.set_defaults(func=run)


def print_fit(mixer, fit, lrs):
    """The fitted laws of one mixer, each loss with its perplexity."""
    ci = fit["alpha_N_ci95"]
    ci_text = f", 95% CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    print(f"{mixer}: L(N) at {fit['tokens_per_run']:,} tokens, best of lr {numbers(lrs)} per size: "
          f"α_N = {fit['alpha_N']:.3f}{ci_text} over {fit['runs']} sizes, N_c = {fit['N_c']:.3g}")
    for N, loss, ppl, lr, edge in zip(fit["params"], fit["val_loss"], fit["val_perplexity"], fit["best_lr"],
                                      fit["best_lr_at_edge"]):
        print(f"  N = {N:>9,}: val loss {loss:.4f} (perplexity {ppl:.2f}) at lr {lr:g}"
              + ("  <- at the grid's edge: widen --lrs" if edge else ""))
    if fit["alpha_C"]:
        print(f"  frontier of every run's curve (exact FLOPs): α_C = {fit['alpha_C']:.3f}")
    if "with_irreducible" in fit:
        w = fit["with_irreducible"]
        print(f"  with an irreducible term: L = {w['E']:.3f} + (N_c/N)^{w['alpha_N']:.3f}")
    for arm in fit["data_sweeps"]:
        ci = arm["alpha_D_ci95"]
        print(f"  L(D) at {arm['n_layer']}x{arm['d_model']} (N = {arm['params']:,}): α_D = {arm['alpha_D']:.3f}"
              + (f", 95% CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + "; "
              + ", ".join(f"D {D:,}: {loss:.4f} ({ppl:.2f})" for D, loss, ppl in
                          zip(arm["tokens"], arm["val_loss"], arm["val_perplexity"])))
    if "joint" in fit:
        j = fit["joint"]
        print(f"  joint L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D over {j['points']} points: α_N = {j['alpha_N']:.3f}, "
              f"α_D = {j['alpha_D']:.3f}, N_c = {j['N_c']:.3g}, D_c = {j['D_c']:.3g}, "
              f"rms log residual {j['rms_log_residual']:.4f}")
        C, N_opt, D_opt, loss, ppl = j["frontier"][-1]
        print(f"  compute-optimal (C = 6ND): N_opt ∝ C^{j['N_opt_exponent']:.2f}, L ∝ C^-{j['alpha_C']:.3f}; "
              f"at C = {C:.3g}: N_opt = {N_opt:,.0f}, D_opt = {D_opt:,.0f}, loss {loss:.4f} (perplexity {ppl:.2f})")


def run(args):
    from tqdm import tqdm

    from tinylm.commands.terminal import progress_wanted

    from tinylm.train.data import load_text
    from tinylm.experiments.scaling import check_sweep, fit_sweep, plan, plot, sweep, write_fits

    mixers = ["attention", "ssm"] if args.mixer == "both" else [args.mixer]
    settings = QUICK if args.quick else DEFAULT
    overrides = {k: v for k, v in dict(tokens=args.tokens, n_ctx=args.n_ctx, batch_size=args.batch_size,
                                       lrs=args.lrs, data_scales=args.data_scales, seed=args.seed).items()
                 if v is not None}
    settings = replace(settings, **overrides)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    data_sizes = args.data_sizes if args.data_sizes is not None else (QUICK_DATA_SIZES if args.quick
                                                                      else DEFAULT_DATA_SIZES)
    check_sweep(mixers, sizes, data_sizes, settings)       # bad input: an error before reading any data
    text = load_text(args.data)
    # one line per run either way; the bar only where stderr is a terminal (tinylm.commands.terminal)
    bar = tqdm(total=len(plan(mixers, sizes, data_sizes, settings)), unit="run", desc="scaling",
               disable=not progress_wanted(), file=sys.stderr)

    def progress(message):
        bar.write(message, file=sys.stderr)
        bar.update()

    rows = sweep(args.out, mixers, sizes, data_sizes, settings, text=text, progress=progress)
    bar.close()
    fits = fit_sweep(rows, mixers, settings, data_sizes)
    if not fits:
        print("too few finished runs to fit (see runs.csv for the failures)")
        return 1
    write_fits(args.out, fits, mixers)
    plot(args.out, rows, fits)
    print(f"batch {settings.batch_size} x n_ctx {settings.n_ctx}; losses in nats per byte (perplexity = e^loss); "
          f"Kaplan et al. 2020: α_N ≈ 0.076, α_D ≈ 0.095")
    for mixer, fit in fits.items():
        print_fit(mixer, fit, settings.lrs)
    print(f"wrote {args.out}/runs.csv, fit.json, loss_vs_params.png, loss_vs_tokens.png, loss_vs_compute.png")
    return 0
