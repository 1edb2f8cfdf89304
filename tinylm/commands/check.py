"""`tinylm check`: build a model, prove its gradients by finite differences, print its counts."""
import argparse
import time

import numpy as np

from .args import at_least


def add_parser(sub):
    p = sub.add_parser("check", help="gradient-check a small model and print parameter / FLOP counts",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the model's weights and of the batch")
    p.set_defaults(func=run)


def run(args):
    from tinylm import GPT, GPTConfig, count_params, flops_per_token
    from tinylm.core.gradcheck import check_gradients

    config = GPTConfig(vocab_size=20, n_ctx=8, n_layer=2, n_head=2, d_model=8, dtype="float64")
    model = GPT(config, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    idx, targets = rng.integers(0, 20, size=(2, 8)), rng.integers(0, 20, size=(2, 8))
    t0 = time.perf_counter()
    loss, grads = model.loss_and_grads(idx, targets)
    errors = check_gradients(lambda: model.loss(idx, targets), model.params, grads, max_entries=10)
    worst = max(errors, key=errors.get)
    print(f"gradient check, {config}: loss {loss:.4f} (ln V = {np.log(20):.4f})")
    print(f"  {len(errors)} tensors, worst relative error {errors[worst]:.1e} ({worst}), "
          f"{time.perf_counter() - t0:.1f}s")
    for name, cfg in [("GPT-2 small", GPTConfig()),
                      ("bench default", GPTConfig(vocab_size=256, n_ctx=256, n_layer=4, n_head=4, d_model=256))]:
        n, f = count_params(cfg), flops_per_token(cfg)
        print(f"{name}: {n['total']:,} params ({n['non_embedding']:,} non-embedding); per token at T={f['seq_len']}: "
              f"{f['exact_forward'] / 1e6:,.1f} MFLOP forward, {f['exact_forward_backward'] / 1e6:,.1f} MFLOP train "
              f"(Kaplan: {f['kaplan_forward'] / 1e6:,.1f} / {f['kaplan_forward_backward'] / 1e6:,.1f})")
    ok = errors[worst] <= 1e-6
    print("gradients OK" if ok else "GRADIENT CHECK FAILED")
    return 0 if ok else 1
