"""`tinylm info CKPT`: what a checkpoint holds: its config, parameter count, FLOPs per token,
and (for a tinylm run) its step, validation loss, corpus and training settings."""
import argparse

from .pretrain import CORPUS
from .terminal import note


def add_parser(sub):
    p = sub.add_parser("info", help="describe a checkpoint", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="run, checkpoint or Hugging Face directory")
    p.set_defaults(func=run)


def run(args):
    from tinylm import count_params, flops_per_token
    from tinylm.train.checkpoint import STATE, load_model
    from tinylm.train.metrics import loss_text
    from tinylm.train.train_config import TrainConfig, flat_settings
    model, ckpt_dir, state = load_model(args.checkpoint)
    train = state and TrainConfig.from_dict(state["train_config"], f"{ckpt_dir}/{STATE}: train_config")
    cfg = model.config
    n, f = count_params(cfg), flops_per_token(cfg)
    note("info", f"checkpoint {ckpt_dir}")
    print("config: " + " ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    print(f"parameters: {n['total']:,} ({n['non_embedding']:,} non-embedding)")
    print(f"FLOPs per token at T={f['seq_len']}: {f['exact_forward']:,} forward, "
          f"{f['exact_forward_backward']:,} forward+backward")
    if state is None:
        print("training state: none (Hugging Face weights)")
        return 0
    val = "not measured" if state["val_loss"] is None else loss_text(state["val_loss"])
    print(f"step: {state['step']} of {train.max_steps}, validation loss {val}, "
          f"{state['elapsed_s']:.0f}s of training, tokenizer {state['tokenizer']}")
    print(f"corpus: {train.data or CORPUS}")
    print(f"started from: {train.init_from or f'GPT-2 initialisation, seed {train.seed}'}")
    settings = {k: v for k, v in flat_settings(train).items() if k not in cfg.to_dict() and k not in ("data", "init_from")}
    print("training settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return 0
