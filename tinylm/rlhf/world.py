"""A synthetic instruction-following world: no download, and a program knows every right answer.

An instruction is `"<task> <letters>:"`, e.g. `"rev cab:"`; its right answer is the task applied to
the letters, e.g. `"bac"`. Five task families:

    cpy  copy       "cpy cab:" -> "cab"        upp  uppercase  "upp cab:" -> "CAB"
    rev  reverse    "rev cab:" -> "bac"        len  length     "len cab:" -> "3"
    srt  sort       "srt cab:" -> "abc"

The pretraining corpus imitates internet text: an instruction is followed by its right answer only
`p_follow` of the time (default 0.35); otherwise by another plausible continuation — the answer to a
different task on the same letters, the start of another instruction (a forum post that lists
questions), or unrelated letters. So the pretrained model can do every task but follows the
instruction only sometimes: exactly the gap RLHF closes.

The labeller stands in for the human: a graded score (exact 1 > near miss 0.5 > unrelated 0), a
preference between two responses that is flipped with probability `noise`, and a success test. The
policy never sees it; it only trains the reward model and measures results.
"""
import itertools

import numpy as np

LETTERS = "abcde"
TASKS = {
    "cpy": lambda s: s,
    "rev": lambda s: s[::-1],
    "srt": lambda s: "".join(sorted(s)),
    "upp": lambda s: s.upper(),
    "len": lambda s: str(len(s)),
}


def instruction(task, letters):
    """The prompt text, e.g. instruction("rev", "cab") == "rev cab:"."""
    return f"{task} {letters}:"


def answer(task, letters):
    """The right answer, e.g. answer("rev", "cab") == "bac"."""
    return TASKS[task](letters)


class World:
    """Every instruction (task, letters) with 2..max_len letters, split once into train and held-out
    sets by a seeded shuffle, so the held-out letter strings are never seen in pretraining or RL."""

    def __init__(self, seed=0, min_len=2, max_len=3, heldout_fraction=0.2, p_follow=0.35):
        if not 1 <= min_len <= max_len <= 9:
            raise ValueError(f"need 1 <= min_len <= max_len <= 9 (length answers are one digit), "
                             f"got min_len={min_len}, max_len={max_len}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        if not 0.0 <= p_follow <= 1.0:
            raise ValueError(f"p_follow must be in [0, 1], got {p_follow}")
        self.p_follow = p_follow
        strings = ["".join(t) for n in range(min_len, max_len + 1) for t in itertools.product(LETTERS, repeat=n)]
        rng = np.random.default_rng(seed)
        rng.shuffle(strings)
        n_held = max(1, int(len(strings) * heldout_fraction))
        self.heldout_letters, self.train_letters = strings[:n_held], strings[n_held:]
        self.max_prompt_chars = len(instruction("cpy", "a" * max_len))
        self.max_answer_chars = max_len

    def instructions(self, n, rng, heldout=False):
        """n random (task, letters) pairs from the train or the held-out split."""
        pool = self.heldout_letters if heldout else self.train_letters
        tasks = list(TASKS)
        return [(tasks[rng.integers(len(tasks))], pool[rng.integers(len(pool))]) for _ in range(n)]

    def continuation(self, task, letters, rng):
        """What follows an instruction in the corpus: the right answer with probability p_follow,
        otherwise one of three plausible wrong continuations, equally often."""
        u = rng.random()
        if u < self.p_follow:
            return answer(task, letters)
        kind = rng.integers(3)
        if kind == 0:                                   # the right letters, the wrong task
            other = [t for t in TASKS if answer(t, letters) != answer(task, letters)]
            return answer(other[rng.integers(len(other))], letters)
        if kind == 1:                                   # more instructions instead of an answer
            other_letters = self.train_letters[rng.integers(len(self.train_letters))]
            return instruction(list(TASKS)[rng.integers(len(TASKS))], other_letters)
        n = int(rng.integers(1, self.max_answer_chars + 1))
        return "".join(LETTERS[i] for i in rng.integers(len(LETTERS), size=n))

    def corpus(self, n_docs, rng):
        """n_docs pretraining documents, each an instruction and its continuation (train split only)."""
        return [instruction(t, s) + self.continuation(t, s, rng) for t, s in self.instructions(n_docs, rng)]


# ----------------------------------------------------------------------------- the labeller
def edit_distance(a, b):
    """Levenshtein distance (insertions, deletions, substitutions), by dynamic programming."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def score(task, letters, response):
    """Graded quality: 1.0 exact; 0.5 near miss (the right letters in the wrong order or case, or
    one edit away from a multi-character answer); 0.0 unrelated."""
    right = answer(task, letters)
    if response == right:
        return 1.0
    if sorted(response.lower()) == sorted(right.lower()) or (len(right) > 1 and edit_distance(response, right) == 1):
        return 0.5
    return 0.0


class Labeller:
    """The stand-in human. prefer() returns 0 if response a is better, 1 if b is, None on a tie
    (a person shown two equally good answers gives no label); with probability `noise` the label
    is flipped, as real annotators disagree with themselves. `comparisons` counts the calls."""

    def __init__(self, noise=0.1, seed=0):
        if not 0.0 <= noise < 0.5:
            raise ValueError(f"label noise must be in [0, 0.5), got {noise}")
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.comparisons = 0            # prefer() calls: what the labels cost, ties included

    def prefer(self, task, letters, a, b):
        self.comparisons += 1
        sa, sb = score(task, letters, a), score(task, letters, b)
        if sa == sb:
            return None
        label = 0 if sa > sb else 1
        return 1 - label if self.rng.random() < self.noise else label

    @staticmethod
    def success(task, letters, response):
        """The measured result: did the response follow the instruction exactly?"""
        return response == answer(task, letters)
