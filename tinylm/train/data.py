"""Training text: a UTF-8 file (or the built-in corpus), a train/validation split, and seeded
random batches of (idx, targets) windows.

The built-in corpus needs no download: it is the Python standard library's own source, which is
on every Python install. Files are read in sorted order up to a fixed size, so a given Python
version always yields the same text. Source code suits a first model: it is highly regular
(indentation, `def`, `self.`, `return`), so a small model learns visibly in minutes.
"""
import hashlib
import os
import sysconfig

import numpy as np

DEFAULT_CORPUS_CHARS = 2_000_000
CACHE_ENV = "TINYLM_CACHE"          # where tokenized files are kept (default ~/.cache/tinylm)


def default_corpus(max_chars=DEFAULT_CORPUS_CHARS):
    """The top-level modules of the standard library (sorted by name), concatenated, cut at
    max_chars characters."""
    stdlib = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for name in sorted(os.listdir(stdlib)):
        path = os.path.join(stdlib, name)
        if not name.endswith(".py") or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):       # unreadable files are skipped, never half-read
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not parts:
        raise ValueError(f"no readable .py files in the standard library directory {stdlib!r}; pass a data file")
    return "".join(parts)[:max_chars]


def load_text(path=None):
    """The text of a UTF-8 file, or the built-in corpus when path is None."""
    if path is None:
        return default_corpus()
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text:
        raise ValueError(f"data file {path!r} is empty")
    return text


def cache_dir():
    return os.path.join(os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "tinylm"),
                        "tokens")


def load_ids(path, tokenizer):
    """The token ids (int64) of a UTF-8 file (None: the built-in corpus) under `tokenizer`.

    BPE is slow in pure Python (GPT-2's merges on a megabyte take a minute), so its ids are kept in
    cache_dir() under a key made of the text's SHA-256 and the tokenizer's fingerprint: a rerun on
    the same file and vocabulary loads them instead, and an edited file or another vocabulary gets
    its own entry. The byte tokenizer needs no cache (its encoding is a copy of the bytes)."""
    text = load_text(path)
    if tokenizer.fingerprint == "byte":
        return tokenizer.encode(text)
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32] + "-" + tokenizer.fingerprint
    cached = os.path.join(cache_dir(), key + ".npy")
    if os.path.isfile(cached):
        return np.load(cached)
    ids = tokenizer.encode(text)
    try:                                # a cache that cannot be written only costs the next run time
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = f"{cached}.tmp-{os.getpid()}.npy"
        np.save(tmp, ids)
        os.replace(tmp, cached)         # whole or absent, never half-written
    except OSError:
        pass
    return ids


class Dataset:
    """Token ids split into train (the first 1 − val_fraction) and validation (the rest).

    get_batch(split, batch_size, rng) draws batch_size windows of n_ctx + 1 consecutive ids at
    random offsets: idx is the first n_ctx, targets the last n_ctx (idx shifted by one), so
    position t is trained to predict the token that follows it.
    """

    def __init__(self, ids, n_ctx, val_fraction=0.1):
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.n_ctx = n_ctx
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        n_val = int(round(len(self.ids) * val_fraction))
        self.splits = {"train": self.ids[:len(self.ids) - n_val], "val": self.ids[len(self.ids) - n_val:]}
        for split, data in self.splits.items():
            if len(data) < n_ctx + 1:
                raise ValueError(f"the data is too short: its {split} split has {len(data)} tokens, fewer than one "
                                 f"context window of n_ctx + 1 = {n_ctx + 1} (data has {len(self.ids)} tokens, "
                                 f"val_fraction {val_fraction}); use more text or a smaller n_ctx")

    def get_batch(self, split, batch_size, rng):
        """-> idx, targets, each (batch_size, n_ctx) int64."""
        if split not in self.splits:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        data = self.splits[split]
        starts = rng.integers(0, len(data) - self.n_ctx, size=batch_size)
        windows = data[starts[:, None] + np.arange(self.n_ctx + 1)]
        return windows[:, :-1], windows[:, 1:]
