"""The Numba CUDA kernels against the NumPy code they must match (within 1e-5, float32), on tiny
ragged shapes. Under the CUDA simulator (tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1 unless told
otherwise) they take NumPy arrays; on a real GPU (bench/gpu_check.sh) the same tests pass CuPy
arrays. Plus: every kernel compiles to sm_90 PTX without a float64 instruction."""
import os
import subprocess
import sys

import numpy as np
import pytest
from numba import config

from tinylm.kernels import fused, ptx_check
from tinylm.kernels.matmul import matmul
from tinylm.core.backend import to_numpy
from tinylm.core import layers
from tinylm.core.layers import (cross_entropy_backward, cross_entropy_forward, gelu_backward, gelu_forward,
                           layernorm_backward, layernorm_forward)
from tinylm.core.optim import adamw_init, adamw_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_TILE = (16, 32, 16, 16, 32, 1, 1)  # one warp: the simulator runs one Python thread per CUDA thread


def device(x):
    """float32 input for a kernel: NumPy under the simulator, CuPy on a real GPU."""
    x = np.asarray(x, dtype=np.float32) if np.asarray(x).dtype.kind == "f" else np.asarray(x)
    if config.ENABLE_CUDASIM:
        return x
    import cupy
    return cupy.asarray(x)


def close(got, want):
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-5, atol=1e-5)


def data(rng, *shape):
    """float32 values and the same values in float64, for the NumPy reference."""
    x = rng.normal(size=shape).astype(np.float32)
    return x, x.astype(np.float64)


# ----------------------------------------------------------------------------- matmul
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
# no dimension a multiple of the tile; (20, 36, 40): rows a multiple of 4, the 128-bit-load build
@pytest.mark.parametrize("M,N,K", [(17, 23, 9), (33, 5, 18), (20, 36, 40)])
def test_matmul_matches_numpy(M, N, K, trans_a, trans_b):
    rng = np.random.default_rng(M + K)
    a, a64 = data(rng, *((K, M) if trans_a else (M, K)))
    b, b64 = data(rng, *((N, K) if trans_b else (K, N)))
    want = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
    close(matmul(device(a), device(b), trans_a, trans_b, tile=SMALL_TILE), want)


def test_matmul_default_tile_and_strided_views():
    """The real tile size (one 128×128 block) and a transposed *view* read through its strides."""
    rng = np.random.default_rng(0)
    a, a64 = data(rng, 19, 13)
    b, b64 = data(rng, 7, 13)
    close(matmul(device(a), device(b).T), a64 @ b64.T)


def test_matmul_rejects_bad_input():
    a = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="inner dimensions"):
        matmul(a, a)
    with pytest.raises(ValueError, match="float32"):
        matmul(a.astype(np.float64), a.T)


# ----------------------------------------------------------------------------- fused kernels
def test_layernorm_kernels_match_numpy():
    rng = np.random.default_rng(1)
    (x, x64), (w, w64), (b, b64), (dy, dy64) = data(rng, 3, 70), data(rng, 70), data(rng, 70), data(rng, 3, 70)
    x, x64 = x.reshape(3, 1, 70) * 3 + 1, x64.reshape(3, 1, 70) * 3 + 1      # C = 70: not a power of two
    y_ref, cache = layernorm_forward(x64, w64, b64)
    y, mean, rstd = fused.layernorm_forward(device(x), device(w), device(b))
    close(y, y_ref)
    close(rstd, cache.rstd.reshape(-1))
    dy, dy64 = dy.reshape(3, 1, 70), dy64.reshape(3, 1, 70)
    got = fused.layernorm_backward(device(dy), device(x), mean, rstd, device(w))
    for g, want in zip(got, layernorm_backward(dy64, cache)):
        close(g, want)


def test_layernorm_kernels_cover_rows_wider_than_the_block():
    """C = 2·THREADS + 3: each thread sums three columns (two for some), the case the strided loops
    `range(t, C, THREADS)` exist for. Checked: with those loops cut to one column per thread
    (`for c in range(t, min(t + 1, C), THREADS)`), this test fails and the C = 70 one passes."""
    from tinylm.kernels.fused import THREADS
    C = 2 * THREADS + 3
    rng = np.random.default_rng(6)
    (x, x64), (w, w64), (b, b64), (dy, dy64) = data(rng, 2, C), data(rng, C), data(rng, C), data(rng, 2, C)
    y_ref, cache = layernorm_forward(x64 * 2 + 1, w64, b64)
    y, mean, rstd = fused.layernorm_forward(device(x * 2 + 1), device(w), device(b))
    close(y, y_ref)
    got = fused.layernorm_backward(device(dy), device(x * 2 + 1), mean, rstd, device(w))
    for g, want in zip(got, layernorm_backward(dy64, cache)):
        close(g, want)


