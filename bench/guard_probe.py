"""Which non-finite guard of the training step costs no memory: compiled footprints (and
optionally timed steps) of the step with candidate guards, Qwen2-1.5B at 16K tokens.

  python bench/guard_probe.py [--time]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from train_step import bench_config, synthetic_batch

from longvila_jax.memory import planned_bytes
from longvila_jax.parallel.mmsp import loss_fn
from longvila_jax.train.loop import setup, to_model_batch
from longvila_jax.train.step import _all_finite

GIB = 2**30


def candidates(loss, trainable):
    def value_and_grads(model, batch):
        return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, trainable))(model, batch)

    def none(model, optimizer, batch):
        value, grads = value_and_grads(model, batch)
        optimizer.update(model, grads)
        return {"loss": value, "grad_norm": optax.tree.norm(grads)}

    def select(model, optimizer, batch, check_state=True):
        value, grads = value_and_grads(model, batch)
        grad_norm = optax.tree.norm(grads)
        applied = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        before = jax.tree.map(jnp.asarray, (nnx.state(model, trainable), nnx.state(optimizer)))
        optimizer.update(model, grads)
        after = nnx.state(model, trainable), nnx.state(optimizer)
        kept = jax.tree.map(lambda new, old: jnp.where(applied, new, old), after, before)
        nnx.update(model, kept[0])
        nnx.update(optimizer, kept[1])
        out = {"loss": value, "grad_norm": grad_norm, "applied": applied}
        if check_state:
            out["state_finite"] = _all_finite(kept)
        return out

    def cond(model, optimizer, batch):
        value, grads = value_and_grads(model, batch)
        grad_norm = optax.tree.norm(grads)
        applied = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        nnx.cond(applied, lambda m, o, g: [o.update(m, g), None][1], lambda m, o, g: None,
                 model, optimizer, grads)
        return {"loss": value, "grad_norm": grad_norm, "applied": applied,
                "state_finite": _all_finite((nnx.state(model, trainable),
                                             nnx.state(optimizer)))}

    def scaled(model, optimizer, batch):
        """The update itself scaled: gradients zeroed and the optimizer's own state kept by
        a select inside its arithmetic (one fused pass, no second copy)."""
        value, grads = value_and_grads(model, batch)
        grad_norm = optax.tree.norm(grads)
        applied = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        grads = jax.tree.map(lambda g: jnp.where(applied, g, 0), grads)
        before = jax.tree.map(jnp.asarray, nnx.state(optimizer))
        params = jax.tree.map(jnp.asarray, nnx.state(model, trainable))
        optimizer.update(model, grads)
        nnx.update(optimizer, jax.tree.map(lambda n, o: jnp.where(applied, n, o),
                                           nnx.state(optimizer), before))
        nnx.update(model, jax.tree.map(lambda n, o: jnp.where(applied, n, o),
                                       nnx.state(model, trainable), params))
        return {"loss": value, "grad_norm": grad_norm, "applied": applied}

    return {"none": none, "select": select,
            "select, no state check": functools.partial(select, check_state=False),
            "cond": cond, "scaled": scaled}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--time", action="store_true")
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--model", default="qwen2_1_5b")
    args = parser.parse_args()
    bench = argparse.Namespace(model=args.model, mesh=(1, 1, 1), attention="auto",
                               frames=0, seq=args.seq)
    config = bench_config(bench, "selective", args.seq)
    run = setup(config)
    batch = to_model_batch(run, synthetic_batch(config, 1, args.seq, 0, 1,
                                                np.random.default_rng(0)))
    graphdef, state = nnx.split((run.model, run.optimizer))
    print(f"{'guard':>24} {'planned GiB':>12} {'step s':>8}")
    for name, step in candidates(loss_fn(run.mesh, run.layout.scheme), run.trainable).items():
        def pure(state, batch, step=step):
            model, optimizer = nnx.merge(graphdef, state)
            out = step(model, optimizer, batch)
            return nnx.state((model, optimizer)), out

        jitted = jax.jit(pure, donate_argnums=0)
        used = planned_bytes(jitted.lower(state, batch).compile()) / GIB
        seconds = float("nan")
        if args.time:
            state, _ = jitted(state, batch)
            times = []
            for _ in range(4):
                began = time.perf_counter()
                state, out = jitted(state, batch)
                jax.block_until_ready(out)
                times.append(time.perf_counter() - began)
            seconds = float(np.median(times))
        print(f"{name:>24} {used:12.2f} {seconds:8.3f}", flush=True)


if __name__ == "__main__":
    main()
