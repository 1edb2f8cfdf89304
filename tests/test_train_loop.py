"""pretrain's loop as a user sees it: each metrics.jsonl record taken from the step itself, the
evaluations' schedule, the progress bar (its counts, postfix and width), Ctrl-C, the NaN stop's
message, the metrics log's file, the loss plot, and what pretrain hands on (data path, val_fraction,
kernels, stop_at, its defaults). Every run here is a 2-layer, 16-wide model for a few steps."""
import inspect
import json
import math
import os
import re
import signal
import struct
import types

import numpy as np
import pytest

import tinylm.train.loop as train
from tinylm import GPT, Placement
from tinylm.train.checkpoint import latest_checkpoint, load_model
from tinylm.train.data import Dataset
from tinylm.core.tokenizer import ByteTokenizer
from tinylm.train.metrics import estimate_loss
from tinylm.core.optim import Schedule
from tinylm.train.run_log import METRICS, PLOT, plot_metrics, read_metrics
from tinylm.train.loop import StopFlag, pretrain
from tinylm.train.train_config import TrainConfig
from test_pretrain import TINY, text_file, tiny  # noqa: F401, E402  (text_file is a fixture)

TOKENS_PER_STEP = TINY["batch_size"] * TINY["n_ctx"]


def records(out):
    return read_metrics(os.path.join(str(out), METRICS))


def step_records(out):
    return [r for r in records(out) if "loss" in r]


def eval_records(out):
    return [r for r in records(out) if "val_loss" in r]


class FakeClock:
    """Stands in for time.perf_counter in tinylm.train.loop: step k starts at 5000 + k and lasts
    0.01234567·(1 + k mod 3) seconds, so every number derived from the step time is known."""

    def __init__(self):
        self.values = []
        for k in range(100):
            start = 5000.0 + k
            self.values += [start, start + 0.01234567 * (1 + k % 3)]
        self.calls = 0

    def perf_counter(self):
        self.calls += 1
        return self.values[self.calls - 1]

    def dt(self, k):                           # step k's duration as the loop computes it (0-based)
        return self.values[2 * k + 1] - self.values[2 * k]


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


@pytest.fixture
def steps_seen(monkeypatch):
    """Records every train_step call: its arguments (defaults filled in) and what it returned."""
    real, calls = train.train_step, []
    signature = inspect.signature(real)

    def recording(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        result = real(*args, **kwargs)
        calls.append({**bound.arguments, "loss": result.loss, "norm": result.grad_norm, "lr": result.lr})
        return result
    monkeypatch.setattr(train, "train_step", recording)
    return calls


# ----------------------------------------------------------------------------- metrics.jsonl
def test_each_step_record_holds_that_steps_lr_grad_norm_loss_and_timing(tmp_path, text_file, clock, steps_seen):
    """A step's record must describe that step: the lr and batch it trained with, the gradient
    norm train_step returned, tokens/s = batch_size·n_ctx / the step's seconds, and elapsed_s the
    running sum of step times rounded to milliseconds."""
    out = str(tmp_path / "run")
    pretrain(out, tiny(text_file, max_steps=7), progress=False)
    recs = step_records(out)
    assert [r["step"] for r in recs] == list(range(1, 8)) and len(steps_seen) == 7
    elapsed, sums = 0.0, []
    for k, (r, call) in enumerate(zip(recs, steps_seen)):
        dt = clock.dt(k)
        elapsed += dt
        sums.append(elapsed)
        assert r["loss"] == call["loss"] and r["grad_norm"] == call["norm"] > 0
        assert r["lr"] == call["lr"] == Schedule(TINY["lr"], 7, TINY["warmup_steps"], TrainConfig().min_lr)(k)
        assert r["tokens_per_s"] == TOKENS_PER_STEP / dt           # 64 tokens in ~0.012-0.037 s
        assert 1000 < r["tokens_per_s"] < 6000
        assert r["elapsed_s"] == round(elapsed, 3)
    assert any(round(e, 3) != round(e, 4) for e in sums)          # the rounding is visible in these times
    assert clock.calls == 14                   # two clock reads per step, nothing else timed
    assert [r["elapsed_s"] for r in recs] == sorted(r["elapsed_s"] for r in recs)


def test_train_step_gets_the_runs_grad_clip_and_weight_decay(tmp_path, text_file, steps_seen):
    """Settings other than the defaults reach every optimizer step (a dropped argument would fall
    back to train_step's own defaults, 1.0 and 0.1)."""
    out = str(tmp_path / "run")
    pretrain(out, tiny(text_file, max_steps=3, grad_clip=0.5, weight_decay=0.05), progress=False)
    assert [(c["grad_clip"], c["weight_decay"]) for c in steps_seen] == [(0.5, 0.05)] * 3


def test_evaluations_run_every_eval_every_steps_and_at_max_steps(tmp_path, text_file):
    """eval_every=3 over 7 steps: validation at 3, 6 and the last step 7; val_perplexity is
    exp(val_loss), and the last val_loss is the final model's loss on the validation split."""
    out = str(tmp_path / "run")
    result = pretrain(out, tiny(text_file, max_steps=7, eval_every=3), progress=False)
    evals = eval_records(out)
    assert [r["step"] for r in evals] == [3, 6, 7]
    for r in evals:
        assert isinstance(r["val_loss"], float) and r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]),
                                                                                         rel=1e-12)
    model = load_model(out)[0]
    dataset = Dataset(ByteTokenizer().encode(open(text_file).read()), TINY["n_ctx"], 0.1)
    expected = estimate_loss(model, dataset, "val", TINY["batch_size"], TINY["eval_batches"])
    assert evals[-1]["val_loss"] == pytest.approx(expected, rel=1e-6) == result["val_loss"]


