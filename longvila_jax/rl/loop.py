"""The GRPO stage (LongVILA-R1): `train_grpo(config, workdir)`, a run like every other stage's.

Each step, with MR-SP's reuse:
1. B questions (`rl.prompts_per_step`) in a seeded order, epoch by epoch; each video is
   encoded once (frames over every device) and its embeddings serve the rollouts and every
   log-probability pass of the step (not later steps: each frame's newline row is an LLM
   token embedding, which trains);
2. rollouts: the B prompts prefilled once (sequence-parallel), G answers each
   (`rl.answers`) sampled from the shared prompt caches, with the sampler's
   log-probabilities, from the parameters being trained: before encoding, the engine
   lays out its decoding view of them (`InferenceEngine.update_weights`, an on-device
   re-layout: replicated, layers unstacked) and frees it after the rollout
   (`release_weights`), so the update never holds a second copy of the weights;
3. rewards (`rl.rewards`: named functions and weights), group advantages, DAPO's filter;
4. per minibatch: reference log-probabilities (beta > 0; the stage's initial weights, or
   with LoRA the same weights with the adapters off), the old ones (the sampler's, or
   recomputed by the training forward), then `rl.num_iterations` x minibatches
   optimizer steps of the clipped GRPO loss (`rl/policy_batch.py`) on the MM-SP forward.

Everything a step draws (questions, samples) is a function of `seed` and the step, so a
run resumed from a run checkpoint (parameters and optimizer state) repeats exactly what
the killed run would have done.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from longvila_jax.atomic import atomic_file, remove_temporaries
from longvila_jax.checkpoint import build_model, load_model
from longvila_jax.config import ConfigError
from longvila_jax.data.video import load_frames
from longvila_jax.eval.mcq import Question, build_r1_prompt, load_questions
from longvila_jax.infer.decode import Sampling
from longvila_jax.infer.generate import Generator
from longvila_jax.models.lora import LORA_NAMES
from longvila_jax.parallel import fsdp
from longvila_jax.parallel.mesh import make_mesh
from longvila_jax.parallel.mmsp import logprobs_fn
from longvila_jax.rl.grpo import LossConfig, group_advantages
from longvila_jax.rl.policy_batch import answer_rows, grpo_loss_fn, place
from longvila_jax.rl.rewards import Rewards, parse_weights
from longvila_jax.rl.shared_prompt import SCHEMES, shared_batch, shared_logprobs_fn, shared_loss_fn
from longvila_jax.train.loop import (
    Diverged,
    Run,
    finished,
    interrupted,
    restore_run,
    resumed,
    run_state,
    setup,
    stop_on_ctrl_c,
    tensorboard_note,
    tokenizer_path,
    write_final,
)
from longvila_jax.train.run_checkpoint import RunCheckpoints
from longvila_jax.train.step import make_train_step, state_is_finite


def step_questions(count: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the questions step `step` asks: the file's questions in a new seeded order
    each epoch, `per_step` at a time (a step may span two epochs)."""
    orders = {}  # epoch -> its order (a step spans at most two)
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, at = divmod(i, count)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(count)
        out.append(int(orders[epoch][at]))
    return out


OLD_LOGPROBS = ("sampler", "recompute")


