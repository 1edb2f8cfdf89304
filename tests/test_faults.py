"""Every fault issue 11 found, each handled: a stale checkpoint directory, two writers, planted
symlinks, poisoned weights, malformed JSON, a full or read-only disk, bad numbers and paths.
Each bad case is one line on stderr with exit 2 (no traceback), and the last good checkpoint
stays as it was."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tinylm.train import checkpoint
from tinylm.train.checkpoint import RunLock, latest_checkpoint
from tinylm.cli import main
from tinylm.commands.terminal import os_error_sentence, progress_wanted
from tinylm.train.run_log import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "8", "--n-ctx", "8", "--batch-size", "2", "--warmup", "1",
        "--eval-every", "5", "--eval-batches", "1", "--checkpoint-every", "5", "--quiet"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run stopped at step 5 (of 10), to copy and damage."""
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "data.txt").write_text("a small corpus of words for a tiny run " * 30)
    assert main(["pretrain", "--out", str(tmp / "run"), "--data", str(tmp / "data.txt"), "--steps", "10",
                 "--stop-at", "5", *TINY]) == 0
    return tmp / "run"


@pytest.fixture
def run(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def files(run):
    """Every file under the run, as bytes: to show a refusal changed nothing."""
    out = {}
    for folder, _, names in os.walk(run):
        for n in names:
            out[os.path.relpath(os.path.join(folder, n), run)] = open(os.path.join(folder, n), "rb").read()
    return out


def one_line(capsys, argv, expect):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and "[Errno" not in err[0], err
    assert expect in err[0], err[0]


def resume(run, *more):
    return ["pretrain", "--resume", "--out", str(run), "--quiet", *more]


# ----------------------------------------------------------------------------- checkpoints
def test_stale_directory_of_the_next_step_is_replaced_and_the_pointer_moves(run, capsys):
    """A kill after ckpt-N was renamed into place but before the pointer moved left ckpt-N behind;
    before the fix every later save of step N returned early and the pointer stayed forever."""
    stale = run / "ckpt-0000010"
    shutil.copytree(latest_checkpoint(str(run)), stale)
    (stale / "trainer_state.json").write_text("{}")              # not what step 10 holds
    assert main(resume(run)) == 0
    assert json.loads((run / "checkpoint.json").read_text())["latest"] == "ckpt-0000010"
    assert json.loads((stale / "trainer_state.json").read_text())["step"] == 10
    assert not (run / "ckpt-0000005").exists()


def test_one_writer_per_run(run, capsys):
    with RunLock(str(run)):                                    # another process training in it
        one_line(capsys, resume(run), "another tinylm process is training in")
    # a killed holder leaves no stale lock: the kernel drops a flock with its process
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tinylm.train.checkpoint import RunLock\n"
                               f"with RunLock({str(run)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert os.path.exists(run / ".lock") and main(resume(run)) == 0


@pytest.mark.parametrize("name", ["metrics.jsonl", "loss.png", "checkpoint.json", ".lock"])
def test_nothing_is_written_through_a_symlink(run, tmp_path, capsys, name):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    if os.path.lexists(run / name):
        os.unlink(run / name)
    os.symlink(outside, run / name)
    one_line(capsys, resume(run, "--plot"), f"{name} is a symbolic link")
    assert outside.read_text() == "precious"


def test_pointer_is_confined_to_the_run(run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(latest_checkpoint(str(run)), elsewhere)
    (run / "checkpoint.json").write_text(json.dumps({"latest": "../elsewhere", "step": 5}))
    one_line(capsys, ["sample", str(run)], "checkpoint.json: key 'latest' must name a ckpt-NNNNNNN directory")
    (run / "checkpoint.json").write_text(json.dumps({"latest": "ckpt-0000005", "step": 5}))
    shutil.rmtree(run / "ckpt-0000005")
    os.symlink(elsewhere, run / "ckpt-0000005")                 # a link named like a checkpoint
    one_line(capsys, ["sample", str(run)], "ckpt-0000005 is a symbolic link")


@pytest.mark.parametrize("file, tensor, command", [
    ("model.safetensors", "h.0.attn.c_attn.weight", "sample"),
    ("model.safetensors", "wte.weight", "info"),
    ("optimizer.safetensors", "v/h.0.mlp.c_fc.weight", "resume"),
])
def test_non_finite_weights_and_moments_are_refused(run, capsys, file, tensor, command):
    path = os.path.join(latest_checkpoint(str(run)), file)
    tensors = load_file(path)
    tensors[tensor].flat[3] = np.nan if command != "info" else np.inf
    save_file(tensors, path)
    before = files(run)
    one_line(capsys, resume(run) if command == "resume" else [command, str(run)],
             f"{file}: tensor {tensor} holds NaN or Inf values")
    assert files(run) == before


# ----------------------------------------------------------------------------- JSON read by the CLI
def edit_json(path, edit):
    obj = json.loads(open(path).read())
    obj = edit(obj)
    open(path, "w").write(json.dumps(obj))


@pytest.mark.parametrize("file, edit, expect", [
    ("config.json", lambda c: [c], "config.json is unreadable or truncated (not a JSON object)"),
    ("config.json", lambda c: {**c, "n_layer": "1"}, "config.json: key 'n_layer' must be int, got '1'"),
    ("config.json", lambda c: {k: v for k, v in c.items() if k != "d_state"}, "config.json: missing key 'd_state'"),
    ("config.json", lambda c: {**c, "format_version": 99}, "format_version 99 is not 1"),
    ("trainer_state.json", lambda s: {k: v for k, v in s.items() if k != "train_config"},
     "trainer_state.json: missing key 'train_config'"),
    ("trainer_state.json", lambda s: {**s, "step": "x"}, "trainer_state.json: key 'step' has the wrong type ('x')"),
    ("trainer_state.json", lambda s: {**s, "train_config": {**s["train_config"], "lr": "fast"}},
     "train_config: key 'lr' must be float, got 'fast'"),
    ("trainer_state.json", lambda s: {**s, "train_config": {**s["train_config"], "colour": 1}},
     "train_config: unknown key 'colour'"),
    ("trainer_state.json", lambda s: {**s, "data_rng": {"state": 1}}, "key 'data_rng' is not a PCG64 state"),
    ("checkpoint.json", lambda p: {**p, "latest": 5}, "checkpoint.json: key 'latest' has the wrong type (5)"),
    ("checkpoint.json", lambda p: {"latest": p["latest"]}, "checkpoint.json: missing key 'step'"),
])
def test_every_json_is_validated(run, capsys, file, edit, expect):
    path = run / file if file == "checkpoint.json" else os.path.join(latest_checkpoint(str(run)), file)
    edit_json(path, edit)
    before = files(run)
    readers = [resume(run)] if "data_rng" in expect else [["info", str(run)], resume(run)]   # only resume reads it
    for command in readers:
        one_line(capsys, command, expect)
    assert files(run) == before


# ----------------------------------------------------------------------------- the disk
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_keeps_the_last_checkpoint(run, capsys, monkeypatch, code):
    real = checkpoint.save_weights

    def failing(ckpt_dir, config, params):
        real(ckpt_dir, config, params)                           # half the checkpoint is on disk, then:
        raise OSError(code, os.strerror(code), os.path.join(ckpt_dir, "optimizer.safetensors"))
    monkeypatch.setattr(checkpoint, "save_weights", failing)
    kept = files(run / "ckpt-0000005")
    one_line(capsys, resume(run), f"cannot save step 10 in {str(run)!r} ({os.strerror(code).lower()}); "
                                  "the last good checkpoint, ckpt-0000005, is intact")
    assert files(run / "ckpt-0000005") == kept and latest_checkpoint(str(run)).endswith("ckpt-0000005")
    assert not [n for n in os.listdir(run) if ".tmp-" in n]         # its temporary files are gone
    monkeypatch.undo()
    assert main(resume(run)) == 0                                    # and the run goes on


def test_stale_temporary_files_are_cleaned_at_start(run):
    (run / "ckpt-0000010.tmp-99999").mkdir()
    (run / "ckpt-0000010.tmp-99999" / "model.safetensors").write_bytes(b"x" * 1000)
    (run / "checkpoint.json.tmp-99999").write_text("{")
    assert main(resume(run)) == 0
    assert not [n for n in os.listdir(run) if ".tmp-" in n]


# ----------------------------------------------------------------------------- flags and paths
def test_silent_combinations_warn(tmp_path, capsys):
    (tmp_path / "data.txt").write_text("enough text for a window or two " * 20)
    argv = ["pretrain", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "data.txt"), *TINY,
            "--steps", "2", "--warmup", "5", "--lr", "1e-3", "--min-lr", "1e-2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: warmup_steps=5 exceeds max_steps=2" in err and "warning: min_lr=0.01 exceeds lr=0.001" in err


@pytest.mark.parametrize("argv, expect", [
    (["pretrain", "--out", "{tmp}/file.txt/run"], "is not a writable directory"),
    (["sample", "{tmp}/file.txt"], "is a file; a checkpoint is a directory"),
    (["info", "{tmp}/file.txt"], "is a file; a checkpoint is a directory"),
    (["export-hf", "{run}", "{tmp}/file.txt"], "already exists"),
    (["export-hf", "{run}", "{tmp}/no/such/dir"], "is not a writable directory"),
])
def test_output_and_input_paths_are_checked_before_work(run, tmp_path, capsys, argv, expect):
    (tmp_path / "file.txt").write_text("x")
    one_line(capsys, [a.format(tmp=tmp_path, run=run) for a in argv], expect)


def test_os_errors_are_a_sentence_naming_the_path(capsys, monkeypatch):
    e = OSError(errno.ENOTDIR, "Not a directory", "runs/x/metrics.jsonl")
    assert os_error_sentence(e) == "'runs/x/metrics.jsonl': not a directory"

    def fail(*args, **kw):
        raise e
    monkeypatch.setattr(checkpoint, "load_model", fail)
    one_line(capsys, ["info", "anything"], "tinylm info: error: 'runs/x/metrics.jsonl': not a directory")


def test_no_progress_bar_when_stderr_is_not_a_terminal(monkeypatch):
    class Terminal:
        def isatty(self):
            return True
    assert not progress_wanted()                      # pytest's captured stderr is not a terminal
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress_wanted() and not progress_wanted(quiet=True)


def test_metrics_survive_a_torn_line(run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')                  # a kill mid-write
    assert main(resume(run)) == 0
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl")) if "loss" in r] == list(range(1, 11))
