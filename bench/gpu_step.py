"""The train section: one training step (forward, backward, clip, AdamW) of GPT-2 small and of the
core bench step, on the kernels and on CuPy/cuBLAS, and the core step on this machine's CPU."""
import os
import time

import numpy as np

from gpu_harness import MODEL_TOLERANCE, host, rel_error


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
    from tinylm import flops_per_token
    device = "cpu" if run.smoke else "cuda"
    tokens = batch * config.n_ctx
    fields = {"what": "train", "model": name, "batch": batch, "T": config.n_ctx, "on": "gpu",
              "device": "NumPy standing in for CuPy" if run.smoke else "cuda"}

    def timed(kernels, step_estimate_s=0.0):
        """Median of `steps` steps after a warm-up, fewer when half the time left would not hold them;
        MFU: the step's model FLOPs (tinylm.core.counting) per second over the device's FP32 peak."""
        n = max(1, min(steps, int(0.5 * run.time_left() / max(step_estimate_s, 1e-3)) - 1))
        ms = 1e3 * seconds_per_step(config, batch, device, steps=n, kernels=kernels)
        tflops = step_flops / (ms / 1e3) / 1e12
        return {"verdict": "ok", "ms": ms, "tokens_per_s": tokens / (ms / 1e3), "steps": n, "tflops": tflops,
                "mfu": tflops / run.fp32_peak_tflops if run.fp32_peak_tflops else None}

    step_flops = flops_per_token(config)["exact_forward_backward"] * tokens
    run.row(dict(fields, kernels=False), lambda: timed(False))
    if not run.numba:
        run.emit(dict(fields, kernels=True, verdict="skipped", reason="the one-element Numba kernel failed (see env)"))
    elif run.smoke and name != "core bench step":
        run.emit(dict(fields, kernels=True, verdict="skipped",
                      reason="--smoke: a simulated step takes seconds; the core row checks the kernel path once"))
    else:
        def checked():
            check = kernel_model_check(run, config, batch, device)
            if check["verdict"] == "WRONG" or run.smoke:       # --smoke: checked, not timed
                return check
            return check | timed(True, check["first_call_s"])
        run.row(dict(fields, kernels=True), checked)


def section_train(run):
    from tinylm import GPTConfig
    from tinylm.core.backend import keep_freed_memory
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


