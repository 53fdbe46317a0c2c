"""V-NIAH: hand-made scoring cases, the grid's checks, oracle logits that must score exactly 1
and 0, the needle at the right frame for every depth, free generation's prompts and scores,
and the JSON and heatmap a tiny random model writes."""

from __future__ import annotations

import json

import cv2
import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from longvila_jax.checkpoint import build_model
from longvila_jax.configs import model_config
from longvila_jax.data.media import IGNORE_INDEX
from longvila_jax.data.synthetic import make_needle_dataset, needle_frame, write_haystack_video
from longvila_jax.data.video import MediaError, frame_to_model_input, load_frames
from longvila_jax.eval.needle import (
    DEPTHS,
    GENERATION_SLACK,
    Grid,
    Needle,
    NeedleScorer,
    evaluate,
    load_needles,
    make_needles,
    normalize_answer,
    teacher_forced_correct,
    teacher_forced_prediction,
    write_results,
)
from longvila_jax.infer.generate import end_of_turn_ids

TEMPLATE_MARKERS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eot_id|>"]
IMAGE_SIZE = 56  # the tiny config's vision image_size


def _tokenizer(media_token_id: int) -> Tokenizer:
    """Byte-level BPE whose "<image>" is the added token `media_token_id` (ids below it are
    filled with unused added tokens) so that the tiny model's vocabulary covers every id."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=TEMPLATE_MARKERS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["You are a helpful assistant. system user assistant",
              "What colour is the shape shown in the video? red green blue yellow",
              "What shape is shown in the video? circle square triangle",
              "What digit is written in the video? 0 1 2 3 4 5 6 7 8 9"] * 4
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([f"<unused{i}>" for i in range(media_token_id - tok.get_vocab_size())])
    tok.add_special_tokens(["<image>"])
    assert tok.token_to_id("<image>") == media_token_id
    return tok


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random model, a tokenizer matching it, a haystack video and three needles."""
    root = tmp_path_factory.mktemp("niah")
    config = model_config("tiny")
    assert config.model.vision.image_size == IMAGE_SIZE
    # Built abstractly and filled with random values: skips compiling the initialisers.
    model = nnx.eval_shape(lambda: build_model(config))
    rng = np.random.default_rng(0)
    nnx.update(model, jax.tree.map(lambda p: jnp.asarray(0.1 * rng.normal(size=p.shape), p.dtype),
                                   nnx.state(model, nnx.Param)))
    tokenizer = root / "tokenizer.json"
    _tokenizer(model.media_token_id).save(str(tokenizer))
    haystack = write_haystack_video(root / "haystack.mp4", 24, width=64, height=48, seed=3)
    needles = make_needles(3, 64, 48, seed=11)
    return {"model": model, "tokenizer": tokenizer, "haystack": haystack, "needles": needles,
            "vocab": config.model.llm.vocab_size}


def _run(world, out_dir, **kwargs):
    kwargs = {"family": "qwen2", "haystack": world["haystack"], "frame_counts": (2, 4),
              "needles": world["needles"], "image_size": IMAGE_SIZE, "progress": False, **kwargs}
    return evaluate(world["model"], world["tokenizer"], out_dir=out_dir, **kwargs)


def _pixels(frames):
    """An encode_fn whose "embedding" of a frame is its pixels, one row per frame."""
    return np.asarray(frames).reshape(len(frames), 1, -1)


def _oracle(vocab: int, shift: int = 1, calls: list | None = None):
    """A logits_fn whose argmax at position t is the input token at t + shift (1: the true
    next token); it records copies of what it was given in `calls`."""

    def logits_fn(input_ids, table, start):
        if calls is not None:
            calls.append((np.array(input_ids), np.array(table)))
        batch, seq = input_ids.shape
        logits = np.zeros((batch, seq - start, vocab), np.float32)
        for t in range(start, seq):
            if 0 <= t + shift < seq:
                logits[np.arange(batch), t - start, input_ids[:, t + shift]] = 1.0
        return logits

    return logits_fn


# Hand-made scoring: a toy vocabulary and decoder, independent of any tokenizer.
PIECES = ["<s>", "Re", "d", "re", " D", "<end>", "x", "q"]


def _decode(ids) -> str:
    return "".join(PIECES[i] for i in ids if PIECES[i] not in ("<s>", "<end>"))


def _case(predicted: list[int]):
    """Labels of "q q q | re d <end>" and logits whose argmax before each reply token is
    `predicted` (one id per reply token, end marker included)."""
    ids = [0, 7, 7, 7, 3, 2, 5]
    labels = np.array([IGNORE_INDEX] * 4 + [3, 2, 5])
    logits = np.zeros((len(ids), len(PIECES)))
    logits[np.arange(len(ids)), 6] = 0.5  # a runner-up everywhere
    for position, token in zip(range(3, 6), predicted, strict=True):
        logits[position, token] = 1.0
    return logits, labels, [3, 2]


