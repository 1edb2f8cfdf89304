"""`tinylm eval RUN_OR_DIR --data FILE`: the loss of a model (a run, a checkpoint or a Hugging Face
GPT-2 directory) on a whole text file, tokenized with the model's own tokenizer: mean loss in nats
per token, perplexity exp(loss), and bits per byte (the total loss in bits over the UTF-8 bytes of
the scored tokens, comparable across tokenizers). Windows of n_ctx tokens slide by --stride, so
every token but the first is scored once, with at least n_ctx − stride tokens of context."""
import json
import math

from tinylm.core.config import DTYPES

from .args import DefaultsHelpFormatter, positive
from .terminal import note, progress_wanted


def add_parser(sub):
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a model on a text file",
                       description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("checkpoint", help="run, checkpoint or Hugging Face directory")
    p.add_argument("--data", required=True, help="UTF-8 text file to score")
    p.add_argument("--stride", type=positive(int), default=None,
                   help="tokens between window starts, 1..n_ctx (default: n_ctx // 2)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute in this precision (default: the checkpoint's own)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    p.set_defaults(func=run)


def evaluate(path, data, stride=None, dtype=None, progress=False):
    """-> dict: loss (nats/token), perplexity, bits_per_byte, tokens, bytes, stride, and where from."""
    from tinylm.train.checkpoint import load_model
    from tinylm.train.data import load_ids
    from tinylm.train.metrics import perplexity, sliding_window_loss
    from tinylm.core.tokenizer import load_tokenizer
    model, ckpt_dir, _ = load_model(path, dtype=dtype)
    tokenizer = load_tokenizer(ckpt_dir, model.config.vocab_size)
    ids = load_ids(data, tokenizer)
    result = sliding_window_loss(model, ids, stride, progress)
    n_bytes = len(tokenizer.token_bytes(ids[result.scored]))
    return {"loss": result.mean, "perplexity": perplexity(result.mean),
            "bits_per_byte": result.nll_sum / math.log(2) / n_bytes, "tokens": result.n_tokens, "bytes": n_bytes,
            "stride": result.stride, "n_ctx": model.config.n_ctx, "tokenizer": tokenizer.name, "checkpoint": ckpt_dir,
            "data": data}


def run(args):
    result = evaluate(args.checkpoint, args.data, args.stride, args.dtype, progress_wanted(args.quiet or args.json))
    if args.json:
        print(json.dumps(result))
        return 0
    note("eval", f"{result['checkpoint']} on {args.data}: {result['tokens']:,} tokens scored "
                 f"({result['tokenizer']} tokenizer), windows of {result['n_ctx']} every {result['stride']}")
    print(f"loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}, "
          f"{result['bits_per_byte']:.4f} bits per byte")
    return 0