def test_dataset_split_uses_the_runs_val_fraction(tmp_path, text_file):
    """val_fraction=0.3: the validation loss is measured on the last 30% of the text."""
    out = str(tmp_path / "run")
    result = pretrain(out, tiny(text_file, max_steps=3, val_fraction=0.3), progress=False)
    model = load_model(out)[0]
    ids = ByteTokenizer().encode(open(text_file).read())
    on_30 = estimate_loss(model, Dataset(ids, TINY["n_ctx"], 0.3), "val", TINY["batch_size"], TINY["eval_batches"])
    on_10 = estimate_loss(model, Dataset(ids, TINY["n_ctx"], 0.1), "val", TINY["batch_size"], TINY["eval_batches"])
    assert on_30 != on_10 and result["val_loss"] == pytest.approx(on_30, rel=1e-6)


def test_resumed_run_appends_to_the_metrics_log(tmp_path, text_file):
    """Resuming keeps the records of the steps already done and adds the new ones after them."""
    out = str(tmp_path / "run")
    pretrain(out, tiny(text_file, max_steps=6, checkpoint_every=3), stop_at=3, progress=False)
    before = records(out)
    pretrain(out, {}, resume=True, progress=False)
    after = records(out)
    assert after[:len(before)] == before and [r["step"] for r in after if "loss" in r] == list(range(1, 7))


def test_new_run_replaces_a_leftover_metrics_log_without_reading_it(tmp_path, text_file):
    """A run that failed before its first checkpoint leaves metrics.jsonl but no checkpoint; a new
    run there starts the log afresh, whatever the old file held (it is never parsed)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / METRICS).write_text(json.dumps({"step": 1, "loss": 9.9}) + "\n" + json.dumps({"note": "not a step"}) + "\n")
    pretrain(str(out), tiny(text_file, max_steps=3), progress=False)
    recs = records(out)
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3] and 9.9 not in [r.get("loss") for r in recs]
    assert all("note" not in r for r in recs)


def test_resume_without_a_metrics_log_starts_one(tmp_path, text_file):
    """metrics.jsonl deleted between runs: resuming creates it again with the new steps only."""
    out = str(tmp_path / "run")
    pretrain(out, tiny(text_file, max_steps=5, checkpoint_every=3), stop_at=3, progress=False)
    os.remove(os.path.join(out, METRICS))
    pretrain(out, {}, resume=True, progress=False)
    assert [r["step"] for r in step_records(out)] == [4, 5]


def test_metrics_log_is_created_rw_r_r(tmp_path, text_file):
    """The log is created with mode 0644 (under umask 022): readable, never executable."""
    out = str(tmp_path / "run")
    old = os.umask(0o022)
    try:
        pretrain(out, tiny(text_file, max_steps=1), progress=False)
    finally:
        os.umask(old)
    assert os.stat(os.path.join(out, METRICS)).st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------- the progress bar
def bar_lines(err):
    """The bar's successive states: tqdm rewrites its line after a carriage return."""
    return [s.rstrip() for s in re.split(r"[\r\n]", err) if s.strip()]


def count(line):
    n, total = re.search(r"\| *(\d+)/(\d+) \[", line).groups()
    return int(n), int(total)


