"""Pretraining: next-token prediction with AdamW, warm-up + cosine learning rate and clipping.

lr_at and train_step are the pieces; `pretrain` is the loop built from them (see below).
"""
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
from tqdm import tqdm

from .checkpoint import (LOCK, POINTER, STATE, TMP, RunLock, clean_stale, latest_checkpoint,
                         load_training_checkpoint, no_symlink, read_trainer_state, remove, save_checkpoint)
from .config import GPTConfig, check_int, config_from_dict
from .data import Dataset, load_text
from .metrics import perplexity
from .model import GPT
from .optim import adamw_init, adamw_step, clip_grad_norm
from .tokenizer import ByteTokenizer


def lr_at(step, max_steps, lr, warmup_steps, min_lr):
    """Learning rate for optimizer step `step` (0-based): linear warm-up from lr/warmup_steps to lr
    over warmup_steps steps, then cosine decay from lr to min_lr at max_steps.

    Warm-up: Adam's second-moment estimates are noise for the first steps, so full-size updates
    then can throw the model far off. Cosine: large steps early, fine ones at the end.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def train_step(model, opt_state, idx, targets, lr, grad_clip=1.0, loss_mask=None, weight_decay=0.1):
    """One optimizer step on a batch -> (loss, grad_norm before clipping).

    loss_and_grads -> clip the global gradient norm to grad_clip (None: no clipping) -> AdamW.
    If the loss or the gradient norm is not finite the parameters and optimizer state are left
    untouched (one bad batch must not poison every weight); the caller sees the value and decides.
    """
    loss, grads = model.loss_and_grads(idx, targets, loss_mask)
    norm = clip_grad_norm(grads, grad_clip)
    if math.isfinite(loss) and math.isfinite(norm):
        adamw_step(model.params, grads, opt_state, lr, weight_decay=weight_decay, update=model.layers.adamw_update)
    return loss, norm


# ----------------------------------------------------------------------------- the pretraining loop
def default_model():
    """The built-in run's model: 4 layers, 128 wide, byte-level, 128 positions."""
    return GPTConfig(vocab_size=ByteTokenizer.vocab_size, n_ctx=128, n_layer=4, n_head=4, d_model=128)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's numbers. Saved in each checkpoint; --resume reuses it.

    The defaults are the built-in run: a 4-layer, 128-wide byte-level model on the standard
    library's source, sized to give recognisable Python within 10 minutes on 2 CPU cores."""
    data: str = None                 # UTF-8 text file; None = the built-in corpus (data.py)
    model: GPTConfig = field(default_factory=default_model)
    batch_size: int = 8
    max_steps: int = 1500
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    val_fraction: float = 0.1
    eval_every: int = 250
    eval_batches: int = 8
    checkpoint_every: int = 250
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.model, GPTConfig):
            raise ValueError(f"model must be a GPTConfig, got {self.model!r}")
        for name in ("batch_size", "max_steps", "eval_every", "eval_batches", "checkpoint_every"):
            check_int(name, getattr(self, name))
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_int("seed", self.seed, minimum=0)
        for name, low in (("lr", None), ("min_lr", 0), ("weight_decay", 0), ("grad_clip", None)):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > 0 if low is None else value >= low)):
                raise ValueError(f"{name} must be a finite number {'> 0' if low is None else '>= 0'}, got {value!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1 (both excluded), got {self.val_fraction!r}")

    @classmethod
    def from_dict(cls, obj, where="train_config"):
        return config_from_dict(cls, obj, where)

    def warnings(self):
        """Settings that are legal but almost surely not meant (they train silently otherwise)."""
        notes = []
        if self.warmup_steps > self.max_steps:
            notes.append(f"warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}: the learning "
                         "rate never reaches its peak")
        if self.min_lr > self.lr:
            notes.append(f"min_lr={self.min_lr} exceeds lr={self.lr}: the cosine schedule rises instead of decaying")
        return notes


MODEL_SETTINGS = tuple(f.name for f in fields(GPTConfig) if f.name != "vocab_size")


def with_settings(cfg, settings):
    """cfg with flat settings applied: GPTConfig's names (n_layer, mixer, ...) go to cfg.model,
    the others to cfg itself; an unknown name is a ValueError."""
    model = {k: v for k, v in settings.items() if k in MODEL_SETTINGS}
    own = {k: v for k, v in settings.items() if k not in model}
    unknown = sorted(set(own) - ({f.name for f in fields(TrainConfig)} - {"model"}))
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}")
    return replace(cfg, model=replace(cfg.model, **model), **own)


