"""`tinylm demo`: the whole RLHF pipeline from scratch on the built-in instruction world —
pretrain a base LM, label pairs, train a reward model, RLHF (REINFORCE + KL leash) and DPO — and
a table of what each stage achieves on held-out instructions. `--seeds 0-4` repeats everything
per seed and prints mean ± sd; `--experiment sign|shift|judge|sft` adds the lecture's open questions (judge: labels
from an LM; sft: supervised fine-tuning on demonstrations before RLHF and DPO)."""
import argparse
import json
import os

from tinylm.commands.args import DefaultsHelpFormatter, positive

PLOTS = (("reward", "reward-model score (proxy)"), ("kl", "KL(policy ‖ reference), nats"),
         ("success", "labeller success (truth)"))
EXPERIMENT_HELP = ("sign: the raw rule reward × (−log p) on the uncentred and the centred reward model vs the "
                   "batch-mean and leave-one-out baselines; shift: β = 0 long runs with and without "
                   "reward-model retraining, and β as configured; judge: an LM judge pretrained on judged "
                   "examples relabels the pairs, and a reward model on its labels drives RLHF; sft: fine-tune on "
                   "the world's demonstrations (right answers) first, then RLHF and DPO from the SFT model")


def seed_list(text):
    """'3' -> [3]; '0-4' -> [0, 1, 2, 3, 4]; '0,2,5' -> [0, 2, 5]."""
    try:
        if "-" in text.strip("-"):
            lo, hi = (int(x) for x in text.split("-"))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed list like 3, 0-4 or 0,2,5") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} names no seeds >= 0")
    return seeds


def add_parser(sub):
    p = sub.add_parser("demo", help="run pretraining -> reward model -> RLHF and DPO from scratch; print the gains",
                       description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a reduced run (about a minute on 2 cores), a smoke test")
    p.add_argument("--seeds", type=seed_list, default=[0], metavar="SEEDS",
                   help="seeds to run, e.g. 3, 0-4 or 0,2,5; several print mean ± sd per stage")
    p.add_argument("--seed", type=seed_list, dest="seeds", metavar="SEED", default=argparse.SUPPRESS,
                   help="same as --seeds")
    p.add_argument("--experiment", action="append", choices=("sign", "shift", "judge", "sft"), default=[], help=EXPERIMENT_HELP)
    p.add_argument("--rl-steps", type=positive(int), help="RL steps of the RLHF stage (None: the config's)")
    p.add_argument("--json", metavar="PATH", help="write every number as JSON to PATH (must not exist)")
    p.add_argument("--plot", metavar="DIR", help="write reward, KL and success over RL steps as PNGs to DIR")
    p.set_defaults(func=run)


def check_outputs(args):
    """Every output path must be new and writable before the run starts (a run takes minutes)."""
    outputs = [args.json] + ([os.path.join(args.plot, f"rl_{key}.png") for key, _ in PLOTS] if args.plot else [])
    for path in filter(None, outputs):
        if os.path.lexists(path):
            raise ValueError(f"{path!r} already exists: choose a new path (the demo never overwrites files)")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"--json {args.json!r}: folder {folder!r} does not exist or is not writable")
    if args.plot:
        existing = args.plot
        while not os.path.exists(existing):
            existing = os.path.dirname(os.path.abspath(existing))
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
            raise ValueError(f"--plot {args.plot!r}: {existing!r} is not a writable folder")


def run(args):
    from dataclasses import replace

    from tinylm.rlhf.pipeline import QUICK, DemoConfig, run_seeds

    check_outputs(args)
    cfg = replace(QUICK if args.quick else DemoConfig(), experiments=tuple(dict.fromkeys(args.experiment)))
    if args.rl_steps:
        cfg = replace(cfg, policy=replace(cfg.policy, steps=args.rl_steps))
    results = run_seeds(cfg, args.seeds)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        for name in plot_history(results["history"], args.plot):
            print(f"wrote {name}")
    return 0


