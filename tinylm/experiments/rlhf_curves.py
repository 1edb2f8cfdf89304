"""Experiments beyond the demo, composed from the same stages (pipeline.prepare) and library calls.

compare: REINFORCE-LOO, PPO-clip, GRPO and PPO with an adaptive KL leash, each from the same base
against the same centred reward model (so equal labeller comparisons) for the same number of
steps × instructions × samples (so equal policy samples; PPO and GRPO take ppo_epochs optimizer
steps on each batch, REINFORCE one), and best-of-n against the reward model with no training.
Measured on held-out instructions: the labeller's success, the mean RM score, KL to the base.
"""
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import numpy as np

from ..rlhf.environment import (TOKENIZER, LabellerReward, PretrainConfig, WorldTasks, encode_prompts, evaluate, make_pairs,
                          pretrain_base, reference_responses, successes)
from ..rlhf.pipeline import DemoConfig, mean_and_sd, prepare, relabel, train_demo_rm, train_judge
from ..rlhf.reward import pack
from ..rlhf.policy import PolicyConfig, RewardConfig, best_of_n, train_dpo, train_policy
from ..rlhf.world import Labeller, World

BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def run_seeds(run_seed, cfg, seeds, progress=True, jobs=1):
    """{str(seed): run_seed(cfg, seed, progress)} in seed order. The seeds are independent and
    deterministic, so with jobs > 1 they run in that many worker processes, each with one BLAS
    thread: the workers are spawned (fresh interpreters, so their numpy loads after the thread
    count is set in the environment they inherit), and the result equals this process's run with
    OPENBLAS_NUM_THREADS=1 (tests/test_experiments.py). Workers show no progress bars."""
    jobs = min(jobs, len(seeds))
    if jobs <= 1:
        return {str(s): run_seed(cfg, s, progress) for s in seeds}
    saved = {k: os.environ.get(k) for k in BLAS_THREADS}
    os.environ.update(dict.fromkeys(BLAS_THREADS, "1"))
    try:
        pool = multiprocessing.get_context("spawn").Pool(jobs)      # starts the workers now
    finally:
        for k, v in saved.items():                                  # this process's environment as it was
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    with pool:
        results = pool.starmap(run_seed, [(cfg, s, False) for s in seeds], chunksize=1)
        pool.close()
        pool.join()                      # the workers exit before the pool is torn down (no leaked semaphores)
    return dict(zip(map(str, seeds), results))


COMPARE_RUNS = {
    "reinforce_loo": {},
    "ppo_clip": {"algorithm": "ppo"},
    "grpo": {"algorithm": "grpo"},
    "ppo_adaptive_kl": {"algorithm": "ppo", "kl_target": 1.0},
    "grpo_adaptive_kl": {"algorithm": "grpo", "kl_target": 1.0},
}


@dataclass
class CompareConfig:
    """The demo's world, base and reward model; RL runs of 60 steps (the demo's take 150) so that
    five seeds of six methods fit in ten minutes."""
    demo: DemoConfig = field(default_factory=lambda: DemoConfig(
        heldout_pair_instructions=1000, policy=PolicyConfig(steps=60, prompts_per_step=32)))
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


def run_compare(cfg, seeds, progress=True, jobs=1):
    """run_compare_seed per seed (in `jobs` processes: run_seeds) -> summarise_compare."""
    return summarise_compare(run_seeds(run_compare_seed, cfg, seeds, progress, jobs), asdict(cfg))


