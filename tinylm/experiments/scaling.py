"""Scaling laws on a laptop (Kaplan et al. 2020): train a ladder of model sizes and token budgets,
each at a few learning rates, and fit how the loss falls with parameters N and data D.

N is the non-embedding parameter count (counting.count_params), D the training tokens (each seen
once: the budgets stay below one pass over the corpus), C the training FLOPs (counting.flops_per_token's
exact forward + backward, times the tokens seen). The grid: every size at the base budget (L(N)),
and the `data_sizes` also at base × each of `data_scales` (L(D)); every (size, budget) point is
trained at each learning rate in `lrs` and keeps its best, because a scaling law describes the tuned
optimum of each size, not one learning rate that suits some sizes better than others.

Fits, each least squares in log L:
    L(N) = (N_c/N)^α_N                          at the base budget (a straight line in log-log)
    L(D) = (D_c/D)^α_D                          at a fixed size
    L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D   every tuned point (Kaplan et al. eq. 1.5)
At a fixed D the joint law flattens as N grows (the D_c/D term is left), so the slope of the first
fit is less than the joint α_N; the joint α_N is the exponent with unlimited data, Kaplan's 0.076.
The compute-optimal frontier follows from the joint law with C = 6·N·D (Kaplan's convention):
N_opt ∝ C^(α_D/(α_N+α_D)), L_opt ∝ C^−(α_N·α_D/(α_N+α_D)).

Every finished run is appended to DIR/runs.csv at once, so an interrupted sweep loses nothing and a
rerun skips what is done; a run that fails is recorded as failed and the sweep goes on.
"""
import csv
import json
import math
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..core.counting import count_params, flops_per_token
from ..train.data import Dataset, load_text
from ..train.metrics import estimate_loss, perplexity
from ..core.model import GPT, MIXERS, GPTConfig
from ..core.optim import Schedule, adamw_init, train_step
from ..core.tokenizer import ByteTokenizer

CSV_NAME = "runs.csv"
FIELDS = ["run", "mixer", "n_layer", "d_model", "n_head", "params", "tokens", "lr", "flops", "val_loss",
          "val_perplexity", "status", "seconds", "curve", "error"]
HEAD_DIM = 16
# (n_layer, d_model): non-embedding N from ~3e3 to ~2.3e5 for attention, 1.85 decades.
DEFAULT_SIZES = ((1, 16), (1, 32), (2, 32), (2, 48), (2, 64), (3, 80))
DEFAULT_DATA_SIZES = ((1, 16), (2, 64))
QUICK_SIZES = ((1, 16), (1, 32), (2, 32), (2, 64))
QUICK_DATA_SIZES = ((1, 32),)
MIN_STEPS = 10
# Student's t, 97.5% quantile, by degrees of freedom: the 95% interval of a slope fitted to few points.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


@dataclass(frozen=True)
class SweepSettings:
    """What every run of a sweep shares. tokens: the base training budget of a run; lrs: the peak
    learning rates tried at every point; data_scales: the L(D) budgets, as multiples of tokens."""
    tokens: int = 400_000
    n_ctx: int = 64
    batch_size: int = 16
    lrs: tuple = (2e-3, 6e-3, 2e-2)
    data_scales: tuple = (0.125, 0.25, 0.5, 2.0)
    eval_points: int = 8          # validation losses along each run's curve (log-spaced in steps)
    eval_batches: int = 4
    seed: int = 0

    def steps(self, tokens):
        """Optimizer steps of a run with this token budget (whole batches only)."""
        return tokens // (self.batch_size * self.n_ctx)

    def budgets(self):
        """The base budget first, then the L(D) budgets."""
        return [self.tokens] + [int(self.tokens * s) for s in self.data_scales if int(self.tokens * s) != self.tokens]


QUICK = SweepSettings(tokens=60_000, n_ctx=32, batch_size=16, data_scales=(0.25, 0.5, 2.0), eval_points=5,
                      eval_batches=2)


class Run(NamedTuple):
    """One training run of the grid."""
    mixer: str
    n_layer: int
    d_model: int
    tokens: int
    lr: float


