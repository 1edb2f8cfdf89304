"""Training checkpoints that a kill at any moment cannot corrupt.

A run directory holds

    checkpoint.json                 {"latest": "ckpt-0000100", "step": 100}: the one pointer
    ckpt-0000100/config.json        the model, in Hugging Face's GPT-2 layout (hf.py), so
    ckpt-0000100/model.safetensors    GPT.from_pretrained(run/ckpt-0000100) loads it too
    ckpt-0000100/optimizer.safetensors  AdamW's moments m/<name>, v/<name>
    ckpt-0000100/trainer_state.json     config, step, optimizer step, data-order RNG state, run settings

Saving writes a new ckpt directory under a temporary name, renames it into place, and only then
swaps checkpoint.json (write a temporary file, then os.replace: atomic on POSIX). A kill before
the swap leaves the pointer on the previous, complete checkpoint; older directories are deleted
only after the swap.
"""
import json
import os
import shutil

import numpy as np

from .backend import to_numpy
from .hf import check_tensors, save_hf
from .model import GPT, GPTConfig, param_shapes

POINTER = "checkpoint.json"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RESUME_KEYS = ("step", "train_config", "data_rng", "data_sha256", "loss", "val_loss", "elapsed_s", "optimizer_step")


def write_json_atomic(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir, model, opt_state, trainer_state):
    """Write step trainer_state["step"] of a run; returns the checkpoint's directory."""
    from safetensors.numpy import save_file
    step = trainer_state["step"]
    name = f"ckpt-{step:07d}"
    final = os.path.join(run_dir, name)
    if os.path.isdir(final):                   # this step is already saved (and nothing changed since)
        return final
    tmp = os.path.join(run_dir, f"{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(tmp, model.config, model.numpy_params())
    moments = {f"{kind}/{k}": np.ascontiguousarray(to_numpy(a)) for kind in ("m", "v") for k, a in opt_state[kind].items()}
    save_file(moments, os.path.join(tmp, OPTIMIZER))
    state = {**trainer_state, "config": model.config.to_dict(), "optimizer_step": opt_state["step"]}
    write_json_atomic(os.path.join(tmp, STATE), state)
    for f in os.listdir(tmp):                  # on disk before the pointer names them
        with open(os.path.join(tmp, f), "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, final)
    write_json_atomic(os.path.join(run_dir, POINTER), {"latest": name, "step": step})
    for old in os.listdir(run_dir):
        if old.startswith("ckpt-") and old != name:
            shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)
    return final


def latest_checkpoint(run_dir):
    """The directory checkpoint.json points at, or None when the run has no checkpoint yet."""
    pointer = os.path.join(run_dir, POINTER)
    if not os.path.isfile(pointer):
        return None
    name = read_json(pointer).get("latest")
    if not isinstance(name, str):
        raise ValueError(f"{pointer} does not name a checkpoint")
    path = os.path.join(run_dir, name)
    if not os.path.isdir(path):
        raise ValueError(f"{pointer} names {name!r}, which is missing")
    return path


def resolve(path):
    """A run directory (via its pointer) or a checkpoint / Hugging Face directory -> the directory
    holding config.json + model.safetensors."""
    if not os.path.isdir(path):
        raise ValueError(f"no checkpoint at {path!r}: the directory does not exist")
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if os.path.isfile(os.path.join(path, "config.json")) or os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    raise ValueError(f"no checkpoint in {path!r}: expected {POINTER} (a tinylm run) or config.json + "
                     "model.safetensors (a Hugging Face GPT-2 directory)")


def read_trainer_state(ckpt_dir):
    """trainer_state.json as a dict, or None for a plain Hugging Face directory."""
    path = os.path.join(ckpt_dir, STATE)
    return read_json(path) if os.path.isfile(path) else None


def read_json(path):
    """A JSON object from a file; a truncated or garbled file is a ValueError naming it."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        raise ValueError(f"{path} is unreadable or truncated") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is unreadable or truncated")
    return obj


def load_model(path, device="cpu", dtype=None, kernels=None):
    """-> (model, ckpt_dir, trainer_state or None) from a run, checkpoint or Hugging Face directory.
    The dtype defaults to the one the run trained in (float32 for Hugging Face directories)."""
    ckpt_dir = resolve(path)
    state = read_trainer_state(ckpt_dir)
    dtype = dtype or (state["config"]["dtype"] if state else "float32")
    model = GPT.from_pretrained(ckpt_dir, dtype=dtype, device=device, kernels=kernels)
    if state is not None:
        if not isinstance(state.get("config"), dict):
            raise ValueError(f"checkpoint {ckpt_dir!r}: {STATE} lacks the model config")
        saved = GPTConfig(**{**state["config"], "dtype": dtype})
        if saved != model.config:
            raise ValueError(f"checkpoint {ckpt_dir!r}: config.json ({model.config}) does not match "
                             f"{STATE} ({saved})")
    return model, ckpt_dir, state


def load_training_checkpoint(run_dir, device="cpu", kernels=None):
    """-> (model, opt_state, trainer_state) to resume a run exactly."""
    from safetensors.numpy import load_file
    if latest_checkpoint(run_dir) is None:
        raise ValueError(f"cannot resume: {run_dir!r} has no {POINTER} (no checkpoint was saved there)")
    model, ckpt_dir, state = load_model(run_dir, device, kernels=kernels)
    if state is None:
        raise ValueError(f"cannot resume from {ckpt_dir!r}: it has no {STATE}")
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise ValueError(f"cannot resume from {ckpt_dir!r}: {STATE} lacks {', '.join(missing)}")
    try:
        moments = load_file(os.path.join(ckpt_dir, OPTIMIZER))
    except Exception as e:                     # missing, truncated or not safetensors
        raise ValueError(f"checkpoint {ckpt_dir!r}: cannot read {OPTIMIZER} ({e})") from None
    shapes = param_shapes(model.config)
    check_tensors(moments, {f"{kind}/{k}": s for kind in ("m", "v") for k, s in shapes.items()},
                  f"checkpoint {ckpt_dir!r}: {OPTIMIZER}")
    xp, dtype = model.xp, model.config.dtype
    opt_state = {"step": state["optimizer_step"],
                 **{kind: {k: xp.asarray(moments[f"{kind}/{k}"], dtype=dtype) for k in shapes} for kind in ("m", "v")}}
    return model, opt_state, state