METRICS = "metrics.jsonl"
PLOT = "loss.png"

# Settings --resume may change: they don't alter the numbers of the steps already planned
# (max_steps does change the cosine schedule from the resume point on; that is the point of it).
# lr and min_lr may change too: lowering them is how a run that diverged goes on from its last
# good checkpoint.
RESUMABLE_CHANGES = ("max_steps", "eval_every", "checkpoint_every", "lr", "min_lr")


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


def estimate_loss(model, dataset, split, batch_size, n_batches, seed=1234):
    """Mean loss over n_batches fixed windows (the same ones at every evaluation, so the curve
    is comparable from one evaluation to the next, and training's data order is untouched)."""
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(n_batches):
        idx, targets = dataset.get_batch(split, batch_size, rng)
        losses.append(model.loss(model.xp.asarray(idx), model.xp.asarray(targets)))
    return float(np.mean(losses))


def data_fingerprint(ids):
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as it happens (tail -f it). On resume,
    lines past the checkpoint's step (written after the last save, then lost) are dropped first."""

    def __init__(self, path, resume_step=None):
        self.path = path
        if resume_step is None or not os.path.isfile(path):
            remove(path)
        else:
            kept = [json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= resume_step]
            tmp = f"{path}{TMP}{os.getpid()}"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, path)
        # O_NOFOLLOW: a link planted at the log's name is refused, never written through
        self.file = os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644), "a")

    def write(self, **record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def read_metrics(path):
    """The records of metrics.jsonl; a line torn by a kill mid-write is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def plot_metrics(metrics_path, png_path):
    """Train and validation loss against step, as a PNG (matplotlib's file-only Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train (per batch)")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{png_path}{TMP}{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)                  # replaces a planted link, never writes through it


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

    def trainer_state(self):
        return {"step": self.step, "train_config": asdict(self.cfg), "data_rng": self.rng.bit_generator.state,
                "data_sha256": self.data_sha256, "tokenizer": ByteTokenizer.name, "loss": self.loss,
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


def new_run(out_dir, cfg, device, kernels=None):
    if latest_checkpoint(out_dir) is not None:
        raise ValueError(f"{out_dir!r} already holds a run (checkpoint at step "
                         f"{read_trainer_state(latest_checkpoint(out_dir))['step']}); pass --resume to "
                         "continue it or --out to start a new one elsewhere")
    model = GPT(cfg.model, seed=cfg.seed, device=device, kernels=kernels)
    return Run(cfg, model, adamw_init(model.params), np.random.default_rng(cfg.seed))


def resumed_run(out_dir, settings, device, kernels=None):
    model, opt_state, state = load_training_checkpoint(out_dir, device, kernels)
    where = os.path.join(latest_checkpoint(out_dir), STATE)
    saved = TrainConfig.from_dict(state["train_config"], f"{where}: train_config")
    if saved.model != model.config:
        raise ValueError(f"{where}: train_config's model ({saved.model}) does not match config.json ({model.config})")
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = state["data_rng"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: key 'data_rng' is not a {type(rng.bit_generator).__name__} state") from None
    return Run(resumed_config(saved, settings, out_dir), model, opt_state, rng,
               state["step"], state["elapsed_s"], state["loss"], state["val_loss"], state["data_sha256"])


def run_dataset(run):
    """A resumed run's data as a Dataset: it must be the very text the run trained on."""
    ids = ByteTokenizer().encode(load_text(run.cfg.data))
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


def pretrain(out_dir, settings=None, resume=False, stop_at=None, device="cpu", plot=False, progress=True,
             kernels=None):
    """Train a new run in out_dir with with_settings(TrainConfig(), settings), or resume the run
    there (settings may then change only RESUMABLE_CHANGES). stop_at: end early after that step,
    with a checkpoint, keeping the schedule planned for max_steps (resume later). Returns a summary
    dict with "status": "done", "stopped" (reached stop_at) or "interrupted" (Ctrl-C), and step /
    losses / checkpoint / elapsed_s. The run holds out_dir's lock throughout: one writer per run.

    Raises ValueError for bad input (before anything is written) and when the loss stops being
    finite (naming the step and the last good checkpoint, which is kept)."""
    settings = dict(settings or {})
    if settings.get("data") is not None:       # absolute, so --resume works from any directory
        settings["data"] = os.path.abspath(settings["data"])
    check_out_dir(out_dir)
    if resume:
        if latest_checkpoint(out_dir) is None:
            raise ValueError(f"cannot resume: {out_dir!r} has no {POINTER} (no checkpoint was saved there)")
    else:
        cfg = with_settings(TrainConfig(), settings)
        check_stop_at(stop_at, 0, cfg.max_steps)
        ids = ByteTokenizer().encode(load_text(cfg.data))
        dataset = Dataset(ids, cfg.model.n_ctx, cfg.val_fraction)   # refuses data too short for a window
        os.makedirs(out_dir, exist_ok=True)    # only now: bad input above leaves no empty run behind
    with RunLock(out_dir):
        clean_stale(out_dir)
        if resume:
            run = resumed_run(out_dir, settings, device, kernels)
            check_stop_at(stop_at, run.step, run.cfg.max_steps)
            dataset = run_dataset(run)
        else:
            run = new_run(out_dir, cfg, device, kernels)
            run.data_sha256 = data_fingerprint(ids)
        return train_loop(run, dataset, out_dir, resume, stop_at, plot, progress)


def train_loop(run, dataset, out_dir, resume, stop_at, plot, progress):
    """The steps of `pretrain`, under its lock: train, log, evaluate, checkpoint."""
    cfg, model = run.cfg, run.model
    ckpt_dir = latest_checkpoint(out_dir)
    log = MetricsLog(os.path.join(out_dir, METRICS), run.step if resume else None)
    tokens_per_step = cfg.batch_size * cfg.model.n_ctx
    status = "done"
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="pretrain", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        with StopFlag() as flag:
            while run.step < cfg.max_steps:
                t0 = time.perf_counter()
                idx, targets = dataset.get_batch("train", cfg.batch_size, run.rng)
                lr = lr_at(run.step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr)
                loss, norm = train_step(model, run.opt_state, model.xp.asarray(idx), model.xp.asarray(targets), lr,
                                        cfg.grad_clip, weight_decay=cfg.weight_decay)
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    raise ValueError(nan_stop_message(loss, norm, run.step + 1, ckpt_dir, out_dir, cfg.lr))
                dt = time.perf_counter() - t0
                run.step, run.loss, run.elapsed_s = run.step + 1, loss, run.elapsed_s + dt
                log.write(step=run.step, loss=loss, lr=lr, grad_norm=norm, tokens_per_s=tokens_per_step / dt,
                          elapsed_s=round(run.elapsed_s, 3))
                if run.step % cfg.eval_every == 0 or run.step == cfg.max_steps:
                    run.val_loss = estimate_loss(model, dataset, "val", cfg.batch_size, cfg.eval_batches)
                    log.write(step=run.step, val_loss=run.val_loss, val_perplexity=perplexity(run.val_loss))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", val=f"{run.val_loss:.3f}" if run.val_loss else "-",
                                tok_s=f"{tokens_per_step / dt:,.0f}")
                if flag.stop or run.step == stop_at:
                    status = "interrupted" if flag.stop else "stopped"
                    break
                if run.step % cfg.checkpoint_every == 0:
                    ckpt_dir = save_checkpoint(out_dir, model, run.opt_state, run.trainer_state())
            ckpt_dir = save_checkpoint(out_dir, model, run.opt_state, run.trainer_state())
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


def resumed_config(saved, given, out_dir):
    """The saved TrainConfig, with the few settings --resume may change taken from `given` (only
    the fields the user set explicitly are passed in; others would change the run's numbers)."""
    changed = with_settings(saved, given)
    before, after = flat_settings(saved), flat_settings(changed)
    refused = sorted(k for k in before if before[k] != after[k] and k not in RESUMABLE_CHANGES)
    if refused:
        k = refused[0]
        raise ValueError(f"--resume continues the run saved in {out_dir!r}, which has {k}={before[k]!r}; "
                         f"{k}={after[k]!r} would change it (only {', '.join(RESUMABLE_CHANGES)} may change)")
    return changed


def flat_settings(cfg):
    """A TrainConfig as one flat dict, its model's fields beside its own (as the flags see it)."""
    return {**{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "model"}, **asdict(cfg.model)}
