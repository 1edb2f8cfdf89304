"""Sequence-length scaling of the three token mixers at the sizes bench/RESULTS.md records: the
`tinylm attention-cost` command (tinylm/experiments/attention_cost.py) with larger defaults.

    python bench/seq_scaling.py [any `tinylm attention-cost` flag, e.g. --t-max 8192]

Defaults here: T = 256 … 16384, slopes over T >= 1024, a mixer stops when its next doubling would
pass 60 s or 4 GiB.
"""
import os
import sys

# One BLAS thread unless told otherwise: this measures how cost grows with T, and on a shared
# 2-core machine a second BLAS thread that waits for a busy core makes small matmuls 10x slower
# at random (measured: naive attention at T=256 took 18-31 ms with one thread, 77-1033 ms with two).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tinylm.cli import main  # noqa: E402

BENCH_DEFAULTS = ["--t-min", "256", "--t-max", "16384", "--fit-from-t", "1024", "--max-seconds", "60", "--max-gb", "4"]

if __name__ == "__main__":
    sys.exit(main(["attention-cost", *BENCH_DEFAULTS, *sys.argv[1:]]))
