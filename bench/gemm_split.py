"""Feasibility of splitting GEMMs over tinylm's own threads (issue 20, fourth pass).

At d256's shapes (2048 rows): OpenBLAS on 2 threads against OpenBLAS pinned to 1 thread with each GEMM
split in two halves (rows, or columns for xᵀ dy) over two Python threads; and the attention's 32
batched 256×64 GEMMs the same way. Prints ms per GEMM (forward, dx, dweight), median of 15.
Run: OPENBLAS_NUM_THREADS=2 python bench/gemm_split.py"""
import time, numpy as np
from concurrent.futures import ThreadPoolExecutor
from threadpoolctl import ThreadpoolController
blas = ThreadpoolController().select(user_api="blas").lib_controllers[0]
pool = ThreadPoolExecutor(1)
rng = np.random.default_rng(0)
f32 = np.float32

def best(fn, n=15):
    fn(); ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return np.median(ts) * 1e3

def rows2(a, b, out):          # out = a @ b, rows split over 2 threads
    h = a.shape[0] // 2
    f = pool.submit(np.matmul, a[h:], b, out=out[h:])
    np.matmul(a[:h], b, out=out[:h]); f.result()

def cols2(a, b, out):          # out = a @ b, columns split
    h = b.shape[1] // 2
    f = pool.submit(np.matmul, a, b[:, h:], out=out[:, h:])
    np.matmul(a, b[:, :h], out=out[:, :h]); f.result()

def batch2(a, b, out):
    h = a.shape[0] // 2
    f = pool.submit(np.matmul, a[h:], b[h:], out=out[h:])
    np.matmul(a[:h], b[:h], out=out[:h]); f.result()

N = 2048
tot_a = tot_b = 0
for I, O in [(256, 768), (256, 256), (256, 1024), (1024, 256)]:
    x = rng.standard_normal((N, I), dtype=f32); w = rng.standard_normal((I, O), dtype=f32)
    dy = rng.standard_normal((N, O), dtype=f32)
    y = np.empty((N, O), f32); dx = np.empty((N, I), f32); dw = np.empty((I, O), f32)
    res = {}
    for mode in ("blas2", "ours2"):
        blas.set_num_threads(2 if mode == "blas2" else 1)
        if mode == "blas2":
            ops = [lambda: np.matmul(x, w, out=y), lambda: np.matmul(dy, w.T, out=dx), lambda: np.matmul(x.T, dy, out=dw)]
        else:
            ops = [lambda: rows2(x, w, y), lambda: rows2(dy, w.T, dx), lambda: cols2(x.T, dy, dw)]
        res[mode] = [best(op) for op in ops]
    fl = 2 * N * I * O / 1e9
    print(f"{I}x{O}: blas2 " + " ".join(f"{t:.2f}" for t in res["blas2"]) + " | ours2 " + " ".join(f"{t:.2f}" for t in res["ours2"]) +
          f" ms  (GF/s fwd {fl/res['blas2'][0]*1e3:.0f} vs {fl/res['ours2'][0]*1e3:.0f})")
    tot_a += 4 * sum(res["blas2"]); tot_b += 4 * sum(res["ours2"])
print(f"linear total per step (x4 layers): blas2 {tot_a:.1f} ms, ours2 {tot_b:.1f} ms")
q = rng.standard_normal((32, 256, 64), dtype=f32); kt = rng.standard_normal((32, 64, 256), dtype=f32)
att = np.empty((32, 256, 256), f32); v = rng.standard_normal((32, 256, 64), dtype=f32); o = np.empty((32, 256, 64), f32)
for mode in ("blas2", "ours2", "blas1serial"):
    blas.set_num_threads(2 if mode == "blas2" else 1)
    if mode == "ours2":
        a = best(lambda: batch2(q, kt, att)); b = best(lambda: batch2(att, v, o))
    else:
        a = best(lambda: np.matmul(q, kt, out=att)); b = best(lambda: np.matmul(att, v, out=o))
    print(f"attention {mode}: qk^T {a:.2f} ms, att v {b:.2f} ms")
blas.set_num_threads(2)
