"""Data windows and the training step: targets are idx shifted by one, batches are seeded,
short or missing data is refused; the learning-rate schedule; a train step lowers the loss and
a non-finite loss leaves the weights alone."""
import json
import math
from dataclasses import asdict

import numpy as np
import pytest

from tinylm import GPT, GPTConfig, adamw_init
from tinylm.train.data import Dataset, default_corpus, load_text
from tinylm.core.optim import Schedule
from tinylm.train.loop import train_step
from tinylm.train.train_config import TrainConfig, with_settings


def test_batches_are_shifted_windows_and_seeded():
    ids = np.arange(1000)
    data = Dataset(ids, n_ctx=16, val_fraction=0.1)
    idx, targets = data.get_batch("train", 4, np.random.default_rng(0))
    assert idx.shape == targets.shape == (4, 16)
    np.testing.assert_array_equal(targets[:, :-1], idx[:, 1:])
    np.testing.assert_array_equal(targets, idx + 1)            # consecutive ids: each window is contiguous
    assert idx.max() < 900 and targets.max() < 900             # train windows stay in the first 90%
    val, _ = data.get_batch("val", 4, np.random.default_rng(0))
    assert val.min() >= 900 and val.max() <= 998               # its targets reach the last id, 999
    again, _ = data.get_batch("train", 4, np.random.default_rng(0))
    np.testing.assert_array_equal(idx, again)


def test_short_data_and_bad_split_are_refused():
    with pytest.raises(ValueError, match="val split has 3 tokens, fewer than one context window of n_ctx \\+ 1 = 9"):
        Dataset(np.arange(30), n_ctx=8)
    with pytest.raises(ValueError, match="val_fraction must be in \\(0, 1\\)"):
        Dataset(np.arange(30), n_ctx=8, val_fraction=1.0)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        Dataset(np.arange(300), n_ctx=8).get_batch("test", 2, np.random.default_rng(0))


def test_load_text_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_text(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_text(str(tmp_path / "bin.txt"))
    (tmp_path / "ok.txt").write_text("héllo", encoding="utf-8")
    assert load_text(str(tmp_path / "ok.txt")) == "héllo"


def test_default_corpus_is_python_source_and_deterministic():
    text = default_corpus(max_chars=50_000)
    assert len(text) == 50_000 and text == default_corpus(max_chars=50_000)
    assert "def " in text and "import " in text


def test_lr_schedule():
    lr_at = Schedule(max_steps=110, lr=1e-3, warmup_steps=10, min_lr=1e-4)
    assert lr_at(0) == pytest.approx(1e-4)              # first step: lr / warmup
    assert lr_at(9) == pytest.approx(1e-3)              # warm-up reaches lr
    assert lr_at(10) == pytest.approx(1e-3)             # cosine starts at lr
    assert lr_at(60) == pytest.approx(0.55e-3)          # half-way: (lr + min_lr) / 2
    assert lr_at(110) == pytest.approx(1e-4)            # ends at min_lr
    lrs = [lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def tiny():
    return GPT(GPTConfig(vocab_size=11, n_ctx=8, n_layer=1, n_head=2, d_model=8), seed=0)


def test_train_steps_lower_the_loss():
    model = tiny()
    state = adamw_init(model.params)
    idx = np.tile(np.arange(8) % 11, (4, 1))
    targets = (idx + 1) % 11
    losses = [train_step(model, state, idx, targets, Schedule.constant(1e-2)).loss for _ in range(30)]
    assert losses[-1] < losses[0] - 1.0 and state["step"] == 30
    mask = np.zeros_like(idx)
    mask[:, -1] = 1
    loss, norm, _, _ = train_step(model, state, idx, targets, Schedule.constant(1e-2), loss_mask=mask)
    assert loss == pytest.approx(model.loss(idx, targets, mask), abs=0.5) and norm > 0


def test_non_finite_loss_leaves_weights_and_optimizer_alone():
    model = tiny()
    state = adamw_init(model.params)
    model.params["ln_f.bias"][0] = np.nan
    before = {k: v.copy() for k, v in model.params.items()}
    loss, norm, _, _ = train_step(model, state, np.zeros((1, 8), np.int64), np.ones((1, 8), np.int64),
                                  Schedule.constant(1e-2))
    assert math.isnan(loss) and state["step"] == 0
    for k in before:
        np.testing.assert_array_equal(model.params[k], before[k])


@pytest.mark.parametrize("change, message", [
    (dict(batch_size=0), r"batch_size must be a positive integer \(>= 1\), got 0"),
    (dict(max_steps=2.5), "max_steps must be a positive integer"),
    (dict(n_layer=True), "n_layer must be a positive integer"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0, got -1"),
    (dict(lr=0.0), "lr must be a finite number > 0, got 0.0"),          # no updates at all
    (dict(val_fraction=1.0), "val_fraction must be between 0 and 1"),
    (dict(mixer="rnn"), "mixer must be one of"),
    (dict(nlayer=2), "unknown setting 'nlayer'"),
])
def test_train_config_refuses_bad_settings(change, message):
    """Model settings (n_layer, mixer) go to the TrainConfig's GPTConfig and are checked there."""
    with pytest.raises(ValueError, match=message):
        with_settings(TrainConfig(), change)
    with_settings(TrainConfig(), dict(warmup_steps=0))      # 0 warm-up steps is allowed


def test_train_config_warns_of_silent_combinations():
    assert TrainConfig().warnings() == []
    notes = with_settings(TrainConfig(), dict(warmup_steps=10, max_steps=5, min_lr=1.0, lr=0.1)).warnings()
    assert len(notes) == 2 and "warmup_steps=10 exceeds max_steps=5" in notes[0] and "min_lr=1.0" in notes[1]


def test_train_config_round_trips_through_json_and_names_bad_keys():
    cfg = with_settings(TrainConfig(), dict(mixer="ssm", d_state=4, lr=1e-3))
    assert TrainConfig.from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg
    bad = asdict(cfg)
    bad["model"] = {**bad["model"], "d_state": "4"}
    with pytest.raises(ValueError, match="train_config: model: key 'd_state' must be int, got '4'"):
        TrainConfig.from_dict(bad)
    bad["model"]["d_state"] = 4
    del bad["lr"]
    with pytest.raises(ValueError, match="train_config: missing key 'lr'"):
        TrainConfig.from_dict(bad)


def test_a_train_config_saved_before_init_from_and_dropout_existed_loads_with_their_defaults():
    """Runs saved before issue 23 have no init_from or dropout key: they still resume and show."""
    old = asdict(TrainConfig())
    del old["init_from"], old["dropout"]
    assert TrainConfig.from_dict(old) == TrainConfig()
    assert TrainConfig.from_dict({**old, "dropout": 0.2}).dropout == 0.2
    with pytest.raises(ValueError, match="train_config: missing key 'seed'"):
        TrainConfig.from_dict({k: v for k, v in old.items() if k != "seed"})
