"""The sections of bench/gpu_check.sh; bench/kernels_gpu.py runs each in its own subprocess:

    env        GPU, driver, CUDA runtime, library versions as imported, NVVM, a one-element Numba kernel
    baselines  cuBLAS SGEMM (cupy.matmul, CUPY_TF32 unset), the unfused CuPy attention (tinylm.layers),
               torch's scaled_dot_product_attention in float32 with TF32 off
    matmul     kernels.matmul at 1024³, 2048³, 4096³ and the two transposes at 4096
    train      one training step: GPT-2 small with kernels=True vs kernels=False, and the core bench step
               (bench/train_step.py's defaults) on the GPU vs this machine's CPU, measured here
    flash      kernels.flash_attention_forward / _backward, causal, B·H = 32, head_dim 64, T = 1024, 4096
    tests      pytest on tests/test_*kernel*.py with NUMBA_ENABLE_CUDASIM=0 (the real GPU)
    long       T = 16384 for every attention method, once, at the very end

    python3 bench/gpu_sections.py SECTION --rows FILE --deadline EPOCH_SECONDS [--smoke] [--no-numba]
                                          [--previous FILE ...]

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
import argparse
import glob
import importlib
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
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
                gpt2={}, gpt2_batch=4, core=CORE_STEP, core_batch=8, steps=5, cpu_steps=3),
    "smoke": dict(matmul=[(16, False, False), (16, True, False), (16, False, True)],
                  heads=(1, 1, 8), seqs=(8,), long_seq=16, repeats=2,
                  gpt2=TINY, gpt2_batch=1, core=TINY, core_batch=1, steps=1, cpu_steps=1),
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


# ----------------------------------------------------------------------------- env
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
                        cuda_driver=cuda_version(runtime.driverGetVersion()))
        except Exception as e:
            info["gpu"] = f"CuPy cannot see a GPU: {one_line(e)}"
            run.failed = True
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


# ----------------------------------------------------------------------------- matmul
def matmul_rows(run, method, fn):
    """One row per case in sizes["matmul"]: fn(a, b, trans_a, trans_b) against float64."""
    xp, last = run.dev.xp, None
    for seed, (n, trans_a, trans_b) in enumerate(run.sizes["matmul"]):
        def work():
            a, b = random_arrays(xp, seed, (n, n), (n, n))
            reference = (a.astype(np.float64).T if trans_a else a.astype(np.float64)) @ \
                        (b.astype(np.float64).T if trans_b else b.astype(np.float64))
            result = run.checked_timing(f"matmul:{method}", run.dev, lambda: fn(a, b, trans_a, trans_b),
                                        [reference], lambda c: [c], poison_bytes=2 * 4 * n * n,
                                        timed=run.timed(method))
            if "ms" in result:
                result["gflops"] = 2 * n ** 3 / (result["ms"] / 1e3) / 1e9
            return result

        case = f"{n}^3 " + ("T" if trans_a else "N") + ("T" if trans_b else "N")
        estimate = None if last is None else last[1] * (n / last[0]) ** 3
        wall = run.row({"what": "matmul", "case": case, "method": method}, work, estimate)
        last = (n, wall) if wall is not None else last


def cublas_matmul(xp):
    return lambda a, b, trans_a, trans_b: xp.matmul(a.T if trans_a else a, b.T if trans_b else b)


def section_matmul(run):
    from tinylm.kernels.matmul import matmul
    matmul_rows(run, "numba", matmul)


# ----------------------------------------------------------------------------- attention
def attention_inputs(run, T, seed):
    """q, k, v, do (B, H, T, hd) float32, and the same numbers laid out for the unfused layer."""
    from tinylm.layers import merge_heads, merge_qkv_grads
    B, H, hd = run.sizes["heads"]
    q, k, v, do = random_arrays(run.dev.xp, seed, *[(B, H, T, hd)] * 4)
    return dict(q=q, k=k, v=v, do=do, qkv=merge_qkv_grads(q, k, v), dout=merge_heads(do), H=H)


def checked_heads(run, T):
    """The (batch, head) pairs compared against float64: two, or one past T = 8192 (its T×T float64
    reference takes 2 GiB per matrix)."""
    B, H, _ = run.sizes["heads"]
    return [(0, 0)] if T > 8192 else list(dict.fromkeys([(0, 0), (B - 1, H - 1)]))


def heads_index(heads):
    """Advanced index picking the (batch, head) pairs of heads from a (B, H, ...) array."""
    return ([b for b, _ in heads], [h for _, h in heads])


def attention_reference(run, x, heads):
    """float64 o, dq, dk, dv of the checked heads, each (n, T, hd): tinylm.layers' attention, one head at a time."""
    from tinylm.layers import attention_backward, attention_forward, merge_heads, merge_qkv_grads, split_heads

    def pick(a):
        return a[heads_index(heads)][:, None].astype(np.float64)                   # (n, 1, T, hd)

    out, cache = attention_forward(merge_qkv_grads(pick(x["q"]), pick(x["k"]), pick(x["v"])), 1)
    dq, dk, dv = split_heads(attention_backward(merge_heads(pick(x["do"])), cache), 1)
    references = [host(out), host(dq[:, 0]), host(dk[:, 0]), host(dv[:, 0])]
    del out, cache, dq, dk, dv
    run.dev.free()
    return references


