"""GPU benchmarks, each printing ratios measured side by side in one run:

  1. matmul: kernels.matmul vs cupy.matmul (cuBLAS FP32 SGEMM; CUPY_TF32 must be unset), n×n×n
  2. causal attention, B·H = 32, head_dim 64: kernels.flash_attention_* vs the unfused CuPy
     attention (tinylm.layers.attention_*: cuBLAS matmuls + softmax, T×T matrix) and, where torch
     imports, torch's scaled_dot_product_attention in float32; forward and forward+backward time
     and peak GPU memory
  3. one training step (bench/train_step.py's, at its default config) on GPU vs CPU, tokens/s

    python bench/kernels_gpu.py [--sizes 1024 2048 4096 8192] [--seqs 512 1024 2048 4096 8192 16384]
                                [--budget 240]

Needs a CUDA GPU with CuPy and numba (numba-cuda); not the simulator. Times: wall clock over
`repeats` back-to-back calls then one device synchronize, after a warm-up call (which compiles
the Numba kernels). Peak memory: how far a call grows CuPy's memory pool (or torch's allocator
peak) beyond what existed before it, i.e. temporaries, outputs and saved state, not the inputs.
Rows that would pass `--budget` seconds are skipped and say so; out-of-memory is reported as OOM.
"""
import argparse
import os
import sys
import time


if os.environ.get("CUPY_TF32", "0") != "0":
    sys.exit("kernels_gpu.py: unset CUPY_TF32 — the baseline must be true FP32 SGEMM, not TF32 tensor cores")
if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "0":
    sys.exit("kernels_gpu.py: unset NUMBA_ENABLE_CUDASIM — this benchmarks the real GPU")
# Every array here lives on the default stream, so Numba need not synchronise on each CuPy array's
# stream at every launch (a host round trip per argument that would be billed to the kernels).
os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cupy  # noqa: E402

import kernels  # noqa: E402
from tinylm import GPTConfig  # noqa: E402
from tinylm.backend import set_matmul  # noqa: E402
from tinylm.layers import (attention_backward, attention_forward, merge_heads, merge_qkv_grads,  # noqa: E402
                           split_heads)
from train_step import seconds_per_step  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
except ImportError:
    torch = None

OOM = (cupy.cuda.memory.OutOfMemoryError,) + ((torch.cuda.OutOfMemoryError,) if torch is not None else ())
MIB = 2 ** 20


def sync():
    cupy.cuda.runtime.deviceSynchronize()


def gpu_seconds(fn, repeats):
    """Seconds per call of fn, after one warm-up call."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def cupy_peak_bytes(fn):
    """Growth of CuPy's memory pool during one call (the pool keeps freed blocks, so its size after
    the call is the most the call ever held at once, rounded up to the pool's block sizes)."""
    pool = cupy.get_default_memory_pool()
    sync()
    pool.free_all_blocks()
    before = pool.total_bytes()
    fn()
    sync()
    return pool.total_bytes() - before


