"""RLHF: the reward model, Bradley–Terry, the policy gradient with its KL leash, DPO — properties
(hypothesis), float64 finite-difference checks, and clear errors for bad input."""
import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm import GPT, GPTConfig
from tinylm.core.gradcheck import check_gradients
from tinylm.core.optim import adamw_init
from tinylm.rlhf.reward import (RewardModel, bradley_terry_backward, bradley_terry_forward,
                           bradley_terry_loss_and_grads, pack)
from tinylm.rlhf.policy import (PolicyConfig, Preferences, check_prompts, dpo_loss_and_grads, policy_loss_and_grads,
                         policy_step, policy_token_weights, response_targets, sequence_logprobs,
                         reward_model_accuracy, train_dpo, train_reward_model, train_reward_model_early_stopping)

V = 7


def tiny(seed, scale=0.5, n_ctx=8):
    """A float64 GPT with perturbed weights, so gradients are not those of a symmetric init."""
    model = GPT(GPTConfig(vocab_size=V, n_ctx=n_ctx, n_layer=1, n_head=2, d_model=6, dtype="float64"), seed=seed)
    rng = np.random.default_rng(seed + 1)
    for p in model.params.values():
        p += rng.normal(size=p.shape) * scale
    return model


def random_pairs(rng, n, prompt_len=(1, 3), response_len=(1, 4)):
    prompts = [rng.integers(0, V, size=rng.integers(*prompt_len)) for _ in range(n)]
    chosen = [rng.integers(0, V, size=rng.integers(*response_len)) for _ in range(n)]
    rejected = []
    for w in chosen:
        l = rng.integers(0, V, size=rng.integers(*response_len))
        if len(l) == len(w) and np.array_equal(l, w):
            l = np.append(l, (l[-1] + 1) % V)
        rejected.append(l)
    return Preferences(prompts, chosen, rejected, [("", "")] * n)


def sequence_batch(rng, n):
    """n prompt + response sequences -> packed idx, lengths, starts, and the response targets."""
    pairs = random_pairs(rng, n)
    idx, lengths, starts = pack(pairs.prompts, pairs.chosen)
    return idx, lengths, starts, response_targets(idx, lengths, starts)


# ----------------------------------------------------------------------------- REINFORCE
@given(seed=st.integers(0, 10**6), r=st.one_of(st.just(0.0), st.floats(-3, 3).filter(lambda x: abs(x) > 1e-3)))
def test_reinforce_step_moves_logp_with_the_sign_of_the_reward(seed, r):
    model = tiny(seed)
    idx, lengths, starts, (inputs, targets) = sequence_batch(np.random.default_rng(seed), 1)
    mask = (targets >= 0).astype(float)
    weights = policy_token_weights(np.array([r]), np.zeros_like(mask), mask, beta=0.0)
    _, grads = model.weighted_nll_and_grads(inputs, targets, weights)
    _, grads_nll = model.weighted_nll_and_grads(inputs, targets, mask)       # gradient of −log p
    for k in grads:                                                          # = r × ∇(−log p)
        np.testing.assert_allclose(grads[k], r * grads_nll[k], rtol=1e-12, atol=1e-14)
    before = model.token_logprobs(inputs, targets).sum()
    norm2 = sum(float((g * g).sum()) for g in grads_nll.values())
    lr = 1e-4 / norm2                                                        # a step of ~1e-4·|r| nats
    for k, g in grads.items():
        model.params[k] -= lr * g
    change = model.token_logprobs(inputs, targets).sum() - before
    if r == 0:
        assert change == 0.0
    else:
        assert np.sign(change) == np.sign(r), (r, change)


def exact_objective(policy, reference, prompt, L, reward, beta):
    """E_{y∼π}[r(y)] − β·KL(π ‖ π_ref) by enumerating all V^L responses of length L."""
    ys = np.array(list(itertools.product(range(V), repeat=L)))
    idx = np.concatenate([np.repeat(prompt[None], len(ys), 0), ys], axis=1)
    inputs, targets = response_targets(idx, np.full(len(ys), idx.shape[1]), np.full(len(ys), len(prompt)))
    logp = policy.token_logprobs(inputs, targets).sum(1)
    logp_ref = reference.token_logprobs(inputs, targets).sum(1)
    p = np.exp(logp)
    return float((p * (reward(ys) - beta * (logp - logp_ref))).sum()), ys, inputs, targets, p