def test_kernel_constants_agree_with_tinylm():
    """kernels/ imports nothing from tinylm, so the layernorm eps and GELU's √(2/π) and 0.044715 are
    written in both: they must agree (the kernel's float32 copies to float32 precision)."""
    assert fused.LAYERNORM_EPS == layers.LAYERNORM_EPS
    assert fused.SQRT_2_OVER_PI == np.float32(layers.GELU_C)
    assert fused.GELU_A == np.float32(layers.GELU_A)


def test_kernels_import_nothing_from_tinylm():
    """Every module of kernels/, loaded as a package of its own (not through tinylm/__init__.py), leaves
    no tinylm module imported."""
    code = ("import importlib, importlib.machinery as m, importlib.util as u, pathlib, sys; "
            "spec = m.ModuleSpec('standalone', None, is_package=True); "
            "spec.submodule_search_locations = ['kernels']; sys.modules['standalone'] = u.module_from_spec(spec); "
            "names = sorted(p.stem for p in pathlib.Path('kernels').glob('*.py')); "
            "[importlib.import_module('standalone.' + n) for n in names]; "
            "print(len(names), sorted(m for m in sys.modules if m.split('.')[0] == 'tinylm'))")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    modules = len([f for f in os.listdir(os.path.join(ROOT, "kernels")) if f.endswith(".py")])
    assert modules >= 7 and run.returncode == 0 and run.stdout.strip() == f"{modules} []", run.stdout + run.stderr


def test_gelu_kernels_match_numpy():
    rng = np.random.default_rng(2)
    (x, x64), (dy, dy64) = data(rng, 5, 41), data(rng, 5, 41)
    y_ref, cache = gelu_forward(x64 * 3)
    close(fused.gelu_forward(device(x * 3)), y_ref)
    close(fused.gelu_backward(device(dy), device(x * 3)), gelu_backward(dy64, cache))


def test_softmax_cross_entropy_kernel_matches_numpy():
    rng = np.random.default_rng(3)
    logits, logits64 = data(rng, 2, 3, 150)
    logits, logits64 = logits * 4, logits64 * 4
    targets = rng.integers(0, 150, size=(2, 3))
    targets[0, 1] = -1                                       # an ignored position
    weights, weights64 = data(rng, 2, 3)
    nll_ref, cache = cross_entropy_forward(logits64, targets)
    nll, dlogits = fused.softmax_cross_entropy(device(logits), device(targets), device(weights))
    close(nll, nll_ref)
    close(dlogits, cross_entropy_backward(weights64, cache))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_kernel_matches_optim(weight_decay):
    """p, m and v after every step. Checked: a kernel that keeps √v in v (and squares it back for
    p, so p and m stay right) passed the earlier p-and-m-only test; it fails here, at v."""
    rng = np.random.default_rng(4)
    p, p64 = data(rng, 4, 9)
    params, state = {"w": p64}, adamw_init({"w": p64})
    p_dev = device(p)
    m, v = device(np.zeros_like(p)), device(np.zeros_like(p))
    for step in (1, 2, 3):                                   # the bias corrections change per step
        g, g64 = data(rng, 4, 9)
        adamw_step(params, {"w": g64}, state, lr=0.01, weight_decay=weight_decay, decay=lambda n, s: True)
        fused.adamw_update(p_dev, device(g), m, v, lr=0.01, step=step, weight_decay=weight_decay)
        # every step, both moments: they are saved in checkpoints, and v feeds only later steps' p
        close(v, state["v"]["w"])
        close(m, state["m"]["w"])
        close(p_dev, params["w"])


def flat_step(params, grads, state, lr, grad_clip, weight_decay, loss=1.0):
    """One kernel_layers.clip_and_adamw step on a stand-in model: the Σ g² and flat AdamW kernels."""
    from tinylm.core import kernel_layers

    class Model:                    # weakly referenced by kernel_layers' arena cache
        pass
    model = Model()
    model.params = params
    return model, kernel_layers.clip_and_adamw(model, grads, state, lr, grad_clip, weight_decay, loss)


