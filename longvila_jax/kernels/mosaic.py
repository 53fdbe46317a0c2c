"""Attention for Hopper in Pallas Mosaic GPU: a forward and a backward.

Why a second kernel: every sequence-parallel step attends with positions and segment ids,
which cuDNN cannot take, and our Triton forward reaches ~0.8x cuDNN on an H200. Mosaic GPU
exposes what Triton hides: warp specialisation, wgmma with register accumulators and
explicit shared-memory pipelines.

One program per (query head, pair of 64-row query tiles, batch row), three warpgroups:
- a producer streams K/V tiles by TMA into a ring of shared-memory slots;
- two consumers, one per query tile, each runs the online softmax over the same K/V tiles;
  they take turns on the tensor cores (a two-party barrier), so one's softmax overlaps
  the other's matrix products.
Both sides walk one list per query pair, `tiles.tile_lists`: the kv tiles it may see,
ascending, as a masked head, a run of fully visible tiles and a masked tail. Hidden tiles
are never loaded; only the masked loops read positions and segment ids (from global
memory, a few hundred bytes per tile) and build the mask. The softmax works in base 2 with
the scale folded into one multiply-add, as the Triton kernel does. The lists are
quadratic in tiles (int32 per tile pair: 256 KB at 32K tokens, 16 MB at 256K tokens per
device and batch row), built by XLA before each call.

The backward (`backward`) is described where it is defined; `BACKWARD = "triton"` swaps
in the Triton kernels' instead.

Layouts match the API: q/out `[b, sq, h, d]`, k/v `[b, skv, kh, d]`, lse `[b, h, sq]`.
GQA reads K/V head `h // (h // kh)` without repeating it. Lengths that are not multiples
of the tiles are padded here (the padded keys are masked by index, the padded rows cut).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from longvila_jax.kernels.softmax_rows import LOG2E, backward_rows
from longvila_jax.kernels.tiles import tile_lists

BLOCK_Q = 64  # query rows per consumer warpgroup; a program holds two


class Blocks(NamedTuple):
    """The forward's K/V tile rows and shared-memory ring depth."""

    block_kv: int
    stages: int


# Picked by `bench/attention.py --sweep` on an H200 (bench/NOTES.md).
FWD = Blocks(block_kv=128, stages=2)
HEAD_DIMS = (64, 128)
LN2 = math.log(2.0)

# Mosaic GPU's in-kernel profiler: (ranges per warpgroup, trace directory), or None.
# `bench/mosaic_profile.py` sets it and sums the kernels' named regions per warpgroup.
PROFILE: tuple[int, str] | None = None

_ACC = plgpu.Layout.WGMMA
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per query row
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per key column


def supports(q) -> bool:
    """Whether this kernel runs `q`: Hopper, bf16/fp16, head dim 64 or 128."""
    device = jax.devices()[0]
    return (device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"
            and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] in HEAD_DIMS)


