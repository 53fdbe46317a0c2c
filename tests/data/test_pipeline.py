"""The whole grain pipeline on synthetic videos: packed batches, skipped bad media with
counts, a broken source stopping with its name, host sharding, and iterator state saved
with orbax giving the identical next batch (in-process and with 2 worker processes)."""

from __future__ import annotations

import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from longvila_jax.data.pipeline import (
    DataError,
    SampleSpec,
    Source,
    build,
    build_text,
    source_stream,
)
from longvila_jax.data.position import Coverage, Share
from longvila_jax.data.synthetic import make_needle_dataset, write_bad_media
from longvila_jax.data.text_sources import TokenArraySource, read_jsonl

SPECIALS = ["<|im_start|>", "<|im_end|>", "<image>"]
TOKENS, FRAMES, BATCH = 256, 16, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Needle videos, bad media, their JSONL sources and a tiny tokenizer."""
    root = tmp_path_factory.mktemp("data")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What colour is the shape? red green blue"] * 4, trainer)
    tok.save(str(root / "tokenizer.json"))
    needles = make_needle_dataset(root, num_videos=6, num_frames=12, depth=0.5, width=64,
                                  height=48, seed=3)
    bad = write_bad_media(root)
    good = [json.loads(line) for line in needles.read_text().splitlines()]

    def bad_record(reason, path):
        return {"id": f"bad_{reason}", "video": path, "conversations": [
            {"from": "human", "value": "<video>\nWhat is shown?"}, {"from": "gpt", "value": "x"}]}

    malformed = {"id": "no_media", "conversations": [  # a placeholder but no media
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "x"}]}
    mixed = good[:3] + [bad_record(r, p) for r, p in bad.items()] + [malformed]
    (root / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    broken = [bad_record(r, p) for r, p in bad.items() if r != "too_few_frames"] * 8
    (root / "broken.jsonl").write_text("".join(json.dumps(r) + "\n" for r in broken))
    spec = SampleSpec(family="qwen2", media_token_id=tok.token_to_id("<image>"),
                      tokens_per_frame=3, num_frames=4, image_size=32)
    return dict(root=root, needles=str(needles), mixed=str(root / "mixed.jsonl"),
                broken=str(root / "broken.jsonl"), tokenizer=str(root / "tokenizer.json"),
                spec=spec, reasons=[*sorted(bad), "bad_record"])


def pipeline(world, sources, workers=0, saved=None):
    return build(sources, world["spec"], world["tokenizer"], tokens=TOKENS, frames=FRAMES,
                 batch_size=BATCH, pad_multiple=8, seed=5, workers=workers, shard=(0, 1),
                 saved=saved)


def test_batches_are_packed_and_bad_media_is_skipped_and_counted(world):
    sources = [Source("needles", world["needles"], str(world["root"]), weight=1.0),
               Source("mixed", world["mixed"], str(world["root"]), weight=1.0)]
    iterator = iter(pipeline(world, sources))
    for _ in range(6):
        batch = next(iterator)
        assert batch["input_ids"].shape == (BATCH, TOKENS)
        assert batch["frames"].shape == (BATCH, FRAMES, 32, 32, 3)
        for row in range(BATCH):
            seg, frame_seg = batch["segment_ids"][row], batch["frame_segment_ids"][row]
            media = batch["input_ids"][row] == world["spec"].media_token_id
            # Each segment's media slots match its frames: tokens_per_frame per frame.
            for s in np.unique(seg[seg > 0]):
                assert (media & (seg == s)).sum() == 3 * (frame_seg == s).sum()
            # Nothing is trained to predict a media position, and media positions name
            # their row's frames in order.
            assert (batch["targets"][row][:-1][media[1:]] == -100).all()
            np.testing.assert_array_equal(batch["media_rows"][row][media],
                                          np.arange(media.sum()))
            assert (batch["media_rows"][row][~media] == -1).all()
    # 6 batches of up to 2 x 256 tokens pull ~15+ of the mixed source's records, which
    # cycle through every bad case: each reason has been counted (too_few_frames: 3 frames
    # of the 4 asked).
    counts = iterator.skip_counts()
    assert {k.removeprefix("data/skipped_") for k, v in counts.items() if v} == set(
        world["reasons"])


def test_a_source_with_only_bad_media_stops_with_its_name(world):
    sources = [Source("broken-source", world["broken"], str(world["root"]))]
    iterator = iter(pipeline(world, sources))
    with pytest.raises(DataError, match=r"source 'broken-source'.*every one of its first 16"):
        next(iterator)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_shards_cover_every_record_once_per_epoch(world, count):
    records = read_jsonl(world["needles"])
    total = len(records)
    for epoch in range(2):
        seen = []
        for index in range(count):
            stream = source_stream(records, 0, Share(index, count, Coverage.empty(1)), seed=1)
            share = -(-(total - index) // count)  # reads epoch 0 and 1 split alike
            seen += [stream[epoch * share + k][1]["id"] for k in range(share)]
        assert sorted(seen) == sorted(record["id"] for record in records)


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_iterator_gives_the_identical_next_batch(world, tmp_path, workers):
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    sources = [Source("needles", world["needles"], str(world["root"])),
               Source("mixed", world["mixed"], str(world["root"]))]
    iterator = iter(pipeline(world, sources, workers))
    for _ in range(2):
        next(iterator)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    manager.close()
    expected = [next(iterator) for _ in range(2)]
    counts = iterator.skip_counts()

    saved = [json.loads(f.read_text())
             for f in (tmp_path / "ckpt" / "2" / "data").glob("process_*.json")]
    fresh = iter(pipeline(world, sources, workers, saved=saved))
    for want in expected:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(np.concatenate(got[key]) if key == "sample_ids"
                                          else got[key], np.concatenate(want[key])
                                          if key == "sample_ids" else want[key], err_msg=key)
    assert fresh.skip_counts() == counts


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3), (3, 2)])
def test_resuming_on_other_shard_counts_reads_each_sample_once(world, before, after, rng):
    """Shards stop after different numbers of batches (as processes do: packing puts a
    varying number of samples into a row); their saved states resume on another shard
    count, which reads on until the first two epochs of every source are read: each of
    their samples exactly once."""
    sources = [Source("needles", world["needles"], str(world["root"])),
               Source("mixed", world["mixed"], str(world["root"]))]
    sizes = [len(read_jsonl(s.jsonl)) for s in sources]

    def build_shard(index, count, saved=None):
        return iter(build(sources, world["spec"], world["tokenizer"], tokens=TOKENS,
                          frames=FRAMES, batch_size=1, seed=5, shard=(index, count),
                          saved=saved))

    def consume(iterator, batches):
        for _ in range(batches):
            for ids in next(iterator)["sample_ids"]:
                seen.extend((int(s), int(g), int(skip)) for s, g, skip in ids[:, [0, 2, 4]])

    seen: list[tuple[int, int, int]] = []
    saved = []
    for index in range(before):
        iterator = build_shard(index, before)
        consume(iterator, int(rng.integers(1, 5)))
        saved.append(iterator.get_state())
    resumed = [build_shard(index, after, saved) for index in range(after)]

    def two_epochs_read():
        return all({g for s, g, _ in seen if s == source} >= set(range(2 * size))
                   for source, size in enumerate(sizes))

    for _ in range(40):  # rounds of one batch per resumed shard, until two epochs are read
        if two_epochs_read():
            break
        for iterator in resumed:
            consume(iterator, 1)
    assert two_epochs_read()
    positions = [(s, g) for s, g, _ in seen]
    assert len(positions) == len(set(positions)), "a sample was read twice"
    # Skip counts carry over (into shard 0): the run's total is every skipped sample seen.
    counted = sum(sum(it.skip_counts().values()) for it in resumed)
    assert counted == sum(1 for *_, skip in seen if skip) > 0


def test_text_stage_batches_cover_the_token_array(tmp_path, rng):
    length, count = 16, int(rng.integers(5, 12))
    tokens = rng.integers(0, 1000, length * count + int(rng.integers(0, length)), np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    iterator = iter(build_text(TokenArraySource(tmp_path / "tokens.npy", length), batch_size=1,
                               seed=2, shard=(0, 1)))
    rows = [next(iterator) for _ in range(count)]
    got = sorted(tuple(r["input_ids"][0]) for r in rows)
    assert got == sorted(tuple(c) for c in tokens[: length * count].reshape(count, length))
    for r in rows:
        np.testing.assert_array_equal(r["targets"][0][:-1], r["input_ids"][0][1:])
        assert r["targets"][0][-1] == -100 and (r["media_rows"] == -1).all()
        np.testing.assert_array_equal(r["positions"][0], np.arange(length))
        assert (r["segment_ids"] == 1).all()
