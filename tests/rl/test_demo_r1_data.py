"""The R1 demo's questions: eval-mcq records that load, with distinct options of the
needle's kind and videos of the split's length, and CoT SFT conversations that ask exactly
what eval-mcq's r1 style asks, about videos of 8 to 32 frames, describe their own video's
needle and answer with the option that eval-mcq reads as right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from longvila_jax.data.synthetic import needle_answers
from longvila_jax.data.video import load_frames
from longvila_jax.demo_r1 import COT_FRAMES, MAX_OPTIONS, SPLITS, write_r1_data
from longvila_jax.eval.mcq import Question, build_r1_prompt, extract_tagged_choice, load_questions

INKS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
        "yellow": (235, 205, 30), "black": (0, 0, 0)}


def _needle_ink(frames: np.ndarray) -> str:
    """The colour of what the needle frame (the one on a plain grey background) shows,
    read from its pixels; black for a digit."""
    rgb = (frames * 0.5 + 0.5) * 255
    plain = np.abs(rgb - 235).max(-1) < 12
    needle = rgb[np.argmax(plain.mean((1, 2)))]
    ink = needle[np.abs(needle - 235).max(-1) >= 60].mean(0)
    return min(INKS, key=lambda name: float(np.sum((ink - INKS[name]) ** 2)))


def test_r1_data_records_load_and_the_cot_answers_match_the_questions(tmp_path):
    paths = write_r1_data(tmp_path, size=56, fps=4.0, scale=0.02)
    held = load_questions(paths["heldout"])
    grpo = load_questions(paths["grpo"])
    assert len(held) == 2 and len(grpo) == 8
    for q in held + grpo:
        texts = [o.split(". ", 1)[1] for o in q.options]
        assert 2 <= len(texts) <= MAX_OPTIONS and len(set(texts)) == len(texts)
        assert set(texts) <= set(needle_answers(q.category))
        frames = load_frames(q.video, SPLITS["heldout"][0], image_size=56)
        assert len(frames) == SPLITS["heldout"][0]
    lengths = set()
    for line in Path(paths["cot_sft"]).read_text().splitlines():
        record = json.loads(line)
        human, gpt = (turn["value"] for turn in record["conversations"])
        lines = human.split("\n")
        options = tuple(o for o in lines if o[:3] in {f"{c}. " for c in "ABCD"})
        chosen = gpt.split("<answer>")[1].removesuffix("</answer>")
        letter = next(o[0] for o in options if o[3:] == chosen)
        question = Question(tmp_path / record["video"], lines[1], options, letter)
        assert human == "<video>\n" + build_r1_prompt(question)
        assert extract_tagged_choice(gpt, question.letters, question.texts) == letter
        # The thought describes the needle its video shows and holds the answer.
        thought = gpt.removeprefix("<think>").split("</think>")[0]
        assert gpt == f"<think>{thought}</think><answer>{chosen}</answer>"
        assert chosen in thought.split()
        frames = load_frames(question.video, COT_FRAMES, image_size=56, fps=4.0)
        ink = _needle_ink(frames)
        assert thought.startswith("the digit ") if ink == "black" else thought.split()[1] == ink
        lengths.add(len(frames))
    assert lengths and min(lengths) >= COT_FRAMES // 4 and max(lengths) <= COT_FRAMES
    assert len(lengths) > 1
    assert np.all([(tmp_path / p).exists() for p in paths.values()])
