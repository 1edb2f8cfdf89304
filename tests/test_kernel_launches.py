"""How many kernels a training step launches on the kernel path, counted under the CUDA simulator
(kernels.launch.recording_launches) and held here, so a change that adds launches is seen.

Per step of an attention model with L layers (train.train_step: loss_and_grads -> clip -> AdamW):
    matmul        12·L + 3   (per block: qkv, proj, fc, fc_proj forward and 2 backward each; the LM head's 3)
    AdamW         12·L + 4   one launch per parameter tensor (12 per block; wte, wpe, final layernorm's 2)
    layernorm     2·(2·L + 1) forward and backward;  flash 4·L (forward, row_dot, dk_dv, dq)
    gelu          2·L;  cross-entropy 1
    total         34·L + 10: 146 for the core config (4 layers), 418 for GPT-2 small (12)
Not yet done (issue 21): a multi-tensor AdamW (one launch instead of 12·L + 4) and a device-side
clip; the host synchronisations per step are not counted here."""
from collections import Counter

import numpy as np
import pytest
from numba import config

from tinylm import GPT, GPTConfig
from tinylm.kernels.launch import recording_launches
from tinylm.core.optim import Schedule, adamw_init
from tinylm.core.optim import train_step

pytestmark = pytest.mark.skipif(not config.ENABLE_CUDASIM, reason="counts launches under the CUDA simulator")


def expected(L):
    return {"matmul_kernel": 12 * L + 3, "adamw_kernel": 12 * L + 4,
            "layernorm_forward_kernel": 2 * L + 1, "layernorm_backward_kernel": 2 * L + 1,
            "forward_kernel": L, "row_dot_kernel": L, "dk_dv_kernel": L, "dq_kernel": L,
            "gelu_forward_kernel": L, "gelu_backward_kernel": L, "softmax_cross_entropy_kernel": 1}


@pytest.mark.parametrize("n_layer", [1, 2])
def test_launches_per_training_step(n_layer):
    model = GPT(GPTConfig(vocab_size=11, n_ctx=8, n_layer=n_layer, n_head=2, d_model=12), device="cpu",
                kernels=True, seed=1)
    idx, targets = np.random.default_rng(0).integers(0, 11, size=(2, 2, 3))
    with recording_launches() as launches:
        train_step(model, adamw_init(model.params), idx, targets, Schedule.constant(1e-3))
    assert Counter(launch.kernel for launch in launches) == expected(n_layer)
    assert len(launches) == 34 * n_layer + 10
    assert sum(expected(4).values()) == 146                  # the core config's step
