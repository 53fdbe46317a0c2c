"""FlashAttention-2 forward and backward as our own Triton kernels, called through jax-triton.

Tiles that the mask hides completely are never computed: per-tile min/max of positions and
segment ids (computed in JAX, a few KB) bound each program's loop and classify every tile as
skipped, fully visible (no mask arithmetic) or partial. So causal attention costs about half
of dense and packed short documents cost close to the sum of their own squares.

Layouts match the API: q/out/dq `[b, sq, h, d]`, k/v/dk/dv `[b, skv, kh, d]`, lse `[b, h, sq]`.
GQA: query head h reads K/V head h // (h // kh); dK/dV programs loop over the group's query
heads, so K/V are never repeated and no atomics are needed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import jax_triton as jt
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel; head_dim 64/128 on Hopper.
FWD = (128, 64, 8, 3)
BWD_KV = (64, 128, 8, 2)
BWD_Q = (128, 64, 8, 2)


# ----------------------------------------------------------------------------- tile tables


def _tile_stats(positions, segments, block):
    """Per tile `[b, n_tiles]`: min/max position, min/max segment (edge-padded)."""
    b, s = positions.shape
    n = -(-s // block)
    pad = [(0, 0), (0, n * block - s)]
    pos = jnp.pad(positions, pad, mode="edge").reshape(b, n, block)
    seg = jnp.pad(segments, pad, mode="edge").reshape(b, n, block)
    return pos.min(-1), pos.max(-1), seg.min(-1), seg.max(-1)


def _visible(q_stats, kv_stats, causal):
    """`[b, nq, nk]` True where a (q tile, kv tile) pair may hold a visible entry."""
    _, q_pmax, q_smin, q_smax = (x[:, :, None] for x in q_stats)
    k_pmin, _, k_smin, k_smax = (x[:, None, :] for x in kv_stats)
    vis = (k_smax >= q_smin) & (k_smin <= q_smax)
    if causal:
        vis &= k_pmin <= q_pmax
    return vis


def _bounds(vis):
    """First and one-past-last True along the last axis (0, 0 where none): int32 `[b, n]`."""
    n = vis.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    any_ = vis.any(-1)
    lo = jnp.where(any_, jnp.min(jnp.where(vis, idx, n), -1), 0)
    hi = jnp.where(any_, jnp.max(jnp.where(vis, idx, -1), -1) + 1, 0)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _tables(q_pos, kv_pos, q_seg, kv_seg, block_m, block_n):
    q_stats = jnp.stack(_tile_stats(q_pos, q_seg, block_m), 0).astype(jnp.int32)
    kv_stats = jnp.stack(_tile_stats(kv_pos, kv_seg, block_n), 0).astype(jnp.int32)
    return q_stats, kv_stats


# ----------------------------------------------------------------------------- forward


@triton.jit
def _tile_flags(q_stats, kv_stats, b, i, j, nq, nk, NB: tl.constexpr, CAUSAL: tl.constexpr):
    """(skip, needs_mask) for q tile i against kv tile j; stats are [4, b, n] int32."""
    q_pmin = tl.load(q_stats + 0 * NB * nq + b * nq + i)
    q_pmax = tl.load(q_stats + 1 * NB * nq + b * nq + i)
    q_smin = tl.load(q_stats + 2 * NB * nq + b * nq + i)
    q_smax = tl.load(q_stats + 3 * NB * nq + b * nq + i)
    k_pmin = tl.load(kv_stats + 0 * NB * nk + b * nk + j)
    k_pmax = tl.load(kv_stats + 1 * NB * nk + b * nk + j)
    k_smin = tl.load(kv_stats + 2 * NB * nk + b * nk + j)
    k_smax = tl.load(kv_stats + 3 * NB * nk + b * nk + j)
    skip = (k_smax < q_smin) | (k_smin > q_smax)
    same = (q_smin == q_smax) & (k_smin == k_smax) & (q_smin == k_smin)
    if CAUSAL:
        skip = skip | (k_pmin > q_pmax)
        same = same & (k_pmax <= q_pmin)
    return skip, not same


@triton.jit
def _fwd_kernel(q, k, v, q_pos, kv_pos, q_seg, kv_seg, q_stats, kv_stats, lo_ptr, hi_ptr,
                out, lse, scale_log2,
                NB: tl.constexpr, SQ: tl.constexpr, SKV: tl.constexpr, H: tl.constexpr,
                KH: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kh = h // (H // KH)
    nq = tl.cdiv(SQ, BLOCK_M)
    nk = tl.cdiv(SKV, BLOCK_N)
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_rows = q + (b * SQ + offs_m[:, None]) * (H * D) + h * D + offs_d[None, :]
    qt = tl.load(q_rows, mask=(offs_m[:, None] < SQ) & d_ok[None, :], other=0.0)
    qp = tl.load(q_pos + b * SQ + offs_m, mask=offs_m < SQ, other=0)
    qs = tl.load(q_seg + b * SQ + offs_m, mask=offs_m < SQ, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = tl.load(lo_ptr + b * nq + i)
    hi = tl.load(hi_ptr + b * nq + i)
    for j in range(lo, hi):
        skip, masked = _tile_flags(q_stats, kv_stats, b, i, j, nq, nk, NB, CAUSAL)
        masked = masked | ((j + 1) * BLOCK_N > SKV)
        if not skip:
            offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < SKV
            kv_rows = (b * SKV + offs_n[:, None]) * (KH * D) + kh * D + offs_d[None, :]
            kt = tl.load(k + kv_rows, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            vt = tl.load(v + kv_rows, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(qt, tl.trans(kt)) * scale_log2
            if masked:
                kp = tl.load(kv_pos + b * SKV + offs_n, mask=n_ok, other=0)
                ks = tl.load(kv_seg + b * SKV + offs_n, mask=n_ok, other=0)
                vis = (qs[:, None] == ks[None, :]) & n_ok[None, :]
                if CAUSAL:
                    vis = vis & (kp[None, :] <= qp[:, None])
                s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    o = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    out_rows = out + (b * SQ + offs_m[:, None]) * (H * D) + h * D + offs_d[None, :]
    tl.store(out_rows, o.to(out.dtype.element_ty), mask=(offs_m[:, None] < SQ) & d_ok[None, :])
    # m_i and log2(l_i) are in base-2 units of the scaled logits; lse is natural log.
    lse_val = tl.where(seen, (m_i + tl.math.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    tl.store(lse + (b * H + h) * SQ + offs_m, lse_val, mask=offs_m < SQ)


def forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal, scale):
    b, sq, h, d = q.shape
    skv, kh = k.shape[1], k.shape[2]
    bm, bn, warps, stages = FWD
    q_stats, kv_stats = _tables(q_pos, kv_pos, q_seg, kv_seg, bm, bn)
    lo, hi = _bounds(_visible(tuple(q_stats), tuple(kv_stats), causal))
    out, lse = jt.triton_call(
        q, k, v, q_pos.astype(jnp.int32), kv_pos.astype(jnp.int32), q_seg.astype(jnp.int32),
        kv_seg.astype(jnp.int32), q_stats, kv_stats, lo, hi,
        kernel=_fwd_kernel,
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, sq), jnp.float32)),
        grid=(triton.cdiv(sq, bm), b * h),
        num_warps=warps, num_stages=stages,
        scale_log2=float(scale * LOG2E),
        NB=b, SQ=sq, SKV=skv, H=h, KH=kh, D=d, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_M=bm, BLOCK_N=bn, CAUSAL=bool(causal))
    return out, lse


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_kv_kernel(q, k, v, do, lse2, delta, q_pos, kv_pos, q_seg, kv_seg, q_stats, kv_stats,
                   lo_ptr, hi_ptr, dk, dv, scale_log2, scale,
                   NB: tl.constexpr, SQ: tl.constexpr, SKV: tl.constexpr, H: tl.constexpr,
                   KH: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """dK, dV for one kv tile of one kv head, looping over its query heads and q tiles."""
    j = tl.program_id(0)
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
    kv_rows = (b * SKV + offs_n[:, None]) * (KH * D) + kh * D + offs_d[None, :]
    kt = tl.load(k + kv_rows, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    vt = tl.load(v + kv_rows, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    kp = tl.load(kv_pos + b * SKV + offs_n, mask=n_ok, other=0)
    ks = tl.load(kv_seg + b * SKV + offs_n, mask=n_ok, other=0)
    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = tl.load(lo_ptr + b * nk + j)
    hi = tl.load(hi_ptr + b * nk + j)
    for g in range(G):
        h = kh * G + g
        for i in range(lo, hi):
            skip, masked = _tile_flags(q_stats, kv_stats, b, i, j, nq, nk, NB, CAUSAL)
            if not skip:
                offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
                m_ok = offs_m < SQ
                q_rows = (b * SQ + offs_m[:, None]) * (H * D) + h * D + offs_d[None, :]
                qt = tl.load(q + q_rows, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
                dot_ = tl.load(do + q_rows, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
                # lse2: base-2 LSE with +inf on rows that see nothing, so exp2 gives 0.
                l2 = tl.load(lse2 + (b * H + h) * SQ + offs_m, mask=m_ok, other=float("inf"))
                dl = tl.load(delta + (b * H + h) * SQ + offs_m, mask=m_ok, other=0.0)
                s = tl.dot(qt, tl.trans(kt)) * scale_log2
                p = tl.math.exp2(s - l2[:, None])
                if masked:
                    qp = tl.load(q_pos + b * SQ + offs_m, mask=m_ok, other=0)
                    qs = tl.load(q_seg + b * SQ + offs_m, mask=m_ok, other=0)
                    vis = qs[:, None] == ks[None, :]
                    if CAUSAL:
                        vis = vis & (kp[None, :] <= qp[:, None])
                    p = tl.where(vis, p, 0.0)
                dv_acc += tl.dot(tl.trans(p.to(dot_.dtype)), dot_)
                dp = tl.dot(dot_, tl.trans(vt))
                ds = p * (dp - dl[:, None])
                dk_acc += tl.dot(tl.trans(ds.to(qt.dtype)), qt)
    mask = n_ok[:, None] & d_ok[None, :]
    tl.store(dk + kv_rows, (dk_acc * scale).to(dk.dtype.element_ty), mask=mask)
    tl.store(dv + kv_rows, dv_acc.to(dv.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_q_kernel(q, k, v, do, lse2, delta, q_pos, kv_pos, q_seg, kv_seg, q_stats, kv_stats,
                  lo_ptr, hi_ptr, dq, scale_log2, scale,
                  NB: tl.constexpr, SQ: tl.constexpr, SKV: tl.constexpr, H: tl.constexpr,
                  KH: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """dQ for one q tile of one head, looping over the kv tiles it may see."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kh = h // (H // KH)
    nq = tl.cdiv(SQ, BLOCK_M)
    nk = tl.cdiv(SKV, BLOCK_N)
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < SQ
    q_rows = (b * SQ + offs_m[:, None]) * (H * D) + h * D + offs_d[None, :]
    qt = tl.load(q + q_rows, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    dot_ = tl.load(do + q_rows, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    l2 = tl.load(lse2 + (b * H + h) * SQ + offs_m, mask=m_ok, other=float("inf"))
    dl = tl.load(delta + (b * H + h) * SQ + offs_m, mask=m_ok, other=0.0)
    qp = tl.load(q_pos + b * SQ + offs_m, mask=m_ok, other=0)
    qs = tl.load(q_seg + b * SQ + offs_m, mask=m_ok, other=0)
    dq_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = tl.load(lo_ptr + b * nq + i)
    hi = tl.load(hi_ptr + b * nq + i)
    for j in range(lo, hi):
        skip, masked = _tile_flags(q_stats, kv_stats, b, i, j, nq, nk, NB, CAUSAL)
        masked = masked | ((j + 1) * BLOCK_N > SKV)
        if not skip:
            offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < SKV
            kv_rows = (b * SKV + offs_n[:, None]) * (KH * D) + kh * D + offs_d[None, :]
            kt = tl.load(k + kv_rows, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            vt = tl.load(v + kv_rows, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(qt, tl.trans(kt)) * scale_log2
            p = tl.math.exp2(s - l2[:, None])
            if masked:
                kp = tl.load(kv_pos + b * SKV + offs_n, mask=n_ok, other=0)
                ks = tl.load(kv_seg + b * SKV + offs_n, mask=n_ok, other=0)
                vis = (qs[:, None] == ks[None, :]) & n_ok[None, :]
                if CAUSAL:
                    vis = vis & (kp[None, :] <= qp[:, None])
                p = tl.where(vis, p, 0.0)
            dp = tl.dot(dot_, tl.trans(vt))
            ds = p * (dp - dl[:, None])
            dq_acc += tl.dot(ds.to(kt.dtype), kt)
    tl.store(dq + q_rows, (dq_acc * scale).to(dq.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


def backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, d_out, d_lse, *, causal, scale):
    b, sq, h, d = q.shape
    skv, kh = k.shape[1], k.shape[2]
    d_out = d_out.astype(q.dtype)
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    if d_lse is not None:
        delta = delta - d_lse.astype(jnp.float32)
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf).astype(jnp.float32)
    ints = [x.astype(jnp.int32) for x in (q_pos, kv_pos, q_seg, kv_seg)]
    common = dict(scale_log2=float(scale * LOG2E), scale=float(scale), NB=b, SQ=sq, SKV=skv,
                  H=h, KH=kh, D=d, BLOCK_D=triton.next_power_of_2(d), CAUSAL=bool(causal))

    bm, bn, warps, stages = BWD_KV
    q_stats, kv_stats = _tables(q_pos, kv_pos, q_seg, kv_seg, bm, bn)
    vis = _visible(tuple(q_stats), tuple(kv_stats), causal)
    lo, hi = _bounds(jnp.swapaxes(vis, 1, 2))
    dk, dv = jt.triton_call(
        q, k, v, d_out, lse2, delta, *ints, q_stats, kv_stats, lo, hi,
        kernel=_bwd_kv_kernel,
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(triton.cdiv(skv, bn), b * kh), num_warps=warps, num_stages=stages,
        BLOCK_M=bm, BLOCK_N=bn, **common)

    bm, bn, warps, stages = BWD_Q
    q_stats, kv_stats = _tables(q_pos, kv_pos, q_seg, kv_seg, bm, bn)
    lo, hi = _bounds(_visible(tuple(q_stats), tuple(kv_stats), causal))
    dq = jt.triton_call(
        q, k, v, d_out, lse2, delta, *ints, q_stats, kv_stats, lo, hi,
        kernel=_bwd_q_kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(triton.cdiv(sq, bm), b * h), num_warps=warps, num_stages=stages,
        BLOCK_M=bm, BLOCK_N=bn, **common)
    return dq, dk, dv
