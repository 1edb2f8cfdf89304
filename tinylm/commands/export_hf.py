"""`tinylm export-hf RUN OUT`: write a run's (or checkpoint's) model as a Hugging Face GPT-2
directory, config.json + model.safetensors (+ vocab.json and merges.txt for a BPE model), that
transformers' GPT2LMHeadModel loads. Only
attention models export: GPT-2 has no state-space layers for an ssm model's weights."""
import argparse
import os
import shutil

from .terminal import note


def add_parser(sub):
    p = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face GPT-2 directory",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="run, checkpoint or Hugging Face directory")
    p.add_argument("out", help="directory to create (must not exist yet)")
    p.set_defaults(func=run)


def run(args):
    from tinylm.train.checkpoint import TMP, load_model
    from tinylm.core.tokenizer import tokenizer_files
    if os.path.lexists(args.out):
        raise ValueError(f"{args.out!r} already exists: choose a new path (nothing is overwritten)")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"cannot create {args.out!r}: {parent!r} is not a writable directory")
    model, ckpt_dir, _ = load_model(args.run)
    if model.config.mixer != "attention":
        raise ValueError(f"{ckpt_dir!r} holds a mixer={model.config.mixer!r} model; Hugging Face GPT-2 has no "
                         "state-space layers, so only attention models export")
    tmp = f"{args.out}{TMP}{os.getpid()}"      # OUT appears only once complete
    try:
        model.save_pretrained(tmp)
        for name, data in tokenizer_files(ckpt_dir).items():      # a BPE run's vocabulary goes with it
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        os.rename(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    note("export-hf", f"from {ckpt_dir}")
    print(args.out)
    return 0
