"""What every section of bench/gpu_sections.py shares: the sizes, the array devices and their clocks,
and `Run`, which checks each result before it times it and appends it as one row.

Every result is checked before it is timed: fresh random inputs, outputs carved from memory that was
filled with NaN first (CuPy's pool hands the freed block out again, so an element a kernel never
writes reads as NaN), and the relative error ‖out − ref‖/‖ref‖ in float64 against a float64
reference. Outside the tolerance the row says WRONG and is not timed. Timing: the checked first call
(its wall time, compile included, is `first_call_s`) is the warm-up; then CUDA events around each
call, median of `repeats` (fewer when time is short). A row predicted to overrun the time left is
skipped and says so: the prediction is the previous row's wall time scaled by the work ratio
((T/T_prev)² for attention, (n/n_prev)³ for matmul). Each row is appended to FILE as one JSON line
the moment it exists, so a section killed at its deadline keeps what it measured. Exit 1 when any
row is WRONG, raised, failed or timed out.

--smoke: the same code on the CPU with tiny sizes: NumPy stands in for CuPy, the kernels run under
the CUDA simulator and are checked but not timed, time.perf_counter stands in for CUDA events, torch
is used (on the CPU) only if it imports, and the model's kernel path is checked once (core row), untimed.

GPU_CHECK_PLANT_WRONG=LABEL perturbs the outputs of every check whose label starts with LABEL
(labels: matmul:numba, matmul:cublas, attention:numba flash, train:kernels, ...) by a relative 1e-2
(past every tolerance) before the comparison: tests/test_gpu_check.py's proof that a wrong kernel
is reported WRONG.
"""
import json
import math
import os
import statistics
import sys
import time
import traceback

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]
from gpu_summary import read_rows  # noqa: E402

# float32 results against float64 references land near 1e-6 (matmul at K = 4096, attention and its
# gradients); TF32 (~1e-3), a missed tile or a wrong softmax scale do not pass 1e-4.
TOLERANCE = 1e-4
# The model check compares two float32 models (kernels vs CuPy) through 12 layers, each with its
# own summation order: differences compound to ~1e-5–1e-4; a broken layer gives >= 1e-2.
MODEL_TOLERANCE = 2e-3
PLANTED = os.environ.get("GPU_CHECK_PLANT_WRONG", "")
PLANTED_ERROR = 1e-2              # relative: past TOLERANCE and MODEL_TOLERANCE alike
FAILURES = ("WRONG", "error", "failed", "timed out")
MIB = 2 ** 20

CORE_STEP = dict(vocab_size=256, n_ctx=256, n_layer=4, n_head=4, d_model=256)   # bench/train_step.py's defaults
TINY = dict(vocab_size=16, n_ctx=8, n_layer=1, n_head=2, d_model=16)
SIZES = {
    "gpu": dict(matmul=[(1024, False, False), (2048, False, False), (4096, False, False),
                        (4096, True, False), (4096, False, True)],
                heads=(4, 8, 64), seqs=(1024, 4096), long_seq=16384, repeats=10,
                ladder=4096, gpt2={}, gpt2_batch=4, core=CORE_STEP, core_batch=8, steps=5, cpu_steps=3),
    "smoke": dict(matmul=[(16, False, False), (16, True, False), (16, False, True)],
                  heads=(1, 1, 8), seqs=(8,), long_seq=16, repeats=2,
                  ladder=16, gpt2=TINY, gpt2_batch=1, core=TINY, core_batch=1, steps=1, cpu_steps=1),
}


