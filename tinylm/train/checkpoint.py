"""tinylm's own checkpoints, for any GPTConfig (attention or ssm), that no kill can corrupt.

A run directory holds
    checkpoint.json                     {"latest": "ckpt-0000100", "step": 100}: the one pointer
    ckpt-0000100/config.json            every GPTConfig field, and "format_version"
    ckpt-0000100/model.safetensors      the parameters under tinylm's names (model.param_shapes)
    ckpt-0000100/optimizer.safetensors  AdamW's moments m/<name>, v/<name>
    ckpt-0000100/trainer_state.json     step, optimizer step, data-order RNG state, run settings
    metrics.jsonl, loss.png, .lock      the log, its plot, and the one-writer lock
Saving writes a new ckpt directory under a temporary name, renames it into place (replacing a
stale one of the same step that a kill left before its pointer moved), and only then swaps
checkpoint.json (a temporary file, then os.replace: atomic on POSIX). A kill before the swap
leaves the pointer on the previous, complete checkpoint; older directories go after the swap.
Nothing is written through a symbolic link, and the pointer only names a ckpt-N of its own run.
Hugging Face GPT-2 directories load too (GPT.from_pretrained); `tinylm export-hf` writes one.
"""
import fcntl
import json
import os
import re
import shutil
from dataclasses import replace

import numpy as np

from ..core.backend import to_numpy
from ..core.config import GPTConfig
from ..core.model import GPT, Placement, check_tensors, param_shapes

FORMAT_VERSION = 1
POINTER = "checkpoint.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
LOCK = ".lock"
CKPT_NAME = re.compile(r"ckpt-\d{7}")
TMP = ".tmp-"                          # in every temporary name: what a kill leaves behind
NUMBER, INT, TEXT, OBJECT = (int, float), int, str, dict
# trainer_state.json key -> the JSON types its value may have (None: may be null)
STATE_KEYS = {"step": (INT,), "train_config": (OBJECT,), "data_rng": (OBJECT,), "data_sha256": (TEXT,),
              "tokenizer": (TEXT,), "loss": (NUMBER, None), "val_loss": (NUMBER, None),
              "elapsed_s": (NUMBER,), "optimizer_step": (INT,)}


# ----------------------------------------------------------------------------- files inside a run
def no_symlink(path):
    """tinylm writes only real files inside a run: a planted link would send a write elsewhere."""
    if os.path.islink(path):
        raise ValueError(f"{path} is a symbolic link; tinylm does not write through links (remove it)")
    return path


def remove(path):
    """Delete a file, directory or link (the link itself, never what it points to); absent is fine."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def write_json_atomic(path, obj):
    tmp = f"{no_symlink(path)}{TMP}{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def clean_stale(run_dir):
    """Remove the temporary files a killed save left behind (they would keep a full disk full)."""
    for name in os.listdir(run_dir):
        if TMP in name:
            remove(os.path.join(run_dir, name))


class RunLock:
    """One writer per run: an exclusive flock on run/.lock, held while the run trains. The kernel
    drops it when its process dies, so a kill -9 leaves no stale lock behind."""

    def __init__(self, run_dir):
        self.path = no_symlink(os.path.join(run_dir, LOCK))

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ValueError(f"another tinylm process is training in {os.path.dirname(self.path)!r} "
                             "(it holds the run's lock); wait for it or choose another --out") from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)                        # closing drops the lock


# ----------------------------------------------------------------------------- JSON, validated
def read_json(path):
    """A JSON object from a file; a truncated or garbled file is a ValueError naming it."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        raise ValueError(f"{path} is unreadable or truncated") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is unreadable or truncated (not a JSON object)")
    return obj


def check_keys(obj, spec, path):
    """Every key of spec present in obj with one of its types (bool is not a number); else one
    ValueError naming the file and the key."""
    for key, kinds in spec.items():
        if key not in obj:
            raise ValueError(f"{path}: missing key {key!r}")
        value = obj[key]
        if value is None:
            ok = None in kinds
        else:
            ok = not isinstance(value, bool) and any(k is not None and isinstance(value, k) for k in kinds)
        if not ok:
            raise ValueError(f"{path}: key {key!r} has the wrong type ({value!r})")
    return obj


