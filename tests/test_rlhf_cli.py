"""`tinylm rlhf` step by step on checkpoints, its refusals (nothing overwritten), and one
`tinylm demo --quick` run checked for its JSON schema, plots and sane numbers."""
import argparse
import json
import math
import os

import numpy as np
import pytest

from tinylm.cli import main
from tinylm.rlhf.policy import Preferences


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


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_policy_and_dpo_write_their_diagnostics_and_plot_them(algorithm, steps, tmp_path, capsys):
    """metrics.jsonl per step (TRL's diagnostics): the policy's reward, KL, β (adaptive here: it
    moves) and clip fraction; DPO's chosen/rejected log-probs, implicit rewards, margin and accuracy,
    starting at ln 2 with margin 0."""
    from tinylm.train.run_log import read_metrics
    out = tmp_path / "policy"
    assert main(["rlhf", "policy", "--model", steps["base"], "--reward", steps["rm"], "--out", str(out), "--steps", "3",
                 "--prompts-per-step", "4", "--algorithm", algorithm, "--ppo-epochs", "2", "--kl-target", "0.5",
                 "--plot"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2] and (out / "metrics.png").is_file()
    assert all(0 <= r["clip_fraction"] <= 1 and math.isfinite(r["kl"] + r["reward"]) for r in records)
    assert records[0]["beta"] == 0.1 and records[1]["beta"] != 0.1
    out = tmp_path / "dpo"
    assert main(["rlhf", "dpo", "--model", steps["base"], "--pairs", steps["pairs.json"], "--out", str(out),
                 "--epochs", "4", "--plot"]) == 0
    assert "implicit-reward accuracy" in capsys.readouterr().out and (out / "metrics.png").is_file()
    records = read_metrics(out / "metrics.jsonl")       # each step's record is taken before its update
    first = records[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-5) and first["logp_chosen"] < 0
    assert records[-1]["reward_margin"] > 0 and records[-1]["reward_accuracy"] > 0.5


def test_sft_writes_a_checkpoint_that_answers_better(steps, tmp_path, capsys):
    out = str(tmp_path / "sft")
    assert main(["rlhf", "sft", "--model", steps["base"], "--out", out, "--instructions", "320", "--epochs", "2"]) == 0
    assert "SFT cross-entropy" in capsys.readouterr().out
    assert main(["rlhf", "eval", "--model", out, "--reference", steps["base"], "--reward", steps["rm"],
                 "--instructions", "40"]) == 0
    assert "KL to reference" in capsys.readouterr().out


def test_policy_with_the_raw_rule_and_a_centred_reward_model(steps, tmp_path, capsys):
    """The lecture's rule from the CLI: no baseline, one sample per instruction, the reward model
    first centred on the starting LM's responses."""
    out = str(tmp_path / "policy")
    assert main(["rlhf", "policy", "--model", steps["base"], "--reward", steps["rm"], "--out", out, "--steps", "2",
                 "--prompts-per-step", "4", "--baseline", "none", "--samples-per-prompt", "1", "--centre"]) == 0
    assert "centred the reward model" in capsys.readouterr().out and os.path.isdir(out)
    assert main(["rlhf", "policy", "--model", steps["base"], "--reward", steps["rm"], "--out", out + "2",
                 "--samples-per-prompt", "1"]) == 2
    assert "samples_per_prompt must be >= 2 for the leave-one-out baseline" in capsys.readouterr().err
    assert not os.path.exists(out + "2")


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
    from tinylm.rlhf.reward import RewardModel
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
    assert set(results["seeds"]) == {"0"} and results["seeds"]["0"]["stages"]["rlhf"]["success"] == \
        results["stages"]["rlhf"]["success"]
    labels = results["labels"]
    assert labels["dpo"]["labeller"] == labels["rlhf"]["labeller"] == results["config"]["pair_instructions"]
    assert labels["rlhf"]["reward_model"] == results["config"]["policy"]["steps"] * 16 * 4
    assert sorted(os.listdir(plots)) == ["rl_kl.png", "rl_reward.png", "rl_success.png"]
    # a second run with the same outputs refuses before doing any work
    assert main(["demo", "--quick", "--json", path]) == 2


@pytest.mark.parametrize("argv, flag", [
    (["rlhf", "base", "--out", "x", "--steps", "0"], "--steps"),
    (["rlhf", "reward", "--model", "m", "--pairs", "p", "--out", "x", "--epochs", "0"], "--epochs"),
    (["rlhf", "reward", "--model", "m", "--pairs", "p", "--out", "x", "--lr", "-1"], "--lr"),
    (["rlhf", "dpo", "--model", "m", "--pairs", "p", "--out", "x", "--beta", "-1"], "--beta"),
    (["rlhf", "policy", "--model", "m", "--reward", "r", "--out", "x", "--beta", "-0.5"], "--beta"),
    (["rlhf", "policy", "--model", "m", "--reward", "r", "--out", "x", "--baseline", "median"], "--baseline"),
    (["rlhf", "pairs", "--model", "m", "--out", "x", "--noise", "1.5"], "--noise"),
    (["demo", "--seeds", "4-x"], "--seeds"),
    (["demo", "--rl-steps", "0"], "--rl-steps"),
])
def test_bad_numbers_are_refused_while_parsing(argv, flag, capsys):
    """Each range is checked by argparse before anything loads: exit 2, one line naming the flag."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_every_rlhf_and_demo_flag_has_help_with_its_default():
    from tinylm.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    rlhf_steps = next(a for a in sub.choices["rlhf"]._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in [("demo", sub.choices["demo"]), *rlhf_steps.choices.items()]:
        text = parser.format_help()
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
            if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings != ["-h", "--help"]:
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.option_strings)


def test_demo_refuses_bad_output_paths_before_any_work(tmp_path, monkeypatch, capsys):
    import tinylm.rlhf.pipeline
    monkeypatch.setattr(tinylm.rlhf.pipeline, "run_seeds", lambda *a, **k: pytest.fail("the run started"))
    a_file = tmp_path / "file"
    a_file.write_text("")
    for argv, message in ((["--plot", str(a_file)], "is not a writable folder"),
                          (["--json", str(tmp_path / "missing" / "dir" / "x.json")], "does not exist"),
                          (["--json", str(a_file)], "already exists")):
        assert main(["demo", "--quick", *argv]) == 2
        assert message in capsys.readouterr().err


def test_garbled_pairs_file_is_named_in_the_error(steps, tmp_path, capsys):
    for text in ('[{"prompt": [1]}\n  garbage', '{"prompt": []}', '[{"prompt": [1], "chosen": [2]}]',
                 '[{"prompt": "ab", "chosen": [1], "rejected": [2], "instruction": []}]'):
        path = tmp_path / "garbled.json"
        path.write_text(text)
        out = str(tmp_path / "rm")
        assert main(["rlhf", "reward", "--model", steps["base"], "--pairs", str(path), "--out", out]) == 2
        err = capsys.readouterr().err
        assert f"pairs file {str(path)!r}" in err and "Traceback" not in err, err
        assert not os.path.exists(out)


def test_seed_lists():
    from tinylm.commands.demo import seed_list
    assert seed_list("3") == [3] and seed_list("0-4") == [0, 1, 2, 3, 4] and seed_list("0,2,5") == [0, 2, 5]


def test_several_seeds_report_mean_and_sd(monkeypatch):
    """run_seeds on stand-in per-seed results: the top-level numbers are the means, `_sd` the
    sample standard deviations, and each seed's own results stay under `seeds`."""
    import tinylm.rlhf.pipeline as pipeline

    def fake_run(cfg, progress=True):
        x = float(cfg.seed)
        return {"stages": {"base": {"success": x, "reward": 2 * x, "kl": 0.0, "examples": []}},
                "reward_model": {"heldout_accuracy": 0.8 + x / 100, "validation_accuracy": [0.5]},
                "labels": {"dpo": {"labeller": 100 + x, "reward_model": 0}},
                "history": {"rlhf": [{"step": 0}]}, "config": {"seed": cfg.seed}, "seconds": 1.0}
    monkeypatch.setattr(pipeline, "run_demo", fake_run)
    results = pipeline.run_seeds(pipeline.DemoConfig(), [1, 2, 6])
    base = results["stages"]["base"]
    assert base["success"] == 3.0 and math.isclose(base["success_sd"], np.std([1, 2, 6], ddof=1))
    assert base["reward"] == 6.0 and base["kl_sd"] == 0.0
    assert math.isclose(results["reward_model"]["heldout_accuracy"], 0.83)
    assert results["labels"]["dpo"]["labeller"] == 103.0
    assert set(results["seeds"]) == {"1", "2", "6"} and results["seeds"]["6"]["stages"]["base"]["success"] == 6.0
    assert set(results["history"]) == {"rlhf (seed 1)", "rlhf (seed 2)", "rlhf (seed 6)"}
    assert results["seconds"] == 3.0
