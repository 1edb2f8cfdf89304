"""The scaling-law sweep (tinylm/scaling.py, `tinylm scaling`): the fits recover known laws, the
frontier is the lower envelope, finished runs survive failures and interruptions and are skipped
on a rerun, bad input fails before any training, and --quick runs end to end."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tinylm import count_params
from tinylm import scaling
from tinylm.scaling import (DEFAULT_SIZES, QUICK_SIZES, SweepSettings, check_sweep, fit_sweep, fit_with_irreducible,
                            frontier, model_config, power_law_fit, read_runs, sweep)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "def f(x):\n    return x + 1\n" * 200              # ~6 kB: enough for tiny runs
TINY = SweepSettings(tokens=10 * 2 * 8, n_ctx=8, batch_size=2, eval_points=2, eval_batches=1)
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


# ---------------------------------------------------------------- runs survive
def fail_on(monkeypatch, d_model, exception):
    """train_run raising `exception` for the size with this d_model; returns the list of sizes trained."""
    trained = []

    def train_run(config, dataset, settings):
        trained.append((config.n_layer, config.d_model))
        if config.d_model == d_model:
            raise exception
        return TRAIN_RUN(config, dataset, settings)
    monkeypatch.setattr(scaling, "train_run", train_run)
    return trained


def test_a_failed_run_is_recorded_the_sweep_goes_on_and_a_rerun_retries_only_it(tmp_path, monkeypatch):
    trained = fail_on(monkeypatch, 4, FloatingPointError("validation loss is nan"))
    rows = sweep(tmp_path, ["attention"], TINY_SIZES, TINY, text=TEXT, progress=lambda m: None)
    assert trained == list(TINY_SIZES)
    assert [r["status"] for r in rows] == ["failed", "ok", "ok"]
    assert "FloatingPointError: validation loss is nan" in rows[0]["error"]
    finished = {r["run"]: r for r in rows if r["status"] == "ok"}
    assert all(math.isfinite(r["val_loss"]) and len(r["curve"]) >= 2 for r in finished.values())

    trained = fail_on(monkeypatch, None, None)
    rows = sweep(tmp_path, ["attention"], TINY_SIZES, TINY, text=TEXT, progress=lambda m: None)
    assert trained == [(1, 4)]                                  # only the failed run again
    assert [r["status"] for r in rows] == ["failed", "ok", "ok", "ok"]
    for r in rows[1:3]:                                         # the finished rows are untouched
        assert r == finished[r["run"]]
    assert set(fit_sweep(rows, ["attention"])) == {"attention"}


def test_an_interrupted_sweep_keeps_its_finished_runs(tmp_path, monkeypatch):
    fail_on(monkeypatch, 8, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        sweep(tmp_path, ["ssm"], TINY_SIZES, TINY, text=TEXT, progress=lambda m: None)
    assert [(r["mixer"], r["d_model"], r["status"]) for r in read_runs(tmp_path)] == [("ssm", 4, "ok")]
    trained = fail_on(monkeypatch, None, None)
    sweep(tmp_path, ["ssm"], TINY_SIZES, TINY, text=TEXT, progress=lambda m: None)
    assert trained == [(1, 8), (2, 8)]
    with open(tmp_path / "runs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3


def test_a_changed_setting_is_a_new_run(tmp_path):
    sweep(tmp_path, ["attention"], TINY_SIZES, TINY, text=TEXT, progress=lambda m: None)
    more = SweepSettings(**{**TINY.__dict__, "lr": 1e-3})
    rows = sweep(tmp_path, ["attention"], TINY_SIZES, more, text=TEXT, progress=lambda m: None)
    assert len(rows) == 6 and len({r["run"] for r in rows}) == 6


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("mixers, sizes, settings, message", [
    (["rnn"], TINY_SIZES, TINY, r"mixer must be one of \('attention', 'ssm'\)"),
    (["attention"], ((1, 8), (1, 8), (2, 8)), TINY, "at least 3 distinct sizes"),
    (["attention"], ((1, 8), (1, 24), (2, 8)), TINY, "d_model=24"),
    (["attention"], ((0, 8), (1, 16), (2, 8)), TINY, "n_layer=0"),
    (["attention"], TINY_SIZES, SweepSettings(tokens=100, n_ctx=8, batch_size=2), "only 6 steps"),
    (["attention"], TINY_SIZES, SweepSettings(lr=-1.0), "lr must be > 0"),
])
def test_bad_sweep_requests(mixers, sizes, settings, message):
    with pytest.raises(ValueError, match=message):
        check_sweep(mixers, sizes, settings)


def test_context_longer_than_the_data_fails_before_training(tmp_path, monkeypatch):
    trained = fail_on(monkeypatch, None, None)
    with pytest.raises(ValueError, match="too short"):
        sweep(tmp_path, ["attention"], TINY_SIZES, SweepSettings(tokens=10**6, n_ctx=4096, batch_size=1),
              text=TEXT, progress=lambda m: None)
    assert trained == [] and not (tmp_path / "runs.csv").exists()


def cli(*args):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "tinylm", "scaling", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["--mixer", "rnn"], "mixer must be one of"),
    (["--sizes", "1x16,2-32"], "--sizes must look like"),
    (["--quick", "--tokens", "1000"], "need at least 10 steps"),
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
    assert [r["status"] for r in rows] == ["ok"] * len(QUICK_SIZES)
    assert all(r["flops"] == pytest.approx(r["curve"][-1][1]) and r["tokens"] == r["curve"][-1][0] for r in rows)
    fit = json.loads((out / "fit.json").read_text())
    assert fit["runs"] == len(QUICK_SIZES) and fit["alpha_N"] > 0 and fit["N_c"] > 0
    assert len(fit["alpha_N_ci95"]) == 2 and fit["frontier"]
    assert "attention: α_N = " in result.stdout and "95% CI" in result.stdout
    for png in ("loss_vs_params.png", "loss_vs_compute.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    again = cli("--out", str(out), "--quick")
    assert again.returncode == 0 and (again.stdout + again.stderr).count("done before, skipped") == len(QUICK_SIZES)
    assert len(read_runs(out)) == len(QUICK_SIZES)
