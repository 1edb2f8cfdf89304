"""RLHF on top of the core model: preference pairs, reward-model training, REINFORCE with a KL
leash, and DPO. Every gradient is the core's `nll_backward` with per-token weights.

Policy gradient (REINFORCE). For k samples y_1..y_k of one instruction x, with rewards r_i from
the reward model and a baseline b_i:

    loss = Σ_i (r_i − b_i) · (−log π(y_i | x))          summed over response tokens only

The reward is a constant for backpropagation, so the gradient is (r − b) times the gradient of
−log π: gradient descent raises the probability of a response with r_i > b_i and lowers it when
r_i < b_i. PolicyConfig.baseline picks b (any b that does not depend on y_i leaves the gradient
unbiased, since E ∇log π = 0; it only changes the variance and which samples get pushed down):

    "none"  b = 0: the lecture's rule, reward × (−log p). A Bradley–Terry reward has an arbitrary
            offset, so its sign means something only once the reward model is centred
            (RewardModel.centre: reference responses score mean 0, as in InstructGPT).
    "mean"  b = the mean reward of the step's batch (per-batch centring; it includes r_i itself,
            a bias of order 1/batch that the leave-one-out baseline avoids).
    "loo"   b_i = the mean of the other k − 1 rewards for the same instruction (RLOO; k >= 2).

KL leash. KL(π ‖ π_ref) = E_{y∼π} Σ_t ℓ_t with ℓ_t = log π(y_t | ·) − log π_ref(y_t | ·), estimated
on the sampled tokens (the "k1" estimator; 0 when π = π_ref). Its gradient, by the score-function
rule and causality (a token cannot change the log-ratios before it), is

    ∇ KL = E Σ_t G_t · ∇ log π(y_t | ·),    G_t = Σ_{s ≥ t} ℓ_s   (the KL still to come)

(the other term, E Σ_t ∇ℓ_t = E Σ_t ∇ log π(y_t), is zero in expectation). So β·KL enters as the
per-token weight −β·G_t on −log π, and the total weight of response token t of sample i is

    w_{i,t} = (r_i − b_i) − β · G_{i,t}        (constants: nothing backpropagates into them)

tests/test_rlhf.py enumerates every response of a tiny model and checks by finite differences
that these weights give the exact gradient of E[r] − β·KL.

DPO. With the implicit reward β·(log π(y) − log π_ref(y)), the Bradley–Terry loss on a pair is
−log σ(β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]); its gradient puts weight
−β·σ(−margin)/N on every chosen token's −log π and +β·σ(−margin)/N on every rejected token's.
"""
import json
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from ..core.backend import to_numpy
from ..core.optim import Schedule, adamw_init, optimizer_step
from .reward import (Sequences, bradley_terry_backward, bradley_terry_forward, bradley_terry_loss_and_grads, pack,
                     pairwise_accuracy, stack_padded)

# ----------------------------------------------------------------------------- preference pairs
class PairBatch(NamedTuple):
    """A minibatch of preference pairs, packed: the chosen and the rejected sequences (prompt +
    response each, as reward.Sequences) and starts (N,), where each response begins (one prompt per pair)."""
    chosen: Sequences
    rejected: Sequences
    starts: np.ndarray