def run_name(run, settings):
    """A run's identity: the same name means the same training, so a rerun may skip it."""
    return (f"{run.mixer}-L{run.n_layer}-d{run.d_model}-ctx{settings.n_ctx}-b{settings.batch_size}"
            f"-steps{settings.steps(run.tokens)}-lr{run.lr:g}-seed{settings.seed}")


def plan(mixers, sizes, data_sizes, settings):
    """Every run of the sweep, in training order: each size at the base budget, then each data size
    at the other budgets, every point at every learning rate."""
    base, *others = settings.budgets()
    points = [(size, base) for size in sizes] + [(size, tokens) for size in data_sizes for tokens in others]
    return [Run(mixer, n_layer, d_model, tokens, lr)
            for mixer in mixers for (n_layer, d_model), tokens in points for lr in settings.lrs]


def model_config(mixer, n_layer, d_model, n_ctx):
    """The sweep's model at one size: heads of HEAD_DIM features, the byte vocabulary."""
    return GPTConfig(vocab_size=ByteTokenizer.vocab_size, n_ctx=n_ctx, n_layer=n_layer,
                     n_head=max(1, d_model // HEAD_DIM), d_model=d_model, mixer=mixer)


def check_sweep(mixers, sizes, data_sizes, settings):
    """Every problem with the request, as one ValueError, before any training starts."""
    for mixer in mixers:
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS} (or 'both'), got {mixer!r}")
    if len(set(sizes)) < 3:
        raise ValueError(f"a power-law fit needs at least 3 distinct sizes, got {len(set(sizes))}")
    for n_layer, d_model in tuple(sizes) + tuple(data_sizes):
        if n_layer < 1 or d_model < 1 or (d_model >= HEAD_DIM and d_model % HEAD_DIM):
            raise ValueError(f"size (n_layer={n_layer}, d_model={d_model}): need n_layer >= 1 and d_model >= 1, "
                             f"a multiple of {HEAD_DIM} from {HEAD_DIM} on (heads of {HEAD_DIM} features)")
    for name in ("tokens", "n_ctx", "batch_size", "eval_points", "eval_batches"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(settings, name)}")
    if not settings.lrs or not all(lr > 0 and math.isfinite(lr) for lr in settings.lrs):
        raise ValueError(f"learning rates must be finite numbers > 0, got {settings.lrs}")
    if not all(s > 0 and math.isfinite(s) for s in settings.data_scales):
        raise ValueError(f"data scales must be finite numbers > 0, got {settings.data_scales}")
    if data_sizes and len(settings.budgets()) < 3:
        raise ValueError(f"an L(D) fit needs at least 3 distinct budgets, got {len(settings.budgets())} "
                         f"(tokens {settings.tokens:,} × data scales {settings.data_scales})")
    smallest = min(settings.budgets()) if data_sizes else settings.tokens
    if settings.steps(smallest) < MIN_STEPS:
        raise ValueError(f"a token budget of {smallest:,} is only {settings.steps(smallest)} steps of batch_size·n_ctx = "
                         f"{settings.batch_size * settings.n_ctx} tokens; need at least {MIN_STEPS} steps "
                         f"({MIN_STEPS * settings.batch_size * settings.n_ctx:,} tokens)")


def eval_steps(steps, settings):
    """Steps after which the validation loss is measured: log-spaced, always including the last."""
    points = np.geomspace(max(1, steps // 50), steps, settings.eval_points)
    return sorted(set(int(round(p)) for p in points) | {steps})


def train_run(config, dataset, settings, tokens, lr):
    """Train one model on `tokens` tokens at peak learning rate lr -> (final validation loss,
    curve: [[tokens, flops, loss, perplexity]]).

    Warm-up over a tenth of the steps then cosine decay to lr/10 (optim.Schedule), AdamW with
    clipping (train.train_step). The validation windows (metrics.estimate_loss) are the same for
    every eval and every model: curves compare like with like.
    """
    model = GPT(config, seed=settings.seed)
    opt = adamw_init(model.params)
    rng = np.random.default_rng(settings.seed)
    flops_per_train_token = flops_per_token(config)["exact_forward_backward"]
    steps, tokens_per_step = settings.steps(tokens), settings.batch_size * settings.n_ctx
    checkpoints, curve = eval_steps(steps, settings), []
    schedule = Schedule(lr, steps, max(1, steps // 10), lr / 10)
    for step in range(steps):
        idx, targets = dataset.get_batch("train", settings.batch_size, rng)
        train_step(model, opt, idx, targets, schedule)
        if step + 1 in checkpoints:
            loss = estimate_loss(model, dataset, "val", settings.batch_size, settings.eval_batches, settings.seed + 1)
            if not math.isfinite(loss):
                raise FloatingPointError(f"validation loss is {loss} after {step + 1} steps (diverged)")
            seen = (step + 1) * tokens_per_step
            curve.append([seen, seen * flops_per_train_token, loss, perplexity(loss)])
    return curve[-1][2], curve


def read_runs(out_dir):
    """The rows of DIR/runs.csv (numbers parsed, curve decoded); [] when there is none yet."""
    path = os.path.join(out_dir, CSV_NAME)
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != FIELDS:
            raise ValueError(f"{path} has columns {reader.fieldnames}, not this tinylm's {FIELDS} "
                             f"(written by an older version?): use a new --out directory")
        rows = list(reader)
    for row in rows:
        for key in ("n_layer", "d_model", "n_head", "params", "tokens"):
            row[key] = int(row[key])
        for key in ("lr", "flops", "val_loss", "val_perplexity", "seconds"):
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


def describe(row):
    """A finished row as the progress line shows it."""
    if row["status"] != "ok":
        return f"FAILED ({row['error']})"
    return f"val loss {row['val_loss']:.4f} (perplexity {row['val_perplexity']:.2f})"


def sweep(out_dir, mixers, sizes, data_sizes, settings, text=None, progress=print):
    """Train every run of the plan not already finished in out_dir; returns the latest finished row of
    each planned run (failed runs are in runs.csv, not here).

    text: the training text (default: data.load_text()'s built-in corpus).
    """
    check_sweep(mixers, sizes, data_sizes, settings)
    ids = ByteTokenizer().encode(load_text() if text is None else text)
    dataset = Dataset(ids, settings.n_ctx)                 # raises if the text is too short for n_ctx
    os.makedirs(out_dir, exist_ok=True)
    runs = plan(mixers, sizes, data_sizes, settings)
    done = {r["run"]: r for r in read_runs(out_dir) if r["status"] == "ok"}
    for run in runs:
        name = run_name(run, settings)
        if name in done:
            progress(f"{name}: done before, skipped")
            continue
        config = model_config(run.mixer, run.n_layer, run.d_model, settings.n_ctx)
        row = {"run": name, "mixer": run.mixer, "n_layer": run.n_layer, "d_model": run.d_model,
               "n_head": config.n_head, "params": count_params(config)["non_embedding"],
               "tokens": settings.steps(run.tokens) * settings.batch_size * settings.n_ctx, "lr": run.lr,
               "flops": "", "val_loss": "", "val_perplexity": "", "curve": [], "error": ""}
        t0 = time.perf_counter()
        try:
            row["val_loss"], row["curve"] = train_run(config, dataset, settings, run.tokens, run.lr)
            row["val_perplexity"], row["flops"], row["status"] = row["curve"][-1][3], row["curve"][-1][1], "ok"
            done[name] = row
        except Exception as e:     # recorded and skipped: one bad run must not end the sweep
            row["status"], row["error"] = "failed", f"{type(e).__name__}: {e}"
        row["seconds"] = round(time.perf_counter() - t0, 2)
        append_run(out_dir, row)
        progress(f"{name}: N={row['params']:,} D={row['tokens']:,} {describe(row)}, {row['seconds']:.0f}s")
    return [done[n] for n in dict.fromkeys(run_name(r, settings) for r in runs) if n in done]


def best_per_point(rows):
    """{(mixer, n_layer, d_model, tokens): the row with the least validation loss over learning rates}."""
    best = {}
    for row in rows:
        key = (row["mixer"], row["n_layer"], row["d_model"], row["tokens"])
        if key not in best or row["val_loss"] < best[key]["val_loss"]:
            best[key] = row
    return best


# ----------------------------------------------------------------------------- fits
def power_law_fit(x, y):
    """Least squares of log y = a + b·log x. -> dict(alpha = −b, scale = x where y = 1, i.e. (scale/x)^alpha,
    alpha_ci95 = (lo, hi), n). The interval needs at least 3 points (None otherwise)."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    n = len(lx)
    b, a = np.polyfit(lx, ly, 1)
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


def joint_law(N, D, alpha_N, alpha_D, N_c, D_c):
    """Kaplan et al. eq. 1.5: L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D. Arrays broadcast."""
    return ((N_c / np.asarray(N, float)) ** (alpha_N / alpha_D) + D_c / np.asarray(D, float)) ** alpha_D


def joint_residuals(theta, lnN, lnD, lnL):
    """log L(N, D) − log L_measured and its Jacobian (n, 4) in θ = (ln r, ln α_D, ln N_c, ln D_c), r = α_N/α_D.

    log L = α_D·ln u, u = e^{s1} + e^{s2}, s1 = r·(ln N_c − ln N), s2 = ln D_c − ln D; with the weights
    w1 = e^{s1}/u, w2 = 1 − w1 the derivatives are α_D·w1·s1 (ln r: r·∂/∂r), α_D·ln u (ln α_D),
    α_D·w1·r (ln N_c) and α_D·w2 (ln D_c). Logs of r and α_D keep both positive.
    """
    with np.errstate(over="ignore", invalid="ignore"):     # a wild trial step gives inf/nan: LM rejects it
        r, alpha_D = np.exp(theta[0]), np.exp(theta[1])
        s1, s2 = r * (theta[2] - lnN), theta[3] - lnD
        ln_u = np.logaddexp(s1, s2)                 # ln(e^{s1} + e^{s2}) without overflow
        w1 = np.exp(s1 - ln_u)
        jacobian = np.stack([alpha_D * w1 * s1, alpha_D * ln_u, alpha_D * w1 * r, alpha_D * (1 - w1)], axis=1)
    return alpha_D * ln_u - lnL, jacobian


def levenberg_marquardt(theta, residuals, iterations=300):
    """Minimise ½‖res(θ)‖² from θ: Gauss–Newton steps (JᵀJ) δ = −Jᵀres, damped by λ·diag(JᵀJ); a step
    that lowers the cost is kept and λ shrinks, one that doesn't is dropped and λ grows.
    residuals(θ) -> (res, J). Returns (θ, cost)."""
    res, J = residuals(theta)
    cost, lam = float(res @ res) / 2, 1e-3
    for _ in range(iterations):
        JtJ = J.T @ J
        try:
            step = np.linalg.solve(JtJ + lam * np.diag(np.diag(JtJ) + 1e-12), -J.T @ res)
        except np.linalg.LinAlgError:          # a degenerate start: keep what we have
            break
        new_res, new_J = residuals(theta + step)
        new_cost = float(new_res @ new_res) / 2
        if np.isfinite(new_cost) and np.isfinite(new_J).all() and new_cost < cost:
            theta, res, J, lam = theta + step, new_res, new_J, lam / 3
            if cost - new_cost < 1e-15 * max(cost, 1e-30):
                cost = new_cost
                break
            cost = new_cost
        else:
            lam *= 3
            if lam > 1e12:
                break
    return theta, cost


def fit_joint(N, D, L):
    """Kaplan's L(N, D) fitted to points (N, D, L) by least squares in log L -> dict(alpha_N, alpha_D,
    N_c, D_c, rms_log_residual, points). Needs ≥ 2 distinct N and ≥ 2 distinct D (4 parameters:
    give it ≥ 5 points). Several starting points (the cost has flat valleys); the best is kept."""
    lnN, lnD, lnL = (np.log(np.asarray(v, float)) for v in (N, D, L))
    if len(set(lnN)) < 2 or len(set(lnD)) < 2:
        raise ValueError("a joint L(N, D) fit needs at least 2 distinct sizes and 2 distinct token budgets")
    best = None
    for alpha_D in (0.03, 0.1, 0.3):
        for r in (0.3, 1.0, 3.0):
            # Start with both terms equal to half of u = L^(1/α_D) at the largest N and D.
            ln_half_u = lnL.min() / alpha_D - math.log(2)
            start = np.array([math.log(r), math.log(alpha_D), lnN.max() + ln_half_u / r, lnD.max() + ln_half_u])
            theta, cost = levenberg_marquardt(start, lambda t: joint_residuals(t, lnN, lnD, lnL))
            if best is None or cost < best[1]:
                best = (theta, cost)
    theta, cost = best
    with np.errstate(over="ignore"):
        r, alpha_D, N_c, D_c = (float(v) for v in np.exp(theta))
    return {"alpha_N": r * alpha_D, "alpha_D": alpha_D, "N_c": N_c, "D_c": D_c,
            "rms_log_residual": math.sqrt(2 * cost / len(lnL)), "points": len(lnL)}


def compute_optimal(joint, compute):
    """The joint law's compute-optimal frontier, with C = 6·N·D (Kaplan's convention). Minimising
    (N_c/N)^(α_N/α_D) + 6·D_c·N/C over N gives N_opt = [(α_N/α_D)·N_c^(α_N/α_D)·C/(6·D_c)]^(α_D/(α_N+α_D)).
    compute: C values -> [[C, N_opt, D_opt, L_opt, perplexity]]."""
    a, b, N_c, D_c = joint["alpha_N"], joint["alpha_D"], joint["N_c"], joint["D_c"]
    rows = []
    for C in compute:
        N_opt = ((a / b) * N_c ** (a / b) * C / (6 * D_c)) ** (b / (a + b))
        D_opt = C / (6 * N_opt)
        loss = float(joint_law(N_opt, D_opt, a, b, N_c, D_c))
        rows.append([float(C), float(N_opt), float(D_opt), loss, perplexity(loss)])
    return rows


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


def at_edge(lr, lrs):
    """Whether the best learning rate is the grid's smallest or largest (the optimum may lie outside)."""
    return len(lrs) > 1 and lr in (min(lrs), max(lrs))


def fit_mixer(rows, settings, data_sizes):
    """fit.json's object for one mixer's finished runs of a sweep."""
    best = best_per_point(rows)
    base = settings.steps(settings.tokens) * settings.batch_size * settings.n_ctx
    by_size = sorted((r for (_, _, _, tokens), r in best.items() if tokens == base), key=lambda r: r["params"])
    N, L = [r["params"] for r in by_size], [r["val_loss"] for r in by_size]
    law = power_law_fit(N, L)
    front = frontier(rows)
    compute = power_law_fit(*zip(*front)) if len(front) >= 2 else None
    result = {"alpha_N": law["alpha"], "N_c": law["scale"], "alpha_N_ci95": law["alpha_ci95"], "runs": law["n"],
              "params": N, "val_loss": L, "val_perplexity": [perplexity(x) for x in L],
              "best_lr": [r["lr"] for r in by_size], "best_lr_at_edge": [at_edge(r["lr"], settings.lrs) for r in by_size],
              "tokens_per_run": base, "frontier": [[c, x, perplexity(x)] for c, x in front],
              "alpha_C": compute and compute["alpha"], "C_c": compute and compute["scale"]}
    if len(by_size) >= 4:
        result["with_irreducible"] = fit_with_irreducible(N, L)
    result["data_sweeps"] = []
    for n_layer, d_model in data_sizes:
        arm = sorted((r for (_, nl, dm, _), r in best.items() if (nl, dm) == (n_layer, d_model)),
                     key=lambda r: r["tokens"])
        if len(arm) >= 2:
            law_D = power_law_fit([r["tokens"] for r in arm], [r["val_loss"] for r in arm])
            result["data_sweeps"].append({
                "n_layer": n_layer, "d_model": d_model, "params": arm[0]["params"], "alpha_D": law_D["alpha"],
                "D_c": law_D["scale"], "alpha_D_ci95": law_D["alpha_ci95"], "tokens": [r["tokens"] for r in arm],
                "val_loss": [r["val_loss"] for r in arm], "val_perplexity": [r["val_perplexity"] for r in arm],
                "best_lr": [r["lr"] for r in arm]})
    if result["data_sweeps"]:
        largest = max(result["data_sweeps"], key=lambda s: s["params"])     # the least limited by N
        result.update(alpha_D=largest["alpha_D"], D_c=largest["D_c"], alpha_D_ci95=largest["alpha_D_ci95"])
        points = list(best.values())
        joint = fit_joint([r["params"] for r in points], [r["tokens"] for r in points],
                          [r["val_loss"] for r in points])
        C = [6 * r["params"] * r["tokens"] for r in points]
        joint["alpha_C"] = joint["alpha_N"] * joint["alpha_D"] / (joint["alpha_N"] + joint["alpha_D"])
        joint["N_opt_exponent"] = joint["alpha_D"] / (joint["alpha_N"] + joint["alpha_D"])
        joint["frontier"] = compute_optimal(joint, np.geomspace(min(C), max(C), 5))
        result["joint"] = joint
    return result


def fit_sweep(rows, mixers, settings, data_sizes):
    """{mixer: fit} over a sweep's finished runs (a mixer with fewer than 2 sizes done at the base
    budget is left out)."""
    base = settings.steps(settings.tokens) * settings.batch_size * settings.n_ctx
    fits = {}
    for mixer in mixers:
        runs = [r for r in rows if r["mixer"] == mixer]
        if len({r["params"] for r in runs if r["tokens"] == base}) >= 2:
            fits[mixer] = fit_mixer(runs, settings, data_sizes)
    return fits


# ----------------------------------------------------------------------------- plots
COLORS = {"attention": "tab:blue", "ssm": "tab:orange"}


def draw_loss_vs_params(ax, rows, fits):
    for mixer, fit in fits.items():
        N = np.array(fit["params"], float)
        ax.scatter(N, fit["val_loss"], color=COLORS[mixer], label=f"{mixer}: best lr per size")
        grid = np.geomspace(N.min(), N.max(), 50)
        ax.plot(grid, (fit["N_c"] / grid) ** fit["alpha_N"], color=COLORS[mixer],
                label=f"{mixer} L(N): α_N = {fit['alpha_N']:.3f}")
        if "joint" in fit:
            j = fit["joint"]
            ax.plot(grid, joint_law(grid, fit["tokens_per_run"], j["alpha_N"], j["alpha_D"], j["N_c"], j["D_c"]),
                    color=COLORS[mixer], ls="--", label=f"{mixer} L(N, D) at this D: α_N = {j['alpha_N']:.3f}")


def draw_loss_vs_tokens(ax, rows, fits):
    for mixer, fit in fits.items():
        j = fit.get("joint")
        for arm, marker in zip(fit["data_sweeps"], "os^v"):
            D = np.array(arm["tokens"], float)
            ax.scatter(D, arm["val_loss"], color=COLORS[mixer], marker=marker,
                       label=f"{mixer} {arm['n_layer']}x{arm['d_model']}: α_D = {arm['alpha_D']:.3f}")
            if j:
                grid = np.geomspace(D.min(), D.max(), 50)
                ax.plot(grid, joint_law(arm["params"], grid, j["alpha_N"], j["alpha_D"], j["N_c"], j["D_c"]),
                        color=COLORS[mixer], ls="--")


def draw_loss_vs_compute(ax, rows, fits):
    for row in rows:
        curve = np.array(row["curve"])
        ax.plot(curve[:, 1], curve[:, 2], color=COLORS[row["mixer"]], alpha=0.25, lw=1)
    for mixer, fit in fits.items():
        front = np.array(fit["frontier"])
        ax.plot(front[:, 0], front[:, 1], color=COLORS[mixer], lw=2.5,
                label=f"{mixer} frontier" + (f": α_C = {fit['alpha_C']:.3f}" if fit["alpha_C"] else ""))


def plot(out_dir, rows, fits):
    """loss_vs_params.png (the tuned L(N) and both fits), loss_vs_tokens.png (the L(D) sweeps and the
    joint fit) and loss_vs_compute.png (every run's curve and the frontier)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, draw, xlabel, title in [
            ("loss_vs_params.png", draw_loss_vs_params, "non-embedding parameters N", "L(N) at the base budget"),
            ("loss_vs_tokens.png", draw_loss_vs_tokens, "training tokens D", "L(D) at fixed sizes; dashed: L(N, D)"),
            ("loss_vs_compute.png", draw_loss_vs_compute, "training compute C (FLOPs)",
             "every run's curve and the compute-efficient frontier")]:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        draw(ax, rows, fits)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="validation loss (nats/byte)", title=title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=120)
        plt.close(fig)


def write_fits(out_dir, fits, mixers):
    """DIR/fit.json: the mixer's fit object, or {mixer: fit} when several were asked for."""
    with open(os.path.join(out_dir, "fit.json"), "w") as f:
        json.dump(fits if len(mixers) > 1 else fits[mixers[0]], f, indent=2)
