"""The env section (the machine, the libraries as imported, a one-element Numba kernel) and the tests
section (tests/test_*kernel*.py on the real GPU)."""
import glob
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import time

import numpy as np

from gpu_harness import ROOT, host, one_line


def numba_smoke_kernel(run):
    """Compile and run a one-element kernel: every Numba section depends on this working."""
    from numba import cuda

    @cuda.jit
    def add_one(x):                     # no cuda.* inside: the simulator only fakes `cuda` as a global
        x[0] += 1

    x = run.dev.xp.zeros(1, dtype=np.float32)
    t0 = time.perf_counter()
    add_one[1, 1](x)
    run.dev.sync()
    value = float(host(x)[0])
    if value != 1.0:
        raise RuntimeError(f"the kernel ran but x[0] = {value}, not 1.0")
    return {"verdict": "ok", "first_call_s": time.perf_counter() - t0}


def module_version(name):
    try:
        module = importlib.import_module(name)
    except Exception as e:
        return f"absent ({one_line(e)})"
    return f"{getattr(module, '__version__', '?')} ({os.path.dirname(module.__file__)})"


def cuda_version(number):
    """CUDA's integer version (13000) as major.minor (13.0)."""
    return f"{number // 1000}.{number % 1000 // 10}"


# FP32 lanes per SM by compute capability (CUDA C Programming Guide, "Arithmetic Instructions").
FP32_LANES = {(7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128, (9, 0): 128,
              (10, 0): 128, (12, 0): 128}


def fp32_peak_tflops(runtime, props):
    """SMs × FP32 lanes × 2 (an FMA is two FLOPs) × the boost clock: 66.9 TFLOP/s on an H100 SXM.
    None where the compute capability is not in FP32_LANES or the runtime gives no clock."""
    lanes = FP32_LANES.get((props["major"], props["minor"]))
    khz = props.get("clockRate") or runtime.deviceGetAttribute(13, 0)    # 13: cudaDevAttrClockRate (kHz)
    return None if lanes is None or not khz else props["multiProcessorCount"] * lanes * 2 * khz * 1e3 / 1e12


def section_env(run):
    info = {"what": "info", "python": sys.version.split()[0], "executable": sys.executable,
            "pythonpath": os.environ.get("PYTHONPATH", ""),
            "NUMBA_ENABLE_CUDASIM": os.environ.get("NUMBA_ENABLE_CUDASIM", "unset"),
            "CUPY_TF32": os.environ.get("CUPY_TF32", "unset")}
    for name in ("numpy", "numba", "numba_cuda", "cupy", "torch", "pytest"):
        info[name] = module_version(name)
    if not run.smoke:
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=15).stdout.strip()
        except Exception as e:
            info["nvidia_smi"] = one_line(e)
        try:
            runtime = run.dev.xp.cuda.runtime
            props = runtime.getDeviceProperties(0)
            info.update(gpu=props["name"].decode(), sms=props["multiProcessorCount"],
                        memory_gib=round(props["totalGlobalMem"] / 2 ** 30, 1),
                        cuda_runtime=cuda_version(runtime.runtimeGetVersion()),
                        cuda_driver=cuda_version(runtime.driverGetVersion()),
                        compute_capability=f"{props['major']}.{props['minor']}")
        except Exception as e:
            info["gpu"] = f"CuPy cannot see a GPU: {one_line(e)}"
            run.failed = True
        else:
            try:
                info["fp32_peak_tflops"] = fp32_peak_tflops(runtime, props)
            except Exception as e:                     # a number the summary can do without
                info["fp32_peak_tflops"] = None
                info["fp32_peak_reason"] = one_line(e)
    try:
        from numba.cuda.cudadrv import nvvm
        info["nvvm"] = str(nvvm.NVVM().get_version())
    except Exception as e:
        info["nvvm"] = f"not available ({one_line(e)})"
    run.emit(info)

    def smoke_kernel():
        try:
            return numba_smoke_kernel(run)
        except Exception as e:
            reason = one_line(e)
            if "row_stack" in reason:
                reason += " (numba-cuda 0.30 needs numpy < 2.5: carry a numpy 2.4 wheel in .whl/)"
            return {"verdict": "failed", "reason": reason}
    run.row({"what": "numba smoke kernel"}, smoke_kernel)



def section_tests(run):
    files = sorted(glob.glob(os.path.join(ROOT, "tests", "test_*kernel*.py")))
    fields = {"what": "tests", "files": [os.path.relpath(f, ROOT) for f in files]}
    if not files or importlib.util.find_spec("pytest") is None:
        run.emit(dict(fields, verdict="skipped", reason="no kernel test files" if not files else "pytest is not installed"))
        return
    # Static checks (PTX / ptxas / SASS reports) need no GPU and already run in CI: leave them out here.
    command = [sys.executable, "-u", "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",  # -u: progress survives a kill
               "-k", "not ptx and not report", *files]
    if importlib.util.find_spec("hypothesis") is None:
        command.append("--noconftest")             # conftest.py only sets hypothesis profiles and the simulator default
    if run.smoke:
        command.append("--collect-only")           # the simulator would take minutes; collection proves the files import
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1" if run.smoke else "0")

    def work():
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=max(1, run.time_left() - 0.5))
        except subprocess.TimeoutExpired as e:
            output = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            print(output)
            progress = "".join(re.findall(r"^([.FEsxX]+)(?:\s+\[\s*\d+%\])?$", output, re.M))
            return {"verdict": "timed out", "reason": f"pytest passed its {e.timeout:.0f} s deadline after "
                    f"{progress.count('.')} passed, {progress.count('F') + progress.count('E')} failed"}
        print(done.stdout[-20000:], done.stderr[-5000:])
        lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else done.stderr.strip()[-200:]
        counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|tests? collected)", last)}
        return dict(counts, verdict="ok" if done.returncode == 0 else "failed", summary=last.strip("= "),
                    pytest_exit=done.returncode)
    run.row(fields, work)

