"""Scaling laws on a laptop (Kaplan et al. 2020): train a ladder of model sizes at one token budget,
fit L(N) = (N_c/N)^α_N and the compute-efficient frontier L(C).

N is the non-embedding parameter count (counting.count_params), C the training FLOPs
(counting.flops_per_token's exact forward + backward, times the tokens seen). Every finished run is
appended to DIR/runs.csv at once, so an interrupted sweep loses nothing and a rerun skips what is
done; a run that fails is recorded as failed and the sweep goes on.

The fit is least squares in log space: log L = α_N·log N_c − α_N·log N is a straight line, so α_N
is minus the slope of log L against log N, with a Student-t confidence interval from the slope's
standard error. The frontier is the lower envelope of every run's loss curve against compute:
for each compute C, the least loss any model size reached with C FLOPs.
"""
import csv
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from .counting import count_params, flops_per_token
from .data import Dataset, load_text
from .model import GPT, MIXERS, GPTConfig
from .optim import adamw_init
from .tokenizer import ByteTokenizer
from .train import estimate_loss, lr_at, train_step

CSV_NAME = "runs.csv"
FIELDS = ["run", "mixer", "n_layer", "d_model", "n_head", "params", "tokens", "flops", "val_loss", "status",
          "seconds", "curve", "error"]
HEAD_DIM = 16
# (n_layer, d_model): non-embedding N from ~3e3 to ~4e5 for attention, 2.1 decades.
DEFAULT_SIZES = ((1, 16), (1, 32), (2, 32), (2, 48), (2, 64), (3, 80), (4, 96))
QUICK_SIZES = ((1, 16), (1, 32), (2, 32), (2, 64))
MIN_STEPS = 10
# Student's t, 97.5% quantile, by degrees of freedom: the 95% interval of a slope fitted to few points.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


@dataclass(frozen=True)
class SweepSettings:
    """What every run of a sweep shares. tokens: the training budget of each run."""
    tokens: int = 400_000
    n_ctx: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    eval_points: int = 8          # validation losses along each run's curve (log-spaced in steps)
    eval_batches: int = 4
    seed: int = 0

    @property
    def steps(self):
        return self.tokens // (self.batch_size * self.n_ctx)

    def run_name(self, mixer, n_layer, d_model):
        """A run's identity: the same name means the same training, so a rerun may skip it."""
        return (f"{mixer}-L{n_layer}-d{d_model}-ctx{self.n_ctx}-b{self.batch_size}-steps{self.steps}"
                f"-lr{self.lr:g}-seed{self.seed}")


QUICK = SweepSettings(tokens=60_000, n_ctx=32, batch_size=16, eval_points=5, eval_batches=2)


