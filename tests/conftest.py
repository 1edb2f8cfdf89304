import json
import os
import subprocess
import sys
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, settings
from tqdm import tqdm

# "ci": few, fixed-seed examples so the suite stays well under its time budget on 2 cores;
# "dev": more examples for a longer local hunt (HYPOTHESIS_PROFILE=dev pytest).
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The Numba kernels (tests/test_kernels.py) run under the CUDA simulator unless a caller chose
# otherwise (bench/gpu_check.sh sets NUMBA_ENABLE_CUDASIM=0 to run them on a real GPU). Numba reads
# the variable when it is first imported, so it is set here, before any test module imports numba.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# The simulator runs a block as one Python thread per CUDA thread, and its BlockManager polls them in a
# busy loop that holds the GIL until the interpreter's switch interval (5 ms by default) hands it on: most
# of a launch was that loop spinning and threads waiting for the GIL at every syncthreads(). At 1 ms the
# same launches compute the same results in about half the time (a kernel-path training step 6.9 s ->
# 2.8-3.5 s, a tf32="3x" one 26 s -> 11-14 s, 2 busy cores). Scheduling only: nothing a test checks changes.
sys.setswitchinterval(0.001)

# Tokenized data files (data.load_ids) are cached in a temporary folder, never in ~/.cache.
os.environ.setdefault("TINYLM_CACHE", tempfile.mkdtemp(prefix="tinylm-test-cache-"))

# tqdm's default write lock includes a multiprocessing semaphore, shared by every process forked
# after it exists. mutmut (bench/mutation.py) forks one process per mutant: one killed inside a
# progress bar left it held, and every later mutant's first bar waited on it forever. A thread lock
# is each process's own. (The tests themselves never share a bar across processes.)
tqdm.set_lock(threading.RLock())

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- sm_90 compiles, once
# tests/test_kernels.py (`kernels.ptx_check`: no float64 in any kernel's PTX, and the checker sees the
# f64 of a planted 0.5 literal) and tests/test_kernel_report.py (`python -m tinylm.kernels.report --check`)
# both compile every kernel of ptx_check.kernels_and_signatures() to sm_90 PTX with NVVM, the slow part of
# each (CI: 41 s and 62 s). One subprocess (the real CUDA target, no simulator, no GPU) runs both, each
# exactly as before (ptx_check.main(); the report module as `-m` runs it), with numba.cuda.compile_ptx
# memoised on (function, signature, options), so each build is compiled once for the two.
SM90_SCRIPT = r"""
import contextlib, io, json, runpy, sys, traceback
from numba import cuda
compile_ptx, compiled = cuda.compile_ptx, {}
def compile_ptx_once(pyfunc, sig, **options):
    key = (pyfunc, str(sig), tuple(sorted(options.items())))
    if key not in compiled:
        compiled[key] = compile_ptx(pyfunc, sig, **options)
    return compiled[key]
cuda.compile_ptx = compile_ptx_once
results_path, report_json = sys.argv[1], sys.argv[2]

def phase(body):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            rc = body()
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:
            traceback.print_exc(file=out)
            rc = 1
    return {"rc": rc, "stdout": out.getvalue()}

def ptx_check_phase():
    from numba import float32
    from tinylm.kernels import ptx_check
    status = ptx_check.main()
    def promoted(x, y):                 # the bug ptx_check exists to catch: a Python float literal
        i = cuda.grid(1)
        if i < x.size:
            y[i] = x[i] * 0.1
    ptx, _ = cuda.compile_ptx(promoted, "void(float32[:], float32[:])", cc=(9, 0))
    print("promoted kernel .f64 lines:", len(ptx_check.f64_lines(ptx)))
    return status

def report_phase():
    sys.argv = ["tinylm.kernels.report", "--json", report_json, "--check"]
    runpy.run_module("tinylm.kernels.report", run_name="__main__", alter_sys=True)
    return 0

results = {"ptx_check": phase(ptx_check_phase), "report": phase(report_phase),
           "compiles": len(compiled)}
json.dump(results, open(results_path, "w"))
"""


@pytest.fixture(scope="session")
def sm90_compiles(tmp_path_factory):
    """{"ptx_check": {"rc", "stdout"}, "report": {"rc", "stdout"}, "report_json": path, "stderr"}."""
    folder = tmp_path_factory.mktemp("sm90")
    results, report_json = folder / "results.json", folder / "report.json"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", SM90_SCRIPT, str(results), str(report_json)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert results.exists(), done.stdout + done.stderr
    return dict(json.loads(results.read_text()), report_json=report_json, stderr=done.stderr)


# ----------------------------------------------------------------------------- a tf32="3x" step, recorded once
TINY = dict(vocab_size=11, n_ctx=8, n_layer=1, n_head=2, d_model=12, d_state=3, d_conv=3, expand=1)


def recorded_step(model, stream=None):
    """The launches of one training step of `model` on a fixed (2, 3) batch, under launch.on_stream(stream)
    when a stream is given, recorded under the simulator (kernels.launch.recording_launches)."""
    import contextlib

    import numpy as np

    from tinylm.core.optim import Schedule, adamw_init, train_step
    from tinylm.kernels.launch import on_stream, recording_launches
    idx, targets = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(2, 2, 3))
    with on_stream(stream) if stream is not None else contextlib.nullcontext(), recording_launches() as launches:
        train_step(model, adamw_init(model.params), idx, targets, Schedule.constant(1e-3))
    return launches


@pytest.fixture(scope="session")
def tf32_step_launches():
    """{"default": launches of a fresh tf32="3x" attention model's first training step, "stream": those of
    its second step under launch.on_stream(stream), "stream_object": stream}, recorded under the simulator.
    Under the simulator a 3xTF32 step is the dearest thing the tests run (~10-25 s): tests/test_kernel_report.py
    (the builds it dispatches) and tests/test_kernel_launches.py (the streams) read the same two steps."""
    from tinylm import GPT, GPTConfig
    model = GPT(GPTConfig(**TINY, mixer="attention"), device="cpu", kernels=True, tf32="3x", seed=1)
    stream = object()                     # the simulator ignores streams; the recording keeps them
    return {"default": recorded_step(model), "stream": recorded_step(model, stream), "stream_object": stream}
