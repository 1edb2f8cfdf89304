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


def graph_rows(run, config, batch, steps):
    """The core step as one CUDA graph (kernel_layers.GraphStep) against the eager kernel step: the
    params after `steps` steps on the same batches must agree, then both are timed (ms per step).
    Not measured yet (written without a GPU); --smoke skips it (the simulator cannot capture)."""
    fields = {"what": "train", "model": "core bench step", "batch": batch, "T": config.n_ctx, "on": "gpu",
              "device": "NumPy standing in for CuPy" if run.smoke else "cuda", "kernels": True}
    reason = ("--smoke: the CUDA simulator cannot capture a graph" if run.smoke else
              "the one-element Numba kernel failed (see env)" if not run.numba else None)
    if reason:
        for graph in ("graph on", "eager"):
            run.emit(dict(fields, step=graph, verdict="skipped", reason=reason))
        return
    results = {}

    def compare():
        """Both runs, once (the first row's work; an exception there is that row's error)."""
        from tinylm import GPT
        from tinylm.core.kernel_layers import GraphStep
        from tinylm.core.optim import Schedule, adamw_init, train_step
        rng = np.random.default_rng(2)
        batches = [rng.integers(0, config.vocab_size, size=(2, batch, config.n_ctx)) for _ in range(steps)]
        schedule = Schedule(1e-3, max_steps=steps, warmup_steps=2, min_lr=1e-4)
        models, times = {}, {}
        for graph in ("graph on", "eager"):
            model = GPT(config, seed=1, device="cuda", kernels=True)
            state = adamw_init(model.params)
            step = GraphStep(model, state) if graph == "graph on" else (
                lambda idx, targets, schedule, model=model, state=state: train_step(model, state, idx, targets,
                                                                                     schedule))
            seconds = []
            for idx, targets in batches:
                t0 = time.perf_counter()
                step(idx, targets, schedule)                   # the Step's host read waits for the device
                seconds.append(time.perf_counter() - t0)
            models[graph], times[graph] = model, 1e3 * float(np.median(seconds[2:] or seconds))
        error = rel_error("train:graph", [host(p) for p in models["graph on"].params.values()],
                          [host(p) for p in models["eager"].params.values()])
        results.update(error=error, times=times)

    def measured(graph):
        if not results:
            compare()
        error = results["error"]
        return {"verdict": "ok" if error <= MODEL_TOLERANCE else "WRONG", "rel_err": error, "tol": MODEL_TOLERANCE,
                "ms": results["times"][graph], "steps": steps}

    for graph in ("graph on", "eager"):
        run.row(dict(fields, step=graph), lambda graph=graph: measured(graph))


def section_train(run):
    from tinylm import GPTConfig
    from tinylm.core.backend import keep_freed_memory
    keep_freed_memory()                                   # as bench/train_step.py does for its CPU number
    s = run.sizes
    core = GPTConfig(**s["core"])
    train_rows(run, "core bench step", core, s["core_batch"], s["steps"])
    graph_rows(run, core, s["core_batch"], s["steps"])

    def cpu_step():
        from train_step import seconds_per_step
        ms = 1e3 * seconds_per_step(core, s["core_batch"], "cpu", steps=s["cpu_steps"])
        return {"verdict": "ok", "ms": ms, "tokens_per_s": s["core_batch"] * core.n_ctx / (ms / 1e3),
                "steps": s["cpu_steps"], "cpu": f"this machine's CPU, {os.cpu_count()} cores, numpy {np.__version__}"}
    run.row({"what": "train", "model": "core bench step", "batch": s["core_batch"], "T": core.n_ctx,
             "on": "cpu", "device": "cpu", "kernels": False}, cpu_step)
    train_rows(run, "gpt2-small", GPTConfig(**s["gpt2"]), s["gpt2_batch"], s["steps"])


