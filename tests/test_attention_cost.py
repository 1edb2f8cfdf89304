"""`tinylm attention-cost` (tinylm/experiments/attention_cost.py): the slopes are the exponent of a power law,
the command prints a time and a memory row per T and a slope line per mixer, bad input is one line."""
import math

import pytest

from tinylm.experiments.attention_cost import MIXERS, slopes
from tinylm.cli import main


def test_slopes_recover_the_exponents_of_a_power_law():
    rows = [(T, 3e-9 * T**2, 1000 * T) for T in (64, 128, 256, 512, 1024)]
    time_slope, memory_slope, (lo, hi) = slopes(rows, fit_from_t=256)
    assert time_slope == pytest.approx(2.0) and memory_slope == pytest.approx(1.0) and (lo, hi) == (256, 1024)
    # Only T >= fit_from_t count: a different small-T cost doesn't move the fit (a planted "fit over
    # every row" would give 2.0 + a visible change here).
    rows[0] = (64, 1.0, 1.0)
    assert slopes(rows, fit_from_t=256)[0] == pytest.approx(2.0)
    assert slopes(rows, fit_from_t=64)[0] < 1.5
    assert slopes(rows[:1], fit_from_t=256) is None


def test_command_prints_time_memory_and_slopes_for_every_mixer(capsys):
    Ts = (8, 16, 32)
    assert main(["attention-cost", "--d-model", "16", "--n-head", "2", "--t-min", "8", "--t-max", "32",
                 "--fit-from-t", "8"]) == 0
    out = capsys.readouterr().out
    time_header, memory_header = out.index("naive attention ms"), out.index("naive attention MiB")

    def table(text):
        return [line.split() for line in text.splitlines()[1:] if line.split() and line.split()[0].isdigit()]
    time_rows, memory_rows = table(out[time_header:memory_header]), table(out[memory_header:].split("log-log")[0])
    assert [int(r[0]) for r in time_rows] == list(Ts) and [int(r[0]) for r in memory_rows] == list(Ts)
    assert all(len(r) == 1 + len(MIXERS) + 2 for r in time_rows)          # T, 3 times, 2 ratios
    assert all(len(r) == 1 + len(MIXERS) and all(float(v) >= 0 for v in r[1:]) for r in memory_rows)
    slope_lines = out.split("log-log slopes")[1].splitlines()[1:]
    for name, line in zip(MIXERS, slope_lines):
        assert line.strip().startswith(name) and "(T = 8..32)" in line
        values = line.split("time")[1].split("peak memory")
        assert all(math.isfinite(float(v.split()[0])) for v in values)


@pytest.mark.parametrize("args, message", [
    (["--t-min", "64", "--t-max", "32"], "--t-max (32) must be >= --t-min (64)"),
    (["--d-model", "16", "--n-head", "3"], "d_model=16 must be divisible by n_head=3"),
])
def test_bad_input_is_one_line(capsys, args, message):
    assert main(["attention-cost", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_numbers_fail_at_parse_time(capsys):
    with pytest.raises(SystemExit) as e:
        main(["attention-cost", "--t-max", "0"])
    assert e.value.code == 2 and "argument --t-max: must be > 0" in capsys.readouterr().err
