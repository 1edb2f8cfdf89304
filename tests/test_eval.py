"""`tinylm eval` and what it is built from: the sliding-window loss scores every token but the first
exactly once, each with the context the windows promise (checked against a per-token reference);
the CLI's numbers follow from it; a BPE file is tokenized once and cached per file and vocabulary."""
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm import GPT, GPTConfig
from tinylm.cli import main
from tinylm.train.data import cache_dir, load_ids
from tinylm.train.metrics import sliding_window_loss
from tinylm.core.tokenizer import BPETokenizer

from test_tokenizer import MERGES, write_bpe  # noqa: E402  (tests/ is on sys.path)

MODEL = GPT(GPTConfig(vocab_size=11, n_ctx=8, n_layer=1, n_head=2, d_model=8, dtype="float64"), seed=0)
for _p in MODEL.params.values():            # away from init's near-uniform logits
    _p += np.random.default_rng(1).normal(size=_p.shape) * 0.5


def token_nll(ids, j, context):
    """−log p(ids[j] | the `context` tokens before it), from one plain forward."""
    logits = MODEL.forward(ids[None, j - context:j])[0, -1]
    return float(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[ids[j]])


@given(st.integers(2, 30), st.integers(1, 8), st.integers(0, 1000))
def test_every_token_but_the_first_is_scored_once_with_the_windows_context(n, stride, seed):
    """Token j is scored by the first window [b, b + n_ctx) that holds it (b a multiple of stride)
    and sees the j − b tokens before it in that window: at least n_ctx − stride, or all of them."""
    ids = np.random.default_rng(seed).integers(0, 11, size=n)
    result = sliding_window_loss(MODEL, ids, stride)
    n_ctx = MODEL.config.n_ctx
    expected, count = 0.0, 0
    for j in range(1, n):
        b = max(0, -(-(j - n_ctx + 1) // stride) * stride)      # first start with b + n_ctx > j
        if b == j:          # stride = n_ctx: a window's first token has no context and is not scored
            continue
        assert j - b >= min(j, n_ctx - stride)
        expected += token_nll(ids, j, j - b)
        count += 1
    assert result.n_tokens == count == result.scored.sum()
    assert not result.scored[0] and (stride == n_ctx or result.scored[1:].all())
    assert math.isclose(result.nll_sum, expected, rel_tol=1e-12)


def test_one_window_is_the_models_own_loss_and_the_default_stride_is_half_of_n_ctx():
    ids = np.random.default_rng(2).integers(0, 11, size=8)
    result = sliding_window_loss(MODEL, ids)
    assert result.stride == 4
    assert math.isclose(result.mean, MODEL.loss(ids[None, :-1], ids[None, 1:]), rel_tol=1e-12)


@pytest.mark.parametrize("stride, ids, message", [
    (0, [1, 2, 3], r"stride must be in 1..n_ctx=8, got 0"),
    (9, [1, 2, 3], r"stride must be in 1..n_ctx=8, got 9"),
    (4, [1], r"the text is 1 token\(s\) long; scoring needs at least 2"),
])
def test_bad_strides_and_texts_are_refused(stride, ids, message):
    with pytest.raises(ValueError, match=message):
        sliding_window_loss(MODEL, np.array(ids), stride)


def byte_run(tmp_path, text):
    data = tmp_path / "data.txt"
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--data", str(data), "--steps", "3", "--n-layer", "1",
                 "--n-head", "2", "--d-model", "16", "--n-ctx", "16", "--batch-size", "2", "--warmup", "1",
                 "--quiet"]) == 0
    return out, data


def test_eval_prints_loss_perplexity_and_bits_per_byte(tmp_path, capsys):
    out, data = byte_run(tmp_path, "héllo wörld, " * 30)
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(data), "--json", "--stride", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    n_bytes = len(("héllo wörld, " * 30).encode("utf-8"))
    assert result["tokens"] == result["bytes"] == n_bytes - 1 and result["stride"] == 5    # byte tokens
    assert math.isclose(result["perplexity"], math.exp(result["loss"]))
    assert math.isclose(result["bits_per_byte"], result["loss"] / math.log(2))              # one byte a token
    assert main(["eval", str(out), "--data", str(data), "--stride", "5"]) == 0
    assert capsys.readouterr().out == (f"loss {result['loss']:.4f} nats/token, perplexity "
                                       f"{result['perplexity']:.2f}, {result['bits_per_byte']:.4f} bits per byte\n")


def test_eval_refuses_bad_input_in_one_line(tmp_path, capsys):
    out, data = byte_run(tmp_path, "abcdefgh " * 30)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    for argv, expect in [(["--data", str(tmp_path / "latin1.txt")], "is not UTF-8 text"),
                         (["--data", str(data), "--stride", "17"], "stride must be in 1..n_ctx=16, got 17"),
                         (["--data", str(tmp_path / "none.txt")], "does not exist")]:
        assert main(["eval", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0], err


def test_bpe_ids_are_cached_per_file_and_vocabulary(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_bpe(tmp_path / "a", MERGES)
    write_bpe(tmp_path / "b", MERGES[:2])
    tok_a = BPETokenizer.from_files(tmp_path / "a" / "vocab.json", tmp_path / "a" / "merges.txt")
    tok_b = BPETokenizer.from_files(tmp_path / "b" / "vocab.json", tmp_path / "b" / "merges.txt")
    data = tmp_path / "data.txt"
    data.write_text("hello there, the bell " * 5, encoding="utf-8")
    ids = load_ids(str(data), tok_a)
    np.testing.assert_array_equal(ids, tok_a.encode(data.read_text()))
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 1 and cache_dir().startswith(str(tmp_path))
    monkeypatch.setattr(BPETokenizer, "encode", lambda self, text: pytest.fail("re-tokenized"))
    np.testing.assert_array_equal(load_ids(str(data), tok_a), ids)          # a rerun: from the cache
    monkeypatch.undo()
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache"))
    np.testing.assert_array_equal(load_ids(str(data), tok_b), tok_b.encode(data.read_text()))   # its own entry
    data.write_text("the bell, hello " * 5, encoding="utf-8")
    np.testing.assert_array_equal(load_ids(str(data), tok_a), tok_a.encode(data.read_text()))   # edited: new
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 3