def test_normalize_answer():
    assert normalize_answer(" Red\n") == "red"
    assert normalize_answer("New  York\tCity") == "newyorkcity"
    assert normalize_answer("") == ""


@pytest.mark.parametrize(("predicted", "correct"), [
    ([3, 2, 5], True),  # exactly the answer
    ([3, 6, 5], False),  # one token wrong
    ([6, 2, 5], False),
    ([1, 4, 5], True),  # "Re D": case and spaces differ
    ([3, 2, 6], True),  # the end-of-turn marker is not scored
])
def test_teacher_forced_correct(predicted, correct):
    logits, labels, answer = _case(predicted)
    assert teacher_forced_correct(logits, labels, answer, _decode) is correct
    # A window of the logits gives the same verdict when its offset is given.
    assert teacher_forced_correct(logits[2:], labels, answer, _decode, offset=2) is correct
    assert teacher_forced_prediction(logits, labels, answer, _decode) == _decode(predicted[:2])


def test_teacher_forced_checks_its_inputs():
    logits, labels, answer = _case([3, 2, 5])
    with pytest.raises(ValueError, match="do not start with"):
        teacher_forced_correct(logits, labels, [2, 3], _decode)
    with pytest.raises(ValueError, match="logits cover positions 4"):
        teacher_forced_correct(logits[4:], labels, answer, _decode, offset=4)
    with pytest.raises(ValueError, match="empty"):
        teacher_forced_correct(logits, labels, [], _decode)


def test_make_needles_match_the_needle_dataset(tmp_path):
    needles = make_needles(2, 32, 32, seed=5)
    records = make_needle_dataset(tmp_path, num_videos=2, num_frames=2, depth=0.0, width=32,
                                  height=32, seed=5).read_text().splitlines()
    for needle, line in zip(needles, records, strict=True):
        frame, question, answer = needle_frame(32, 32, seed=json.loads(line)["needle_seed"])
        np.testing.assert_array_equal(needle.frame, frame)
        assert (needle.question, needle.answer) == (question, answer)


def test_needle_frames_are_prepared_like_loaded_frames(world, tmp_path):
    """The needle goes in uncompressed, prepared as `load_frames` prepares a lossless image."""
    frame = world["needles"][0].frame
    cv2.imwrite(str(tmp_path / "needle.png"), frame[..., ::-1])
    np.testing.assert_array_equal(frame_to_model_input(frame, image_size=IMAGE_SIZE),
                                  load_frames(tmp_path / "needle.png", 1, image_size=IMAGE_SIZE)[0])


@pytest.mark.slow  # two compilations of the tiny model's forward pass, ~5 s each
def test_random_model_writes_grid_json_and_heatmap(world, tmp_path):
    result = _run(world, tmp_path)
    accuracy = np.array(result["accuracy"])
    assert accuracy.shape == (2, len(DEPTHS))
    assert ((accuracy >= 0) & (accuracy <= 1)).all()
    assert result["frame_counts"] == [2, 4] and result["depths"] == list(DEPTHS)
    assert len(result["per_sample"]) == 2 * len(DEPTHS) * len(world["needles"])
    assert json.loads((tmp_path / "needle.json").read_text()) == result
    image = matplotlib.image.imread(tmp_path / "needle_heatmap.png")
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["needle.json", "needle_heatmap.png"]


@pytest.mark.parametrize(("family", "batch_size"), [("qwen2", 1), ("llama", 2)])
def test_oracle_scores_exactly_one_and_off_by_one_scores_zero(world, tmp_path, family,
                                                              batch_size):
    for shift, expected in [(1, 1.0), (0, 0.0), (2, 0.0)]:
        result = _run(world, tmp_path, family=family, batch_size=batch_size,
                      encode_fn=_pixels, logits_fn=_oracle(world["vocab"], shift))
        assert np.array(result["accuracy"]).tolist() == [[expected] * len(DEPTHS)] * 2, shift
        if shift == 1:
            assert all(s["prediction"] == s["answer"] for s in result["per_sample"])


