"""Experiments beyond the demo, composed from the same stages (pipeline.prepare) and library calls.

compare: REINFORCE-LOO, PPO-clip, GRPO and PPO with an adaptive KL leash, each from the same base
against the same centred reward model (so equal labeller comparisons) for the same number of
steps × instructions × samples (so equal policy samples; PPO and GRPO take ppo_epochs optimizer
steps on each batch, REINFORCE one), and best-of-n against the reward model with no training.
Measured on held-out instructions: the labeller's success, the mean RM score, KL to the base.
"""
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .environment import TOKENIZER, PretrainConfig, WorldTasks, encode_prompts, evaluate, successes
from .pipeline import DemoConfig, mean_and_sd, prepare
from .reward import pack
from .rlhf import PolicyConfig, RewardConfig, best_of_n, train_policy

COMPARE_RUNS = {
    "reinforce_loo": {},
    "ppo_clip": {"algorithm": "ppo"},
    "grpo": {"algorithm": "grpo"},
    "ppo_adaptive_kl": {"algorithm": "ppo", "kl_target": 1.0},
}


@dataclass
class CompareConfig:
    """The demo's world and stages, smaller so that five seeds of five methods fit in ten minutes."""
    demo: DemoConfig = field(default_factory=lambda: DemoConfig(
        pretrain=PretrainConfig(steps=1500), pair_instructions=4000, heldout_pair_instructions=500,
        reward=RewardConfig(epochs=3), policy=PolicyConfig(steps=60, prompts_per_step=16), eval_instructions=300))
    runs: tuple = tuple(COMPARE_RUNS)
    best_of: tuple = (4, 16)


QUICK_COMPARE = CompareConfig(demo=DemoConfig(
    pretrain=PretrainConfig(steps=300), pair_instructions=600, heldout_pair_instructions=150,
    reward=RewardConfig(epochs=2), policy=PolicyConfig(steps=8, prompts_per_step=8, lr=5e-4),
    eval_instructions=80), best_of=(4,))


def best_of_n_result(prep, eval_set, n, cfg, rng):
    """Best-of-n from the base on eval_set: success and RM score of the kept response; its KL to the
    base is at most log n − (n − 1)/n nats (the bound for best-of-n, Stiennon et al. 2020), not measured."""
    prompts = encode_prompts(eval_set)
    responses = best_of_n(prep.base, prep.rm, prompts, n, cfg.policy.max_new_tokens, 1.0, rng, TOKENIZER.eot_id)
    batch = pack(prompts, responses)
    return {"success": float(successes(eval_set, responses).mean()),
            "reward": float(prep.rm.rewards(batch.idx, batch.lengths).mean()),
            "kl_bound": float(np.log(n) - (n - 1) / n), "reward_model_scores": n * len(eval_set)}


def run_compare_seed(cfg, seed, progress=True):
    """One seed: prepare, then every run of cfg.runs and best-of-n, measured on one held-out set."""
    t0 = time.perf_counter()
    demo = replace(cfg.demo, seed=seed)
    rng = np.random.default_rng(seed)
    prep = prepare(demo, rng, progress)
    eval_set = prep.world.instructions(demo.eval_instructions, rng, heldout=True)
    tasks = WorldTasks(prep.world, prep.labeller)
    out = {"base": evaluate(prep.base, prep.base, prep.rm, eval_set, demo.eval_samples, demo.policy.max_new_tokens, rng)}
    histories = {}
    for name in cfg.runs:
        pcfg = replace(demo.policy, **COMPARE_RUNS[name])
        run = train_policy(prep.base, prep.rm, tasks, pcfg, prep.pairs, rng, demo.reward, progress, name)
        out[name] = {**evaluate(run.policy, prep.base, prep.rm, eval_set, demo.eval_samples, pcfg.max_new_tokens, rng),
                     "policy_samples": sum(h["samples"] for h in run.history),
                     "optimizer_steps": pcfg.steps * (1 if pcfg.algorithm == "reinforce" else pcfg.ppo_epochs),
                     "final_beta": run.history[-1]["beta"]}
        histories[name] = run.history
    for n in cfg.best_of:
        out[f"best_of_{n}"] = best_of_n_result(prep, eval_set, n, demo, rng)
    return {"methods": out, "rm_heldout_accuracy": prep.trained.heldout_accuracy,
            "labeller_comparisons": prep.pair_comparisons, "history": histories,
            "seconds": time.perf_counter() - t0}


def run_compare(cfg, seeds, progress=True):
    """run_compare_seed per seed -> {"methods": mean ± sd per method, "seeds": per seed, "config"}."""
    per_seed = {s: run_compare_seed(cfg, s, progress) for s in seeds}
    methods = {name: mean_and_sd({s: r["methods"][name] for s, r in per_seed.items()})
               for name in per_seed[seeds[0]]["methods"]}
    return {"methods": methods, "seeds": {str(s): r for s, r in per_seed.items()},
            "rm_heldout_accuracy": mean_and_sd({s: {"v": r["rm_heldout_accuracy"]} for s, r in per_seed.items()}),
            "config": {**asdict(cfg), "seeds": list(seeds)},
            "seconds": float(sum(r["seconds"] for r in per_seed.values()))}


def compare_table(results):
    """The comparison as a Markdown table: mean ± sd over seeds per method."""
    def cell(m, key):
        if key not in m:
            return "—"
        sd = m.get(f"{key}_sd")
        return f"{m[key]:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
    rows = ["| method | labeller success | mean RM score | KL to base (nats) | policy samples | optimizer steps |",
            "|---|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        kl = cell(m, "kl") if "kl" in m else f"≤ {m['kl_bound']:.2f} (bound)"
        rows.append(f"| {name} | {cell(m, 'success')} | {cell(m, 'reward')} | {kl} | "
                    f"{m.get('policy_samples', m.get('reward_model_scores', 0)):.0f} | {m.get('optimizer_steps', 0):.0f} |")
    rm = results["rm_heldout_accuracy"]
    rows.append(f"seeds {','.join(map(str, results['config']['seeds']))}; RM held-out accuracy {cell(rm, 'v')}; "
                f"best-of-n: samples column = reward-model scores at evaluation; {results['seconds']:.0f} s")
    return "\n".join(rows)


def plot_compare(results, path):
    """Labeller success per method, mean ± sd over seeds, as a bar chart PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results["methods"])
    means = [results["methods"][n]["success"] for n in names]
    sds = [results["methods"][n]["success_sd"] or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, means, yerr=sds, capsize=4)
    ax.set_ylabel("labeller success (held-out)")
    ax.set_title(f"seeds {','.join(map(str, results['config']['seeds']))}, equal comparisons and samples")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
