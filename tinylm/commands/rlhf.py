"""`tinylm rlhf STEP`: the RLHF pipeline one step at a time, on checkpoint directories, for the
built-in instruction world:

    base    pretrain a base LM on the world's corpus              -> LM checkpoint
    pairs   sample two responses per instruction, the labeller picks -> pairs .json
    reward  train a reward model on pairs (Bradley–Terry)          -> RM checkpoint
    policy  REINFORCE / PPO-clip / GRPO + KL leash against an RM   -> LM checkpoint + metrics.jsonl
    sft     supervised fine-tuning on demonstrations (right answers) -> LM checkpoint
    dpo     DPO on pairs                                           -> LM checkpoint + metrics.jsonl
    eval    labeller success, mean RM score and KL of a policy on held-out instructions
    compare REINFORCE-LOO, PPO-clip, GRPO, adaptive KL and best-of-n from scratch, over seeds
    goodhart  the over-optimisation curve: proxy RM score and gold success against √KL, β = 0
    labels  label efficiency at equal labeller comparisons: RM + policy gradient, DPO, the labeller as reward

LM checkpoints are Hugging Face GPT-2 directories (GPT.save_pretrained); --model also takes a
`tinylm pretrain` run directory (its latest checkpoint). A reward model is an LM directory plus
reward_head.safetensors. Outputs must not exist yet: nothing is ever overwritten, and a run
writes into a temporary directory that is renamed only once it is complete. `policy` and `dpo`
write their per-step diagnostics into it as metrics.jsonl (and, with --plot, metrics.png): the
policy's mean reward, KL, labeller success, β and clip fraction; DPO's loss, chosen and rejected
log-probabilities, implicit rewards, reward margin and implicit-reward accuracy.
"""
import argparse
import os
import shutil

import numpy as np

from tinylm.commands.args import DefaultsHelpFormatter, at_least, fraction, positive
from tinylm.rlhf.policy import ALGORITHMS, BASELINES

POLICY_PANELS = (("mean RM score", ("reward",)), ("KL(policy ‖ reference), nats", ("kl",)),
                 ("labeller success", ("success",)), ("β and clip fraction", ("beta", "clip_fraction")))
DPO_PANELS = (("loss", ("loss",)), ("log π per response", ("logp_chosen", "logp_rejected")),
              ("implicit reward β·log π/π_ref", ("reward_chosen", "reward_rejected", "reward_margin")),
              ("implicit-reward accuracy", ("reward_accuracy",)))


