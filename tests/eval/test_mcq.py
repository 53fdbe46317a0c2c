"""VideoMME-style MCQ: the prompt text, answer extraction, input checks, and accuracy from
scripted fake models, hand-computed and over random question sets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from longvila_jax.eval.mcq import (
    R1_INSTRUCTION,
    Question,
    build_prompt,
    evaluate_mcq,
    extract_choice,
    format_table,
    load_questions,
    read_subtitles,
)

VIDEOMME_4 = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter (A, B, C, or D) of the correct option.\n"
    "What colour is the car?\n"
    "A. red\nB. green\nC. blue\nD. yellow\n"
    "The best answer is:"
)


def write_jsonl(path, records):
    """Records as JSON lines; a str record is written as it is (for broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def touch(folder, *names):
    for name in names:
        (folder / name).write_bytes(b"")


def record(video="v.mp4", **fields):
    return {"video": video, "question": "What colour is the car?",
            "options": ["A. red", "B. green", "C. blue", "D. yellow"], "answer": "B", **fields}


class ScriptedModel:
    """An `AnswerFn` replying `replies[prompt-order index]`, recording each call."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def __call__(self, video, prompts):
        self.calls.append((video, list(prompts)))
        return [self.replies.pop(0) for _ in prompts]


def test_prompt_is_videomme_string(tmp_path):
    touch(tmp_path, "v.mp4")
    [question] = load_questions(write_jsonl(tmp_path / "q.jsonl", [record()]))
    assert build_prompt(question) == VIDEOMME_4


@pytest.mark.parametrize(("count", "named"), [
    (2, "(A or B)"), (3, "(A, B, or C)"), (5, "(A, B, C, D, or E)")])
def test_prompt_names_the_letters_that_exist(count, named):
    options = tuple(f"{letter}. option {letter}" for letter in "ABCDE"[:count])
    prompt = build_prompt(Question(video=Path("v.mp4"), question="Q?", options=options, answer="A"))
    assert f"Respond with only the letter {named} of the correct option.\nQ?\n" in prompt
    assert prompt.endswith("\n".join(options) + "\nThe best answer is:")


def test_bare_options_get_letters(tmp_path):
    touch(tmp_path, "v.mp4")
    # "A. Lincoln" among bare options is an option's text, not a letter.
    path = write_jsonl(tmp_path / "q.jsonl", [
        record(options=["apple", "pear", "plum"], answer="c"),
        record(options=["A. Lincoln", "Washington"], answer="Washington"),
        record(options=["A.  red ", "B. green"], answer="b. GREEN")])
    first, second, third = load_questions(path)
    assert first.options == ("A. apple", "B. pear", "C. plum") and first.answer == "C"
    assert second.options == ("A. A. Lincoln", "B. Washington") and second.answer == "B"
    assert third.options == ("A. red", "B. green") and third.answer == "B"
    assert "\nA. apple\nB. pear\nC. plum\nThe best answer is:" in build_prompt(first)


@pytest.mark.parametrize("answer", ["B", "b", " B ", "green", "Green.", "B. green"])
def test_answer_as_letter_or_option_text(tmp_path, answer):
    touch(tmp_path, "v.mp4")
    [question] = load_questions(write_jsonl(tmp_path / "q.jsonl", [record(answer=answer)]))
    assert question.answer == "B"


def test_paths_are_taken_from_the_jsonl_folder(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "videos").mkdir(parents=True)
    touch(data / "videos", "a.mp4")
    touch(tmp_path, "b.mp4")
    path = write_jsonl(data / "q.jsonl", [record("videos/a.mp4"),
                                          record(str(tmp_path / "b.mp4"))])
    monkeypatch.chdir(tmp_path)  # a relative path must not be read from here
    first, second = load_questions(path)
    assert first.video.samefile(data / "videos" / "a.mp4")
    assert second.video.samefile(tmp_path / "b.mp4")


SRT = ("\ufeff1\r\n00:00:01,000 --> 00:00:02,500\r\nHello there.\r\n\r\n"
       "2\r\n00:00:03,000 --> 00:00:04,000\r\nGeneral Kenobi!\r\nYou are a bold one.\r\n\r\n"
       "3\r\n00:00:05,000 --> 00:00:06,000\r\n42\r\n")


def test_read_subtitles_keeps_only_srt_text(tmp_path):
    (tmp_path / "s.srt").write_bytes(SRT.encode())
    (tmp_path / "s.txt").write_text("\n  plain words\nmore words \n\n")
    # "42" is spoken text: it is no entry's index.
    assert read_subtitles(tmp_path / "s.srt") == (
        "Hello there.\nGeneral Kenobi!\nYou are a bold one.\n42")
    assert read_subtitles(tmp_path / "s.txt") == "plain words\nmore words"


@pytest.mark.parametrize("use_subtitles", [True, False])
def test_subtitles_prefix_the_prompt(tmp_path, use_subtitles):
    touch(tmp_path, "v.mp4", "w.mp4")
    (tmp_path / "subs").mkdir()
    (tmp_path / "subs" / "v.srt").write_bytes(SRT.encode())
    path = write_jsonl(tmp_path / "q.jsonl", [record("v.mp4", subtitles="subs/v.srt"),
                                              record("w.mp4")])
    model = ScriptedModel(["B", "B"])
    evaluate_mcq(path, model, tmp_path / "out", subtitles=use_subtitles, progress=False)
    [(_, [with_subs]), (_, [without])] = model.calls
    expected = ("This video's subtitles are listed below:\nHello there.\nGeneral Kenobi!\n"
                "You are a bold one.\n42\n" + VIDEOMME_4)
    assert with_subs == (expected if use_subtitles else VIDEOMME_4)
    assert without == VIDEOMME_4


OPTIONS = ("apple", "Vitamin C", "a pear", "B")  # letters A-D


@pytest.mark.parametrize(("text", "expected"), [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("[C]", "C"), ("B) Vitamin C", "B"),
    ("D: B", "D"), ("  c  ", "C"), ("b.", "B"), ("(d)", "D"),
    ("The best answer is B", "B"), ("The best answer is: (A)", "A"),
    ("The correct answer is C.", "C"), ("Answer: b", "B"), ("answer is d", "D"),
    ("Best option: C", "C"), ("The answer is apple.", "A"), ("The answer (A)", "A"),
    ("I choose C because the car is blue.", "C"), ("**D**", "D"),
    ("Vitamin C", "B"), ("vitamin c.", "B"), ("A pear", "C"), ("apple", "A"),
    ("Based on the video, B.", "B"),
    # None: no standalone letter among A-D, no option's text.
    ("Based on the video, it is blue.", None), ("E", None), ("(e)", None), ("", None),
    ("I cannot tell.", None), ("The answer is e", None), ("The answer", None),
    ("ABBA", None), ("B2 bomber", None), ("a car", None), ("apples", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, "ABCD", OPTIONS) == expected


def test_extract_choice_only_reads_the_given_letters():
    assert extract_choice("C", "AB") is None
    assert extract_choice("I think E", "ABCDE") == "E"
    assert extract_choice("I think E", "ABCD") is None
    # Without option texts, rule 2 has nothing to match.
    assert extract_choice("apple", "AB") is None


def test_accuracy_by_hand(tmp_path):
    touch(tmp_path, "v1.mp4", "v2.mp4")
    path = write_jsonl(tmp_path / "q.jsonl", [
        record("v1.mp4", answer="A", category="Sports"),
        record("v1.mp4", answer="B", category="Sports"),
        record("v2.mp4", answer="C", category="News"),
        record("v2.mp4", answer="D"),
        record("v1.mp4", answer="yellow", category="Sports")])
    # v1's prompts (rows 1, 2, 5), then v2's (rows 3, 4).
    model = ScriptedModel(["A", "The best answer is C.", "I am not sure.", "C", "d"])
    result = evaluate_mcq(path, model, tmp_path / "out", progress=False)
    assert [s["choice"] for s in result["per_sample"]] == ["A", "C", "C", "D", None]
    assert [s["correct"] for s in result["per_sample"]] == [True, False, True, True, False]
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["num_questions"] == 5 and result["unanswered"] == 1
    assert result["per_category"] == {
        "News": {"accuracy": 1.0, "num_questions": 1},
        "Sports": {"accuracy": pytest.approx(1 / 3), "num_questions": 3},
        "uncategorized": {"accuracy": 1.0, "num_questions": 1}}
    assert result["per_sample"][4] == {
        "video": str(tmp_path / "v1.mp4"), "question": "What colour is the car?",
        "answer": "D", "prediction": "I am not sure.", "choice": None, "correct": False,
        "category": "Sports"}


def test_r1_style_asks_for_tags_and_reads_the_tagged_letter(tmp_path):
    touch(tmp_path, "v1.mp4")
    path = write_jsonl(tmp_path / "q.jsonl", [record("v1.mp4", answer=a) for a in "ABCD"])
    model = ScriptedModel(["<think>it is red</think><answer>A</answer>",
                           "<think>A or B?</think><answer>C</answer>",  # wrong letter
                           "<think>hmm</think> so the answer is (C).",  # no tag, bare letter
                           "<answer>B or D</answer>"])  # hedges: no choice
    result = evaluate_mcq(path, model, tmp_path / "out", progress=False, style="r1")
    [(_, prompts)] = model.calls
    assert all(p.endswith(R1_INSTRUCTION) and "A. " in p for p in prompts)
    assert [s["choice"] for s in result["per_sample"]] == ["A", "C", "C", None]
    assert result["accuracy"] == pytest.approx(2 / 4) and result["style"] == "r1"
    with pytest.raises(ValueError, match="style"):
        evaluate_mcq(path, model, tmp_path / "out", progress=False, style="mmmu")


def test_each_video_is_asked_once_with_all_its_prompts(tmp_path):
    touch(tmp_path, "v1.mp4", "v2.mp4", "v3.mp4")
    order = ["v2.mp4", "v1.mp4", "v2.mp4", "v3.mp4", "v1.mp4", "v2.mp4"]
    path = write_jsonl(tmp_path / "q.jsonl", [
        {**record(name), "question": f"Question {i}?"} for i, name in enumerate(order)])
    model = ScriptedModel(["A"] * len(order))
    result = evaluate_mcq(path, model, tmp_path / "out", progress=False)
    asked = [(video, [re.search(r"Question \d", p)[0] for p in prompts])
             for video, prompts in model.calls]
    assert asked == [(str(tmp_path / "v2.mp4"), ["Question 0", "Question 2", "Question 5"]),
                     (str(tmp_path / "v1.mp4"), ["Question 1", "Question 4"]),
                     (str(tmp_path / "v3.mp4"), ["Question 3"])]
    # Results stay in file order.
    assert [s["question"] for s in result["per_sample"]] == [f"Question {i}?" for i in range(6)]


def test_random_question_sets(tmp_path, rng):
    """Random videos, option counts, categories and reply forms; the expected scores are
    counted from the script."""
    forms = ["{L}", "({L})", "{L}. {T}", "The best answer is {L}.", "answer: {l}", "{T}"]
    entries = []  # (record, reply, reported category, "right" | "wrong" | "none")
    for v in range(int(rng.integers(1, 6))):
        touch(tmp_path, f"v{v}.mp4")
        for _ in range(int(rng.integers(1, 5))):
            count = int(rng.integers(2, 9))
            texts = [f"thing number {k}" for k in rng.permutation(50)[:count]]
            answer = int(rng.integers(count))
            category = ["X", "Y", None][int(rng.integers(3))]
            kind = ["right", "wrong", "none"][int(rng.integers(3))]
            chosen = answer if kind == "right" else (answer + 1) % count
            letter, form = "ABCDEFGH"[chosen], forms[int(rng.integers(len(forms)))]
            reply = ("no idea" if kind == "none"
                     else form.format(L=letter, l=letter.lower(), T=texts[chosen]))
            entry = record(f"v{v}.mp4", options=texts, answer="ABCDEFGH"[answer])
            if category:
                entry["category"] = category
            entries.append((entry, reply, category or "uncategorized", kind))
    entries = [entries[i] for i in rng.permutation(len(entries))]
    records = [entry for entry, *_ in entries]
    # The model answers video by video (first appearance), each video's questions in file order.
    videos = dict.fromkeys(r["video"] for r in records)
    model_replies = [reply for v in videos for entry, reply, *_ in entries if entry["video"] == v]
    truth = [(category, kind) for _, _, category, kind in entries]

    result = evaluate_mcq(write_jsonl(tmp_path / "q.jsonl", records),
                          ScriptedModel(model_replies), tmp_path / "out", progress=False)
    assert [s["prediction"] for s in result["per_sample"]] == [reply for _, reply, *_ in entries]
    assert result["num_questions"] == len(records)
    assert result["unanswered"] == sum(kind == "none" for _, kind in truth)
    assert result["accuracy"] == pytest.approx(
        np.mean([kind == "right" for _, kind in truth]))
    for category, scores in result["per_category"].items():
        kinds = [kind for c, kind in truth if c == category]
        assert scores == {"accuracy": pytest.approx(np.mean([k == "right" for k in kinds])),
                          "num_questions": len(kinds)}
    assert sum(s["num_questions"] for s in result["per_category"].values()) == len(records)


def test_json_matches_the_result_and_no_temporary_is_left(tmp_path, capsys):
    touch(tmp_path, "v.mp4")
    path = write_jsonl(tmp_path / "q.jsonl", [record(category="Künste"), record()])
    out = tmp_path / "out" / "nested"
    result = evaluate_mcq(path, ScriptedModel(["B", "The answer is A"]), out)
    assert json.loads((out / "mcq.json").read_text(encoding="utf-8")) == result
    assert [p.name for p in out.iterdir()] == ["mcq.json"]
    assert "mcq" in capsys.readouterr().err  # the progress bar
    evaluate_mcq(path, ScriptedModel(["B", "B"]), out, progress=False)
    assert capsys.readouterr().err == ""
    assert json.loads((out / "mcq.json").read_text())["accuracy"] == 1.0


def test_limit_keeps_the_first_questions(tmp_path):
    touch(tmp_path, "v1.mp4", "v2.mp4")
    path = write_jsonl(tmp_path / "q.jsonl", [record("v1.mp4"), record("v2.mp4"),
                                              record("v1.mp4", answer="A")])
    model = ScriptedModel(["B", "B"])
    result = evaluate_mcq(path, model, tmp_path / "out", progress=False, limit=2)
    assert result["num_questions"] == 2 and result["accuracy"] == 1.0
    assert [len(prompts) for _, prompts in model.calls] == [1, 1]
    with pytest.raises(ValueError, match="limit must be >= 1"):
        evaluate_mcq(path, model, tmp_path / "out", progress=False, limit=0)


@pytest.mark.parametrize(("line", "message"), [
    ('{"video": "v.mp4", "question": "Q?"', r"q\.jsonl:2: invalid JSON"),
    ('["v.mp4"]', r"q\.jsonl:2: expected a JSON object, got list"),
    (record(answer="E"), r"""q\.jsonl:2: "answer" 'E' is not one of the option letters A-D"""),
    (record(answer="purple"), r"""q\.jsonl:2: "answer" 'purple' is not one"""),
    (record(answer=2), r'q\.jsonl:2: "answer" must be a string, got 2'),
    (record(options=["A. red"], answer="A"),
     r'q\.jsonl:2: "options" must hold 2 to 26 options, got 1'),
    (record(options=[f"o{i}" for i in range(27)], answer="A"), r'q\.jsonl:2: "options" .* got 27'),
    (record(options="A. red B. green"), r'q\.jsonl:2: "options" must be a list of strings'),
    (record(options=["red", 3]), r'q\.jsonl:2: "options" must be a list of strings'),
    (record(options=["B. red", "A. green"]), r'q\.jsonl:2: "options" are lettered B, A'),
    (record(options=["red", "Red."]), r"""q\.jsonl:2: "options" holds 'Red\.' twice"""),
    (record(options=["red", " "]), r'q\.jsonl:2: "options" holds an empty option'),
    ({k: v for k, v in record().items() if k != "answer"}, r'q\.jsonl:2: missing key "answer"'),
    ({k: v for k, v in record().items() if k != "video"}, r'q\.jsonl:2: missing key "video"'),
    (record(question=""), r'q\.jsonl:2: "question" must be a non-empty string'),
    (record(category=3), r'q\.jsonl:2: "category" must be a non-empty string, got 3'),
    (record(subtitle="s.srt"), r"q\.jsonl:2: unknown key 'subtitle'"),
    (record(subtitles="s.vtt"), r"""q\.jsonl:2: "subtitles" 's\.vtt' must be a \.srt"""),
])
def test_bad_records_name_file_line_and_key(tmp_path, line, message):
    touch(tmp_path, "v.mp4", "s.vtt")
    path = write_jsonl(tmp_path / "q.jsonl", [record(), line, record()])
    with pytest.raises(ValueError, match=message) as error:
        load_questions(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("fields", "missing"), [
    ({"video": "gone.mp4"}, "gone.mp4"), ({"subtitles": "gone.srt"}, "gone.srt")])
def test_missing_files_fail_before_any_model_call(tmp_path, fields, missing):
    touch(tmp_path, "v.mp4")
    path = write_jsonl(tmp_path / "q.jsonl", [record(), record(), {**record(), **fields}])
    model = ScriptedModel(["B"] * 3)
    with pytest.raises(FileNotFoundError, match=rf"q\.jsonl:3: .*{re.escape(missing)}"):
        evaluate_mcq(path, model, tmp_path / "out", progress=False)
    assert model.calls == [] and not (tmp_path / "out").exists()


def test_empty_file_and_bad_model_replies(tmp_path):
    touch(tmp_path, "v.mp4")
    with pytest.raises(ValueError, match=r"q\.jsonl: holds no questions"):
        load_questions(write_jsonl(tmp_path / "q.jsonl", ["", "  "]))
    path = write_jsonl(tmp_path / "q.jsonl", [record(), record()])
    with pytest.raises(ValueError, match=r"answer_fn must return 2 strings"):
        evaluate_mcq(path, lambda video, prompts: ["B"], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=r"answer_fn must return 2 strings"):
        evaluate_mcq(path, lambda video, prompts: ["B", None], tmp_path / "out",
                     progress=False)
    assert not (tmp_path / "out").exists()


def test_format_table():
    result = {"accuracy": 0.6, "num_questions": 5, "per_category": {
        "News": {"accuracy": 1.0, "num_questions": 1},
        "Sports Competition": {"accuracy": 1 / 3, "num_questions": 3},
        "uncategorized": {"accuracy": 1.0, "num_questions": 1}}}
    assert format_table(result) == "\n".join([
        "category           | questions | accuracy",
        "-------------------+-----------+---------",
        "News               |         1 |   100.0%",
        "Sports Competition |         3 |    33.3%",
        "uncategorized      |         1 |   100.0%",
        "-------------------+-----------+---------",
        "overall            |         5 |    60.0%"])
