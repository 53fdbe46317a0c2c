"""VideoMME-style multiple-choice video QA: questions from JSONL, VideoMME's prompt, accuracy.

Questions come from a JSONL file, one object per line (`load_questions` says what it may
hold). Each is asked with VideoMME's prompt (`build_prompt`), and the letter the model chose is
read from its reply (`extract_choice`); a reply with no readable choice counts as wrong and as
unanswered.

The model is the `answer_fn` argument, so any decoding (single device, sequence-parallel, an
API) plugs in without touching the scoring. Questions are grouped by video, so that a caller
encodes each video once for all its questions (VideoMME asks three per video).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from longvila_jax.atomic import atomic_file, remove_temporaries
from longvila_jax.data.text_sources import jsonl_records

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MIN_OPTIONS, MAX_OPTIONS = 2, len(LETTERS)
UNCATEGORIZED = "uncategorized"  # the category of records that name none

REQUIRED_KEYS = ("video", "question", "options", "answer")
OPTIONAL_KEYS = ("category", "subtitles")
SUBTITLE_SUFFIXES = (".srt", ".txt")

# VideoMME's prompt (its README). Its instruction reads "(A, B, C, or D)"; `build_prompt` writes
# the letters that exist, which for four options is that text exactly.
INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the "
               "video. Respond with only the letter ({letters}) of the correct option.")
POST_PROMPT = "The best answer is:"
# LongVILA-R1's format: reasoning, then the letter in tags (`build_r1_prompt`).
R1_INSTRUCTION = ("Think about the question inside <think> </think>, then give the letter of "
                  "the correct option inside <answer> </answer>.")
SUBTITLES_PREFIX = "This video's subtitles are listed below:\n"

# `answer_fn(video_path, prompts)` -> one generated text per prompt, in order. The prompts are
# user message texts; the caller puts the video before them.
AnswerFn = Callable[[str, list[str]], list[str]]

_LETTERED_OPTION = re.compile(r"([A-Z])\.\s+(.+)", re.DOTALL)
_SRT_TIMING = re.compile(r"\d+:\d{2}:\d{2}[,.]\d+\s*-->\s*\d+:\d{2}:\d{2}[,.]\d+")
# Lead-ins models put before the letter: "The best answer is", "The correct option is:",
# "Answer:", "Best option:".
_ANSWER_PREFIX = re.compile(
    r"(?:the\s+)?(?:(?:best|correct)\s+)?(?:answer|option|choice)\b(?:\s+is\b)?\s*:?\s*",
    re.IGNORECASE)
# A reply that opens with a letter marker: "B", "b.", "(B)", "[b]", "B) apple", "B: apple".
_LEADING_LETTER = re.compile(r"[(\[]?([A-Za-z])(?:[)\].:]|$)")
_ANSWER_SPAN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_SPAN = re.compile(r"<think>.*?</think>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Question:
    """One validated record: `options` lettered ("A. apple"), `answer` a letter among them.

    `video` and `subtitles` are absolute paths that existed when loaded.
    """

    video: Path
    question: str
    options: tuple[str, ...]
    answer: str
    category: str | None = None
    subtitles: Path | None = None

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]

    @property
    def texts(self) -> tuple[str, ...]:
        """The options without their "A. " letters."""
        return tuple(option[3:] for option in self.options)


def _normalize(text: str) -> str:
    """Case-folded, whitespace collapsed, outer punctuation removed: how option texts compare."""
    return " ".join(text.casefold().split()).strip(" .,;:!?\"'")


def _letter_range(count: int) -> str:
    return f"A-{LETTERS[count - 1]}"


def lettered_options(options, where: str) -> tuple[str, ...]:
    """Lettered options from VideoMME's form ("A. apple", in order) or from bare texts."""
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ValueError(f'{where}: "options" must be a list of strings, got {options!r}')
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        raise ValueError(f'{where}: "options" must hold {MIN_OPTIONS} to {MAX_OPTIONS} '
                         f"options, got {len(options)}")
    matches = [_LETTERED_OPTION.fullmatch(o.strip()) for o in options]
    # Options are lettered only when all are: a bare "A. Lincoln" among bare options stays text.
    if all(matches):
        found = "".join(m[1] for m in matches)
        if found != LETTERS[: len(options)]:
            raise ValueError(f'{where}: "options" are lettered {", ".join(found)}; expected '
                             f"{_letter_range(len(options))} in order")
        texts = [m[2].strip() for m in matches]
    else:
        texts = [o.strip() for o in options]
    for text in texts:
        if not text:
            raise ValueError(f'{where}: "options" holds an empty option: {options!r}')
    normalized = [_normalize(t) for t in texts]
    for i, text in enumerate(normalized):
        if text in normalized[:i]:
            raise ValueError(f'{where}: "options" holds {texts[i]!r} twice')
    return tuple(f"{letter}. {text}" for letter, text in zip(LETTERS, texts, strict=False))


