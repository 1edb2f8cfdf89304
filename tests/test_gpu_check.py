"""bench/gpu_check.sh is known to work before a GPU minute is spent: the whole harness runs on the CPU
(--smoke: CUDA simulator, NumPy for CuPy, tiny sizes) with one kernel result planted wrong, and the
run must say WRONG for exactly those rows, not time them, keep every other section running, and exit
non-zero. A harness that timed wrong results as if right (the old gpu_check.sh) fails here."""
import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_env  # noqa: E402
import gpu_ladder  # noqa: E402
import kernels_gpu  # noqa: E402

SECTION_ORDER = [name for name, *_ in kernels_gpu.PLAN]


def gpu_check(out, *options, **env):
    environment = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OPENBLAS_NUM_THREADS="1", **env)
    environment.pop("NUMBA_ENABLE_CUDASIM", None)          # the script chooses: --smoke means the simulator
    return subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), *options],
                          env=environment, capture_output=True, text=True, timeout=1200)


def probe_wheel(folder):
    """A one-module pure-Python wheel, standing in for the numpy wheel carried to the GPU."""
    files = {"gcprobe/__init__.py": "__version__ = '1.0'\n",
             "gcprobe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: gcprobe\nVersion: 1.0\n",
             "gcprobe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text)}" for name, text in files.items()]
    files["gcprobe-1.0.dist-info/RECORD"] = "\n".join(record + ["gcprobe-1.0.dist-info/RECORD,,"]) + "\n"
    folder.mkdir()
    with zipfile.ZipFile(folder / "gcprobe-1.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


def test_smoke_run_reports_a_planted_wrong_kernel_result_as_wrong(tmp_path):
    out, site = tmp_path / "out", tmp_path / "site"
    probe_wheel(tmp_path / "wheels")
    t0 = time.perf_counter()
    # The budget is generous (the smoke sections take ~40 s on 2 idle cores): with "80" a section ran
    # out of its share when both cores were busy, and the run reported it as failed (issue 19).
    done = gpu_check(out, "--smoke", "--budget", "900", GPU_CHECK_PLANT_WRONG="matmul:numba",
                     GPU_CHECK_WHEEL_DIR=str(tmp_path / "wheels"), GPU_CHECK_SITE=str(site))
    seconds = time.perf_counter() - t0
    assert done.returncode == 1, done.stdout + done.stderr
    assert sorted(os.listdir(out)) == ["results.json", "sections.log", "summary.txt"]
    results = json.load(open(out / "results.json"))
    assert results["carried_wheels"].startswith("installed") and (site / "gcprobe" / "__init__.py").exists()
    assert results["mode"] == "smoke" and results["exit_code"] == 1
    assert [s["name"] for s in results["sections"]] == SECTION_ORDER
    status = {s["name"]: s["status"] for s in results["sections"]}
    assert status["matmul"] == "WRONG" and results["failed"] == ["matmul"], status
    assert all(status[name] in ("ok", "skipped") for name in SECTION_ORDER if name != "matmul"), status

    rows = {s["name"]: s["rows"] for s in results["sections"]}
    env = {r["what"]: r for r in rows["env"]}
    assert env["numba smoke kernel"]["verdict"] == "ok" and env["info"]["numpy"]
    assert env["info"]["pythonpath"].startswith(str(site))        # the sections import the carried wheels first
    planted = rows["matmul"]
    assert planted and all(r["verdict"] == "WRONG" and "ms" not in r for r in planted)
    assert all(abs(r["rel_err"] - 1e-2) < 1e-4 for r in planted)          # the perturbation, measured
    cublas = [r for r in rows["baselines"] if r["what"] == "matmul"]
    assert cublas and all(r["verdict"] == "ok" and r["ms"] > 0 and r["rel_err"] < 1e-6 for r in cublas)
    attention = [r for r in rows["baselines"] + rows["flash"] if r["what"] == "attention"]
    assert {r["method"] for r in attention} >= {"cupy unfused", "numba flash"}
    assert all(r["verdict"] == "ok" and r["fb_rel_err"] < 1e-4 for r in attention)
    assert all(r["fb_ms"] > 0 for r in attention if r["method"] != "numba flash")   # --smoke times no simulated kernel
    assert {r["model"] for r in rows["train"]} == {"core bench step", "gpt2-small"}
    kernel_path = [r for r in rows["train"] if r["kernels"] is True and r["model"] == "core bench step"]
    assert kernel_path[0]["verdict"] == "ok" and kernel_path[0]["rel_err"] < 2e-3
    ladder = rows["ladder"]                      # every rung checked against float64; "matmul:numba" is not planted here
    assert [r["rung"] for r in ladder] == gpu_ladder.RUNGS_IN_ORDER
    assert all(r["verdict"] == "ok" and r["rel_err"] < 1e-5 for r in ladder), ladder
    assert rows["tests"][0]["verdict"] == "ok"

    summary = open(out / "summary.txt").read()
    assert "PLANTED WRONG RESULT" in summary and "matmul: WRONG" in summary
    print(f"smoke run: {seconds:.1f} s")          # ~30 s on 2 cores; not asserted: it is the machine's speed


def test_bad_options_give_one_line_and_exit_2(tmp_path):
    for options in (["--budget", "soon"], ["--budget", "5"], ["--fast"]):
        done = gpu_check(tmp_path, *options)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, (options, done.stderr)
        assert "gpu_check.sh:" in done.stderr
    assert os.listdir(tmp_path) == []                     # nothing written, nothing installed


def test_numba_sections_are_skipped_and_baselines_still_run_when_numba_cannot_compile(tmp_path, monkeypatch):
    """The env section's one-element kernel decides; the orchestrator is checked with stand-in sections."""
    reason = "AttributeError: module 'numpy' has no attribute 'row_stack'"
    ran = []

    def fake_section(name, limit_s, grace_s, args, numba_ok, rows_dir, log):
        ran.append((name, numba_ok))
        rows = [{"what": "numba smoke kernel", "verdict": "failed", "reason": reason}] if name == "env" else []
        return {"name": name, "status": "failed" if name == "env" else "ok", "reason": "", "rows": rows,
                "seconds": 0.0, "limit_s": limit_s}
    monkeypatch.setattr(kernels_gpu, "run_section", fake_section)
    assert kernels_gpu.main(["--out", str(tmp_path), "--budget", "100"]) == 1
    assert ran == [("env", True), ("baselines", False), ("train", False), ("long", False)]
    results = json.load(open(tmp_path / "results.json"))
    skipped = {s["name"]: s["reason"] for s in results["sections"] if s["status"] == "skipped"}
    assert set(skipped) == {"matmul", "ladder", "flash", "tests"} and all(reason in r for r in skipped.values())
    assert results["failed"] == ["env"]


@pytest.mark.parametrize("budget", [60, 400, 1000])
def test_section_limits_fit_the_budget(budget, tmp_path, monkeypatch):
    """Sections that use their whole limit still end within the budget: each gets at least its floor,
    and the optional last one (T = 16384) what is left, here nothing."""
    clock = [1000.0]
    limits = []

    def fake_section(name, limit_s, grace_s, args, numba_ok, rows_dir, log):
        limits.append(limit_s)
        clock[0] += limit_s
        rows = [{"what": "numba smoke kernel", "verdict": "ok"}] if name == "env" else []
        return {"name": name, "status": "ok", "reason": "", "rows": rows, "seconds": limit_s, "limit_s": limit_s}
    monkeypatch.setattr(kernels_gpu, "run_section", fake_section)
    monkeypatch.setattr(kernels_gpu.time, "time", lambda: clock[0])
    assert kernels_gpu.main(["--out", str(tmp_path), "--budget", str(budget)]) == 0
    floors = [floor * budget for _, _, floor, _ in kernels_gpu.PLAN]
    assert len(limits) == len(SECTION_ORDER) - 1 and all(lim >= f for lim, f in zip(limits, floors))
    assert sum(limits) <= budget + 1e-6
    assert json.load(open(tmp_path / "results.json"))["sections"][-1]["status"] == "skipped"


def test_fp32_peak_is_sms_times_lanes_times_two_times_the_clock():
    """REFERENCE.md: an H100 SXM (132 SMs at 1.98 GHz boost) does 66.9 TFLOP/s FP32; an A100 (108 SMs,
    64 FP32 lanes each, 1.41 GHz) 19.5. A compute capability not in the table gives None, not a guess."""
    class Runtime:                                   # CUDA 13 drops clockRate from the properties
        @staticmethod
        def deviceGetAttribute(attribute, device):
            assert (attribute, device) == (13, 0)
            return 1_980_000
    h100 = {"major": 9, "minor": 0, "multiProcessorCount": 132}
    assert abs(gpu_env.fp32_peak_tflops(Runtime, h100) - 66.9) < 0.05
    a100 = {"major": 8, "minor": 0, "multiProcessorCount": 108, "clockRate": 1_410_000}
    assert abs(gpu_env.fp32_peak_tflops(Runtime, a100) - 19.5) < 0.05
    assert gpu_env.fp32_peak_tflops(Runtime, dict(h100, major=6)) is None