# ----------------------------------------------------------------------------- weights
def save_weights(ckpt_dir, config, params):
    """config.json (every GPTConfig field + format_version) and model.safetensors."""
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, os.path.join(ckpt_dir, WEIGHTS),
              metadata={"format": "tinylm"})
    write_json_atomic(os.path.join(ckpt_dir, CONFIG), {"format_version": FORMAT_VERSION, **config.to_dict()})


def read_tensors(path, expected, where):
    """safetensors file -> {name: array}, checked against {name: shape} and for finite values."""
    from safetensors.numpy import load_file
    try:
        tensors = load_file(path)
    except Exception as e:                     # missing, truncated or not safetensors
        raise ValueError(f"{where}: cannot read {os.path.basename(path)} ({e})") from None
    check_tensors(tensors, expected, f"{where}: {os.path.basename(path)}")
    return tensors


def is_tinylm_checkpoint(ckpt_dir):
    path = os.path.join(ckpt_dir, CONFIG)
    return os.path.isfile(path) and "format_version" in read_json(path)


def load_weights(ckpt_dir, dtype=None):
    """-> (GPTConfig, params) of a tinylm checkpoint directory; dtype overrides the saved one."""
    path = os.path.join(ckpt_dir, CONFIG)
    saved = read_json(path)
    if saved["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {saved['format_version']!r} is not {FORMAT_VERSION}, the one "
                         "this tinylm reads")
    config = GPTConfig.from_dict({k: v for k, v in saved.items() if k != "format_version"}, path)
    config = replace(config, dtype=dtype or config.dtype)
    return config, read_tensors(os.path.join(ckpt_dir, WEIGHTS), param_shapes(config), f"checkpoint {ckpt_dir!r}")


