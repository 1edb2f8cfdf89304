"""Where the reward model reads: the final-layer vector of the LAST real token (position len − 1).
A reader off by one (len − 2, or len = the first pad) fails here: the reward must move when the last
real token changes, and must equal the head applied to z at len − 1 and not at len − 2."""
import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.rlhf.reward import RewardModel

V = 11


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("length", [2, 3, 5])
def test_reward_is_read_at_the_last_real_token_not_the_one_before(seed, length):
    rng = np.random.default_rng(seed)
    config = GPTConfig(vocab_size=V, n_ctx=8, n_layer=1, n_head=2, d_model=8, dtype="float64")
    rm = RewardModel.from_lm(GPT(config, seed=seed))
    rm.params["reward_vector"] += rng.normal(size=config.d_model)
    idx = rng.integers(0, V, size=(1, 7))
    r = rm.rewards(idx, [length])[0]
    z = rm.trunk.hidden(idx)[0][0]                                     # (T, C)
    head = z @ rm.params["reward_vector"] + rm.params["reward_bias"]    # the head at every position
    assert r == pytest.approx(head[length - 1], abs=1e-12)
    assert abs(r - head[length - 2]) > 1e-6
    changed = idx.copy()
    changed[0, length - 1] = (changed[0, length - 1] + 1) % V          # the last real token
    assert abs(rm.rewards(changed, [length])[0] - r) > 1e-9
    padded = idx.copy()
    padded[0, length:] = (padded[0, length:] + 1) % V                  # every pad position
    assert rm.rewards(padded, [length])[0] == pytest.approx(r, abs=1e-12)
