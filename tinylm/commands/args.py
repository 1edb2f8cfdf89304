"""argparse types that range-check a number while the command line is parsed, before any work
starts: a bad value is one line naming the flag (argparse's own `error: argument --lr: ...`, exit 2).

    p.add_argument("--lr", type=positive(float), default=3e-4, help="peak learning rate")
    p.add_argument("--warmup", type=at_least(0), ...)        # an int >= 0
    p.add_argument("--noise", type=fraction, ...)            # a float in [0, 1]
    p.add_argument("--top-p", type=probability, ...)         # a float in (0, 1]
    p.add_argument("--dropout", type=rate, ...)              # a float in [0, 1)
"""
import argparse
import math


def _parse(kind, text):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive(kind=int):
    """A type for values > 0 (int or float)."""
    def parse(text):
        value = _parse(kind, text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def at_least(minimum, kind=int):
    """A type for values >= minimum."""
    def parse(text):
        value = _parse(kind, text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value
    parse.__name__ = f"{kind.__name__} >= {minimum}"
    return parse


def unit_interval(brackets):
    """A type for floats in the part of [0, 1] that brackets names: "[]", "(]" or "[)"."""
    def parse(text):
        value = _parse(float, text)
        low_ok = value >= 0 if brackets[0] == "[" else value > 0
        high_ok = value <= 1 if brackets[1] == "]" else value < 1
        if not (low_ok and high_ok):
            raise argparse.ArgumentTypeError(f"must be in {brackets[0]}0, 1{brackets[1]}, got {text}")
        return value
    parse.__name__ = f"float in {brackets[0]}0, 1{brackets[1]}"
    return parse


fraction = unit_interval("[]")        # a share of the data, a noise level
probability = unit_interval("(]")     # top-p: 0 would keep nothing
rate = unit_interval("[)")            # dropout: 1 would drop everything


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help, except where there is no default to show (None,
    False switches) or the flag is required."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def add_layer_set_arguments(p, switch_note=""):
    """--device, --no-kernels and --reference: which layer set a command's model runs on."""
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu (NumPy) or cuda (CuPy, every layer on the Numba kernels) (default: cpu)")
    p.add_argument("--no-kernels", dest="kernels", action="store_false", default=None,
                   help="with --device cuda: run every layer on CuPy/cuBLAS instead of the Numba kernels (the baseline)")
    p.add_argument("--reference", action="store_true",
                   help="on the CPU, run layers.py's NumPy layers instead of the fused ones of cpu_layers.py "
                        f"(same checkpoints{switch_note})")


def placement(args):
    """The model.Placement that add_layer_set_arguments' flags chose."""
    from tinylm.core.model import Placement
    return Placement(args.device, args.kernels, args.reference)
