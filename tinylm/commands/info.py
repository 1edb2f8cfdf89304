"""`tinylm info CKPT`: what a checkpoint holds: its config, parameter count, FLOPs per token,
and (for a tinylm run) its step, validation loss and training settings."""


def add_parser(sub):
    p = sub.add_parser("info", help="describe a checkpoint", description=__doc__)
    p.add_argument("checkpoint", help="run, checkpoint or Hugging Face directory")
    p.set_defaults(func=run)


def run(args):
    from tinylm import count_params, flops_per_token
    from tinylm.checkpoint import load_model
    model, ckpt_dir, state = load_model(args.checkpoint)
    cfg = model.config
    n, f = count_params(cfg), flops_per_token(cfg)
    print(f"checkpoint: {ckpt_dir}")
    print(f"config: vocab_size={cfg.vocab_size} n_ctx={cfg.n_ctx} n_layer={cfg.n_layer} n_head={cfg.n_head} "
          f"d_model={cfg.d_model} dtype={cfg.dtype}")
    print(f"parameters: {n['total']:,} ({n['non_embedding']:,} non-embedding)")
    print(f"FLOPs per token at T={f['seq_len']}: {f['exact_forward']:,} forward, "
          f"{f['exact_forward_backward']:,} forward+backward")
    if state is None:
        print("training state: none (Hugging Face weights)")
        return 0
    val = "not measured" if state["val_loss"] is None else f"{state['val_loss']:.4f}"
    print(f"step: {state['step']} of {state['train_config']['max_steps']}, validation loss {val}, "
          f"{state['elapsed_s']:.0f}s of training, tokenizer {state['tokenizer']}")
    print("training settings: " + ", ".join(f"{k}={v}" for k, v in state["train_config"].items()))
    return 0
