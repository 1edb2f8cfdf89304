"""`tinylm pretrain --init-from`: fine-tuning a GPT-2-format directory (made here: tinylm's own
export plus a hand-made BPE vocabulary, nothing downloaded) lowers its loss on the fine-tune text;
the run takes the directory's shape and tokenizer, carries the tokenizer in its checkpoints, resumes
bit for bit, samples, exports back, and `info` says where it started; bad input is one line."""
import json
import os

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.train.checkpoint import latest_checkpoint, load_model, read_trainer_state
from tinylm.cli import main

from test_tokenizer import MERGES, write_bpe  # noqa: E402  (tests/ is on sys.path)

VOCAB = 256 + len(MERGES) + 1          # write_bpe: the byte characters, one token per merge, end-of-text
TEXT = "the bell fell, hello there. " * 60
STEPS = ["--batch-size", "4", "--warmup", "2", "--eval-every", "10", "--eval-batches", "2", "--quiet"]


def gpt2_dir(path, n_ctx=32):
    """A GPT-2-format directory as a user has one: config.json, model.safetensors, vocab.json, merges.txt."""
    GPT(GPTConfig(vocab_size=VOCAB, n_ctx=n_ctx, n_layer=2, n_head=2, d_model=16), seed=3).save_pretrained(path)
    write_bpe(path, MERGES)
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    gpt2, data = gpt2_dir(tmp / "gpt2"), tmp / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    assert main(["pretrain", "--init-from", str(gpt2), "--data", str(data), "--out", str(tmp / "run"),
                 "--steps", "20", "--lr", "3e-3", *STEPS]) == 0
    return tmp


def eval_loss(capsys, model, data):
    capsys.readouterr()
    assert main(["eval", str(model), "--data", str(data), "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_twenty_steps_lower_the_eval_loss_on_the_fine_tune_text(finetuned, capsys):
    before = eval_loss(capsys, finetuned / "gpt2", finetuned / "text.txt")
    after = eval_loss(capsys, finetuned / "run", finetuned / "text.txt")
    assert before["tokenizer"] == after["tokenizer"] == "bpe" and before["tokens"] == after["tokens"]
    assert after["tokens"] < len(TEXT) - 1                               # BPE merged some bytes
    assert after["loss"] < before["loss"] - 0.5, (before["loss"], after["loss"])


def test_the_run_has_the_directorys_shape_and_tokenizer_and_says_where_it_started(finetuned, capsys):
    model, ckpt, state = load_model(str(finetuned / "run"))
    assert model.config == GPT.from_pretrained(str(finetuned / "gpt2")).config
    assert state["tokenizer"] == "bpe" and state["train_config"]["init_from"] == str(finetuned / "gpt2")
    for name in ("vocab.json", "merges.txt"):
        assert open(os.path.join(ckpt, name), "rb").read() == (finetuned / "gpt2" / name).read_bytes()
    capsys.readouterr()
    assert main(["info", str(finetuned / "run")]) == 0
    assert f"started from: {finetuned / 'gpt2'}" in capsys.readouterr().out
    assert main(["sample", str(finetuned / "run"), "--prompt", "the bell", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the bell")


def test_it_exports_back_with_its_tokenizer(finetuned, capsys):
    out = finetuned / "exported"
    assert main(["export-hf", str(finetuned / "run"), str(out)]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    ours, _, _ = load_model(str(finetuned / "run"))
    idx = np.arange(20)[None] % VOCAB
    np.testing.assert_array_equal(GPT.from_pretrained(str(out)).forward(idx), ours.forward(idx))
    assert eval_loss(capsys, out, finetuned / "text.txt") == {
        **eval_loss(capsys, finetuned / "run", finetuned / "text.txt"), "checkpoint": str(out)}


def test_a_fine_tune_resumes_bit_for_bit(finetuned):
    common = ["--init-from", str(finetuned / "gpt2"), "--data", str(finetuned / "text.txt"), "--steps", "6",
              "--checkpoint-every", "3", *STEPS]
    assert main(["pretrain", *common, "--out", str(finetuned / "whole")]) == 0
    assert main(["pretrain", *common, "--out", str(finetuned / "split"), "--stop-at", "3"]) == 0
    assert main(["pretrain", "--resume", "--out", str(finetuned / "split"), "--quiet"]) == 0
    whole, _, _ = load_model(str(finetuned / "whole"))
    split, _, _ = load_model(str(finetuned / "split"))
    assert read_trainer_state(latest_checkpoint(str(finetuned / "split")))["step"] == 6
    for k, p in whole.params.items():
        np.testing.assert_array_equal(split.params[k], p, err_msg=k)


@pytest.mark.parametrize("argv, expect", [
    (["--n-layer", "3"], "has n_layer=2, but n_layer=3 was given: the model's shape comes from --init-from"),
    (["--n-ctx", "16"], "has n_ctx=32, but n_ctx=16 was given"),
    (["--init-from", "{tmp}/text.txt"], "is a file; a checkpoint is a directory"),
    (["--init-from", "{tmp}"], "no checkpoint in"),
    (["--init-from", "{tmp}/nowhere"], "the directory does not exist"),
])
def test_bad_init_from_is_one_line_and_leaves_nothing(finetuned, tmp_path, capsys, argv, expect):
    argv = [a.format(tmp=finetuned) for a in argv]
    out = tmp_path / "run"
    assert main(["pretrain", "--init-from", str(finetuned / "gpt2"), "--data", str(finetuned / "text.txt"),
                 "--out", str(out), *STEPS, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not out.exists()
