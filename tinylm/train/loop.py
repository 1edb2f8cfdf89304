"""Pretraining: next-token prediction with AdamW, warm-up + cosine learning rate and clipping.

train_step is the step; `pretrain` is the loop built from it (see below). Beside it: its settings
(train_config.py), its evaluation (metrics.estimate_loss), its record (run_log.py: metrics.jsonl
and the plot) and its checkpoints (checkpoint.py).
"""
import hashlib
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from .checkpoint import (LOCK, POINTER, STATE, RunLock, clean_stale, latest_checkpoint, load_model,
                         load_training_checkpoint, no_symlink, read_trainer_state, save_checkpoint)
from .data import Dataset, load_ids
from .metrics import estimate_loss, perplexity
from ..core.model import GPT, Dropout, Placement
from ..core.optim import adamw_init, train_step
from .run_log import METRICS, PLOT, MetricsLog, plot_metrics
from ..core.tokenizer import ByteTokenizer, load_tokenizer, tokenizer_files
from .train_config import SHAPE_SETTINGS, TrainConfig, resumed_config, with_settings


# ----------------------------------------------------------------------------- the pretraining loop
class StopFlag:
    """Ctrl-C during training sets a flag instead of raising, so the step in progress (which
    updates the weights in place) finishes, a checkpoint is saved, and the run exits cleanly.
    A second Ctrl-C raises KeyboardInterrupt at once; the atomic save keeps the last checkpoint."""

    def __init__(self):
        self.stop = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        self.stop = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def data_fingerprint(ids):
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


@dataclass
class Run:
    """A run's state between steps: exactly what a checkpoint holds."""
    cfg: TrainConfig
    model: GPT
    opt_state: dict
    rng: np.random.Generator            # the data order: which windows each step trains on
    step: int = 0
    elapsed_s: float = 0.0              # time inside training steps, summed over resumes
    loss: float = None
    val_loss: float = None
    data_sha256: str = None
    tokenizer: object = field(default_factory=ByteTokenizer)
    tokenizer_files: dict = field(default_factory=dict)     # copied into every checkpoint (BPE's two files)

    def trainer_state(self):
        return {"step": self.step, "train_config": asdict(self.cfg), "data_rng": self.rng.bit_generator.state,
                "data_sha256": self.data_sha256, "tokenizer": self.tokenizer.name, "loss": self.loss,
                "val_loss": self.val_loss, "elapsed_s": self.elapsed_s}


def check_out_dir(out_dir):
    """Before any work: --out must be (or become) a directory we can write, with no links planted
    where the run writes its files."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir!r} is a file, not a directory")
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out_dir!r} cannot be written: {parent!r} is not a writable directory")
    for name in (POINTER, METRICS, PLOT, LOCK):
        no_symlink(os.path.join(out_dir, name))


class Start(NamedTuple):
    """What a new run starts from: its settings (the model's shape filled in), weights (None: GPT-2's
    init at cfg.seed), tokenizer and the tokenizer's files."""
    cfg: TrainConfig
    params: dict
    tokenizer: object
    tokenizer_files: dict


def starting_point(cfg, settings):
    """cfg.init_from's shape, weights and tokenizer (GPT-2 BPE when its directory holds vocab.json +
    merges.txt, else bytes); a shape flag in `settings` that disagrees with it is a ValueError. Without
    init_from: cfg as it is, GPT-2's init and the byte tokenizer."""
    if cfg.init_from is None:
        return Start(cfg, None, ByteTokenizer(), {})
    model, ckpt_dir, _ = load_model(cfg.init_from, dtype=settings.get("dtype"))
    for name in SHAPE_SETTINGS:
        if name in settings and settings[name] != getattr(model.config, name):
            raise ValueError(f"--init-from {cfg.init_from!r} has {name}={getattr(model.config, name)!r}, but "
                             f"{name}={settings[name]!r} was given: the model's shape comes from --init-from "
                             "(drop the flag)")
    return Start(replace(cfg, model=model.config), model.numpy_params(),
                 load_tokenizer(ckpt_dir, model.config.vocab_size), tokenizer_files(ckpt_dir))


