"""How every command talks to a person: results on stdout, headers and diagnostics on stderr,
and a progress bar only when stderr is a terminal (in a log file it would be thousands of lines)."""
import sys


def progress_wanted(quiet=False):
    """Whether to draw a progress bar: not with --quiet, and not when stderr is a file or a pipe."""
    return not quiet and sys.stderr.isatty()


def note(command, text):
    """A diagnostic line (a header, a warning) on stderr, so stdout carries only results."""
    print(f"tinylm {command}: {text}", file=sys.stderr)


def os_error_sentence(e):
    """An OSError as a sentence naming the path, without Python's "[Errno N]" prefix."""
    reason = (e.strerror or str(e)).lower()
    if e.filename is None:
        return reason
    both = f"{e.filename!r} -> {e.filename2!r}" if e.filename2 else repr(e.filename)
    return f"{both}: {reason}"
