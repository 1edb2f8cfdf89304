"""Hugging Face GPT-2 checkpoints: a tiny model written by transformers itself (committed under
tests/fixtures, see make_hf_fixture.py) loads into tinylm and gives transformers' logits; tinylm
writes the same layout back; broken checkpoints are refused with a message naming the problem."""
import functools
import json
import math
import os
import shutil
import types

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tinylm import GPT
from tinylm.core import layers

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf_tiny")
REFERENCE = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "hf_tiny_logits.npz"))


# float64 agrees with transformers to ~4e-8 (its float32 weights, our float64 arithmetic); each shared
# constant below moves the logits by ≥ 4e-6 when mistyped, and finite differences cannot see any of
# them (forward and backward share the constant). 5e-7 sits between the two.
FLOAT64_TOL = 5e-7


@pytest.mark.parametrize("dtype, tol", [("float64", FLOAT64_TOL), ("float32", 1e-4)])
def test_load_transformers_checkpoint_gives_its_logits(dtype, tol):
    model = GPT.from_pretrained(FIXTURE, dtype=dtype)
    assert model.config.n_layer == 2 and model.config.d_model == 12 and model.config.n_ctx == 16
    logits = model.forward(REFERENCE["idx"])
    assert logits.dtype == dtype
    np.testing.assert_allclose(logits, REFERENCE["logits"], atol=tol, rtol=0)


def sqrt_of_next(x):
    return math.sqrt(x + 1)


@pytest.mark.parametrize("mutation", ["layernorm eps 1e-6", "gelu 0.044", "gelu sqrt(1/pi)", "attention 1/sqrt(hd+1)"])
def test_float64_fixture_tolerance_catches_mistyped_shared_constant(monkeypatch, mutation):
    """Companion of the test above: each realistic typo of a constant that forward and backward
    share makes the float64 comparison at FLOAT64_TOL fail. (GELU's 0.044715 is pinned to about
    ±0.0007: the fixture's activations are small, so 0.0447 moves the logits by only 4e-8.)"""
    model = GPT.from_pretrained(FIXTURE, dtype="float64", reference=True)   # mutates layers.py's pairs
    if mutation == "layernorm eps 1e-6":
        model.layers = model.layers._replace(layernorm_forward=functools.partial(layers.layernorm_forward, eps=1e-6))
    elif mutation == "gelu 0.044":
        monkeypatch.setattr(layers, "GELU_A", 0.044)
    elif mutation == "gelu sqrt(1/pi)":
        monkeypatch.setattr(layers, "GELU_C", math.sqrt(1.0 / math.pi))
    else:
        monkeypatch.setattr(layers, "math", types.SimpleNamespace(sqrt=sqrt_of_next, inf=math.inf))
    error = np.abs(model.forward(REFERENCE["idx"]) - REFERENCE["logits"]).max()
    assert error > FLOAT64_TOL


def test_save_writes_transformers_layout(tmp_path):
    model = GPT.from_pretrained(FIXTURE, dtype="float32")
    model.save_pretrained(tmp_path)
    ours, theirs = load_file(tmp_path / "model.safetensors"), load_file(os.path.join(FIXTURE, "model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])
    ours_cfg, theirs_cfg = json.load(open(tmp_path / "config.json")), json.load(open(os.path.join(FIXTURE, "config.json")))
    for key in ("model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "activation_function",
                "layer_norm_epsilon", "tie_word_embeddings", "architectures"):
        assert ours_cfg[key] == theirs_cfg[key], key
    again = GPT.from_pretrained(tmp_path, dtype="float32")
    np.testing.assert_array_equal(again.forward(REFERENCE["idx"]), model.forward(REFERENCE["idx"]))


def test_prefixless_keys_and_mask_buffers_are_accepted(tmp_path):
    tensors = {k[len("transformer."):]: v for k, v in load_file(os.path.join(FIXTURE, "model.safetensors")).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
    tensors["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(FIXTURE, "config.json"), tmp_path)
    logits = GPT.from_pretrained(tmp_path, dtype="float64").forward(REFERENCE["idx"])
    np.testing.assert_allclose(logits, REFERENCE["logits"], atol=FLOAT64_TOL, rtol=0)


def broken_checkpoint(tmp_path, edit):
    tensors = load_file(os.path.join(FIXTURE, "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(FIXTURE, "config.json"), tmp_path)
    return tmp_path


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"), "missing tensors: h.1.mlp.c_fc.bias"),
    (lambda t: t.update({"transformer.h.0.extra.weight": np.zeros(3, np.float32)}), "unexpected tensors: h.0.extra.weight"),
    (lambda t: t.update({"transformer.wpe.weight": np.zeros((8, 12), np.float32)}),
     r"mis-shaped tensors: wpe.weight \(8, 12\) \(expected \(16, 12\)\)"),
    (lambda t: t.update({"lm_head.weight": np.zeros((64, 12), np.float32)}), "lm_head.weight differs from wte.weight"),
])
def test_broken_checkpoints_are_refused(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(broken_checkpoint(tmp_path, edit))


def test_from_pretrained_names_the_checkpoint_and_passes_its_settings_on(tmp_path):
    path = broken_checkpoint(tmp_path, lambda t: t["transformer.h.0.ln_1.bias"].__setitem__(0, np.nan))
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(path)
    assert str(e.value) == f"checkpoint {str(path)!r}: tensor h.0.ln_1.bias holds NaN or Inf values"
    model = GPT.from_pretrained(FIXTURE, kernels=True)     # kernels under the simulator (conftest)
    assert model.kernels is True and model.device == "cpu"


def test_missing_and_truncated_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="missing config.json"):
        GPT.from_pretrained(tmp_path)
    shutil.copy(os.path.join(FIXTURE, "config.json"), tmp_path)
    data = open(os.path.join(FIXTURE, "model.safetensors"), "rb").read()
    open(tmp_path / "model.safetensors", "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read model.safetensors"):
        GPT.from_pretrained(tmp_path)

