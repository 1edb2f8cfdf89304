"""The experiments (tinylm/experiments/rlhf_curves.py) on micro configs: equal samples and comparisons across
methods, the schema the tables and plots read, and the over-optimisation curve's arithmetic."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from tinylm.cli import main
from tinylm.rlhf.environment import PretrainConfig
from tinylm.experiments.rlhf_curves import (QUICK_COMPARE, QUICK_GOODHART, CompareConfig, GoodhartConfig,
                                            goodhart_table, peak_and_fall, run_compare, run_goodhart, windowed)
from tinylm.rlhf.policy import PolicyConfig, RewardConfig

MICRO = replace(QUICK_COMPARE.demo, pretrain=PretrainConfig(steps=100), pair_instructions=300,
                heldout_pair_instructions=40, reward=RewardConfig(epochs=1),
                policy=PolicyConfig(steps=2, prompts_per_step=4), eval_instructions=20)


def test_every_method_gets_the_same_samples_and_the_same_reward_model():
    results = run_compare(CompareConfig(demo=MICRO, best_of=(2,)), [0], progress=False)
    methods = results["methods"]
    assert list(methods) == ["base", "reinforce_loo", "ppo_clip", "grpo", "ppo_adaptive_kl", "grpo_adaptive_kl",
                             "best_of_2"]
    assert {methods[m]["policy_samples"] for m in ("reinforce_loo", "ppo_clip", "grpo")} == {2 * 4 * 4}
    assert methods["reinforce_loo"]["optimizer_steps"] == 2 and methods["ppo_clip"]["optimizer_steps"] == 8
    assert methods["ppo_adaptive_kl"]["final_beta"] != 0.1 and methods["ppo_clip"]["final_beta"] == 0.1
    assert methods["best_of_2"]["reward_model_scores"] == 2 * 20
    assert all(0 <= m["success"] <= 1 for m in methods.values())
    json.dumps(results)                                          # the --json file


def test_goodhart_curve_points_are_window_means_and_the_fall_is_peak_minus_last():
    history = [{"step": i, "reward": float(i), "success": s, "kl": float(i)} for i, s in
               enumerate([0.1, 0.3, 0.5, 0.7, 0.4, 0.2])]
    points = windowed(history, 2)
    assert [p["step"] for p in points] == [1, 3, 5]
    assert [p["gold"] for p in points] == pytest.approx([0.2, 0.6, 0.3])
    assert points[1]["sqrt_kl"] == pytest.approx(2.5 ** 0.5)
    summary = peak_and_fall(points)
    assert summary["gold_peak"] == pytest.approx(0.6) and summary["gold_fall"] == pytest.approx(0.3)
    assert summary["proxy_rise_after_peak"] == pytest.approx(4.5 - 2.5)
    assert windowed([{"step": 0, "reward": 0.0, "success": 0.0, "kl": -0.2}] * 2, 2)[0]["sqrt_kl"] == 0.0


def test_goodhart_trains_one_reward_model_per_training_set_size_and_one_on_the_judges_labels():
    cfg = GoodhartConfig(demo=replace(MICRO, judge_steps=20, policy=replace(QUICK_GOODHART.demo.policy, steps=4)),
                         train_pairs=(10, None), window=2)
    results = run_goodhart(cfg, [0], progress=False)
    rms, curves = results["reward_models"], results["seeds"]["0"]["reward_models"]
    assert list(rms) == ["10", "all", "judge"]
    assert rms["10"]["train_pairs"] == 10 and rms["all"]["train_pairs"] > 10
    # the judge relabels every pair (it never ties) and its curve has every field the others have
    assert rms["judge"]["train_pairs"] == rms["all"]["train_pairs"] == rms["judge"]["judge_calls"]
    assert set(rms["judge"]) - set(rms["all"]) == {"judge_agreement", "judge_agreement_sd", "judge_calls",
                                                   "judge_calls_sd"}
    assert 0 <= rms["judge"]["judge_agreement"] <= 1
    assert [len(curves[name]["curve"]) for name in rms] == [2, 2, 2]
    assert set(curves["judge"]["curve"][0]) == set(curves["all"]["curve"][0])
    # the judge runs last: without it the labeller curves are the same to the last bit
    assert run_goodhart(replace(cfg, judge=False), [0], progress=False)["seeds"]["0"]["reward_models"]["all"] == \
        curves["all"]
    assert "judge" in goodhart_table(results)


def without_timings(results):
    """The results with every wall-clock field removed (they differ run to run)."""
    if isinstance(results, dict):
        return {k: without_timings(v) for k, v in results.items() if k not in ("seconds", "wall_seconds", "jobs")}
    return [without_timings(v) for v in results] if isinstance(results, list) else results


def test_seeds_in_two_worker_processes_give_the_one_process_result(tmp_path):
    """--jobs 2 (one BLAS thread per worker) is --jobs 1 with OPENBLAS_NUM_THREADS=1, number for number."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    for jobs in (1, 2):
        done = subprocess.run([sys.executable, "-m", "tinylm", "rlhf", "compare", "--quick", "--seeds", "0,1",
                               "--jobs", str(jobs), "--json", str(tmp_path / f"jobs{jobs}.json")],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((tmp_path / f"jobs{jobs}.json").read_text()) for jobs in (1, 2))
    assert (one["jobs"], two["jobs"]) == (1, 2)
    assert list(two["seeds"]) == ["0", "1"] and without_timings(one) == without_timings(two)


def test_experiment_commands_refuse_existing_outputs_before_any_work(tmp_path, capsys):
    existing = tmp_path / "x.json"
    existing.write_text("{}")
    for name in ("compare", "goodhart"):
        assert main(["rlhf", name, "--quick", "--json", str(existing)]) == 2
        assert "already exists" in capsys.readouterr().err


def test_the_labeller_as_reward_scores_each_sequence_and_counts_its_queries():
    from tinylm.rlhf.environment import TOKENIZER, LabellerReward, encode_prompts
    from tinylm.rlhf.reward import pack
    instructions = [("rev", "cab"), ("rev", "cab"), ("srt", "ca"), ("len", "abc")]
    responses = [TOKENIZER.encode(r) for r in ("bac", "abc", "ac:", "4")]
    batch = pack(encode_prompts(instructions), responses)
    reward = LabellerReward()
    assert reward.rewards(batch.idx, batch.lengths).tolist() == [1.0, 0.5, 0.5, 0.0]   # "ac:" is one edit away
    assert reward.queries == 4


def test_label_budgets_buy_pairs_for_the_rm_and_dpo_and_queries_for_the_direct_run():
    from tinylm.experiments.rlhf_curves import LabelsConfig, run_labels
    results = run_labels(LabelsConfig(demo=MICRO, budgets=(64,), direct_prompts_per_step=2), [0], progress=False)
    b = results["seeds"]["0"]["budgets"]["64"]
    assert b["direct_queries"] == 64 and b["direct_steps"] == 8 and 0 < b["pairs"] <= 64
    assert set(results["budgets"]["64"]) >= {"rm_pg_success", "dpo_success", "direct_pg_success", "pairs"}