@given(seed=st.integers(0, 10**6), beta=st.sampled_from([0.0, 0.3, 1.0]), baseline=st.floats(-1, 1))
def test_policy_gradient_weights_give_the_exact_gradient_of_reward_minus_kl(seed, beta, baseline):
    """Enumerate every response y of length 2: Σ_y π(y)·Σ_t w_t(y)·∇(−log π(y_t)), with the
    weights w = (r − b) − β·G_t, must equal −∇(E[r] − β·KL) computed by finite differences. A
    constant baseline b changes nothing (E ∇log π = 0); the KL-to-go term carries the leash."""
    policy, reference = tiny(seed), tiny(seed + 7)
    prompt = np.random.default_rng(seed).integers(0, V, size=2)
    table = np.random.default_rng(seed + 3).normal(size=(V, V))
    reward = lambda ys: table[ys[:, 0], ys[:, 1]]                        # noqa: E731
    _, ys, inputs, targets, p = exact_objective(policy, reference, prompt, 2, reward, beta)
    mask = (targets >= 0).astype(float)
    logratio = policy.token_logprobs(inputs, targets) - reference.token_logprobs(inputs, targets)
    weights = policy_token_weights(reward(ys) - baseline, logratio, mask, beta)
    _, grads = policy.weighted_nll_and_grads(inputs, targets, p[:, None] * weights)
    errors = check_gradients(lambda: -exact_objective(policy, reference, prompt, 2, reward, beta)[0],
                             policy.params, grads, max_entries=8, seed=seed)
    assert max(errors.values()) <= 1e-6, errors


def expected_baseline(rewards, k, kind):
    """The baselines written out one sample at a time (the code under test works on arrays)."""
    if kind == "none":
        return np.zeros(len(rewards))
    if kind == "mean":
        return np.full(len(rewards), sum(rewards) / len(rewards))
    groups = [list(rewards[i:i + k]) for i in range(0, len(rewards), k)]
    return np.array([(sum(g) - g[j]) / (k - 1) for g in groups for j in range(k)])


@given(seed=st.integers(0, 10**6), beta=st.sampled_from([0.0, 0.1, 1.0]),
       baseline_k=st.sampled_from([("none", 1), ("none", 2), ("mean", 1), ("mean", 3), ("loo", 2), ("loo", 3)]))
def test_policy_surrogate_gradient_matches_finite_differences(seed, beta, baseline_k):
    """Every baseline (k = 1 for the raw rule and the batch mean): the gradient policy_loss_and_grads
    returns is the finite-difference gradient of the surrogate Σ w·(−log π) with the weights frozen."""
    baseline, k = baseline_k
    rng = np.random.default_rng(seed)
    policy, reference = tiny(seed), tiny(seed + 1)
    idx, lengths, starts, (inputs, targets) = sequence_batch(rng, 2 * k)
    rewards = rng.normal(size=2 * k)
    loss, grads, _, advantages = policy_loss_and_grads(policy, reference, inputs, targets, rewards, k, beta, baseline)
    np.testing.assert_allclose(advantages, rewards - expected_baseline(rewards, k, baseline), rtol=1e-12, atol=1e-15)
    weights = policy_token_weights(
        advantages, policy.token_logprobs(inputs, targets) - reference.token_logprobs(inputs, targets),
        (targets >= 0).astype(float), beta) / len(rewards)
    errors = check_gradients(lambda: policy.weighted_nll_and_grads(inputs, targets, weights)[0],
                             policy.params, grads, max_entries=8, seed=seed)
    assert max(errors.values()) <= 1e-6, errors


def test_baselines_are_checked_and_k1_is_allowed_without_leave_one_out():
    assert PolicyConfig(baseline="none", samples_per_prompt=1).samples_per_prompt == 1
    assert PolicyConfig(baseline="mean", samples_per_prompt=1).baseline == "mean"
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2 for the leave-one-out baseline"):
        PolicyConfig(baseline="loo", samples_per_prompt=1)
    with pytest.raises(ValueError, match="baseline must be one of none, mean, loo, got 'median'"):
        PolicyConfig(baseline="median")


