"""The RLHF module's plumbing, checked piece by piece: the pairs file's refusals, PolicyConfig's
ranges at both edges, the minibatch loop (batch sizes, gradient clipping in place, no progress bar
off a terminal), early stopping's tie rule, and held-out accuracy against a direct computation."""
import json
import types

import numpy as np
import pytest

import tinylm.core.optim as optim
import tinylm.rlhf.policy as rlhf
from tinylm import GPT, GPTConfig
from tinylm.core.model import ARRAY_LAYERS
from tinylm.rlhf.reward import RewardModel, pairwise_accuracy
from tinylm.rlhf.policy import (PolicyConfig, Preferences, optimise_on_pairs, reward_model_accuracy,
                         train_dpo, train_reward_model, train_reward_model_early_stopping)

V = 9


def pairs_of(n, seed=0):
    rng = np.random.default_rng(seed)
    chosen = [rng.integers(0, V, size=rng.integers(1, 4)) for _ in range(n)]
    rejected = [np.append(w, (w[-1] + 1) % V) for w in chosen]      # never identical to chosen
    return Preferences([rng.integers(0, V, size=2) for _ in range(n)], chosen, rejected, [("cpy", "a")] * n)


def tiny_lm(n_ctx=8, dtype="float32", seed=0):
    """A one-layer, 8-wide model on the V-token vocabulary of pairs_of."""
    return GPT(GPTConfig(vocab_size=V, n_ctx=n_ctx, n_layer=1, n_head=2, d_model=8, dtype=dtype), seed=seed)


def tiny_rm(seed=0):
    rm = RewardModel.from_lm(tiny_lm(dtype="float64", seed=seed))
    rm.params["reward_vector"] += np.random.default_rng(seed).normal(size=8)
    return rm


@pytest.mark.parametrize("content, message", [
    ({"prompt": [1]}, "expected a list of {prompt, chosen, rejected, instruction} objects"),
    ([{"prompt": [1]}, 3], "expected a list of {prompt, chosen, rejected, instruction} objects"),
    ([{"prompt": [[1]], "chosen": [2], "rejected": [3], "instruction": ["cpy", "a"]}],
     "prompt, chosen and rejected must be lists of token ids"),
])
def test_a_malformed_pairs_file_is_refused_with_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"pairs file '{path}' is not a pairs file: {message}"):
        Preferences.load(str(path))


def test_an_empty_prompt_loads_as_integer_ids(tmp_path):
    pairs = pairs_of(2)
    pairs.prompts[0] = np.array([], dtype=np.int64)
    pairs.save(str(tmp_path / "p.json"))
    back = Preferences.load(str(tmp_path / "p.json"))
    assert all(ids.dtype == np.int64 for ids in back.prompts + back.chosen + back.rejected)


