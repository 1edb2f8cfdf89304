"""`tinylm pretrain / sample / info` from the command line: each bad input ends in one readable
line and exit code 2 (no traceback) and leaves the checkpoint untouched; Ctrl-C saves and
exits 130; sampling works on a Hugging Face directory with a BPE vocabulary."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tinylm.train.checkpoint import latest_checkpoint
from tinylm.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf_tiny")
TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "16", "--n-ctx", "16", "--batch-size", "4",
        "--eval-every", "5", "--eval-batches", "2", "--checkpoint-every", "5", "--warmup", "2", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 6-step run on a small text file."""
    tmp = tmp_path_factory.mktemp("run")
    data = tmp / "data.txt"
    data.write_text("def f(x):\n    return x + 1\n\n" * 40, encoding="utf-8")
    out = tmp / "run"
    assert main(["pretrain", "--out", str(out), "--data", str(data), "--steps", "6", *TINY]) == 0
    return out


def snapshot(run_dir):
    """Every file of the run's checkpoint, as bytes: to prove a failure changed nothing."""
    ckpt = latest_checkpoint(str(run_dir))
    return {f: open(os.path.join(ckpt, f), "rb").read() for f in sorted(os.listdir(ckpt))}


def one_error_line(capsys, argv, expect):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert expect in err[0], err[0]


