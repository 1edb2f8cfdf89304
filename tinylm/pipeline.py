"""The whole RLHF pipeline on the synthetic world (world.py), stage by stage:

    pretrain a base LM on the "internet" corpus  ->  sample pairs, the labeller picks  ->
    reward model (Bradley–Terry)  ->  policy: REINFORCE + KL leash (+ RM retraining rounds)  ->
    DPO on the same pairs  ->  measure each on held-out instructions

`run_demo(config)` returns every number the `tinylm demo` table, JSON and plots show.
"""
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from tqdm import tqdm

from .backend import to_numpy
from .model import GPT, GPTConfig
from .optim import adamw_init
from .reward import RewardModel, pack
from .rlhf import (PolicyConfig, Preferences, policy_step, response_targets, reward_model_accuracy,
                   sample_responses, train_dpo, train_reward_model)
from .tokenizer import ByteTokenizer
from .train import lr_at, train_step
from .world import Labeller, World, instruction, score

TOKENIZER = ByteTokenizer()


@dataclass
class DemoConfig:
    seed: int = 0
    # the model: tiny, byte-level, short sequences
    model: GPTConfig = field(default_factory=lambda: GPTConfig(vocab_size=TOKENIZER.vocab_size, n_ctx=24, n_layer=2,
                                                               n_head=4, d_model=64))
    # the world and the labeller
    p_follow: float = 0.35
    label_noise: float = 0.1
    # pretraining
    pretrain_steps: int = 1500
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    # preference pairs and the reward model
    pair_instructions: int = 3000
    heldout_pair_instructions: int = 600
    rm_epochs: int = 3
    rm_batch: int = 32
    rm_lr: float = 1e-3
    # policy and DPO
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rm_round_instructions: int = 600
    dpo_epochs: int = 2
    dpo_batch: int = 32
    dpo_lr: float = 5e-4
    dpo_beta: float = 0.1
    # measurement
    eval_instructions: int = 300
    eval_samples: int = 2
    ablations: bool = True           # the β = 0 long runs, with and without RM retraining
    ablation_steps: int = 450


QUICK = DemoConfig(pretrain_steps=600, pair_instructions=1500, heldout_pair_instructions=300, rm_epochs=2,
                   policy=PolicyConfig(beta=0.1, steps=50, lr=5e-4), dpo_epochs=1, eval_instructions=150,
                   ablations=False)


# ----------------------------------------------------------------------------- stages
def encode_prompts(instructions):
    return [TOKENIZER.encode(instruction(task, letters)) for task, letters in instructions]


