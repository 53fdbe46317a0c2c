"""FlashAttention-2 forward and backward as our own Triton kernels, called through jax-triton.

Tiles that the mask hides completely are never computed. Per-tile min/max of positions
and segment ids (computed in JAX, a few KB) classify every (q tile, kv tile) pair as
hidden, fully visible or partial, and give each program three loop ranges: a masked head,
a branch-free middle of fully visible tiles (which Triton can software-pipeline), and a
masked tail. Hidden tiles inside the masked ranges are skipped by a per-tile test. So causal
attention costs about half of dense, and packed short documents close to the sum of their
own squares. One driver, `_walk`, runs those three loops for every kernel; each kernel
gives it only its per-tile body.

Layouts match the API: q/out/dq `[b, sq, h, d]`, k/v/dk/dv `[b, skv, kh, d]`, lse `[b, h, sq]`.
GQA: query head h reads K/V head h // (h // kh); dK/dV programs loop over the group's query
heads, so K/V are never repeated and no atomics are needed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax_triton as jt
import triton
import triton.language as tl

from longvila_jax.kernels.softmax_rows import LOG2E, backward_rows
from longvila_jax.kernels.tiles import schedule


class Blocks(NamedTuple):
    """One kernel's launch shape: a [block_m q rows, block_n kv rows] tile, warps, stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Per kernel, for head_dim 64/128 on Hopper. Picked by `bench/attention.py --sweep` at 32K on
# an H200 (bench/NOTES.md).
FWD = Blocks(block_m=128, block_n=128, num_warps=8, num_stages=3)
BWD_KV = Blocks(block_m=64, block_n=128, num_warps=8, num_stages=2)
BWD_Q = Blocks(block_m=128, block_n=128, num_warps=8, num_stages=2)


@triton.jit
def _hidden(q_stats, kv_stats, b, i, j, nq, nk, NB: tl.constexpr, CAUSAL: tl.constexpr):
    """True if no entry of q tile i against kv tile j is visible; stats are [4, NB, n]."""
    q_pmax = tl.load(q_stats + 1 * NB * nq + b * nq + i)
    q_smin = tl.load(q_stats + 2 * NB * nq + b * nq + i)
    q_smax = tl.load(q_stats + 3 * NB * nq + b * nq + i)
    k_pmin = tl.load(kv_stats + 0 * NB * nk + b * nk + j)
    k_smin = tl.load(kv_stats + 2 * NB * nk + b * nk + j)
    k_smax = tl.load(kv_stats + 3 * NB * nk + b * nk + j)
    hidden = (k_smax < q_smin) | (k_smin > q_smax)
    if CAUSAL:
        hidden = hidden | (k_pmin > q_pmax)
    return hidden


@triton.jit
def _plan(ranges, b, r, n, NB: tl.constexpr):
    """(lo, full_lo, full_hi, n_head, n_tail) of program row r (see tiles._ranges)."""
    lo = tl.load(ranges + 0 * NB * n + b * n + r)
    full_lo = tl.load(ranges + 1 * NB * n + b * n + r)
    full_hi = tl.load(ranges + 2 * NB * n + b * n + r)
    n_head = tl.load(ranges + 4 * NB * n + b * n + r)
    n_tail = tl.load(ranges + 5 * NB * n + b * n + r)
    return lo, full_lo, full_hi, n_head, n_tail


@triton.jit
def _next_visible(q_stats, kv_stats, b, fixed, t, nq, nk, NB: tl.constexpr,
                  CAUSAL: tl.constexpr, OVER_Q: tl.constexpr):
    """The first tile t' >= t that meets tile `fixed`: q tiles with OVER_Q, else kv tiles (a
    scalar search: no matrix work in the loop, so the tile loops stay free of branches around
    wgmma)."""
    if OVER_Q:
        while _hidden(q_stats, kv_stats, b, t, fixed, nq, nk, NB, CAUSAL):
            t += 1
    else:
        while _hidden(q_stats, kv_stats, b, fixed, t, nq, nk, NB, CAUSAL):
            t += 1
    return t