@pytest.mark.parametrize("batch_size", [1, 2])
def test_needle_replaces_the_frame_at_its_depth(world, tmp_path, batch_size):
    calls = []
    frame_counts, needles = (3, 5), world["needles"]
    _run(world, tmp_path, frame_counts=frame_counts, batch_size=batch_size, encode_fn=_pixels,
         logits_fn=_oracle(world["vocab"], calls=calls))
    normalised = [frame_to_model_input(n.frame, image_size=IMAGE_SIZE) for n in needles]
    media_per_frame = world["model"].media_tokens_per_frame
    calls = iter(calls)
    for num_frames in frame_counts:
        hay = _pixels(load_frames(world["haystack"], num_frames, image_size=IMAGE_SIZE))
        for depth in DEPTHS:
            index = round(depth * (num_frames - 1))
            for first in range(0, len(needles), batch_size):
                input_ids, table = next(calls)
                table = table.reshape(batch_size, num_frames, *hay.shape[1:])
                media = (input_ids == world["model"].media_token_id).sum(axis=1)
                assert (media == num_frames * media_per_frame).all()
                for row in range(min(batch_size, len(needles) - first)):
                    np.testing.assert_array_equal(table[row, index],
                                                  _pixels(normalised[first + row][None])[0])
                    others = [t for t in range(num_frames) if t != index]
                    np.testing.assert_array_equal(table[row, others], hay[others])
    assert next(calls, None) is None


def test_clip_needle_replaces_consecutive_frames(world, tmp_path):
    """A 2-frame clip at depth d fills frames round(d * (F - 2)) and the next one."""
    calls = []
    clip = Needle(np.stack([n.frame for n in world["needles"][:2]]), "What digit is written in "
                  "the video?", "7")
    _run(world, tmp_path, frame_counts=(4,), needles=[clip], encode_fn=_pixels,
         logits_fn=_oracle(world["vocab"], calls=calls))
    hay = _pixels(load_frames(world["haystack"], 4, image_size=IMAGE_SIZE))
    clip_rows = _pixels(np.stack([frame_to_model_input(f, image_size=IMAGE_SIZE)
                                  for f in clip.frames]))
    for depth, (_, table) in zip(DEPTHS, calls, strict=True):
        at = round(depth * 2)
        expected = np.concatenate([hay[:at], clip_rows, hay[at + 2:]])
        np.testing.assert_array_equal(table, expected)
    with pytest.raises(ValueError, match="clip of 2 frames does not fit in 1 frames"):
        _run(world, tmp_path, frame_counts=(1,), needles=[clip], encode_fn=_pixels,
             logits_fn=_oracle(world["vocab"]))


def test_grid_checks_its_values_and_places_needles(world):
    needles = world["needles"]
    grid = Grid("h.mp4", [2, 4.0], needles, [0, 0.5, 1])
    assert grid.frame_counts == (2, 4) and grid.depths == (0.0, 0.5, 1.0)
    assert grid.needles == tuple(needles)
    clip = Needle(np.stack([needles[0].frame] * 3), "Q?", "A")
    two = Grid("h.mp4", (5,), [needles[0], clip])
    assert [two.first_frame(0, 5, d) for d in (0.0, 0.5, 1.0)] == [0, 2, 4]
    assert [two.first_frame(1, 5, d) for d in (0.0, 0.5, 1.0)] == [0, 1, 2]
    for kwargs, match in [({"frame_counts": ()}, "frame_counts must not be empty"),
                          ({"frame_counts": (2, 2.5)}, "integers >= 1, got 2.5"),
                          ({"depths": ()}, "depths must not be empty"),
                          ({"depths": (-0.1,)}, r"in \[0, 1\], got -0.1"),
                          ({"needles": ()}, "needles must not be empty"),
                          ({"needles": [clip]}, "clip of 3 frames does not fit in 2 frames")]:
        with pytest.raises(ValueError, match=match):
            Grid(**{"haystack": "h.mp4", "frame_counts": (2, 4), "needles": needles, **kwargs})


class _Engine:
    """`InferenceEngine.generate_ids` as a stub: each row answers `answers[call][row]` and the
    arguments are kept in `calls`."""

    def __init__(self, answers: list[list[list[int]]]):
        self.answers, self.calls = iter(answers), []

    def generate_ids(self, prompts, table, media_offsets, *, sampling):
        self.calls.append((prompts, np.asarray(table), media_offsets, sampling.max_new_tokens,
                           list(sampling.stop_ids)))
        return next(self.answers)


