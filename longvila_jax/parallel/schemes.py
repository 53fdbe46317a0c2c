"""The sequence-parallel attention a config asks for: one dispatch for models and benchmarks.

`parallel.attention` in a config picks the scheme over the `node` x `local` sequence group:

- `ring`: zigzag ring attention over the whole group (both axes, flattened node-major);
- `ulysses`: one all-to-all over the whole group, attention over the full sequence;
- `2d`: LongVILA's 2D attention, Ulysses over `local` and ring over `node`;
- `auto`: `2d` when both degrees exceed 1, else whichever axis is larger than 1 (`none`
  when neither is).

Each scheme has its token layout (`layout_permutation`): zigzag over its ring so causal
work is even, natural order for Ulysses alone (it sees the whole sequence anyway).
"""

from __future__ import annotations

import numpy as np

from longvila_jax.kernels import AttentionSpec, Mask
from longvila_jax.parallel.attention2d import attention_2d
from longvila_jax.parallel.mesh import SEQUENCE_AXES
from longvila_jax.parallel.ring import ring_attention, zigzag_permutation
from longvila_jax.parallel.ulysses import head_layout, ulysses_attention

SCHEMES = ("auto", "none", "ring", "ulysses", "2d")


def resolve_scheme(scheme: str, node: int, local: int, heads: tuple[int, int] | None = None
                   ) -> str:
    """The concrete scheme for `scheme` on a (node, local) group; degrees of 1 collapse.

    With the model's `heads` (query, KV), 'auto' takes the ring over the whole group when its
    usual choice would pad the heads to split them over the all-to-all (a small model on
    many devices): padded heads are wasted compute that the ring does not spend. An explicit
    scheme is kept, padded if need be (`ulysses.head_layout`).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"parallel.attention: {scheme!r} is not one of {SCHEMES}")
    if node * local == 1:
        return "none"
    if scheme == "auto":
        chosen = "2d" if node > 1 and local > 1 else "ring" if node > 1 else "ulysses"
        degree = ulysses_degree(chosen, node, local)
        if heads is not None and head_layout(*heads, degree).padded:
            return "ring"
        return chosen
    if scheme == "none":
        raise ValueError(f"parallel.attention: 'none' with node={node}, local={local}; "
                         "a sequence group of more than one device needs a scheme")
    if scheme == "2d" and (node == 1 or local == 1):
        return "ring" if local == 1 else "ulysses"
    return scheme


def host_degrees(devices: int, heads: tuple[int, int]) -> tuple[int, int]:
    """(node, local) for a sequence group of `devices` GPUs of one host: the widest
    all-to-all degree that splits the model's (query, KV) `heads` without padding, the rest
    a ring (Qwen2-7B's 28/4 heads on 8 GPUs: Ulysses over 4, a ring of 2; Llama-3-8B's
    32/8: Ulysses over 8)."""
    local = next(degree for degree in range(devices, 0, -1)
                 if devices % degree == 0 and not head_layout(*heads, degree).padded)
    return devices // local, local


def ring_size(scheme: str, node: int, local: int) -> int:
    """How many ranks the scheme's ring has (1: no ring)."""
    return {"none": 1, "ulysses": 1, "ring": node * local, "2d": node}[scheme]


def ulysses_degree(scheme: str, node: int, local: int) -> int:
    """Over how many devices the scheme's all-to-all splits the heads (1: none)."""
    return {"none": 1, "ring": 1, "ulysses": node * local, "2d": local}[scheme]


def layout_permutation(seq_len: int, scheme: str, node: int, local: int) -> np.ndarray:
    """Token order for the scheme: `x[:, perm]` then an even node-major split; pass
    `positions = perm` so masks see global positions."""
    ring = ring_size(scheme, node, local)
    return zigzag_permutation(seq_len, ring) if ring > 1 else np.arange(seq_len)


def sequence_parallel_attention(q, k, v, mask: Mask, spec: AttentionSpec, *, scheme: str):
    """Exact attention over a sequence sharded on `SEQUENCE_AXES`; local `(out, lse)`.

    Call inside `shard_map` over both axes with the layout of `layout_permutation`.
    `scheme` is a resolved one (`resolve_scheme`), not 'auto'.
    """
    if scheme == "ring":
        return ring_attention(q, k, v, mask, spec, axis_name=SEQUENCE_AXES)
    if scheme == "ulysses":
        return ulysses_attention(q, k, v, mask, spec, axis_name=SEQUENCE_AXES)
    if scheme == "2d":
        return attention_2d(q, k, v, mask, spec)
    raise ValueError(f"sequence_parallel_attention: scheme {scheme!r} is not one of "
                     "'ring', 'ulysses', '2d' (resolve 'auto' first)")
