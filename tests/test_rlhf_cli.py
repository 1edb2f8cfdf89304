"""`tinylm rlhf` step by step on checkpoints, its refusals (nothing overwritten), and one
`tinylm demo --quick` run checked for its JSON schema, plots and sane numbers."""
import json
import math
import os

import numpy as np
import pytest

from tinylm.cli import main
from tinylm.rlhf import Preferences


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """base -> pairs -> reward -> policy / dpo, each as small as still means something."""
    d = tmp_path_factory.mktemp("rlhf")
    p = {k: str(d / k) for k in ("base", "pairs.json", "held.json", "rm", "policy", "dpo")}
    assert main(["rlhf", "base", "--out", p["base"], "--steps", "60"]) == 0
    assert main(["rlhf", "pairs", "--model", p["base"], "--out", p["pairs.json"], "--instructions", "200"]) == 0
    assert main(["rlhf", "pairs", "--model", p["base"], "--out", p["held.json"], "--instructions", "100",
                 "--heldout"]) == 0
    assert main(["rlhf", "reward", "--model", p["base"], "--pairs", p["pairs.json"], "--heldout-pairs",
                 p["held.json"], "--out", p["rm"], "--epochs", "1"]) == 0
    return p


def test_steps_chain_on_checkpoints(steps, tmp_path, capsys):
    out = str(tmp_path / "policy")
    assert main(["rlhf", "policy", "--model", steps["base"], "--reward", steps["rm"], "--out", out, "--steps", "2",
                 "--prompts-per-step", "4", "--rm-rounds", "1", "--pairs", steps["pairs.json"]]) == 0
    assert main(["rlhf", "dpo", "--model", steps["base"], "--pairs", steps["pairs.json"], "--out",
                 str(tmp_path / "dpo"), "--epochs", "1"]) == 0
    assert main(["rlhf", "eval", "--model", out, "--reference", steps["base"], "--reward", steps["rm"],
                 "--instructions", "10"]) == 0
    assert "labeller success" in capsys.readouterr().out
    assert set(os.listdir(steps["rm"])) >= {"config.json", "model.safetensors", "reward_head.safetensors"}
    assert not any(name.endswith(".partial") for name in os.listdir(tmp_path))


def snapshot(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


def test_existing_output_is_never_overwritten(steps, capsys):
    before = snapshot(steps["rm"])
    assert main(["rlhf", "reward", "--model", steps["base"], "--pairs", steps["pairs.json"], "--out", steps["rm"]]) == 2
    assert "already exists" in capsys.readouterr().err
    assert snapshot(steps["rm"]) == before


def test_bad_pairs_files_are_refused_without_writing(steps, tmp_path, capsys):
    empty, same = str(tmp_path / "empty.json"), str(tmp_path / "same.json")
    Preferences([], [], [], []).save(empty)
    Preferences([np.array([99])], [np.array([97, 256])], [np.array([97, 256])], [("cpy", "a")]).save(same)
    for pairs, message in ((empty, "preference set is empty"), (same, "identical chosen and rejected")):
        for step in ("reward", "dpo"):
            out = str(tmp_path / f"{step}-out")
            assert main(["rlhf", step, "--model", steps["base"], "--pairs", pairs, "--out", out]) == 2
            assert message in capsys.readouterr().err
            assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_nan_reward_model_is_refused_without_writing(steps, tmp_path, capsys):
    from tinylm.reward import RewardModel
    rm = RewardModel.load(steps["rm"])
    rm.params["reward_bias"][...] = np.nan
    rm.save(str(tmp_path / "nan-rm"))
    out = str(tmp_path / "policy")
    assert main(["rlhf", "policy", "--model", steps["base"], "--reward", str(tmp_path / "nan-rm"), "--out", out,
                 "--steps", "1", "--prompts-per-step", "2"]) == 2
    assert "rewards must be finite" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_vocab_mismatch_is_refused(steps, tmp_path, capsys):
    from tinylm import GPT, GPTConfig
    other = str(tmp_path / "other")
    GPT(GPTConfig(vocab_size=300, n_ctx=24, n_layer=1, n_head=2, d_model=8)).save_pretrained(other)
    out = str(tmp_path / "policy")
    assert main(["rlhf", "policy", "--model", other, "--reward", steps["rm"], "--out", out, "--steps", "1"]) == 2
    assert "vocab_size=257 differs from the policy's vocab_size=300" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_demo_quick(tmp_path, capsys):
    path, plots = str(tmp_path / "demo.json"), str(tmp_path / "plots")
    assert main(["demo", "--quick", "--json", path, "--plot", plots]) == 0
    table = capsys.readouterr().out
    assert "labeller success" in table and "held-out pairwise accuracy" in table
    results = json.load(open(path))
    assert set(results["stages"]) == {"base", "rlhf", "dpo"}
    for stage in results["stages"].values():
        assert set(stage) >= {"success", "reward", "kl"}
        assert 0.0 <= stage["success"] <= 1.0 and math.isfinite(stage["reward"]) and math.isfinite(stage["kl"])
    assert results["stages"]["base"]["kl"] == 0.0            # the base is its own reference
    assert results["stages"]["rlhf"]["kl"] > 0.0
    assert results["reward_model"]["heldout_accuracy"] > 0.6  # well above chance even in the quick run
    assert results["seconds"] > 0
    assert sorted(os.listdir(plots)) == ["rl_kl.png", "rl_reward.png", "rl_success.png"]
    # a second run with the same outputs refuses before doing any work
    assert main(["demo", "--quick", "--json", path]) == 2
