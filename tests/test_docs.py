"""The tour in docs/ cannot go stale: every code reference points at the function it names, every
test it cites exists, and every command it shows runs and prints what the page shows.

Conventions the pages follow (docs/index.md says them too):
- a reference is a Markdown link whose text ends in the symbol and whose target is `file#Lnn`:
  [`GPT.loss_and_grads`](../tinylm/core/model.py#L351) — line nn must define that symbol (`def`/`class`);
- a command block is a ```console fence: lines starting with `$ ` are commands, the other lines are
  output. The pages are run in order in one temporary directory (a later page may use what an earlier
  one made, as a reader following the tour would), `tinylm` meaning this checkout's `python -m tinylm`
  and `python bench/x.py` this checkout's bench script. Each
  shown output line must appear in the real output, in order, with every number (and the width of
  every run of spaces) free to differ
  (results move with BLAS threads and machines; the *shape* of the output may not), unless the line
  ends with `  # exact`. A line `...` stands for any number of lines.

    python tests/test_docs.py --fix      # rewrite every #Lnn to where its symbol is defined now
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
LINK = re.compile(r"\[`?([\w.]+)`?(?:\(\))?\]\((\.\./[\w/.-]+\.py)#L(\d+)\)")
FENCE = re.compile(r"```console\n(.*?)```", re.S)
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")


def references(text):
    """(symbol, path relative to docs/, line) for every code link on a page."""
    return [(m.group(1), m.group(2), int(m.group(3))) for m in LINK.finditer(text)]


def defines(line, symbol):
    name = symbol.split(".")[-1]
    return re.match(rf"\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b", line) is not None


def where_defined(path, symbol):
    """1-based line numbers defining symbol's last component (a method: inside its class, if given)."""
    lines = path.read_text().splitlines()
    parts = symbol.split(".")
    hits = [i + 1 for i, line in enumerate(lines) if defines(line, parts[-1])]
    if len(parts) > 1 and len(hits) > 1:     # Class.method: keep the one after `class Class`
        starts = [i + 1 for i, line in enumerate(lines) if defines(line, parts[-2])]
        hits = [h for h in hits if starts and any(s < h for s in starts)] or hits
    return hits


def command_blocks(text):
    """[(command, [shown output lines])] for every console fence."""
    blocks = []
    for fence in FENCE.findall(text):
        for chunk in re.split(r"^(?=\$ )", fence, flags=re.M):
            if chunk.startswith("$ "):
                command, *output = chunk.rstrip("\n").split("\n")
                blocks.append((command[2:], output))
    return blocks


def pattern(shown):
    """A regex for one shown output line: numbers free unless the line is marked exact."""
    if shown.endswith("  # exact"):
        return re.compile(re.escape(shown[: -len("  # exact")].rstrip()))
    parts = NUMBER.split(shown)
    numbers = len(parts) - 1
    # a run of spaces matches any run (numbers padded to a width, e.g. f"{x:8.1f}", change it)
    body = "".join(re.sub(r"(?:\\ )+", " +", re.escape(p)) + (NUMBER.pattern if i < numbers else "")
                   for i, p in enumerate(parts))
    return re.compile(body)


def matches_in_order(shown_lines, output_lines):
    """The first shown line that has no match after the previous one's match, or None."""
    at = 0
    for shown in shown_lines:
        if shown.strip() in ("", "..."):
            continue
        want = pattern(shown.rstrip())
        while at < len(output_lines) and not want.search(output_lines[at]):
            at += 1
        if at == len(output_lines):
            return shown
        at += 1
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_code_reference_points_at_the_symbol_it_names(page):
    refs = references(page.read_text())
    for symbol, target, line in refs:
        path = (DOCS / target).resolve()
        assert path.exists(), f"{page.name}: {target} does not exist"
        lines = path.read_text().splitlines()
        assert 1 <= line <= len(lines) and defines(lines[line - 1], symbol), \
            f"{page.name}: {target}#L{line} does not define {symbol} (now at {where_defined(path, symbol)}); " \
            "run `python tests/test_docs.py --fix`"


def test_the_tour_has_pages_and_the_index_links_each_one():
    index = (DOCS / "index.md").read_text()
    tour = [p for p in PAGES if p.name != "index.md"]
    assert len(tour) >= 8
    for page in tour:
        assert f"({page.name})" in index, f"docs/index.md does not link {page.name}"


def test_reference_checker_catches_a_moved_function(tmp_path):
    """The checker must fail when a reference points one line off."""
    source = tmp_path / "m.py"
    source.write_text("x = 1\ndef f():\n    pass\n")
    assert defines(source.read_text().splitlines()[1], "f")
    assert not defines(source.read_text().splitlines()[0], "f")
    assert where_defined(source, "mod.f") == [2]


def test_output_matcher_frees_numbers_but_not_words():
    shown = ["step 10: loss 2.3456 (perplexity 10.44)", "...", "done"]
    assert matches_in_order(shown, ["noise", "step 20: loss 1.9 (perplexity 6.7)", "x", "done"]) is None
    assert matches_in_order(shown, ["step 20: lost 1.9 (perplexity 6.7)", "done"]) == shown[0]
    assert matches_in_order(["a 1  # exact"], ["a 2"]) == "a 1  # exact"


COMMANDS = [(page, command, output) for page in PAGES for command, output in command_blocks(page.read_text())]


@pytest.fixture(scope="module")
def tour_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tour")


@pytest.mark.parametrize("page,command,shown", COMMANDS,
                         ids=[f"{p.name}:{c[:40]}" for p, c, _ in COMMANDS] or None)
def test_every_documented_command_prints_what_the_page_shows(page, command, shown, tour_dir):
    argv = shlex.split(command)
    assert argv[0] in ("tinylm", "python"), f"{page.name}: unexpected command {command!r}"
    if argv[0] == "tinylm":
        argv = [sys.executable, "-m", "tinylm", *argv[1:]]
    else:                                # a bench script of this checkout, run from the tour directory
        argv = [sys.executable, *(str(ROOT / a) if a.startswith("bench/") else a for a in argv[1:])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(argv, cwd=tour_dir, env=env, capture_output=True, text=True, timeout=1200)
    output = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, f"{page.name}: `{command}` exited {done.returncode}:\n" + "\n".join(output[-20:])
    missing = matches_in_order(shown, output)
    assert missing is None, f"{page.name}: `{command}` no longer prints {missing!r}; it printed:\n" + "\n".join(output)


def fix():
    for page in PAGES:
        text = page.read_text()

        def moved(m):
            symbol, target, line = m.group(1), m.group(2), int(m.group(3))
            path = (DOCS / target).resolve()
            hits = where_defined(path, symbol) if path.exists() else []
            best = min(hits, key=lambda h: abs(h - line)) if hits else line
            return m.group(0).replace(f"#L{line})", f"#L{best})")
        page.write_text(LINK.sub(moved, text))


if __name__ == "__main__":
    if sys.argv[1:] == ["--fix"]:
        fix()
    else:
        sys.exit(__doc__)
