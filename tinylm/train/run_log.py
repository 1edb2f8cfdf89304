"""A run's record on disk: metrics.jsonl (one JSON object per line, written as training goes) and
loss.png, its plot."""
import json
import os

import numpy as np

from .checkpoint import TMP, remove

METRICS = "metrics.jsonl"
PLOT = "loss.png"


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


def perplexity_of(loss):
    """exp(loss) for the plot's axis (arrays; capped so far-off tick positions do not overflow)."""
    return np.exp(np.minimum(loss, 700.0))


def loss_of(perplexity):
    return np.log(np.maximum(perplexity, 1e-300))


def plot_metrics(metrics_path, png_path):
    """Train and validation loss against step, perplexity on the right-hand scale and beside the last
    validation point, as a PNG (matplotlib's file-only Agg backend)."""
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
    # Perplexity is exp(loss), one number per loss: a second scale on the same curves, not new ones.
    ppl = ax.secondary_yaxis("right", functions=(perplexity_of, loss_of))
    ppl.set_ylabel("perplexity")
    if val:
        step, loss = val[-1]
        ax.annotate(f"perplexity {perplexity_of(loss):.2f}", (step, loss), textcoords="offset points",
                    xytext=(-8, 8), ha="right")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{png_path}{TMP}{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)                  # replaces a planted link, never writes through it




def write_metrics(path, records):
    """records (dicts with a "step") as metrics.jsonl at path, one line each."""
    log = MetricsLog(path)
    for record in records:
        log.write(**record)
    log.close()


def plot_panels(records, panels, png_path):
    """One panel per (title, keys): each key of `records` against step, as a PNG. Keys absent from
    every record are skipped (e.g. clip_fraction for REINFORCE)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(title, [k for k in keys if any(r.get(k) is not None for r in records)]) for title, keys in panels]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            ax.plot(*zip(*[(r["step"], r[key]) for r in records if r.get(key) is not None]), label=key)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{png_path}{TMP}{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