def postfix(line):
    """tqdm's postfix, 'key=value' after the rate, as a dict (tok_s's thousands commas kept)."""
    tail = re.split(r"(?:step/s|s/step), ", line, maxsplit=1)[1]
    assert tail.endswith("]")
    return dict(pair.split("=", 1) for pair in tail[:-1].split(", "))


def test_progress_bar_of_a_resumed_run_counts_from_the_resumed_step_to_max_steps(tmp_path, text_file, capsys):
    """pretrain shows a bar by default: 'pretrain', counting steps, starting at the step the run
    resumes from (4/8, 50%) and moving one step at a time to max_steps."""
    out = str(tmp_path / "run")
    pretrain(out, tiny(text_file, max_steps=8, checkpoint_every=4), stop_at=4, progress=False)
    capsys.readouterr()
    pretrain(out, {}, resume=True)                     # progress left at its default
    lines = bar_lines(capsys.readouterr().err)
    assert lines and all(line.startswith("pretrain: ") for line in lines)
    assert lines[0].startswith("pretrain:  50%|") and lines[0].endswith("| 4/8 [00:00<?, ?step/s]")
    counts = [count(line) for line in lines]
    assert {total for _, total in counts} == {8}
    seen = [n for i, (n, _) in enumerate(counts) if i == 0 or n != counts[i - 1][0]]
    assert seen == [4, 5, 6, 7, 8]
    assert all(re.search(r"\d step/s|\ds/step|\dstep/s", line) for line in lines[1:])


def test_progress_bar_postfix_shows_the_steps_loss_last_val_loss_and_tokens_per_second(
        tmp_path, text_file, capsys, clock):
    """After each step the bar shows that step's loss (3 decimals), the latest validation loss
    ('-' before the first evaluation) and tokens/s of the step, with thousands separators."""
    out = str(tmp_path / "run")
    pretrain(out, tiny(text_file, max_steps=6, eval_every=3), progress=True)
    lines = bar_lines(capsys.readouterr().err)
    losses = [r["loss"] for r in step_records(out)]
    val = {r["step"]: r["val_loss"] for r in eval_records(out)}
    assert sorted(val) == [3, 6]
    for step in range(1, 7):
        last = [line for line in lines if count(line)[0] == step][-1]
        shown_val = "-" if step < 3 else f"{val[3 if step < 6 else 6]:.3f}"
        assert postfix(last) == {"loss": f"{losses[step - 1]:.3f}", "val": shown_val,
                                 "tok_s": f"{TOKENS_PER_STEP / clock.dt(step - 1):,.0f}"}
    assert "," in postfix(last)["tok_s"]                   # 64 tokens in 0.012 s: thousands


def test_no_progress_bar_when_progress_is_false(tmp_path, text_file, capsys):
    """progress=False (a log file, --quiet): nothing at all on stderr."""
    out = str(tmp_path / "run")
    pretrain(out, tiny(text_file, max_steps=3), progress=False)
    assert capsys.readouterr().err == ""


def test_progress_bar_follows_the_terminal_width_as_it_changes(tmp_path, text_file, capfd, monkeypatch, steps_seen):
    """A terminal narrowed mid-run (a resized window) gets narrower bar lines from then on,
    instead of lines as wide as the terminal was at the start, which would wrap."""
    width = [120]
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((width[0], 40)))
    real_step = train.train_step

    def narrowing(*args, **kwargs):
        result = real_step(*args, **kwargs)
        if len(steps_seen) == 2:
            width[0] = 60
        return result
    monkeypatch.setattr(train, "train_step", narrowing)
    out = str(tmp_path / "run")
    pretrain(out, tiny(text_file, max_steps=5), progress=True)
    monkeypatch.undo()
    lines = bar_lines(capfd.readouterr().err)
    early = [line for line in lines if count(line)[0] < 2]
    late = [line for line in lines if count(line)[0] > 2]
    assert early and late
    assert all(len(line) == 119 for line in early)         # tqdm leaves the terminal's last column free
    assert all(len(line) <= 59 for line in late)