def attention_method(run, method, x):
    """(device, forward(), forward_backward()); each returns its outputs as (B, H, T, hd) arrays."""
    q, k, v, do, H = x["q"], x["k"], x["v"], x["do"], x["H"]
    if method == "numba flash":
        from tinylm.kernels.flash_attention import flash_attention_backward, flash_attention_forward

        def forward():
            return [flash_attention_forward(q, k, v, causal=True)[0]]

        def forward_backward():
            o, lse = flash_attention_forward(q, k, v, causal=True)
            return [o, *flash_attention_backward(q, k, v, o, lse, do, causal=True)]
        return run.dev, forward, forward_backward
    if method == "cupy unfused":
        from tinylm.layers import attention_backward, attention_forward, split_heads
        B, _, T, hd = q.shape

        def heads(y):
            return y.reshape(B, T, H, hd).transpose(0, 2, 1, 3)

        def forward():
            return [heads(attention_forward(x["qkv"], H)[0])]

        def forward_backward():
            out, cache = attention_forward(x["qkv"], H)
            return [heads(out), *split_heads(attention_backward(x["dout"], cache), H)]
        return run.dev, forward, forward_backward
    if method == "torch sdpa":
        dev = TorchDevice(run.smoke)
        torch, sdpa = dev.torch, dev.torch.nn.functional.scaled_dot_product_attention
        tq, tk, tv = (dev.tensor(t).requires_grad_() for t in (q, k, v))
        tdo = dev.tensor(do)

        def forward():
            with torch.no_grad():
                return [sdpa(tq, tk, tv, is_causal=True)]

        def forward_backward():
            o = sdpa(tq, tk, tv, is_causal=True)
            return [o.detach(), *torch.autograd.grad(o, (tq, tk, tv), tdo)]
        return dev, forward, forward_backward
    raise ValueError(f"unknown attention method {method!r}")


def attention_row(run, method, x, heads, references):
    """Forward and forward+backward of one method at one T: checked, timed, peak memory."""
    dev, forward, forward_backward = attention_method(run, method, x)

    def checked_heads_of(outputs):
        return [indexable(out, run.dev.xp)[heads_index(heads)] for out in outputs]

    label = f"attention:{method}"
    poison = 6 * x["q"].nbytes                   # o, lse, D, dq, dk, dv come out of it
    timed = run.timed(method)
    fwd = run.checked_timing(label, dev, forward, references[:1], checked_heads_of, poison, timed=timed)
    try:
        fb = run.checked_timing(label, dev, forward_backward, references, checked_heads_of, poison, timed=timed)
    except Exception as e:          # the unfused backward at T = 16384 needs several T×T matrices
        if not is_oom(e):
            raise
        fb = {"verdict": "OOM", "reason": one_line(e)}
        dev.free()
    row = {f"fwd_{k}": v for k, v in fwd.items()} | {f"fb_{k}": v for k, v in fb.items()}
    row["verdict"] = next((v for v in ("WRONG", "OOM") if v in (fwd["verdict"], fb["verdict"])), "ok")
    if row["verdict"] == "ok" and timed:
        peak = dev.peak_bytes(forward_backward)
        row["peak_mib"] = None if peak is None else peak / MIB
    dev.free()
    return row


