"""The instruction world (world.py) as RLHF sees it: instructions as token ids, a base LM pretrained
on its corpus, labelled preference pairs, the labeller's verdict on a response, and the measurements
of a trained policy. rlhf.py's library works on token ids; this module is where the world's text
meets them (through the byte tokenizer)."""
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..core.backend import to_numpy
from ..core.model import GPT
from ..core.optim import Schedule, adamw_init, train_step
from .reward import pack
from .policy import Preferences, response_targets, sample_responses
from ..core.tokenizer import ByteTokenizer
from .world import Labeller, answer, instruction, score

TOKENIZER = ByteTokenizer()


def encode_prompts(instructions):
    return [TOKENIZER.encode(instruction(task, letters)) for task, letters in instructions]


# ----------------------------------------------------------------------------- the base LM
@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 2500
    batch: int = 64
    lr: float = 3e-3


def pretrain_base(corpus, model_config, cfg, seed, rng, progress=True):
    """The base LM: next-token prediction on corpus.corpus(n, rng)'s documents, one per row (so an
    instruction starts at position 0, as at sampling time), padded targets −1; warm-up over a
    twentieth of the steps, then cosine to lr/10."""
    model = GPT(model_config, seed=seed)
    opt, schedule = adamw_init(model.params), Schedule(cfg.lr, cfg.steps, cfg.steps // 20, cfg.lr / 10)
    for _ in tqdm(range(cfg.steps), desc="pretrain", disable=None if progress else True, leave=False):
        docs = [np.append(TOKENIZER.encode(d)[:model_config.n_ctx], TOKENIZER.eot_id)
                for d in corpus.corpus(cfg.batch, rng)]
        batch = pack(docs, [np.zeros(0, np.int64)] * len(docs))
        real = np.arange(batch.idx.shape[1] - 1)[None] + 1 < batch.lengths[:, None]   # target inside the document
        train_step(model, opt, batch.idx[:, :-1], np.where(real, batch.idx[:, 1:], -1), schedule)
    return model


# ----------------------------------------------------------------------------- pairs and verdicts
def make_pairs(model, instructions, labeller, max_new_tokens, rng, temperature=1.0, against=None):
    """Two samples per instruction, both from `model` or one from it and one from `against`; the
    labeller picks one. Ties are dropped (no label)."""
    prompts = encode_prompts(instructions)
    if against is None:
        responses = sample_responses(model, prompts + prompts, max_new_tokens, temperature, rng, TOKENIZER.eot_id)
    else:
        responses = (sample_responses(model, prompts, max_new_tokens, temperature, rng, TOKENIZER.eot_id)
                     + sample_responses(against, prompts, max_new_tokens, temperature, rng, TOKENIZER.eot_id))
    return label_pairs(labeller, instructions, prompts, responses[:len(prompts)], responses[len(prompts):])


def label_pairs(labeller, instructions, prompts, first, second):
    """Ask `labeller` (a Labeller or an LMJudge) about each (first[i], second[i]) token-id pair;
    -> Preferences of the labelled pairs (ties, None, dropped)."""
    pairs = Preferences([], [], [], [])
    for (task, letters), prompt, a, b in zip(instructions, prompts, first, second):
        choice = labeller.prefer(task, letters, TOKENIZER.decode(a), TOKENIZER.decode(b))
        if choice is not None:
            pairs.prompts.append(prompt)
            pairs.chosen.append(a if choice == 0 else b)
            pairs.rejected.append(b if choice == 0 else a)
            pairs.instructions.append((task, letters))
    return pairs


def demonstrations(instructions):
    """What the world can write for supervised fine-tuning: each instruction's right answer ending in
    end-of-text — the completion the labeller prefers to every other (it alone scores 1).
    -> (prompt ids, response ids), one each per instruction."""
    return encode_prompts(instructions), [np.append(TOKENIZER.encode(answer(t, s)), TOKENIZER.eot_id)
                                          for t, s in instructions]


def true_order(pairs):
    """The same pairs with the label noise removed: chosen is the response with the higher score."""
    flipped = [score(t, s, TOKENIZER.decode(w)) < score(t, s, TOKENIZER.decode(l))
               for (t, s), w, l in zip(pairs.instructions, pairs.chosen, pairs.rejected)]
    return Preferences(pairs.prompts, [l if f else w for f, w, l in zip(flipped, pairs.chosen, pairs.rejected)],
                       [w if f else l for f, w, l in zip(flipped, pairs.chosen, pairs.rejected)], pairs.instructions)


def successes(instructions, responses):
    """The labeller's verdict on each response: exactly right or not (a bool array)."""
    return np.array([Labeller.success(t, s, TOKENIZER.decode(r)) for (t, s), r in zip(instructions, responses)])


class WorldTasks:
    """What rlhf.train_policy asks of the world: prompts to sample on, fresh labelled pairs for the
    reward model's retraining rounds (from `labeller`: a Labeller or an LMJudge), and the
    (noiseless) labeller's verdict on the samples."""
    eot_id = TOKENIZER.eot_id

    def __init__(self, world, labeller):
        self.world, self.labeller = world, labeller

    def prompts(self, n, rng):
        instructions = self.world.instructions(n, rng)
        return instructions, encode_prompts(instructions)

    def pairs(self, model, n, max_new_tokens, rng, against=None):
        return make_pairs(model, self.world.instructions(n, rng), self.labeller, max_new_tokens, rng, against=against)

    def success(self, instructions, responses):
        return successes(instructions, responses)


class LabellerReward:
    """The labeller queried directly as the reward: score(task, letters, response) of every sequence
    (1 exact, 0.5 near miss, 0 unrelated), read back from the token ids — the "human in the loop at
    every step". Has RewardModel's rewards() and check_vocab(), so train_policy takes it in an RM's
    place; `queries` counts the responses it scored."""

    def __init__(self):
        self.queries = 0

    def check_vocab(self, policy_config):
        if policy_config.vocab_size != TOKENIZER.vocab_size:
            raise ValueError(f"the labeller reads byte-tokenized text (vocab_size {TOKENIZER.vocab_size}), "
                             f"not vocab_size={policy_config.vocab_size}")

    def rewards(self, idx, lengths):
        self.queries += len(idx)
        texts = [TOKENIZER.decode(row[:n]) for row, n in zip(idx, lengths)]
        # "task letters:response": the instruction ends at its first ':' (letters never contain one)
        parts = [(text.split(":", 1)[0].split(" "), text.split(":", 1)[1]) for text in texts]
        return np.array([score(task, letters, response) for (task, letters), response in parts])


# ----------------------------------------------------------------------------- measurement
def evaluate(policy, reference, rm, instructions, samples, max_new_tokens, rng):
    """Sample `samples` responses per instruction at temperature 1 and measure: the labeller's
    success rate (exact answers), the mean reward-model score, and KL(policy ‖ reference) — the
    mean over samples of Σ_t (log π − log π_ref) on the response tokens (nats per response)."""
    repeated = [ins for ins in instructions for _ in range(samples)]
    prompts = encode_prompts(repeated)
    responses = sample_responses(policy, prompts, max_new_tokens, 1.0, rng, TOKENIZER.eot_id)
    batch = pack(prompts, responses)
    inputs, targets = response_targets(batch.idx, batch.lengths, batch.starts)
    kl = (to_numpy(policy.token_logprobs(inputs, targets)) - to_numpy(reference.token_logprobs(inputs, targets)))
    return {"success": float(np.mean(successes(repeated, responses))),
            "reward": float(rm.rewards(batch.idx, batch.lengths).mean()), "kl": float(kl.sum(1).mean())}


def examples(model, instructions, max_new_tokens, seed, n=8):
    """A few sampled responses, "instruction -> response", to show what a stage learned (its own
    random stream, so printing examples changes no other number)."""
    responses = sample_responses(model, encode_prompts(instructions[:n]), max_new_tokens, 1.0,
                                 np.random.default_rng(seed + 1), TOKENIZER.eot_id)
    return [f"{instruction(t, s)} -> {TOKENIZER.decode(r)!r}" for (t, s), r in zip(instructions, responses)]


def reference_responses(model, world, n, max_new_tokens, rng):
    """One sampled response to each of n training instructions, packed: the sequences to centre a
    reward model on (RewardModel.centre(idx, lengths))."""
    prompts = encode_prompts(world.instructions(n, rng))
    return pack(prompts, sample_responses(model, prompts, max_new_tokens, 1.0, rng, TOKENIZER.eot_id)).sequences
