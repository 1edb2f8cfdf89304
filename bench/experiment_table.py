"""Merge `tinylm rlhf EXPERIMENT --seeds S --json FILE` results run in separate commands (seeds are
independent and deterministic, so they can run side by side, even on other machines) and print the
table over all seeds. On one machine `--jobs N` does this within one command.

    python bench/experiment_table.py compare runs/compare_*.json [--plot compare.png]
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tinylm.experiments.rlhf_curves import EXPERIMENTS  # noqa: E402


def main(argv):
    name, paths = argv[0], [a for a in argv[1:] if a.endswith(".json")]
    plot = argv[argv.index("--plot") + 1] if "--plot" in argv else None
    runs = [json.load(open(p)) for p in paths]
    per_seed = {s: r for run in runs for s, r in sorted(run["seeds"].items())}
    config = {k: v for k, v in runs[0]["config"].items() if k != "seeds"}
    results = EXPERIMENTS[name].summarise(dict(sorted(per_seed.items(), key=lambda kv: int(kv[0]))), config)
    print(EXPERIMENTS[name].table(results))
    if plot:
        EXPERIMENTS[name].plot(results, plot)
        print(f"wrote {plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
