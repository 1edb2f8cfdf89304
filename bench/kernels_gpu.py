"""bench/gpu_check.sh's driver: runs bench/gpu_sections.py's sections, one subprocess each with its own
deadline, in the order that spends a lent GPU best, and writes under --out:

    results.json   the environment, every row of every section, each section's status, the exit code
    summary.txt    the same for a person: ratios side by side, the issue's targets met or not
    sections.log   each section's own output (progress lines, tracebacks, pytest's report)

Order: env → baselines (cuBLAS, unfused CuPy, torch SDPA) → matmul → ladder → train → flash → tests → long
(T = 16384). A section gets the smaller of its share of the budget and what is left after the floors
reserved for the sections after it; `long` takes whatever remains. If env finds that Numba cannot
compile, the Numba sections are skipped and the rest still run. results.json and summary.txt are
rewritten after every section, so a run cut short still leaves them. Exit 1 if a section failed,
timed out or found a WRONG result (or the carried wheels failed to install).

    python3 bench/kernels_gpu.py [--out DIR] [--budget SECONDS] [--smoke]

Standard library only: this process must survive whatever is broken in numpy, numba, cupy or torch.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
from gpu_summary import read_rows, summary  # noqa: E402
SECTIONS_SCRIPT = os.path.join(BENCH, "gpu_sections.py")
# (name, share of the budget, floor kept for it while earlier sections run, needs Numba)
# Shares from the first H200 run (2026-11-28, budget 240 s): env took 11 s, baselines 14 s, train 48 s,
# and the kernel tests ran out of their 30 s after 19 passed, so env and baselines give some to tests and
# flash (the shares still add up to more than 1: sections that use their whole limits leave nothing for
# the optional T = 16384).
# The ladder (issue 21) took 0.03 from each of flash and tests.
PLAN = [("env", 0.08, 0.04, False), ("baselines", 0.12, 0.04, False), ("matmul", 0.12, 0.04, True),
        ("ladder", 0.06, 0.02, True), ("train", 0.25, 0.06, False), ("flash", 0.18, 0.04, True),
        ("tests", 0.20, 0.03, True), ("long", 1.0, 0.0, False)]
FAILED = ("failed", "timed out", "WRONG")
MIN_SECTION_S = 3


def last_line(path):
    lines = [line.strip() for line in open(path, errors="replace") if line.strip()] if os.path.exists(path) else []
    return lines[-1][:300] if lines else "no output"


def section_environment(smoke):
    """What every section runs under, also when this script is called without gpu_check.sh."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1" if smoke else "0")   # Numba reads it once, at import
    env.pop("CUPY_TF32", None)                         # cuBLAS in true FP32: the fair baseline
    env.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")   # one stream: no host sync per CuPy argument
    return env


def describe(row):
    """A failing row in a few words: which measurement, its verdict and why."""
    where = " ".join(str(row[k]) for k in ("what", "case", "T", "method", "model", "kernels") if k in row)
    error = next((row[k] for k in ("rel_err", "fwd_rel_err", "fb_rel_err") if k in row), None)
    detail = row.get("reason") or (f"rel err {error} > tol {row.get('tol', row.get('fb_tol'))}" if error else "")
    return f"{where}: {row['verdict']}" + (f" ({detail})" if detail else "")


def run_section(name, limit_s, grace_s, args, numba_ok, rows_dir, log):
    """Run one section as a subprocess (its own process group, killed whole at the deadline)."""
    rows_path = os.path.join(rows_dir, f"{name}.jsonl")
    previous = [os.path.join(rows_dir, f"{n}.jsonl") for n, *_ in PLAN if n != name
                and os.path.exists(os.path.join(rows_dir, f"{n}.jsonl"))]
    start = time.time()
    command = [sys.executable, SECTIONS_SCRIPT, name, "--rows", rows_path,
               "--deadline", str(start + limit_s - grace_s), "--previous", *previous]
    command += ["--smoke"] if args.smoke else []
    command += [] if numba_ok else ["--no-numba"]
    section_log = os.path.join(rows_dir, f"{name}.log")
    with open(section_log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env=section_environment(args.smoke), start_new_session=True)
        try:
            rc = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:                                       # also when this driver is told to stop (SIGTERM)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)     # the section and anything it started (pytest)
                process.wait()
    seconds = time.time() - start
    log.write(f"\n===== {name} (limit {limit_s:.0f} s, took {seconds:.1f} s, exit {rc})\n"
              + open(section_log, errors="replace").read())
    log.flush()
    rows = read_rows(rows_path) if os.path.exists(rows_path) else []
    bad = [r for r in rows if r.get("verdict") in FAILED + ("error",)]
    if rc is None:
        status = "timed out"
        reason = "; ".join([f"killed at its {limit_s:.0f} s deadline"] + [describe(r) for r in bad[:3]])
    elif rc == 0:
        status, reason = "ok", ""
    else:
        status = "WRONG" if any(r.get("verdict") == "WRONG" for r in bad) else "failed"
        reason = "; ".join(describe(r) for r in bad[:3]) if bad else last_line(section_log)
    return {"name": name, "status": status, "reason": reason, "seconds": round(seconds, 1),
            "limit_s": round(limit_s), "rows": rows}


