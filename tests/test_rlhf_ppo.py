"""PPO-clip and GRPO: the clipped surrogate's gradient (finite differences, float64), its signs
(hypothesis: a higher advantage raises that sample's log-probability; clipping stops the push past
1 ± ε and leaves the other side), GRPO's group-normalised advantages, the adaptive KL controller
and best-of-n."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm.core.gradcheck import check_gradients
from tinylm.rlhf.policy import (PolicyConfig, adaptive_kl_beta, best_of_n, clipped_loss_and_grads,
                         clipped_surrogate_backward, clipped_surrogate_forward, group_normalised_advantages,
                         policy_loss_and_grads, policy_token_weights)
from test_rlhf import V, sequence_batch, tiny  # noqa: E402  (tests/ is on sys.path)


def surrogate_gradient(ratio, advantage, eps):
    """∂loss/∂log π for one token at ratio ρ with advantage A."""
    logp = np.array([[np.log(ratio)]])
    _, cache = clipped_surrogate_forward(logp, np.zeros((1, 1)), np.array([[advantage]]), eps)
    return clipped_surrogate_backward(cache)[0, 0]


@given(seed=st.integers(0, 10**6), eps=st.sampled_from([0.1, 0.2, 0.5]))
def test_clipped_surrogate_gradient_matches_finite_differences(seed, eps):
    """The whole model, float64: ratios spread over both sides of the clip range (logp_old is the
    policy's own log-probability plus noise), advantages of both signs, every token's."""
    rng = np.random.default_rng(seed)
    policy = tiny(seed)
    _, _, _, (inputs, targets) = sequence_batch(rng, 4)
    mask = targets >= 0
    logp_old = policy.token_logprobs(inputs, targets) + rng.normal(scale=0.5, size=targets.shape) * mask
    advantages = rng.normal(size=targets.shape) * mask
    out = clipped_loss_and_grads(policy, inputs, targets, advantages, logp_old, eps)
    errors = check_gradients(lambda: clipped_loss_and_grads(policy, inputs, targets, advantages, logp_old, eps).loss,
                             policy.params, out.grads, max_entries=8, seed=seed)
    assert max(errors.values()) <= 1e-6, errors


@given(logratio=st.floats(-2, 2), advantage=st.floats(-3, 3), eps=st.sampled_from([0.1, 0.2, 0.3]))
def test_surrogate_gradient_by_finite_differences_of_one_token(logratio, advantage, eps):
    """One token away from the clip edges: −ρ·A/N inside or on the pushing side, 0 past the edge."""
    ratio = np.exp(logratio)
    if min(abs(ratio - 1 - eps), abs(ratio - 1 + eps)) < 1e-4:
        return                                   # the kink: no derivative there
    h = 1e-6

    def loss(x):
        return clipped_surrogate_forward(np.array([[x]]), np.zeros((1, 1)), np.array([[advantage]]), eps)[0]
    fd = (loss(logratio + h) - loss(logratio - h)) / (2 * h)
    assert surrogate_gradient(ratio, advantage, eps) == pytest.approx(fd, rel=1e-6, abs=1e-8)


@given(ratio=st.floats(0.3, 3.0), advantage=st.floats(0.01, 3), eps=st.sampled_from([0.1, 0.2, 0.3]))
def test_clipping_stops_the_push_past_the_edge_and_leaves_the_other_side(ratio, advantage, eps):
    """A > 0: the loss pulls log π up (gradient < 0) until ρ > 1 + ε, then not at all; below 1 − ε it
    still pulls (the pessimistic min). A < 0: the mirror image. A flipped branch test
    (`unclipped >= clipped`) or a flipped sign fails this."""
    for a in (advantage, -advantage):
        g = surrogate_gradient(ratio, a, eps)
        past_the_edge = ratio > 1 + eps if a > 0 else ratio < 1 - eps
        if past_the_edge:
            assert g == 0.0, (ratio, a, g)
        else:
            assert np.sign(g) == -np.sign(a), (ratio, a, g)
            assert g == pytest.approx(-ratio * a)


@given(seed=st.integers(0, 10**6), r=st.floats(-3, 3).filter(lambda x: abs(x) > 1e-3))
def test_a_higher_advantage_raises_that_samples_log_probability(seed, r):
    """One clipped step with advantage r on one sample moves its log-probability with the sign of r,
    and at ρ = 1 (the first step on fresh samples) its gradient is REINFORCE's."""
    model = tiny(seed)
    _, _, _, (inputs, targets) = sequence_batch(np.random.default_rng(seed), 1)
    mask = (targets >= 0).astype(float)
    before = model.token_logprobs(inputs, targets)
    token_adv = policy_token_weights(np.array([r]), np.zeros_like(mask), mask, beta=0.0)
    out = clipped_loss_and_grads(model, inputs, targets, token_adv, before, eps=0.2)
    reinforce = policy_loss_and_grads(model, model, inputs, targets, np.array([r]), 1, 0.0, "none")
    for k in out.grads:
        np.testing.assert_allclose(out.grads[k], reinforce.grads[k], rtol=1e-10, atol=1e-14)
    norm2 = sum(float((g * g).sum()) for g in out.grads.values())
    for k, g in out.grads.items():
        model.params[k] -= 1e-4 / norm2 * g
    assert np.sign(model.token_logprobs(inputs, targets).sum() - before.sum()) == np.sign(r)


@given(rewards=st.lists(st.floats(-5, 5), min_size=6, max_size=6), k=st.sampled_from([2, 3]))
def test_group_normalised_advantages_are_standardised_within_each_group(rewards, k):
    rewards = np.array(rewards)
    adv = group_normalised_advantages(rewards, k).reshape(-1, k)
    groups = rewards.reshape(-1, k)
    for a, g in zip(adv, groups):
        assert abs(a.mean()) < 1e-9
        if g.std() > 1e-6:
            assert a.std() == pytest.approx(1.0, rel=1e-5)
            assert np.all(np.diff(a[np.argsort(g, kind="stable")]) >= -1e-12)   # order kept
        else:
            np.testing.assert_allclose(a, 0.0, atol=1e-6)


def test_adaptive_kl_moves_beta_toward_the_target_and_by_at_most_the_gain_times_20_percent():
    assert adaptive_kl_beta(0.1, 2.0, 1.0) == pytest.approx(0.1 * 1.02)       # KL 2× target: +0.1·0.2
    assert adaptive_kl_beta(0.1, 0.5, 1.0) == pytest.approx(0.1 * (1 - 0.1 * 0.2))
    assert adaptive_kl_beta(0.1, 1.05, 1.0) == pytest.approx(0.1 * 1.005)
    assert adaptive_kl_beta(0.1, 1.0, 1.0) == 0.1
    with pytest.raises(ValueError, match="adaptive KL needs kl_target > 0 and a starting beta > 0"):
        PolicyConfig(beta=0.0, kl_target=1.0)
    with pytest.raises(ValueError, match="algorithm must be one of reinforce, ppo, grpo"):
        PolicyConfig(algorithm="a2c")
    with pytest.raises(ValueError, match="need ppo_epochs >= 1 and 0 < clip_eps < 1"):
        PolicyConfig(algorithm="ppo", clip_eps=1.0)


class ScoreLastToken:
    """A stand-in reward model: the reward is the response's last token id."""

    def rewards(self, idx, lengths):
        return idx[np.arange(len(idx)), lengths - 1].astype(float)


def test_best_of_n_keeps_the_highest_scored_sample_of_each_prompt():
    model = tiny(0, n_ctx=6)
    prompts = [np.array([1, 2]), np.array([3])]
    rng = np.random.default_rng(0)
    best = best_of_n(model, ScoreLastToken(), prompts, 8, 3, 1.0, rng, eot_id=V)   # eot never sampled
    again = np.random.default_rng(0)
    from tinylm.rlhf.policy import sample_responses
    samples = sample_responses(model, [p for p in prompts for _ in range(8)], 3, 1.0, again, V)
    for i, response in enumerate(best):
        assert response[-1] == max(s[-1] for s in samples[8 * i:8 * i + 8])


# ----------------------------------------------------------------------------- SFT
def test_sft_is_cross_entropy_on_the_response_tokens_only_and_lowers_it():
    """The first step's loss is the mean −log p over the demonstrations' tokens (the prompts carry
    none of it); training lowers it; a demonstration count that does not match is refused."""
    from tinylm.rlhf.reward import pack
    from tinylm.rlhf.policy import response_targets, train_sft
    model = tiny(3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, V, size=2) for _ in range(6)]
    demos = [rng.integers(0, V, size=3) for _ in range(6)]
    batch = pack(prompts, demos)
    inputs, targets = response_targets(batch.idx, batch.lengths, batch.starts)
    by_hand = float(model.token_nll(inputs, targets)[0].sum() / (targets >= 0).sum())
    assert (targets >= 0).sum() == 6 * 3
    losses = train_sft(model, prompts, demos, 20, 6, 1e-2, rng)
    assert losses[0] == pytest.approx(by_hand, rel=1e-10) and losses[-1] < 0.7 * losses[0]
    with pytest.raises(ValueError, match="one demonstration per prompt"):
        train_sft(model, prompts, demos[:3], 1, 6, 1e-2, rng)


def test_demonstrations_are_the_right_answers_ending_in_end_of_text():
    from tinylm.rlhf.environment import TOKENIZER, demonstrations, successes
    instructions = [("rev", "cab"), ("len", "ab"), ("upp", "de")]
    prompts, responses = demonstrations(instructions)
    assert [TOKENIZER.decode(r) for r in responses] == ["bac", "2", "DE"]
    assert all(r[-1] == TOKENIZER.eot_id for r in responses) and successes(instructions, responses).all()
    assert TOKENIZER.decode(prompts[0]) == "rev cab:"