def _kernel(q_ref, k_ref, v_ref, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref, order_ref,
            counts_ref, out_ref, lse_ref, smem, ready, free, turn, *, causal, scale_log2, groups,
            skv, n_pairs, block_kv, stages):
    (qo_smem, k_smem, v_smem, lse_smem), (q_ready, k_ready, v_ready), (k_free, v_free) = \
        smem, ready, free
    head = lax.axis_index("heads")
    pair = n_pairs - 1 - lax.axis_index("pairs")  # causal: the longest rows start first
    b = lax.axis_index("batch")
    wg = lax.axis_index("wg")
    n_head, n_full, n_tail = (counts_ref[r, b, pair] for r in range(3))
    steps = n_head + n_full + n_tail
    dtype = q_ref.dtype
    shape = (BLOCK_Q, block_kv)

    def take_turn():
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    def rows(x, width):
        return lax.broadcast_in_dim(x, (BLOCK_Q, width), [0])

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        q0 = pair * (2 * BLOCK_Q) + wg * BLOCK_Q
        q_smem = qo_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, BLOCK_Q), head], q_smem,
                                q_ready.at[wg])
        q_pos = plgpu.load(q_pos_ref.at[b, pl.ds(q0, BLOCK_Q)], layout=_ROW, optimized=False)
        q_seg = plgpu.load(q_seg_ref.at[b, pl.ds(q0, BLOCK_Q)], layout=_ROW, optimized=False)
        plgpu.barrier_wait(q_ready.at[wg])

        def visible(i):
            kv0 = order_ref[b, pair, i] * block_kv
            cols = pl.ds(kv0, block_kv)
            kv_seg = plgpu.load(kv_seg_ref.at[b, cols], layout=_COL, optimized=False)
            seen = rows(q_seg, block_kv) == lax.broadcast_in_dim(kv_seg, shape, [1])
            if causal:
                kv_pos = plgpu.load(kv_pos_ref.at[b, cols], layout=_COL, optimized=False)
                seen &= lax.broadcast_in_dim(kv_pos, shape, [1]) <= rows(q_pos, block_kv)
            if skv % block_kv:  # keys padded to the tile: hide them by index
                index = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=_ACC)
                seen &= index + kv0 < skv
            return seen

        def step(i, carry, masked):
            acc, m, denom = carry
            slot = lax.rem(i, stages)

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                take_turn()  # the other consumer's softmax runs while these products do
                return acc_ref[...]

            with jax.named_scope("scores"):
                s = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:
                s = jnp.where(visible(i), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1) * scale_log2)
            # A row that has seen nothing yet subtracts 0, so exp2(-inf) stays 0.
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
            alpha = jnp.exp2(m - m_use)
            p = jnp.exp2(s * scale_log2 - rows(m_use, block_kv))
            denom = denom * alpha + p.sum(axis=1)
            acc = acc * rows(alpha, acc.shape[1])
            p16 = p.astype(dtype)
            acc, denom, m_new, p16 = lax.optimization_barrier((acc, denom, m_new, p16))
            plgpu.barrier_arrive(turn)  # softmax done: the tensor cores are the other's
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(turn)

            def values(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                # Wait for the next K tile while this product runs.
                pl.when(i + 1 < steps)(
                    lambda: plgpu.barrier_wait(k_ready.at[lax.rem(i + 1, stages)]))

            with jax.named_scope("values"):
                acc = pl.run_state(values)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, denom

        m = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), _ROW)
        denom = plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), _ROW)
        acc = plgpu.layout_cast(jnp.zeros((BLOCK_Q, q_ref.shape[-1]), jnp.float32), _ACC)
        pl.when(steps > 0)(lambda: plgpu.barrier_wait(k_ready.at[0]))
        pl.when(wg == 1)(take_turn)
        acc, m, denom = _walk((n_head, n_full, n_tail), step, (acc, m, denom))
        pl.when(wg == 0)(take_turn)

        seen = denom > 0.0
        inv = jnp.where(seen, 1.0 / jnp.where(seen, denom, 1.0), 0.0)
        q_smem[...] = (acc * rows(inv, acc.shape[1])).astype(dtype)
        lse_smem.at[wg][...] = jnp.where(seen, m * LN2 + jnp.log(jnp.where(seen, denom, 1.0)),
                                         -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, pl.ds(q0, BLOCK_Q), head])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, head, pl.ds(q0, BLOCK_Q)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.array(groups, head.dtype))

        @pl.loop(0, steps)
        def _load(i):
            slot = lax.rem(i, stages)
            cols = pl.ds(order_ref[b, pair, i] * block_kv, block_kv)
            for ref, smem, ready, free in ((k_ref, k_smem, k_ready, k_free),
                                           (v_ref, v_smem, v_ready, v_free)):
                # The slot is free once both consumers are done with its last tile.
                pl.when(i >= stages)(lambda free=free: plgpu.barrier_wait(free.at[slot]))
                plgpu.copy_gmem_to_smem(ref.at[b, cols, kv_head], smem.at[slot],
                                        ready.at[slot])


def _walk(counts, step, carry):
    """Run `step(i, carry, masked)` over a tile list's masked head, full run and masked
    tail (`tiles.tile_lists` counts), i counting through the whole list.

    Each loop counts from 0: under shard_map the counts vary over the mesh, and a loop
    whose index starts at one of them fails JAX's carry-type check inside the kernel.
    """
    n_head, n_full, _ = counts
    for start, count, masked in zip((0, n_head, n_head + n_full), counts, (True, False, True),
                                    strict=True):
        carry = lax.fori_loop(
            0, count, lambda j, c, start=start, masked=masked: step(start + j, c, masked),
            carry)
    return carry


def _compiler_params():
    if PROFILE is None:
        return plgpu.CompilerParams(approx_math=True)
    # The profiler's buffers take shared memory (16 bytes per region and warpgroup): the
    # backward leaves ~18 KB, so regions past the space are dropped, not an error.
    return plgpu.CompilerParams(approx_math=True, profile_space=PROFILE[0],
                                profile_dir=PROFILE[1], profile_bounds_check=True)