def _parse_answer(answer, options: tuple[str, ...], where: str) -> str:
    """The answer's letter, from a letter (any case) or from an option's text."""
    if not isinstance(answer, str):
        raise ValueError(f'{where}: "answer" must be a string, got {answer!r}')
    letters = LETTERS[: len(options)]
    if len(answer.strip()) == 1 and answer.strip().upper() in letters:
        return answer.strip().upper()
    for letter, option in zip(letters, options, strict=True):
        if _normalize(answer) in (_normalize(option), _normalize(option[3:])):
            return letter
    raise ValueError(f'{where}: "answer" {answer!r} is not one of the option letters '
                     f"{_letter_range(len(options))} or an option's text")


def _parse_record(record: dict, where: str, folder: Path) -> Question:
    # Unknown keys fail rather than being ignored: a misspelt "subtitle" would silently run
    # the evaluation without subtitles.
    unknown = sorted(record.keys() - set(REQUIRED_KEYS + OPTIONAL_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; a record holds "
                         f"{', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in record:
            raise ValueError(f'{where}: missing key "{key}"')
    for key in ("video", "question", *OPTIONAL_KEYS):
        if key in record and not (isinstance(record[key], str) and record[key].strip()):
            raise ValueError(f'{where}: "{key}" must be a non-empty string, got '
                             f"{record[key]!r}")
    options = lettered_options(record["options"], where)
    answer = _parse_answer(record["answer"], options, where)

    video = folder / record["video"]
    if not video.exists():
        raise FileNotFoundError(f'{where}: "video" {os.fspath(video)!r} does not exist')
    subtitles = None
    if "subtitles" in record:
        subtitles = folder / record["subtitles"]
        if subtitles.suffix.lower() not in SUBTITLE_SUFFIXES:
            raise ValueError(f'{where}: "subtitles" {record["subtitles"]!r} must be a .srt or '
                             ".txt file")
        if not subtitles.is_file():
            raise FileNotFoundError(f'{where}: "subtitles" {os.fspath(subtitles)!r} does not '
                                    "exist")
    return Question(video=video, question=record["question"].strip(), options=options,
                    answer=answer, category=record.get("category"), subtitles=subtitles)


def load_questions(jsonl_path: str | os.PathLike) -> list[Question]:
    """Every record of `jsonl_path`, validated, in file order.

    A record is `{"video": str, "question": str, "options": [str, ...], "answer": str,
    "category"?: str, "subtitles"?: str}`; blank lines are skipped. `video` and `subtitles`
    (a .srt or .txt file) are paths, relative ones taken from the JSONL's folder, and must
    exist. `options` holds 2 to 26 options, either all lettered in order as VideoMME writes
    them ("A. apple") or all bare ("apple"), which are then lettered. `answer` is a letter
    (any case) or one option's text.
    Raises `ValueError` (or `FileNotFoundError` for a path) naming the file, line and key.
    """
    jsonl_path = Path(jsonl_path)
    folder = jsonl_path.absolute().parent
    questions = [_parse_record(record, f"{os.fspath(jsonl_path)}:{number}", folder)
                 for number, record in jsonl_records(jsonl_path)]
    if not questions:
        raise ValueError(f"{os.fspath(jsonl_path)}: holds no questions")
    return questions


def read_subtitles(path: str | os.PathLike) -> str:
    """The text of a .txt file, or the text lines of a .srt file (no indices, no timings)."""
    path = Path(path)
    # utf-8-sig: subtitle files often begin with a byte-order mark.
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() != ".srt":
        return text.strip()
    lines = [line.strip() for line in text.splitlines()]
    kept = []
    for i, line in enumerate(lines):
        if not line or _SRT_TIMING.match(line):
            continue
        # An entry's index is the number just above its timing line; a number elsewhere is
        # spoken text.
        if line.isdecimal() and i + 1 < len(lines) and _SRT_TIMING.match(lines[i + 1]):
            continue
        kept.append(line)
    return "\n".join(kept)


def build_prompt(question: Question, subtitles: str | None = None) -> str:
    """VideoMME's user message for `question`, led by `subtitles` when given.

    The instruction names the letters that exist: "(A, B, C, or D)" as in VideoMME for four
    options, "(A or B)" for two, "(A, B, C, D, or E)" for five.
    """
    letters = question.letters
    if len(letters) == 2:
        named = f"{letters[0]} or {letters[1]}"
    else:
        named = ", ".join(letters[:-1]) + f", or {letters[-1]}"
    prompt = "\n".join([INSTRUCTION.format(letters=named), question.question,
                        *question.options, POST_PROMPT])
    return prompt if subtitles is None else f"{SUBTITLES_PREFIX}{subtitles}\n{prompt}"


def build_r1_prompt(question: Question, subtitles: str | None = None) -> str:
    """LongVILA-R1's user message: the question, its lettered options, and the request to
    reason in `<think>` and answer in `<answer>` tags (`R1_INSTRUCTION`)."""
    prompt = "\n".join([question.question, *question.options, R1_INSTRUCTION])
    return prompt if subtitles is None else f"{SUBTITLES_PREFIX}{subtitles}\n{prompt}"


def extract_tagged_choice(text: str, letters: str, texts: Sequence[str] = ()) -> str | None:
    """The letter among `letters` a reply in R1's format chose, or None.

    The choice is read from the last `<answer>...</answer>` span, or, with no such span,
    from what the reply says outside `<think>` (a missing tag is not a miss when the choice
    is plain: lmms-eval PR 1488 reports a scorer that missed those). It is, in order:
    1. the span is one letter ("B", "(B)");
    2. the span is one option's text, as `texts` (the options without letters, in the order
       of `letters`) give them, case and outer punctuation aside: "green" for "B. green", as
       `extract_choice` and MMMU's parser read it, and "A cat" is option C's text, not A;
    3. the one letter standing alone in the span ("B, since ..."); several different
       letters choose nothing, so a reply that hedges earns nothing. Without a span only a
       final bare letter counts ("... so it is (C).").
    """
    spans = _ANSWER_SPAN.findall(text)
    said = spans[-1] if spans else _THINK_SPAN.sub(" ", text)
    plain = " ".join(said.split()).strip(" .,;:!?\"'()[]*")
    if len(plain) == 1 and plain in letters:
        return plain
    named = [letter for letter, option in zip(letters, texts, strict=False)
             if _normalize(plain) == _normalize(option)]
    if len(named) == 1:
        return named[0]
    if spans:
        found = set(re.findall(rf"(?<![A-Za-z])([{re.escape(letters)}])(?![A-Za-z])", said))
        return found.pop() if len(found) == 1 else None
    words = said.split()
    last = words[-1].strip("().,:;!?*'\"[]") if words else ""
    return last if len(last) == 1 and last in letters else None


def extract_choice(text: str, letters: str, texts: Sequence[str] = ()) -> str | None:
    """The letter among `letters` that the reply `text` chose, or None when it names none.

    `texts` are the options' texts without letters, in the order of `letters`. After a lead-in
    such as "The best answer is" or "Answer:" is removed, the first rule that applies wins:
    1. the reply opens with a letter marker: "B", "B.", "(B)", "B) apple", "b" (lower case is
       read only here, where it cannot be the article "a");
    2. the reply is an option's text ("apple"), case and outer punctuation aside;
    3. the first capital among `letters` standing alone, as in "I choose B." VideoMME's own
       extraction takes the first capital among its letters anywhere, even the B of "Based";
       here it must not touch other letters or digits.
    Like VideoMME's, rule 3 reads an article "A" opening a sentence as a choice; the prompt asks
    for the letter alone, so such replies are rare.
    """
    rest = text.strip()
    prefix = _ANSWER_PREFIX.match(rest)
    if prefix:
        rest = rest[prefix.end():]
    leading = _LEADING_LETTER.match(rest)
    if leading and leading[1].upper() in letters:
        return leading[1].upper()
    if rest:
        for letter, option in zip(letters, texts, strict=False):
            if _normalize(rest) == _normalize(option):
                return letter
    standalone = re.search(rf"(?<![A-Za-z0-9])[{re.escape(letters)}](?![A-Za-z0-9])", text)
    return standalone[0] if standalone else None


# eval-mcq's styles: how a question is asked, and how the reply's letter is read.
STYLES = {
    "videomme": (build_prompt, lambda reply, q: extract_choice(reply, q.letters, q.texts)),
    "r1": (build_r1_prompt,
           lambda reply, q: extract_tagged_choice(reply, q.letters, q.texts)),
}


def evaluate_mcq(
    jsonl_path: str | os.PathLike,
    answer_fn: AnswerFn,
    out_dir: str | os.PathLike,
    *,
    subtitles: bool = False,
    progress: bool = True,
    limit: int | None = None,
    style: str = "videomme",
) -> dict:
    """Ask every question of `jsonl_path` through `answer_fn`; score and write `mcq.json`.

    All records (and, with `subtitles`, all subtitle files) are read and checked before the
    first model call. `answer_fn` is called once per video, in order of first appearance, with
    the prompts of all that video's questions. `limit` keeps the file's first `limit`
    questions. With `subtitles`, questions that have a subtitle file get its whole text: the
    harness does not know which frames the model samples, so it cannot pick their lines.
    `style` "videomme" asks with VideoMME's prompt and reads the reply's letter with
    `extract_choice`; "r1" asks for LongVILA-R1's format (`build_r1_prompt`) and reads the
    tagged letter (`extract_tagged_choice`).
    Writes `out_dir/mcq.json` atomically and returns its dict: `questions` (the JSONL path),
    `subtitles`, `style`, `accuracy`, `num_questions`, `unanswered`, `per_category` (`{category:
    {"accuracy", "num_questions"}}`, sorted by name; "uncategorized" for records naming none)
    and `per_sample` (in file order).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {tuple(STYLES)}, got {style!r}")
    prompt_of, choice_of = STYLES[style]
    questions = load_questions(jsonl_path)[:limit]
    subtitle_texts = {q.subtitles: read_subtitles(q.subtitles)
                      for q in questions if subtitles and q.subtitles is not None}
    by_video: dict[Path, list[int]] = {}
    for index, question in enumerate(questions):
        by_video.setdefault(question.video, []).append(index)

    replies: list[str] = [""] * len(questions)
    with tqdm(total=len(questions), desc="mcq", unit="question", disable=not progress) as bar:
        for video, indices in by_video.items():
            bar.set_postfix_str(video.name)
            prompts = [prompt_of(questions[i], subtitle_texts.get(questions[i].subtitles))
                       for i in indices]
            texts = list(answer_fn(os.fspath(video), prompts))
            if len(texts) != len(prompts) or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"answer_fn must return {len(prompts)} strings for the prompts "
                                 f"of {os.fspath(video)!r}, got {texts!r}")
            for i, reply in zip(indices, texts, strict=True):
                replies[i] = reply
            bar.update(len(indices))

    per_sample = []
    for question, reply in zip(questions, replies, strict=True):
        choice = choice_of(reply, question)
        per_sample.append({
            "video": os.fspath(question.video), "question": question.question,
            "answer": question.answer, "prediction": reply, "choice": choice,
            "correct": choice == question.answer,
            "category": question.category or UNCATEGORIZED})
    per_category = {}
    for category in sorted({s["category"] for s in per_sample}):
        hits = [s["correct"] for s in per_sample if s["category"] == category]
        per_category[category] = {"accuracy": sum(hits) / len(hits), "num_questions": len(hits)}
    result = {
        "questions": os.fspath(jsonl_path),
        "subtitles": subtitles,
        "style": style,
        "accuracy": sum(s["correct"] for s in per_sample) / len(per_sample),
        "num_questions": len(per_sample),
        "unanswered": sum(s["choice"] is None for s in per_sample),
        "per_category": per_category,
        "per_sample": per_sample,
    }
    remove_temporaries(out_dir, "mcq")  # what a kill during an earlier write left
    with atomic_file(Path(out_dir) / "mcq.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    return result


def format_table(result: dict) -> str:
    """`evaluate_mcq`'s result as a plain-text table: category | questions | accuracy, then
    the overall row."""
    rows = [(name, str(c["num_questions"]), f"{100 * c['accuracy']:.1f}%")
            for name, c in result["per_category"].items()]
    rows.append(("overall", str(result["num_questions"]), f"{100 * result['accuracy']:.1f}%"))
    header = ("category", "questions", "accuracy")
    widths = [max(len(row[k]) for row in [header, *rows]) for k in range(3)]

    def line(row):
        return " | ".join([row[0].ljust(widths[0]), row[1].rjust(widths[1]),
                           row[2].rjust(widths[2])])

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])])