def add_parser(sub):
    p = sub.add_parser("rlhf", help="RLHF step by step: base, pairs, reward, judge, policy, dpo, eval",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = p.add_subparsers(dest="step", metavar="STEP", required=True)

    def step(name, help, func):
        s = steps.add_parser(name, help=help, description=help, formatter_class=DefaultsHelpFormatter)
        s.set_defaults(func=func)
        return s

    s = step("base", "pretrain a base LM on the instruction world's corpus", run_base)
    s.add_argument("--out", required=True, help="LM checkpoint directory to write (must not exist)")
    s.add_argument("--steps", type=positive(int), default=1500, help="pretraining steps")

    s = step("pairs", "sample response pairs from an LM and have the labeller choose", run_pairs)
    s.add_argument("--model", required=True, help="LM checkpoint that samples the responses")
    s.add_argument("--out", required=True, help="pairs file (.json) to write (must not exist)")
    s.add_argument("--instructions", type=positive(int), default=2000, help="instructions to sample (ties are dropped)")
    s.add_argument("--heldout", action="store_true", help="use held-out instructions (for measuring)")
    s.add_argument("--noise", type=fraction, default=0.1, help="label noise: probability a label is flipped (< 0.5)")

    s = step("reward", "train a reward model on pairs", run_reward)
    s.add_argument("--model", required=True, help="the LM whose copy becomes the reward model")
    s.add_argument("--pairs", required=True, help="training pairs file (from `rlhf pairs`)")
    s.add_argument("--heldout-pairs", help="pairs to measure held-out accuracy on")
    s.add_argument("--out", required=True, help="reward-model directory to write (must not exist)")
    s.add_argument("--epochs", type=positive(int), default=2, help="passes over the pairs")
    s.add_argument("--lr", type=positive(float), default=1e-3, help="AdamW learning rate")

    s = step("judge", "pretrain an LM judge on judged examples and relabel pairs with it", run_judge)
    s.add_argument("--pairs", required=True, help="pairs file (from `rlhf pairs`) whose responses the judge labels")
    s.add_argument("--out", required=True, help="pairs file (.json) to write with the judge's labels (must not exist)")
    s.add_argument("--steps", type=positive(int), default=600, help="pretraining steps of the judge")

    add_sft_flags(step("sft", "supervised fine-tuning on demonstrations (the world's right answers)", run_sft))
    add_policy_flags(step("policy", "REINFORCE with a KL penalty to the starting LM", run_policy))

    s = step("dpo", "direct preference optimisation on pairs", run_dpo)
    s.add_argument("--model", required=True, help="the starting LM, also the frozen reference")
    s.add_argument("--pairs", required=True, help="training pairs file (from `rlhf pairs`)")
    s.add_argument("--out", required=True, help="LM checkpoint directory to write (must not exist)")
    s.add_argument("--beta", type=positive(float), default=0.1, help="DPO's β: scale of the implicit reward")
    s.add_argument("--epochs", type=positive(int), default=1, help="passes over the pairs")
    s.add_argument("--lr", type=positive(float), default=5e-4, help="AdamW learning rate")
    s.add_argument("--plot", action="store_true", help="also plot metrics.jsonl as OUT/metrics.png")

    s = step("eval", "success, RM score and KL of a policy on held-out instructions", run_eval)
    s.add_argument("--model", required=True, help="the LM to measure")
    s.add_argument("--reference", required=True, help="the LM the KL is measured against")
    s.add_argument("--reward", required=True, help="reward model directory (the proxy score)")
    s.add_argument("--instructions", type=positive(int), default=300, help="held-out instructions (2 samples each)")
    add_experiment_steps(step)
    for s in steps.choices.values():
        if s.get_default("func") in EXPERIMENT_STEPS:
            continue
        s.add_argument("--seed", type=at_least(0), default=0, help="random seed (sampling, shuffling, labeller noise)")


def add_sft_flags(s):
    s.add_argument("--model", required=True, help="the LM to fine-tune")
    s.add_argument("--out", required=True, help="LM checkpoint directory to write (must not exist)")
    s.add_argument("--instructions", type=positive(int), default=2000, help="demonstrations (one per instruction)")
    s.add_argument("--epochs", type=positive(int), default=1, help="passes over the demonstrations")
    s.add_argument("--lr", type=positive(float), default=1e-3, help="AdamW learning rate")


def add_experiment_steps(step):
    """The experiments: each one command, from scratch over seeds, with --quick, --json and --plot."""
    for name, help, func in (
            ("compare", "REINFORCE-LOO vs PPO-clip vs GRPO vs adaptive KL vs best-of-n, from scratch, over seeds",
             run_compare),
            ("goodhart", "over-optimisation: β = 0 policies against reward models on fewer or more pairs; proxy "
             "and gold vs √KL", run_goodhart),
            ("labels", "label efficiency: RM + policy gradient vs DPO vs policy gradient on the labeller itself, "
             "at equal labeller comparisons", run_labels)):
        add_experiment_flags(step(name, help, func), "0-4")


def add_experiment_flags(s, seeds):
    """The experiments' flags: seeds, the one-minute variant, JSON and PNG outputs."""
    from tinylm.commands.demo import seed_list
    s.add_argument("--seeds", type=seed_list, default=seed_list(seeds), help="seeds, e.g. 3, 0-4 or 0,2,5")
    s.add_argument("--quick", action="store_true", help="a reduced run (under a minute on 2 cores): the tour's and CI's")
    s.add_argument("--jobs", type=positive(int),
                   help="worker processes, one BLAS thread each, running the seeds side by side (the result is the "
                        "same as one process's with OPENBLAS_NUM_THREADS=1); 1: in this process (default: the "
                        "number of CPUs or of seeds, whichever is smaller)")
    s.add_argument("--json", help="write every number as JSON to this path (must not exist)")
    s.add_argument("--plot", help="write the plot as a PNG to this path (must not exist)")


def add_policy_flags(s):
    """`rlhf policy`'s flags: PolicyConfig's settings, the reward model, its centring and rounds."""
    s.add_argument("--model", required=True, help="the starting LM, also the frozen reference")
    s.add_argument("--reward", required=True, help="reward model directory")
    s.add_argument("--out", required=True, help="LM checkpoint directory to write (must not exist)")
    s.add_argument("--beta", type=at_least(0.0, float), default=0.1, help="weight of KL(policy ‖ reference)")
    s.add_argument("--steps", type=positive(int), default=150, help="policy-gradient steps")
    s.add_argument("--samples-per-prompt", type=positive(int), default=4,
                   help="k samples per instruction (the leave-one-out baseline needs k >= 2)")
    s.add_argument("--prompts-per-step", type=positive(int), default=16, help="instructions per step")
    s.add_argument("--temperature", type=positive(float), default=1.0, help="sampling temperature")
    s.add_argument("--lr", type=positive(float), default=3e-4, help="AdamW learning rate")
    s.add_argument("--baseline", choices=BASELINES, default="loo",
                   help="b in (r − b)·(−log π): none (the raw reward), mean (batch mean), loo (leave-one-out)")
    s.add_argument("--centre", action="store_true",
                   help="first shift the reward model so the starting LM's own responses score mean 0")
    s.add_argument("--rm-rounds", type=at_least(0), default=0,
                   help="reward-model retraining rounds on the policy's own samples (needs --pairs)")
    s.add_argument("--pairs", help="the reward model's training pairs (kept when it is retrained)")
    s.add_argument("--algorithm", choices=ALGORITHMS, default="reinforce",
                   help="reinforce: one step per batch; ppo: clipped surrogate, advantages r − b; grpo: clipped, "
                        "group-normalised advantages")
    s.add_argument("--ppo-epochs", type=positive(int), default=4, help="optimizer steps per batch of samples (ppo, grpo)")
    s.add_argument("--clip-eps", type=fraction, default=0.2, help="ε of the clipped ratio (ppo, grpo)")
    s.add_argument("--kl-target", type=positive(float),
                   help="adapt β toward this KL per response (nats), Ziegler et al. 2019 (default: β fixed)")
    s.add_argument("--plot", action="store_true", help="also plot metrics.jsonl as OUT/metrics.png")


# ----------------------------------------------------------------------------- helpers
def fresh(path):
    """An output path must be new, in a writable folder: checked before any work starts."""
    if os.path.lexists(path):
        raise ValueError(f"--out {path!r} already exists: choose a new path (nothing is overwritten)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"--out {path!r}: folder {folder!r} does not exist or is not writable")
    return path


def save_atomically(path, save, message=None):
    """save(tmp) writes a checkpoint directory or a pairs file; it appears at `path` only once
    complete. Then prints `message` (default: "wrote PATH")."""
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    os.rename(tmp, path)
    print(message or f"wrote {path}")


def world_and_rng(args):
    from tinylm.rlhf.world import World
    return World(seed=0), np.random.default_rng(args.seed)


def save_with_metrics(path, save, records, panels, plot):
    """save_atomically(path, save) with metrics.jsonl (and metrics.png if plot) in the directory."""
    from tinylm.train.run_log import METRICS, plot_panels, write_metrics

    def save_all(tmp):
        save(tmp)
        write_metrics(os.path.join(tmp, METRICS), records)
        if plot:
            plot_panels(records, panels, os.path.join(tmp, "metrics.png"))
    save_atomically(path, save_all)


def load_lm(path):
    """A Hugging Face GPT-2 directory, a ckpt-* directory or a `tinylm pretrain` run (its latest)."""
    from tinylm.train.checkpoint import load_model
    return load_model(path)[0]


# ----------------------------------------------------------------------------- steps
def run_base(args):
    from tinylm.rlhf.environment import PretrainConfig, pretrain_base
    from tinylm.rlhf.pipeline import DemoConfig
    fresh(args.out)
    world, rng = world_and_rng(args)
    model = pretrain_base(world, DemoConfig().model, PretrainConfig(steps=args.steps), args.seed, rng)
    save_atomically(args.out, model.save_pretrained)


def run_pairs(args):
    from tinylm.rlhf.environment import make_pairs
    from tinylm.rlhf.world import Labeller
    fresh(args.out)
    world, rng = world_and_rng(args)
    model = load_lm(args.model)
    pairs = make_pairs(model, world.instructions(args.instructions, rng, heldout=args.heldout),
                       Labeller(args.noise, seed=args.seed), 7, rng)
    pairs.validate()
    save_atomically(args.out, pairs.save,
                    f"wrote {args.out}: {len(pairs)} labelled pairs from {args.instructions} instructions (ties dropped)")


def run_reward(args):
    from tinylm.rlhf.reward import RewardModel
    from tinylm.rlhf.policy import Preferences, reward_model_accuracy, train_reward_model
    fresh(args.out)
    _, rng = world_and_rng(args)
    pairs = Preferences.load(args.pairs)
    heldout = Preferences.load(args.heldout_pairs) if args.heldout_pairs else None
    rm = RewardModel.from_lm(load_lm(args.model))
    losses = train_reward_model(rm, pairs, args.epochs, 32, args.lr, rng)
    print(f"Bradley–Terry loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}; train accuracy "
          f"{reward_model_accuracy(rm, pairs):.3f}" + (f", held-out accuracy {reward_model_accuracy(rm, heldout):.3f}"
                                                     if heldout else ""))
    save_atomically(args.out, rm.save)


def run_judge(args):
    from dataclasses import replace

    from tinylm.rlhf.pipeline import DemoConfig, relabel, train_judge
    from tinylm.rlhf.policy import Preferences
    fresh(args.out)
    pairs = Preferences.load(args.pairs)
    world, rng = world_and_rng(args)
    judge = train_judge(world, replace(DemoConfig(), judge_steps=args.steps, seed=args.seed), rng)
    judged, agreement = relabel(judge, pairs)
    same = float(np.mean([np.array_equal(a, b) for a, b in zip(judged.chosen, pairs.chosen)]))
    save_atomically(args.out, judged.save,
                    f"wrote {args.out}: {judge.calls} judge calls, 0 labeller comparisons; the judge agrees with the "
                    f"file's labels on {same:.3f} of the pairs, with the noiseless labeller on {agreement:.3f}")


def run_policy(args):
    from tinylm.rlhf.environment import WorldTasks, reference_responses
    from tinylm.rlhf.reward import RewardModel
    from tinylm.rlhf.policy import PolicyConfig, Preferences, train_policy
    from tinylm.rlhf.world import Labeller
    fresh(args.out)
    pcfg = PolicyConfig(beta=args.beta, samples_per_prompt=args.samples_per_prompt, baseline=args.baseline,
                        prompts_per_step=args.prompts_per_step, temperature=args.temperature, lr=args.lr,
                        steps=args.steps, rm_rounds=args.rm_rounds, algorithm=args.algorithm,
                        ppo_epochs=args.ppo_epochs, clip_eps=args.clip_eps, kl_target=args.kl_target)
    if args.rm_rounds and not args.pairs:
        raise ValueError("--rm-rounds needs --pairs (the reward model's training pairs, kept when it is retrained)")
    world, rng = world_and_rng(args)
    base, rm = load_lm(args.model), RewardModel.load(args.reward)
    rm.check_vocab(base.config)
    pairs = Preferences.load(args.pairs) if args.pairs else None
    if args.centre:
        shift = rm.centre(*reference_responses(base, world, 500, pcfg.max_new_tokens, rng))
        print(f"centred the reward model: reward_bias moved by {shift:+.3f}")
    run = train_policy(base, rm, WorldTasks(world, Labeller(seed=args.seed)), pcfg, pairs, rng)
    last = run.history[-10:]
    print(f"last {len(last)} steps: reward {np.mean([h['reward'] for h in last]):.3f}, "
          f"KL {np.mean([h['kl'] for h in last]):.3f}, sample success {np.mean([h['success'] for h in last]):.3f}")
    save_with_metrics(args.out, run.policy.save_pretrained, run.history, POLICY_PANELS, args.plot)


def run_sft(args):
    from tinylm.rlhf.environment import demonstrations
    from tinylm.rlhf.policy import train_sft
    fresh(args.out)
    world, rng = world_and_rng(args)
    model = load_lm(args.model)
    losses = train_sft(model, *demonstrations(world.instructions(args.instructions, rng)), args.epochs, 32, args.lr, rng)
    print(f"SFT cross-entropy {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f} nats per response token on "
          f"{args.instructions} demonstrations")
    save_atomically(args.out, model.save_pretrained)


def run_dpo(args):
    from tinylm.rlhf.policy import Preferences, train_dpo
    fresh(args.out)
    _, rng = world_and_rng(args)
    pairs = Preferences.load(args.pairs)
    base = load_lm(args.model)
    policy = base.copy()
    records = []
    losses = train_dpo(policy, base, pairs, args.epochs, 32, args.lr, args.beta, rng,
                       lambda r: records.append({"step": len(records), **r}))
    last = records[-10:]
    print(f"DPO loss {losses[0]:.3f} (ln 2 = 0.693) -> {np.mean(losses[-10:]):.3f}; last {len(last)} steps: "
          f"reward margin {np.mean([r['reward_margin'] for r in last]):.3f}, implicit-reward accuracy "
          f"{np.mean([r['reward_accuracy'] for r in last]):.3f}")
    save_with_metrics(args.out, policy.save_pretrained, records, DPO_PANELS, args.plot)


def run_experiment(args, name):
    """One experiment of tinylm.experiments.rlhf_curves (its default or --quick config, over --seeds): print its
    table, write its JSON and its plot."""
    import json
    import time

    from tinylm.experiments.rlhf_curves import EXPERIMENTS
    for path in filter(None, (args.json, args.plot)):
        fresh(path)
    experiment = EXPERIMENTS[name]
    jobs = min(args.jobs or os.cpu_count() or 1, len(args.seeds))
    t0 = time.perf_counter()
    results = experiment.run(experiment.quick if args.quick else experiment.config(), args.seeds, jobs=jobs)
    results.update(jobs=jobs, wall_seconds=time.perf_counter() - t0)
    print(experiment.table(results))
    print(f"wall {results['wall_seconds']:.0f} s, seeds in {jobs} process{'es' if jobs > 1 else ''}"
          + (" (one BLAS thread each)" if jobs > 1 else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        experiment.plot(results, args.plot)
        print(f"wrote {args.plot}")


def run_compare(args):
    run_experiment(args, "compare")


def run_goodhart(args):
    run_experiment(args, "goodhart")


def run_labels(args):
    run_experiment(args, "labels")


EXPERIMENT_STEPS = (run_compare, run_goodhart, run_labels)


def run_eval(args):
    from tinylm.rlhf.environment import evaluate
    from tinylm.rlhf.reward import RewardModel
    world, rng = world_and_rng(args)
    model, reference, rm = load_lm(args.model), load_lm(args.reference), RewardModel.load(args.reward)
    rm.check_vocab(model.config)
    result = evaluate(model, reference, rm, world.instructions(args.instructions, rng, heldout=True), 2, 7, rng)
    print(f"labeller success {result['success']:.3f} | mean RM score {result['reward']:.3f} | "
          f"KL to reference {result['kl']:.3f}")
