"""The scaling-law sweep (tinylm/experiments/scaling.py, `tinylm scaling`): the fits recover known laws, the
frontier is the lower envelope, finished runs survive failures and interruptions and are skipped
on a rerun, bad input fails before any training, and --quick runs end to end. The joint L(N, D) fit
recovers a known law, catches the bias of a fixed-D L(N) fit, and fails when its Jacobian is wrong."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tinylm import count_params
from tinylm.experiments import scaling
from tinylm.train.metrics import perplexity
from tinylm.experiments.scaling import (DEFAULT_SIZES, QUICK, QUICK_DATA_SIZES, QUICK_SIZES, SweepSettings, best_per_point,
                            check_sweep, compute_optimal, fit_joint, fit_sweep, fit_with_irreducible, frontier,
                            model_config, plan, power_law_fit, read_runs, sweep)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "def f(x):\n    return x + 1\n" * 200              # ~6 kB: enough for tiny runs
TINY = SweepSettings(tokens=10 * 2 * 8, n_ctx=8, batch_size=2, lrs=(3e-3,), data_scales=(), eval_points=2,
                     eval_batches=1)
TINY_SIZES = ((1, 4), (1, 8), (2, 8))
TRAIN_RUN = scaling.train_run


# ---------------------------------------------------------------- fits
def test_power_law_fit_recovers_a_known_law():
    N = np.geomspace(1e3, 1e6, 6)
    L = (8.8e13 / N) ** 0.076
    fit = power_law_fit(N, L)
    assert fit["alpha"] == pytest.approx(0.076, rel=1e-9)
    assert fit["scale"] == pytest.approx(8.8e13, rel=1e-6)
    lo, hi = fit["alpha_ci95"]
    assert lo == pytest.approx(0.076, abs=1e-9) and hi == pytest.approx(0.076, abs=1e-9)   # exact data: no width


def test_confidence_interval_covers_the_truth_and_widens_with_noise():
    rng = np.random.default_rng(0)
    N = np.geomspace(1e3, 1e6, 8)
    widths = []
    for noise in (0.01, 0.05):
        L = (1e10 / N) ** 0.1 * np.exp(rng.normal(size=8) * noise)
        lo, hi = power_law_fit(N, L)["alpha_ci95"]
        assert lo < 0.1 < hi
        widths.append(hi - lo)
    assert widths[1] > widths[0]


def test_irreducible_term_is_recovered():
    N = np.geomspace(1e3, 1e6, 8)
    L = 1.2 + (1e5 / N) ** 0.3
    fit = fit_with_irreducible(N, L, grid=1000)
    assert fit["E"] == pytest.approx(1.2, abs=0.01)
    assert fit["alpha_N"] == pytest.approx(0.3, abs=0.02)


def test_frontier_is_the_lower_envelope_of_every_curve():
    rows = [{"curve": [[1, 1e2, 5.0], [2, 1e3, 4.0], [4, 1e4, 3.5]]},      # small model: cheap, flattens
            {"curve": [[1, 1e3, 4.5], [2, 1e4, 3.0], [4, 1e5, 2.0]]}]      # big model: costly, goes lower
    assert frontier(rows) == [[1e2, 5.0], [1e3, 4.0], [1e4, 3.0], [1e5, 2.0]]


def test_default_and_quick_sizes_span_enough():
    for mixer in ("attention", "ssm"):
        N = [count_params(model_config(mixer, L, d, 64))["non_embedding"] for L, d in DEFAULT_SIZES]
        assert len(set(N)) >= 6 and math.log10(max(N) / min(N)) >= 1.5
    assert len(set(QUICK_SIZES)) >= 4


def eq_1_5(N, D, alpha_N, alpha_D, N_c, D_c):
    """Kaplan et al. eq. 1.5, written here independently of scaling.joint_law to make the test data."""
    return ((N_c / N) ** (alpha_N / alpha_D) + D_c / D) ** alpha_D


# An L-shaped grid like the sweep's: 5 sizes at one budget, two sizes at 4 more budgets.
GRID_N = np.array([3e3, 1e4, 3e4, 1e5, 3e5] + [3e3] * 4 + [1e5] * 4)
GRID_D = np.array([4e5] * 5 + [5e4, 1e5, 2e5, 8e5] * 2)
LAWS = [(0.076, 0.095, 8.8e13, 5.4e13), (0.3, 0.2, 1e4, 1e4), (0.2, 0.4, 3e2, 1e5)]


@pytest.mark.parametrize("law", LAWS)
def test_joint_fit_recovers_a_known_law(law):
    fit = fit_joint(GRID_N, GRID_D, eq_1_5(GRID_N, GRID_D, *law))
    got = [fit[k] for k in ("alpha_N", "alpha_D", "N_c", "D_c")]
    assert got == pytest.approx(law, rel=1e-6) and fit["rms_log_residual"] < 1e-9


def test_joint_fit_with_noise_over_seeds():
    """1% multiplicative noise, 5 seeds: the exponents stay within 15% of the truth every time."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        L = eq_1_5(GRID_N, GRID_D, 0.3, 0.2, 1e4, 1e4) * np.exp(rng.normal(size=len(GRID_N)) * 0.01)
        fit = fit_joint(GRID_N, GRID_D, L)
        assert fit["alpha_N"] == pytest.approx(0.3, rel=0.15) and fit["alpha_D"] == pytest.approx(0.2, rel=0.15)
        assert 0.003 < fit["rms_log_residual"] < 0.02