def one_line(error):
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def host(x):
    """A float64 NumPy copy of a NumPy, CuPy, torch or Numba device array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    elif hasattr(x, "copy_to_host"):
        x = x.copy_to_host()
    elif not isinstance(x, np.ndarray) and hasattr(x, "get"):
        x = x.get()
    return np.asarray(x, dtype=np.float64)


def indexable(x, xp):
    """An output that takes fancy indexing: a Numba device array becomes a CuPy view (no copy), or
    under --smoke its NumPy copy."""
    if not hasattr(x, "copy_to_host"):
        return x
    return x.copy_to_host() if xp is np else xp.asarray(x)


def rel_error(label, outputs, references):
    """The largest ‖out − ref‖/‖ref‖ (float64) over the outputs; NaN if any output holds NaN."""
    errors = []
    for out, ref in zip(outputs, references):
        out, ref = host(out), host(ref)
        if PLANTED and label.startswith(PLANTED):
            out = out * (1 + PLANTED_ERROR)                # the planted wrong result (see the docstring)
        errors.append(float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)))
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


# ----------------------------------------------------------------------------- devices and clocks
class CupyDevice:
    """CuPy on the GPU: CUDA events for time, the memory pool for peak memory and poisoning."""
    name = "cupy"

    def __init__(self):
        import cupy
        self.xp = cupy

    def sync(self):
        self.xp.cuda.runtime.deviceSynchronize()

    def call_ms(self, fn):
        start, end = self.xp.cuda.Event(), self.xp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return self.xp.cuda.get_elapsed_time(start, end)

    def free(self):
        self.sync()
        self.xp.get_default_memory_pool().free_all_blocks()

    def poison(self, nbytes):
        """Fill nbytes of pool memory with NaN and free them: the next allocations are carved from it."""
        self.free()
        junk = self.xp.full(nbytes // 4 + 1, np.nan, dtype=np.float32)
        del junk

    def peak_bytes(self, fn):
        """How far one call grows the pool (it keeps freed blocks, so this is the most held at once)."""
        pool = self.xp.get_default_memory_pool()
        self.free()
        before = pool.total_bytes()
        fn()
        self.sync()
        return pool.total_bytes() - before


class NumpyDevice:
    """--smoke: NumPy on the CPU, perf_counter for time, tracemalloc for peak memory."""
    name = "numpy"
    xp = np

    def sync(self):
        pass

    def call_ms(self, fn):
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)

    def free(self):
        pass

    def poison(self, nbytes):
        pass                        # malloc gives no say over which block comes back

    def peak_bytes(self, fn):
        import tracemalloc
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak


class TorchDevice:
    """torch on the GPU (its own events and caching allocator), or on the CPU under --smoke."""
    name = "torch"

    def __init__(self, smoke):
        import torch
        self.torch, self.device = torch, "cpu" if smoke else "cuda"
        torch.backends.cuda.matmul.allow_tf32 = False       # true FP32, like the CuPy baseline
        torch.backends.cudnn.allow_tf32 = False

    def tensor(self, x):
        return self.torch.as_tensor(x, device=self.device).clone()

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def call_ms(self, fn):
        if self.device == "cpu":
            return NumpyDevice.call_ms(self, fn)
        start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def free(self):
        if self.device == "cuda":
            self.sync()
            self.torch.cuda.empty_cache()

    def poison(self, nbytes):
        self.free()
        junk = self.torch.full((nbytes // 4 + 1,), math.nan, device=self.device)
        del junk

    def peak_bytes(self, fn):
        if self.device == "cpu":
            return None
        cuda = self.torch.cuda
        self.sync()
        cuda.reset_peak_memory_stats()
        before = cuda.memory_allocated()
        fn()
        self.sync()
        return cuda.max_memory_allocated() - before


def is_oom(error):
    return "OutOfMemory" in type(error).__name__ or "out of memory" in str(error).lower()


# ----------------------------------------------------------------------------- one section's run
class Run:
    """What a section needs: sizes, device, deadline, and `emit` / `row` to record results."""

    def __init__(self, args):
        self.smoke, self.numba, self.deadline = args.smoke, args.numba, args.deadline
        self.sizes = SIZES["smoke" if args.smoke else "gpu"]
        self.rows_file = args.rows
        self.previous = [row for path in args.previous for row in read_rows(path)]
        # The env section's FP32 peak of this device (None under --smoke or when unknown): rows state
        # their TFLOP/s as a share of it.
        self.fp32_peak_tflops = next((r.get("fp32_peak_tflops") for r in self.previous if r.get("what") == "info"), None)
        self.failed = False
        self.last_row = None
        self._dev = None

    @property
    def dev(self):
        """The array device, created on first use (the env section must survive a broken CuPy)."""
        if self._dev is None:
            self._dev = NumpyDevice() if self.smoke else CupyDevice()
        return self._dev

    def free_quietly(self):
        """Hand cached device memory back after a failed row; a device that is itself broken stays quiet."""
        try:
            self.dev.free()
        except Exception:
            pass

    def time_left(self):
        return self.deadline - time.time()

    def emit(self, row):
        # strict JSON has no NaN: a NaN error (an output never written) is kept as the string "nan"
        row = {k: (round(v, 6) if math.isfinite(v) else str(v)) if isinstance(v, float) else v
               for k, v in row.items()}
        self.last_row = row
        with open(self.rows_file, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        if row.get("verdict") in FAILURES:
            self.failed = True

    def row(self, fields, work, estimate_s=None):
        """Record fields plus work()'s results as one row, unless estimate_s (seconds) exceeds the time
        left: then the row says skipped. An exception becomes verdict OOM or error. Returns the row's
        wall seconds (None if skipped), the base of the next row's estimate."""
        if estimate_s is not None and estimate_s > self.time_left():
            self.emit(dict(fields, verdict="skipped",
                           reason=f"predicted {estimate_s:.0f} s > {self.time_left():.0f} s left"))
            return None
        t0 = time.perf_counter()
        try:
            result = work()
        except Exception as e:          # one row's failure must not cost the section's other rows
            traceback.print_exc()
            result = {"verdict": "OOM" if is_oom(e) else "error", "reason": one_line(e)}
            self.free_quietly()
        wall = time.perf_counter() - t0
        self.emit(dict(fields, **result, wall_s=wall))
        return wall

    def timed(self, method):
        """Whether rows of this method are timed: --smoke checks the simulated kernels but does not
        time them (seconds per simulated launch on a loaded CPU say nothing)."""
        return not (self.smoke and method.startswith("numba"))

    def checked_timing(self, label, dev, call, references, compare_outputs=lambda outs: outs,
                       poison_bytes=0, tolerance=TOLERANCE, timed=True):
        """Run call() once on poisoned memory, compare its outputs with references; time it only if
        right (and timed): median of up to `repeats` calls, fewer if a quarter of the time left would
        not hold them."""
        dev.poison(poison_bytes)
        t0 = time.perf_counter()
        outputs = call()
        dev.sync()
        first = time.perf_counter() - t0
        error = rel_error(label, compare_outputs(outputs), references)
        result = {"rel_err": error, "tol": tolerance, "first_call_s": first}
        del outputs
        if not error <= tolerance:
            return dict(result, verdict="WRONG")
        if not timed:
            return dict(result, verdict="ok", note="checked, not timed (--smoke)")
        repeats = max(1, min(self.sizes["repeats"], int(0.25 * self.time_left() / max(first, 1e-4))))
        times = [dev.call_ms(call) for _ in range(repeats)]
        return dict(result, verdict="ok", ms=statistics.median(times), ms_min=min(times), repeats=repeats)


def random_arrays(xp, seed, *shapes):
    rng = xp.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]