def _pad(x, length, mode="constant"):
    if x.shape[1] == length:
        return x
    width = [(0, 0)] * x.ndim
    width[1] = (0, length - x.shape[1])
    return jnp.pad(x, width, mode=mode)


def _padded(arrays, sq_pad, skv_pad):
    """The mask's int32 positions and segment ids, edge-padded to the kernels' lengths (a
    padded row or key repeats the last one's; the kernels hide padded keys by index)."""
    q_pos, kv_pos, q_seg, kv_seg = arrays
    return (_pad(q_pos, sq_pad, "edge"), _pad(kv_pos, skv_pad, "edge"),
            _pad(q_seg, sq_pad, "edge"), _pad(kv_seg, skv_pad, "edge"))


def forward(q, k, v, mask, spec):
    b, sq, h, d = q.shape
    skv, kh = k.shape[1], k.shape[2]
    arrays = [x.astype(jnp.int32) for x in mask.arrays()]
    block_kv, stages = FWD
    order, counts = tile_lists(*arrays, spec.causal, 2 * BLOCK_Q, block_kv)
    n_pairs = -(-sq // (2 * BLOCK_Q))
    sq_pad, skv_pad = n_pairs * 2 * BLOCK_Q, -(-skv // block_kv) * block_kv
    q, k, v = _pad(q, sq_pad), _pad(k, skv_pad), _pad(v, skv_pad)

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = functools.partial(_kernel, causal=bool(spec.causal),
                               scale_log2=float(spec.scale * LOG2E), groups=h // kh, skv=skv,
                               n_pairs=n_pairs, block_kv=block_kv, stages=stages)

    out, lse = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((b, h, sq_pad), jnp.float32)),
        scratch_types=(
            (plgpu.SMEM((2, BLOCK_Q, d), q.dtype, transforms=tiled),
             plgpu.SMEM((stages, block_kv, d), k.dtype, transforms=tiled),
             plgpu.SMEM((stages, block_kv, d), v.dtype, transforms=tiled),
             plgpu.SMEM((2, BLOCK_Q), jnp.float32)),
            (plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=stages)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2)),
        grid=(h, n_pairs, b), grid_names=("heads", "pairs", "batch"),
        num_threads=3, thread_name="wg", kernel_name="attention_forward",
        compiler_params=_compiler_params(),
    )(q, k, v, *_padded(arrays, sq_pad, skv_pad), order, counts)
    # In a scanned training step XLA ran this kernel twice per layer (bench/NOTES.md): once
    # for the next projection and once more late in the layer for the saved residuals. A
    # barrier as its only user leaves XLA nothing to duplicate.
    return lax.optimization_barrier((out[:, :sq], lse[:, :, :sq]))


# Which backward the mosaic backend runs: "mosaic" (`_backward_kernel`) or "triton" (the
# Triton kernels). Picked by `bench/attention.py --sweep` on an H200: fwd+bwd at 8K / 16K /
# 32K 4.5 / 16.2 / 64.9 ms with this backward, 5.2 / 18.1 / 72.4 with Triton's (measured
# before the in-kernel dK/dV sum and the dS store under dV/dK, which made it faster since;
# bench/NOTES.md).
BACKWARD = "mosaic"
BWD_STAGES = 2  # Q/dO ring depth of the Mosaic backward (smem: 225 KB at head dim 128)


def _loop_zero(tile):
    """0, from a tile index (never negative) read inside the loop.

    A shared-memory buffer the loop reads at a fixed index has fixed wgmma descriptors,
    which LLVM hoists out of the loop: one 64-bit value per 16-column step of each product,
    32 in the backward. ptxas then kept 64 registers for them and spilled 508 bytes,
    reloaded before the products every step. Indexed with this zero, the descriptors are
    recomputed each step by a few integer adds and nothing spills: 32K causal fwd+bwd
    64.6-65.2 -> 54.0-54.6 ms on an H200 (bench/NOTES.md item 53).
    """
    return jnp.minimum(tile, 0)


