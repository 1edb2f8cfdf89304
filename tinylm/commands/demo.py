"""`tinylm demo`: the whole RLHF pipeline from scratch on the built-in instruction world —
pretrain a base LM, label pairs, train a reward model, RLHF (REINFORCE + KL leash) and DPO — and
a table of what each stage achieves on held-out instructions."""
import json
import os

PLOTS = (("reward", "reward-model score (proxy)"), ("kl", "KL(policy ‖ reference), nats"),
         ("success", "labeller success (truth)"))


def add_parser(sub):
    p = sub.add_parser("demo", help="run pretraining -> reward model -> RLHF and DPO from scratch; print the gains",
                       description=__doc__)
    p.add_argument("--quick", action="store_true", help="a reduced run (about 1-2 minutes on 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ablations", action="store_true", help="skip the long beta = 0 / RM-retraining runs")
    p.add_argument("--json", metavar="PATH", help="write every number as JSON to PATH")
    p.add_argument("--plot", metavar="DIR", help="write reward, KL and success over RL steps as PNGs to DIR")
    p.set_defaults(func=run)


def run(args):
    from dataclasses import replace

    from tinylm.pipeline import QUICK, DemoConfig, run_demo

    outputs = [args.json] + ([os.path.join(args.plot, f"rl_{key}.png") for key, _ in PLOTS] if args.plot else [])
    for path in filter(None, outputs):
        if os.path.exists(path):
            raise ValueError(f"{path!r} already exists: choose a new path (the demo never overwrites files)")
    cfg = replace(QUICK if args.quick else DemoConfig(), seed=args.seed)
    if args.no_ablations:
        cfg = replace(cfg, ablations=False)
    results = run_demo(cfg)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        for name in plot_history(results["history"], args.plot):
            print(f"wrote {name}")
    return 0


def format_table(results):
    rows = [f"{'stage':<20} | {'labeller success':>16} | {'mean RM score':>13} | {'KL to reference':>15}",
            "-" * 75]
    stages = dict(results["stages"], **results.get("ablations", {}))
    for name, s in stages.items():
        rows.append(f"{name:<20} | {s['success']:>16.3f} | {s['reward']:>13.3f} | {s['kl']:>15.3f}")
    rm = results["reward_model"]
    rows.append(f"reward model held-out pairwise accuracy: {rm['heldout_accuracy']:.3f} "
                f"({rm['heldout_pairs']} held-out pairs, {rm['train_pairs']} training pairs, label noise "
                f"{results['config']['label_noise']:.0%}; against true preferences: {rm['heldout_accuracy_true']:.3f})")
    rows.append(f"success = exact answers on held-out instructions, sampled at temperature 1; "
                f"KL = mean Σ_t log π/π_ref per response (nats); {results['seconds']:.0f} s")
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
