"""The reward model as an object: a fresh head scores 0 in the trunk's dtype; it saves as a Hugging
Face GPT-2 directory (the trunk) plus its head file and loads back scoring exactly as before, in the
dtype asked for; a directory without a head, a head of the wrong width, or lengths outside 1..T are
refused with the problem named; centring averages in float64; a tied pair counts as misordered."""
import numpy as np
import pytest
from safetensors.numpy import save_file

from tinylm import GPT, GPTConfig
from tinylm.rlhf.reward import HEAD_FILE, RewardModel, Sequences, bradley_terry_loss_and_grads, pairwise_accuracy


def scored_model(dtype):
    config = GPTConfig(vocab_size=13, n_ctx=8, n_layer=1, n_head=2, d_model=8, dtype=dtype)
    rm = RewardModel.from_lm(GPT(config, seed=0))
    rng = np.random.default_rng(0)
    rm.params["reward_vector"] += rng.normal(size=8).astype(dtype)
    rm.params["reward_bias"] += 0.25
    idx = rng.integers(0, 13, size=(3, 6))
    return rm, idx, [6, 2, 4]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_saved_reward_model_loads_scoring_the_same_in_the_dtype_asked(tmp_path, dtype):
    rm, idx, lengths = scored_model(dtype)
    rm.save(str(tmp_path))
    back = RewardModel.load(str(tmp_path), dtype=dtype)
    assert back.params["reward_bias"].shape == () and back.params["reward_vector"].shape == (8,)
    assert {p.dtype for p in back.params.values()} == {np.dtype(dtype)}
    np.testing.assert_array_equal(back.rewards(idx, lengths), rm.rewards(idx, lengths))
    assert RewardModel.load(str(tmp_path)).config.dtype == "float32"      # the default


def test_loading_an_lm_checkpoint_or_a_mismatched_head_is_refused(tmp_path):
    rm, _, _ = scored_model("float32")
    rm.trunk.save_pretrained(str(tmp_path / "lm"))
    with pytest.raises(ValueError, match=f"missing {HEAD_FILE} \\(is it an LM checkpoint\\?\\)"):
        RewardModel.load(str(tmp_path / "lm"))
    rm.save(str(tmp_path / "rm"))
    save_file({"reward_vector": np.zeros(5, np.float32), "reward_bias": np.zeros(1, np.float32)},
              str(tmp_path / "rm" / HEAD_FILE))
    with pytest.raises(ValueError, match=r"reward_vector has shape \(5,\), expected \(8,\)"):
        RewardModel.load(str(tmp_path / "rm"))


def test_centre_averages_float32_scores_in_float64():
    """The returned shift is minus the float64 mean of the scores (a float32 mean rounds it)."""
    rm, idx, lengths = scored_model("float32")
    rng = np.random.default_rng(1)
    idx, lengths = rng.integers(0, 13, size=(64, 6)), rng.integers(1, 7, size=64)
    before = rm.rewards(idx, lengths)
    assert rm.centre(idx, lengths) == -before.astype(np.float64).mean() != -float(before.mean())


def test_a_fresh_reward_head_scores_zero_and_keeps_the_trunks_dtype():
    """from_lm: a zero head, so every reward is 0 and Bradley–Terry starts at ln 2; the head is cast
    to the trunk's dtype whatever it is given (float64 arrays, a one-element bias array), and
    float32 gradients stay float32."""
    rm, idx, lengths = scored_model("float32")
    fresh = RewardModel.from_lm(rm.trunk)
    assert (fresh.rewards(idx, lengths) == 0).all()
    chosen, rejected = Sequences(idx[:2], np.array([6, 2])), Sequences(idx[1:], np.array([2, 4]))
    loss, grads, _, _ = bradley_terry_loss_and_grads(fresh, chosen, rejected)
    assert loss == pytest.approx(np.log(2), abs=1e-12)
    assert {g.dtype for g in grads.values()} == {np.dtype("float32")}
    built = RewardModel(rm.trunk, np.ones(8, np.float64), np.array([0.5]))
    assert built.params["reward_vector"].dtype == built.params["reward_bias"].dtype == np.float32
    assert built.params["reward_bias"].shape == ()


def test_lengths_outside_one_to_T_are_refused_whichever_end():
    rm, idx, _ = scored_model("float32")
    for bad in ([0, 2, 4], [7, 2, 4], [6, 2]):
        with pytest.raises(ValueError, match=r"lengths must be \(B,\)=3 values in 1..T=6"):
            rm.rewards(idx, bad)


def test_pairwise_accuracy_counts_a_tie_as_wrong():
    assert pairwise_accuracy([1.0, 2.0, 0.5, 3.0], [1.0, 1.0, 0.7, 3.0]) == 0.25
