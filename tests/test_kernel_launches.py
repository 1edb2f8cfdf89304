"""How many kernels a training step launches on the kernel path, and how many times the host waits
for the device, counted under the CUDA simulator (kernels.launch.recording_launches,
kernel_layers.counting_host_reads) and held here, so a change that adds either is seen.

Per step of an attention model with L layers (optim.train_step: loss_and_grads -> clip -> AdamW):
    matmul        12·L + 3   (per block: qkv, proj, fc, fc_proj forward and 2 backward each; the LM head's 3)
    AdamW         1          one launch over the flat arena of every parameter (was 12·L + 4, one per tensor)
    Σ g²          1          the clipping norm on the device (was CuPy/NumPy sums and a host read)
    layernorm     2·(2·L + 1) forward and backward;  flash 4·L (forward, row_dot, dk_dv, dq)
    gelu          2·L;  cross-entropy 1
    total         22·L + 8: 96 for the core config (4 layers), 272 for GPT-2 small (12); was 34·L + 10
Not counted (not Numba launches): the CuPy/NumPy work between them (bias sums, residual adds, the
embedding scatter) and the 12·L + 4 copies that gather the gradients into the flat arena.

Host reads per step: 1, the (loss, Σ g²) pair optimizer_step needs for Step (was 2 here, the loss and
the norm, and on a GPU 7 more from checking device batches). Counted: reads made through
kernel_layers.to_host, the kernel path's one way back to the host; a float() of a device array
elsewhere is not seen under the simulator (NumPy arrays stand in for CuPy's there), which is why the
GPU bench's graph capture, where any read back is an error, is the check that covers it."""
from collections import Counter

import numpy as np
import pytest
from numba import config

from tinylm import GPT, GPTConfig
from tinylm.kernels.launch import recording_launches
from tinylm.core import kernel_layers
from tinylm.core.optim import Schedule, adamw_init
from tinylm.core.optim import train_step

pytestmark = pytest.mark.skipif(not config.ENABLE_CUDASIM, reason="counts launches under the CUDA simulator")


def expected(L):
    return {"matmul_kernel": 12 * L + 3, "adamw_flat_kernel": 1, "sum_of_squares_kernel": 1,
            "layernorm_forward_kernel": 2 * L + 1, "layernorm_backward_kernel": 2 * L + 1,
            "forward_kernel": L, "row_dot_kernel": L, "dk_dv_kernel": L, "dq_kernel": L,
            "gelu_forward_kernel": L, "gelu_backward_kernel": L, "softmax_cross_entropy_kernel": 1}


def counted_step(n_layer):
    """(launches, host reads) of the second training step (the first also builds the arena)."""
    model = GPT(GPTConfig(vocab_size=11, n_ctx=8, n_layer=n_layer, n_head=2, d_model=12), device="cpu",
                kernels=True, seed=1)
    idx, targets = np.random.default_rng(0).integers(0, 11, size=(2, 2, 3))
    state = adamw_init(model.params)
    train_step(model, state, idx, targets, Schedule.constant(1e-3))
    with recording_launches() as launches, kernel_layers.counting_host_reads() as reads:
        train_step(model, state, idx, targets, Schedule.constant(1e-3))
    return launches, reads


@pytest.mark.parametrize("n_layer", [1, 2])
def test_launches_and_host_reads_per_training_step(n_layer):
    launches, reads = counted_step(n_layer)
    assert Counter(launch.kernel for launch in launches) == expected(n_layer)
    assert len(launches) == 22 * n_layer + 8
    assert sum(expected(4).values()) == 96                   # the core config's step
    assert reads == ["loss and Σ g²"]


def test_every_launch_of_a_step_goes_on_the_chosen_stream(tf32_step_launches):
    """A CUDA graph is captured from one stream: a launch left on the legacy stream (kernel[grid,
    threads] without launch.stream()) races it and breaks the capture; under on_stream every one of
    a tf32="3x" step's launches, the tensor-core GEMM included, must name the stream. The steps
    (tests/conftest.py's tf32_step_launches: a 1-layer model, d_model 12, its first step outside on_stream,
    its second inside) are shared with tests/test_kernel_report.py."""
    launches, stream = tf32_step_launches["stream"], tf32_step_launches["stream_object"]
    assert {launch.kernel for launch in launches} >= {"matmul_tf32_kernel", "forward_kernel", "adamw_flat_kernel"}
    assert [launch.kernel for launch in launches if launch.stream is not stream] == []
    default = tf32_step_launches["default"]
    assert {launch.kernel for launch in default} >= {"matmul_tf32_kernel", "forward_kernel", "adamw_flat_kernel"}
    assert {launch.stream for launch in default} == {0}        # outside on_stream: the default


def test_the_read_counter_sees_a_planted_read_of_the_norm(monkeypatch):
    """The old clip's read of the norm, planted back into the step, shows as a second host read."""
    enqueue = kernel_layers.enqueue_update

    def enqueue_and_read_the_norm(arena, grads, loss):
        enqueue(arena, grads, loss)
        kernel_layers.to_host(arena.stats[0], "the norm, read to clip on the host")
    monkeypatch.setattr(kernel_layers, "enqueue_update", enqueue_and_read_the_norm)
    _, reads = counted_step(1)
    assert reads == ["the norm, read to clip on the host", "loss and Σ g²"]


def test_the_graph_step_refuses_the_simulator_with_a_clear_error():
    model = GPT(GPTConfig(vocab_size=11, n_ctx=8, n_layer=1, n_head=2, d_model=12), device="cpu", kernels=True)
    with pytest.raises(RuntimeError, match="needs a GPU.*use optim.train_step"):
        kernel_layers.GraphStep(model, adamw_init(model.params))
