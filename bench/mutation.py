"""Mutation testing, one module at a time, each against its own tests (mutmut 3; not in CI).

    pip install -e '.[test,mutation]'
    python bench/mutation.py                    # the modules of [tool.mutmut] only_mutate
    python bench/mutation.py core.layers core.model     # some of them
    python bench/mutation.py --resume core.layers       # carry on an interrupted run

Each module gets its own copy of the checkout (WORKDIR/<module>/) whose pyproject mutates only
tinylm/<module>.py (a dotted name: core.layers is tinylm/core/layers.py) and selects only the test files in TESTS[module]. A mutant then costs the first
failing test of a few files, and a survivor re-runs those files, not the whole suite (that is what
made one run of all ten modules take hours). The price: a mutant caught only by some other module's
tests counts as a survivor here. Prints one line per module and each survivor's name; inspect one
with `cd WORKDIR/<module> && mutmut show NAME`. Hypothesis runs CI's profile ("ci": 12 fixed
examples; a 5-example profile let mutants through that CI's examples catch) and NumPy one BLAS thread."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter

try:
    from tomllib import loads as toml_loads
except ModuleNotFoundError:  # Python 3.10: mutmut itself depends on `toml` there
    try:
        from toml import loads as toml_loads
    except ModuleNotFoundError:
        toml_loads = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY = ("tinylm", "tests", "kernels", "bench", "pyproject.toml")

# The test files about each module: its unit tests, and those that check it end to end (the model's
# gradient checks see every layer; the Hugging Face fixture sees layernorm's eps and GELU's constants).
TESTS = {
    "core.layers": ["test_layers.py", "test_hf.py", "test_model.py"],
    "core.model": ["test_model.py", "test_hf.py", "test_mixers.py", "test_checkpoint.py", "test_optim_counting.py",
                        "test_faults.py", "test_flash_attention.py", "test_generate.py", "test_ssm.py"],
    # train_step (the one guarded step every loop takes) lives in optim.py too
    "core.optim": ["test_optim_defaults.py", "test_optim_counting.py", "test_train_units.py", "test_data_train.py",
                   "test_rlhf_units.py", "test_train_loop.py", "test_faults.py"],
    "core.flash_attention": ["test_flash_attention.py"],
    "core.ssm": ["test_ssm.py", "test_mixers.py", "test_generate.py"],
    "rlhf.reward": ["test_reward_model.py", "test_reward_read.py", "test_rlhf_units.py", "test_rlhf.py"],
    "rlhf.policy": ["test_rlhf_units.py", "test_rlhf_baseline.py", "test_rlhf_learning.py", "test_rlhf.py"],
    "train.loop": ["test_train_units.py", "test_train_loop.py", "test_pretrain.py", "test_data_train.py",
                   "test_faults.py", "test_cli_pretrain.py", "test_checkpoint.py"],
    "train.train_config": ["test_train_units.py", "test_data_train.py", "test_train_loop.py",
                           "test_cli_pretrain.py", "test_pretrain.py"],
    "train.run_log": ["test_train_units.py", "test_train_loop.py", "test_faults.py"],
    "train.metrics": ["test_train_loop.py", "test_scaling.py"],
    "core.generate": ["test_generate.py"],
    "core.tokenizer": ["test_tokenizer.py"],
}


def toml_list(values):
    """A TOML array of strings (JSON's string escapes are TOML's basic-string escapes)."""
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def pyproject():
    """pyproject.toml's text and its [tool.mutmut] table."""
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    return text, toml_loads(text)["tool"]["mutmut"]


def module_path(module):
    """'core.layers' -> 'tinylm/core/layers.py'."""
    return "tinylm/" + module.replace(".", "/") + ".py"


def prepare(module, work, resume):
    """Copy the checkout to `work` with a pyproject that mutates only `module` against its tests."""
    if not resume and os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    for part in COPY:
        src, dst = os.path.join(ROOT, part), os.path.join(work, part)
        if os.path.isdir(src):
            shutil.copytree(src, dst, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", ".hypothesis", "gpu_results"))
        else:
            shutil.copy(src, dst)
    text, base = pyproject()
    head = text[:text.index("[tool.mutmut]")]
    cfg = {**base, "only_mutate": [module_path(module)],
           "pytest_add_cli_args_test_selection": [f"tests/{t}" for t in TESTS[module]]}
    body = "".join(f"{k} = {toml_list(v) if isinstance(v, list) else json.dumps(v)}\n" for k, v in cfg.items())
    open(os.path.join(work, "pyproject.toml"), "w").write(head + "[tool.mutmut]\n" + body)


def results(work):
    """{mutant name: status} from `mutmut results --all true`."""
    out = subprocess.run(["mutmut", "results", "--all", "true"], cwd=work, capture_output=True, text=True).stdout
    return dict(line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)


def parse_args(argv=None):
    """The command line; no module named means every module of [tool.mutmut] only_mutate."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [m[len("tinylm/"):-len(".py")].replace("/", ".") for m in pyproject()[1]["only_mutate"]]
    # checked by hand: argparse tests an empty or default list as one value against `choices`
    ap.add_argument("modules", nargs="*", metavar="MODULE", help="any of: " + ", ".join(names))
    ap.add_argument("--workdir", default=os.path.join(ROOT, "mutation"), help="where the copies go")
    ap.add_argument("--resume", action="store_true", help="keep a module's earlier results; run only the rest")
    ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="mutants run at once")
    args = ap.parse_args(argv)
    unknown = [m for m in args.modules if m not in names]
    if unknown:
        ap.error(f"unknown module {unknown[0]!r} (choose from {', '.join(names)})")
    args.modules = args.modules or names
    return args


def main():
    if toml_loads is None or shutil.which("mutmut") is None:
        sys.exit("mutmut is not installed: pip install -e '.[test,mutation]'")
    args = parse_args()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "HYPOTHESIS_PROFILE": "ci"}
    print("module           mutants  killed  survived  timeout  no tests  minutes", flush=True)
    for module in args.modules:
        work = os.path.join(args.workdir, module)
        prepare(module, work, args.resume)
        t0 = time.time()
        run = subprocess.run(["mutmut", "run", "--max-children", str(args.jobs)], cwd=work, env=env,
                             capture_output=True, text=True)
        status = results(work)
        n = Counter(status.values())
        print(f"{module:16} {len(status):7} {n['killed']:7} {n['survived']:9} {n['timeout']:8} "
              f"{n['no tests']:9} {(time.time() - t0) / 60:8.1f}", flush=True)
        if run.returncode:
            print(f"  mutmut run failed (exit {run.returncode}):\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
        left = [k for k, v in status.items() if v not in ("killed", "timeout")]
        for name in left:
            print(f"  {status[name]:12} {name}")


if __name__ == "__main__":
    main()
