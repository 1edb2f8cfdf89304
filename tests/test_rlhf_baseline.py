"""The leave-one-out baseline (RLOO) against a hand computation at k = 3 and 4, where "mean of the
other k − 1" differs from "the other sample" (k = 2) and from the plain mean. A baseline that drops
the /(k − 1), divides by k, or keeps each sample's own reward fails here."""
import numpy as np
import pytest

from tinylm.rlhf.policy import leave_one_out_baseline


@pytest.mark.parametrize("rewards, expected", [
    # k = 3: b_1 = (2 + 4)/2, b_2 = (1 + 4)/2, b_3 = (1 + 2)/2
    ([[1.0, 2.0, 4.0]], [[3.0, 2.5, 1.5]]),
    # k = 4, two prompts: b_i = (sum − r_i)/3
    ([[0.0, 3.0, 6.0, 9.0], [1.0, 1.0, 1.0, -2.0]], [[6.0, 5.0, 4.0, 3.0], [0.0, 0.0, 0.0, 1.0]]),
])
def test_leave_one_out_baseline_is_mean_of_the_other_samples(rewards, expected):
    np.testing.assert_allclose(leave_one_out_baseline(np.array(rewards)), expected, rtol=0, atol=1e-12)
