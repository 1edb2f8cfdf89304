"""The LM judge (tinylm/rlhf/judge.py): verdict reading, call counting, and that judge labels train a
reward model. A judge reading its verdict backwards (planted: swap VERDICTS' meaning) fails
test_read_verdict_hand_built and test_judge_labels_train_a_reward_model."""
import numpy as np

from tinylm import GPT, GPTConfig
from tinylm.rlhf.judge import VERDICTS, JudgedExamples, LMJudge, judged_text, read_verdict
from tinylm.rlhf.environment import TOKENIZER, encode_prompts, label_pairs
from tinylm.rlhf.reward import RewardModel
from tinylm.rlhf.policy import reward_model_accuracy, train_reward_model
from tinylm.rlhf.world import Labeller, World, answer, score

ONE, TWO = (TOKENIZER.encode(v)[0] for v in VERDICTS)


def test_read_verdict_hand_built():
    logits = np.zeros(TOKENIZER.vocab_size)
    logits[ONE], logits[TWO] = 2.0, -1.0
    assert read_verdict(logits, TOKENIZER) == 0
    logits[ONE], logits[TWO] = -1.0, 2.0
    assert read_verdict(logits, TOKENIZER) == 1
    logits[TWO] = 99.0 - 1e9                   # other tokens' logits are ignored; only the two compared
    logits[TOKENIZER.encode("x")[0]] = 50.0
    assert read_verdict(logits, TOKENIZER) == 0


class OracleModel:
    """A stand-in LM whose last-position logits favour "1" when the text's first response is the
    right answer: it lets the tests check the judge's plumbing without pretraining one."""

    def forward(self, idx):
        text = TOKENIZER.decode(idx[0])
        head, rest = text.split(": ", 1)
        task, letters = head.split(" ")
        first, second = rest[:-1].split("|")
        logits = np.zeros((1, idx.shape[1], TOKENIZER.vocab_size))
        logits[0, -1, ONE if score(task, letters, first) >= score(task, letters, second) else TWO] = 1.0
        return logits


def test_judged_examples_name_the_better_response():
    world, rng = World(), np.random.default_rng(0)
    for doc in JudgedExamples(world).corpus(50, rng):
        head, rest = doc.split(": ", 1)
        task, letters = head.split(" ")
        first, second = rest[:-2].split("|")
        better = score(task, letters, first) > score(task, letters, second)
        assert rest[-1] == VERDICTS[0 if better else 1]
        assert len(TOKENIZER.encode(doc)) <= 24            # fits the demo's n_ctx


def test_judge_counts_calls_and_answers_like_the_labeller():
    judge = LMJudge(OracleModel(), TOKENIZER, clip=4)
    assert judge.prefer("rev", "cab", "bac", "cab") == 0
    assert judge.prefer("rev", "cab", "zz", "bac") == 1
    assert judge.calls == 2
    assert judged_text("rev", "cab", "bacxxx", "c", 4) == "rev cab: bacx|c?"


def test_judge_labels_train_a_reward_model():
    """Right answer vs a wrong one, order shuffled, labelled by the judge: a tiny reward model
    trained on those labels ranks held-out pairs as the noiseless labeller does."""
    world, rng = World(), np.random.default_rng(0)
    judge = LMJudge(OracleModel(), TOKENIZER, clip=4)

    def labelled(n, heldout, labeller):
        ins = world.instructions(n, rng, heldout=heldout)
        right = [answer(t, s) for t, s in ins]
        wrong = [w[::-1] + "q" for w in right]
        swap = rng.random(n) < 0.5
        first = [TOKENIZER.encode(w if f else r) for f, r, w in zip(swap, right, wrong)]
        second = [TOKENIZER.encode(r if f else w) for f, r, w in zip(swap, right, wrong)]
        return label_pairs(labeller, ins, encode_prompts(ins), first, second)

    train, held = labelled(300, False, judge), labelled(100, True, Labeller(noise=0.0))
    assert judge.calls == 300 and len(train) == 300               # the judge never ties
    rm = RewardModel.from_lm(GPT(GPTConfig(vocab_size=TOKENIZER.vocab_size, n_ctx=24, n_layer=1, n_head=2,
                                           d_model=32), seed=0))
    train_reward_model(rm, train, epochs=3, batch_size=32, lr=3e-3, rng=rng)
    assert reward_model_accuracy(rm, held) > 0.8
