"""Text <-> token ids.

ByteTokenizer: every UTF-8 byte is a token (ids 0..255) and id 256 marks end-of-text. It needs no
training and round-trips any string exactly, at the price of long sequences (one token per byte).

BPETokenizer: GPT-2's byte-pair encoding, read from the vocab.json + merges.txt that ship with a
Hugging Face GPT-2 directory, so `GPT.from_pretrained` weights turn into real text.
"""
import hashlib
import json
import os
import re

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus `eot_id` = 256 (end of text): vocab_size 257."""
    name = "byte"
    fingerprint = "byte"            # names the tokenizer in a token cache's key (data.load_ids)
    vocab_size = 257
    eot_id = 256

    def encode(self, text):
        """str -> int64 ids (B,) of its UTF-8 bytes."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def token_bytes(self, ids):
        """ids -> the bytes they stand for, skipping end-of-text."""
        ids = np.asarray(ids).reshape(-1)
        bad = ids[(ids < 0) | (ids > self.eot_id)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is out of range for the byte tokenizer (allowed 0..256)")
        return bytes(ids[ids != self.eot_id].astype(np.uint8))

    def decode(self, ids):
        """ids -> str, skipping end-of-text. Sampled bytes need not form valid UTF-8 (a model can
        emit half a multi-byte character), so bad sequences become U+FFFD instead of raising."""
        return self.token_bytes(ids).decode("utf-8", errors="replace")


def bytes_to_unicode():
    """GPT-2's map from each byte to a printable character, so BPE can work on str without
    whitespace or control characters: printable Latin-1 bytes map to themselves, the other
    68 bytes to the characters from U+0100 on."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


# GPT-2 splits text into words before merging, so merges never cross a word boundary. Its pattern
# uses \p{L} / \p{N} (the `regex` package); [^\W\d_] and \d are the standard library's nearest
# equivalents (they differ only on rare numeric characters such as '½').
PRETOKENIZE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


class BPETokenizer:
    """GPT-2 byte-pair encoding from vocab.json (token string -> id) and merges.txt (one merge
    "a b" per line, highest priority first).

    encode: text -> words (PRETOKENIZE) -> bytes -> byte characters -> repeatedly merge the
    adjacent pair with the best rank -> ids. decode: ids -> token strings -> bytes -> UTF-8.
    """
    name = "bpe"
    EOT = "<|endoftext|>"

    def __init__(self, vocab, merges):
        self.encoder = dict(vocab)
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.ranks = {tuple(pair): r for r, pair in enumerate(merges)}
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        foreign = [t for t in self.encoder if t != self.EOT and not set(t) <= self.char_byte.keys()]
        if foreign:
            raise ValueError(f"vocab.json token {foreign[0]!r} is not made of GPT-2's byte characters "
                             "(not a byte-level BPE vocabulary)")
        self.vocab_size = max(self.decoder) + 1
        self.eot_id = self.encoder.get(self.EOT)
        self.word_cache = {}
        # Another vocabulary or merge order encodes the same text differently: both go into the key.
        self.fingerprint = "bpe-" + hashlib.sha256(json.dumps([sorted(self.encoder.items()), sorted(
            self.ranks.items(), key=lambda item: item[1])]).encode()).hexdigest()[:16]

    @classmethod
    def from_files(cls, vocab_path, merges_path):
        try:
            with open(vocab_path, encoding="utf-8") as f:
                vocab = json.load(f)
            with open(merges_path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the BPE tokenizer files ({e})") from None
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"{merges_path}: a merge line must hold two tokens, got {' '.join(bad[0])!r}")
        return cls(vocab, merges)

    def bpe(self, word):
        """One pre-tokenized word (as byte characters) -> its BPE tokens."""
        if word in self.word_cache:
            return self.word_cache[word]
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            first, second = parts[i], parts[i + 1]
            merged, j = [], 0
            while j < len(parts):       # merge every occurrence of the winning pair, left to right
                if j + 1 < len(parts) and parts[j] == first and parts[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        self.word_cache[word] = parts
        return parts

    def encode(self, text):
        ids = []
        for word in PRETOKENIZE.findall(text):
            chars = "".join(self.byte_char[b] for b in word.encode("utf-8"))
            for token in self.bpe(chars):
                if token not in self.encoder:
                    raise ValueError(f"BPE token {token!r} is not in vocab.json (vocab and merges don't match)")
                ids.append(self.encoder[token])
        return np.array(ids, dtype=np.int64)

    def token_bytes(self, ids):
        """ids -> the bytes their tokens stand for, skipping end-of-text."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) != self.eot_id]
        unknown = [i for i in ids if i not in self.decoder]
        if unknown:
            raise ValueError(f"token id {unknown[0]} is not in the BPE vocabulary (allowed 0..{self.vocab_size - 1})")
        return bytes(self.char_byte[c] for i in ids for c in self.decoder[i])

    def decode(self, ids):
        return self.token_bytes(ids).decode("utf-8", errors="replace")


BPE_FILES = ("vocab.json", "merges.txt")


def tokenizer_files(checkpoint_dir):
    """{name: bytes} of the BPE files in a checkpoint directory ({} for the byte tokenizer): what a
    run started from it copies into each of its own checkpoints, so they carry their tokenizer."""
    paths = [os.path.join(checkpoint_dir, name) for name in BPE_FILES]
    if not all(os.path.isfile(p) for p in paths):
        return {}
    return {name: open(p, "rb").read() for name, p in zip(BPE_FILES, paths)}


def load_tokenizer(checkpoint_dir, vocab_size=None):
    """The tokenizer for a checkpoint directory: GPT-2 BPE when it holds vocab.json and merges.txt,
    else the byte tokenizer. With vocab_size (the model's), refuse a tokenizer whose ids the model
    cannot take, or ids the model would emit that the tokenizer cannot decode."""
    vocab_path, merges_path = (os.path.join(checkpoint_dir, name) for name in BPE_FILES)
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        tokenizer = BPETokenizer.from_files(vocab_path, merges_path)
    else:
        tokenizer = ByteTokenizer()
    if vocab_size is not None and vocab_size != tokenizer.vocab_size:
        source = "vocab.json" if tokenizer.name == "bpe" else "the byte tokenizer (no vocab.json + merges.txt here)"
        raise ValueError(f"{checkpoint_dir}: the model's vocab_size is {vocab_size} but {source} has "
                         f"{tokenizer.vocab_size} ids")
    return tokenizer