@pytest.mark.parametrize("kw, message", [
    (dict(beta=-0.1), "beta must be a finite number >= 0, got -0.1"),
    (dict(beta=float("inf")), "beta must be a finite number >= 0, got inf"),
    (dict(temperature=0.0), "temperature must be > 0, got 0.0"),
    (dict(steps=0), "steps must be >= 1, got 0"),
    (dict(prompts_per_step=0), "prompts_per_step must be >= 1, got 0"),
    (dict(rm_rounds=-1), "rm_rounds must be >= 0, got -1"),
    (dict(samples_per_prompt=1), "samples_per_prompt must be >= 2 for the leave-one-out baseline"),
])
def test_policy_config_refuses_each_bad_value_by_name(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PolicyConfig(**kw)


def test_policy_config_accepts_the_edges():
    PolicyConfig(beta=0.0, samples_per_prompt=2, steps=1, prompts_per_step=1, max_new_tokens=1, rm_rounds=0)
    PolicyConfig(baseline="none", samples_per_prompt=1)


def test_minibatches_cover_the_pairs_in_ceil_n_over_b_batches_and_clip_in_place(capsys):
    """10 pairs in batches of at most 4: three batches (4, 3, 3) per epoch; each step's gradients
    (norm 20 as returned) are clipped to norm 1 in place before AdamW; no weight decay (a matrix
    with zero gradient stays put); after_epoch hears 0, 1; nothing is printed off a terminal (the
    progress bar disables itself)."""
    params = {"w": np.zeros(3), "m": np.ones((2, 2))}
    sizes, returned, epochs = [], [], []

    def loss_and_grads(batch):
        (idx_w, _), _, _ = batch
        sizes.append(len(idx_w))
        returned.append({"w": np.array([12.0, 16.0, 0.0]), "m": np.zeros((2, 2))})
        return 0.0, returned[-1]
    model = types.SimpleNamespace(params=params, layers=ARRAY_LAYERS)
    optimise_on_pairs(model, pairs_of(10), 2, 4, 1e-2, np.random.default_rng(0), loss_and_grads, "test",
                      after_epoch=epochs.append)
    assert sizes == [4, 3, 3, 4, 3, 3] and epochs == [0, 1]
    assert all(np.isclose(np.linalg.norm(g["w"]), 1.0) for g in returned)
    assert (params["m"] == 1).all() and (params["w"][:2] != 0).all()
    assert capsys.readouterr().err == ""


def test_early_stopping_keeps_the_first_of_equal_epochs(monkeypatch):
    """Every epoch scores the same: the weights kept are the first epoch's, not a later one's."""
    monkeypatch.setattr(rlhf, "reward_model_accuracy", lambda rm, pairs: 0.5)
    pairs, validation = pairs_of(6), pairs_of(2, seed=1)
    kept = tiny_rm()
    train_reward_model_early_stopping(kept, pairs, validation, 3, 3, 1e-2, np.random.default_rng(0))
    first = tiny_rm()
    train_reward_model(first, pairs, 1, 3, 1e-2, np.random.default_rng(0))
    for name in first.params:
        np.testing.assert_array_equal(kept.params[name], first.params[name])


@pytest.mark.parametrize("batch_size", [2, 256])
def test_held_out_accuracy_is_pairwise_accuracy_over_every_pair(batch_size):
    rm, pairs = tiny_rm(), pairs_of(7)
    (idx_w, len_w), (idx_l, len_l), _ = pairs.packed()
    direct = pairwise_accuracy(rm.rewards(idx_w, len_w), rm.rewards(idx_l, len_l))
    assert 0 < direct < 1
    scored, rewards = [], rm.rewards
    rm.rewards = lambda idx, lengths: scored.append(len(idx)) or rewards(idx, lengths)
    assert reward_model_accuracy(rm, pairs, batch_size) == direct
    assert sum(scored) == 2 * len(pairs)                  # every pair scored once, each side
    del rm.rewards
    for i in range(len(pairs)):          # each single pair counts: moving one changes the score
        one = pairs.subset([i])
        (w, lw), (l, ll), _ = one.packed()
        assert reward_model_accuracy(rm, one) == float(rm.rewards(w, lw)[0] > rm.rewards(l, ll)[0])


def test_dpo_refuses_a_reference_with_another_vocabulary():
    policy = tiny_lm()
    reference = GPT(GPTConfig(vocab_size=V + 1, n_ctx=8, n_layer=1, n_head=2, d_model=8))
    with pytest.raises(ValueError, match=f"policy vocab_size={V} differs from the reference's {V + 1}"):
        train_dpo(policy, reference, pairs_of(2), 1, 2, 1e-3, 0.1, np.random.default_rng(0))


def test_preference_sets_are_refused_with_the_whole_reason():
    with pytest.raises(ValueError, match=r"^the preference set is empty: need at least one \(chosen, rejected\) pair$"):
        Preferences([], [], [], []).validate()
    with pytest.raises(ValueError, match="^preference set: 2 prompts but 1 chosen and 2 rejected responses$"):
        Preferences([np.array([1])] * 2, [np.array([2])], [np.array([3])] * 2, [("cpy", "a")] * 2).validate()
    with pytest.raises(ValueError, match="^preference pair 0 has identical chosen and rejected responses: "
                                         "it carries no preference$"):
        Preferences([np.array([1])], [np.array([2])], [np.array([2])], [("cpy", "a")]).validate()


def test_prompts_from_one_token_up_to_exactly_filling_the_context_are_accepted():
    config = GPTConfig(vocab_size=V, n_ctx=8, n_layer=1, n_head=2, d_model=8)
    rlhf.check_prompts([np.arange(1), np.arange(5)], 3, config)            # 5 + 3 = n_ctx
    with pytest.raises(ValueError, match="instruction 0 has 0 tokens; with max_new_tokens=3 it needs 1..5"):
        rlhf.check_prompts([np.arange(0)], 3, config)


class EotAfter:
    """A stand-in policy: row r of a batch emits token 2 while the sequence is shorter than
    lengths[r] tokens, then eot (id 0). Counts its forward calls."""
    config = GPTConfig(vocab_size=4, n_ctx=16, n_layer=1, n_head=1, d_model=4)
    xp = np

    def __init__(self, lengths):
        self.lengths, self.calls = lengths, 0

    def check_idx(self, idx, name="idx", past=0):
        pass

    def new_kv_cache(self):
        return None                       # so every step feeds the whole sequence: T = its length

    def forward(self, idx, kv_cache=None):
        self.calls += 1
        logits = np.zeros(idx.shape + (4,))
        for r in range(len(idx)):
            logits[r, :, 2 if idx.shape[1] < self.lengths[r] else 0] = 50.0
        return logits


def test_responses_stop_at_their_first_eot_and_generation_stops_when_every_row_has():
    """Prompts [1, 2] and [3, 1] are one batch (rows 0, 1), [2] another (row 0). The rows finish at
    different steps; each response keeps the tokens up to and including its own first eot, and each
    batch stops at its last row's eot (2 + 3 forward calls, not 6 + 6)."""
    policy = EotAfter([2, 4])
    prompts = [np.array([1, 2]), np.array([3, 1]), np.array([2])]
    responses = rlhf.sample_responses(policy, prompts, 6, 1.0, np.random.default_rng(0), eot_id=0)
    assert [r.tolist() for r in responses] == [[0], [2, 2, 0], [2, 0]]
    assert policy.calls == 5


def test_sampling_follows_the_temperature_and_the_rng_it_is_given():
    policy = tiny_lm(n_ctx=12)
    rng = np.random.default_rng(0)
    for p in policy.params.values():
        p += rng.normal(size=p.shape).astype(p.dtype)
    prompts = [np.array([1, 2]), np.array([3, 4]), np.array([5]), np.array([6, 7])]
    sample = lambda t, seed: [r.tolist() for r in rlhf.sample_responses(policy, prompts, 8, t, np.random.default_rng(seed), V - 1)]
    assert sample(1.0, 3) == sample(1.0, 3)
    assert sample(1.0, 3) != sample(1.0, 4)
    from tinylm.core.generate import generate
    greedy = [generate(policy, p[None], 8, temperature=0, eot_id=V - 1)[0, len(p):].tolist() for p in prompts]
    cut = [g[:g.index(V - 1) + 1] if V - 1 in g else g for g in greedy]
    assert sample(1e-6, 3) == sample(1e-6, 4) == cut


def test_a_policy_step_is_reproducible_from_its_rng_and_clips_at_norm_1(monkeypatch):
    from tinylm.core.optim import adamw_init
    norms = []
    clip_scale = optim.clip_scale           # what every layer set's optimizer step clips with
    monkeypatch.setattr(optim, "clip_scale", lambda norm, max_norm: norms.append(max_norm) or clip_scale(norm, max_norm))
    policy = tiny_lm(n_ctx=12)
    rm = tiny_rm()
    prompts = [np.array([1, 2]), np.array([3, 4])]
    cfg = PolicyConfig(samples_per_prompt=2, max_new_tokens=4)
    runs = [rlhf.policy_step(p, policy.copy(), rm, adamw_init(p.params), prompts, cfg, np.random.default_rng(7), 0)
            for p in (policy.copy(), policy.copy())]
    assert [r.tolist() for r in runs[0]["responses"]] == [r.tolist() for r in runs[1]["responses"]]
    assert norms == [1.0, 1.0]


def test_leave_one_out_with_one_sample_is_refused_by_name():
    with pytest.raises(ValueError, match="a leave-one-out baseline needs samples_per_prompt >= 2, got 1"):
        rlhf.leave_one_out_baseline(np.zeros((3, 1)))


def test_dpo_returns_the_chosen_log_ratio_and_float32_gradients():
    """The third output is log π(y_w) − log π_ref(y_w): 0 when the policy is the reference, and
    it moves by exactly what the policy's own log-probability moved."""
    policy = tiny_lm()
    batch = pairs_of(3).packed()
    ref_terms = rlhf.sequence_logprobs(policy, batch)
    loss, grads, ratio = rlhf.dpo_loss_and_grads(policy, batch, ref_terms, 0.1)[:3]
    np.testing.assert_allclose(ratio, 0.0, atol=1e-5)
    assert {g.dtype for g in grads.values()} == {np.dtype("float32")}
    shifted = (ref_terms[0] - 1.5, ref_terms[1])
    np.testing.assert_allclose(rlhf.dpo_loss_and_grads(policy, batch, shifted, 0.1)[2], 1.5, atol=1e-5)


def test_policy_loss_reports_the_surrogate_and_a_kl_per_sample_and_defaults_to_leave_one_out():
    """beta 0, no baseline: the surrogate is Σ_i r_i · nll_i / N (nll_i summed over response tokens);
    the KL estimate has one entry per sample (0 against itself); the default baseline is loo."""
    policy = tiny_lm(dtype="float64")
    (idx, lengths), _, starts = pairs_of(4).packed()
    inputs, targets = rlhf.response_targets(idx, lengths, starts)
    rewards = np.array([1.0, -2.0, 0.5, 3.0])
    loss, _, kl, _ = rlhf.policy_loss_and_grads(policy, policy, inputs, targets, rewards, 1, 0.0, "none")
    nll = policy.token_nll(inputs, targets)[0].sum(1)
    assert loss == pytest.approx((rewards * nll).sum() / 4, rel=1e-12)
    assert kl.shape == (4,) and np.allclose(kl, 0.0)
    default = rlhf.policy_loss_and_grads(policy, policy, inputs, targets, rewards, 2, 0.1)
    loo = rlhf.policy_loss_and_grads(policy, policy, inputs, targets, rewards, 2, 0.1, "loo")
    np.testing.assert_array_equal(default[3], loo[3])


def test_kl_to_go_sums_each_tokens_future_log_ratios_by_hand():
    logratio = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, -1.0, 0.5, 9.0]])
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 0]], dtype=float)
    np.testing.assert_array_equal(rlhf.kl_to_go(logratio, mask), [[0, 9, 7, 4], [4.5, -0.5, 0.5, 0]])