def test_a_fixed_budget_L_of_N_fit_underestimates_alpha_N_and_the_joint_fit_does_not():
    """The wrong fit caught: at one token budget the D_c/D term flattens L(N), so the straight-line
    slope is below the true α_N (what the sweep's α_N < Kaplan's 0.076 comes from); eq. 1.5 gets it."""
    law = (0.3, 0.2, 1e4, 1e4)
    at_one_D = power_law_fit(GRID_N[:5], eq_1_5(GRID_N[:5], GRID_D[:5], *law))["alpha"]
    assert at_one_D < law[0] - 0.05                 # 0.23 here, vs 0.3
    assert fit_joint(GRID_N, GRID_D, eq_1_5(GRID_N, GRID_D, *law))["alpha_N"] == pytest.approx(law[0], rel=1e-6)


def test_a_wrong_jacobian_is_caught(monkeypatch):
    """Planted bug: the ln N_c column of the Jacobian with its sign flipped. The fit must then miss
    the law, so the recovery test above can fail."""
    right = scaling.joint_residuals

    def flipped(theta, lnN, lnD, lnL):
        res, J = right(theta, lnN, lnD, lnL)
        J[:, 2] *= -1
        return res, J
    monkeypatch.setattr(scaling, "joint_residuals", flipped)
    fit = fit_joint(GRID_N, GRID_D, eq_1_5(GRID_N, GRID_D, *LAWS[1]))
    assert fit["rms_log_residual"] > 1e-6 or fit["alpha_N"] != pytest.approx(LAWS[1][0], rel=1e-6)


def test_joint_fit_needs_two_sizes_and_two_budgets():
    with pytest.raises(ValueError, match="2 distinct sizes and 2 distinct token budgets"):
        fit_joint([1e3, 1e4, 1e5], [1e5] * 3, [3.0, 2.5, 2.2])


def test_compute_optimal_frontier_is_the_minimum_over_sizes():
    """Against brute force: at each C, the least L(N, C/6N) over a fine grid of N."""
    joint = dict(zip(("alpha_N", "alpha_D", "N_c", "D_c"), LAWS[1]))
    for C, N_opt, D_opt, loss, ppl in compute_optimal(joint, [1e9, 1e12]):
        N = np.geomspace(N_opt / 100, N_opt * 100, 200001)
        losses = eq_1_5(N, C / (6 * N), *LAWS[1])
        assert N_opt == pytest.approx(N[losses.argmin()], rel=1e-3)
        assert loss == pytest.approx(losses.min(), rel=1e-9) and D_opt == pytest.approx(C / (6 * N_opt))
        assert ppl == pytest.approx(math.exp(loss))
    a, b = LAWS[1][:2]
    (C0, N0, *_), (C1, N1, *_) = compute_optimal(joint, [1e9, 1e12])
    assert math.log(N1 / N0) / math.log(C1 / C0) == pytest.approx(b / (a + b))


def test_perplexity_is_the_number_of_equally_likely_choices():
    for k in (1, 2, 256, 50257):
        assert perplexity(math.log(k)) == pytest.approx(k)
    assert perplexity(1e4) == math.inf


def test_plan_and_best_per_point_bookkeeping():
    settings = SweepSettings(tokens=1000, lrs=(1e-3, 1e-2), data_scales=(0.5, 1.0, 2.0))
    runs = plan(["attention"], ((1, 16), (2, 32)), ((1, 16),), settings)
    # 2 sizes at the base budget + 1 size at 2 more budgets (scale 1.0 is the base), each at 2 lrs
    assert len(runs) == (2 + 2) * 2 and len(set(runs)) == len(runs)
    assert sorted({r.tokens for r in runs}) == [500, 1000, 2000]
    rows = [{"mixer": r.mixer, "n_layer": r.n_layer, "d_model": r.d_model, "tokens": r.tokens, "lr": r.lr,
             "val_loss": 3.0 - r.lr * (1 if r.d_model == 16 else -1)} for r in runs]
    best = best_per_point(rows)
    assert len(best) == 4
    assert all(row["lr"] == (1e-2 if key[2] == 16 else 1e-3) for key, row in best.items())


