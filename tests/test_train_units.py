"""train.py's pieces one at a time: the learning-rate schedule at its edges, train_step's defaults
and its refusal to step on a non-finite norm, TrainConfig's checks and warnings at their bounds,
the run's setup and resume (settings, seeds, kernels, the data's fingerprint) and its messages in
full. Each test was written against a mutmut survivor: the docstrings say which bug it catches."""
import json
import math
import os

import numpy as np
import pytest

import tinylm.core.optim as optim
import tinylm.train.loop as train
from tinylm import GPT, GPTConfig, Placement
from tinylm.train.checkpoint import STATE, latest_checkpoint
from tinylm.core.optim import Schedule, adamw_init
from tinylm.train.run_log import read_metrics
from tinylm.core.tokenizer import ByteTokenizer
from tinylm.train.loop import (check_out_dir, check_stop_at, data_fingerprint, nan_stop_message, new_run, pretrain,
                          resumed_run, run_dataset, starting_point, train_step)
from tinylm.train.train_config import TrainConfig, default_model, with_settings
from test_pretrain import text_file, tiny  # noqa: F401  (text_file is a fixture)


# ----------------------------------------------------------------------------- schedule
def test_lr_schedule_by_hand_through_warmup_cosine_and_past_the_end():
    """Warm-up 10 of 110 steps, lr 1, min_lr 0.1: linear to 1, cosine to 0.1, then flat at 0.1
    (progress is capped at 1: past max_steps the cosine must not come back up)."""
    at = Schedule(lr=1.0, max_steps=110, warmup_steps=10, min_lr=0.1)
    assert at(0) == pytest.approx(0.1) and at(9) == pytest.approx(1.0) and at(10) == pytest.approx(1.0)
    assert at(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert at(110) == pytest.approx(0.1) and at(200) == pytest.approx(0.1)
    # one step after warm-up: its single cosine step ends at min_lr (no division by a floor of 2)
    assert Schedule(lr=1.0, max_steps=1, warmup_steps=0, min_lr=0.1)(1) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- one step
def tiny_model():
    return GPT(GPTConfig(vocab_size=8, n_ctx=4, n_layer=1, n_head=1, d_model=4, dtype="float64"), seed=0)


def spy_step(monkeypatch, norm=None):
    """Record what train_step hands to the norm, the clip and AdamW (the pieces of optim every layer
    set's step is made of); `norm` replaces the gradient norm."""
    seen = {}

    def grad_norm(grads, squares):
        seen.update(squares=squares)
        return norm if norm is not None else 1.0

    def clip_scale(norm, max_norm):
        seen.update(grad_clip=max_norm)
        return 1.0

    def step(params, grads, state, lr, weight_decay, update):
        seen.update(lr=lr, weight_decay=weight_decay, update=getattr(update, "func", update))
    monkeypatch.setattr(optim, "grad_norm", grad_norm)
    monkeypatch.setattr(optim, "clip_scale", clip_scale)
    monkeypatch.setattr(optim, "adamw_step", step)
    return seen


def test_train_step_defaults_pass_on_clip_decay_mask_and_the_models_update(monkeypatch):
    """Defaults grad_clip 1.0 and weight_decay 0.1 (GPT-2's); given values reach clipping and AdamW;
    the loss mask reaches the loss; AdamW and the norm's Σ g² run the model's own layer set."""
    model, idx, targets = tiny_model(), np.array([[1, 2, 3]]), np.array([[2, 3, 4]])
    seen = spy_step(monkeypatch)
    train_step(model, adamw_init(model.params), idx, targets, Schedule.constant(0.5))
    assert seen == {"grad_clip": 1.0, "lr": 0.5, "weight_decay": 0.1, "update": model.layers.adamw_update,
                    "squares": model.layers.sum_of_squares}
    mask = np.array([[1.0, 0.0, 0.0]])
    loss = train_step(model, adamw_init(model.params), idx, targets, Schedule.constant(0.5), grad_clip=0.25,
                      loss_mask=mask, weight_decay=0.0).loss
    assert seen["grad_clip"] == 0.25 and seen["weight_decay"] == 0.0
    assert loss == pytest.approx(model.loss(idx, targets, mask), rel=1e-12)


@pytest.mark.parametrize("norm", [math.inf, math.nan])
def test_train_step_leaves_the_weights_when_the_norm_is_not_finite(monkeypatch, norm):
    """A finite loss with an infinite or NaN gradient norm must not step either."""
    model = tiny_model()
    seen = spy_step(monkeypatch, norm=norm)
    loss = train_step(model, adamw_init(model.params), np.array([[1, 2]]), np.array([[2, 3]]),
                      Schedule.constant(0.5)).loss
    assert math.isfinite(loss) and "lr" not in seen


# ----------------------------------------------------------------------------- settings
def test_default_model_is_the_documented_built_in_run():
    """4 layers, 128 wide, 4 heads, byte-level, 128 positions (TrainConfig's and README's promise)."""
    assert default_model() == GPTConfig(vocab_size=ByteTokenizer.vocab_size, n_ctx=128, n_layer=4, n_head=4, d_model=128)
    assert TrainConfig().model == default_model()


@pytest.mark.parametrize("change, message", [
    (dict(model=3), "^model must be a GPTConfig, got 3$"),
    (dict(seed=-1), "^seed must be an integer >= 0"),
    (dict(min_lr=-1e-3), r"^min_lr must be a finite number >= 0, got -0.001$"),
    (dict(lr=0.0), r"^lr must be a finite number > 0, got 0.0$"),
    (dict(val_fraction=0.0), r"^val_fraction must be between 0 and 1 \(both excluded\), got 0.0$"),
])
def test_train_config_refuses_each_bad_value_naming_it(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**change)


def test_train_config_accepts_zero_min_lr_and_weight_decay():
    """`>= 0` bounds: a schedule decaying to 0 and no weight decay are legal."""
    cfg = TrainConfig(min_lr=0.0, weight_decay=0.0)
    assert (cfg.min_lr, cfg.weight_decay) == (0.0, 0.0)


def test_warnings_only_past_the_bounds_and_in_full():
    assert TrainConfig(warmup_steps=100, max_steps=100, lr=1e-3, min_lr=1e-3).warnings() == []
    assert TrainConfig(warmup_steps=101, max_steps=100, lr=1e-3, min_lr=2e-3).warnings() == [
        "warmup_steps=101 exceeds max_steps=100: the learning rate never reaches its peak",
        "min_lr=0.002 exceeds lr=0.001: the cosine schedule rises instead of decaying"]


def test_with_settings_refuses_model_as_a_flat_setting():
    """The model is set through its own fields (n_layer, ...), never replaced whole."""
    with pytest.raises(ValueError, match="^unknown setting 'model'$"):
        with_settings(TrainConfig(), {"model": GPTConfig(vocab_size=4)})


def test_stop_at_bounds_are_after_the_current_step_and_at_most_max_steps():
    check_stop_at(10, 5, 10)
    check_stop_at(6, 5, 10)
    with pytest.raises(ValueError, match=r"^stop_at must be in 6..10 \(after the current step 5, at most max_steps\), got 5$"):
        check_stop_at(5, 5, 10)


def test_nan_stop_message_suggests_half_the_rate():
    message = nan_stop_message(math.nan, math.inf, 7, None, "out", 0.003)
    assert message == ("loss became nan (gradient norm inf) at step 7; training stopped before any checkpoint "
                       "was saved; start again with a lower --lr (e.g. --lr 0.0015)")


# ----------------------------------------------------------------------------- data and files
def test_data_fingerprint_does_not_depend_on_the_integer_type():
    """The same ids as int32 or int64 hash alike, so a resume is not refused over a dtype."""
    ids = np.arange(300) % 256
    assert data_fingerprint(ids.astype(np.int32)) == data_fingerprint(ids.astype(np.int64))
    assert data_fingerprint(ids) != data_fingerprint(ids[::-1])


def test_read_metrics_skips_a_torn_line_in_the_middle_and_reads_on(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    assert read_metrics(str(path)) == [{"step": 1}, {"step": 3}]


def test_out_dir_whose_parent_is_not_writable_is_refused(tmp_path, monkeypatch):
    """Root can write anywhere, so os.access is stubbed to say: no write permission."""
    monkeypatch.setattr(train.os, "access", lambda path, mode: not mode & os.W_OK)
    with pytest.raises(ValueError, match="is not a writable directory"):
        check_out_dir(str(tmp_path / "run"))


# ----------------------------------------------------------------------------- runs
def saved_run(tmp_path, text_file):
    out = str(tmp_path / "run")
    pretrain(out, tiny(text_file, 5), progress=False)
    return out


def test_new_run_uses_the_seed_and_kernels_and_refuses_an_existing_run(tmp_path, text_file):
    cfg = with_settings(TrainConfig(), {**tiny(text_file, 5), "seed": 5})
    run = new_run(str(tmp_path / "a"), starting_point(cfg, {}), Placement(kernels=True))   # the simulator (conftest)
    assert run.model.kernels is True
    fresh = GPT(cfg.model, seed=5)
    assert all(np.array_equal(p, fresh.params[k]) for k, p in run.model.params.items())
    out = saved_run(tmp_path, text_file)
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoint at step 5\); pass --resume to "
                                         "continue it or --out to start a new one elsewhere$"):
        new_run(out, starting_point(cfg, {}))