def numba_verdict(env_rows):
    """(ok, reason) from the env section's one-element kernel."""
    for row in env_rows:
        if row.get("what") == "numba smoke kernel":
            return row.get("verdict") == "ok", row.get("reason", row.get("verdict"))
    return False, "the env section did not get as far as the one-element kernel"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(BENCH, "gpu_results"))
    ap.add_argument("--budget", type=float, default=400, help="seconds for all sections together")
    ap.add_argument("--smoke", action="store_true", help="CPU, CUDA simulator, NumPy for CuPy, tiny sizes")
    ap.add_argument("--sections", help="comma-separated sections to run (env always runs; the budget is shared "
                                       "among them in their usual proportions), e.g. baselines,flash,long")
    args = ap.parse_args(argv)
    plan = PLAN
    if args.sections:
        wanted = {"env", *args.sections.split(",")}
        unknown = wanted - {p[0] for p in PLAN}
        if unknown:
            ap.error(f"unknown sections {sorted(unknown)}; choose from {[p[0] for p in PLAN]}")
        chosen = [p for p in PLAN if p[0] in wanted]
        scale = sum(p[1] for p in PLAN if p[0] != "long") / sum(p[1] for p in chosen if p[0] != "long")  # env is in
        plan = [(n, min(1.0, share * scale), floor, numba) for n, share, floor, numba in chosen]
    # A stop from outside (a device tool's timeout) ends the running section's process group too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"kernels_gpu.py: stopped by signal {signum}"))
    if args.budget <= 0:
        ap.error(f"--budget must be positive, got {args.budget}")
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    grace = 2 if args.smoke else 5
    wheels = os.environ.get("GPU_CHECK_WHEELS", "not run (kernels_gpu.py called without gpu_check.sh)")
    results = {"harness": "bench/gpu_check.sh", "mode": "smoke" if args.smoke else "gpu",
               "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start)), "budget_s": args.budget,
               "carried_wheels": wheels, "planted_wrong": os.environ.get("GPU_CHECK_PLANT_WRONG") or None,
               "planned_sections": len(plan), "sections": []}
    numba_ok, numba_reason = True, ""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as rows_dir, \
            open(os.path.join(args.out, "sections.log"), "w") as log:
        for i, (name, share, _, needs_numba) in enumerate(plan):
            left = args.budget - (time.time() - start)
            limit = min(share * args.budget, left - args.budget * sum(p[2] for p in plan[i + 1:]))
            if needs_numba and not numba_ok:
                section = {"name": name, "status": "skipped",
                           "reason": f"the one-element Numba kernel failed: {numba_reason}"}
            elif limit < MIN_SECTION_S:
                section = {"name": name, "status": "skipped", "reason": f"no time left ({left:.0f} s of the budget)"}
            else:
                section = run_section(name, limit, grace, args, numba_ok, rows_dir, log)
            results["sections"].append(section)
            if name == "env":
                numba_ok, numba_reason = numba_verdict(section.get("rows", []))
            write_results(results, args.out, start)
    return write_results(results, args.out, start)


def write_results(results, out, start):
    """results.json and summary.txt as they stand; returns the exit code."""
    failed = [s["name"] for s in results["sections"] if s["status"] in FAILED]
    if results["carried_wheels"].startswith("FAILED"):
        failed.append("carried wheels")
    if len(results["sections"]) < results["planned_sections"]:   # written mid-run: a stopped run says so
        failed.append(f"incomplete (sections after {results['sections'][-1]['name'] if results['sections'] else 'none'}"
                      " not run yet)")
    results.update(elapsed_s=round(time.time() - start, 1), failed=failed, exit_code=1 if failed else 0)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    try:
        text = summary(results)
    except Exception as e:          # the summary is a view of results.json: never lose the run over it
        text = f"summary.txt could not be formatted ({type(e).__name__}: {e}); see results.json\n"
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text)
    return results["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