class ConstantReward:
    """A stand-in reward model that gives every response the same score r."""
    def __init__(self, r):
        self.r = r

    def check_vocab(self, config):
        pass

    def rewards(self, idx, lengths):
        return np.full(len(idx), self.r)


@given(seed=st.integers(0, 10**6), r=st.one_of(st.just(0.0), st.floats(-3, 3).filter(lambda x: abs(x) > 1e-2)))
def test_raw_reward_sign_moves_logp_on_the_cli_path(seed, r):
    """The lecture's rule on the path `tinylm rlhf policy --baseline none --samples-per-prompt 1`
    runs (policy_step: sample, score, AdamW step): a positive raw reward raises log π of the sampled
    responses, a negative one lowers it, zero leaves every weight as it was. (With a leave-one-out
    baseline a constant reward gives zero advantage: the sign of the raw reward would not matter.)"""
    policy, rng = tiny(seed), np.random.default_rng(seed)
    reference = policy.copy()
    prompts = [rng.integers(1, V, size=2) for _ in range(3)]
    cfg = PolicyConfig(baseline="none", samples_per_prompt=1, beta=0.0, lr=1e-5, max_new_tokens=3)
    out = policy_step(policy, reference, ConstantReward(r), adamw_init(policy.params), prompts, cfg, rng, eot_id=0)
    idx, lengths, starts = pack(prompts, out["responses"])
    inputs, targets = response_targets(idx, lengths, starts)
    change = policy.token_logprobs(inputs, targets).sum() - reference.token_logprobs(inputs, targets).sum()
    if r == 0:
        assert all(np.array_equal(policy.params[k], reference.params[k]) for k in policy.params)
    else:
        assert np.sign(change) == np.sign(r), (r, change)


def test_kl_is_zero_when_policy_is_reference():
    rng = np.random.default_rng(0)
    policy = tiny(0)
    _, _, _, (inputs, targets) = sequence_batch(rng, 4)
    _, _, kl, _ = policy_loss_and_grads(policy, policy.copy(), inputs, targets, rng.normal(size=4), 2, beta=1.0)
    assert np.all(kl == 0.0)


# ----------------------------------------------------------------------------- Bradley–Terry
pairs_of_rewards = st.integers(1, 6).flatmap(lambda n: st.tuples(
    st.lists(st.floats(-8, 8), min_size=n, max_size=n), st.lists(st.floats(-8, 8), min_size=n, max_size=n)))


@given(rewards=pairs_of_rewards)
def test_bradley_terry_properties(rewards):
    r_w, r_l = map(np.array, rewards)
    loss, margin = bradley_terry_forward(r_w, r_l)
    dr_w, dr_l = bradley_terry_backward(margin)
    assert math.isclose(bradley_terry_forward(r_w, r_w)[0], math.log(2), rel_tol=1e-12)
    assert np.all(dr_w < 0) and np.all(dr_l > 0)               # descent pushes r_w up, r_l down
    swapped_l, swapped_w = bradley_terry_backward(bradley_terry_forward(r_l, r_w)[1])
    assert np.all(np.sign(swapped_w) == -np.sign(dr_w)) and np.all(np.sign(swapped_l) == -np.sign(dr_l))
    step = 1e-3
    assert bradley_terry_forward(r_w - step * dr_w, r_l - step * dr_l)[0] < loss


@given(seed=st.integers(0, 10**6))
def test_reward_model_gradients_match_finite_differences(seed):
    rng = np.random.default_rng(seed)
    rm = RewardModel.from_lm(tiny(seed))
    rm.params["reward_vector"] += rng.normal(size=rm.params["reward_vector"].shape)
    chosen, rejected, _ = random_pairs(rng, 3).packed()
    loss, grads, _, _ = bradley_terry_loss_and_grads(rm, chosen, rejected)
    assert set(grads) == set(rm.params)
    errors = check_gradients(lambda: bradley_terry_loss_and_grads(rm, chosen, rejected)[0], rm.params, grads,
                             max_entries=8, seed=seed)
    assert max(errors.values()) <= 1e-6, errors


