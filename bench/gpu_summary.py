"""summary.txt for bench/gpu_check.sh: results.json read by a person. Every ratio is between two rows of
the same run; a number that was not measured is written as its row's verdict (WRONG, skipped, OOM,
error) or "not measured". Standard library only, like bench/kernels_gpu.py."""
import json
import time

TARGETS = "issue 21's targets"
TARGET_T = 4096                   # the attention targets are at T = 4096


def read_rows(path):
    """The rows a section appended, one JSON object a line; a line cut short by a kill is dropped."""
    found = []
    for line in open(path):
        try:
            found.append(json.loads(line))
        except ValueError:
            pass
    return found


def rows(results, what, **match):
    return [r for s in results["sections"] for r in s.get("rows", [])
            if r.get("what") == what and all(r.get(k) == v for k, v in match.items())]


def find(results, what, **match):
    found = rows(results, what, **match)
    return found[0] if found else None


def value(row, key):
    """row[key] when the row is ok and has it, else None."""
    return row.get(key) if row and row.get("verdict") == "ok" else None


def cell(row, key, fmt):
    """A number formatted, or why there is none."""
    if row is None:
        return "not measured"
    if row.get(key) is None:
        return row.get("verdict", "?") if row.get("verdict") != "ok" else "-"
    return format(row[key], fmt) if isinstance(row[key], (int, float)) else str(row[key])


def ratio(top, bottom, fmt=".2f", suffix="x"):
    return "not measured" if top is None or bottom is None or bottom == 0 else f"{top / bottom:{fmt}}{suffix}"


def table(header, body):
    widths = [max(len(str(x)) for x in column) for column in zip(header, *body)]
    return ["  ".join([str(x).rjust(w) for x, w in zip(line[:-1], widths)] + [str(line[-1])])
            for line in [header, *body]]


def environment(results):
    info = find(results, "info") or {}
    kernel = find(results, "numba smoke kernel")
    lines = [f"device: {info.get('gpu', 'unknown')} | nvidia-smi: {info.get('nvidia_smi', 'not run')} | "
             f"CUDA runtime {info.get('cuda_runtime', '?')}, driver API {info.get('cuda_driver', '?')}, "
             f"NVVM {info.get('nvvm', '?')}",
             f"python {info.get('python', '?')} ({info.get('executable', '?')}), PYTHONPATH={info.get('pythonpath', '')!r}"]
    lines += [f"  {name:10} {info.get(name, 'not recorded')}" for name in ("numpy", "numba", "numba_cuda", "cupy",
                                                                          "torch", "pytest")]
    lines.append(f"carried wheels: {results['carried_wheels']}")
    if kernel is None:
        lines.append("Numba one-element kernel: not run")
    elif kernel.get("verdict") == "ok":
        lines.append(f"Numba one-element kernel: ok (first call, compile included: {cell(kernel, 'first_call_s', '.1f')} s)")
    else:
        lines.append(f"Numba one-element kernel: {kernel.get('verdict')}: {kernel.get('reason')}")
    return lines


def fp32_peak(results):
    """The device's FP32 peak in TFLOP/s as the env section computed it, or None."""
    return (find(results, "info") or {}).get("fp32_peak_tflops")


def matmul_table(results):
    body = []
    for cublas in rows(results, "matmul", method="cublas") or [None]:
        if cublas is None:
            break
        numba = find(results, "matmul", method="numba", case=cublas["case"])
        tf32 = find(results, "matmul", method="numba 3xtf32", case=cublas["case"])
        body.append([cublas["case"], cell(cublas, "gflops", ".0f"), cell(numba, "gflops", ".0f"),
                     ratio(value(numba, "gflops"), value(cublas, "gflops"), ".1%", ""),
                     cell(cublas, "fp32_peak", ".1%"), cell(numba, "fp32_peak", ".1%"),
                     cell(cublas, "rel_err", ".1e"), cell(numba, "rel_err", ".1e"), cell(numba, "first_call_s", ".1f"),
                     cell(tf32, "gflops", ".0f"), ratio(value(tf32, "gflops"), value(cublas, "gflops"), ".2f"),
                     cell(tf32, "rel_err", ".1e")])
    return table(["case", "cuBLAS GFLOP/s", "numba GFLOP/s", "numba/cuBLAS", "cuBLAS % FP32 peak",
                  "numba % FP32 peak", "cuBLAS err", "numba err", "numba 1st call s", "3xTF32 GFLOP/s",
                  "3xTF32/cuBLAS", "3xTF32 err"], body)


