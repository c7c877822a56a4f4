"""Per-sample Gramians from per-sample Jacobians, a chunk of samples at a time."""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._checks import check_losses
from .common import block, flat_rows, symmetrize


def per_sample_vector_fn(loss_fn: Callable[..., Array]) -> Callable[..., Array]:
    """`vec(gram, *sample) -> (T,)`: the losses of one sample, from the batched
    `loss_fn(gram, *batch) -> (B,)` or `(B, T)` called on a batch of one."""

    def vec(g, *sample):
        out = loss_fn(g, *jtu.tree_map(lambda x: x[None], sample))
        check_losses(out, "`fn`")
        if out.ndim not in (1, 2) or out.shape[0] != 1:
            raise ValueError(
                "Per-sample losses: `fn` must return losses of shape (B,) or (B, T); "
                f"on a batch of one it returned shape {out.shape}."
            )
        return jnp.reshape(out, (-1,))

    return vec


def per_sample_gramian(
    vec: Callable[..., Array],
    gram: PyTree,
    batch: tuple,
    size: int,
    tasks: int,
    dtype,
    chunk_size: int | None,
) -> Array:
    per_sample_jac = jax.vmap(jax.jacrev(vec), in_axes=(None,) + (0,) * len(batch))

    def chunk_rows(chunk: tuple) -> list[Array]:
        jac = per_sample_jac(gram, *chunk)  # leaves (c, T, *leaf_shape)
        rows = jtu.tree_leaves(jac)[0].shape[0] * tasks
        return flat_rows(jac, rows)

    if chunk_size is None or chunk_size >= size:
        rows = chunk_rows(batch)
        return symmetrize(block(rows, rows, dtype))
    if forward_mode_is_cheap(vec, gram, batch):
        return forward_gramian(vec, gram, batch, size, tasks, dtype, chunk_size)
    return pairwise_gramian(chunk_rows, batch, size, tasks, dtype, chunk_size)


def chunk_starts(size: int, c: int) -> Array:
    # Chunk i covers samples [start_i, start_i + c) with start_i = min(i c, B - c): the
    # last chunk overlaps the previous one when c does not divide B (overlapping
    # entries are written twice with the same values). No padding.
    return jnp.minimum(jnp.arange(-(-size // c)) * c, size - c)


def task_rows(samples: Array, tasks: int) -> Array:
    return jnp.ravel(samples[:, None] * tasks + jnp.arange(tasks)[None, :])


def forward_mode_is_cheap(vec: Callable[..., Array], gram: PyTree, batch) -> bool:
    """Whether one sample's JVP costs at most ~8 flops per parameter (dense layers:
    about 6), i.e. about as much as dots with a few gradients; with weight sharing
    (convolutions, sequences) it costs far more."""
    spec = jtu.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), gram)
    sample = jtu.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batch)

    def jvp(g, *s):
        return jax.jvp(lambda p: vec(p, *s), (g,), (g,))

    try:  # forward mode may be unsupported (a `jax.custom_vjp` in the model)
        cost = jax.jit(jvp).lower(spec, *sample).cost_analysis()
    except (TypeError, NotImplementedError):
        return False
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = cost.get("flops") if isinstance(cost, dict) else None
    params = sum(math.prod(x.shape) for x in jtu.tree_leaves(gram))
    return flops is not None and 0 < flops <= 8 * params


