"""End to end at small scale: a few policy-gradient steps against a trained reward model raise
what the reward model scores and what the labeller counts as right — and the same steps fed
negated rewards lower both, so the test fails for a sign error anywhere on that path."""
from dataclasses import replace

import numpy as np
import pytest

from tinylm.rlhf import environment, pipeline
from tinylm.core.optim import adamw_init
from tinylm.rlhf.reward import RewardModel
from tinylm.rlhf.policy import PolicyConfig, policy_step, train_reward_model
from tinylm.rlhf.world import Labeller, World


class Negated:
    """The planted bug: the reward model's scores with the sign flipped."""
    def __init__(self, rm):
        self.rm = rm

    def check_vocab(self, config):
        self.rm.check_vocab(config)

    def rewards(self, idx, lengths):
        return -self.rm.rewards(idx, lengths)


@pytest.fixture(scope="module")
def small_world():
    """A seeded 2-letter world (25 letter strings), a 1-layer d_model 32 base pretrained for 400
    steps, and a reward model trained 3 epochs on its labelled pairs (noise-free labels)."""
    rng = np.random.default_rng(0)
    world, labeller = World(seed=0, max_len=2, p_follow=0.5), Labeller(0.0, seed=0)
    model = replace(pipeline.DemoConfig().model, d_model=32, n_layer=1, n_head=2)
    base = environment.pretrain_base(world, model, environment.PretrainConfig(steps=400, batch=32), 0, rng,
                                     progress=False)
    rm = RewardModel.from_lm(base)
    train_reward_model(rm, environment.make_pairs(base, world.instructions(1500, rng), labeller, 7, rng), 3, 32, 1e-3, rng)
    return world, base, rm


def after_rl(small_world, reward_model, steps=30):
    """(before, after) evaluate() dicts for `steps` policy steps against reward_model."""
    world, base, rm = small_world
    rng = np.random.default_rng(1)
    policy, opt = base.copy(), adamw_init(base.params)
    cfg = PolicyConfig(lr=1e-3, prompts_per_step=16)
    for _ in range(steps):
        policy_step(policy, base, reward_model, opt, environment.encode_prompts(world.instructions(16, rng)), cfg, rng,
                    environment.TOKENIZER.eot_id)
    held = world.instructions(100, np.random.default_rng(2))
    return tuple(environment.evaluate(model, base, rm, held, 2, 7, np.random.default_rng(3)) for model in (base, policy))


def test_policy_steps_raise_reward_and_labeller_success(small_world):
    before, after = after_rl(small_world, small_world[2])
    assert after["reward"] > before["reward"] + 0.2, (before, after)
    assert after["success"] > before["success"] + 0.05, (before, after)


def test_negated_rewards_lower_both(small_world):
    """The check above, fed negated rewards, must fail: both numbers fall instead."""
    before, after = after_rl(small_world, Negated(small_world[2]))
    assert after["reward"] < before["reward"] and after["success"] < before["success"], (before, after)
