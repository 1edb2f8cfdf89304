"""Every flag of every `tinylm` command has help text, and the help names its default wherever
there is one (argparse's "(default: X)", or the flag's own "(default: ...)")."""
import argparse

from tinylm.cli import build_parser


def flags():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, p in sub.choices.items():
        formatter = p._get_formatter()
        for action in p._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                yield command, action, formatter._expand_help(action) if action.help else ""


def test_every_flag_has_help_naming_its_default():
    seen = 0
    for command, action, text in flags():
        seen += 1
        assert text.strip(), (command, action.option_strings)
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in text, (command, action.option_strings, text)
    assert seen > 50


def test_the_check_sees_a_flag_without_its_default():
    parser = argparse.ArgumentParser()
    action = parser.add_argument("--x", type=float, default=0.5, help="a number")
    assert "default" not in parser._get_formatter()._expand_help(action)