def test_info_and_sample(run_dir, capsys):
    assert main(["info", str(run_dir)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "checkpoint" in captured.err and "corpus: " in out and "data.txt" in out
    C = 16
    n_params = 257 * C + 16 * C + (12 * C * C + 13 * C) + 2 * C     # wte + wpe + one block + ln_f
    assert "n_layer=1" in out and "step: 6 of 6, validation loss" in out and f"parameters: {n_params:,}" in out
    assert main(["sample", str(run_dir), "--prompt", "def", "--max-new-tokens", "20", "--seed", "1"]) == 0
    first = capsys.readouterr()
    assert first.out.startswith("def") and "step 6" in first.err and "step" not in first.out   # results on stdout
    main(["sample", str(run_dir), "--prompt", "def", "--max-new-tokens", "20", "--seed", "1", "--no-cache"])
    assert capsys.readouterr().out == first.out                  # same text without the cache


@pytest.mark.parametrize("argv, expect", [
    (["pretrain", "--data", "{tmp}/missing.txt"], "missing.txt' does not exist"),
    (["pretrain", "--data", "{tmp}/empty.txt"], "empty.txt' is empty"),
    (["pretrain", "--data", "{tmp}/short.txt"], "fewer than one context window of n_ctx + 1 = 17"),
    (["pretrain", "--data", "{tmp}/short.txt", "--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
    (["pretrain", "--data", "{tmp}/long.txt", "--lr", "0"], "argument --lr: must be > 0, got 0"),
    (["pretrain", "--data", "{tmp}/long.txt", "--d-state", "0"], "argument --d-state: must be > 0, got 0"),
    (["pretrain", "--resume"], "has no checkpoint.json (no checkpoint was saved there)"),
    (["pretrain", "--data", "{tmp}/long.txt", "--steps", "5", "--stop-at", "9"], "stop_at must be in 1..5"),
    (["pretrain", "--data", "{tmp}/long.txt", "--out", "{tmp}/long.txt"], "is a file, not a directory"),
    (["pretrain", "--data", "{tmp}/long.txt", "--device", "gpu"], "invalid choice: 'gpu'"),
    (["sample", "{tmp}/nowhere"], "no checkpoint at"),
    (["sample", "{tmp}/nowhere", "--max-new-tokens", "0"], "argument --max-new-tokens: must be > 0, got 0"),
    (["sample", "{tmp}/nowhere", "--temperature", "-1"], "argument --temperature: must be >= 0, got -1"),
    (["sample", "{tmp}/nowhere", "--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
    (["sample", "{tmp}/nowhere", "--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
    (["sample", "{tmp}"], "expected checkpoint.json (a tinylm run) or config.json + model.safetensors"),
    (["info", "{tmp}/nowhere"], "the directory does not exist"),
    (["sample", "--device", "cpu"], "no run in runs/default yet: train one with `tinylm pretrain`"),
])
def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, argv, expect):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("too short for a window")
    (tmp_path / "long.txt").write_text("long enough for many windows " * 20)
    argv = [a.format(tmp=tmp_path) for a in argv]
    if argv[0] == "pretrain":
        argv = argv[:1] + ["--out", str(tmp_path / "run"), *TINY] + argv[1:]     # a later --out wins
    if "invalid choice" in expect or "argument --" in expect:   # argparse's usage error: exit 2, usage + one line
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and expect in capsys.readouterr().err
        return
    one_error_line(capsys, argv, expect)
    assert not (tmp_path / "run").exists()           # a refused run leaves nothing behind


def test_resuming_a_finished_run_does_nothing(run_dir, tmp_path, capsys):
    shutil.copytree(run_dir, tmp_path / "run")
    before = snapshot(tmp_path / "run")
    assert main(["pretrain", "--resume", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("done: step 6, train loss")
    assert snapshot(tmp_path / "run") == before


def test_prompt_longer_than_n_ctx_is_refused(run_dir, capsys):
    one_error_line(capsys, ["sample", str(run_dir), "--prompt", "x" * 17], "--prompt is 17 tokens, more than the "
                                                                            "model's n_ctx=16")


@pytest.mark.parametrize("damage, expect", [
    ("truncate_model", "cannot read model.safetensors"),
    ("config_mismatch", "missing tensors: h.1.attn.c_attn.bias"),
    ("state_mismatch", "train_config's model (GPTConfig(vocab_size=257, n_ctx=8"),
    ("truncate_state", "trainer_state.json is unreadable or truncated"),
    ("truncate_optimizer", "cannot read optimizer.safetensors"),
    ("truncate_pointer", "checkpoint.json is unreadable or truncated"),
])
def test_damaged_checkpoint_is_refused_and_kept(run_dir, tmp_path, capsys, damage, expect):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = latest_checkpoint(str(run))

    def rewrite(name, edit):
        path = os.path.join(ckpt if name != "checkpoint.json" else run, name)
        data = open(path, "rb").read()
        open(path, "wb").write(edit(data))
    if damage == "truncate_model":
        rewrite("model.safetensors", lambda b: b[:len(b) // 2])
    elif damage == "config_mismatch":
        rewrite("config.json", lambda b: json.dumps({**json.loads(b), "n_layer": 2}).encode())
    elif damage == "state_mismatch":
        def edit(b):
            state = json.loads(b)
            state["train_config"]["model"]["n_ctx"] = 8
            return json.dumps(state).encode()
        rewrite("trainer_state.json", edit)
    elif damage == "truncate_state":
        rewrite("trainer_state.json", lambda b: b[:20])
    elif damage == "truncate_optimizer":
        rewrite("optimizer.safetensors", lambda b: b[:100])
    else:
        rewrite("checkpoint.json", lambda b: b[:5])
    before = snapshot(run) if damage != "truncate_pointer" else None
    resume = damage in ("truncate_optimizer", "state_mismatch")
    command = ["pretrain", "--resume", "--out", str(run), "--quiet"] if resume else ["sample", str(run)]
    one_error_line(capsys, command, expect)
    if before is not None:
        assert snapshot(run) == before


def test_sample_stops_before_the_stop_string_and_a_seed_repeats_the_text(run_dir, capsys):
    argv = ["sample", str(run_dir), "--prompt", "def", "--max-new-tokens", "40", "--seed", "3", "--top-p", "0.9"]
    assert main(argv) == 0
    full = capsys.readouterr().out
    assert main(argv) == 0 and capsys.readouterr().out == full
    new = full[len("def"):-1]
    stop = new[5:7]                            # two characters the model wrote after its first five
    cut = new.find(stop)
    assert main(argv + ["--stop", stop]) == 0
    assert capsys.readouterr().out == "def" + new[:cut] + "\n"


def test_sample_from_hugging_face_directory_with_bpe(tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(FIXTURE, hf)
    # The fixture model has vocab_size 64: 62 byte tokens, one merge, and <|endoftext|>.
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789Ġ."
    vocab = {c: i for i, c in enumerate(chars[:62])}
    vocab["ab"] = 62
    vocab["<|endoftext|>"] = 63
    (hf / "vocab.json").write_text(json.dumps(vocab))
    (hf / "merges.txt").write_text("#version: 0.2\na b\n")
    assert main(["sample", str(hf), "--prompt", "abc", "--max-new-tokens", "10", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("abc") and "Hugging Face weights" in captured.err
    text = captured.out.rstrip("\n")
    assert set(text) <= set(chars[:62].replace("Ġ", " "))
    one_error_line(capsys, ["sample", FIXTURE], "vocab_size is 64 but the byte tokenizer")


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("for i in range(10):\n    print(i)\n" * 40, encoding="utf-8")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "tinylm", "pretrain", "--out", str(out), "--data", str(data),
                             "--steps", "100000", *TINY, "--checkpoint-every", "100000"],   # the last flag wins
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    # Wait for three logged steps, however long a busy machine takes to start (the limit only keeps
    # a hung run from hanging the suite; it is not what the test checks).
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted at step" in lines[0] and "--resume" in lines[0], stderr
    step = int(lines[0].split("interrupted at step ")[1].split(",")[0])
    last_logged = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert step >= 3 and step == last_logged
    assert latest_checkpoint(str(out)).endswith(f"ckpt-{step:07d}")
    assert subprocess.run([sys.executable, "-m", "tinylm", "info", str(out)], env=env, capture_output=True,
                          text=True).stdout.count(f"step: {step} of 100000") == 1
