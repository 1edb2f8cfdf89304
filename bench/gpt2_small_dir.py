"""Write a GPT-2-small-shaped Hugging Face directory with random weights, for timing fine-tuning
where GPT-2's own files are not on disk (nothing is downloaded):

    python bench/gpt2_small_dir.py OUT

config.json + model.safetensors at GPT-2 small's shape (124,439,808 parameters, GPT-2's
initialisation) and a stand-in byte-level BPE of GPT-2's 50,257 ids: the 256 byte characters,
50,000 merges of two byte characters (the first 50,000 pairs in byte order), and <|endoftext|>.
The speed of a step depends on the shape, not on which merges the vocabulary holds."""
import itertools
import json
import os
import sys

from tinylm import GPT, GPTConfig
from tinylm.core.tokenizer import BPETokenizer, bytes_to_unicode


def main(out):
    GPT(GPTConfig(), seed=0).save_pretrained(out)       # GPTConfig() is GPT-2 small
    chars = list(bytes_to_unicode().values())
    merges = list(itertools.islice(itertools.product(chars, chars), 50_000))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({a + b: 256 + i for i, (a, b) in enumerate(merges)})
    vocab[BPETokenizer.EOT] = len(vocab)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    print(out, len(vocab), "ids")


if __name__ == "__main__":
    main(sys.argv[1])