@dataclass
class Preferences:
    """Preference pairs: prompts[i] with responses chosen[i] preferred to rejected[i] (1-D token
    ids each). `instructions` keeps (task, letters) for evaluation; the trainers never read it."""
    prompts: list
    chosen: list
    rejected: list
    instructions: list

    def __len__(self):
        return len(self.prompts)

    def validate(self):
        """A preference set must be non-empty and every pair must compare two different responses."""
        if len(self) == 0:
            raise ValueError("the preference set is empty: need at least one (chosen, rejected) pair")
        if not len(self.chosen) == len(self.rejected) == len(self):
            raise ValueError(f"preference set: {len(self)} prompts but {len(self.chosen)} chosen and "
                             f"{len(self.rejected)} rejected responses")
        for i, (w, l) in enumerate(zip(self.chosen, self.rejected)):
            if len(w) == len(l) and np.array_equal(w, l):
                raise ValueError(f"preference pair {i} has identical chosen and rejected responses: "
                                 "it carries no preference")

    def subset(self, index):
        return Preferences(*([field[i] for i in index] for field in
                             (self.prompts, self.chosen, self.rejected, self.instructions)))

    def merged(self, other):
        """These pairs followed by other's."""
        return Preferences(self.prompts + other.prompts, self.chosen + other.chosen, self.rejected + other.rejected,
                           self.instructions + other.instructions)

    def packed(self, index=None):
        """The pairs (all, or those at index) as one PairBatch."""
        pairs = self if index is None else self.subset(index)
        chosen, rejected = pack(pairs.prompts, pairs.chosen), pack(pairs.prompts, pairs.rejected)
        return PairBatch(chosen.sequences, rejected.sequences, chosen.starts)

    def save(self, path):
        rows = [{"prompt": p.tolist(), "chosen": w.tolist(), "rejected": l.tolist(), "instruction": list(ins)}
                for p, w, l, ins in zip(self.prompts, self.chosen, self.rejected, self.instructions)]
        with open(path, "w") as f:
            json.dump(rows, f)

    @classmethod
    def load(cls, path):
        """Read a file written by save(); anything else is one ValueError naming the file."""
        try:
            with open(path) as f:
                rows = json.load(f)
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ValueError("expected a list of {prompt, chosen, rejected, instruction} objects")
            pairs = cls(*([np.array(r[k], dtype=np.int64) for r in rows] for k in ("prompt", "chosen", "rejected")),
                        [tuple(r["instruction"]) for r in rows])
            if not all(ids.ndim == 1 for ids in pairs.prompts + pairs.chosen + pairs.rejected):
                raise ValueError("prompt, chosen and rejected must be lists of token ids")
        except KeyError as e:
            raise ValueError(f"pairs file {path!r}: a pair has no {e} key") from None
        except (ValueError, TypeError) as e:      # JSONDecodeError is a ValueError
            raise ValueError(f"pairs file {path!r} is not a pairs file: {e}") from None
        pairs.validate()
        return pairs


# ----------------------------------------------------------------------------- sampling
def check_prompts(prompts, max_new_tokens, config):
    """Every instruction plus its longest response must fit in the context."""
    for i, p in enumerate(prompts):
        if len(p) < 1 or len(p) + max_new_tokens > config.n_ctx:
            raise ValueError(f"instruction {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} "
                             f"it needs 1..{config.n_ctx - max_new_tokens} tokens to fit n_ctx={config.n_ctx}")


def sample_responses(policy, prompts, max_new_tokens, temperature, rng, eot_id):
    """One sampled response per prompt: the generated ids up to and including the first eot_id
    (the policy also learns when to stop). Prompts of equal length are sampled as one batch."""
    from ..core.generate import generate
    check_prompts(prompts, max_new_tokens, policy.config)
    responses = [None] * len(prompts)
    for n in sorted({len(p) for p in prompts}):
        rows = [i for i, p in enumerate(prompts) if len(p) == n]
        out = to_numpy(generate(policy, np.stack([prompts[i] for i in rows]), max_new_tokens,
                                temperature=temperature, rng=rng, eot_id=eot_id))[:, n:]
        for i, ids in zip(rows, out):
            stop = np.flatnonzero(ids == eot_id)
            responses[i] = ids[:stop[0] + 1] if stop.size else ids
    return responses


def response_targets(idx, lengths, starts):
    """Inputs idx[:, :-1] and targets idx[:, 1:], with target −1 everywhere except on response
    tokens (positions starts..lengths−1), so log-probabilities and losses cover the response only."""
    inputs, targets = idx[:, :-1], idx[:, 1:].copy()
    pos = np.arange(targets.shape[1])[None, :] + 1           # position of each target in idx
    targets[(pos < starts[:, None]) | (pos >= lengths[:, None])] = -1
    return inputs, targets