def repeating_seconds(row, wall):
    """The part of a row's wall time that grows with T² at the next T: the first calls (compiling, on
    a method's first row) do not repeat. (The first H200 run skipped every T = 4096 flash row on an
    estimate that counted them: 5.9 s at T = 1024, of which 2.4 s was compiling.)"""
    first = sum((row or {}).get(k) or 0.0 for k in ("fwd_first_call_s", "fb_first_call_s"))
    return max(wall - first, 0.0)


def attention_sweep(run, seqs, methods):
    """Rows for every T and method; each method's next row is skipped when its previous row's wall
    time × (T/T_prev)² exceeds the time left (previous rows may come from earlier sections)."""
    last = {}
    for row in run.previous:
        if row.get("what") == "attention" and row.get("wall_s") and row["T"] < min(seqs):
            last[row["method"]] = max(last.get(row["method"], (0, 0)), (row["T"], repeating_seconds(row, row["wall_s"])))
    for T in seqs:
        heads = checked_heads(run, T)
        try:
            x = attention_inputs(run, T, seed=T)
            references = attention_reference(run, x, heads)
        except Exception as e:
            traceback.print_exc()
            for method in methods:
                run.emit({"what": "attention", "T": T, "method": method, "verdict": "OOM" if is_oom(e) else "error",
                          "reason": f"inputs or float64 reference: {one_line(e)}"})
            run.free_quietly()
            continue
        for method in methods:
            estimate = last[method][1] * (T / last[method][0]) ** 2 if method in last else None
            B, H, hd = run.sizes["heads"]
            fields = {"what": "attention", "T": T, "method": method, "BH": B * H, "head_dim": hd,
                      "checked_heads": len(heads)}
            wall = run.row(fields,
                           lambda: attention_row(run, method, x, heads, references), estimate)
            if wall is not None:
                # What grows with T² is the timed work; the first calls (compiling, on the first row)
                # do not repeat, so they stay out of the next row's estimate.
                last[method] = (T, repeating_seconds(run.last_row, wall))
        del x
        run.dev.free()


def torch_available():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def baseline_attention_methods():
    return ["cupy unfused"] + (["torch sdpa"] if torch_available() else [])


def section_baselines(run):
    matmul_rows(run, "cublas", cublas_matmul(run.dev.xp))
    attention_sweep(run, run.sizes["seqs"], baseline_attention_methods())


def section_flash(run):
    attention_sweep(run, run.sizes["seqs"], ["numba flash"])


def section_long(run):
    methods = (["numba flash"] if run.numba else []) + baseline_attention_methods()[::-1]   # unfused last: it may OOM
    attention_sweep(run, [run.sizes["long_seq"]], methods)


# ----------------------------------------------------------------------------- training step
def model_options(run, device, kernels):
    """GPT's keyword for the kernel path, or None where this build's GPT does not take `kernels=`."""
    from tinylm import GPT, GPTConfig
    try:
        GPT(GPTConfig(**dict(TINY, n_layer=1)), device=device, kernels=kernels)
    except TypeError as e:
        if "kernels" in str(e):
            return None
        raise
    return {"kernels": kernels}


def kernel_model_check(run, config, batch, device):
    """Loss and every gradient of kernels=True against kernels=False (same seed, same tokens)."""
    from tinylm import GPT
    rng = np.random.default_rng(1)
    ids = rng.integers(0, config.vocab_size, size=(batch, config.n_ctx + 1))
    results = []
    for kernels in (False, True):
        model = GPT(config, seed=1, device=device, kernels=kernels)
        t0 = time.perf_counter()
        loss, grads = model.loss_and_grads(model.xp.asarray(ids[:, :-1]), model.xp.asarray(ids[:, 1:]))
        results.append([float(loss)] + [host(g) for g in grads.values()])
        first = time.perf_counter() - t0                  # for kernels=True: compiles every kernel it uses
        del model, loss, grads
        run.dev.free()
    error = rel_error("train:kernels", results[1], results[0])
    return {"verdict": "ok" if error <= MODEL_TOLERANCE else "WRONG", "rel_err": error, "tol": MODEL_TOLERANCE,
            "first_call_s": first}