def ladder_table(results):
    """The SGEMM ladder, each rung beside cuBLAS at the same size (the baselines section's row)."""
    body = []
    for rung in rows(results, "ladder"):
        cublas = find(results, "matmul", method="cublas", case=rung["case"])
        body.append([rung["rung"], rung["case"], cell(rung, "gflops", ".0f"),
                     ratio(value(rung, "gflops"), value(cublas, "gflops"), ".1%", ""),
                     cell(rung, "fp32_peak", ".1%"), cell(rung, "rel_err", ".1e"),
                     rung.get("verdict", "?") + (f" ({rung['reason'][:70]})" if rung.get("reason") else "")])
    return table(["rung", "case", "GFLOP/s", "of cuBLAS", "% FP32 peak", "err", "verdict"], body)


def attention_table(results):
    body = []
    for T in sorted({r["T"] for r in rows(results, "attention")}):
        unfused = find(results, "attention", T=T, method="cupy unfused")
        torch = find(results, "attention", T=T, method="torch sdpa")
        for row in rows(results, "attention", T=T):
            errors = [row[k] for k in ("fwd_rel_err", "fb_rel_err") if k in row]
            err = next((e for e in errors if isinstance(e, str)), max(errors, default=None))   # "nan" first
            body.append([T, row["method"], cell(row, "fwd_ms", ".2f"), cell(row, "fb_ms", ".2f"),
                         cell(row, "peak_mib", ".0f"), err if not isinstance(err, float) else f"{err:.1e}",
                         ratio(value(unfused, "fwd_ms"), value(row, "fwd_ms")),
                         ratio(value(unfused, "fb_ms"), value(row, "fb_ms")),
                         ratio(value(torch, "fb_ms"), value(row, "fb_ms")),
                         row.get("verdict", "?") + (f" ({row['reason'][:80]})" if row.get("reason") else "")])
    return table(["T", "method", "fwd ms", "fwd+bwd ms", "peak MiB", "max err", "fwd vs unfused",
                  "fwd+bwd vs unfused", "fwd+bwd vs torch", "verdict"], body)


def attention_shape(results):
    shapes = {f"B·H = {r['BH']}, head_dim {r['head_dim']}" for r in rows(results, "attention") if "BH" in r}
    return ", ".join(sorted(shapes)) or "not measured"


def train_table(results):
    body = [[r["model"], f"B={r['batch']} T={r['T']}", r["device"], r["kernels"], cell(r, "ms", ".1f"),
             cell(r, "tokens_per_s", ",.0f"), cell(r, "tflops", ".2f"), cell(r, "mfu", ".1%"), cell(r, "rel_err", ".1e"),
             r.get("verdict", "?") + (f" ({r['reason'][:70]})" if r.get("reason") else "")]
            for r in rows(results, "train")]
    return table(["model", "shape", "device", "kernels", "ms/step", "tokens/s", "TFLOP/s", "MFU (FP32 peak)",
                  "vs kernels=False", "verdict"], body)


