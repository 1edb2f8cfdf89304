"""Re-check mutmut survivors against tests written after the run, without a new mutmut run.

    python bench/recheck_mutants.py --tests tests/test_generate.py -- NAME [NAME ...]

Run from the directory of a finished `mutmut run` (it asks `mutmut show NAME` for each diff). Each
mutant's diff is applied to a copy of this checkout and the tests are run there; one line per
mutant: killed, SURVIVED, GONE (its code no longer exists here), or ERROR (pytest ran no test or
failed to start: nothing was proven). mutmut's hunks are numbered
from the function and show methods dedented, so the old lines are found by their stripped text and
the new ones re-indented to match."""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def apply(diff_text, root):
    """Apply one `mutmut show` diff under root; False if its old lines are not found exactly once."""
    diff = diff_text[diff_text.index("--- "):].splitlines()
    path = os.path.join(root, diff[0][4:].strip())
    body = [l for l in diff[2:] if l[:1] in " -+"]
    old_side = [l for l in body if l[:1] in " -"]                # context and removed lines, in order
    old = [l[1:] for l in old_side]
    lines = open(path).read().split("\n")
    hits = [i for i in range(len(lines) - len(old) + 1)
            if all(lines[i + j].strip() == o.strip() for j, o in enumerate(old))]
    if len(hits) != 1:
        return False
    i = hits[0]
    # The indentation shift from the first removed line: it is code, while a context line may sit
    # inside a docstring, whose text mutmut leaves at the method's original indentation.
    first = next(k for k, l in enumerate(old_side) if l[0] == "-" and l[1:].strip())
    indent = lambda s: len(s) - len(s.lstrip())
    delta = indent(lines[i + first]) - indent(old[first])
    out, k = [], i
    for l in body:
        if l[0] == "+":
            out.append(" " * delta + l[1:] if l[1:].strip() else "")
        else:
            if l[0] == " ":
                out.append(lines[k])
            k += 1
    lines[i:i + len(old)] = out
    open(path, "w").write("\n".join(lines))
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tests", required=True, help="pytest arguments, quoted as one string")
    ap.add_argument("names", nargs="+", help="mutant names, as `mutmut results` lists them")
    args = ap.parse_args()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "HYPOTHESIS_PROFILE": "ci"}
    with tempfile.TemporaryDirectory() as work:
        for part in ("tinylm", "tests", "kernels", "bench", "pyproject.toml"):
            src, dst = os.path.join(ROOT, part), os.path.join(work, part)
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
        for name in args.names:
            diff = subprocess.run(["mutmut", "show", name], capture_output=True, text=True).stdout
            rel = diff[diff.index("--- ") + 4:].split("\n")[0].strip()
            shutil.copy(os.path.join(ROOT, rel), os.path.join(work, rel))
            if not apply(diff, work):
                print("GONE", name)
                continue
            code = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   *args.tests.split()], cwd=work, env=env, capture_output=True).returncode
            # pytest: 1 = a test failed; anything else (no tests collected, usage error) proves nothing
            print({0: "SURVIVED", 1: "killed"}.get(code, f"ERROR (pytest exit {code})"), name, flush=True)
            shutil.copy(os.path.join(ROOT, rel), os.path.join(work, rel))


if __name__ == "__main__":
    main()