def model_config(mixer, n_layer, d_model, n_ctx):
    """The sweep's model at one size: heads of HEAD_DIM features, the byte vocabulary."""
    return GPTConfig(vocab_size=ByteTokenizer.vocab_size, n_ctx=n_ctx, n_layer=n_layer,
                     n_head=max(1, d_model // HEAD_DIM), d_model=d_model, mixer=mixer)


def check_sweep(mixers, sizes, settings):
    """Every problem with the request, as one ValueError, before any training starts."""
    for mixer in mixers:
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS} (or 'both'), got {mixer!r}")
    if len(set(sizes)) < 3:
        raise ValueError(f"a power-law fit needs at least 3 distinct sizes, got {len(set(sizes))}")
    for n_layer, d_model in sizes:
        if n_layer < 1 or d_model < 1 or (d_model >= HEAD_DIM and d_model % HEAD_DIM):
            raise ValueError(f"size (n_layer={n_layer}, d_model={d_model}): need n_layer >= 1 and d_model >= 1, "
                             f"a multiple of {HEAD_DIM} from {HEAD_DIM} on (heads of {HEAD_DIM} features)")
    for name in ("tokens", "n_ctx", "batch_size", "eval_points", "eval_batches"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(settings, name)}")
    if settings.steps < MIN_STEPS:
        raise ValueError(f"a token budget of {settings.tokens:,} is only {settings.steps} steps of batch_size·n_ctx = "
                         f"{settings.batch_size * settings.n_ctx} tokens; need at least {MIN_STEPS} steps "
                         f"({MIN_STEPS * settings.batch_size * settings.n_ctx:,} tokens)")
    if not settings.lr > 0:
        raise ValueError(f"lr must be > 0, got {settings.lr}")


def eval_steps(settings):
    """Steps after which the validation loss is measured: log-spaced, always including the last."""
    points = np.geomspace(max(1, settings.steps // 50), settings.steps, settings.eval_points)
    return sorted(set(int(round(p)) for p in points) | {settings.steps})


def train_run(config, dataset, settings):
    """Train one model for settings.steps steps -> (final validation loss, curve: [[tokens, flops, loss]]).

    Warm-up then cosine decay (train.lr_at), AdamW with clipping (train.train_step). The validation
    windows (train.estimate_loss) are the same for every eval and every model: curves compare like with like.
    """
    model = GPT(config, seed=settings.seed)
    opt = adamw_init(model.params)
    rng = np.random.default_rng(settings.seed)
    flops_per_train_token = flops_per_token(config)["exact_forward_backward"]
    tokens_per_step = settings.batch_size * settings.n_ctx
    checkpoints, curve = eval_steps(settings), []
    for step in range(settings.steps):
        idx, targets = dataset.get_batch("train", settings.batch_size, rng)
        lr = lr_at(step, settings.steps, settings.lr, max(1, settings.steps // 10), settings.lr / 10)
        train_step(model, opt, idx, targets, lr)
        if step + 1 in checkpoints:
            loss = estimate_loss(model, dataset, "val", settings.batch_size, settings.eval_batches, settings.seed + 1)
            if not math.isfinite(loss):
                raise FloatingPointError(f"validation loss is {loss} after {step + 1} steps (diverged)")
            tokens = (step + 1) * tokens_per_step
            curve.append([tokens, tokens * flops_per_train_token, loss])
    return curve[-1][2], curve


def finished_runs(rows):
    """{run name: its latest row with status ok}."""
    return {r["run"]: r for r in rows if r["status"] == "ok"}


def read_runs(out_dir):
    """The rows of DIR/runs.csv (numbers parsed, curve decoded); [] when there is none yet."""
    path = os.path.join(out_dir, CSV_NAME)
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("n_layer", "d_model", "n_head", "params", "tokens"):
            row[key] = int(row[key])
        for key in ("flops", "val_loss", "seconds"):
            row[key] = float(row[key]) if row[key] else float("nan")
        row["curve"] = json.loads(row["curve"]) if row["curve"] else []
    return rows


def append_run(out_dir, row):
    """Append one run to DIR/runs.csv and flush it to disk before the next run starts."""
    path = os.path.join(out_dir, CSV_NAME)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({**row, "curve": json.dumps(row["curve"])})
        f.flush()
        os.fsync(f.fileno())


def sweep(out_dir, mixers, sizes, settings, text=None, progress=print):
    """Train every (mixer, size) not already finished in out_dir; returns all rows of runs.csv.

    text: the training text (default: data.load_text()'s built-in corpus).
    """
    check_sweep(mixers, sizes, settings)
    ids = ByteTokenizer().encode(load_text() if text is None else text)
    dataset = Dataset(ids, settings.n_ctx)                 # raises if the text is too short for n_ctx
    os.makedirs(out_dir, exist_ok=True)
    done = finished_runs(read_runs(out_dir))
    for mixer in mixers:
        for n_layer, d_model in sizes:
            name = settings.run_name(mixer, n_layer, d_model)
            if name in done:
                progress(f"{name}: done before, skipped")
                continue
            config = model_config(mixer, n_layer, d_model, settings.n_ctx)
            row = {"run": name, "mixer": mixer, "n_layer": n_layer, "d_model": d_model, "n_head": config.n_head,
                   "params": count_params(config)["non_embedding"], "tokens": settings.steps * settings.batch_size
                   * settings.n_ctx, "flops": "", "val_loss": "", "curve": [], "error": ""}
            t0 = time.perf_counter()
            try:
                row["val_loss"], row["curve"] = train_run(config, dataset, settings)
                row["flops"], row["status"] = row["curve"][-1][1], "ok"
            except Exception as e:     # recorded and skipped: one bad run must not end the sweep
                row["status"], row["error"] = "failed", f"{type(e).__name__}: {e}"
            row["seconds"] = round(time.perf_counter() - t0, 2)
            append_run(out_dir, row)
            progress(f"{name}: N={row['params']:,} " + (f"val loss {row['val_loss']:.4f}" if row["status"] == "ok"
                                                      else f"FAILED ({row['error']})") + f", {row['seconds']:.0f}s")
    return read_runs(out_dir)


# ----------------------------------------------------------------------------- fits
def power_law_fit(x, y):
    """Least squares of log y = a + b·log x. -> dict(alpha = −b, scale = x where y = 1, i.e. (scale/x)^alpha,
    alpha_ci95 = (lo, hi), n). The interval needs at least 3 points (None otherwise)."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    n = len(lx)
    (b, a), residuals = np.polyfit(lx, ly, 1), None
    alpha = -b
    ci = None
    if n >= 3:
        residuals = ly - (a + b * lx)
        se = math.sqrt(float(residuals @ residuals) / (n - 2) / float(((lx - lx.mean()) ** 2).sum()))
        t = T_975[max(k for k in T_975 if k <= n - 2)] if n - 2 <= 30 else 1.96
        ci = (float(alpha - t * se), float(alpha + t * se))
    return {"alpha": float(alpha), "scale": float(math.exp(a / alpha)) if alpha else float("inf"),
            "alpha_ci95": ci, "n": n}


def fit_with_irreducible(N, L, grid=200):
    """L = E + (N_c/N)^α: for each E on a grid in [0, min L), the power law of L − E is a straight
    line again; keep the E whose fit has the least squared error in log L."""
    N, L = np.asarray(N, float), np.asarray(L, float)
    best = None
    for E in np.linspace(0.0, L.min(), grid, endpoint=False):
        fit = power_law_fit(N, L - E)
        pred = E + (fit["scale"] / N) ** fit["alpha"]
        err = float(((np.log(pred) - np.log(L)) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, E, fit)
    _, E, fit = best
    return {"E": float(E), "alpha_N": fit["alpha"], "N_c": fit["scale"]}


def frontier(rows):
    """The compute-efficient frontier: the points of every run's curve, in order of compute, that
    reach a lower loss than any cheaper point. -> [[flops, loss], ...]"""
    points = sorted((c[1], c[2]) for row in rows for c in row["curve"])
    front, best = [], float("inf")
    for flops, loss in points:
        if loss < best:
            front.append([flops, loss])
            best = loss
    return front


def fit_mixer(rows):
    """fit.json's object for one mixer's finished runs."""
    N = [r["params"] for r in rows]
    L = [r["val_loss"] for r in rows]
    law = power_law_fit(N, L)
    front = frontier(rows)
    compute = power_law_fit(*zip(*front)) if len(front) >= 2 else None
    result = {"alpha_N": law["alpha"], "N_c": law["scale"], "alpha_N_ci95": law["alpha_ci95"], "runs": law["n"],
              "params": N, "val_loss": L, "tokens_per_run": rows[0]["tokens"], "frontier": front,
              "alpha_C": compute and compute["alpha"], "C_c": compute and compute["scale"]}
    if len(rows) >= 4:
        result["with_irreducible"] = fit_with_irreducible(N, L)
    return result


def fit_sweep(rows, mixers):
    """{mixer: fit} over the latest finished run of each name (failed runs are left out)."""
    latest = finished_runs(rows)
    fits = {}
    for mixer in mixers:
        runs = sorted((r for r in latest.values() if r["mixer"] == mixer), key=lambda r: r["params"])
        if len({r["params"] for r in runs}) >= 2:
            fits[mixer] = fit_mixer(runs)
    return fits


COLORS = {"attention": "tab:blue", "ssm": "tab:orange"}


def draw_loss_vs_params(ax, rows, fits):
    for mixer, fit in fits.items():
        N = np.array(fit["params"], float)
        ax.scatter(N, fit["val_loss"], color=COLORS[mixer], label=f"{mixer} runs")
        grid = np.geomspace(N.min(), N.max(), 50)
        ax.plot(grid, (fit["N_c"] / grid) ** fit["alpha_N"], color=COLORS[mixer],
                label=f"{mixer} fit: α_N = {fit['alpha_N']:.3f}")


def draw_loss_vs_compute(ax, rows, fits):
    for row in finished_runs(rows).values():
        curve = np.array(row["curve"])
        ax.plot(curve[:, 1], curve[:, 2], color=COLORS[row["mixer"]], alpha=0.35, lw=1)
    for mixer, fit in fits.items():
        front = np.array(fit["frontier"])
        ax.plot(front[:, 0], front[:, 1], color=COLORS[mixer], lw=2.5,
                label=f"{mixer} frontier" + (f": α_C = {fit['alpha_C']:.3f}" if fit["alpha_C"] else ""))


def plot(out_dir, rows, fits):
    """loss_vs_params.png (log-log runs and fitted law) and loss_vs_compute.png (curves, frontier)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, draw, xlabel, title in [
            ("loss_vs_params.png", draw_loss_vs_params, "non-embedding parameters N", "L(N) at a fixed token budget"),
            ("loss_vs_compute.png", draw_loss_vs_compute, "training compute C (FLOPs)",
             "every run's curve and the compute-efficient frontier")]:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        draw(ax, rows, fits)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="validation loss (nats/byte)", title=title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=120)
        plt.close(fig)


def write_fits(out_dir, fits, mixers):
    """DIR/fit.json: the mixer's fit object, or {mixer: fit} when several were asked for."""
    with open(os.path.join(out_dir, "fit.json"), "w") as f:
        json.dump(fits if len(mixers) > 1 else fits[mixers[0]], f, indent=2)