def test_reward_model_starts_at_ln2_and_training_orders_the_pairs():
    rng = np.random.default_rng(0)
    rm = RewardModel.from_lm(tiny(0, scale=0.1))
    pairs = random_pairs(rng, 8)
    chosen, rejected, _ = pairs.packed()
    assert math.isclose(bradley_terry_loss_and_grads(rm, chosen, rejected)[0], math.log(2), rel_tol=1e-12)
    losses = train_reward_model(rm, pairs, epochs=30, batch_size=8, lr=1e-2, rng=rng)
    assert losses[-1] < 0.5 * losses[0]


@given(seed=st.integers(0, 10**6))
def test_centring_makes_reference_responses_score_mean_zero_and_keeps_every_preference(seed):
    """reward_bias gets no gradient from Bradley–Terry (it cancels in r_w − r_l); RewardModel.centre
    is its one use: the reference's responses then score mean 0 and every pairwise margin, so the
    loss and its gradients, are unchanged."""
    rng = np.random.default_rng(seed)
    rm = RewardModel.from_lm(tiny(seed))
    rm.params["reward_vector"] += rng.normal(size=rm.params["reward_vector"].shape)
    rm.params["reward_bias"] += 0.7                     # centring shifts the bias it finds, not from 0
    chosen, rejected, _ = random_pairs(rng, 4).packed()
    loss, grads, r_w, r_l = bradley_terry_loss_and_grads(rm, chosen, rejected)
    assert abs(float(grads["reward_bias"])) <= 1e-12
    idx, lengths, _ = pack(*(lambda p: (p.prompts, p.chosen))(random_pairs(rng, 5)))
    before = rm.rewards(idx, lengths)
    shift = rm.centre(idx, lengths)
    assert shift == -before.mean()
    assert abs(rm.rewards(idx, lengths).mean()) <= 1e-12
    loss2, _, r_w2, r_l2 = bradley_terry_loss_and_grads(rm, chosen, rejected)
    np.testing.assert_allclose(r_w2 - r_w, shift, rtol=1e-12)
    np.testing.assert_allclose(r_w2 - r_l2, r_w - r_l, rtol=1e-9, atol=1e-12)
    assert math.isclose(loss2, loss, rel_tol=1e-12)


def test_early_stopping_keeps_the_best_validation_epoch():
    """Validation pairs that are the training pairs with their labels swapped: every epoch makes
    them worse, so the best epoch is the first, and the model must end with its weights (without
    the restore it would keep the last, worst epoch's)."""
    rng = np.random.default_rng(0)
    rm = RewardModel.from_lm(tiny(0, scale=0.1))
    pairs = random_pairs(rng, 8)
    swapped = Preferences(pairs.prompts, pairs.rejected, pairs.chosen, pairs.instructions)
    accuracies = train_reward_model_early_stopping(rm, pairs, swapped, epochs=6, batch_size=8, lr=1e-2, rng=rng)
    assert len(accuracies) == 6 and accuracies[-1] < accuracies[0] == max(accuracies)
    assert reward_model_accuracy(rm, swapped) == accuracies[0]
    assert rm.trunk.params["wte.weight"] is rm.params["wte.weight"]     # restored in place: still shared


# ----------------------------------------------------------------------------- reward head
@given(seed=st.integers(0, 10**6), pad=st.integers(1, 3))
def test_reward_head_reads_the_last_real_token(seed, pad):
    rng = np.random.default_rng(seed)
    rm = RewardModel.from_lm(tiny(seed))
    rm.params["reward_vector"] += rng.normal(size=rm.params["reward_vector"].shape)
    idx = rng.integers(0, V, size=(1, 4))
    r = rm.rewards(idx, [4])
    padded = np.concatenate([idx, rng.integers(0, V, size=(1, pad))], axis=1)   # right padding, any ids
    np.testing.assert_allclose(rm.rewards(padded, [4]), r, rtol=1e-12)
    changed = idx.copy()
    changed[0, 2] = (changed[0, 2] + 1) % V                                       # a response token
    assert abs(rm.rewards(changed, [4])[0] - r[0]) > 1e-9
    # z_1 has seen only the first token: the reward read there ignores every later one.
    np.testing.assert_allclose(rm.rewards(changed, [1]), rm.rewards(idx, [1]), rtol=1e-12)