def rl_settings(config) -> tuple[LossConfig, Rewards]:
    """The `rl` section's loss settings and reward functions, checked (`ConfigError` naming
    the key) before anything heavy runs."""
    rl = config.rl
    for key in ("prompts_per_step", "answers", "max_new_tokens", "num_iterations",
                "minibatches"):
        if not isinstance(rl[key], int) or rl[key] < 1:
            raise ConfigError(f"rl.{key}: invalid value {rl[key]!r} (expected a positive "
                              "integer)")
    if rl.answers < 2:
        raise ConfigError(f"rl.answers: invalid value {rl.answers} (a group needs >= 2)")
    if rl.prompts_per_step * rl.answers % rl.minibatches:
        raise ConfigError(f"rl.minibatches: {rl.minibatches} does not divide the step's "
                          f"{rl.prompts_per_step * rl.answers} answers")
    if rl.old_logprobs not in OLD_LOGPROBS:
        raise ConfigError(f"rl.old_logprobs: invalid value {rl.old_logprobs!r} (one of "
                          f"{OLD_LOGPROBS})")
    try:
        Sampling(rl.max_new_tokens, rl.answers, rl.temperature, rl.top_p)
    except ValueError as err:
        raise ConfigError(f"rl.temperature / rl.top_p: {err}") from None
    try:
        loss = LossConfig(clip_low=rl.clip_low, clip_high=rl.clip_high,
                          dual_clip=rl.dual_clip, log_ratio_clamp=rl.log_ratio_clamp,
                          kl=rl.kl, beta=rl.beta)
        rewards = Rewards(parse_weights(rl.rewards))
    except ValueError as err:
        message = str(err)
        raise ConfigError(message if message.startswith("rl.") else f"rl.rewards: {message}"
                          ) from None
    return loss, rewards


def shares_prompts(config, run: Run) -> bool:
    """Whether the log-probability passes compute each prompt once (`rl.shared_prompt`;
    unset: wherever it can, on one device or under Ulysses)."""
    shared = config.rl.shared_prompt
    return run.layout.scheme in SCHEMES if shared is None else shared


def check_rl_config(config, run: Run) -> None:
    """What the GRPO loop needs of the mesh and the model."""
    if config.parallel.data != 1:
        raise ConfigError(f"parallel.data: {config.parallel.data}; the GRPO stage needs 1 "
                          "(rollouts use one sequence group over every device)")
    shared = config.rl.shared_prompt
    if shared and run.layout.scheme not in SCHEMES:
        raise ConfigError(f"rl.shared_prompt: True under the {run.layout.scheme!r} scheme "
                          "(it needs one device or Ulysses; unset, it is used where it can "
                          "be)")
    moving = [path for path, _ in nnx.to_flat_state(nnx.state(run.model, run.trainable))
              if path[0] in ("vision_tower", "projector")]
    if moving:
        raise ConfigError(f"train.trainable: {config.train.trainable!r} trains "
                          f"{'/'.join(map(str, moving[0]))}; the GRPO update takes each "
                          "video's embeddings as computed for the step (the tower does not "
                          "run in it), so the vision tower and projector must stay frozen")
    if run.model.vision_tower is None:
        raise ConfigError("model.vision.enabled: False; the GRPO stage answers about videos")


def _reference(config, run: Run):
    """`reference(model) -> model`, the reference policy for the KL term, or None (beta 0):
    with LoRA, the trained model with its adapters off (`adapters_off`, no second copy of
    the base weights); else a frozen copy of the stage's initial weights, FSDP-sharded like
    the trained ones."""
    if config.rl.beta == 0:
        return None
    if config.model.lora.rank > 0:
        return adapters_off
    init = config.train.init_from
    frozen = load_model(init, config) if init else build_model(config)
    fsdp.place(frozen, None, run.mesh)
    return lambda _: frozen