# ----------------------------------------------------------------------------- policy gradient
def reward_baseline(rewards, k, kind):
    """rewards (N,), k consecutive samples per instruction -> b (N,) of the given kind (see the
    module docstring: "none", "mean" or "loo")."""
    if kind == "none":
        return np.zeros_like(rewards)
    if kind == "mean":
        return np.full_like(rewards, rewards.mean())
    return leave_one_out_baseline(rewards.reshape(-1, k)).reshape(-1)


def leave_one_out_baseline(rewards):
    """rewards (P, k), k samples of each of P prompts -> b (P, k), the mean of the other k − 1."""
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"a leave-one-out baseline needs samples_per_prompt >= 2, got {k}")
    return (rewards.sum(1, keepdims=True) - rewards) / (k - 1)


def kl_to_go(logratio, mask):
    """G_t = Σ_{s ≥ t} ℓ_s over response tokens.   logratio, mask (B, T) -> (B, T), 0 off the response.

    Weighting every token by the whole response's Σ_s ℓ_s would be unbiased too (E[ℓ_s ∇log π(y_t)]
    = 0 for s < t), but the earlier log-ratios only add noise to token t's weight."""
    ell = logratio * mask
    return np.cumsum(ell[:, ::-1], axis=1)[:, ::-1] * mask


def policy_token_weights(advantages, logratio, mask, beta):
    """w_{i,t} = (r_i − b_i) − β·G_{i,t} on response tokens, 0 elsewhere (see the module docstring)."""
    return (advantages[:, None] - beta * kl_to_go(logratio, mask)) * mask


def check_rewards(rewards):
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        raise ValueError(f"reward of sample {bad[0]} is {rewards[bad[0]]}: rewards must be finite numbers")


BASELINES = ("none", "mean", "loo")
ALGORITHMS = ("reinforce", "ppo", "grpo")


