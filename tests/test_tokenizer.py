"""Tokenizers: the byte tokenizer round-trips any string; GPT-2 BPE (read from a hand-made
vocab.json + merges.txt) merges by rank and round-trips; load_tokenizer picks between them."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm.core.tokenizer import BPETokenizer, ByteTokenizer, bytes_to_unicode, load_tokenizer


@given(st.text())
def test_byte_decode_inverts_encode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int64
    assert len(ids) == len(text.encode("utf-8")) and (ids.min(initial=0) >= 0) and ids.max(initial=0) <= 255
    assert tok.decode(ids) == text


@given(st.text(), st.integers(0, 5))
def test_byte_decode_skips_eot(text, n_eot):
    tok = ByteTokenizer()
    ids = np.concatenate([tok.encode(text), np.full(n_eot, tok.eot_id)])
    assert tok.decode(ids) == text


def test_byte_decode_of_broken_utf8_replaces_instead_of_raising():
    tok = ByteTokenizer()
    euro = tok.encode("€")                  # 3 bytes; a model may emit only the first two
    assert tok.decode(euro[:2]) == "\ufffd"
    with pytest.raises(ValueError, match="token id 300 is out of range"):
        tok.decode([65, 300])


def test_byte_decode_accepts_byte_0_and_refuses_a_negative_id():
    """Byte 0 (NUL) is a byte like any other; only ids below 0 or above eot are refused."""
    tok = ByteTokenizer()
    assert tok.decode([0, 65]) == "\x00A"
    with pytest.raises(ValueError, match=r"^token id -1 is out of range for the byte tokenizer \(allowed 0..256\)$"):
        tok.decode([65, -1])


def write_bpe(path, merges):
    """A GPT-2-style vocabulary: the 256 byte characters, then one token per merge, then eot."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[BPETokenizer.EOT] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab


MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("e", "ll")]


def test_bpe_merges_by_rank(tmp_path):
    vocab = write_bpe(tmp_path, MERGES)
    tok = load_tokenizer(tmp_path)
    assert tok.name == "bpe" and tok.vocab_size == len(vocab) and tok.eot_id == vocab["<|endoftext|>"]
    # " the" -> Ġ t h e -> (Ġt)(he) by ranks 0, 1 -> Ġthe by rank 2: one token.
    assert tok.encode(" the").tolist() == [vocab["Ġthe"]]
    # "hell": h e l l: (h,e) has rank 1, (l,l) rank 3 -> he, ll; (he, ll) is no merge; (e, ll) never forms.
    assert tok.encode("hell").tolist() == [vocab["he"], vocab["ll"]]
    # "ell": (l,l) is the only ranked pair, then (e, ll) rank 4.
    assert tok.encode("ell").tolist() == [vocab["ell"]]


@given(st.text())
def test_bpe_decode_inverts_encode(text):
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        write_bpe(Path(d), MERGES)
        tok = load_tokenizer(d)
    assert tok.decode(tok.encode(text)) == text


def test_load_tokenizer_refuses_vocab_mismatch(tmp_path):
    assert isinstance(load_tokenizer(tmp_path, vocab_size=257), ByteTokenizer)
    with pytest.raises(ValueError, match="vocab_size is 64 but the byte tokenizer"):
        load_tokenizer(tmp_path, vocab_size=64)
    write_bpe(tmp_path, MERGES)
    with pytest.raises(ValueError, match="vocab_size is 300 but vocab.json has 262 ids"):
        load_tokenizer(tmp_path, vocab_size=300)


def test_bpe_refuses_a_vocabulary_that_is_not_byte_level(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "\u2603": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match=r"is not made of GPT-2's byte characters \(not a byte-level BPE vocabulary\)"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("word, expected", [
    ("aaa", ["aa", "a"]),             # overlapping occurrences merge left to right
    ("aaaaa", ["aaaa", "a"]),         # aa aa a, then (aa, aa)
    ("baa", ["b", "aa"]),             # rank 0 (a, a) wins over rank 2 (b, a)
    ("aba", ["a", "ba"]),             # the winning pair at the end of the word
    ("bab", ["ba", "b"]),             # ... and at its start
    ("abab", ["a", "ba", "b"]),
])
def test_bpe_merges_repeated_and_overlapping_pairs_by_hand(tmp_path, word, expected):
    """Hand-worked merges with merges (a, a) < (aa, aa) < (b, a): a merge that reads the wrong
    neighbour, skips the last pair or merges only the first occurrence gives another split."""
    vocab = write_bpe(tmp_path, [("a", "a"), ("aa", "aa"), ("b", "a")])
    assert load_tokenizer(tmp_path).encode(word).tolist() == [vocab[t] for t in expected]


def test_bpe_decode_takes_a_batch_row_replaces_broken_utf8_and_names_an_unknown_id(tmp_path):
    """decode reads any array shape, returns U+FFFD for a cut multi-byte character (a model may emit
    half of "€") and refuses an unknown id with its number and the allowed range."""
    vocab = write_bpe(tmp_path, MERGES)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode(" the €")
    assert tok.decode(ids[None, :]) == " the €"
    assert tok.decode(ids[:-1]) == " the \ufffd"
    with pytest.raises(ValueError, match=rf"token id 999 is not in the BPE vocabulary \(allowed 0..{len(vocab) - 1}\)"):
        tok.decode([vocab["he"], 999, 1000])


def test_bytes_to_unicode_keeps_printable_bytes_and_moves_the_rest_past_255():
    """GPT-2's table: '!'..'~', '¡'..'¬', '®'..'ÿ' (188 bytes) map to themselves, the other 68 to
    256, 257, ... in byte order; all 256 characters distinct."""
    table = bytes_to_unicode()
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    assert len(printable) == 188 and all(table[b] == chr(b) for b in printable)
    others = [b for b in range(256) if b not in printable]
    assert [table[b] for b in others] == [chr(256 + n) for n in range(len(others))]


def test_byte_decode_reads_a_batch_row_and_encode_of_nothing_is_int64():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("hi")[None, :]) == "hi"
    assert tok.encode("").dtype == np.int64


def test_broken_bpe_files_are_refused_with_the_line_or_file_named(tmp_path):
    """A merge line with three tokens is quoted; an unreadable vocab.json is named; merges.txt's
    "#version" header is no merge; vocab.json alone (no merges.txt) means the byte tokenizer."""
    vocab = write_bpe(tmp_path, MERGES)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nh e x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges.txt: a merge line must hold two tokens, got 'h e x'"):
        load_tokenizer(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    assert load_tokenizer(tmp_path).encode(" t").tolist() == [vocab["Ġ"], vocab["t"]]
    (tmp_path / "merges.txt").unlink()
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    (tmp_path / "merges.txt").write_text("", encoding="utf-8")
    (tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cannot read the BPE tokenizer files \(Expecting"):
        load_tokenizer(tmp_path)


def test_bpe_skips_blank_merge_lines_encodes_nothing_as_int64_and_names_a_token_missing_from_vocab(tmp_path):
    """A blank line in merges.txt is no merge (not a malformed one); encoding "" gives int64 ids
    like any text; a merge whose result vocab.json lacks is named when it is first produced."""
    vocab = write_bpe(tmp_path, MERGES)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\n\nh e\n", encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert tok.encode(" the").tolist() == [vocab["Ġt"], vocab["he"]]
    assert tok.encode("").dtype == np.int64 and tok.encode("").shape == (0,)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nx y\n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_tokenizer(tmp_path).encode(" xy")
    assert str(e.value) == "BPE token 'xy' is not in vocab.json (vocab and merges don't match)"
