"""The pretraining loop: resuming is bit-for-bit; checkpoints survive a kill mid-save; a
non-finite loss stops training and keeps the last good checkpoint; the metrics log and plot."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from tinylm import GPT
from tinylm.train.checkpoint import latest_checkpoint, load_model, load_training_checkpoint, save_checkpoint
from tinylm.train.run_log import read_metrics
from tinylm.train.loop import pretrain

TINY = dict(n_layer=2, n_head=2, d_model=16, n_ctx=16, batch_size=4, lr=3e-3, warmup_steps=3, eval_every=5,
            eval_batches=2, checkpoint_every=5)


@pytest.fixture
def text_file(tmp_path):
    words = "the quick brown fox jumps over the lazy dog and then it sleeps".split()
    rng = np.random.default_rng(0)
    path = tmp_path / "data.txt"
    path.write_text(" ".join(rng.choice(words, size=600)), encoding="utf-8")
    return str(path)


def tiny(text_file, max_steps=8, **settings):
    """The tiny run's flat settings on `text_file` (shared by the train tests)."""
    return {**TINY, "data": text_file, "max_steps": max_steps, **settings}


SSM = dict(mixer="ssm", d_state=4, d_conv=3, expand=2)


def run(out, text_file, model=None, **kw):
    return pretrain(str(out), tiny(text_file, 20, **(model or {})), progress=False, **kw)


def weights(out):
    return load_file(os.path.join(latest_checkpoint(str(out)), "model.safetensors"))


def train_losses(out):
    return [r["loss"] for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r]


@pytest.mark.parametrize("model", [None, SSM], ids=["attention", "ssm"])
def test_resume_is_bit_for_bit(tmp_path, text_file, model):
    straight = run(tmp_path / "straight", text_file, model)
    first = run(tmp_path / "split", text_file, model, stop_at=10)
    assert first["status"] == "stopped" and first["step"] == 10
    second = pretrain(str(tmp_path / "split"), {}, resume=True, progress=False)
    assert straight["status"] == second["status"] == "done" and second["step"] == 20
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert len(a) == len(b) == 20 and a == b                  # exact equality, not approx
    wa, wb = weights(tmp_path / "straight"), weights(tmp_path / "split")
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    _, sa, _ = load_training_checkpoint(str(tmp_path / "straight"))
    _, sb, _ = load_training_checkpoint(str(tmp_path / "split"))
    assert sa["step"] == sb["step"] == 20
    for k in sa["m"]:
        np.testing.assert_array_equal(sa["m"][k], sb["m"][k])
        np.testing.assert_array_equal(sa["v"][k], sb["v"][k])
    assert straight["val_loss"] == second["val_loss"]
    assert a[-1] < a[0]                                       # and it learned something
    config = load_model(str(tmp_path / "split"))[0].config   # every GPTConfig field came back
    assert config.mixer == (model or {}).get("mixer", "attention") and config.d_state == (model or {}).get("d_state", 16)


def test_metrics_log_drops_lines_past_the_checkpoint_on_resume(tmp_path, text_file):
    run(tmp_path, text_file, stop_at=10)
    with open(tmp_path / "metrics.jsonl", "a") as f:          # as if killed at step 12, after the save at 10
        f.write(json.dumps({"step": 11, "loss": 9.9}) + "\n" + '{"step": 12, "lo')   # torn by the kill
    pretrain(str(tmp_path), {}, resume=True, progress=False, plot=True)
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 21))
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_kill_mid_save_leaves_the_previous_checkpoint(tmp_path, text_file, monkeypatch):
    run(tmp_path, text_file, stop_at=5)
    before = weights(tmp_path)
    model, opt_state, state = load_training_checkpoint(str(tmp_path))
    import safetensors.numpy

    def killed(tensors, path, metadata=None):               # dies half-way through writing a file
        with open(path, "wb") as f:
            f.write(b"\x00" * 10)
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.numpy, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), model, opt_state, {**state, "step": 6})
    monkeypatch.undo()
    assert latest_checkpoint(str(tmp_path)).endswith("ckpt-0000005")
    after = weights(tmp_path)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    result = pretrain(str(tmp_path), {}, resume=True, progress=False)   # and the leftovers don't block resuming
    assert result["step"] == 20
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("ckpt-")) == ["ckpt-0000020"]


def test_non_finite_loss_stops_and_names_the_step(tmp_path, text_file, monkeypatch):
    original, calls = GPT.device_loss_and_grads, []

    def poisoned(self, idx, targets, loss_mask=None, dropout=None):
        loss, grads = original(self, idx, targets, loss_mask, dropout)
        calls.append(1)
        return (float("nan") if len(calls) == 7 else loss), grads
    monkeypatch.setattr(GPT, "device_loss_and_grads", poisoned)   # what train_step calls
    with pytest.raises(ValueError, match=r"loss became nan .* at step 7; training stopped; the last good "
                                         r"checkpoint, .*ckpt-0000005, is kept: continue from it with a lower peak "
                                         r"rate, `tinylm pretrain --resume --out .* --lr 0.0015`"):
        run(tmp_path, text_file)
    model, _, state = load_model(str(tmp_path))
    assert state["step"] == 5 and all(np.isfinite(p).all() for p in model.params.values())
    monkeypatch.undo()                         # the hint can be followed: --resume takes the lower --lr
    result = pretrain(str(tmp_path), {"lr": 0.0015}, resume=True, progress=False)
    assert result["status"] == "done" and result["step"] == 20
    assert load_model(str(tmp_path))[2]["train_config"]["lr"] == 0.0015


def test_checkpoint_exports_as_a_hugging_face_directory(tmp_path, text_file):
    run(tmp_path, text_file, stop_at=5)
    b, _, _ = load_model(str(tmp_path))
    b.save_pretrained(tmp_path / "hf")
    a = GPT.from_pretrained(tmp_path / "hf")
    idx = np.arange(8)[None]
    np.testing.assert_array_equal(a.forward(idx), b.forward(idx))


def test_fresh_run_refuses_to_overwrite_and_resume_refuses_changes(tmp_path, text_file):
    run(tmp_path, text_file, stop_at=5)
    with pytest.raises(ValueError, match="already holds a run \\(checkpoint at step 5\\); pass --resume"):
        run(tmp_path, text_file)
    with pytest.raises(ValueError, match="which has batch_size=4; batch_size=8 would change it"):
        pretrain(str(tmp_path), {"batch_size": 8}, resume=True, progress=False)
    with pytest.raises(ValueError, match="which has n_layer=2; n_layer=3 would change it"):
        pretrain(str(tmp_path), {"n_layer": 3}, resume=True, progress=False)
    with pytest.raises(ValueError, match="cannot resume: .* has no checkpoint.json"):
        pretrain(str(tmp_path / "empty"), {}, resume=True, progress=False)
    assert latest_checkpoint(str(tmp_path)).endswith("ckpt-0000005")