@dataclass
class PolicyConfig:
    beta: float = 0.1               # weight of the KL penalty to the reference
    samples_per_prompt: int = 4     # k samples of each instruction per step
    baseline: str = "loo"           # b in (r − b)·(−log π): "none", "mean" (batch) or "loo" (leave-one-out)
    prompts_per_step: int = 16
    temperature: float = 1.0
    lr: float = 3e-4
    steps: int = 150
    rm_rounds: int = 0              # reward-model retraining rounds on the policy's own samples
    max_new_tokens: int = 7
    rm_round_instructions: int = 600    # fresh pairs labelled for each round ...
    rm_round_epochs: int = 2            # ... and the epochs the reward model trains on old + fresh pairs
    algorithm: str = "reinforce"    # "reinforce" (one step per batch), "ppo" or "grpo" (clipped, ppo_epochs steps)
    ppo_epochs: int = 4             # optimizer steps on each batch of samples (ppo, grpo)
    clip_eps: float = 0.2           # ε of the clipped ratio (ppo, grpo)
    kl_target: float = None         # adaptive β toward this KL per response (nats; Ziegler et al. 2019), or fixed β
    kl_gain: float = 0.1            # the controller's K_β

    def __post_init__(self):
        if not (np.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.samples_per_prompt < (2 if self.baseline == "loo" else 1):
            raise ValueError(f"samples_per_prompt must be >= 2 for the leave-one-out baseline (>= 1 otherwise), "
                             f"got {self.samples_per_prompt}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("prompts_per_step", "steps", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rm_rounds < 0:
            raise ValueError(f"rm_rounds must be >= 0, got {self.rm_rounds}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.ppo_epochs < 1 or not 0 < self.clip_eps < 1:
            raise ValueError(f"need ppo_epochs >= 1 and 0 < clip_eps < 1, got {self.ppo_epochs} and {self.clip_eps}")
        if self.kl_target is not None and not (self.kl_target > 0 and self.beta > 0):
            raise ValueError(f"an adaptive KL needs kl_target > 0 and a starting beta > 0, got {self.kl_target} "
                             f"and {self.beta}")


@dataclass(frozen=True)
class RewardConfig:
    """Training a reward model on preference pairs (Bradley–Terry, AdamW without decay)."""
    epochs: int = 4
    validation: float = 0.1         # share of the pairs held back to pick the best epoch (early stopping)
    batch: int = 32
    lr: float = 1e-3


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on demonstrations (train_sft)."""
    epochs: int = 1
    batch: int = 32
    lr: float = 1e-3


@dataclass(frozen=True)
class DPOConfig:
    epochs: int = 1
    batch: int = 32
    lr: float = 5e-4
    beta: float = 0.1               # the implicit reward's scale β·(log π − log π_ref)


class PolicyLoss(NamedTuple):
    loss: float                     # the surrogate Σ w·(−log π) / N
    grads: dict
    kl: np.ndarray                  # per-sample KL estimate Σ_t ℓ_t
    advantages: np.ndarray          # per-sample r − b


def policy_loss_and_grads(policy, reference, inputs, targets, rewards, k, beta, baseline="loo"):
    """The REINFORCE + KL surrogate for one batch of k samples per prompt (rows grouped by prompt)
    -> PolicyLoss."""
    check_rewards(rewards)
    mask = (targets >= 0).astype(np.float64)
    nll, cache = policy.token_nll(inputs, targets)
    logratio = -to_numpy(nll).astype(np.float64) - to_numpy(reference.token_logprobs(inputs, targets))
    advantages = rewards - reward_baseline(rewards, k, baseline)
    weights = policy_token_weights(advantages, logratio, mask, beta) / len(rewards)
    grads = policy.nll_backward(policy.xp.asarray(weights, dtype=policy.config.dtype), cache)
    return PolicyLoss(float((weights * to_numpy(nll)).sum()), grads, (logratio * mask).sum(1), advantages)


# ----------------------------------------------------------------------------- PPO-clip and GRPO
def group_normalised_advantages(rewards, k):
    """GRPO's value-free advantage (Shao et al. 2024): each reward standardised within its group of k
    samples of one instruction, A_i = (r_i − mean_group) / (sd_group + 1e-8); 0 for a group of equal
    rewards (nothing to learn from it).   rewards (N,) -> (N,)"""
    groups = rewards.reshape(-1, k)
    return ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + 1e-8)).reshape(-1)


class SurrogateCache(NamedTuple):
    ratio: np.ndarray               # ρ = π / π_old per token (N, T)
    advantages: np.ndarray          # A per token (N, T), 0 off the response
    unclipped: np.ndarray           # 1 where the min takes ρ·A (the branch with a gradient)
    n: int                          # samples: the loss is a mean over them


def clipped_surrogate_forward(logp, logp_old, advantages, eps):
    """PPO's clipped objective as a loss (Schulman et al. 2017), summed over a sample's tokens:

        ρ_t = exp(log π(y_t) − log π_old(y_t)),   loss = −(1/N) Σ_{i,t} min(ρ_t·A_t, clip(ρ_t, 1−ε, 1+ε)·A_t)

    logp, logp_old, advantages (N, T), advantages 0 off the response -> loss, SurrogateCache."""
    ratio = np.exp(logp - logp_old)
    unclipped, clipped = ratio * advantages, np.clip(ratio, 1 - eps, 1 + eps) * advantages
    # The min picks the clipped branch (gradient 0) only where clipping lowers the objective: A > 0
    # with ρ > 1 + ε (already raised enough) or A < 0 with ρ < 1 − ε (already lowered enough). On the
    # other side (A > 0, ρ < 1 − ε) the unclipped branch is the smaller: the pessimistic bound keeps pushing.
    return (-float(np.minimum(unclipped, clipped).sum()) / len(logp),
            SurrogateCache(ratio, advantages, (unclipped <= clipped).astype(np.float64), len(logp)))


def clipped_surrogate_backward(cache):
    """-> ∂loss/∂log π (N, T) = −ρ·A·[unclipped]/N   (∂ρ/∂log π = ρ)."""
    return -cache.ratio * cache.advantages * cache.unclipped / cache.n


class ClippedLoss(NamedTuple):
    loss: float
    grads: dict
    clip_fraction: float            # share of response tokens whose clipped branch was taken


def clipped_loss_and_grads(policy, inputs, targets, token_advantages, logp_old, eps):
    """The clipped surrogate on one batch of the policy's samples; token_advantages and logp_old
    (N, T) were frozen when the samples were drawn. -> ClippedLoss."""
    mask = targets >= 0
    nll, cache = policy.token_nll(inputs, targets)
    logp = -to_numpy(nll).astype(np.float64)
    loss, c = clipped_surrogate_forward(logp, logp_old, token_advantages, eps)
    dnll = -clipped_surrogate_backward(c) * mask                 # ∂loss/∂(−log π) per token
    grads = policy.nll_backward(policy.xp.asarray(dnll, dtype=policy.config.dtype), cache)
    return ClippedLoss(loss, grads, float(1 - c.unclipped[mask].mean()))


def adaptive_kl_beta(beta, kl, target, gain=0.1):
    """Ziegler et al. 2019's proportional controller: e = clip(KL/target − 1, −0.2, 0.2),
    β ← β·(1 + gain·e): a KL above the target tightens the leash, one below loosens it."""
    return beta * (1 + gain * float(np.clip(kl / target - 1, -0.2, 0.2)))


def best_of_n(policy, rm, prompts, n, max_new_tokens, temperature, rng, eot_id):
    """The no-training baseline: n samples per prompt, keep the one the reward model scores highest.
    -> one response per prompt (n·len(prompts) reward-model scores)."""
    repeated = [p for p in prompts for _ in range(n)]
    responses = sample_responses(policy, repeated, max_new_tokens, temperature, rng, eot_id)
    batch = pack(repeated, responses)
    best = rm.rewards(batch.idx, batch.lengths).reshape(-1, n).argmax(1)
    return [responses[i * n + j] for i, j in enumerate(best)]


def policy_step(policy, reference, rm, opt_state, prompts, cfg, rng, eot_id, grad_clip=1.0, beta=None):
    """Sample k responses per prompt, score them with the reward model, then update the policy
    (optim.optimizer_step: clipped, AdamW at cfg.lr without decay, skipped if not finite): one step
    of REINFORCE, or cfg.ppo_epochs steps of the clipped surrogate (clipped_update). beta: the KL
    weight (default cfg.beta; the adaptive controller passes its own).
    -> dict with the mean reward, KL estimate, the samples (for logging and RM retraining) and
    each sample's advantage r − b (its sign: pushed up or down by the reward term)."""
    rm.check_vocab(policy.config)
    beta = cfg.beta if beta is None else beta
    repeated = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    responses = sample_responses(policy, repeated, cfg.max_new_tokens, cfg.temperature, rng, eot_id)
    batch = pack(repeated, responses)
    rewards = rm.rewards(batch.idx, batch.lengths).astype(np.float64)
    inputs, targets = response_targets(batch.idx, batch.lengths, batch.starts)
    if cfg.algorithm == "reinforce":
        out = policy_loss_and_grads(policy, reference, inputs, targets, rewards, cfg.samples_per_prompt, beta,
                                    cfg.baseline)
        optimizer_step(policy, out.grads, opt_state, Schedule.constant(cfg.lr), grad_clip, weight_decay=0.0,
                       loss=out.loss)
        clip_fraction = None
    else:
        out, clip_fraction = clipped_update(policy, reference, opt_state, inputs, targets, rewards, cfg, beta,
                                            grad_clip)
    return {"reward": float(rewards.mean()), "kl": float(out.kl.mean()), "responses": responses,
            "advantages": out.advantages, "clip_fraction": clip_fraction}


def clipped_update(policy, reference, opt_state, inputs, targets, rewards, cfg, beta, grad_clip):
    """PPO-clip or GRPO on one batch of samples: the sampling policy's log-probabilities and the
    per-token advantages are frozen first, then cfg.ppo_epochs optimizer steps on the clipped
    surrogate reuse the same samples. Advantages: ppo, r − b (cfg.baseline; no value head); grpo,
    group_normalised_advantages; both minus the KL-to-go β·G_t of the sampling-time log-ratios, as
    REINFORCE's weights (at ρ = 1 the first step is REINFORCE's). -> (PolicyLoss of the frozen
    batch, the mean clip fraction over the epochs)."""
    check_rewards(rewards)
    mask = (targets >= 0).astype(np.float64)
    logp_old = to_numpy(policy.token_logprobs(inputs, targets)).astype(np.float64)
    logratio = logp_old - to_numpy(reference.token_logprobs(inputs, targets))
    k = cfg.samples_per_prompt
    advantages = (group_normalised_advantages(rewards, k) if cfg.algorithm == "grpo"
                  else rewards - reward_baseline(rewards, k, cfg.baseline))
    token_advantages = policy_token_weights(advantages, logratio, mask, beta)
    clipped = []
    for _ in range(cfg.ppo_epochs):
        out = clipped_loss_and_grads(policy, inputs, targets, token_advantages, logp_old, cfg.clip_eps)
        optimizer_step(policy, out.grads, opt_state, Schedule.constant(cfg.lr), grad_clip, weight_decay=0.0,
                       loss=out.loss)
        clipped.append(out.clip_fraction)
    return PolicyLoss(out.loss, out.grads, (logratio * mask).sum(1), advantages), float(np.mean(clipped))


class PolicyRun(NamedTuple):
    """train_policy's result: the policy, the reward model it ended against (retrained if
    rm_rounds), and one history entry per step."""
    policy: object
    rm: object
    history: list

    def correct_pushed_down(self):
        """The mean over steps of the share of labeller-correct samples pushed down (None if none was correct)."""
        pushed = [h["correct_pushed_down"] for h in self.history if h["correct_pushed_down"] is not None]
        return float(np.mean(pushed)) if pushed else None


def train_policy(base, rm, env, cfg, pairs, rng, reward=RewardConfig(), progress=True, desc="rlhf"):
    """cfg.algorithm (REINFORCE, PPO-clip or GRPO) + KL leash from `base` (also the frozen reference)
    against `rm`, on env's instructions; with cfg.kl_target, β follows adaptive_kl_beta after every step. With cfg.rm_rounds > 0 the reward model is retrained that many times, evenly
    spaced, on fresh pairs that set the current policy's sample against the reference's (so ties
    with itself do not starve the round), added to the old pairs, for cfg.rm_round_epochs epochs.

    env (environment.WorldTasks): env.prompts(n, rng) -> (instructions, prompt ids); env.pairs(model,
    n, max_new_tokens, rng, against) -> fresh labelled Preferences; env.success(instructions,
    responses) -> the labeller's verdict per response; env.eot_id.
    -> PolicyRun; history: per step the mean reward, KL, labeller success of the samples, their
    number, β, the clip fraction (None for REINFORCE), and the share of labeller-correct samples whose advantage r − b was negative (pushed down)."""
    policy, opt = base.copy(), adamw_init(base.params)
    retrain_at = {int(cfg.steps * (i + 1) / (cfg.rm_rounds + 1)) for i in range(cfg.rm_rounds)}
    history, beta = [], cfg.beta
    for step in tqdm(range(cfg.steps), desc=desc, disable=None if progress else True, leave=False):
        if step in retrain_at:
            pairs = pairs.merged(env.pairs(policy, cfg.rm_round_instructions, cfg.max_new_tokens, rng, against=base))
            train_reward_model(rm, pairs, cfg.rm_round_epochs, reward.batch, reward.lr, rng)
        instructions, prompts = env.prompts(cfg.prompts_per_step, rng)
        out = policy_step(policy, base, rm, opt, prompts, cfg, rng, env.eot_id, beta=beta)
        correct = env.success([ins for ins in instructions for _ in range(cfg.samples_per_prompt)], out["responses"])
        history.append({"step": step, "reward": out["reward"], "kl": out["kl"], "success": float(correct.mean()),
                        "samples": len(correct), "beta": beta, "clip_fraction": out["clip_fraction"],
                        "correct_pushed_down": float((out["advantages"][correct] < 0).mean()) if correct.any() else None})
        if cfg.kl_target is not None:
            beta = adaptive_kl_beta(beta, out["kl"], cfg.kl_target, cfg.kl_gain)
    return PolicyRun(policy, rm, history)


# ----------------------------------------------------------------------------- DPO
class DPOLoss(NamedTuple):
    loss: float
    grads: dict
    chosen_logratio: np.ndarray     # log π(y_w) − log π_ref(y_w) per pair
    rejected_logratio: np.ndarray   # log π(y_l) − log π_ref(y_l) per pair
    chosen_logp: np.ndarray         # log π(y_w) per pair
    rejected_logp: np.ndarray       # log π(y_l) per pair


def dpo_loss_and_grads(policy, batch, ref_logratio_terms, beta):
    """DPO on a PairBatch; ref_logratio_terms: (log π_ref(y_w), log π_ref(y_l)) per pair. -> DPOLoss."""
    chosen, rejected = batch.chosen, batch.rejected
    n = len(chosen.lengths)
    inputs, targets = response_targets(stack_padded(chosen.idx, rejected.idx),
                                       np.concatenate([chosen.lengths, rejected.lengths]),
                                       np.concatenate([batch.starts, batch.starts]))
    nll, cache = policy.token_nll(inputs, targets)
    logp = -to_numpy(nll).astype(np.float64).sum(1)
    ref_w, ref_l = ref_logratio_terms
    # DPO is Bradley–Terry on the implicit rewards β·(log π − log π_ref).
    loss, margin = bradley_terry_forward(beta * (logp[:n] - ref_w), beta * (logp[n:] - ref_l))
    dr_w, dr_l = bradley_terry_backward(margin)
    dlogp = beta * np.concatenate([dr_w, dr_l])                 # ∂loss/∂log π(y) per sequence
    weights = -dlogp[:, None] * (targets >= 0)                   # ∂loss/∂(−log π(y_t)) per token
    grads = policy.nll_backward(policy.xp.asarray(weights, dtype=policy.config.dtype), cache)
    return DPOLoss(loss, grads, logp[:n] - ref_w, logp[n:] - ref_l, logp[:n], logp[n:])


def dpo_diagnostics(out, beta):
    """What TRL logs per DPO step, from one batch before its update: the mean log π of the chosen and
    the rejected responses, their implicit rewards β·(log π − log π_ref), the reward margin, and the
    implicit-reward accuracy (the share of pairs whose chosen response has the higher implicit reward;
    0 at the start, where every margin is exactly 0)."""
    reward_w, reward_l = beta * out.chosen_logratio, beta * out.rejected_logratio
    return {"loss": out.loss, "logp_chosen": float(out.chosen_logp.mean()),
            "logp_rejected": float(out.rejected_logp.mean()), "reward_chosen": float(reward_w.mean()),
            "reward_rejected": float(reward_l.mean()), "reward_margin": float((reward_w - reward_l).mean()),
            "reward_accuracy": float((reward_w > reward_l).mean())}


def sequence_logprobs(model, batch):
    """log π(y_w | x) and log π(y_l | x) summed over response tokens, per pair of a PairBatch."""
    return tuple(to_numpy(model.token_logprobs(*response_targets(half.idx, half.lengths, batch.starts)))
                 .astype(np.float64).sum(1) for half in (batch.chosen, batch.rejected))


# ----------------------------------------------------------------------------- training loops
def optimise_on_pairs(model, pairs, epochs, batch_size, lr, rng, loss_and_grads, desc, after_epoch=None):
    """optimise over shuffled minibatches of preference pairs: loss_and_grads(PairBatch) -> (loss, grads)."""
    pairs.validate()
    return optimise(model, len(pairs), epochs, batch_size, lr, rng, lambda index: loss_and_grads(pairs.packed(index)),
                    desc, after_epoch)


def optimise(model, n, epochs, batch_size, lr, rng, loss_and_grads, desc, after_epoch=None):
    """optim.optimizer_step (no weight decay, gradients clipped to norm 1, constant lr) on model
    over shuffled minibatches of n items; loss_and_grads(index) -> (loss, grads) for the items at
    index; after_epoch(epoch), if given, runs after each epoch (validation, snapshots).
    -> list of per-step losses."""
    opt, schedule = adamw_init(model.params), Schedule.constant(lr)
    losses = []
    for epoch in tqdm(range(epochs), desc=desc, disable=None, leave=False):
        for index in np.array_split(rng.permutation(n), max(1, -(-n // batch_size))):
            loss, grads = loss_and_grads(index)
            optimizer_step(model, grads, opt, schedule, 1.0, weight_decay=0.0, loss=loss)
            losses.append(loss)
        if after_epoch is not None:
            after_epoch(epoch)
    return losses


def train_sft(model, prompts, demonstrations, epochs, batch_size, lr, rng):
    """Supervised fine-tuning: the core's next-token cross-entropy (GPT.loss_and_grads, a mean over
    the valid targets) on demonstration responses only — the prompt tokens get target −1, so the
    model learns to answer, not to write instructions. prompts, demonstrations: lists of 1-D ids.
    -> list of per-step losses."""
    if not prompts or len(prompts) != len(demonstrations):
        raise ValueError(f"SFT needs one demonstration per prompt and at least one: got {len(prompts)} prompts "
                         f"and {len(demonstrations)} demonstrations")

    def loss_and_grads(index):
        batch = pack([prompts[i] for i in index], [demonstrations[i] for i in index])
        return model.loss_and_grads(*response_targets(batch.idx, batch.lengths, batch.starts))
    return optimise(model, len(prompts), epochs, batch_size, lr, rng, loss_and_grads, "sft")


def train_reward_model(rm, pairs, epochs, batch_size, lr, rng, after_epoch=None):
    """Bradley–Terry training of `rm` on `pairs`; -> list of per-step losses."""
    def loss_and_grads(batch):
        out = bradley_terry_loss_and_grads(rm, batch.chosen, batch.rejected)
        return out.loss, out.grads
    return optimise_on_pairs(rm, pairs, epochs, batch_size, lr, rng, loss_and_grads, "reward model",
                             after_epoch)


def train_reward_model_early_stopping(rm, pairs, validation, epochs, batch_size, lr, rng):
    """train_reward_model, measuring accuracy on held-back `validation` pairs after each epoch; rm
    ends with the weights of the best epoch (the first of equals), so a late epoch that overfits
    the noisy labels is undone. -> per-epoch validation accuracies."""
    accuracies, best = [], {}

    def after_epoch(epoch):
        accuracies.append(reward_model_accuracy(rm, validation))
        if accuracies[-1] > max(accuracies[:-1], default=-1.0):
            best.update({k: v.copy() for k, v in rm.params.items()})
    train_reward_model(rm, pairs, epochs, batch_size, lr, rng, after_epoch)
    for k, v in best.items():
        rm.params[k][...] = v                  # in place: rm.params shares its arrays with the trunk
    return accuracies


def reward_model_accuracy(rm, pairs, batch_size=256):
    """Held-out pairwise accuracy: the fraction of pairs with r(chosen) > r(rejected)."""
    pairs.validate()
    r_w, r_l = [], []
    for i in range(0, len(pairs), batch_size):
        batch = pairs.packed(range(i, min(i + batch_size, len(pairs))))
        r_w.append(rm.rewards(batch.chosen.idx, batch.chosen.lengths))
        r_l.append(rm.rewards(batch.rejected.idx, batch.rejected.lengths))
    return pairwise_accuracy(np.concatenate(r_w), np.concatenate(r_l))


def train_dpo(policy, reference, pairs, epochs, batch_size, lr, beta, rng, on_step=None):
    """DPO on `pairs` from `reference`; on_step(record), if given, gets each step's
    dpo_diagnostics. -> list of per-step losses."""
    if policy.config.vocab_size != reference.config.vocab_size:
        raise ValueError(f"policy vocab_size={policy.config.vocab_size} differs from the reference's "
                         f"{reference.config.vocab_size}")
    def loss_and_grads(batch):
        out = dpo_loss_and_grads(policy, batch, sequence_logprobs(reference, batch), beta)
        if on_step is not None:
            on_step(dpo_diagnostics(out, beta))
        return out.loss, out.grads
    return optimise_on_pairs(policy, pairs, epochs, batch_size, lr, rng, loss_and_grads, "dpo")
