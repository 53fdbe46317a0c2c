"""Reward functions on hand-written answers: tags present, absent, malformed, hedged."""

from __future__ import annotations

import sys

import pytest

from longvila_jax.eval.mcq import extract_tagged_choice
from longvila_jax.rl.rewards import Rewards, format_reward, mcq_accuracy

SAMPLE = {"question": "What shape?", "options": ["circle", "square", "star", "cross"],
          "answer": "C"}
TEXTS = tuple(SAMPLE["options"])

# (answer, chosen letter, format)
TABLE = [
    ("<think>The third frame shows a star.</think> <answer>C</answer>", "C", 1.0),
    ("<think>star</think>\n<answer>(C) star</answer>\n", "C", 1.0),
    ("<think>hmm</think><answer>The answer is B.</answer>", "B", 1.0),
    ("<think>A or C?</think><answer>C</answer>", "C", 1.0),  # letters in the thought: ignored
    ("<answer>C</answer>", "C", 0.0),  # no thought: right letter, wrong format
    ("<think>...</think><answer>A or C</answer>", None, 1.0),  # hedged: no choice
    ("<think>...</think><answer>star</answer>", "C", 1.0),  # an option's text names it
    ("<think>...</think><answer> Star.</answer>", "C", 1.0),  # case and punctuation aside
    ("<think>...</think><answer>a big star</answer>", None, 1.0),  # neither letter nor option
    ("<think>star</think> star", "C", 0.0),  # no tag: the option's text alone
    ("<answer>A</answer> then <answer>C</answer>", "C", 0.0),  # the last span counts
    ("It must be the star, so (C).", "C", 0.0),  # no tag, a bare final letter
    ("Answer: C", "C", 0.0),
    ("A star is shown in the video", None, 0.0),  # an article is not a choice
    ("<think>star</think><answer>C", None, 0.0),  # malformed: unclosed answer tag
    ("<think>star<answer>C</answer>", "C", 0.0),  # malformed: unclosed thought
    ("The answer is E.", None, 0.0),  # not an option
    ("", None, 0.0),
]


@pytest.mark.parametrize(("answer", "letter", "formatted"), TABLE)
def test_answers_are_scored(answer, letter, formatted):
    assert extract_tagged_choice(answer, "ABCD", TEXTS) == letter
    assert mcq_accuracy(answer, SAMPLE) == float(letter == "C")
    assert format_reward(answer, SAMPLE) == formatted


def test_an_option_text_is_read_before_the_letters_in_it():
    texts = ("B vitamins", "iron", "A cat", "zinc")
    assert extract_tagged_choice("<think>.</think><answer>A cat</answer>", "ABCD", texts) == "C"
    assert extract_tagged_choice("<answer>B vitamins</answer>", "ABCD", texts) == "A"
    assert extract_tagged_choice("<answer>B</answer>", "ABCD", ("A", "B", "C", "D")) == "B"
    sample = {"options": ["A. circle", "B. square"], "answer": "B"}  # lettered options too
    assert mcq_accuracy("<think>.</think><answer>square</answer>", sample) == 1.0


def length_bonus(answer, sample):
    """A user's reward, imported by path."""
    return len(answer) / 100


def test_weighted_sum_and_a_users_function():
    sys.modules.setdefault("reward_module_for_test", sys.modules[__name__])
    rewards = Rewards({"mcq_accuracy": 0.9, "format": 0.1,
                       "reward_module_for_test:length_bonus": 0.5})
    answers = [TABLE[0][0], "<answer>C</answer>", "A star is shown in the video"]
    scores = rewards.scores(answers, [SAMPLE] * 3)
    assert scores["mcq_accuracy"] == [1.0, 1.0, 0.0] and scores["format"] == [1.0, 0.0, 0.0]
    want = [0.9 * m + 0.1 * f + 0.5 * len(a) / 100 for m, f, a in
            zip(scores["mcq_accuracy"], scores["format"], answers, strict=True)]
    assert scores["total"] == pytest.approx(want)


@pytest.mark.parametrize(("name", "message"), [
    ("accuracy", "not one of"), ("no_such_module_xyz:f", "cannot import"),
    ("math:pi", "not callable")])
def test_unknown_rewards_are_named(name, message):
    with pytest.raises(ValueError, match=message):
        Rewards({name: 1.0})