def adapters_off(model):
    """`model`'s graph over the same arrays but every LoRA `lora_b` zero: the base policy."""
    graphdef, state = nnx.split(model)

    def off(tree):
        return {k: jnp.zeros_like(v) if k == LORA_NAMES[1] else
                off(v) if isinstance(v, dict) else v for k, v in tree.items()}

    pure = off(nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


class _Trainer:
    """The state of a GRPO run between steps: the training run, its generator (engine over
    the same devices), the questions, the reward functions and the reference policy."""

    def __init__(self, config, run: Run, questions: list[Question]):
        self.config, self.run, self.questions = config, run, questions
        self.loss_config, self.rewards = rl_settings(config)
        p = config.parallel
        engine_mesh = make_mesh(1, p.node, p.local, list(run.mesh.devices.flat))
        self.generator = Generator(run.model, tokenizer_path(config),
                                   family=config.model.llm.family, mesh=engine_mesh,
                                   scheme=run.layout.scheme)
        self.generator.engine.release_weights()  # laid out again before each rollout
        # Rows prompt + answer on the MM-SP forward (`rl/policy_batch.py`), or each prompt
        # once beside its answers (`rl.shared_prompt`).
        if shares_prompts(config, run):
            loss = shared_loss_fn(run.mesh, run.layout.scheme, self.loss_config)
            self.batch = self._shared_batch
            self.logprobs = nnx.jit(shared_logprobs_fn(run.mesh, run.layout.scheme))
        else:
            loss = grpo_loss_fn(run.mesh, run.layout.scheme, self.loss_config)
            self.batch = self._rows_batch
            self.logprobs = nnx.jit(logprobs_fn(run.mesh, run.layout.scheme))
        self.step_fn = make_train_step(loss, run.trainable)
        self.reference = _reference(config, run)

    def step(self, step: int) -> dict:
        """Run step `step`; its metrics (host values)."""
        config, rl, run, gen = self.config, self.config.rl, self.run, self.generator
        times = {}
        began = time.perf_counter()
        gen.engine.update_weights(run.model)  # the parameters being trained, laid out
        times["weights_s"] = time.perf_counter() - began
        began = time.perf_counter()
        picked = [self.questions[i] for i in step_questions(
            len(self.questions), step, rl.prompts_per_step, config.seed)]
        tables, offsets, prompts, seen, rows = [], [], [], {}, 0
        for q in picked:
            if q.video not in seen:
                # Encoded per step: the frames' newline rows are LLM embeddings, which train.
                table = gen.engine.encode(load_frames(
                    q.video, config.train.num_frames, image_size=config.model.vision.image_size,
                    fps=config.train.fps or None))
                seen[q.video] = (rows, table.shape[0])
                tables.append(table.reshape(-1, table.shape[-1]))
                rows += tables[-1].shape[0]
            offsets.append(seen[q.video][0])
            prompts.append(gen.prompt_ids(build_r1_prompt(q), seen[q.video][1]))
        table = jnp.concatenate(tables) if len(tables) > 1 else tables[0]
        times["encode_s"] = time.perf_counter() - began

        began = time.perf_counter()
        sampling = Sampling(rl.max_new_tokens, rl.answers, rl.temperature, rl.top_p,
                            seed=int(np.random.default_rng([config.seed, step]).integers(1 << 31)),
                            stop_ids=tuple(gen.stop_ids), keep_stop=True)
        ids, sampler_logprobs = gen.engine.generate_ids_and_logprobs(prompts, table, offsets,
                                                                     sampling=sampling)
        gen.engine.release_weights()
        times["rollout_s"] = time.perf_counter() - began
        answer_tokens = sum(len(a) for a in ids)

        texts = [gen.tokenizer.decode(a) for a in ids]
        samples = [{"question": q.question, "options": q.options, "answer": q.answer}
                   for q in picked for _ in range(rl.answers)]
        scores = self.rewards.scores(texts, samples)
        rewards = np.asarray(scores["total"], np.float64).reshape(len(picked), rl.answers)
        advantages, kept = group_advantages(rewards, drop_equal=rl.drop_equal_groups)

        metrics = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                   "answer_tokens_mean": answer_tokens / len(ids),
                   "filtered_groups": int((~kept).sum()),
                   "rollout_tokens_per_s": answer_tokens / times["rollout_s"]}
        for name in self.rewards.functions:
            metrics[f"reward_{name}"] = float(np.mean(scores[name]))
        update = self._update(prompts, offsets, ids, sampler_logprobs, advantages, kept, table)
        times.update(update.pop("times"))
        metrics.update(update)
        metrics.update(times)
        return metrics

    def _update(self, prompts, offsets, ids, sampler_logprobs, advantages, kept, table):
        """Reference and old log-probabilities, then the optimizer steps; the updates'
        mean metrics and their phases' seconds."""
        rl, run = self.config.rl, self.run
        n = rl.answers
        keep_rows = [r for r in range(len(ids)) if kept[r // n]]
        times = {"reference_s": 0.0, "update_s": 0.0}
        if not keep_rows:
            return {"times": times, "updates": 0}
        chunks = np.array_split(np.asarray(keep_rows), rl.minibatches)
        batches = []
        for chunk in chunks:
            if not len(chunk):
                continue
            batch, inputs = self.batch(chunk, prompts, offsets, ids, sampler_logprobs,
                                       advantages.reshape(-1), table)
            began = time.perf_counter()
            if self.reference is not None:
                batch = dataclasses.replace(batch, ref_logprobs=self.logprobs(
                    self.reference(run.model), *inputs(batch)))
            if rl.old_logprobs == "recompute":
                batch = dataclasses.replace(batch, old_logprobs=self.logprobs(
                    run.model, *inputs(batch)))
            jax.block_until_ready(batch)
            times["reference_s"] += time.perf_counter() - began
            batches.append(batch)
        began = time.perf_counter()
        outs = []
        for _ in range(rl.num_iterations):
            for batch in batches:
                outs.append(self.step_fn(run.model, run.optimizer, batch))
        outs = jax.device_get(outs)
        times["update_s"] = time.perf_counter() - began
        bad = [o for o in outs if not o["applied"]]
        if bad:
            raise _NonFinite(f"loss {float(bad[0]['loss'])}, gradient norm "
                             f"{float(bad[0]['grad_norm'])}")
        keys = [k for k in outs[0] if k != "applied"]
        return {"times": times, "updates": len(outs),
                **{k: float(np.mean([o[k] for o in outs])) for k in keys}}

    def _rows_batch(self, chunk, prompts, offsets, ids, sampler_logprobs, advantages, table):
        """Rows `chunk` as rows prompt + answer (`PolicyBatch`), and how a log-probability
        pass takes them."""
        run, n = self.run, self.config.rl.answers
        rows = answer_rows([prompts[r // n] for r in chunk], [ids[r] for r in chunk], 1,
                           2 * run.layout.group, self.generator.engine.media_token_id,
                           [offsets[r // n] for r in chunk])
        old = rows.per_token([sampler_logprobs[r] for r in chunk])
        batch = place(rows, run.layout, run.mesh, table, old, advantages[chunk])
        return batch, lambda b: (b.tokens, b.table)

    def _shared_batch(self, chunk, prompts, offsets, ids, sampler_logprobs, advantages, table):
        """Rows `chunk` grouped by question (`SharedBatch`: each prompt once, its answers in
        `chunk` beside it), and how a log-probability pass takes them."""
        n = self.config.rl.answers
        questions = sorted({int(r) // n for r in chunk})
        groups = [[int(r) for r in chunk if r // n == q] for q in questions]
        batch = shared_batch([prompts[q] for q in questions],
                             [[ids[r] for r in g] for g in groups],
                             [[sampler_logprobs[r] for r in g] for g in groups],
                             [[advantages[r] for r in g] for g in groups],
                             self.generator.engine.media_token_id,
                             [offsets[q] for q in questions], table, self.run.layout.group)
        return batch, lambda b: (b.rows, b.table)


class _NonFinite(Exception):
    pass


def train_grpo(config, workdir, *, progress: bool = True) -> Path:
    """Run (or resume, or skip if finished) the GRPO stage; returns its final checkpoint.

    Writes what every stage writes (`checkpoints/`, `tensorboard/`, `final/`) and
    `rewards.png`, the reward curve, and `metrics.jsonl`, one line per step.
    """
    workdir = Path(workdir).absolute()
    if finished(workdir):
        return workdir / "final"
    tokenizer_path(config)
    rl_settings(config)
    if not config.rl.questions or not Path(config.rl.questions).is_file():
        raise ConfigError(f"rl.questions: {config.rl.questions!r} is not a JSONL file")
    try:
        questions = load_questions(config.rl.questions)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    if jax.process_index() == 0:
        remove_temporaries(workdir)
    run = setup(config)
    config = run.config
    check_rl_config(config, run)
    trainer = _Trainer(config, run, questions)
    total = config.optim.total_steps
    with RunCheckpoints(workdir / "checkpoints", keep=config.train.keep,
                        every=config.train.checkpoint_every) as checkpoints:
        start = restore_run(run, checkpoints)
        resumed(start, checkpoints)
        log = _MetricsLog(workdir, start, progress, total, config.train.stage)
        try:
            with stop_on_ctrl_c() as stop_asked:
                for step in range(start, total):
                    try:
                        metrics = trainer.step(step)
                    except _NonFinite as e:
                        checkpoints.wait()
                        good = checkpoints.latest_step()
                        raise Diverged(
                            f"step {step + 1}: {e}, not finite; last good checkpoint: "
                            f"{checkpoints.directory / str(good) if good else 'none'}") from None
                    log.write(step + 1, metrics)
                    stopping = stop_asked()
                    if step + 1 == total or checkpoints.should_save(step + 1) or stopping:
                        state = run_state(run)
                        if not state_is_finite(state):
                            raise Diverged(f"step {step + 1}: the parameters or optimizer "
                                           "state are not finite")
                        checkpoints.save(step + 1, state, force=True)
                        log.flush()
                    if stopping:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise interrupted(checkpoints) from None
        finally:
            log.close()
    return write_final(run, workdir / "final")


class _MetricsLog:
    """Per step: tqdm (reward, accuracy, rollout tokens/s), TensorBoard and
    `metrics.jsonl` (lines past the step a run resumes from are dropped), and at the end
    `rewards.png`."""

    def __init__(self, workdir: Path, start: int, progress: bool, total: int, stage: str):
        self._path = workdir / "metrics.jsonl"
        self._png = workdir / "rewards.png"
        self._rows = []
        if self._path.exists():
            self._rows = [row for row in map(json.loads, self._path.read_text().splitlines())
                          if row["step"] <= start]
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(workdir / "tensorboard"),
                                         purge_step=start + 1 if start else None)
            tensorboard_note(workdir / "tensorboard")
        self._bar = tqdm.tqdm(total=total, initial=start, desc=stage,
                              disable=not progress or self._writer is None)

    def write(self, step: int, metrics: dict) -> None:
        self._rows.append({"step": step, **metrics})
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(key, value, step)
        self._bar.update()
        shown = {"reward": f"{metrics['reward_mean']:.3f}",
                 "tok/s": f"{metrics['rollout_tokens_per_s']:.0f}"}
        if "reward_mcq_accuracy" in metrics:
            shown["acc"] = f"{metrics['reward_mcq_accuracy']:.2f}"
        self._bar.set_postfix(shown, refresh=False)

    def flush(self) -> None:
        if jax.process_index() != 0:
            return
        with atomic_file(self._path) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in self._rows))
        self._writer.flush()
        self._plot()

    def _plot(self) -> None:
        from matplotlib.figure import Figure

        rows = self._rows
        if not rows:
            return
        figure = Figure(figsize=(6, 3.5))
        ax = figure.add_subplot()
        steps = [r["step"] for r in rows]
        for key in ("reward_mean", "reward_mcq_accuracy", "reward_format"):
            if key in rows[0]:
                ax.plot(steps, [r[key] for r in rows], label=key.removeprefix("reward_"))
        ax.set_xlabel("step")
        ax.set_ylim(-0.05, 1.05)
        ax.legend()
        ax.grid(alpha=0.3)
        figure.tight_layout()
        with atomic_file(self._png) as tmp:
            figure.savefig(tmp, format="png", dpi=100)

    def close(self) -> None:
        self._bar.close()
        if self._writer is not None:
            self._writer.close()