def _backward_kernel(q_ref, k_ref, v_ref, do_ref, stats_ref, q_pos_ref, kv_pos_ref, q_seg_ref,
                     kv_seg_ref, order_ref, counts_ref, dq_ref, dkv_ref, smem, ready,
                     q_free, ds_ready, ds_free, *, causal, scale_log2, groups, skv, stages):
    k_smem, v_smem, q_smem, do_smem, stats_smem, ds_smem, f32_smem, tile_smem = smem
    k_ready, v_ready, q_ready, do_ready, stats_ready = ready
    block = lax.axis_index("kv")
    head = lax.axis_index("heads")
    b = lax.axis_index("batch")
    wg = lax.axis_index("wg")
    n_head, n_full, n_tail = (counts_ref[r, b, block] for r in range(3))
    steps = n_head + n_full + n_tail
    dtype = q_ref.dtype
    d = q_ref.shape[-1]
    shape = (BLOCK_Q, BLOCK_Q)  # [key rows, query columns]: the transposed scores

    def cols(x):
        return lax.broadcast_in_dim(x, shape, [1])

    def rows(x):
        return lax.broadcast_in_dim(x, shape, [0])

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(240, action="increase")
        kv0 = block * (2 * BLOCK_Q) + wg * BLOCK_Q
        kv_head = lax.div(head, jnp.array(groups, head.dtype))
        my_k, my_v, my_f32 = (x.at[wg] for x in (k_smem, v_smem, f32_smem))
        plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(kv0, BLOCK_Q), kv_head], my_k, k_ready.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(kv0, BLOCK_Q), kv_head], my_v, v_ready.at[wg])
        kv_pos = plgpu.load(kv_pos_ref.at[b, pl.ds(kv0, BLOCK_Q)], layout=_ROW, optimized=False)
        kv_seg = plgpu.load(kv_seg_ref.at[b, pl.ds(kv0, BLOCK_Q)], layout=_ROW, optimized=False)
        plgpu.barrier_wait(k_ready.at[wg])
        plgpu.barrier_wait(v_ready.at[wg])
        zeros = plgpu.layout_cast(jnp.zeros((BLOCK_Q, d), jnp.float32), _ACC)

        def visible(q0):
            q_rows = pl.ds(q0, BLOCK_Q)
            q_seg = plgpu.load(q_seg_ref.at[b, q_rows], layout=_COL, optimized=False)
            seen = rows(kv_seg) == cols(q_seg)
            if causal:
                q_pos = plgpu.load(q_pos_ref.at[b, q_rows], layout=_COL, optimized=False)
                seen &= rows(kv_pos) <= cols(q_pos)
            if skv % (2 * BLOCK_Q):  # keys padded to the block: hide them by index
                index = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=_ACC)
                seen &= index + kv0 < skv
            return seen

        def step(i, carry, masked):
            dk, dv = carry
            slot = lax.rem(i, stages)
            q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
            with jax.named_scope("wait_tiles"):
                for ready in (q_ready, do_ready, stats_ready):
                    plgpu.barrier_wait(ready.at[slot])
            # The producer left the tile's index in shared memory: a global read here
            # stalled every step (~0.6 us, bench/NOTES.md).
            tile = tile_smem[slot]
            q0 = tile * BLOCK_Q
            w = wg + _loop_zero(tile)
            k_rows, v_rows = k_smem.at[w], v_smem.at[w]

            def scores(refs):
                s_ref, dp_ref = refs
                plgpu.wgmma(s_ref, k_rows, q_tile.transpose((1, 0)))
                plgpu.wgmma(dp_ref, v_rows, do_tile.transpose((1, 0)))
                return s_ref[...], dp_ref[...]

            with jax.named_scope("scores"):
                s, dp = pl.run_scoped(scores, (plgpu.ACC(shape, jnp.float32),) * 2)
            with jax.named_scope("softmax_terms"):
                lse2 = plgpu.load(stats_smem.at[slot, 0], layout=_COL)
                delta = plgpu.load(stats_smem.at[slot, 1], layout=_COL)
                p = jnp.exp2(s * scale_log2 - cols(lse2))  # rows that saw nothing: +inf
                if masked:
                    p = jnp.where(visible(q0), p, 0.0)
                ds = p * (dp - cols(delta))
                ds16, p16 = ds.astype(dtype), p.astype(dtype)
            # Consumer `w` makes dQ for the tiles with i % 2 == w, one step late: dS^T of
            # tile i goes to slot i % 2, read by that slot's owner after its next tile's
            # dV/dK, by when the other consumer stored its half long ago. In the same step
            # (as before) each consumer waited at every other tile for the other to finish
            # a dQ: 1-2 % slower at 32K, 2-3 % at 8K, up to 6 % packed (bench/NOTES.md).
            turn = lax.rem(i, 2)
            mine = turn == wg

            def grads(refs):
                dv_ref, dk_ref = refs
                plgpu.wgmma(dv_ref, p16, do_tile)
                plgpu.wgmma(dk_ref, ds16, q_tile)
                # dS goes to shared memory while the products run (before them: 8K and
                # the packed case 4-5 % slower, bench/NOTES.md).
                with jax.named_scope("store_ds"):
                    # The other's slot: wait until its dQ two tiles back has read it.
                    pl.when(jnp.logical_and(i >= 2, jnp.logical_not(mine)))(
                        lambda: plgpu.barrier_wait(ds_free.at[turn]))
                    ds_smem.at[turn, wg][...] = ds16
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(ds_ready.at[turn])

            with jax.named_scope("grads"):
                dv, dk = pl.run_state(grads)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
            plgpu.barrier_arrive(q_free.at[slot])

            @pl.when(mine)
            def _remember():  # the query tile of the dQ it makes next step
                tile_smem[stages + wg] = tile

            pl.when(jnp.logical_and(i >= 1, jnp.logical_not(mine)))(d_query)
            return dk, dv

        def d_query():
            """This consumer's dQ for all 128 keys of its pending tile (dS^T slot `wg`)."""
            pending = tile_smem[stages + wg]
            q0 = pending * BLOCK_Q
            zero = _loop_zero(pending)

            def product(acc_ref):
                for w in (0, 1):
                    plgpu.wgmma(acc_ref, ds_smem.at[wg + zero, w].transpose((1, 0)),
                                k_smem.at[w + zero])
                return acc_ref[...]

            # Each slot's barrier has one waiter, so its phases stay in step.
            plgpu.barrier_wait(ds_ready.at[wg])
            with jax.named_scope("d_query"):
                dq = pl.run_scoped(product, plgpu.ACC((BLOCK_Q, d), jnp.float32))
            plgpu.barrier_arrive(ds_free.at[wg])  # the other may store its dS here
            with jax.named_scope("store_dq"):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # its last dQ left
                my_f32[...] = dq
                plgpu.commit_smem()
                # Every key block adds its part of this query tile's dQ: a TMA reduction.
                plgpu.copy_smem_to_gmem(my_f32, dq_ref.at[b, pl.ds(q0, BLOCK_Q), head],
                                        reduction_op="add")

        grads = _walk((n_head, n_full, n_tail), step, (zeros, zeros))
        # The last tile's dQ.
        pl.when(jnp.logical_and(steps >= 1, lax.rem(steps - 1, 2) == wg))(d_query)
        # The query heads of a KV head's group add into its rows: a TMA reduction.
        for grad, out_ref in zip(grads, (dkv_ref.at[0], dkv_ref.at[1]), strict=True):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            my_f32[...] = grad
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_f32, out_ref.at[b, pl.ds(kv0, BLOCK_Q), kv_head],
                                    reduction_op="add")
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(24, action="decrease")

        @pl.loop(0, steps)
        def _load(i):
            slot = lax.rem(i, stages)
            tile = order_ref[b, block, i]
            q_rows = pl.ds(tile * BLOCK_Q, BLOCK_Q)
            # The slot is free once both consumers are done with its last tile.
            with jax.named_scope("wait_free"):
                pl.when(i >= stages)(lambda: plgpu.barrier_wait(q_free.at[slot]))
            tile_smem[slot] = tile  # before the barrier arrivals that publish it
            plgpu.copy_gmem_to_smem(q_ref.at[b, q_rows, head], q_smem.at[slot], q_ready.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[b, q_rows, head], do_smem.at[slot],
                                    do_ready.at[slot])
            plgpu.copy_gmem_to_smem(stats_ref.at[b, head, :, q_rows], stats_smem.at[slot],
                                    stats_ready.at[slot])