# ----------------------------------------------------------------------------- Ctrl-C and stopping
def test_stop_flag_turns_the_first_ctrl_c_into_a_flag_and_the_second_into_keyboard_interrupt():
    """Inside StopFlag the first SIGINT only sets stop (False -> True); the second raises
    KeyboardInterrupt at once; leaving restores the handler that was there before."""
    before = signal.getsignal(signal.SIGINT)
    with StopFlag() as flag:
        assert flag.stop is False
        signal.raise_signal(signal.SIGINT)
        assert flag.stop is True
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_finishes_the_step_saves_and_reports_interrupted(tmp_path, text_file, monkeypatch, steps_seen):
    """Ctrl-C during step 3: the step completes, a checkpoint at step 3 is saved and the status is
    'interrupted' (not 'stopped', which means stop_at was reached)."""
    recording = train.train_step

    def interrupted(*args, **kwargs):
        result = recording(*args, **kwargs)
        if len(steps_seen) == 3:
            signal.raise_signal(signal.SIGINT)
        return result
    monkeypatch.setattr(train, "train_step", interrupted)
    out = str(tmp_path / "run")
    result = pretrain(out, tiny(text_file, max_steps=8), progress=False)
    assert result["status"] == "interrupted" and result["step"] == 3 and len(steps_seen) == 3
    assert result["checkpoint"] == latest_checkpoint(out) and latest_checkpoint(out).endswith("ckpt-0000003")
    assert load_model(out)[2]["step"] == 3


def test_stop_at_on_resume_is_checked_against_the_resumed_step_and_max_steps(tmp_path, text_file):
    """Resumed at step 4 of 8: stop_at 6 stops there; then stop_at must lie in 7..8."""
    out = str(tmp_path / "run")
    pretrain(out, tiny(text_file, max_steps=8, checkpoint_every=4), stop_at=4, progress=False)
    result = pretrain(out, {}, resume=True, stop_at=6, progress=False)
    assert result["status"] == "stopped" and result["step"] == 6
    for bad in (6, 9):
        with pytest.raises(ValueError, match=re.escape(f"stop_at must be in 7..8 (after the current step 6, at most "
                                                       f"max_steps), got {bad}")):
            pretrain(out, {}, resume=True, stop_at=bad, progress=False)
    assert load_model(out)[2]["step"] == 6


# ----------------------------------------------------------------------------- the NaN stop
def test_nan_after_resume_names_the_checkpoint_resumed_from_the_norm_and_out_dir(tmp_path, text_file, monkeypatch,
                                                                                   steps_seen):
    """Resumed from step 5, the loss turns NaN at step 7, before any new save: the message names
    the checkpoint the run resumed from (still the last good one), the step's gradient norm and
    the --out to resume with."""
    out = str(tmp_path / "run")
    pretrain(out, tiny(text_file, max_steps=20), stop_at=5, progress=False)
    good = latest_checkpoint(out)
    original, calls = GPT.device_loss_and_grads, []

    def poisoned(self, idx, targets, loss_mask=None, dropout=None):
        loss, grads = original(self, idx, targets, loss_mask, dropout)
        calls.append(1)
        return (float("nan") if len(calls) == 2 else loss), grads
    monkeypatch.setattr(GPT, "device_loss_and_grads", poisoned)   # what train_step calls
    with pytest.raises(ValueError) as error:
        pretrain(out, {}, resume=True, progress=False)
    norm = steps_seen[-1]["norm"]
    assert math.isfinite(norm)
    assert str(error.value) == (
        f"loss became nan (gradient norm {norm}) at step 7; training stopped; the last good checkpoint, {good}, is "
        f"kept: continue from it with a lower peak rate, `tinylm pretrain --resume --out {out} --lr 0.0015`")
    assert latest_checkpoint(out) == good


# ----------------------------------------------------------------------------- what pretrain hands on
def test_relative_data_path_is_saved_absolute_so_resume_works_from_elsewhere(tmp_path, text_file, monkeypatch):
    """--data given relative to the working directory is stored absolute in the checkpoint;
    resuming from another directory then finds the same text."""
    monkeypatch.chdir(os.path.dirname(text_file))
    pretrain("run", tiny(os.path.basename(text_file), max_steps=4, checkpoint_every=2), stop_at=2, progress=False)
    assert load_model("run")[2]["train_config"]["data"] == text_file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = pretrain(os.path.join(os.path.dirname(text_file), "run"), {}, resume=True, progress=False)
    assert result["status"] == "done" and result["step"] == 4