def summarise_compare(per_seed, config):
    """{seed: run_compare_seed's result} -> {"methods": mean ± sd per method, "seeds", "config"}."""
    first = next(iter(per_seed.values()))
    methods = {name: mean_and_sd({s: r["methods"][name] for s, r in per_seed.items()}) for name in first["methods"]}
    return {"methods": methods, "seeds": per_seed,
            "rm_heldout_accuracy": mean_and_sd({s: {"v": r["rm_heldout_accuracy"]} for s, r in per_seed.items()}),
            "config": {**config, "seeds": [int(s) for s in per_seed]},
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


# ----------------------------------------------------------------------------- over-optimisation
@dataclass
class GoodhartConfig:
    """The policy pushed against reward models trained on more or fewer pairs, and on the same
    pairs relabelled by the LM judge (pipeline.train_judge, demo.judge_steps of pretraining), with
    no KL leash."""
    demo: DemoConfig = field(default_factory=lambda: DemoConfig(
        pair_instructions=3000, heldout_pair_instructions=500,
        policy=PolicyConfig(beta=0.0, steps=150, prompts_per_step=16, lr=5e-4)))
    train_pairs: tuple = (100, 400, None)        # None: every pair
    judge: bool = True                           # also a reward model on every pair, labelled by the LM judge
    window: int = 10                             # steps per logged point (means over the window)


QUICK_GOODHART = GoodhartConfig(demo=replace(QUICK_COMPARE.demo, judge_steps=300,
                                             policy=PolicyConfig(beta=0.0, steps=20, prompts_per_step=8, lr=5e-4)),
                                train_pairs=(50, None), window=5)


def windowed(history, window):
    """Every `window` steps: the mean proxy score, gold success and KL of the samples, and √KL."""
    points = []
    for i in range(0, len(history) - window + 1, window):
        h = history[i:i + window]
        kl = float(np.mean([x["kl"] for x in h]))
        points.append({"step": h[-1]["step"], "proxy": float(np.mean([x["reward"] for x in h])),
                       "gold": float(np.mean([x["success"] for x in h])), "kl": kl, "sqrt_kl": float(np.sqrt(max(kl, 0)))})
    return points


def peak_and_fall(points):
    """The gold peak (its value, step and √KL) and how far gold fell from it by the last point."""
    best = max(points, key=lambda p: p["gold"])
    return {"gold_peak": best["gold"], "peak_sqrt_kl": best["sqrt_kl"], "peak_step": best["step"],
            "gold_last": points[-1]["gold"], "gold_fall": best["gold"] - points[-1]["gold"],
            "proxy_last": points[-1]["proxy"], "proxy_rise_after_peak": points[-1]["proxy"] - best["proxy"],
            "sqrt_kl_last": points[-1]["sqrt_kl"]}


def overoptimisation_curve(prep, pairs, cfg, rng, progress, desc):
    """A reward model on `pairs` (centred on the base) and a β = 0 policy against it; -> the RM's
    held-out accuracy (on the labeller's held-out pairs), the logged curve and its peak and fall."""
    demo = cfg.demo
    trained = train_demo_rm(prep.base, pairs, prep.heldout_pairs, demo, rng)
    trained.rm.centre(*reference_responses(prep.base, prep.world, demo.centre_instructions,
                                           demo.policy.max_new_tokens, rng))
    run = train_policy(prep.base, trained.rm, WorldTasks(prep.world, prep.labeller), demo.policy, pairs, rng,
                       demo.reward, progress, desc)
    points = windowed(run.history, cfg.window)
    return {"train_pairs": len(pairs), "rm_heldout_accuracy": trained.heldout_accuracy, "curve": points,
            **peak_and_fall(points)}


def run_goodhart_seed(cfg, seed, progress=True):
    """One seed: prepare, then per training-set size an over-optimisation curve on that many of the
    labeller's pairs; then (cfg.judge) one on all of them relabelled by a freshly trained LM judge.
    The judge runs last, so the labeller curves' numbers do not depend on cfg.judge."""
    t0 = time.perf_counter()
    demo = replace(cfg.demo, seed=seed)
    cfg = replace(cfg, demo=demo)
    rng = np.random.default_rng(seed)
    prep = prepare(demo, rng, progress)
    out = {}
    for n in cfg.train_pairs:
        pairs = prep.pairs if n is None else prep.pairs.subset(range(min(n, len(prep.pairs))))
        out[str(len(pairs) if n is not None else "all")] = overoptimisation_curve(prep, pairs, cfg, rng, progress,
                                                                                 f"rm {len(pairs)}")
    if cfg.judge:
        judge = train_judge(prep.world, demo, rng, progress)
        judged, agreement = relabel(judge, prep.pairs)
        out["judge"] = {**overoptimisation_curve(prep, judged, cfg, rng, progress, "judge rm"),
                        "judge_agreement": agreement, "judge_calls": judge.calls}
    return {"reward_models": out, "seconds": time.perf_counter() - t0}


def run_goodhart(cfg, seeds, progress=True, jobs=1):
    """run_goodhart_seed per seed (in `jobs` processes: run_seeds) -> summarise_goodhart."""
    return summarise_goodhart(run_seeds(run_goodhart_seed, cfg, seeds, progress, jobs), asdict(cfg))


def summarise_goodhart(per_seed, config):
    """{seed: run_goodhart_seed's result} -> per RM the mean ± sd of the peak and fall numbers, and every curve."""
    names = list(next(iter(per_seed.values()))["reward_models"])
    summary = {name: mean_and_sd({s: {k: v for k, v in r["reward_models"][name].items() if np.isscalar(v)}
                                  for s, r in per_seed.items()}) for name in names}
    return {"reward_models": summary, "seeds": per_seed, "config": {**config, "seeds": [int(s) for s in per_seed]},
            "seconds": float(sum(r["seconds"] for r in per_seed.values()))}


def goodhart_table(results):
    def cell(m, key):
        sd = m.get(f"{key}_sd")
        return f"{m[key]:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
    rows = ["| RM training pairs | RM held-out acc | gold peak | √KL at peak | gold last | gold fall | proxy rise after peak | √KL last |",
            "|---|---|---|---|---|---|---|---|"]
    for name, m in results["reward_models"].items():
        rows.append(f"| {name} ({m['train_pairs']:.0f}) | " + " | ".join(cell(m, k) for k in (
            "rm_heldout_accuracy", "gold_peak", "peak_sqrt_kl", "gold_last", "gold_fall", "proxy_rise_after_peak",
            "sqrt_kl_last")) + " |")
    if "judge" in results["reward_models"]:
        j = results["reward_models"]["judge"]
        rows.append(f"judge: the LM judge relabelled all the pairs ({j['judge_calls']:.0f} judge calls, 0 labeller "
                    f"comparisons); agreement with the noiseless labeller {cell(j, 'judge_agreement')}")
    rows.append(f"seeds {','.join(map(str, results['config']['seeds']))}; β = 0; gold = labeller success of the "
                f"policy's samples, proxy = their mean RM score, KL = their Σ_t log π/π_start (nats), each a mean over "
                f"{results['config']['window']} steps; {results['seconds']:.0f} s")
    return "\n".join(rows)


def plot_goodhart(results, path):
    """Proxy (dashed) and gold (solid) against √KL, one colour per reward model, every seed's curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_gold, ax_proxy) = plt.subplots(1, 2, figsize=(10, 4))
    for colour, name in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], results["reward_models"]):
        for i, r in enumerate(results["seeds"].values()):
            curve = r["reward_models"][name]["curve"]
            x = [p["sqrt_kl"] for p in curve]
            labels = "judge-labelled pairs" if name == "judge" else "pairs"
            label = f"RM on {r['reward_models'][name]['train_pairs']} {labels}" if i == 0 else None
            ax_gold.plot(x, [p["gold"] for p in curve], "-", color=colour, alpha=0.7, label=label)
            ax_proxy.plot(x, [p["proxy"] for p in curve], "--", color=colour, alpha=0.7, label=label)
    for ax, title in ((ax_gold, "gold: labeller success"), (ax_proxy, "proxy: reward-model score")):
        ax.set_xlabel("√KL(policy ‖ start), √nats")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- label efficiency
@dataclass
class LabelsConfig:
    """Equal budgets of labeller comparisons for three uses of the labeller: pairs -> reward model ->
    policy gradient; the same pairs -> DPO; and the labeller's score as the policy's reward, queried
    once per sample (as many samples as the budget buys)."""
    demo: DemoConfig = field(default_factory=lambda: DemoConfig(
        heldout_pair_instructions=500, policy=PolicyConfig(steps=60, prompts_per_step=32)))
    budgets: tuple = (50, 100, 200, 400, 800)
    direct_prompts_per_step: int = 4             # the direct labeller run: 4 × k samples per step, steps = budget / that


QUICK_LABELS = LabelsConfig(demo=replace(QUICK_COMPARE.demo, heldout_pair_instructions=100), budgets=(50, 200))


def run_labels_seed(cfg, seed, progress=True):
    """One seed: one base; per budget B, B labeller comparisons (ties give no pair) train a reward
    model for a policy gradient run and DPO, and a policy-gradient run whose reward is the labeller
    itself takes B / (prompts × k) steps. -> per budget and method: held-out success, queries."""
    t0 = time.perf_counter()
    demo = replace(cfg.demo, seed=seed)
    rng = np.random.default_rng(seed)
    world, labeller = World(seed=seed, p_follow=demo.p_follow), Labeller(demo.label_noise, seed=seed)
    max_new = demo.policy.max_new_tokens
    base = pretrain_base(world, demo.model, demo.pretrain, seed, rng, progress)
    heldout = make_pairs(base, world.instructions(demo.heldout_pair_instructions, rng, heldout=True), labeller, max_new, rng)
    eval_set = world.instructions(demo.eval_instructions, rng, heldout=True)
    tasks, out = WorldTasks(world, labeller), {}
    for budget in cfg.budgets:
        pairs = make_pairs(base, world.instructions(budget, rng), labeller, max_new, rng)
        trained = train_demo_rm(base, pairs, heldout, demo, rng)
        trained.rm.centre(*reference_responses(base, world, demo.centre_instructions, max_new, rng))
        rm_run = train_policy(base, trained.rm, tasks, demo.policy, pairs, rng, demo.reward, progress, f"rm {budget}")
        dpo = base.copy()
        train_dpo(dpo, base, pairs, demo.dpo.epochs, demo.dpo.batch, demo.dpo.lr, demo.dpo.beta, rng)
        direct = LabellerReward()
        per_step = cfg.direct_prompts_per_step * demo.policy.samples_per_prompt
        direct_cfg = replace(demo.policy, prompts_per_step=cfg.direct_prompts_per_step, steps=max(1, budget // per_step))
        direct_run = train_policy(base, direct, tasks, direct_cfg, pairs, rng, demo.reward, progress, f"labeller {budget}")
        out[str(budget)] = {"pairs": len(pairs), "rm_heldout_accuracy": trained.heldout_accuracy,
                            "direct_queries": direct.queries, "direct_steps": direct_cfg.steps,
                            **{f"{name}_success": evaluate(model, base, trained.rm, eval_set, demo.eval_samples, max_new,
                                                           rng)["success"]
                               for name, model in (("rm_pg", rm_run.policy), ("dpo", dpo), ("direct_pg", direct_run.policy))}}
    out["base_success"] = evaluate(base, base, trained.rm, eval_set, demo.eval_samples, max_new, rng)["success"]
    return {"budgets": out, "seconds": time.perf_counter() - t0}


def run_labels(cfg, seeds, progress=True, jobs=1):
    """run_labels_seed per seed (in `jobs` processes: run_seeds) -> summarise_labels."""
    return summarise_labels(run_seeds(run_labels_seed, cfg, seeds, progress, jobs), asdict(cfg))


def summarise_labels(per_seed, config):
    """{seed: run_labels_seed's result} -> per budget the mean ± sd of every number."""
    keys = [k for k in next(iter(per_seed.values()))["budgets"] if k != "base_success"]
    summary = {k: mean_and_sd({s: r["budgets"][k] for s, r in per_seed.items()}) for k in keys}
    return {"budgets": summary, "base_success": mean_and_sd({s: {"v": r["budgets"]["base_success"]}
                                                             for s, r in per_seed.items()}),
            "seeds": per_seed, "config": {**config, "seeds": [int(s) for s in per_seed]},
            "seconds": float(sum(r["seconds"] for r in per_seed.values()))}


def labels_table(results):
    def cell(m, key):
        sd = m.get(f"{key}_sd")
        return f"{m[key]:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
    rows = ["| labeller comparisons | pairs (no ties) | RM held-out acc | RM + policy gradient | DPO | policy gradient on "
            "the labeller | its labeller queries |", "|---|---|---|---|---|---|---|"]
    for budget, m in results["budgets"].items():
        rows.append(f"| {budget} | {m['pairs']:.0f} | {cell(m, 'rm_heldout_accuracy')} | {cell(m, 'rm_pg_success')} | "
                    f"{cell(m, 'dpo_success')} | {cell(m, 'direct_pg_success')} | {m['direct_queries']:.0f} |")
    rows.append(f"labeller success on held-out instructions; base {cell(results['base_success'], 'v')}; seeds "
                f"{','.join(map(str, results['config']['seeds']))}; {results['seconds']:.0f} s")
    return "\n".join(rows)


def plot_labels(results, path):
    """Held-out success against labeller comparisons (log scale), mean ± sd over seeds, per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    budgets = [int(b) for b in results["budgets"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("rm_pg", "reward model + policy gradient"), ("dpo", "DPO on the same pairs"),
                       ("direct_pg", "policy gradient on the labeller (budget = queries)")):
        m = [results["budgets"][str(b)] for b in budgets]
        ax.errorbar(budgets, [x[f"{key}_success"] for x in m], yerr=[x[f"{key}_success_sd"] or 0 for x in m],
                    marker="o", capsize=3, label=label)
    ax.axhline(results["base_success"]["v"], color="grey", ls=":", label="base")
    ax.set_xscale("log")
    ax.set_xlabel("labeller comparisons (queries)")
    ax.set_ylabel("labeller success (held-out)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class Experiment(NamedTuple):
    """What `tinylm rlhf NAME` runs: the default config (a class), the --quick one, the runner over
    seeds, the summary of per-seed results (bench/experiment_table.py merges runs with it), the
    table it prints and the plot it writes."""
    config: type
    quick: object
    run: object
    summarise: object
    table: object
    plot: object


EXPERIMENTS = {"compare": Experiment(CompareConfig, QUICK_COMPARE, run_compare, summarise_compare, compare_table,
                                     plot_compare),
               "goodhart": Experiment(GoodhartConfig, QUICK_GOODHART, run_goodhart, summarise_goodhart, goodhart_table,
                                      plot_goodhart),
               "labels": Experiment(LabelsConfig, QUICK_LABELS, run_labels, summarise_labels, labels_table, plot_labels)}