@triton.jit
def _walk(TILE: tl.constexpr, state, ctx, plan, q_stats, kv_stats, b, fixed, nq, nk,
          NB: tl.constexpr, CAUSAL: tl.constexpr, OVER_Q: tl.constexpr):
    """Fold `state = TILE(state, t, MASKED, *ctx)` over the tiles t that tile `fixed` meets:
    kv tiles of q tile `fixed`, or with OVER_Q q tiles of kv tile `fixed`; `plan` is its row
    of `_plan`. Callers write `ctx` as a tuple literal: assigned to a name first, its
    constexprs would become tensors.

    MASKED is a compile-time constant per loop, so the middle loop of fully visible tiles
    has no branch around its matrix products and Triton software-pipelines it (a runtime
    branch there serialised every wgmma: bench/NOTES.md, v6).
    """
    lo, full_lo, full_hi, n_head, n_tail = plan
    t = lo
    for _ in range(n_head):
        t = _next_visible(q_stats, kv_stats, b, fixed, t, nq, nk, NB, CAUSAL, OVER_Q)
        state = TILE(state, t, True, *ctx)
        t += 1
    for t in range(full_lo, full_hi):
        state = TILE(state, t, False, *ctx)
    t = full_hi
    for _ in range(n_tail):
        t = _next_visible(q_stats, kv_stats, b, fixed, t, nq, nk, NB, CAUSAL, OVER_Q)
        state = TILE(state, t, True, *ctx)
        t += 1
    return state


@triton.jit
def _offsets(first_row, N_ROWS: tl.constexpr, ROW: tl.constexpr, col0, offs_d,
             WIDE: tl.constexpr):
    """Element offsets of rows [first_row, first_row + N_ROWS) of a [rows, ROW] array, at
    columns col0 + offs_d. WIDE (2^31 elements or more): int64, else int32 arithmetic."""
    rows = first_row + tl.arange(0, N_ROWS)
    if WIDE:
        rows = rows.to(tl.int64)
    return rows[:, None] * ROW + col0 + offs_d[None, :]


