"""The labeller of the synthetic world (tinylm/rlhf/world.py): graded scores, ties without a label,
label noise at its stated rate, and a held-out split disjoint from the training letters."""
import numpy as np
import pytest

from tinylm.rlhf.world import LETTERS, Labeller, World, answer, edit_distance, instruction, score


def test_answers_and_prompt_text_follow_each_task():
    assert instruction("rev", "cab") == "rev cab:"
    assert [answer(t, "cab") for t in ("cpy", "rev", "srt", "upp", "len")] == ["cab", "bac", "abc", "CAB", "3"]


@pytest.mark.parametrize("a, b, distance", [("", "", 0), ("abc", "abc", 0), ("abc", "abd", 1), ("abc", "ab", 1),
                                            ("ab", "cab", 1), ("abc", "cba", 2), ("", "abc", 3), ("kitten", "sitting", 3)])
def test_edit_distance_counts_insertions_deletions_substitutions(a, b, distance):
    assert edit_distance(a, b) == distance == edit_distance(b, a)


@pytest.mark.parametrize("task, letters, response, expected", [
    ("rev", "cab", "bac", 1.0),      # exact
    ("rev", "cab", "abc", 0.5),      # right letters, wrong order
    ("upp", "cab", "cab", 0.5),      # right letters, wrong case
    ("upp", "cab", "CAD", 0.5),      # one edit away from a multi-character answer
    ("rev", "cab", "ba", 0.5),       # one deletion away
    ("rev", "cab", "dd", 0.0),       # unrelated
    ("len", "cab", "4", 0.0),        # one edit from a one-character answer is not a near miss
    ("len", "cab", "", 0.0),
])
def test_score_grades_exact_near_miss_and_unrelated(task, letters, response, expected):
    assert score(task, letters, response) == expected


def test_prefer_labels_the_better_response_and_gives_no_label_on_a_tie():
    labeller = Labeller(noise=0.0)
    assert labeller.prefer("rev", "cab", "bac", "abc") == 0
    assert labeller.prefer("rev", "cab", "dd", "abc") == 1
    assert labeller.prefer("rev", "cab", "abc", "cba") is None      # both near misses
    assert labeller.success("rev", "cab", "bac") and not labeller.success("rev", "cab", "BAC")


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_label_noise_flips_at_its_rate(noise):
    labeller = Labeller(noise=noise, seed=3)
    n = 4000
    flipped = sum(labeller.prefer("rev", "cab", "bac", "dd") == 1 for _ in range(n))
    # binomial sd = sqrt(n p (1-p)) <= 29: 5 sd either side
    assert abs(flipped - noise * n) < 5 * np.sqrt(n * noise * (1 - noise))


@pytest.mark.parametrize("seed", [0, 1])
def test_heldout_split_is_disjoint_covers_every_string_and_is_seeded(seed):
    world = World(seed=seed, min_len=2, max_len=3, heldout_fraction=0.2)
    held, train = set(world.heldout_letters), set(world.train_letters)
    assert not held & train
    assert len(held) + len(train) == len(LETTERS) ** 2 + len(LETTERS) ** 3
    assert len(held) == int(0.2 * (len(held) + len(train)))
    assert World(seed=seed).heldout_letters == world.heldout_letters
    rng = np.random.default_rng(seed)
    assert {s for _, s in world.instructions(200, rng, heldout=True)} <= held
    assert all(doc.split(":")[0].split()[1] in train for doc in world.corpus(200, rng))


def test_corpus_follows_the_instruction_at_p_follow():
    world, rng = World(seed=0, p_follow=0.35), np.random.default_rng(0)
    pairs = world.instructions(3000, rng)
    followed = np.mean([world.continuation(t, s, rng) == answer(t, s) for t, s in pairs])
    # wrong-task continuations never equal the answer; random letters rarely do (≤ a few %)
    assert 0.33 < followed < 0.40


@pytest.mark.parametrize("kwargs, message", [
    ({"min_len": 0}, "min_len"), ({"max_len": 10}, "max_len"), ({"heldout_fraction": 1.0}, "heldout_fraction"),
    ({"p_follow": 1.5}, "p_follow"),
])
def test_bad_world_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        World(**kwargs)


def test_label_noise_of_one_half_or_more_is_refused():
    with pytest.raises(ValueError, match="label noise"):
        Labeller(noise=0.5)