# ----------------------------------------------------------------------------- saving a step
def save_checkpoint(run_dir, model, opt_state, trainer_state, files=None):
    """Write step trainer_state["step"] of a run; returns the checkpoint's directory. files: more
    {name: bytes} to write beside the weights (the tokenizer's vocab.json and merges.txt). A full or
    read-only disk is one ValueError; the previous checkpoint and its pointer stay as they were."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file
    step = trainer_state["step"]
    name = f"ckpt-{step:07d}"
    final = os.path.join(run_dir, name)
    if pointer_name(run_dir) == name:          # this step is saved and the pointer is on it
        return final
    tmp = f"{final}{TMP}{os.getpid()}"
    try:
        remove(tmp)
        os.mkdir(tmp)
        save_weights(tmp, model.config, model.numpy_params())
        moments = {f"{kind}/{k}": np.ascontiguousarray(to_numpy(a)) for kind in ("m", "v")
                   for k, a in opt_state[kind].items()}
        save_file(moments, os.path.join(tmp, OPTIMIZER))
        write_json_atomic(os.path.join(tmp, STATE), {**trainer_state, "optimizer_step": opt_state["step"]})
        for f, data in (files or {}).items():
            with open(os.path.join(tmp, f), "wb") as fh:
                fh.write(data)
        for f in os.listdir(tmp):              # on disk before the pointer names them
            with open(os.path.join(tmp, f), "rb") as fh:
                os.fsync(fh.fileno())
        remove(final)                          # a stale copy: renamed into place, but the pointer never moved
        os.replace(tmp, final)
        write_json_atomic(os.path.join(run_dir, POINTER), {"latest": name, "step": step})
    except (OSError, SafetensorError) as e:
        remove(tmp)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        kept = pointer_name(run_dir)
        raise ValueError(f"cannot save step {step} in {run_dir!r} ({reason.lower()}); "
                         + (f"the last good checkpoint, {kept}, is intact" if kept else "no checkpoint was saved yet")
                         ) from None
    for old in os.listdir(run_dir):
        if old.startswith("ckpt-") and old != name:
            remove(os.path.join(run_dir, old))
    return final


def pointer_name(run_dir):
    """The checkpoint name checkpoint.json holds (validated: a ckpt-N of this run), or None."""
    pointer = os.path.join(run_dir, POINTER)
    if not os.path.lexists(pointer):
        return None
    state = check_keys(read_json(no_symlink(pointer)), {"latest": (TEXT,), "step": (INT,)}, pointer)
    if not CKPT_NAME.fullmatch(state["latest"]):
        raise ValueError(f"{pointer}: key 'latest' must name a ckpt-NNNNNNN directory of this run, "
                         f"got {state['latest']!r}")
    return state["latest"]


def latest_checkpoint(run_dir):
    """The directory checkpoint.json points at, or None when the run has no checkpoint yet."""
    name = pointer_name(run_dir)
    if name is None:
        return None
    path = no_symlink(os.path.join(run_dir, name))
    if not os.path.isdir(path):
        raise ValueError(f"{os.path.join(run_dir, POINTER)} names {name!r}, which is missing")
    return path


# ----------------------------------------------------------------------------- loading
def resolve(path):
    """A run directory (via its pointer) or a checkpoint / Hugging Face directory -> the directory
    holding config.json + model.safetensors."""
    if os.path.isfile(path):
        raise ValueError(f"{path!r} is a file; a checkpoint is a directory (a run, a ckpt-N or a Hugging Face "
                         "GPT-2 directory)")
    if not os.path.isdir(path):
        raise ValueError(f"no checkpoint at {path!r}: the directory does not exist")
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if os.path.isfile(os.path.join(path, CONFIG)) or os.path.isfile(os.path.join(path, WEIGHTS)):
        return path
    raise ValueError(f"no checkpoint in {path!r}: expected {POINTER} (a tinylm run) or config.json + "
                     "model.safetensors (a Hugging Face GPT-2 directory)")


def read_trainer_state(ckpt_dir):
    """trainer_state.json as a dict, its keys validated."""
    path = os.path.join(ckpt_dir, STATE)
    return check_keys(read_json(path), STATE_KEYS, path)


def load_model(path, placement=Placement(), dtype=None):
    """-> (model, ckpt_dir, trainer_state or None) from a run, a tinylm checkpoint or a Hugging
    Face GPT-2 directory, built on `placement`. The dtype defaults to the saved one (float32 for
    Hugging Face)."""
    ckpt_dir = resolve(path)
    if not is_tinylm_checkpoint(ckpt_dir):
        return GPT.from_pretrained(ckpt_dir, dtype=dtype or "float32", **placement._asdict()), ckpt_dir, None
    config, params = load_weights(ckpt_dir, dtype)
    state = read_trainer_state(ckpt_dir) if os.path.lexists(os.path.join(ckpt_dir, STATE)) else None
    return GPT(config, params=params, **placement._asdict()), ckpt_dir, state


def load_training_checkpoint(run_dir, placement=Placement()):
    """-> (model, opt_state, trainer_state) to resume a run exactly."""
    if latest_checkpoint(run_dir) is None:
        raise ValueError(f"cannot resume: {run_dir!r} has no {POINTER} (no checkpoint was saved there)")
    ckpt_dir = latest_checkpoint(run_dir)
    if not is_tinylm_checkpoint(ckpt_dir):
        raise ValueError(f"cannot resume from {ckpt_dir!r}: its {CONFIG} has no format_version (written by an "
                         "older tinylm); sample from it, or start a new run")
    model, _, state = load_model(run_dir, placement)
    if state is None:
        raise ValueError(f"cannot resume from {ckpt_dir!r}: it has no {STATE}")
    shapes = param_shapes(model.config)
    moments = read_tensors(os.path.join(ckpt_dir, OPTIMIZER),
                           {f"{kind}/{k}": s for kind in ("m", "v") for k, s in shapes.items()},
                           f"checkpoint {ckpt_dir!r}")
    xp, dtype = model.xp, model.config.dtype
    opt_state = {"step": state["optimizer_step"],
                 **{kind: {k: xp.asarray(moments[f"{kind}/{k}"], dtype=dtype) for k in shapes} for kind in ("m", "v")}}
    return model, opt_state, state