def test_tiny_sweep_with_lr_and_data_arms_fits_everything(tmp_path):
    settings = SweepSettings(**{**TINY.__dict__, "lrs": (1e-3, 1e-2), "data_scales": (0.5, 2.0),
                                "tokens": 20 * 2 * 8})
    rows = sweep(tmp_path, ["attention"], TINY_SIZES, ((1, 8),), settings, text=TEXT, progress=lambda m: None)
    assert len(rows) == (3 + 2) * 2 and all(r["status"] == "ok" for r in rows)
    fit = fit_sweep(rows, ["attention"], settings, ((1, 8),))["attention"]
    assert fit["runs"] == 3 and fit["val_loss"] == [min(r["val_loss"] for r in rows if r["tokens"] == 320
                                                        and r["params"] == N) for N in fit["params"]]
    assert [arm["tokens"] for arm in fit["data_sweeps"]] == [[160, 320, 640]]
    assert fit["joint"]["points"] == 5 and len(fit["joint"]["frontier"]) == 5


# ---------------------------------------------------------------- runs survive
def fail_on(monkeypatch, d_model, exception):
    """train_run raising `exception` for the size with this d_model; returns the list of sizes trained."""
    trained = []

    def train_run(config, dataset, settings, tokens, lr):
        trained.append((config.n_layer, config.d_model))
        if config.d_model == d_model:
            raise exception
        return TRAIN_RUN(config, dataset, settings, tokens, lr)
    monkeypatch.setattr(scaling, "train_run", train_run)
    return trained


def test_a_failed_run_is_recorded_the_sweep_goes_on_and_a_rerun_retries_only_it(tmp_path, monkeypatch):
    trained = fail_on(monkeypatch, 4, FloatingPointError("validation loss is nan"))
    sweep(tmp_path, ["attention"], TINY_SIZES, (), TINY, text=TEXT, progress=lambda m: None)
    assert trained == list(TINY_SIZES)
    rows = read_runs(tmp_path)
    assert [r["status"] for r in rows] == ["failed", "ok", "ok"]
    assert "FloatingPointError: validation loss is nan" in rows[0]["error"]
    finished = {r["run"]: r for r in rows if r["status"] == "ok"}
    assert all(math.isfinite(r["val_loss"]) and len(r["curve"]) >= 2 for r in finished.values())

    trained = fail_on(monkeypatch, None, None)
    done = sweep(tmp_path, ["attention"], TINY_SIZES, (), TINY, text=TEXT, progress=lambda m: None)
    assert trained == [(1, 4)]                                  # only the failed run again
    rows = read_runs(tmp_path)
    assert [r["status"] for r in rows] == ["failed", "ok", "ok", "ok"]
    for r in rows[1:3]:                                         # the finished rows are untouched
        assert r == finished[r["run"]]
    assert [r["d_model"] for r in done] == [4, 8, 8]            # every planned run, each once
    assert set(fit_sweep(done, ["attention"], TINY, ())) == {"attention"}