def train_rows(run, name, config, batch, steps):
    """kernels=True (checked against kernels=False first) and kernels=False on the device."""
    from train_step import seconds_per_step
    device = "cpu" if run.smoke else "cuda"
    tokens = batch * config.n_ctx
    fields = {"what": "train", "model": name, "batch": batch, "T": config.n_ctx, "on": "gpu",
              "device": "NumPy standing in for CuPy" if run.smoke else "cuda"}

    def timed(options, step_estimate_s=0.0):
        """Median of `steps` steps after a warm-up, fewer when half the time left would not hold them.
        options: {"kernels": flag} where train_step.seconds_per_step takes it, {} in builds before it."""
        n = max(1, min(steps, int(0.5 * run.time_left() / max(step_estimate_s, 1e-3)) - 1))
        ms = 1e3 * seconds_per_step(config, batch, device, steps=n, **options)
        return {"verdict": "ok", "ms": ms, "tokens_per_s": tokens / (ms / 1e3), "steps": n}

    plain = model_options(run, device, kernels=False)
    run.row(dict(fields, kernels=False), lambda: timed(plain or {}))
    if plain is None:
        run.emit(dict(fields, kernels=True, verdict="not available",
                      reason="GPT does not take kernels= in this build"))
    elif not run.numba:
        run.emit(dict(fields, kernels=True, verdict="skipped", reason="the one-element Numba kernel failed (see env)"))
    elif run.smoke and name != "core bench step":
        run.emit(dict(fields, kernels=True, verdict="skipped",
                      reason="--smoke: a simulated step takes seconds; the core row checks the kernel path once"))
    else:
        def checked():
            check = kernel_model_check(run, config, batch, device)
            if check["verdict"] == "WRONG" or run.smoke:       # --smoke: checked, not timed
                return check
            return check | timed({"kernels": True}, check["first_call_s"])
        run.row(dict(fields, kernels=True), checked)


def section_train(run):
    from tinylm import GPTConfig
    from tinylm.backend import keep_freed_memory
    keep_freed_memory()                                   # as bench/train_step.py does for its CPU number
    s = run.sizes
    core = GPTConfig(**s["core"])
    train_rows(run, "core bench step", core, s["core_batch"], s["steps"])

    def cpu_step():
        from train_step import seconds_per_step
        ms = 1e3 * seconds_per_step(core, s["core_batch"], "cpu", steps=s["cpu_steps"])
        return {"verdict": "ok", "ms": ms, "tokens_per_s": s["core_batch"] * core.n_ctx / (ms / 1e3),
                "steps": s["cpu_steps"], "cpu": f"this machine's CPU, {os.cpu_count()} cores, numpy {np.__version__}"}
    run.row({"what": "train", "model": "core bench step", "batch": s["core_batch"], "T": core.n_ctx,
             "on": "cpu", "device": "cpu", "kernels": False}, cpu_step)
    train_rows(run, "gpt2-small", GPTConfig(**s["gpt2"]), s["gpt2_batch"], s["steps"])


# ----------------------------------------------------------------------------- kernel tests
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


SECTIONS = {"env": section_env, "baselines": section_baselines, "matmul": section_matmul,
            "train": section_train, "flash": section_flash, "tests": section_tests, "long": section_long}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("section", choices=SECTIONS)
    ap.add_argument("--rows", required=True, help="JSON-lines file the rows are appended to")
    ap.add_argument("--deadline", type=float, required=True, help="epoch seconds; rows predicted to pass it are skipped")
    ap.add_argument("--smoke", action="store_true", help="CPU, simulator, NumPy for CuPy, tiny sizes")
    ap.add_argument("--no-numba", dest="numba", action="store_false", help="skip the rows that need Numba kernels")
    ap.add_argument("--previous", nargs="*", default=[], help="rows files of earlier sections (for estimates)")
    args = ap.parse_args(argv)
    run = Run(args)
    try:
        SECTIONS[args.section](run)
    except Exception as e:
        traceback.print_exc()
        run.emit({"what": "section", "verdict": "error", "reason": one_line(e)})
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
