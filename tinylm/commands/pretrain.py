"""`tinylm pretrain`: train a byte-level GPT (attention or a selective state-space mixer) on a
text file (default: the Python standard library's own source) with AdamW, warm-up + cosine
learning rate and gradient clipping, or fine-tune one with --init-from (a Hugging Face GPT-2
directory, a run or a checkpoint: its shape and tokenizer come with it). Writes checkpoints,
metrics.jsonl and (with --plot) loss.png to --out. Ctrl-C saves and exits; --resume continues
bit-for-bit."""
from tinylm.core.config import DTYPES, MIXERS

from .args import add_layer_set_arguments, at_least, placement, positive, rate
from .terminal import note, progress_wanted

DEFAULT_OUT = "runs/default"
CORPUS = "the built-in standard-library corpus"
SHOWN_FOR_NONE = {"data": CORPUS, "init_from": "a new model, GPT-2's initialisation, byte tokenizer"}
# setting (a TrainConfig or GPTConfig field) -> (flag, argparse type, help)
FLAGS = {
    "data": ("--data", str, "UTF-8 text file to train on (tokenized with the model's tokenizer; BPE ids are cached)"),
    "init_from": ("--init-from", str, "start from this model, a Hugging Face GPT-2 directory, a tinylm run or "
                                      "checkpoint: its weights, shape and tokenizer (vocab.json + merges.txt: GPT-2 BPE)"),
    "mixer": ("--mixer", str, "token mixer of each block: attention, or ssm (a Mamba-style selective scan)"),
    "n_layer": ("--n-layer", positive(int), "blocks"),
    "n_head": ("--n-head", positive(int), "attention heads (attention only)"),
    "d_model": ("--d-model", positive(int), "width of the residual stream"),
    "n_ctx": ("--n-ctx", positive(int), "context length T (tokens per training window)"),
    "d_state": ("--d-state", positive(int), "ssm only: state size N per channel"),
    "d_conv": ("--d-conv", positive(int), "ssm only: causal convolution width"),
    "expand": ("--expand", positive(int), "ssm only: inner channels = expand x d_model"),
    "batch_size": ("--batch-size", positive(int), "windows per step"),
    "max_steps": ("--steps", positive(int), "optimizer steps in the whole schedule (may change on --resume)"),
    "lr": ("--lr", positive(float), "peak learning rate (may be lowered on --resume)"),
    "min_lr": ("--min-lr", at_least(0, float), "learning rate at the end of the cosine decay"),
    "warmup_steps": ("--warmup", at_least(0), "linear warm-up steps"),
    "weight_decay": ("--weight-decay", at_least(0, float), "AdamW decoupled weight decay"),
    "grad_clip": ("--grad-clip", positive(float), "clip the global gradient norm to this"),
    "dropout": ("--dropout", rate, "dropout rate in [0, 1) on the embeddings, attention weights and residual "
                                   "branches while training, where GPT-2 has them (never at evaluation or sampling)"),
    "val_fraction": ("--val-fraction", float, "fraction of the data held out for validation, in (0, 1)"),
    "eval_every": ("--eval-every", positive(int), "steps between validation-loss evaluations"),
    "eval_batches": ("--eval-batches", positive(int), "batches per validation-loss evaluation"),
    "checkpoint_every": ("--checkpoint-every", positive(int), "steps between checkpoints"),
    "seed": ("--seed", at_least(0), "seed of the initial weights and of the data order"),
    "dtype": ("--dtype", str, "float32 or float64"),
}
CHOICES = {"mixer": MIXERS, "dtype": DTYPES}


def add_parser(sub):
    from tinylm.train.train_config import TrainConfig, flat_settings
    p = sub.add_parser("pretrain", help="train a model on text (default: built-in corpus), with checkpoints",
                       description=__doc__)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"run directory (default: {DEFAULT_OUT})")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly where it stopped")
    p.add_argument("--stop-at", type=positive(int), metavar="STEP",
                   help="save and stop after this step, keeping the --steps schedule (resume later)")
    p.add_argument("--plot", action="store_true", help="write OUT/loss.png (train and validation loss)")
    add_layer_set_arguments(p, "; a run may switch sets on --resume")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    defaults = flat_settings(TrainConfig())
    for name, (flag, kind, text) in FLAGS.items():
        # default None: only the flags given are passed on, so --resume can tell what the user changed
        shown = SHOWN_FOR_NONE[name] if defaults[name] is None else defaults[name]
        p.add_argument(flag, dest=name, type=kind, default=None, choices=CHOICES.get(name),
                       help=f"{text} (default: {shown})")
    p.set_defaults(func=run)


def run(args):
    from tinylm.train.metrics import loss_text
    from tinylm.train.loop import pretrain
    from tinylm.train.train_config import TrainConfig, with_settings
    settings = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    if not args.resume:
        for warning in with_settings(TrainConfig(), settings).warnings():
            note("pretrain", f"warning: {warning}")
    result = pretrain(args.out, settings, resume=args.resume, stop_at=args.stop_at, placement=placement(args),
                      plot=args.plot, progress=progress_wanted(args.quiet))
    summary = (f"step {result['step']}, "
               + (f"train loss {loss_text(result['loss'])}, " if result["loss"] is not None else "")
               + (f"validation loss {loss_text(result['val_loss'])}, " if result["val_loss"] is not None else "")
               + f"{result['elapsed_s']:.0f}s of training; checkpoint {result['checkpoint']}")
    if result["status"] == "interrupted":
        note("pretrain", f"interrupted at {summary}; continue with `tinylm pretrain --resume --out {args.out}`")
        return 130
    print(("stopped at " if result["status"] == "stopped" else "done: ") + summary)
    if args.plot:
        print(f"loss curves: {args.out}/loss.png")
    return 0