# ----------------------------------------------------------------------------- DPO
@given(seed=st.integers(0, 10**6), beta=st.sampled_from([0.1, 0.5, 2.0]))
def test_dpo_starts_at_ln2_and_its_step_raises_the_chosen_log_ratio(seed, beta):
    rng = np.random.default_rng(seed)
    policy = tiny(seed)
    reference = policy.copy()
    batch = random_pairs(rng, 3).packed()
    ref = sequence_logprobs(reference, batch)
    loss, grads = dpo_loss_and_grads(policy, batch, ref, beta)[:2]
    assert math.isclose(loss, math.log(2), rel_tol=1e-12)
    lp_w, lp_l = sequence_logprobs(policy, batch)
    margin = (lp_w - ref[0]) - (lp_l - ref[1])
    norm2 = sum(float((g * g).sum()) for g in grads.values())
    for k, g in grads.items():
        policy.params[k] -= 1e-3 / norm2 * g
    lp_w, lp_l = sequence_logprobs(policy, batch)
    assert ((lp_w - ref[0]) - (lp_l - ref[1])).mean() > margin.mean()


@given(seed=st.integers(0, 10**6), beta=st.sampled_from([0.1, 1.0]))
def test_dpo_gradients_match_finite_differences(seed, beta):
    rng = np.random.default_rng(seed)
    policy, reference = tiny(seed), tiny(seed + 1)
    batch = random_pairs(rng, 3).packed()
    ref = sequence_logprobs(reference, batch)
    grads = dpo_loss_and_grads(policy, batch, ref, beta).grads
    errors = check_gradients(lambda: dpo_loss_and_grads(policy, batch, ref, beta)[0], policy.params, grads,
                             max_entries=8, seed=seed)
    assert max(errors.values()) <= 1e-6, errors


# ----------------------------------------------------------------------------- bad input
def test_empty_or_degenerate_preference_sets_are_refused():
    rm, rng = RewardModel.from_lm(tiny(0)), np.random.default_rng(0)
    empty = Preferences([], [], [], [])
    with pytest.raises(ValueError, match="preference set is empty"):
        train_reward_model(rm, empty, 1, 4, 1e-3, rng)
    with pytest.raises(ValueError, match="preference set is empty"):
        train_dpo(tiny(0), tiny(0), empty, 1, 4, 1e-3, 0.1, rng)
    same = Preferences([np.array([1])], [np.array([2, 3])], [np.array([2, 3])], [("", "")])
    before = {k: v.copy() for k, v in rm.params.items()}
    with pytest.raises(ValueError, match="pair 0 has identical chosen and rejected"):
        train_reward_model(rm, same, 1, 4, 1e-3, rng)
    assert all(np.array_equal(before[k], rm.params[k]) for k in before)


def test_instruction_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="instruction 1 has 7 tokens; with max_new_tokens=3 it needs 1..5"):
        check_prompts([np.arange(2), np.arange(7)], 3, tiny(0).config)


def test_nan_reward_is_refused_before_any_update():
    policy, rng = tiny(0), np.random.default_rng(0)
    _, _, _, (inputs, targets) = sequence_batch(rng, 2)
    with pytest.raises(ValueError, match="reward of sample 1 is nan"):
        policy_loss_and_grads(policy, policy.copy(), inputs, targets, np.array([0.5, np.nan]), 2, 0.1)


def test_reward_model_and_policy_must_share_a_vocabulary():
    rm = RewardModel.from_lm(tiny(0))
    other = GPT(GPTConfig(vocab_size=V + 1, n_ctx=8, n_layer=1, n_head=2, d_model=6, dtype="float64"))
    before = {k: v.copy() for k, v in other.params.items()}
    with pytest.raises(ValueError, match=r"reward model vocab_size=7 differs from the policy's vocab_size=8"):
        policy_step(other, other.copy(), rm, None, [np.array([1, 2])], PolicyConfig(), np.random.default_rng(0), 0)
    assert all(np.array_equal(before[k], other.params[k]) for k in before)
