"""`tinylm pretrain`: train a byte-level GPT on a text file (default: the Python standard
library's own source) with AdamW, warm-up + cosine learning rate and gradient clipping.
Writes checkpoints, metrics.jsonl and (with --plot) loss.png to --out. Ctrl-C saves and exits;
--resume continues bit-for-bit."""
import sys
from dataclasses import fields

DEFAULT_OUT = "runs/default"

# TrainConfig field -> (flag, help)
FLAGS = {
    "data": ("--data", "UTF-8 text file to train on"),
    "n_layer": ("--n-layer", "transformer blocks"),
    "n_head": ("--n-head", "attention heads"),
    "d_model": ("--d-model", "width of the residual stream"),
    "n_ctx": ("--n-ctx", "context length T (tokens per training window)"),
    "batch_size": ("--batch-size", "windows per step"),
    "max_steps": ("--steps", "optimizer steps in the whole schedule (may change on --resume)"),
    "lr": ("--lr", "peak learning rate"),
    "min_lr": ("--min-lr", "learning rate at the end of the cosine decay"),
    "warmup_steps": ("--warmup", "linear warm-up steps"),
    "weight_decay": ("--weight-decay", "AdamW decoupled weight decay"),
    "grad_clip": ("--grad-clip", "clip the global gradient norm to this"),
    "val_fraction": ("--val-fraction", "fraction of the data held out for validation (the end of the text)"),
    "eval_every": ("--eval-every", "steps between validation-loss evaluations"),
    "eval_batches": ("--eval-batches", "batches per validation-loss evaluation"),
    "checkpoint_every": ("--checkpoint-every", "steps between checkpoints"),
    "seed": ("--seed", "seed of the initial weights and of the data order"),
    "dtype": ("--dtype", "float32 or float64"),
}


def add_parser(sub):
    from tinylm.train import TrainConfig
    p = sub.add_parser("pretrain", help="train a model on text (default: built-in corpus), with checkpoints",
                       description=__doc__)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"run directory (default {DEFAULT_OUT})")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly where it stopped")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="save and stop after this step, keeping the --steps schedule (resume later)")
    p.add_argument("--plot", action="store_true", help="write OUT/loss.png (train and validation loss)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu (NumPy) or cuda (CuPy, every layer on the Numba kernels)")
    p.add_argument("--no-kernels", dest="kernels", action="store_false", default=None,
                   help="with --device cuda: run every layer on CuPy/cuBLAS instead of the Numba kernels (the baseline)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    types = {"data": str, "lr": float, "min_lr": float, "weight_decay": float, "grad_clip": float,
             "val_fraction": float, "dtype": str}
    for name, (flag, text) in FLAGS.items():
        default = "the built-in standard-library corpus" if defaults[name] is None else defaults[name]
        p.add_argument(flag, dest=name, type=types.get(name, int), default=None, help=f"{text} (default {default})")
    p.set_defaults(func=run)


def run(args):
    from tinylm.train import pretrain
    settings = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    result = pretrain(args.out, settings, resume=args.resume, stop_at=args.stop_at, device=args.device,
                      kernels=args.kernels, plot=args.plot, progress=not args.quiet)
    summary = (f"step {result['step']}, "
               + (f"train loss {result['loss']:.4f}, " if result["loss"] is not None else "")
               + (f"validation loss {result['val_loss']:.4f}, " if result["val_loss"] is not None else "")
               + f"{result['elapsed_s']:.0f}s of training; checkpoint {result['checkpoint']}")
    if result["status"] == "interrupted":
        print(f"tinylm pretrain: interrupted at {summary}; continue with "
              f"`tinylm pretrain --resume --out {args.out}`", file=sys.stderr)
        return 130
    print(("stopped at " if result["status"] == "stopped" else "done: ") + summary)
    if args.plot:
        print(f"loss curves: {args.out}/loss.png")
    return 0
