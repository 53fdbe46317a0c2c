"""The R1 demo's questions: eval-mcq records that load, with distinct options of the
needle's kind and videos of the split's length, and CoT SFT conversations that ask exactly
what eval-mcq's r1 style asks and reason to the letter they answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from longvila_jax.data.synthetic import needle_answers
from longvila_jax.data.video import load_frames
from longvila_jax.demo_r1 import MAX_OPTIONS, SPLITS, write_r1_data
from longvila_jax.eval.mcq import build_r1_prompt, load_questions


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
    for line in Path(paths["cot_sft"]).read_text().splitlines():
        record = json.loads(line)
        human, gpt = (turn["value"] for turn in record["conversations"])
        letter = gpt.split("<answer>")[1][0]
        lines = human.split("\n")
        options = [o for o in lines if o[:3] in {f"{c}. " for c in "ABCD"}]
        chosen = next(o for o in options if o.startswith(letter))[3:]
        assert gpt == f"<think>{chosen}</think><answer>{letter}</answer>"
        question = type(held[0])(tmp_path / record["video"], lines[1], tuple(options), letter)
        assert human == "<video>\n" + build_r1_prompt(question)
    assert np.all([(tmp_path / p).exists() for p in paths.values()])
