"""`longvila-jax demo --rl`: LongVILA-R1's two extra stages in miniature, after the demo's five.

On synthetic needle videos asked as multiple-choice questions (the needle's colour, shape
or digit; up to four options, the right one and others of its kind):
1. CoT SFT (`6_cot_sft`, from long SFT's final checkpoint): answers in R1's format, the
   thought describing the needle as the demo's captions do and the answer naming the
   option, `<think>a red circle</think><answer>red</answer>`, on videos of 8 to
   `COT_FRAMES` frames, every frame kept;
2. GRPO (`7_grpo`, `stages/grpo:demo`): the model's own sampled answers to questions about
   `RL_FRAMES`-frame videos, four times the longest CoT SFT video, where the policy is
   imperfect; rewarded for the right option and the format;
3. eval-mcq (`--style=r1`, greedy) on held-out questions at `RL_FRAMES` frames after each.

The answer is the option's text, which eval-mcq's r1 style reads as that option, not its
letter: the demo model (4 layers, width 64) does not learn to find the option holding a
word and copy its letter, nor any copy from its prompt, in these budgets (bench/NOTES.md,
R1 attempts 1-13). Videos of varied length keep the format at lengths CoT SFT never saw
(trained at 32 frames only, it broke at 64).

Everything lands under the demo's work folder; finished stages are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from longvila_jax.atomic import atomic_file
from longvila_jax.data.demo_corpus import caption
from longvila_jax.data.synthetic import needle_answers, needle_fact, write_needle_video
from longvila_jax.eval.mcq import LETTERS, Question, build_r1_prompt, evaluate_mcq

COT_FRAMES = 32  # long SFT's frame count: CoT SFT's videos have up to this many
RL_FRAMES = 128  # four times it: where the policy is imperfect
SPLITS = {"cot_sft": (COT_FRAMES, 400), "grpo": (RL_FRAMES, 400), "heldout": (RL_FRAMES, 100)}
SEED = 2_000_003  # a base seed the demo corpus and V-NIAH never use
MAX_OPTIONS = 4


def _question(root: Path, split: str, i: int, frames: int, size: int,
              fps: float) -> tuple[dict, dict]:
    """Write split `split`'s video i; its eval-mcq record (options bare, answer a letter)
    and the needle's fact."""
    rng = np.random.default_rng([SEED, list(SPLITS).index(split), i])
    needle_seed, haystack_seed = (int(x) for x in rng.integers(1 << 31, size=2))
    video = root / split / f"{i:04d}.mp4"
    if split == "cot_sft":  # 8 to COT_FRAMES frames, all kept (`train.fps`)
        frames = int(rng.integers(COT_FRAMES // 4, frames + 1))
    question, _ = write_needle_video(video, frames, needle_index=int(rng.integers(frames)),
                                     needle_seed=needle_seed, haystack_seed=haystack_seed,
                                     width=size, height=size, fps=fps)
    fact = needle_fact(needle_seed)
    answer = fact[fact["kind"]]
    others = [a for a in needle_answers(fact["kind"]) if a != answer]
    options = [answer, *rng.choice(others, min(MAX_OPTIONS - 1, len(others)), replace=False)]
    options = [str(o) for o in rng.permutation(options)]
    return {"video": str(video.relative_to(root)), "question": question, "options": options,
            "answer": LETTERS[options.index(answer)], "category": fact["kind"]}, fact


def write_r1_data(root, *, size: int, fps: float, scale: float = 1.0) -> dict:
    """The three splits under `root` (kept when already written): `grpo` and `heldout` as
    eval-mcq JSONL, `cot_sft` as conversations in R1's answer format; `scale` multiplies
    the counts. Returns their paths."""
    root = Path(root)
    paths = {split: root / f"{split}.jsonl" for split in SPLITS}
    if all(p.exists() for p in paths.values()):
        return {split: str(p) for split, p in paths.items()}
    for split, (frames, count) in SPLITS.items():
        drawn = [_question(root, split, i, frames, size, fps)
                 for i in range(max(1, round(count * scale)))]
        records = [_conversation(root, *d) if split == "cot_sft" else d[0] for d in drawn]
        with atomic_file(paths[split]) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {split: str(p) for split, p in paths.items()}


def _conversation(root: Path, record: dict, fact: dict) -> dict:
    """An eval-mcq record as a LLaVA conversation answered in R1's format: the thought
    describes the needle as the demo's captions do ("a red circle"), the answer is the
    option's text (see the module docstring for why not its letter)."""
    lettered = tuple(f"{LETTERS[k]}. {o}" for k, o in enumerate(record["options"]))
    prompt = build_r1_prompt(Question(root / record["video"], record["question"], lettered,
                                      record["answer"]))
    answer = record["options"][LETTERS.index(record["answer"])]
    return {"video": record["video"], "conversations": [
        {"from": "human", "value": f"<video>\n{prompt}"},
        {"from": "gpt", "value": f"<think>{caption(fact, 'image')}</think>"
                                 f"<answer>{answer}</answer>"}]}


def evaluate_r1(checkpoint, tokenizer: str, questions: str, out_dir, *,
                progress: bool = True) -> dict:
    """eval-mcq in R1's style (greedy, `RL_FRAMES` frames) of `checkpoint` on `questions`."""
    from longvila_jax.infer.generate import Generator

    generator = Generator.from_checkpoint(checkpoint, tokenizer=tokenizer)

    def answer(video, prompts):
        return generator.generate(prompts, video=video, num_frames=RL_FRAMES,
                                  max_new_tokens=48)

    return evaluate_mcq(questions, answer, out_dir, progress=progress, style="r1")


def r1_configs(data: dict, r1: dict, long_sft_final, *, parallel=(1, 1, 1)):
    """(CoT SFT config, GRPO config) of the demo model reading `r1`'s splits."""
    from longvila_jax.configs.stages import cot_sft, grpo

    cot = cot_sft.get_config("demo")
    cot.train.update(init_from=str(long_sft_final), num_frames=COT_FRAMES,
                     max_frames=2 * COT_FRAMES, fps=data["fps"])
    cot.data.sources = [dict(name="cot_sft", jsonl=r1["cot_sft"],
                             media_root=str(Path(r1["cot_sft"]).parent), weight=1.0)]
    rl = grpo.get_config("demo")
    rl.train.num_frames = RL_FRAMES
    # At temperature 1 the demo model's samples lost the format within 60 steps (0.9 -> 0);
    # at 0.6 with a stronger KL term they kept it (1.0). Groups whose answers all earn the
    # same reward teach nothing; dropping them skips their update (20 steps: 2.4 min, not
    # the 4.5 min the first 20 of 40 took with them).
    rl.rl.update(questions=r1["grpo"], temperature=0.6, beta=0.04, drop_equal_groups=True)
    rl.optim.total_steps = 20
    for config in (cot, rl):
        config.data.tokenizer = data["tokenizer"]
        config.parallel.data, config.parallel.node, config.parallel.local = parallel
    return cot, rl


def run_r1(workdir, data: dict, long_sft_final, *, progress: bool = True) -> dict:
    """CoT SFT, then GRPO, each evaluated on the held-out questions; returns the summary
    written to `workdir/r1.json` (accuracy before and after, the reward curve's path)."""
    from longvila_jax.rl.loop import train_grpo
    from longvila_jax.train.loop import train

    workdir = Path(workdir)
    size = 56
    r1 = write_r1_data(workdir / "data" / "r1", size=size, fps=data["fps"])
    cot_config, rl_config = r1_configs(data, r1, long_sft_final)
    cot = train(cot_config, workdir / "6_cot_sft", progress=progress)
    before = evaluate_r1(cot, data["tokenizer"], r1["heldout"], workdir / "eval" / "r1_before",
                         progress=progress)
    rl_config.train.init_from = str(cot)
    final = train_grpo(rl_config, workdir / "7_grpo", progress=progress)
    after = evaluate_r1(final, data["tokenizer"], r1["heldout"], workdir / "eval" / "r1_after",
                        progress=progress)
    summary = {"frames": RL_FRAMES, "questions": before["num_questions"],
               "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
               "unanswered_before": before["unanswered"], "unanswered_after": after["unanswered"],
               "rewards_png": str(workdir / "7_grpo" / "rewards.png"), "final": str(final)}
    with atomic_file(workdir / "r1.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    return summary
