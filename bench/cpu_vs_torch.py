"""tinylm's fast CPU layers (cpu_layers.py), its reference layers (layers.py) and PyTorch eager, side by
side in one run: same config, same weights, float32, same thread count. Times forward+backward and a
whole training step (clip + AdamW), interleaving the three so a change in the machine's load hits
them alike; prints each time and its ratio to torch's, and each one's peak RSS (measured in a child
process of its own, since one process's peak covers everything it ran).

    python bench/cpu_vs_torch.py [--shape quickstart|d256|gpt2] [--threads 2] [--repeats 5]

tinylm's step is train.train_step (loss_and_grads, clip, AdamW through the model's layer set), torch's
the same three with torch.optim.AdamW. Torch is a bench-only dependency (the parity extra).
Results: bench/RESULTS.md.
"""
import argparse
import os
import subprocess
import sys
import time

SHAPES = {   # (vocab, n_ctx = T, d_model, n_layer, n_head, batch)
    "quickstart": (257, 128, 128, 4, 4, 8),     # tinylm pretrain's default (train_config.TrainConfig)
    "d256": (256, 256, 256, 4, 4, 8),
    "gpt2": (50257, 256, 768, 12, 12, 2),        # GPT-2 small's shape at T 256
}
IMPLEMENTATIONS = ("fast", "reference", "torch")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="d256", choices=SHAPES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=IMPLEMENTATIONS, help="(internal) run one implementation for its peak RSS")
    return ap.parse_args(argv)


ARGS = parse(sys.argv[1:])
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):   # before NumPy loads its BLAS
    os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tinylm import GPT, GPTConfig, adamw_init  # noqa: E402
from tinylm.core.backend import keep_freed_memory  # noqa: E402
from tinylm.core.optim import Schedule  # noqa: E402
from tinylm.train.loop import train_step  # noqa: E402

torch.set_num_threads(ARGS.threads)


def torch_loss(params, idx, targets, config):
    """GPT-2 in eager PyTorch on tinylm's parameter dict (Conv1D layout: x @ W + b)."""
    B, T = idx.shape
    H, C = config.n_head, config.d_model
    x = params["wte.weight"][idx] + params["wpe.weight"][:T]
    for i in range(config.n_layer):
        h = f"h.{i}."
        a = F.layer_norm(x, (C,), params[h + "ln_1.weight"], params[h + "ln_1.bias"], 1e-5)
        q, k, v = (a @ params[h + "attn.c_attn.weight"] + params[h + "attn.c_attn.bias"]).split(C, dim=-1)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + a @ params[h + "attn.c_proj.weight"] + params[h + "attn.c_proj.bias"]
        m = F.layer_norm(x, (C,), params[h + "ln_2.weight"], params[h + "ln_2.bias"], 1e-5)
        m = F.gelu(m @ params[h + "mlp.c_fc.weight"] + params[h + "mlp.c_fc.bias"], approximate="tanh")
        x = x + m @ params[h + "mlp.c_proj.weight"] + params[h + "mlp.c_proj.bias"]
    z = F.layer_norm(x, (C,), params["ln_f.weight"], params["ln_f.bias"], 1e-5)
    return F.cross_entropy((z @ params["wte.weight"].T).view(B * T, -1), targets.view(-1), ignore_index=-1)


def runners(name, config, idx, targets):
    """(forward_backward, train_step) closures for one implementation, on the same seed-0 weights."""
    if name == "torch":
        weights = GPT(config, seed=0, reference=True).params
        params = {k: torch.tensor(v, requires_grad=True) for k, v in weights.items()}
        decay = [p for k, p in params.items() if p.ndim == 2 and not k.startswith(("wte", "wpe"))]
        rest = [p for k, p in params.items() if not (p.ndim == 2 and not k.startswith(("wte", "wpe")))]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
        idx_t, targets_t = torch.from_numpy(idx), torch.from_numpy(targets)

        def forward_backward():
            for p in params.values():
                p.grad = None
            loss = torch_loss(params, idx_t, targets_t, config)
            loss.backward()
            return loss.item()

        def step():
            loss = forward_backward()
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            opt.step()
            return loss
        return forward_backward, step
    model = GPT(config, seed=0, reference=name == "reference")
    state = adamw_init(model.params)

    def forward_backward():
        return model.loss_and_grads(idx, targets)[0]

    def step():
        return train_step(model, state, idx, targets, Schedule.constant(1e-4)).loss
    return forward_backward, step


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def setup():
    V, T, C, L, H, B = SHAPES[ARGS.shape]
    config = GPTConfig(vocab_size=V, n_ctx=T, d_model=C, n_layer=L, n_head=H, dtype="float32")
    rng = np.random.default_rng(0)
    return config, rng.integers(0, V, size=(B, T)), rng.integers(0, V, size=(B, T))


def peak_rss_mb(name):
    """Peak RSS of a child process that builds `name` and runs two training steps."""
    out = subprocess.run([sys.executable, __file__, "--shape", ARGS.shape, "--threads", str(ARGS.threads),
                          "--only", name], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main():
    keep_freed_memory()
    config, idx, targets = setup()
    if ARGS.only:
        step = runners(ARGS.only, config, idx, targets)[1]
        step(), step()
        # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
        with open("/proc/self/status") as status:
            print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024)
        return
    run = {name: runners(name, config, idx, targets) for name in IMPLEMENTATIONS}
    losses = {name: run[name][0]() for name in IMPLEMENTATIONS}     # also the warm-up (compiles, page faults)
    for name in IMPLEMENTATIONS:                                      # the step's own warm-up (AdamW's compile)
        run[name][1]()
    times = {(name, what): [] for name in IMPLEMENTATIONS for what in ("fwd+bwd", "step")}
    for _ in range(ARGS.repeats):                # interleaved: load changes hit all three alike
        for name in IMPLEMENTATIONS:
            times[name, "fwd+bwd"].append(timed(run[name][0]))
        for name in IMPLEMENTATIONS:
            times[name, "step"].append(timed(run[name][1]))
    median = {key: float(np.median(t)) for key, t in times.items()}
    print(f"shape {ARGS.shape} {SHAPES[ARGS.shape]} (V, T, d_model, n_layer, n_head, B), float32, "
          f"{ARGS.threads} threads, median of {ARGS.repeats}; load before: {os.getloadavg()[0]:.2f}")
    print("initial loss: " + ", ".join(f"{n} {losses[n]:.6f}" for n in IMPLEMENTATIONS))
    rss = {name: peak_rss_mb(name) for name in IMPLEMENTATIONS}
    print(f"{'':10s} {'fwd+bwd ms':>11s} {'/torch':>7s} {'step ms':>9s} {'/torch':>7s} {'peak RSS MB':>12s}")
    for name in IMPLEMENTATIONS:
        fb, st = median[name, "fwd+bwd"], median[name, "step"]
        print(f"{name:10s} {1e3 * fb:11.1f} {fb / median['torch', 'fwd+bwd']:7.2f} {1e3 * st:9.1f} "
              f"{st / median['torch', 'step']:7.2f} {rss[name]:12.0f}")


if __name__ == "__main__":
    main()