def targets(results):
    """The issue's GPU targets, each from two rows of this run."""
    big = max((r["case"] for r in rows(results, "matmul", method="cublas") if r["case"].endswith("NN")),
              key=lambda case: int(case.split("^")[0]), default=None)
    common = {r["T"] for r in rows(results, "attention", method="cupy unfused")} & \
        {r["T"] for r in rows(results, "attention", method="numba flash")}
    T = TARGET_T if TARGET_T in common else max(common, default=None)      # --smoke has no T = 4096
    seqs = sorted({r["T"] for r in rows(results, "attention", method="numba flash") if value(r, "peak_mib")})
    flash_fb = value(find(results, "attention", T=T, method="numba flash"), "fb_ms")
    step = {(r["model"], r["on"], r["kernels"]): value(r, "ms") for r in rows(results, "train")}

    def check(name, measured, goal, met):
        if measured == "not measured":
            return f"  {name}: not measured"
        return f"  {name}: {measured} ({'met' if met else 'NOT met'}; target {goal})"

    matmul = ratio(value(find(results, "matmul", method="numba", case=big), "gflops"),
                   value(find(results, "matmul", method="cublas", case=big), "gflops"), ".3f", "")
    tf32_row = find(results, "matmul", method="numba 3xtf32", case=big)
    tf32 = ratio(value(tf32_row, "gflops"), value(find(results, "matmul", method="cublas", case=big), "gflops"),
                 ".3f", "")
    unfused = ratio(value(find(results, "attention", T=T, method="cupy unfused"), "fb_ms"), flash_fb, ".3f", "")
    torch = ratio(flash_fb, value(find(results, "attention", T=T, method="torch sdpa"), "fb_ms"), ".3f", "")
    memory = (ratio(value(find(results, "attention", T=seqs[-1], method="numba flash"), "peak_mib"),
                    value(find(results, "attention", T=seqs[0], method="numba flash"), "peak_mib"), ".3f", "")
              if len(seqs) > 1 else "not measured")
    train = ratio(step.get(("gpt2-small", "gpu", True)), step.get(("gpt2-small", "gpu", False)), ".3f", "")
    core = ratio(step.get(("core bench step", "cpu", False)), step.get(("core bench step", "gpu", True)), ".3f", "")
    core_cupy = ratio(step.get(("core bench step", "cpu", False)), step.get(("core bench step", "gpu", False)))
    number = (lambda text: None if text == "not measured" else float(text))
    lines = [f"{TARGETS} (side by side in this run):",
             check(f"matmul {big}: numba / cuBLAS", matmul, ">= 0.90", number(matmul) and number(matmul) >= 0.9),
             check(f"matmul {big}: numba 3xTF32 / cuBLAS FP32 (rel err {cell(tf32_row, 'rel_err', '.1e')})", tf32,
                   ">= 1.5 at rel err <= 1e-5", number(tf32) and number(tf32) >= 1.5 and value(tf32_row, "rel_err") <= 1e-5),
             check(f"flash fwd+bwd at T={T}: speed vs unfused CuPy", unfused, ">= 1.5",
                   number(unfused) and number(unfused) >= 1.5),
             check(f"flash fwd+bwd at T={T}: time / torch SDPA", torch, "<= 1.2", number(torch) and number(torch) <= 1.2),
             check(f"flash peak memory T={seqs[-1] if seqs else '?'} / T={seqs[0] if seqs else '?'}", memory,
                   f"linear in T: ~{seqs[-1] // seqs[0] if len(seqs) > 1 else '?'}",
                   len(seqs) > 1 and number(memory) is not None and number(memory) <= 1.25 * seqs[-1] / seqs[0]),
             check("GPT-2 small step: kernels / CuPy time", train, "<= 1.0", number(train) and number(train) <= 1.0),
             check("core bench step: GPU (kernels) speed vs this machine's CPU", core, ">= 25",
                   number(core) and number(core) >= 25),
             f"  (core bench step on the GPU with kernels=False, CuPy/cuBLAS: {core_cupy} the CPU's speed)"]
    return lines


def summary(results):
    started = results["started_utc"]
    lines = [f"tinylm GPU check, mode {results['mode']}, started {started} UTC, budget {results['budget_s']:.0f} s, "
             f"took {results.get('elapsed_s', '?')} s, exit code {results.get('exit_code', '?')}"]
    lines += [f"NOT OK: {', '.join(results['failed'])}"] if results.get("failed") else []
    if results["mode"] == "smoke":
        lines.append("SMOKE RUN: CPU, CUDA simulator, NumPy standing in for CuPy, tiny sizes: no number here is a GPU number")
    if results.get("planted_wrong"):
        lines.append(f"PLANTED WRONG RESULT: outputs of checks labelled {results['planted_wrong']}* were perturbed")
    lines += ["", *environment(results), "", "sections:"]
    lines += table(["section", "status", "seconds", "limit s", "reason"],
                   [[s["name"], s["status"], s.get("seconds", "-"), s.get("limit_s", "-"), s.get("reason", "")[:110]]
                    for s in results["sections"]])
    peak = fp32_peak(results)
    lines += ["", f"FP32 peak of this device: {'not measured' if peak is None else f'{peak:.1f} TFLOP/s'} "
              "(SMs × FP32 lanes × 2 × boost clock, from the env section)"]
    lines += ["", "matmul, float32, n×n×n (err: ‖C − C64‖/‖C64‖ vs float64):", *matmul_table(results),
              "", "SGEMM ladder (bench/gpu_ladder.py), float32:", *ladder_table(results),
              "", f"causal attention, float32, {attention_shape(results)} (err vs float64 on the checked heads; "
              "speed: the other method's time / this row's):", *attention_table(results),
              "", "training step (forward + backward + clip + AdamW), median ms:", *train_table(results)]
    tests = find(results, "tests")
    lines += ["", "kernel tests on the device: " + ("not run" if tests is None else
              f"{tests.get('verdict')}: {tests.get('summary') or tests.get('reason', '')}"), "", *targets(results)]
    failures = [f"  {s['name']}: {s['status']}: {s.get('reason', '')}" for s in results["sections"]
                if s["status"] not in ("ok", "skipped")]
    lines += ["", "failures:" if failures else "failures: none", *failures,
              f"(written {time.strftime('%H:%M:%S', time.gmtime())} UTC)"]
    return "\n".join(lines) + "\n"
