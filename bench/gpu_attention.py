"""The attention rows: kernels.flash_attention, the unfused CuPy layer of tinylm.core.layers and torch's
scaled_dot_product_attention, forward and forward+backward, checked on some heads against float64."""
import traceback

import numpy as np

from gpu_harness import MIB, TorchDevice, host, indexable, is_oom, one_line, random_arrays


def attention_inputs(run, T, seed):
    """q, k, v, do (B, H, T, hd) float32, and the same numbers laid out for the unfused layer."""
    from tinylm.core.layers import merge_heads, merge_qkv_grads
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
    """float64 o, dq, dk, dv of the checked heads, each (n, T, hd): tinylm.core.layers' attention, one head at a time."""
    from tinylm.core.layers import attention_backward, attention_forward, merge_heads, merge_qkv_grads, split_heads

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
        from tinylm.core.layers import attention_backward, attention_forward, split_heads
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


def section_flash(run):
    attention_sweep(run, run.sizes["seqs"], ["numba flash"])


def section_long(run):
    methods = (["numba flash"] if run.numba else []) + baseline_attention_methods()[::-1]   # unfused last: it may OOM
    attention_sweep(run, [run.sizes["long_seq"]], methods)