def cell(stage, key, digits=3):
    """'0.512' for one seed, '0.512 ± 0.031' over several."""
    sd = stage.get(f"{key}_sd")
    return f"{stage[key]:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def format_table(results):
    seeds = results["seeds"]
    rows = [f"{'stage':<20} | {'labeller success':>17} | {'mean RM score':>17} | {'KL to reference':>17}"
            + (f" | {'pushed down':>11}" if "experiments" in results else ""), "-" * 80]
    stages = dict(results["stages"], **results.get("experiments", {}))
    for name, s in stages.items():
        pushed = s.get("correct_pushed_down")
        rows.append(f"{name:<20} | {cell(s, 'success'):>17} | {cell(s, 'reward'):>17} | {cell(s, 'kl'):>17}"
                    + (f" | {pushed:>11.3f}" if pushed is not None else ""))
    rm = results["reward_model"]
    rows.append(f"reward model held-out pairwise accuracy: {cell(rm, 'heldout_accuracy')} "
                f"({rm['heldout_pairs']:.0f} held-out pairs, {rm['train_pairs']:.0f} training pairs of which "
                f"{rm['validation_pairs']:.0f} pick the epoch, label noise "
                f"{results['config']['label_noise']:.0%}; against true preferences: {cell(rm, 'heldout_accuracy_true')})")
    labels = results["labels"]
    rows.append(f"labels: RLHF used {labels['rlhf']['labeller']:.0f} labeller comparisons and "
                f"{labels['rlhf']['reward_model']:.0f} reward-model scores "
                f"({labels['rlhf']['reward_model'] / labels['rlhf']['labeller']:.1f}× as many); DPO used the same "
                f"{labels['dpo']['labeller']:.0f} comparisons and no reward model; "
                f"{labels['heldout_pairs']['labeller']:.0f} more comparisons only measure the reward model")
    if "judge_rlhf" in labels:
        j = results["experiments"]["judge"]
        rows.append(f"judge: {labels['judge_rlhf']['judge']:.0f} judge calls and 0 labeller comparisons relabelled the "
                    f"RLHF pairs (agreement with the noiseless labeller {cell(j, 'judge_agreement')}); its reward model's "
                    f"held-out accuracy {cell(j, 'rm_heldout_accuracy')} (true preferences "
                    f"{cell(j, 'rm_heldout_accuracy_true')}); its RLHF used {labels['judge_rlhf']['reward_model']:.0f} "
                    f"reward-model scores")
    if len(seeds) > 1:
        rows.append(f"{'seed':>4} | {'RM acc':>6} | {'base':>5} | {'rlhf':>5} | {'dpo':>5} | "
                    f"{'rlhf−base':>9} | {'dpo−base':>8} | {'seconds':>7}")
        for seed, r in seeds.items():
            b, rl, d = (r["stages"][k]["success"] for k in ("base", "rlhf", "dpo"))
            rows.append(f"{seed:>4} | {r['reward_model']['heldout_accuracy']:>6.3f} | {b:>5.3f} | {rl:>5.3f} | "
                        f"{d:>5.3f} | {rl - b:>+9.3f} | {d - b:>+8.3f} | {r['seconds']:>7.0f}")
    rows.append(f"success = exact answers on held-out instructions, sampled at temperature 1; KL = mean Σ_t "
                f"log π/π_ref per response (nats); pushed down = share of labeller-correct RL samples with "
                f"advantage r − b < 0; seeds {','.join(map(str, seeds))}; {results['seconds']:.0f} s")
    if "examples" in results["stages"]["base"]:
        for name, s in stages.items():
            rows.append(f"{name} samples: " + "; ".join(s["examples"][:4]))
    return "\n".join(rows)


def plot_history(history, directory):
    """One PNG per quantity (reward, KL, success), one line per RL run, smoothed over 10 steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    os.makedirs(directory, exist_ok=True)
    written = []
    for key, label in PLOTS:
        fig, ax = plt.subplots(figsize=(6, 4))
        for run_name, steps in history.items():
            values = np.array([h[key] for h in steps])
            width = min(10, len(values))
            ax.plot(np.convolve(values, np.ones(width) / width, mode="valid"), label=run_name)
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(directory, f"rl_{key}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
