"""How a block's token mixer scales with sequence length T: forward + backward time and peak memory
of naive attention (the T×T matrix), flash attention (blocked, never holds T×T) and the selective
state-space mixer (a scan over T), all at the same width d_model, as one GPT block's mixer sublayer
(the model's own mixer_forward / mixer_backward, projections included). The log-log slope of each
gives the exponent: cost ∝ T^slope (attention's time 2, the ssm's 1; naive attention's memory 2).
"""
import time
import tracemalloc

import numpy as np

from ..core.model import GPT, GPTConfig

MIXERS = {"naive attention": dict(mixer="attention", attention="naive"),
          "flash attention": dict(mixer="attention", attention="flash"),
          "ssm": dict(mixer="ssm")}


def mixer_step(model, x, dout):
    """One forward + backward of block 0's mixer sublayer."""
    out, cache, _ = model.mixer_forward(x, 0)
    model.mixer_backward(dout, cache, 0, {})


def measure(model, T, batch, repeats):
    """-> (seconds: best of `repeats` after a warm-up, peak bytes allocated during one step, from
    tracemalloc). The warm-up step also measures memory: NumPy reports its buffers to tracemalloc,
    and tracing slows Python, so it is never timed."""
    rng = np.random.default_rng(0)
    C = model.config.d_model
    x = rng.normal(size=(batch, T, C)).astype(model.config.dtype)
    dout = rng.normal(size=(batch, T, C)).astype(model.config.dtype)
    tracemalloc.start()
    mixer_step(model, x, dout)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mixer_step(model, x, dout)
        seconds.append(time.perf_counter() - t0)
    return min(seconds), peak


def sweep_lengths(Ts, d_model, n_head, batch=1, dtype="float32", max_seconds=60.0, max_bytes=4 * 2**30,
                  progress=print):
    """{mixer: [(T, seconds, peak bytes)]} for T in Ts. A mixer stops growing T once its last step
    took over max_seconds/4 or its peak memory times 4 would pass max_bytes (the next doubling
    costs about that for a quadratic method)."""
    results = {name: [] for name in MIXERS}
    for name, kind in MIXERS.items():
        for T in Ts:
            config = GPTConfig(vocab_size=2, n_ctx=T, n_layer=1, n_head=n_head, d_model=d_model, dtype=dtype, **kind)
            seconds, peak = measure(GPT(config, seed=0), T, batch, repeats=3 if T <= 2048 else 1)
            results[name].append((T, seconds, peak))
            progress(f"  {name:16s} T={T:6d}  {seconds * 1000:10.1f} ms  peak {peak / 2**20:9.1f} MiB")
            if seconds * 4 > max_seconds or peak * 4 > max_bytes:
                break
    return results


def slopes(rows, fit_from_t):
    """Least-squares slopes of log(seconds) and log(peak) against log(T) over the rows with
    T >= fit_from_t (all rows if fewer than 2 qualify) -> (time slope, memory slope, T range), or
    None with fewer than 2 rows."""
    big = [r for r in rows if r[0] >= fit_from_t]
    rows = big if len(big) >= 2 else rows
    if len(rows) < 2:
        return None
    T, s, m = (np.log(np.array(c, dtype=float)) for c in zip(*rows))
    return float(np.polyfit(T, s, 1)[0]), float(np.polyfit(T, m, 1)[0]), (rows[0][0], rows[-1][0])


def report(results, Ts, fit_from_t):
    """The tables (time with naive/other ratios, then peak memory) and the slopes, as text lines."""
    lines = [f"{'T':>6s} " + " ".join(f"{n + ' ms':>20s}" for n in MIXERS) + "   naive/flash  naive/ssm  (time)"]
    rows = [{n: next((r for r in results[n] if r[0] == T), None) for n in MIXERS} for T in Ts]

    def ratio(row, a, b):
        return f"{row[a][1] / row[b][1]:11.2f}" if row[a] and row[b] else f"{'-':>11s}"
    for T, row in zip(Ts, rows):
        cells = [f"{row[n][1] * 1000:20.1f}" if row[n] else f"{'not measured':>20s}" for n in MIXERS]
        lines.append(f"{T:6d} " + " ".join(cells) + f"   {ratio(row, 'naive attention', 'flash attention')} "
                     f"{ratio(row, 'naive attention', 'ssm')}")
    lines.append(f"\n{'T':>6s} " + " ".join(f"{n + ' MiB':>20s}" for n in MIXERS))
    for T, row in zip(Ts, rows):
        lines.append(f"{T:6d} " + " ".join(f"{row[n][2] / 2**20:20.1f}" if row[n] else f"{'not measured':>20s}"
                                           for n in MIXERS))
    lines.append(f"\nlog-log slopes (cost ∝ T^slope), least squares over the measured T >= {fit_from_t} "
                 "(all T if fewer than 2):")
    for name, measured in results.items():
        fit = slopes(measured, fit_from_t)
        lines.append(f"  {name:16s} not measured (fewer than 2 sizes)" if fit is None else
                     f"  {name:16s} time {fit[0]:.2f}   peak memory {fit[1]:.2f}   (T = {fit[2][0]}..{fit[2][1]})")
    return lines
