"""The LM judge: preference labels from a language model instead of the labeller.

A small GPT is pretrained on "judged examples" that the world writes, e.g.

    rev cab: bac|cab?1        (the first response is the better one; "2": the second)

and then asked about a new pair by feeding the text up to "?" and comparing its probabilities of
the two verdict tokens at the last position: p("1") >= p("2") -> 0 (a is better), else 1. Comparing
logits is comparing probabilities (softmax is monotonic). It answers like Labeller.prefer, so
make_pairs takes either; it never ties, and `calls` counts what its labels cost.
"""
import numpy as np

from .world import instruction, score

VERDICTS = "12"                       # verdict characters: the first / the second response is better


def judged_text(task, letters, a, b, clip):
    """The judge's question for responses a and b (each cut to `clip` characters so the text fits
    n_ctx), ending at "?" where the verdict follows."""
    return f"{instruction(task, letters)} {a[:clip]}|{b[:clip]}?"


def read_verdict(logits, tokenizer):
    """logits (V,) at the verdict position -> 0 if the first verdict token is at least as likely
    as the second, else 1."""
    first, second = (tokenizer.encode(v)[0] for v in VERDICTS)
    return 0 if logits[first] >= logits[second] else 1


class JudgedExamples:
    """A corpus of judged examples from `world`: two continuations of one instruction with different
    scores, in random order, and the verdict naming the better one. Has World.corpus's signature,
    so pretrain_base trains the judge on it."""

    def __init__(self, world):
        self.world = world
        self.clip = world.max_answer_chars + 1

    def example(self, task, letters, rng):
        while True:
            a, b = self.world.continuation(task, letters, rng), self.world.continuation(task, letters, rng)
            sa, sb = score(task, letters, a[:self.clip]), score(task, letters, b[:self.clip])
            if sa != sb:
                return judged_text(task, letters, a, b, self.clip) + VERDICTS[int(sb > sa)]

    def corpus(self, n_docs, rng):
        return [self.example(t, s, rng) for t, s in self.world.instructions(n_docs, rng)]


class LMJudge:
    """A pretrained judge model answering Labeller.prefer's question from its own probabilities."""

    def __init__(self, model, tokenizer, clip):
        self.model, self.tokenizer, self.clip = model, tokenizer, clip
        self.calls = 0                # prefer() calls: one forward pass each

    def prefer(self, task, letters, a, b):
        self.calls += 1
        idx = np.array([self.tokenizer.encode(judged_text(task, letters, a, b, self.clip))])
        return read_verdict(np.asarray(self.model.forward(idx))[0, -1], self.tokenizer)