def test_kernels_reach_the_model_of_a_new_and_a_resumed_run(tmp_path, text_file, monkeypatch):
    """kernels=True builds the model on the Numba kernels (the CUDA simulator on CPU), for a new run
    and for a resumed one; not passing it leaves the device's default (off on CPU)."""
    out = str(tmp_path / "run")
    pretrain(out, tiny(text_file, max_steps=4, checkpoint_every=2), stop_at=2, progress=False)
    monkeypatch.setattr(train, "train_loop", lambda run, *args: run)      # the run as built, no steps
    assert pretrain(out, {}, resume=True, placement=Placement(kernels=True)).model.kernels is True
    assert pretrain(out, {}, resume=True).model.kernels is False
    fresh = str(tmp_path / "fresh")
    assert pretrain(fresh, tiny(text_file, max_steps=4), placement=Placement(kernels=True)).model.kernels is True
    assert pretrain(str(tmp_path / "fresh2"), tiny(text_file, max_steps=4)).model.kernels is False


# ----------------------------------------------------------------------------- the loss plot
def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_no_plot_unless_asked(tmp_path, text_file):
    """pretrain's plot defaults to off: no loss.png."""
    out = str(tmp_path / "run")
    pretrain(out, tiny(text_file, max_steps=2), progress=False)
    assert not os.path.exists(os.path.join(out, PLOT))


def test_plot_reads_the_runs_own_metrics_whatever_the_working_directory(tmp_path, text_file, monkeypatch):
    """plot=True writes out_dir/loss.png from out_dir/metrics.jsonl, with the working directory
    elsewhere (and holding no metrics.jsonl)."""
    out = str(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    pretrain(out, tiny(text_file, max_steps=3), progress=False, plot=True)
    assert png_size(os.path.join(out, PLOT)) == (700, 400)
    assert os.listdir(elsewhere) == []


@pytest.fixture
def metrics_file(tmp_path):
    path = tmp_path / METRICS
    lines = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 7)]
    lines.insert(3, {"step": 3, "val_loss": 4.8, "val_perplexity": math.exp(4.8)})
    lines.append({"step": 6, "val_loss": 4.5, "val_perplexity": math.exp(4.5)})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(path)


def test_plot_draws_train_loss_thin_and_validation_as_dots_with_labels(metrics_file, tmp_path, monkeypatch):
    """The figure: per-batch train loss as a thin translucent line, validation loss as dots joined
    by a line, a legend naming both, axis labels, a faint grid."""
    import matplotlib.pyplot as plt
    real, made = plt.subplots, []

    def keep(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]
    monkeypatch.setattr(plt, "subplots", keep)
    png = str(tmp_path / "loss.png")
    plot_metrics(metrics_file, png)
    (fig, ax), = made
    train_line, val_line = ax.get_lines()
    assert list(train_line.get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(train_line.get_ydata()) == [5.0 - 0.1 * s for s in range(1, 7)]
    assert (train_line.get_linewidth(), train_line.get_alpha(), train_line.get_label()) == (0.8, 0.7,
                                                                                           "train (per batch)")
    assert train_line.get_marker() in ("None", None, "")
    assert list(val_line.get_xdata()) == [3, 6] and list(val_line.get_ydata()) == [4.8, 4.5]
    assert (val_line.get_marker(), val_line.get_linestyle(), val_line.get_label()) == ("o", "-", "validation")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train (per batch)", "validation"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "cross-entropy (nats per token)")
    grid = ax.xaxis.get_gridlines()[0]
    assert grid.get_visible() and grid.get_alpha() == 0.3
    (ppl,) = ax.child_axes                                    # perplexity: exp of the loss scale
    assert ppl.get_ylabel() == "perplexity"
    assert ppl._functions[0](4.5) == pytest.approx(math.exp(4.5)) and ppl._functions[1](math.exp(4.8)) == pytest.approx(4.8)
    assert [t.get_text() for t in ax.texts] == [f"perplexity {math.exp(4.5):.2f}"]
    assert not plt.fignum_exists(fig.number)                  # closed: a long session doesn't pile them up
    assert png_size(png) == (700, 400)


def test_plot_is_700_by_400_pixels_whatever_matplotlibrc_says(metrics_file, tmp_path):
    """The PNG's size is the code's 7x4 inches at 100 dpi, not the user's figure/savefig defaults."""
    import matplotlib
    png = str(tmp_path / "loss.png")
    with matplotlib.rc_context({"figure.figsize": (3, 2), "figure.dpi": 50, "savefig.dpi": 50}):
        plot_metrics(metrics_file, png)
    assert png_size(png) == (700, 400)
    assert sorted(os.listdir(tmp_path)) == ["loss.png", METRICS]      # no temporary file left
