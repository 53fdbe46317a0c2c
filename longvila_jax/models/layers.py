"""Parameter-holding building blocks shared by the vision tower and the LLM.

Parameters carry no sharding: FSDP (`parallel/fsdp.py`) decides each one's split from its
shape alone. The one logical axis name is the layer axis of a stacked module (`stacked`),
which FSDP never splits (its layers are gathered one at a time instead).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longvila_jax.kernels.attention import REMAT_NAMES

STACKED = "layers"  # the logical name of a stacked module's layer axis


def param(rngs: nnx.Rngs, shape, dtype, init="normal", scale=0.02, *, stacked=False):
    """An `nnx.Param`; `init` is 'normal', 'zeros' or 'ones'; `stacked`: its first axis is
    a stacked module's layer axis (for parameters added to one after `stacked` built it)."""
    if init == "normal":
        value = scale * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(f"param: unknown init {init!r}")
    # Unnamed axes but the layer axis, which `stacked` names as it adds it.
    names = (STACKED,) * stacked + (None,) * (len(shape) - stacked)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class Linear(nnx.Module):
    """`y = x @ kernel + bias` with kernel `[in, out]` (the transpose of PyTorch's weight)."""

    def __init__(self, d_in, d_out, *, bias, rngs, param_dtype, dtype):
        self.kernel = param(rngs, (d_in, d_out), param_dtype)
        self.bias = param(rngs, (d_out,), param_dtype, "zeros") if bias else None
        self.dtype = dtype

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, statistics in float32."""

    def __init__(self, dim, *, eps, rngs, param_dtype):
        self.scale = param(rngs, (dim,), param_dtype, "ones")
        self.bias = param(rngs, (dim,), param_dtype, "zeros")
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm as Qwen2/Llama define it: normalise in float32, cast, then scale."""

    def __init__(self, dim, *, eps, rngs, param_dtype):
        self.scale = param(rngs, (dim,), param_dtype, "ones")
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def gelu(x, approximate: bool):
    """GELU; the exact form is ours (`_gelu_exact`), the tanh form is JAX's."""
    return jax.nn.gelu(x, approximate=True) if approximate else _gelu_exact(x)


@jax.custom_jvp
def _gelu_exact(x):
    """x * Phi(x). A custom derivative (Phi(x) + x * phi(x), via exp) because JAX's own
    derivative of erf fails inside `shard_map` with varying-axis checks (its 'polynomial'
    primitive rejects unvarying coefficients), which MM-SP's vision stage needs."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


@_gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    cdf = 0.5 * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))
    pdf = jnp.exp(-0.5 * x * x) * np.sqrt(0.5 / np.pi).astype(x.dtype)
    return _gelu_exact(x), (cdf + x * pdf) * t


def remat_policy(remat: str):
    """`jax.checkpoint` policy for a config's `model.remat`; None for 'none' (no remat)."""
    if remat == "none":
        return None
    if remat == "selective":  # the attention's out and lse, as its forward rules name them
        return jax.checkpoint_policies.save_only_these_names(*REMAT_NAMES)
    if remat == "dots":  # selective's and every projection's output: only elementwise redone
        return jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.save_only_these_names(*REMAT_NAMES),
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    if remat == "offload":  # selective's residuals, parked in host memory until the backward
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=REMAT_NAMES,
            offload_src="device", offload_dst="pinned_host")
    if remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    raise ValueError(f"model.remat: unknown policy {remat!r}")


