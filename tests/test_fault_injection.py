"""kill -9 at 20+ seeded random instants across repeated resumes of a tiny run, then the run
must end exactly as an uninterrupted one: the same final weights, optimizer moments, data-order
RNG and every logged loss, bit for bit.

With a checkpoint after every step most instants fall inside a checkpoint write (temporary
directory, rename, pointer swap, deletion of the previous directory) or the metrics log; some
fall while a process loads its checkpoint. A planted bug is caught: with save_checkpoint's
`remove(final)` dropped (the stale-directory fix of issue 11), a kill between a checkpoint's
rename and its pointer swap makes every later resume fail ("Directory not empty") and the test
fails; with the pointer swapped before the rename, resumes fail on a missing directory."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

from tinylm.train.checkpoint import latest_checkpoint
from tinylm.train.run_log import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60
KILLS = 20
FLAGS = ["--n-layer", "1", "--n-head", "2", "--d-model", "8", "--n-ctx", "8", "--batch-size", "2", "--warmup", "3",
         "--eval-every", "7", "--eval-batches", "1", "--checkpoint-every", "1", "--steps", str(STEPS), "--quiet"]
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def start(out, data):
    resume = ["--resume"] if os.path.exists(os.path.join(out, "checkpoint.json")) else ["--data", data]
    return subprocess.Popen([sys.executable, "-m", "tinylm", "pretrain", "--out", out, *resume, *FLAGS], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def logged_step(out):
    """The last step metrics.jsonl has a loss for (0 if none)."""
    path = os.path.join(out, "metrics.jsonl")
    steps = [r["step"] for r in read_metrics(path) if "loss" in r] if os.path.isfile(path) else []
    return max(steps, default=0)


def kill_at_random_instants(out, data, rng):
    """Start, kill -9 at a random instant, resume, ... KILLS times; then let the run finish.
    -> (kills, how many of them left a checkpoint write half done)."""
    kills = mid_write = 0
    while True:
        process = start(out, data)
        if kills < KILLS:
            if rng.random() < 0.2:                   # an instant while it starts or loads its checkpoint
                time.sleep(rng.uniform(0.0, 0.4))
            else:                                    # k steps in, then a random instant within a step
                target = logged_step(out) + int(rng.integers(0, 3))
                while process.poll() is None and logged_step(out) < target:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.05))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
                mid_write += half_written(out)
                continue
        _, err = process.communicate(timeout=900)
        assert process.returncode == 0, err
        if kills >= KILLS:
            return kills, mid_write


def half_written(out):
    """Whether a kill left a checkpoint write unfinished: a temporary entry, or a ckpt directory
    other than the one the pointer names (renamed before the swap, or not yet deleted after it)."""
    names = os.listdir(out) if os.path.isdir(out) else []
    latest = os.path.basename(latest_checkpoint(out) or "")
    return any(".tmp-" in n or (n.startswith("ckpt-") and n != latest) for n in names)


def final_state(out):
    ckpt = latest_checkpoint(out)
    state = json.load(open(os.path.join(ckpt, "trainer_state.json")))
    metrics = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
               for r in read_metrics(os.path.join(out, "metrics.jsonl"))]
    return (load_file(os.path.join(ckpt, "model.safetensors")), load_file(os.path.join(ckpt, "optimizer.safetensors")),
            {k: state[k] for k in ("step", "optimizer_step", "data_rng", "loss", "val_loss")}, metrics)


def test_kill_9_at_random_instants_resumes_bit_for_bit(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("the cat sat on the mat and the dog lay by the door " * 40)
    reference = start(str(tmp_path / "straight"), str(data))
    _, err = reference.communicate(timeout=900)
    assert reference.returncode == 0, err
    kills, mid_write = kill_at_random_instants(str(tmp_path / "killed"), str(data), np.random.default_rng(11))
    assert kills >= KILLS and mid_write >= 1, (kills, mid_write)
    print(f"{kills} kills, {mid_write} of them inside a checkpoint write")
    weights_a, moments_a, state_a, metrics_a = final_state(str(tmp_path / "straight"))
    weights_b, moments_b, state_b, metrics_b = final_state(str(tmp_path / "killed"))
    assert state_a == state_b and state_a["step"] == STEPS
    assert metrics_a == metrics_b and len([r for r in metrics_a if "loss" in r]) == STEPS   # every logged loss
    for a, b in ((weights_a, weights_b), (moments_a, moments_b)):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].tobytes() == b[k].tobytes(), k
    assert not [n for n in os.listdir(tmp_path / "killed") if ".tmp-" in n]