@triton.jit
def _load_rows(ptr, rows_ok, d_ok, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; fully visible in-bounds tiles load without any mask."""
    if MASKED:
        return tl.load(ptr, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    if EVEN_D:
        return tl.load(ptr)
    return tl.load(ptr, mask=d_ok[None, :], other=0.0)


@triton.jit
def _visibility(qp, qs, kp, ks, n_ok, CAUSAL: tl.constexpr):
    vis = (qs[:, None] == ks[None, :]) & n_ok[None, :]
    if CAUSAL:
        vis = vis & (kp[None, :] <= qp[:, None])
    return vis


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tile(state, j, MASKED: tl.constexpr, qt, qp, qs, k, v, kv_pos, kv_seg, b, kh, offs_d,
              d_ok, scale_log2, SKV: tl.constexpr, KH: tl.constexpr, D: tl.constexpr,
              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
              WIDE_KV: tl.constexpr):
    """Online softmax of q tile `qt` over kv tile j: state (m_i, l_i, acc) -> updated."""
    m_i, l_i, acc = state
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < SKV
    kv_rows = _offsets(b * SKV + j * BLOCK_N, BLOCK_N, KH * D, kh * D, offs_d, WIDE_KV)
    kt = _load_rows(k + kv_rows, n_ok, d_ok, MASKED, EVEN_D)
    vt = _load_rows(v + kv_rows, n_ok, d_ok, MASKED, EVEN_D)
    # Raw logits; the softmax scale goes into the row max (scale > 0) and into one FMA
    # with the max subtraction, sparing a multiply per score.
    s = tl.dot(qt, tl.trans(kt))
    if MASKED:
        kp = tl.load(kv_pos + b * SKV + offs_n, mask=n_ok, other=0)
        ks = tl.load(kv_seg + b * SKV + offs_n, mask=n_ok, other=0)
        s = tl.where(_visibility(qp, qs, kp, ks, n_ok, CAUSAL), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    # Nothing seen yet: subtract 0 so that exp2(-inf) stays 0 (Triton: if/else, no ternary).
    if MASKED:  # noqa: SIM108
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    p = tl.math.exp2(s * scale_log2 - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    # Accumulate in the matrix unit's accumulator (no separate add of two register tiles).
    acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(q, k, v, q_pos, kv_pos, q_seg, kv_seg, q_stats, kv_stats, ranges, out, lse,
                scale_log2, NB: tl.constexpr, SQ: tl.constexpr, SKV: tl.constexpr,
                H: tl.constexpr, KH: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                WIDE_Q: tl.constexpr, WIDE_KV: tl.constexpr):
    EVEN_D: tl.constexpr = BLOCK_D == D
    nq = tl.cdiv(SQ, BLOCK_M)
    nk = tl.cdiv(SKV, BLOCK_N)
    i = nq - 1 - tl.program_id(0)  # causal: the longest rows first, so the tail is short
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kh = h // (H // KH)
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < SQ
    q_rows = _offsets(b * SQ + i * BLOCK_M, BLOCK_M, H * D, h * D, offs_d, WIDE_Q)
    qt = tl.load(q + q_rows, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    qp = tl.load(q_pos + b * SQ + offs_m, mask=m_ok, other=0)
    qs = tl.load(q_seg + b * SQ + offs_m, mask=m_ok, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i, l_i, acc = _walk(_fwd_tile, (m_i, l_i, acc),
                          (qt, qp, qs, k, v, kv_pos, kv_seg, b, kh, offs_d, d_ok, scale_log2,
                           SKV, KH, D, BLOCK_N, CAUSAL, EVEN_D, WIDE_KV),
                          _plan(ranges, b, i, nq, NB), q_stats, kv_stats, b, i, nq, nk, NB,
                          CAUSAL, False)
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    o = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    tl.store(out + q_rows, o.to(out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    # m_i and log2(l_i) are base-2 units of the scaled logits; lse is a natural log.
    lse_val = tl.where(seen, (m_i + tl.math.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    tl.store(lse + (b * H + h) * SQ + offs_m, lse_val, mask=m_ok)


def _common(q, k, causal, scale):
    b, sq, h, d = q.shape
    return dict(NB=b, SQ=sq, SKV=k.shape[1], H=h, KH=k.shape[2], D=d,
                BLOCK_D=triton.next_power_of_2(d), CAUSAL=bool(causal),
                WIDE_Q=q.size >= 2**31, WIDE_KV=k.size >= 2**31,
                scale_log2=float(scale * LOG2E))


def forward(q, k, v, mask, spec):
    b, sq, h, _ = q.shape
    causal, scale = spec.causal, spec.scale
    bm, bn = FWD.block_m, FWD.block_n
    ints = [x.astype(jnp.int32) for x in mask.arrays()]
    q_stats, kv_stats, ranges = schedule(*ints, causal, bm, bn, over_q=False)
    return jt.triton_call(
        q, k, v, *ints, q_stats, kv_stats, ranges,
        kernel=_fwd_kernel,
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, sq), jnp.float32)),
        grid=(triton.cdiv(sq, bm), b * h), num_warps=FWD.num_warps, num_stages=FWD.num_stages,
        BLOCK_M=bm, BLOCK_N=bn, **_common(q, k, causal, scale))


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_kv_tile(state, i, MASKED: tl.constexpr, kt, vt, kp, ks, q, do, lse2, delta, q_pos,
                 q_seg, b, h, offs_d, d_ok, n_ok, scale_log2, SQ: tl.constexpr,
                 H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                 CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, WIDE_Q: tl.constexpr):
    """Gradients of kv tile (kt, vt) from q tile i of head h: state (dk_acc, dv_acc)."""
    dk_acc, dv_acc = state
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < SQ
    q_rows = _offsets(b * SQ + i * BLOCK_M, BLOCK_M, H * D, h * D, offs_d, WIDE_Q)
    # Rows past SQ load q = dO = 0 and lse2 = +inf, so they add nothing.
    qt = _load_rows(q + q_rows, m_ok, d_ok, MASKED, EVEN_D)
    dot_ = _load_rows(do + q_rows, m_ok, d_ok, MASKED, EVEN_D)
    if MASKED:
        l2 = tl.load(lse2 + (b * H + h) * SQ + offs_m, mask=m_ok, other=float("inf"))
        dl = tl.load(delta + (b * H + h) * SQ + offs_m, mask=m_ok, other=0.0)
    else:
        l2 = tl.load(lse2 + (b * H + h) * SQ + offs_m)
        dl = tl.load(delta + (b * H + h) * SQ + offs_m)
    # Transposed products ([kv, q] tiles): no result tile needs a register transpose,
    # which spilled at every block size tried.
    pt = tl.math.exp2(tl.dot(kt, tl.trans(qt)) * scale_log2 - l2[None, :])
    if MASKED:
        qp = tl.load(q_pos + b * SQ + offs_m, mask=m_ok, other=0)
        qs = tl.load(q_seg + b * SQ + offs_m, mask=m_ok, other=0)
        pt = tl.where(tl.trans(_visibility(qp, qs, kp, ks, n_ok, CAUSAL)), pt, 0.0)
    dv_acc = tl.dot(pt.to(dot_.dtype), dot_, dv_acc)
    dst = pt * (tl.dot(vt, tl.trans(dot_)) - dl[None, :])
    dk_acc = tl.dot(dst.to(qt.dtype), qt, dk_acc)
    return dk_acc, dv_acc


@triton.jit
def _bwd_kv_kernel(q, k, v, do, lse2, delta, q_pos, kv_pos, q_seg, kv_seg, q_stats, kv_stats,
                   ranges, dk, dv, scale_log2, scale, NB: tl.constexpr, SQ: tl.constexpr,
                   SKV: tl.constexpr, H: tl.constexpr, KH: tl.constexpr, D: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, WIDE_Q: tl.constexpr, WIDE_KV: tl.constexpr):
    """dK, dV for one kv tile of one kv head, looping over its query heads and q tiles."""
    EVEN_D: tl.constexpr = BLOCK_D == D
    j = tl.program_id(0)  # causal: the first kv tiles see the most rows and start first
    bkh = tl.program_id(1)
    b = bkh // KH
    kh = bkh % KH
    G: tl.constexpr = H // KH
    nq = tl.cdiv(SQ, BLOCK_M)
    nk = tl.cdiv(SKV, BLOCK_N)
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < SKV
    kv_rows = _offsets(b * SKV + j * BLOCK_N, BLOCK_N, KH * D, kh * D, offs_d, WIDE_KV)
    kt = tl.load(k + kv_rows, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    vt = tl.load(v + kv_rows, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    kp = tl.load(kv_pos + b * SKV + offs_n, mask=n_ok, other=0)
    ks = tl.load(kv_seg + b * SKV + offs_n, mask=n_ok, other=0)
    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    plan = _plan(ranges, b, j, nk, NB)
    for g in range(G):
        dk_acc, dv_acc = _walk(_bwd_kv_tile, (dk_acc, dv_acc),
                               (kt, vt, kp, ks, q, do, lse2, delta, q_pos, q_seg, b, kh * G + g,
                                offs_d, d_ok, n_ok, scale_log2, SQ, H, D, BLOCK_M, CAUSAL,
                                EVEN_D, WIDE_Q),
                               plan, q_stats, kv_stats, b, j, nq, nk, NB, CAUSAL, True)
    mask = n_ok[:, None] & d_ok[None, :]
    tl.store(dk + kv_rows, (dk_acc * scale).to(dk.dtype.element_ty), mask=mask)
    tl.store(dv + kv_rows, dv_acc.to(dv.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_q_tile(state, j, MASKED: tl.constexpr, qt, dot_, l2, dl, qp, qs, k, v, kv_pos, kv_seg,
                b, kh, offs_d, d_ok, scale_log2, SKV: tl.constexpr, KH: tl.constexpr,
                D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                EVEN_D: tl.constexpr, WIDE_KV: tl.constexpr):
    """Gradient of q tile `qt` from kv tile j: state (dq_acc,)."""
    (dq_acc,) = state
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < SKV
    kv_rows = _offsets(b * SKV + j * BLOCK_N, BLOCK_N, KH * D, kh * D, offs_d, WIDE_KV)
    kt = _load_rows(k + kv_rows, n_ok, d_ok, MASKED, EVEN_D)
    vt = _load_rows(v + kv_rows, n_ok, d_ok, MASKED, EVEN_D)
    p = tl.math.exp2(tl.dot(qt, tl.trans(kt)) * scale_log2 - l2[:, None])
    if MASKED:
        kp = tl.load(kv_pos + b * SKV + offs_n, mask=n_ok, other=0)
        ks = tl.load(kv_seg + b * SKV + offs_n, mask=n_ok, other=0)
        p = tl.where(_visibility(qp, qs, kp, ks, n_ok, CAUSAL), p, 0.0)
    ds = p * (tl.dot(dot_, tl.trans(vt)) - dl[:, None])
    return (tl.dot(ds.to(kt.dtype), kt, dq_acc),)


@triton.jit
def _bwd_q_kernel(q, k, v, do, lse2, delta, q_pos, kv_pos, q_seg, kv_seg, q_stats, kv_stats,
                  ranges, dq, scale_log2, scale, NB: tl.constexpr, SQ: tl.constexpr,
                  SKV: tl.constexpr, H: tl.constexpr, KH: tl.constexpr, D: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, WIDE_Q: tl.constexpr, WIDE_KV: tl.constexpr):
    """dQ for one q tile of one head, looping over the kv tiles it may see."""
    EVEN_D: tl.constexpr = BLOCK_D == D
    nq = tl.cdiv(SQ, BLOCK_M)
    nk = tl.cdiv(SKV, BLOCK_N)
    i = nq - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kh = h // (H // KH)
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < SQ
    q_rows = _offsets(b * SQ + i * BLOCK_M, BLOCK_M, H * D, h * D, offs_d, WIDE_Q)
    qt = tl.load(q + q_rows, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    dot_ = tl.load(do + q_rows, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    l2 = tl.load(lse2 + (b * H + h) * SQ + offs_m, mask=m_ok, other=float("inf"))
    dl = tl.load(delta + (b * H + h) * SQ + offs_m, mask=m_ok, other=0.0)
    qp = tl.load(q_pos + b * SQ + offs_m, mask=m_ok, other=0)
    qs = tl.load(q_seg + b * SQ + offs_m, mask=m_ok, other=0)
    dq_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    (dq_acc,) = _walk(_bwd_q_tile, (dq_acc,),
                      (qt, dot_, l2, dl, qp, qs, k, v, kv_pos, kv_seg, b, kh, offs_d, d_ok,
                       scale_log2, SKV, KH, D, BLOCK_N, CAUSAL, EVEN_D, WIDE_KV),
                      _plan(ranges, b, i, nq, NB), q_stats, kv_stats, b, i, nq, nk, NB, CAUSAL,
                      False)
    tl.store(dq + q_rows, (dq_acc * scale).to(dq.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


def backward(q, k, v, mask, out, lse, d_out, d_lse, spec):
    b, sq, h, _ = q.shape
    causal, scale = spec.causal, spec.scale
    skv, kh = k.shape[1], k.shape[2]
    d_out = d_out.astype(q.dtype)
    delta, lse2 = backward_rows(out, lse, d_out, d_lse)
    ints = [x.astype(jnp.int32) for x in mask.arrays()]
    common = dict(**_common(q, k, causal, scale), scale=float(scale))
    inputs = (q, k, v, d_out, lse2, delta, *ints)

    bm, bn = BWD_KV.block_m, BWD_KV.block_n
    dk, dv = jt.triton_call(
        *inputs, *schedule(*ints, causal, bm, bn, over_q=True),
        kernel=_bwd_kv_kernel,
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(triton.cdiv(skv, bn), b * kh), num_warps=BWD_KV.num_warps,
        num_stages=BWD_KV.num_stages, BLOCK_M=bm, BLOCK_N=bn, **common)

    bm, bn = BWD_Q.block_m, BWD_Q.block_n
    dq = jt.triton_call(
        *inputs, *schedule(*ints, causal, bm, bn, over_q=False),
        kernel=_bwd_q_kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(triton.cdiv(sq, bm), b * h), num_warps=BWD_Q.num_warps,
        num_stages=BWD_Q.num_stages, BLOCK_M=bm, BLOCK_N=bn, **common)
    return dq, dk, dv