def test_an_interrupted_sweep_keeps_its_finished_runs(tmp_path, monkeypatch):
    fail_on(monkeypatch, 8, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        sweep(tmp_path, ["ssm"], TINY_SIZES, (), TINY, text=TEXT, progress=lambda m: None)
    assert [(r["mixer"], r["d_model"], r["status"]) for r in read_runs(tmp_path)] == [("ssm", 4, "ok")]
    trained = fail_on(monkeypatch, None, None)
    sweep(tmp_path, ["ssm"], TINY_SIZES, (), TINY, text=TEXT, progress=lambda m: None)
    assert trained == [(1, 8), (2, 8)]
    with open(tmp_path / "runs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3


def test_a_changed_setting_is_a_new_run(tmp_path):
    sweep(tmp_path, ["attention"], TINY_SIZES, (), TINY, text=TEXT, progress=lambda m: None)
    more = SweepSettings(**{**TINY.__dict__, "lrs": (1e-3,)})
    sweep(tmp_path, ["attention"], TINY_SIZES, (), more, text=TEXT, progress=lambda m: None)
    rows = read_runs(tmp_path)
    assert len(rows) == 6 and len({r["run"] for r in rows}) == 6


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("mixers, sizes, settings, message", [
    (["rnn"], TINY_SIZES, TINY, r"mixer must be one of \('attention', 'ssm'\)"),
    (["attention"], ((1, 8), (1, 8), (2, 8)), TINY, "at least 3 distinct sizes"),
    (["attention"], ((1, 8), (1, 24), (2, 8)), TINY, "d_model=24"),
    (["attention"], ((0, 8), (1, 16), (2, 8)), TINY, "n_layer=0"),
    (["attention"], TINY_SIZES, SweepSettings(tokens=100, n_ctx=8, batch_size=2), "only 6 steps"),
    (["attention"], TINY_SIZES, SweepSettings(lrs=(-1.0,)), "learning rates must be finite numbers > 0"),
])
def test_bad_sweep_requests(mixers, sizes, settings, message):
    with pytest.raises(ValueError, match=message):
        check_sweep(mixers, sizes, (), settings)


@pytest.mark.parametrize("settings, message", [
    (SweepSettings(data_scales=(1.0,)), "at least 3 distinct budgets"),
    (SweepSettings(data_scales=(0.0001, 0.5)), "only 0 steps"),
    (SweepSettings(data_scales=(-1.0, 0.5)), "data scales must be finite numbers > 0"),
])
def test_bad_data_sweep_requests(settings, message):
    with pytest.raises(ValueError, match=message):
        check_sweep(["attention"], TINY_SIZES, ((1, 8),), settings)


def test_context_longer_than_the_data_fails_before_training(tmp_path, monkeypatch):
    trained = fail_on(monkeypatch, None, None)
    with pytest.raises(ValueError, match="too short"):
        sweep(tmp_path, ["attention"], TINY_SIZES, (), SweepSettings(tokens=10**6, n_ctx=4096, batch_size=1),
              text=TEXT, progress=lambda m: None)
    assert trained == [] and not (tmp_path / "runs.csv").exists()


def cli(*args):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "tinylm", "scaling", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["--mixer", "rnn"], "argument --mixer: invalid choice: 'rnn'"),
    (["--sizes", "1x16,2-32"], "argument --sizes: must look like"),
    (["--quick", "--tokens", "1000"], "need at least 10 steps"),
    (["--lrs", "1e-3,0"], "argument --lrs: must be > 0"),
    (["--tokens", "-5"], "argument --tokens: must be > 0"),
    (["--data-scales", "0.5,x"], "argument --data-scales: 'x' is not a number"),
    (["--quick", "--data-scales", "2"], "at least 3 distinct budgets"),
])
def test_cli_bad_input_is_one_line_before_training(tmp_path, args, message):
    result = cli("--out", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_quick_sweep_end_to_end_and_rerun_skips(tmp_path):
    out = tmp_path / "quick"
    result = cli("--out", str(out), "--quick")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_runs(out)
    n_runs = len(plan(["attention"], QUICK_SIZES, QUICK_DATA_SIZES, QUICK))
    assert [r["status"] for r in rows] == ["ok"] * n_runs
    assert all(r["flops"] == pytest.approx(r["curve"][-1][1]) and r["tokens"] == r["curve"][-1][0] for r in rows)
    assert all(r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"])) for r in rows)
    fit = json.loads((out / "fit.json").read_text())
    assert fit["runs"] == len(QUICK_SIZES) and fit["alpha_N"] > 0 and fit["N_c"] > 0
    assert len(fit["alpha_N_ci95"]) == 2 and fit["frontier"] and len(fit["best_lr"]) == len(QUICK_SIZES)
    assert fit["alpha_D"] > 0 and {"alpha_N", "alpha_D", "N_c", "D_c", "frontier"} <= set(fit["joint"])
    assert "attention: L(N)" in result.stdout and "95% CI" in result.stdout and "joint L(N, D)" in result.stdout
    assert result.stdout.count("perplexity") >= len(QUICK_SIZES) + 1
    for png in ("loss_vs_params.png", "loss_vs_tokens.png", "loss_vs_compute.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    again = cli("--out", str(out), "--quick")
    assert again.returncode == 0 and (again.stdout + again.stderr).count("done before, skipped") == n_runs
    assert len(read_runs(out)) == n_runs


def test_runs_csv_of_another_layout_is_refused(tmp_path):
    (tmp_path / "runs.csv").write_text("run,mixer\nx,attention\n")
    with pytest.raises(ValueError, match="use a new --out directory"):
        read_runs(tmp_path)
