"""The `tinylm` command. Each sub-command lives in its own module with `add_parser(subparsers)`,
which registers it and sets `func(args) -> exit code`."""
import argparse
import importlib
import sys

from .core.backend import keep_freed_memory
from .commands.terminal import os_error_sentence

COMMANDS = ["tinylm.commands.check", "tinylm.commands.pretrain", "tinylm.commands.sample",
            "tinylm.commands.info", "tinylm.commands.eval", "tinylm.commands.export_hf", "tinylm.commands.rlhf",
            "tinylm.commands.demo", "tinylm.commands.scaling", "tinylm.commands.attention_cost"]


def build_parser():
    parser = argparse.ArgumentParser(prog="tinylm", description="A GPT-2 in NumPy with hand-written gradients.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("tinylm: interrupted", file=sys.stderr)
        return 130
    except ValueError as e:                 # bad input: one readable line, no traceback
        print(f"tinylm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                    # unreadable, unwritable or full disk: the path and why
        print(f"tinylm {args.command}: error: {os_error_sentence(e)}", file=sys.stderr)
        return 2