def forward_gramian(vec, gram, batch, size, tasks, dtype, c) -> Array:
    """Dense-layer models: per chunk $a$, $J_a$ (c per-sample gradients) once, then the
    entries $G_{ij} = \\partial_{g_i} \\ell_j$ as JVPs of the losses of chunks
    $a, \\dots, a + k/2$ (mod k) in the $c$ directions $g_i$. Each chunk pair is covered
    (by symmetry) with $k$ chunk Jacobians instead of $k(k+1)/2$, and the contractions
    are large matmuls (directions x samples) instead of $c \\times c$ dots over $n$."""
    per_sample_jac = jax.vmap(jax.jacrev(vec), in_axes=(None,) + (0,) * len(batch))
    losses_of = jax.vmap(vec, in_axes=(None,) + (0,) * len(batch))
    starts = chunk_starts(size, c)
    k = starts.shape[0]

    def take(samples):
        return jtu.tree_map(lambda x: jnp.take(x, samples, axis=0), batch)

    def body(a, g):
        own = starts[a] + jnp.arange(c)
        partners = jnp.concatenate(
            [starts[(a + j) % k] + jnp.arange(c) for j in range(k // 2 + 1)]
        )
        jac = per_sample_jac(gram, *take(own))  # leaves (c, T, *leaf_shape)
        directions = jtu.tree_map(lambda x: jnp.reshape(x, (-1, *x.shape[2:])), jac)
        sub = take(partners)

        def column(t):
            return jax.jvp(lambda p: losses_of(p, *sub), (gram,), (t,))[1]

        with jax.default_matmul_precision("highest"):
            blk = jax.vmap(column)(directions)
        blk = jnp.reshape(blk, (c * tasks, -1)).astype(dtype)
        rows, cols = task_rows(own, tasks), task_rows(partners, tasks)
        g = g.at[rows[:, None], cols[None, :]].set(blk)
        return g.at[cols[:, None], rows[None, :]].set(blk.T)

    g = lax.fori_loop(0, k, body, jnp.zeros((size * tasks,) * 2, dtype))
    return symmetrize(g)


def pairwise_gramian(chunk_rows, batch, size, tasks, dtype, c) -> Array:
    """Any model: blocks $G_{ab}$ for chunk pairs $a \\le b$, chunk $b$ recomputed for
    each $a$ ($k(k+1)/2$ chunk Jacobians), two chunks of gradients alive at once."""
    starts = chunk_starts(size, c)
    k = starts.shape[0]

    def chunk(i):
        return jtu.tree_map(lambda x: lax.dynamic_slice_in_dim(x, starts[i], c), batch)

    def outer(a, g):
        rows_a = chunk_rows(chunk(a))
        row = starts[a] * tasks
        g = lax.dynamic_update_slice(g, block(rows_a, rows_a, dtype), (row, row))

        def inner(b, g):
            col = starts[b] * tasks
            blk = block(rows_a, chunk_rows(chunk(b)), dtype)
            g = lax.dynamic_update_slice(g, blk, (row, col))
            return lax.dynamic_update_slice(g, blk.T, (col, row))

        return lax.fori_loop(a + 1, k, inner, g)

    g = lax.fori_loop(0, k, outer, jnp.zeros((size * tasks,) * 2, dtype))
    return symmetrize(g)


def independence_check(
    losses: Array,
    loss_fn: Callable[..., Array],
    batch: tuple,
    vec: Callable[..., Array],
    gram: PyTree,
    rtol: float = 1e-6,
) -> Array:
    """Errors (at run time) if the batched losses or the gradient of sample 0 differ
    from the ones computed on a batch of one."""
    first = jtu.tree_map(lambda x: x[0], batch)
    single = jax.vmap(vec, in_axes=(None,) + (0,) * len(batch))(gram, *batch)
    flat = jnp.reshape(losses, single.shape)

    def first_loss_in_batch(g):
        out = loss_fn(g, *batch)
        return jnp.sum(jnp.reshape(out, (out.shape[0], -1))[0])

    g_batch = jax.grad(first_loss_in_batch)(gram)
    g_single = jax.grad(lambda g: jnp.sum(vec(g, *first)))(gram)
    dtype = losses.dtype

    def mismatch(x, y):
        tol = jnp.asarray(rtol, dtype) * (jnp.max(jnp.abs(y)) + jnp.asarray(1, dtype))
        # NaN counts as a mismatch: compare elementwise, since XLA:CPU's max reductions
        # over large arrays drop NaN.
        return ~jnp.all(jnp.abs(x - y) <= tol)

    bad = mismatch(flat, single)
    for x, y in zip(jtu.tree_leaves(g_batch), jtu.tree_leaves(g_single)):
        bad = bad | mismatch(x, y)
    return eqx.error_if(
        losses,
        bad,
        "The batch elements are not independent: the losses or the gradient of "
        "sample 0 computed on the whole batch differ from those on a batch of one "
        "(e.g. BatchNorm in training mode). Use `strategy=eqxjd.Gramian()`, which "
        "assumes nothing.",
    )