def test_resumed_run_restores_the_saved_state_and_passes_kernels_on(tmp_path, text_file):
    out = saved_run(tmp_path, text_file)
    state = json.load(open(os.path.join(latest_checkpoint(out), STATE)))
    run = resumed_run(out, {}, Placement(kernels=True))
    assert run.model.kernels is True
    assert (run.step, run.loss, run.val_loss, run.data_sha256) == \
        (state["step"], state["loss"], state["val_loss"], state["data_sha256"])
    with pytest.raises(ValueError, match=f"^--resume continues the run saved in {out!r}, which has n_layer=2; "
                                         r"n_layer=3 would change it \(only max_steps, eval_every, "
                                         r"checkpoint_every, lr, min_lr may change\)$"):
        resumed_run(out, {"n_layer": 3})


def test_resumed_run_names_the_state_file_of_a_bad_train_config(tmp_path, text_file):
    out = saved_run(tmp_path, text_file)
    where = os.path.join(latest_checkpoint(out), STATE)
    state = json.load(open(where))
    state["train_config"]["batch_size"] = 0
    json.dump(state, open(where, "w"))
    with pytest.raises(ValueError, match=f"^{where}: train_config"):
        resumed_run(out, {})


def test_run_dataset_refuses_other_data_naming_it_and_splits_at_the_runs_fraction(tmp_path, text_file):
    out = saved_run(tmp_path, text_file)
    run = resumed_run(out, {})
    run.cfg = with_settings(run.cfg, {"val_fraction": 0.3})
    dataset = run_dataset(run)
    assert len(dataset.splits["val"]) == round(len(dataset.ids) * 0.3)
    run.data_sha256 = "0" * 64
    with pytest.raises(ValueError, match=f"^the data \\({text_file}\\) differs from the data this run was "
                                         r"trained on \(its SHA-256 changed\); resuming would not continue the same run$"):
        run_dataset(run)
    run.cfg = with_settings(run.cfg, {"data": None})
    with pytest.raises(ValueError, match=r"^the data \(built-in corpus\) differs"):
        run_dataset(run)