@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_flat_adamw_matches_clipping_then_adamw_step(grad_clip):
    """The multi-tensor AdamW (one launch, clip scale and decay mask on the device) against
    optim.clip_grad_norm + adamw_step: p, m, v of every tensor after three steps, with the tensors that
    optim.decays exempts (a bias, a LayerNorm gain, wte) beside decayed matrices. Checked: putting the
    exempt tensors in the decayed region fails at their p (by lr·wd·p ≈ 1e-3 of them)."""
    from tinylm.core.optim import clip_grad_norm
    rng = np.random.default_rng(5)
    shapes = {"h.0.attn.c_attn.weight": (3, 5), "h.0.attn.c_attn.bias": (5,), "h.0.ln_1.weight": (7,),
              "wte.weight": (4, 3), "h.0.mlp.c_fc.weight": (2, 9)}
    ref = {k: rng.normal(size=s) for k, s in shapes.items()}
    ref_state = adamw_init(ref)
    params = {k: device(p) for k, p in ref.items()}
    state = adamw_init(params)
    for step in range(3):
        grads = {k: rng.normal(size=s) for k, s in shapes.items()}
        grads_dev = {k: device(g) for k, g in grads.items()}           # before the reference clips in place
        norm = clip_grad_norm(grads, grad_clip)
        adamw_step(ref, grads, ref_state, lr=0.01, weight_decay=0.1)
        model, (loss, got_norm, stepped) = flat_step(params, grads_dev, state, 0.01, grad_clip, 0.1)
        assert stepped and loss == 1.0 and got_norm == pytest.approx(norm, rel=1e-5)
        assert state["step"] == ref_state["step"] == step + 1
        for name in shapes:
            close(model.params[name], ref[name])
            close(state["m"][name], ref_state["m"][name])
            close(state["v"][name], ref_state["v"][name])


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_flat_adamw_moves_nothing_after_a_non_finite_loss_or_gradient(bad):
    """The guard runs on the device: a NaN loss or an Inf gradient leaves p, m, v and the step alone."""
    rng = np.random.default_rng(6)
    params = {"w": device(rng.normal(size=(3, 4))), "b": device(rng.normal(size=4))}
    state = adamw_init(params)
    grads = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}
    flat_step(params, {k: device(g) for k, g in grads.items()}, state, 0.01, 1.0, 0.1)
    before = {k: to_numpy(p).copy() for k, p in params.items()}
    moments = {k: to_numpy(m).copy() for k, m in state["m"].items()}
    if bad == "grad":
        grads["w"][1, 2] = np.inf
    _, (loss, norm, stepped) = flat_step(params, {k: device(g) for k, g in grads.items()}, state, 0.01, 1.0, 0.1,
                                         loss=np.nan if bad == "loss" else 1.0)
    assert not stepped and state["step"] == 1
    for k in params:
        np.testing.assert_array_equal(to_numpy(params[k]), before[k])
        np.testing.assert_array_equal(to_numpy(state["m"][k]), moments[k])


# ----------------------------------------------------------------------------- PTX: no float64
def test_kernels_compile_to_ptx_without_float64(sm90_compiles):
    """compile_ptx needs the real CUDA target (not the simulator) but no GPU: a subprocess, shared with
    tests/test_kernel_report.py (tests/conftest.py's sm90_compiles runs ptx_check.main() there, then
    compiles a kernel with a planted Python float literal)."""
    run = sm90_compiles["ptx_check"]
    assert run["rc"] == 0, run["stdout"] + sm90_compiles["stderr"]
    lines = run["stdout"].splitlines()
    listed = len(list(ptx_check.kernels_and_signatures()))
    assert sum("0 with .f64" in line for line in lines) == listed, run["stdout"]  # every kernel listed, clean
    promoted = int(lines[-1].split(":")[1])
    assert promoted > 0, "the checker must see the f64 that a 0.5 literal causes"


# ----------------------------------------------------------------------------- the adapter
def test_kernel_linear_and_head_layers_match_numpy():
    """kernel_layers' linear and tied LM head (kernels.matmul as the layers' gemm, wte read through
    trans_b) against layers.py's, forward and backward."""
    from tinylm.core import kernel_layers
    rng = np.random.default_rng(5)
    (x, x64), (w, w64), (b, b64), (dy, dy64) = data(rng, 2, 5, 6), data(rng, 6, 7), data(rng, 7), data(rng, 2, 5, 7)
    y_ref, cache_ref = layers.linear_forward(x64, w64, b64)
    y, cache = kernel_layers.linear_forward(device(x), device(w), device(b))
    close(y, y_ref)
    for got, want in zip(kernel_layers.LAYERS.linear_backward(device(dy), cache), layers.linear_backward(dy64, cache_ref)):
        close(got, want)
    logits_ref, head_ref = layers.lm_head_forward(x64, w64.T.copy())          # wte (V, C) = (7, 6)
    logits, head = kernel_layers.lm_head_forward(device(x), device(w.T.copy()))
    close(logits, logits_ref)
    for got, want in zip(kernel_layers.LAYERS.lm_head_backward(device(dy), head), layers.lm_head_backward(dy64, head_ref)):
        close(got, want)
