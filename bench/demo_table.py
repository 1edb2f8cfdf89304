"""Tables for bench/RESULTS.md and README from stored `tinylm demo --seeds S --json FILE` results, one
file per seed (each seed is independent and deterministic, so seeds can run side by side).

    python bench/demo_table.py runs/s*.json

Prints the per-seed rows, the mean ± sample sd of every stage, and the experiments' runs."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tinylm.commands.demo import cell  # noqa: E402
from tinylm.rlhf.pipeline import mean_and_sd  # noqa: E402


def mean_sd(values):
    """'mean ± sample sd' as `tinylm demo --seeds` prints it (the mean alone for one value)."""
    return cell(mean_and_sd({i: {"v": v} for i, v in enumerate(values)}), "v")


def main(paths):
    runs = {}
    for path in paths:
        for seed, r in json.load(open(path))["seeds"].items():
            runs[int(seed)] = r
    seeds = sorted(runs)
    print(f"seeds {', '.join(map(str, seeds))}\n")
    print("| seed | RM acc | base | RLHF | DPO | RLHF − base | DPO − base | RLHF KL | DPO KL | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in seeds:
        st, rm = runs[s]["stages"], runs[s]["reward_model"]
        b, r, d = (st[k]["success"] for k in ("base", "rlhf", "dpo"))
        print(f"| {s} | {rm['heldout_accuracy']:.3f} | {b:.3f} | {r:.3f} | {d:.3f} | {r - b:+.3f} | {d - b:+.3f} "
              f"| {st['rlhf']['kl']:.2f} | {st['dpo']['kl']:.2f} | {runs[s]['seconds']:.0f} |")
    print("\n| stage | labeller success | mean RM score | KL (nats/response) |\n|---|---|---|---|")
    for stage in ("base", "rlhf", "dpo"):
        print(f"| {stage} | " + " | ".join(mean_sd([runs[s]["stages"][stage][k] for s in seeds])
                                         for k in ("success", "reward", "kl")) + " |")
    gain = {k: [runs[s]["stages"][k]["success"] - runs[s]["stages"]["base"]["success"] for s in seeds]
            for k in ("rlhf", "dpo")}
    acc = [runs[s]["reward_model"]["heldout_accuracy"] for s in seeds]
    true = [runs[s]["reward_model"]["heldout_accuracy_true"] for s in seeds]
    print(f"\nRM held-out accuracy {mean_sd(acc)} (min {min(acc):.3f}); against true preferences {mean_sd(true)}")
    for k in gain:
        print(f"{k.upper()} − base {mean_sd(gain[k])} (min {min(gain[k]):+.3f})")
    names = sorted({n for s in seeds for n in runs[s].get("experiments", {}) if n != "judge"})
    if names:
        print("\n| run | seeds | success | mean RM score | KL | pushed down |\n|---|---|---|---|---|---|")
    for name in names:
        have = [s for s in seeds if name in runs[s].get("experiments", {})]
        e = [runs[s]["experiments"][name] for s in have]
        print(f"| {name} | {','.join(map(str, have))} | " + " | ".join(   # SFT and DPO rows push nothing down
            mean_sd([x[k] for x in e]) if all(x.get(k) is not None for x in e) else "—"
            for k in ("success", "reward", "kl", "correct_pushed_down")) + " |")
        per_seed = " / ".join(f"{x['success']:.3f}" for x in e)
        print(f"|   per seed success | | {per_seed} | | | |")


if __name__ == "__main__":
    main(sys.argv[1:])