def torch_peak_bytes(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# ----------------------------------------------------------------------------- 1. matmul
def bench_matmul(sizes, deadline, repeats=5):
    print("\n== matmul, float32: kernels.matmul vs cupy.matmul (cuBLAS SGEMM) ==")
    print(f"{'case':>16} | {'numba GFLOP/s':>13} {'cuBLAS GFLOP/s':>14} {'numba/cuBLAS':>12} | max rel err")
    n_t = min(sizes, key=lambda n: abs(n - 4096))                 # the transposes linear backward uses
    cases = [(n, False, False) for n in sizes] + [(n_t, True, False), (n_t, False, True)]
    for n, trans_a, trans_b in cases:
        name = f"{n}^3" + (" Aᵀ" if trans_a else "") + (" Bᵀ" if trans_b else "")
        if time.time() > deadline:
            print(f"{name:>16} | skipped (time budget)")
            continue
        a = cupy.random.standard_normal((n, n), dtype=cupy.float32)
        b = cupy.random.standard_normal((n, n), dtype=cupy.float32)
        reference = cupy.matmul(a.T if trans_a else a, b.T if trans_b else b)
        error = float(abs(kernels.matmul(a, b, trans_a, trans_b) - reference).max() / abs(reference).max())
        t_numba = gpu_seconds(lambda: kernels.matmul(a, b, trans_a, trans_b), repeats)
        t_cublas = gpu_seconds(lambda: cupy.matmul(a.T if trans_a else a, b.T if trans_b else b), repeats)
        flops = 2 * n ** 3
        print(f"{name:>16} | {flops / t_numba / 1e9:13.0f} {flops / t_cublas / 1e9:14.0f} "
              f"{t_cublas / t_numba:12.1%} | {error:.1e}", flush=True)


# ----------------------------------------------------------------------------- 2. attention
def attention_inputs(T, B=4, H=8, hd=64):
    """qkv (B, T, 3C) and dout (B, T, C) for the unfused layer; q, k, v, do (B, H, T, hd) contiguous
    copies of the same numbers for the kernels and torch."""
    rng = cupy.random.default_rng(0)
    qkv = rng.standard_normal((B, T, 3 * H * hd), dtype=cupy.float32)
    dout = rng.standard_normal((B, T, H * hd), dtype=cupy.float32)
    q, k, v = (cupy.ascontiguousarray(x) for x in split_heads(qkv, H))
    do = cupy.ascontiguousarray(dout.reshape(B, T, H, hd).transpose(0, 2, 1, 3))
    return dict(qkv=qkv, dout=dout, H=H, q=q, k=k, v=v, do=do)


def attention_methods(x):
    """name -> (forward(), forward_backward(), peak-memory function) on the inputs x."""
    q, k, v, do, qkv, dout, H = x["q"], x["k"], x["v"], x["do"], x["qkv"], x["dout"], x["H"]

    def flash_fb():
        o, lse = kernels.flash_attention_forward(q, k, v, causal=True)
        return kernels.flash_attention_backward(q, k, v, o, lse, do, causal=True)

    def unfused_fb():
        out, cache = attention_forward(qkv, H)
        return attention_backward(dout, cache)

    methods = {
        "numba flash": (lambda: kernels.flash_attention_forward(q, k, v, causal=True), flash_fb, cupy_peak_bytes),
        "cupy unfused": (lambda: attention_forward(qkv, H), unfused_fb, cupy_peak_bytes),
    }
    if torch is not None:
        tdo = torch.as_tensor(do, device="cuda")
        tq, tk, tv = (torch.as_tensor(t, device="cuda").clone().requires_grad_() for t in (q, k, v))

        def torch_fwd():
            with torch.no_grad():
                return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

        def torch_fb():
            o = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
            return torch.autograd.grad(o, (tq, tk, tv), tdo)

        methods["torch sdpa"] = (torch_fwd, torch_fb, torch_peak_bytes)
    return methods


def check_attention_agrees(T=256):
    """The kernels against the unfused attention before timing anything (float32: ~1e-6)."""
    x = attention_inputs(T)
    o, lse = kernels.flash_attention_forward(x["q"], x["k"], x["v"], causal=True)
    out, cache = attention_forward(x["qkv"], x["H"])
    errors = [float(abs(merge_heads(o) - out).max())]
    grads = kernels.flash_attention_backward(x["q"], x["k"], x["v"], o, lse, x["do"], causal=True)
    errors.append(float(abs(merge_qkv_grads(*grads) - attention_backward(x["dout"], cache)).max()))
    print(f"flash kernels vs unfused attention at T={T}: max |Δo| = {errors[0]:.1e}, max |Δdqkv| = {errors[1]:.1e}")


def bench_attention(seqs, deadline, repeats=3):
    print("\n== causal attention, float32, B=4 H=8 (B·H=32) head_dim=64: time in ms, peak memory in MiB ==")
    print(f"{'T':>6} {'method':>13} | {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MiB':>9} | fwd+bwd speedup vs cupy unfused")
    for T in seqs:
        if time.time() > deadline:
            print(f"{T:>6} skipped (time budget)")
            continue
        rows = {}
        for name, (forward, forward_backward, peak) in attention_methods(attention_inputs(T)).items():
            try:
                rows[name] = (gpu_seconds(forward, repeats), gpu_seconds(forward_backward, repeats),
                              peak(forward_backward))
            except OOM:
                rows[name] = None
            cupy.get_default_memory_pool().free_all_blocks()
        unfused = rows["cupy unfused"]
        for name, row in rows.items():
            if row is None:
                print(f"{T:>6} {name:>13} | OOM")
                continue
            t_fwd, t_fb, memory = row
            speedup = f"{unfused[1] / t_fb:.2f}x" if unfused else "(unfused: OOM)"
            print(f"{T:>6} {name:>13} | {1e3 * t_fwd:9.2f} {1e3 * t_fb:11.2f} {memory / MIB:9.0f} | {speedup}",
                  flush=True)


# ----------------------------------------------------------------------------- 3. training step
def bench_train_step(batch=8):
    config = GPTConfig(vocab_size=256, n_ctx=256, n_layer=4, n_head=4, d_model=256, dtype="float32")
    tokens = batch * config.n_ctx
    print(f"\n== one training step (forward + backward + AdamW), {config}, B={batch}: tokens/s ==")
    cpu = tokens / seconds_per_step(config, batch, "cpu", steps=3)
    print(f"{'cpu (numpy)':>22}: {cpu:12,.0f} tokens/s")
    for matmul in ("cublas", "numba"):
        set_matmul(matmul)
        gpu = tokens / seconds_per_step(config, batch, "cuda", steps=10)
        print(f"{'cuda, matmul=' + matmul:>22}: {gpu:12,.0f} tokens/s  ({gpu / cpu:.1f}x the CPU step)", flush=True)
    set_matmul("cublas")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--budget", type=float, default=240, help="seconds; later rows are skipped past it")
    args = ap.parse_args(argv)
    start = time.time()
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print(f"device: {props['name'].decode()}, cupy {cupy.__version__}, torch {torch.__version__ if torch else 'absent'}, "
          f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    check_attention_agrees()
    bench_matmul(args.sizes, start + 0.3 * args.budget)
    bench_attention(args.seqs, start + 0.8 * args.budget)
    bench_train_step()
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
