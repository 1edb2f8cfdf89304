"""Pretraining: next-token prediction with AdamW, warm-up + cosine learning rate and clipping.

lr_at and train_step are the pieces; `pretrain` is the loop built from them (see below).
"""
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
from tqdm import tqdm

from .checkpoint import latest_checkpoint, load_training_checkpoint, read_trainer_state, save_checkpoint
from .config import GPTConfig, check_int
from .data import Dataset, load_text
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
@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's numbers. Saved in each checkpoint; --resume reuses it.

    The defaults are the built-in run: a 4-layer, 128-wide byte-level model on the standard
    library's source, sized to give recognisable Python within 10 minutes on 2 CPU cores."""
    data: str = None                 # UTF-8 text file; None = the built-in corpus (data.py)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    n_ctx: int = 128
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
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("n_layer", "n_head", "d_model", "n_ctx", "batch_size", "max_steps", "eval_every",
                     "eval_batches", "checkpoint_every"):
            check_int(name, getattr(self, name))
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        for name in ("lr", "min_lr", "weight_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a finite number > 0, got {self.grad_clip!r}")

    def model_config(self, vocab_size):
        return GPTConfig(vocab_size=vocab_size, n_ctx=self.n_ctx, n_layer=self.n_layer, n_head=self.n_head,
                         d_model=self.d_model, dtype=self.dtype)


# Settings --resume may change: they don't alter the numbers of the steps already planned
# (max_steps does change the cosine schedule from the resume point on; that is the point of it).
RESUMABLE_CHANGES = ("max_steps", "eval_every", "checkpoint_every")


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
            open(path, "w").close()
        else:
            kept = [json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= resume_step]
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, path)
        self.file = open(path, "a")

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
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


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


def new_run(out_dir, settings, device, kernels=None):
    cfg = TrainConfig(**settings)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir!r} is a file, not a directory")
    if latest_checkpoint(out_dir) is not None:
        raise ValueError(f"{out_dir!r} already holds a run (checkpoint at step "
                         f"{read_trainer_state(latest_checkpoint(out_dir))['step']}); pass --resume to "
                         "continue it or --out to start a new one elsewhere")
    model = GPT(cfg.model_config(ByteTokenizer.vocab_size), seed=cfg.seed, device=device, kernels=kernels)
    return Run(cfg, model, adamw_init(model.params), np.random.default_rng(cfg.seed))


def resumed_run(out_dir, settings, device, kernels=None):
    model, opt_state, state = load_training_checkpoint(out_dir, device, kernels)
    rng = np.random.default_rng()
    rng.bit_generator.state = state["data_rng"]
    return Run(resumed_config(TrainConfig(**state["train_config"]), settings, out_dir), model, opt_state, rng,
               state["step"], state["elapsed_s"], state["loss"], state["val_loss"], state["data_sha256"])


def run_dataset(run):
    """The run's data as a Dataset; a resumed run's data must be the very text it trained on."""
    ids = ByteTokenizer().encode(load_text(run.cfg.data))
    fingerprint = data_fingerprint(ids)
    if run.data_sha256 not in (None, fingerprint):
        raise ValueError(f"the data ({run.cfg.data or 'built-in corpus'}) differs from the data this run was "
                         "trained on (its SHA-256 changed); resuming would not continue the same run")
    run.data_sha256 = fingerprint
    return Dataset(ids, run.cfg.n_ctx, run.cfg.val_fraction)


def pretrain(out_dir, settings=None, resume=False, stop_at=None, device="cpu", plot=False, progress=True,
             kernels=None):
    """Train a new run in out_dir with TrainConfig(**settings), or resume the run there (settings
    may then change only RESUMABLE_CHANGES). stop_at: end early after that step, with a checkpoint,
    keeping the schedule planned for max_steps (resume later). Returns a summary dict with
    "status": "done", "stopped" (reached stop_at) or "interrupted" (Ctrl-C), and step / losses /
    checkpoint / elapsed_s. device and kernels are GPT's (kernels None: the Numba kernels on "cuda").

    Raises ValueError for bad input and when the loss stops being finite (naming the step and
    the last good checkpoint, which is kept)."""
    settings = dict(settings or {})
    if settings.get("data") is not None:       # absolute, so --resume works from any directory
        settings["data"] = os.path.abspath(settings["data"])
    run = resumed_run(out_dir, settings, device, kernels) if resume else new_run(out_dir, settings, device, kernels)
    cfg, model = run.cfg, run.model
    dataset = run_dataset(run)
    if stop_at is not None and not run.step < stop_at <= cfg.max_steps:
        raise ValueError(f"stop_at must be in {run.step + 1}..{cfg.max_steps} (after the current step {run.step}, "
                         f"at most max_steps), got {stop_at}")
    os.makedirs(out_dir, exist_ok=True)        # only now: bad input above leaves no empty run behind
    ckpt_dir = latest_checkpoint(out_dir)
    log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), run.step if resume else None)
    tokens_per_step = cfg.batch_size * cfg.n_ctx
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
                    kept = f"the last good checkpoint, {ckpt_dir}, is kept" if ckpt_dir else "no checkpoint was saved yet"
                    raise ValueError(f"loss became {loss} (gradient norm {norm}) at step {run.step + 1}; training "
                                     f"stopped and {kept}; try a lower --lr")
                dt = time.perf_counter() - t0
                run.step, run.loss, run.elapsed_s = run.step + 1, loss, run.elapsed_s + dt
                log.write(step=run.step, loss=loss, lr=lr, grad_norm=norm, tokens_per_s=tokens_per_step / dt,
                          elapsed_s=round(run.elapsed_s, 3))
                if run.step % cfg.eval_every == 0 or run.step == cfg.max_steps:
                    run.val_loss = estimate_loss(model, dataset, "val", cfg.batch_size, cfg.eval_batches)
                    log.write(step=run.step, val_loss=run.val_loss)
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
        plot_metrics(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "loss.png"))
    return {"status": status, "step": run.step, "loss": run.loss, "val_loss": run.val_loss,
            "checkpoint": ckpt_dir, "elapsed_s": run.elapsed_s}


def resumed_config(saved, given, out_dir):
    """The saved TrainConfig, with the few settings --resume may change taken from `given` (only
    the fields the user set explicitly are passed in; others would change the run's numbers)."""
    changes = {k: v for k, v in given.items() if getattr(saved, k) != v}
    refused = sorted(set(changes) - set(RESUMABLE_CHANGES))
    if refused:
        k = refused[0]
        raise ValueError(f"--resume continues the run saved in {out_dir!r}, which has {k}={getattr(saved, k)!r}; "
                         f"{k}={changes[k]!r} would change it (only {', '.join(RESUMABLE_CHANGES)} may change)")
    return replace(saved, **changes)