def scan_layers(layers: nnx.Module, x, body, *, remat: str, count: int | None = None,
                gather=None, xs=None, scan: bool = True):
    """`(x, ys)`: `body(layer, x, xs_i) -> (x, y)` over the first `count` layers of a stacked
    module, `xs_i` being layer i's slice of `xs` (a pytree with a leading layer axis, or
    None) and `ys` the `y`s stacked over layers (inference passes each layer's KV cache in
    and takes its new keys and values out; a `y` nobody reads is never computed).

    Scanning keeps compile time flat in depth (28-80 decoder layers). `remat` (a
    `remat_policy` name) picks what each layer keeps for the backward pass. `gather`, if
    given, maps one layer's parameter state (sharded, FSDP) to the full state inside the
    scanned step, so only one layer is ever gathered, and under remat the backward gathers
    it again instead of keeping it.

    Layers `unstack`ed for inference run in a Python loop instead: `xs` and `ys` are then
    lists with one entry per layer.

    `scan=False` runs stacked layers in a Python loop too (`model.scan_layers`), each on
    its slice of the stack: a scan keeps what the backward needs in stacks over layers,
    which XLA zero-fills before the loop and fills by copying each layer's result in
    (Qwen2-1.5B at 16K tokens with `dots` on one H200: ~20 ms of a 480 ms step); unrolled,
    each layer's products write their own buffers. Compile time grows with depth, and
    memory too: outside a scan, XLA merges a layer's recomputation with its forward where
    it can (prevent_cse=False), so a policy keeps more than its set (`dots` there: 59.8
    GiB against 50.0 scanned; the config allows unrolling with `none` and `dots` only).
    """
    policy = remat_policy(remat)
    if isinstance(layers, nnx.List):
        if gather is not None:
            raise ValueError("scan_layers: unstacked layers are for inference (no gather)")
        step = body if policy is None else jax.checkpoint(body, prevent_cse=False,
                                                          policy=policy)
        ys = []
        for i, layer in enumerate(layers[:count]):
            x, y = step(layer, x, None if xs is None else xs[i])
            ys.append(y)
        return x, ys
    graphdef, state = nnx.split(layers)
    if count is not None:
        state = jax.tree.map(lambda a: a[:count], state)

    def step(carry, inputs):
        layer_state, layer_xs = inputs
        if gather is not None:
            layer_state = gather(layer_state)
        return body(nnx.merge(graphdef, layer_state), carry, layer_xs)

    if policy is not None:
        step = jax.checkpoint(step, prevent_cse=False, policy=policy)
    if scan:
        return jax.lax.scan(step, x, (state, xs))
    depth = jax.tree.leaves(state)[0].shape[0]
    ys = []
    for inputs in zip(_per_layer(state, depth), _per_layer(xs, depth), strict=True):
        x, y = step(x, inputs)
        ys.append(y)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _per_layer(tree, depth: int) -> list:
    """`depth` trees, one per layer, from a tree stacked on axis 0 (None: `depth` Nones).
    `jnp.unstack` is one operation whose transpose stacks the layers' gradients at once."""
    if tree is None:
        return [None] * depth
    leaves, treedef = jax.tree.flatten(tree)
    per_leaf = [jnp.unstack(a) for a in leaves]
    return [treedef.unflatten([parts[i] for parts in per_leaf]) for i in range(depth)]


def unstack(layers: nnx.Module) -> nnx.List:
    """A stacked module's layers as a list of modules, each with parameters of its own.

    For decoding: a scan over stacked weights slices each layer's weights out of the stack
    on every step, and XLA copies the slice before the matrix product reads it (measured on
    one H200 with Qwen2-7B: 6.5 of 15.7 ms per token). Separate arrays are read in place.
    """
    graphdef, state = nnx.split(layers)
    count = jax.tree.leaves(state)[0].shape[0]
    modules = [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
               for i in range(count)]
    for module in modules:  # the layer axis is gone from every parameter's names too
        for _, variable in nnx.iter_graph(module):
            names = variable.get_metadata().get("out_sharding") \
                if isinstance(variable, nnx.Variable) else None
            if names and names[0] == STACKED:
                variable.set_metadata(out_sharding=names[1:])
    return nnx.List(modules)


def stacked(num_layers: int, make, rngs: nnx.Rngs):
    """Create `num_layers` copies of `make(rngs)` with params stacked on a leading axis named
    `STACKED` (FSDP reads the name)."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: STACKED})
    def build(r):
        return make(r)

    return build(rngs)