def new_run(out_dir, start, placement=Placement()):
    if latest_checkpoint(out_dir) is not None:
        raise ValueError(f"{out_dir!r} already holds a run (checkpoint at step "
                         f"{read_trainer_state(latest_checkpoint(out_dir))['step']}); pass --resume to "
                         "continue it or --out to start a new one elsewhere")
    cfg = start.cfg
    model = GPT(cfg.model, seed=cfg.seed, params=start.params, **placement._asdict())
    return Run(cfg, model, adamw_init(model.params), np.random.default_rng(cfg.seed),
               tokenizer=start.tokenizer, tokenizer_files=start.tokenizer_files)


def resumed_run(out_dir, settings, placement=Placement()):
    model, opt_state, state = load_training_checkpoint(out_dir, placement)
    where = os.path.join(latest_checkpoint(out_dir), STATE)
    saved = TrainConfig.from_dict(state["train_config"], f"{where}: train_config")
    if saved.model != model.config:
        raise ValueError(f"{where}: train_config's model ({saved.model}) does not match config.json ({model.config})")
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = state["data_rng"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: key 'data_rng' is not a {type(rng.bit_generator).__name__} state") from None
    ckpt_dir = latest_checkpoint(out_dir)
    return Run(resumed_config(saved, settings, out_dir), model, opt_state, rng,
               state["step"], state["elapsed_s"], state["loss"], state["val_loss"], state["data_sha256"],
               load_tokenizer(ckpt_dir, model.config.vocab_size), tokenizer_files(ckpt_dir))


def run_dataset(run):
    """A resumed run's data as a Dataset: it must be the very text the run trained on."""
    ids = load_ids(run.cfg.data, run.tokenizer)
    fingerprint = data_fingerprint(ids)
    if run.data_sha256 not in (None, fingerprint):
        raise ValueError(f"the data ({run.cfg.data or 'built-in corpus'}) differs from the data this run was "
                         "trained on (its SHA-256 changed); resuming would not continue the same run")
    run.data_sha256 = fingerprint
    return Dataset(ids, run.cfg.model.n_ctx, run.cfg.val_fraction)


def check_stop_at(stop_at, step, max_steps):
    if stop_at is not None and not step < stop_at <= max_steps:
        raise ValueError(f"stop_at must be in {step + 1}..{max_steps} (after the current step {step}, "
                         f"at most max_steps), got {stop_at}")


def pretrain(out_dir, settings=None, resume=False, stop_at=None, placement=Placement(), plot=False, progress=True):
    """Train a new run in out_dir with with_settings(TrainConfig(), settings), or resume the run
    there (settings may then change only RESUMABLE_CHANGES). stop_at: end early after that step,
    with a checkpoint, keeping the schedule planned for max_steps (resume later). Returns a summary
    dict with "status": "done", "stopped" (reached stop_at) or "interrupted" (Ctrl-C), and step /
    losses / checkpoint / elapsed_s. The run holds out_dir's lock throughout: one writer per run.
    placement: the model's device and layer set (model.Placement; with reference=True, on the CPU,
    layers.py's set instead of cpu_layers.py's). Every set reads and writes the same checkpoints, so a run may switch on resume; resume is bit for bit
    within one set at a fixed thread count, while a switch continues within rounding.

    Raises ValueError for bad input (before anything is written) and when the loss stops being
    finite (naming the step and the last good checkpoint, which is kept)."""
    settings = dict(settings or {})
    for name in ("data", "init_from"):         # absolute, so --resume works from any directory
        if settings.get(name) is not None:
            settings[name] = os.path.abspath(settings[name])
    check_out_dir(out_dir)
    if resume:
        if latest_checkpoint(out_dir) is None:
            raise ValueError(f"cannot resume: {out_dir!r} has no {POINTER} (no checkpoint was saved there)")
    else:
        start = starting_point(with_settings(TrainConfig(), settings), settings)
        cfg = start.cfg
        check_stop_at(stop_at, 0, cfg.max_steps)
        ids = load_ids(cfg.data, start.tokenizer)
        dataset = Dataset(ids, cfg.model.n_ctx, cfg.val_fraction)   # refuses data too short for a window
        os.makedirs(out_dir, exist_ok=True)    # only now: bad input above leaves no empty run behind
    with RunLock(out_dir):
        clean_stale(out_dir)
        if resume:
            run = resumed_run(out_dir, settings, placement)
            check_stop_at(stop_at, run.step, run.cfg.max_steps)
            dataset = run_dataset(run)
        else:
            run = new_run(out_dir, start, placement)
            run.data_sha256 = data_fingerprint(ids)
        return train_loop(run, dataset, out_dir, resume, stop_at, plot, progress)


def train_loop(run, dataset, out_dir, resume, stop_at, plot, progress):
    """The steps of `pretrain`, under its lock: train, log, evaluate, checkpoint."""
    cfg, model = run.cfg, run.model
    ckpt_dir = latest_checkpoint(out_dir)
    log = MetricsLog(os.path.join(out_dir, METRICS), run.step if resume else None)
    tokens_per_step, schedule = cfg.batch_size * cfg.model.n_ctx, cfg.schedule()
    # Masks come from the data-order generator, which every checkpoint saves: a resumed run draws
    # the very masks the uninterrupted one would have.
    dropout = Dropout(cfg.dropout, run.rng) if cfg.dropout > 0 else None
    status = "done"
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="pretrain", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        with StopFlag() as flag:
            while run.step < cfg.max_steps:
                t0 = time.perf_counter()
                idx, targets = dataset.get_batch("train", cfg.batch_size, run.rng)
                # Host batches: the model checks them on the host and uploads them (no read back on a GPU).
                result = train_step(model, run.opt_state, idx, targets, schedule,
                                    cfg.grad_clip, weight_decay=cfg.weight_decay, dropout=dropout)
                if not result.stepped:                  # nothing moved: stop, keeping the last good checkpoint
                    raise ValueError(nan_stop_message(result.loss, result.grad_norm, run.step + 1, ckpt_dir, out_dir,
                                                      cfg.lr))
                dt = time.perf_counter() - t0
                run.step, run.loss, run.elapsed_s = run.step + 1, result.loss, run.elapsed_s + dt
                log.write(step=run.step, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm,
                          tokens_per_s=tokens_per_step / dt, elapsed_s=round(run.elapsed_s, 3))
                if run.step % cfg.eval_every == 0 or run.step == cfg.max_steps:
                    run.val_loss = estimate_loss(model, dataset, "val", cfg.batch_size, cfg.eval_batches)
                    log.write(step=run.step, val_loss=run.val_loss, val_perplexity=perplexity(run.val_loss))
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.3f}", val=f"{run.val_loss:.3f}" if run.val_loss else "-",
                                tok_s=f"{tokens_per_step / dt:,.0f}")
                if flag.stop or run.step == stop_at:
                    status = "interrupted" if flag.stop else "stopped"
                    break
                if run.step % cfg.checkpoint_every == 0:
                    ckpt_dir = save_checkpoint(out_dir, model, run.opt_state, run.trainer_state(), run.tokenizer_files)
            ckpt_dir = save_checkpoint(out_dir, model, run.opt_state, run.trainer_state(), run.tokenizer_files)
    finally:
        bar.close()
        log.close()
    if plot:
        plot_metrics(os.path.join(out_dir, METRICS), os.path.join(out_dir, PLOT))
    return {"status": status, "step": run.step, "loss": run.loss, "val_loss": run.val_loss,
            "checkpoint": ckpt_dir, "elapsed_s": run.elapsed_s}


def nan_stop_message(loss, norm, step, ckpt_dir, out_dir, lr):
    """Where training stopped, what is kept, and a command that goes on with a lower lr."""
    stopped = f"loss became {loss} (gradient norm {norm}) at step {step}; training stopped"
    if ckpt_dir is None:
        return f"{stopped} before any checkpoint was saved; start again with a lower --lr (e.g. --lr {lr / 2:g})"
    return (f"{stopped}; the last good checkpoint, {ckpt_dir}, is kept: continue from it with a lower peak rate, "
            f"`tinylm pretrain --resume --out {out_dir} --lr {lr / 2:g}`")