def pretrain_base(world, cfg, rng, progress=True):
    """The base LM: next-token prediction on the corpus, one document per row (so an instruction
    starts at position 0, as at sampling time), padded targets −1."""
    model = GPT(cfg.model, seed=cfg.seed)
    opt = adamw_init(model.params)
    for step in tqdm(range(cfg.pretrain_steps), desc="pretrain", disable=not progress, leave=False):
        docs = [np.append(TOKENIZER.encode(d)[:cfg.model.n_ctx], TOKENIZER.eot_id)
                for d in world.corpus(cfg.pretrain_batch, rng)]
        idx, lengths, _ = pack(docs, [np.zeros(0, np.int64)] * len(docs))
        targets = np.where(np.arange(idx.shape[1] - 1)[None] + 1 < lengths[:, None], idx[:, 1:], -1)
        lr = lr_at(step, cfg.pretrain_steps, cfg.pretrain_lr, cfg.pretrain_steps // 20, cfg.pretrain_lr / 10)
        train_step(model, opt, idx[:, :-1], targets, lr)
    return model


def make_pairs(model, instructions, labeller, max_new_tokens, rng, temperature=1.0):
    """Two samples per instruction from `model`; the labeller picks one. Ties are dropped (no label)."""
    prompts = encode_prompts(instructions)
    responses = sample_responses(model, prompts + prompts, max_new_tokens, temperature, rng, TOKENIZER.eot_id)
    pairs = Preferences([], [], [], [])
    for i, (task, letters) in enumerate(instructions):
        a, b = responses[i], responses[i + len(prompts)]
        choice = labeller.prefer(task, letters, TOKENIZER.decode(a), TOKENIZER.decode(b))
        if choice is not None:
            pairs.prompts.append(prompts[i])
            pairs.chosen.append(a if choice == 0 else b)
            pairs.rejected.append(b if choice == 0 else a)
            pairs.instructions.append((task, letters))
    return pairs


def merge(a, b):
    return Preferences(a.prompts + b.prompts, a.chosen + b.chosen, a.rejected + b.rejected,
                       a.instructions + b.instructions)


def examples(model, instructions, max_new_tokens, seed, n=8):
    """A few sampled responses, "instruction -> response", to show what a stage learned (its own
    random stream, so printing examples changes no other number)."""
    responses = sample_responses(model, encode_prompts(instructions[:n]), max_new_tokens, 1.0,
                                 np.random.default_rng(seed + 1), TOKENIZER.eot_id)
    return [f"{instruction(t, s)} -> {TOKENIZER.decode(r)!r}" for (t, s), r in zip(instructions, responses)]


def true_order(pairs):
    """The same pairs with the label noise removed: chosen is the response with the higher score."""
    flipped = [score(t, s, TOKENIZER.decode(w)) < score(t, s, TOKENIZER.decode(l))
               for (t, s), w, l in zip(pairs.instructions, pairs.chosen, pairs.rejected)]
    return Preferences(pairs.prompts, [l if f else w for f, w, l in zip(flipped, pairs.chosen, pairs.rejected)],
                       [w if f else l for f, w, l in zip(flipped, pairs.chosen, pairs.rejected)], pairs.instructions)


def success_rate(instructions, responses):
    """The labeller's verdict: the fraction of responses that are exactly right."""
    return float(np.mean([Labeller.success(t, s, TOKENIZER.decode(r)) for (t, s), r in zip(instructions, responses)]))


def evaluate(policy, reference, rm, instructions, samples, max_new_tokens, rng):
    """Sample `samples` responses per instruction at temperature 1 and measure: the labeller's
    success rate (exact answers), the mean reward-model score, and KL(policy ‖ reference) — the
    mean over samples of Σ_t (log π − log π_ref) on the response tokens (nats per response)."""
    repeated = [ins for ins in instructions for _ in range(samples)]
    prompts = encode_prompts(repeated)
    responses = sample_responses(policy, prompts, max_new_tokens, 1.0, rng, TOKENIZER.eot_id)
    idx, lengths, starts = pack(prompts, responses)
    inputs, targets = response_targets(idx, lengths, starts)
    kl = (to_numpy(policy.token_logprobs(inputs, targets)) - to_numpy(reference.token_logprobs(inputs, targets)))
    return {"success": success_rate(repeated, responses), "reward": float(rm.rewards(idx, lengths).mean()),
            "kl": float(kl.sum(1).mean())}


def train_policy(base, rm, world, labeller, pcfg, cfg, pairs, rng, progress=True, desc="rlhf"):
    """REINFORCE + KL leash from `base` (also the frozen reference) against `rm`. With
    pcfg.rm_rounds > 0 the reward model is retrained that many times, evenly spaced, on fresh pairs
    sampled from the current policy (added to the old ones). -> policy, rm, per-step history."""
    policy, opt = base.copy(), adamw_init(base.params)
    retrain_at = {int(pcfg.steps * (i + 1) / (pcfg.rm_rounds + 1)) for i in range(pcfg.rm_rounds)}
    history = []
    for step in tqdm(range(pcfg.steps), desc=desc, disable=not progress, leave=False):
        if step in retrain_at:
            fresh = make_pairs(policy, world.instructions(cfg.rm_round_instructions, rng), labeller,
                               pcfg.max_new_tokens, rng)
            pairs = merge(pairs, fresh)
            train_reward_model(rm, pairs, 1, cfg.rm_batch, cfg.rm_lr, rng)
        instructions = world.instructions(pcfg.prompts_per_step, rng)
        out = policy_step(policy, base, rm, opt, encode_prompts(instructions), pcfg, rng, TOKENIZER.eot_id)
        repeated = [ins for ins in instructions for _ in range(pcfg.samples_per_prompt)]
        history.append({"step": step, "reward": out["reward"], "kl": out["kl"],
                        "success": success_rate(repeated, out["responses"])})
    return policy, rm, history


def copy_rm(rm):
    return RewardModel(rm.trunk.copy(), rm.params["reward_vector"].copy(), float(rm.params["reward_bias"]))


def run_demo(cfg, progress=True):
    """Every stage from scratch; -> results dict (the JSON schema of `tinylm demo --json`)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    world, labeller = World(seed=cfg.seed, p_follow=cfg.p_follow), Labeller(cfg.label_noise, seed=cfg.seed)
    max_new = cfg.policy.max_new_tokens
    base = pretrain_base(world, cfg, rng, progress)
    pairs = make_pairs(base, world.instructions(cfg.pair_instructions, rng), labeller, max_new, rng)
    heldout_pairs = make_pairs(base, world.instructions(cfg.heldout_pair_instructions, rng, heldout=True),
                               labeller, max_new, rng)
    rm = RewardModel.from_lm(base)
    train_reward_model(rm, pairs, cfg.rm_epochs, cfg.rm_batch, cfg.rm_lr, rng)
    rm_accuracy = reward_model_accuracy(rm, heldout_pairs)
    rm_accuracy_true = reward_model_accuracy(rm, true_order(heldout_pairs))
    policy, _, history = train_policy(base, copy_rm(rm), world, labeller, cfg.policy, cfg, pairs, rng, progress)
    dpo = base.copy()
    train_dpo(dpo, base, pairs, cfg.dpo_epochs, cfg.dpo_batch, cfg.dpo_lr, cfg.dpo_beta, rng)
    eval_set = world.instructions(cfg.eval_instructions, rng, heldout=True)
    stages = {name: {**evaluate(model, base, rm, eval_set, cfg.eval_samples, max_new, rng),
                     "examples": examples(model, eval_set, max_new, cfg.seed)}
              for name, model in (("base", base), ("rlhf", policy), ("dpo", dpo))}
    results = {"stages": stages,
               "reward_model": {"heldout_accuracy": rm_accuracy, "heldout_accuracy_true": rm_accuracy_true,
                                "train_pairs": len(pairs),
                                "heldout_pairs": len(heldout_pairs)},
               "history": {"rlhf": history}}
    if cfg.ablations:
        results["ablations"] = run_ablations(base, rm, world, labeller, cfg, pairs, eval_set, rng, progress)
        results["history"].update({k: v.pop("history") for k, v in results["ablations"].items()})
    results["config"] = asdict(cfg)
    results["seconds"] = time.perf_counter() - t0
    return results


def run_ablations(base, rm, world, labeller, cfg, pairs, eval_set, rng, progress):
    """Long runs: β = 0 (no leash), β as configured, and β = 0 with RM retraining rounds. Each is
    measured against the frozen original RM (the proxy it optimised, or started from) and the
    labeller (the truth)."""
    runs = {"beta0_long": replace(cfg.policy, beta=0.0, steps=cfg.ablation_steps, rm_rounds=0),
            "beta_long": replace(cfg.policy, steps=cfg.ablation_steps, rm_rounds=0),
            "beta0_retrain_long": replace(cfg.policy, beta=0.0, steps=cfg.ablation_steps, rm_rounds=3)}
    out = {}
    for name, pcfg in runs.items():
        policy, _, history = train_policy(base, copy_rm(rm), world, labeller, pcfg, cfg, pairs, rng, progress, name)
        out[name] = {**evaluate(policy, base, rm, eval_set, cfg.eval_samples, pcfg.max_new_tokens, rng),
                     "examples": examples(policy, eval_set, pcfg.max_new_tokens, cfg.seed),
                     "beta": pcfg.beta, "steps": pcfg.steps, "rm_rounds": pcfg.rm_rounds, "history": history}
    return out