def backward(q, k, v, mask, out, lse, d_out, d_lse, spec):
    """dq, dk, dv from the final out/lse (a ring's merged ones too).

    One program per (query head, block of 128 keys, batch row): two consumer warpgroups each
    keep 64 key rows of K/V in shared memory and walk the query tiles that block may see
    (`tile_lists(over_q=True)`) as a producer streams Q, dO, lse and delta (and the tile's
    index) in; per tile each consumer makes S^T, dP^T, dV and dK for its 64 keys, and the
    two take turns at dQ for all 128, a tile late (both dS^T through shared memory), which
    leaves as a float32 partial added into one float32 buffer by a TMA reduction: no second
    pass over K/V as the Triton backward makes, and half the reductions of one per consumer.
    dK/dV are summed over each KV head's group the same way, by TMA reductions into float32
    per KV head: summing per query head in XLA after the kernel moved `groups` times the
    bytes (packed 16 x 2K documents at 32K: 6.3 -> 6.0-6.2 ms fwd+bwd; bench/NOTES.md).
    """
    if BACKWARD == "triton":
        from longvila_jax.kernels import triton  # jax-triton: a GPU extra

        return triton.backward(q, k, v, mask, out, lse, d_out, d_lse, spec)
    b, sq, h, d = q.shape
    skv, kh = k.shape[1], k.shape[2]
    d_out = d_out.astype(q.dtype)
    delta, lse2 = backward_rows(out, lse, d_out, d_lse)
    arrays = [x.astype(jnp.int32) for x in mask.arrays()]
    order, counts = tile_lists(*arrays, spec.causal, BLOCK_Q, 2 * BLOCK_Q, over_q=True)
    n_blocks = -(-skv // (2 * BLOCK_Q))
    sq_pad, skv_pad = -(-sq // BLOCK_Q) * BLOCK_Q, n_blocks * 2 * BLOCK_Q
    stats = jnp.stack([jnp.pad(lse2, [(0, 0), (0, 0), (0, sq_pad - sq)],
                               constant_values=jnp.inf),
                       jnp.pad(delta, [(0, 0), (0, 0), (0, sq_pad - sq)])], axis=2)
    q, d_out, k, v = _pad(q, sq_pad), _pad(d_out, sq_pad), _pad(k, skv_pad), _pad(v, skv_pad)

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    tiled32 = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
    stages = BWD_STAGES
    kernel = functools.partial(_backward_kernel, causal=bool(spec.causal),
                               scale_log2=float(spec.scale * LOG2E), groups=h // kh, skv=skv,
                               stages=stages)
    dq_acc = jax.new_ref(jnp.zeros((b, sq_pad, h, d), jnp.float32))
    # One buffer for dK and dV: as two refs of equal zeros, XLA's dynamic-slice fusion
    # (the kernel's inputs sliced from bigger arrays, as the ring's pieces are) passed
    # both operands one buffer (jax 0.11.2; bench/NOTES.md item 38).
    dkv_acc = jax.new_ref(jnp.zeros((2, b, skv_pad, kh, d), jnp.float32))
    plgpu.kernel(
        kernel, out_type=(),
        scratch_types=(
            (plgpu.SMEM((2, BLOCK_Q, d), k.dtype, transforms=tiled),
             plgpu.SMEM((2, BLOCK_Q, d), v.dtype, transforms=tiled),
             plgpu.SMEM((stages, BLOCK_Q, d), q.dtype, transforms=tiled),
             plgpu.SMEM((stages, BLOCK_Q, d), q.dtype, transforms=tiled),
             plgpu.SMEM((stages, 2, BLOCK_Q), jnp.float32),
             plgpu.SMEM((2, 2, BLOCK_Q, BLOCK_Q), q.dtype, transforms=tiled),
             plgpu.SMEM((2, BLOCK_Q, d), jnp.float32, transforms=tiled32),
             # each stage's query tile, then each consumer's tile for its next dQ
             plgpu.SMEM((stages + 2,), jnp.int32)),
            (plgpu.Barrier(num_barriers=2),) * 2 + (plgpu.Barrier(num_barriers=stages),) * 3,
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=2),
            plgpu.Barrier(num_barriers=2)),
        # Heads vary fastest, so the programs running at once share their query tiles in
        # L2 (Q, dO and dQ's reductions): kv blocks fastest made 32K 29 % slower.
        grid=(h, n_blocks, b), grid_names=("heads", "kv", "batch"),
        num_threads=3, thread_name="wg", kernel_name="attention_backward",
        compiler_params=_compiler_params(),
    )(q, k, v, d_out, stats, *_padded(arrays, sq_pad, skv_pad), order, counts, dq_acc,
      dkv_acc)
    scale = float(spec.scale)
    dq = (jax.freeze(dq_acc)[:, :sq] * scale).astype(q.dtype)
    dk, dv = jax.freeze(dkv_acc)[:, :, :skv]
    return dq, (dk * scale).astype(k.dtype), dv.astype(v.dtype)