def test_pairs_file_round_trip_keeps_instructions_and_a_missing_key_is_named(tmp_path):
    pairs = pairs_of(3)
    pairs.instructions = [("cpy", "ab"), ("rev", "ba"), ("cpy", "c")]
    pairs.save(str(tmp_path / "p.json"))
    back = Preferences.load(str(tmp_path / "p.json"))
    assert back.instructions == pairs.instructions
    rows = json.loads((tmp_path / "p.json").read_text())
    del rows[1]["chosen"]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError) as e:
        Preferences.load(str(tmp_path / "p.json"))
    assert str(e.value) == f"pairs file {str(tmp_path / 'p.json')!r}: a pair has no 'chosen' key"


def test_mean_baseline_is_the_batch_mean_for_every_sample():
    rewards = np.array([1.0, 2.0, 4.0, 9.0])
    mean = rlhf.reward_baseline(rewards, 2, "mean")
    assert mean.shape == (4,) and mean.dtype == np.float64
    np.testing.assert_array_equal(mean, np.full(4, 4.0))
    np.testing.assert_array_equal(rlhf.reward_baseline(rewards, 2, "none"), np.zeros(4))


def test_a_policy_step_reports_the_mean_reward_of_its_samples_their_kl_and_advantages():
    """The returned reward is the reward model's mean score of the very responses returned; the
    advantages are r − b with the leave-one-out baseline over each prompt's k samples; kl is a
    finite number (0 at the first step, the policy being the reference)."""
    from tinylm.core.optim import adamw_init
    from tinylm.rlhf.reward import pack
    policy = tiny_lm(n_ctx=12, dtype="float64")
    rm = tiny_rm()
    prompts = [np.array([1, 2]), np.array([3, 4])]
    cfg = PolicyConfig(samples_per_prompt=2, max_new_tokens=4)
    reference = policy.copy()
    out = rlhf.policy_step(policy, reference, rm, adamw_init(policy.params), prompts, cfg,
                           np.random.default_rng(3), 0)
    idx, lengths, _ = pack([p for p in prompts for _ in range(2)], out["responses"])
    scores = rm.rewards(idx, lengths)
    assert out["reward"] == pytest.approx(scores.mean(), rel=1e-12)
    np.testing.assert_allclose(out["advantages"], scores - rlhf.reward_baseline(scores, 2, "loo"), rtol=1e-12)
    assert out["kl"] == pytest.approx(0.0, abs=1e-12)


def test_train_dpo_lowers_the_dpo_loss_and_follows_its_settings():
    """A few epochs of DPO lower the DPO loss on the training pairs against the reference; the run
    is reproducible from its rng and changes with beta, batch size and lr."""
    def run(epochs=3, batch_size=2, lr=1e-2, beta=0.5, seed=0):
        policy = tiny_lm(dtype="float64")
        reference = policy.copy()
        losses = rlhf.train_dpo(policy, reference, pairs_of(4), epochs, batch_size, lr, beta,
                                np.random.default_rng(seed))
        batch = pairs_of(4).packed()
        after = rlhf.dpo_loss_and_grads(policy, batch, rlhf.sequence_logprobs(reference, batch), beta)[0]
        return losses, after, policy.params["wte.weight"]
    losses, after, w = run()
    assert len(losses) == 3 * 2 and losses[0] == pytest.approx(np.log(2), rel=1e-9)   # policy = reference
    assert after < np.log(2) - 0.01
    assert np.array_equal(run()[2], w)
    for changed in (dict(beta=0.1), dict(batch_size=4), dict(lr=1e-3), dict(seed=1), dict(epochs=2)):
        assert not np.array_equal(run(**changed)[2], w), changed