def test_free_generation_asks_at_the_assistant_header_and_scores_answers(world, tmp_path):
    tokenizer = Tokenizer.from_file(str(world["tokenizer"]))
    needles = world["needles"][:2]
    right = [tokenizer.encode(f" {n.answer.upper()} ").ids for n in needles]
    wrong = tokenizer.encode("xyz").ids
    # 2 frame counts x 2 depths, both needles in one batch: needle 0 right, needle 1 wrong, then
    # needle 1 right at the last depth.
    engine = _Engine([[right[0], wrong]] * 3 + [[right[0], right[1]]])
    result = _run(world, tmp_path, needles=needles, depths=(0.0, 1.0), batch_size=2,
                  engine=engine, encode_fn=_pixels, logits_fn=_oracle(world["vocab"]),
                  generate=True)
    assert result["generation_accuracy"] == [[0.5, 0.5], [0.5, 1.0]]
    assert result["accuracy"] == [[1.0, 1.0], [1.0, 1.0]]
    assert [s["generation_correct"] for s in result["per_sample"]] == [True, False] * 3 + [True] * 2
    assert result["per_sample"][0]["generation"] == tokenizer.decode(right[0])
    assert json.loads((tmp_path / "needle.json").read_text()) == result

    media, per_frame = world["model"].media_token_id, world["model"].media_tokens_per_frame
    longest = max(len(tokenizer.encode(n.answer).ids) for n in needles)
    for (prompts, table, offsets, max_new, stop), frames in zip(engine.calls, [2, 2, 4, 4],
                                                                strict=True):
        for prompt in prompts:
            assert (np.asarray(prompt) == media).sum() == frames * per_frame
            assert tokenizer.decode(list(prompt), skip_special_tokens=False).endswith(
                "<|im_start|>assistant\n")
        assert offsets == [0, frames * table.shape[1]]  # row 1 reads the table's second video
        assert max_new == longest + GENERATION_SLACK
        assert stop == end_of_turn_ids(tokenizer, "qwen2")


def test_free_generation_needs_an_engine(world):
    grid = Grid(world["haystack"], (2,), world["needles"])
    scorer = NeedleScorer(world["model"], Tokenizer.from_file(str(world["tokenizer"])), "qwen2",
                          IMAGE_SIZE, _pixels, _oracle(world["vocab"]))
    inputs = next(scorer.encode(grid))
    assert len(scorer.teacher_forced(inputs, 0.5)) == len(world["needles"])
    with pytest.raises(ValueError, match="needs an engine"):
        scorer.generated(inputs, 0.5)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        NeedleScorer(world["model"], None, "qwen2", IMAGE_SIZE, _pixels, _oracle(1), None, 0)


def test_write_results_replaces_both_files_whole(tmp_path):
    (tmp_path / ".needle.json.tmp-0123abcd").write_text("a killed writer's")
    result = {"frame_counts": [2, 4], "depths": [0.0, 1.0], "num_needles": 1,
              "accuracy": [[1.0, 0.0], [0.0, 1.0]]}
    write_results(result, tmp_path / "out")
    write_results(result, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["needle.json", "needle_heatmap.png",
                                                           "out"]
    assert json.loads((tmp_path / "needle.json").read_text()) == result
    assert matplotlib.image.imread(tmp_path / "out" / "needle_heatmap.png").ndim == 3


def test_bad_arguments(world, tmp_path):
    with pytest.raises(MediaError) as err:
        _run(world, tmp_path, haystack=tmp_path / "absent.mp4")
    assert err.value.reason == "missing"
    with pytest.raises(ValueError, match="frame_counts"):
        _run(world, tmp_path, frame_counts=())
    with pytest.raises(ValueError, match=r"depths must be in \[0, 1\], got 1.5"):
        _run(world, tmp_path, depths=(0.0, 1.5))
    assert not list(tmp_path.iterdir())


def test_load_needles_reads_frames_and_clips(world, tmp_path):
    frame = world["needles"][0].frame
    cv2.imwrite(str(tmp_path / "n.png"), frame[..., ::-1])
    clip = write_haystack_video(tmp_path / "clip.mp4", 6, width=64, height=48, seed=2)
    lines = [{"image": "n.png", "question": "What digit?", "answer": "7"},
             {"video": clip.name, "num_frames": 3, "question": "What colour?", "answer": "red"}]
    (tmp_path / "needles.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    image, video = load_needles(tmp_path / "needles.jsonl")
    np.testing.assert_array_equal(image.frame, frame)  # PNG is lossless
    assert video.frames.shape == (3, 64, 64, 3) and video.frames.dtype == np.uint8
    want = load_frames(clip, 3, image_size=64)
    got = np.stack([frame_to_model_input(f, image_size=64) for f in video.frames])
    np.testing.assert_allclose(got, want, atol=2 / 255 / 0.5)
    assert (image.question, video.answer) == ("What digit?", "red")
    for bad, message in [({"question": "Q", "answer": "A"}, "exactly one of 'image'"),
                         ({"image": "n.png", "question": "Q", "answer": ""}, "'answer'"),
                         ({"video": clip.name, "num_frames": 0, "question": "Q", "answer": "A"},
                          "'num_frames'")]:
        (tmp_path / "bad.jsonl").write_text(json.dumps(lines[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
            load_needles(tmp_path / "bad.jsonl")
