r"""Gramians of loss vectors without materialising the Jacobian ("autogram").

Two paths compute $G = J J^\top$ of a loss vector w.r.t. (a filtered part of) a model:

- [`eqxjd.value_and_gramian`][]: any function `fn(params, *args) -> losses`. With a
  `chunk_size`, the columns of $G$ are computed `chunk_size` at a time as
  $G e_i = J (J^\top e_i)$ (a VJP then a JVP through one linearisation), so at most
  `chunk_size` rows of $J$ exist at once.
- [`eqxjd.per_sample_value_and_gramian`][]: losses that decompose over a batch
  (`loss_fn(params, *sample)` per sample). Per-sample Jacobians are computed for
  `chunk_size` samples at a time; $G$ is filled chunk by chunk, from JVPs in the
  directions of one chunk's gradients (dense models) or from block products of two
  chunks of gradients (any model).

[`eqxjd.gramian_value_and_update`][] then applies a Gramian weighting and returns the
update $\nabla_\theta \sum_i w_i \ell_i$ as one VJP: the Jacobian is never kept.
"""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._aggregator import (
    AbstractGramianWeightedAggregator,
    AbstractStatefulGramianWeightedAggregator,
)
from ._custom_types import State
from ._misc import check_chunk_size
from ._weighting import AbstractStatefulWeighting, AbstractWeighting


_HIGHEST = lax.Precision.HIGHEST
FilterSpec = bool | Callable[[Any], bool] | PyTree[bool | Callable[[Any], bool]]


# ---------------------------------------------------------------------------- helpers


def _split_params(params: PyTree, filter_spec: FilterSpec):
    """(gramian part, other differentiable part, static part)."""
    diff, static = eqx.partition(params, eqx.is_inexact_array)
    gram, rest = eqx.partition(diff, filter_spec)
    if not jtu.tree_leaves(gram):
        raise ValueError(
            "No floating-point array of `params` is selected for the Gramian: check "
            "`filter_spec` (a pytree of bools / callables like `eqx.partition`'s)."
        )
    return gram, rest, static


def _check_losses(losses: Any, what: str) -> Array:
    if not (hasattr(losses, "dtype") and hasattr(losses, "shape")):
        raise ValueError(f"{what} must return a JAX array; got {type(losses)}.")
    if not jnp.issubdtype(losses.dtype, jnp.inexact):
        raise ValueError(f"{what} must return floating losses; got {losses.dtype}.")
    return losses


def _batch_size(batch: tuple[Any, ...]) -> int:
    leaves = jtu.tree_leaves(batch)
    if not leaves:
        raise ValueError(
            "The per-sample path needs at least one batched array (leading axis = "
            "batch size) after `params`."
        )
    sizes = set()
    for leaf in leaves:
        if jnp.ndim(leaf) < 1:
            raise ValueError(
                "Every batched argument needs a leading batch axis; got a leaf of "
                f"shape {jnp.shape(leaf)}. Close over non-batched arguments instead."
            )
        sizes.add(jnp.shape(leaf)[0])
    if len(sizes) != 1:
        raise ValueError(
            "Mismatched batch sizes: every batched argument must have the same leading "
            f"axis size; got {sorted(sizes)}."
        )
    return sizes.pop()


def _flat_rows(tree: PyTree[Array], rows: int) -> list[Array]:
    return [
        jnp.reshape(leaf, (rows, math.prod(leaf.shape) // max(rows, 1)))
        for leaf in jtu.tree_leaves(tree)
    ]


def _block(left: list[Array], right: list[Array], dtype) -> Array:
    """$\\sum_\\ell A_\\ell B_\\ell^\\top$ over the leaves."""
    out = jnp.zeros((left[0].shape[0], right[0].shape[0]), dtype)
    for a, b in zip(left, right):
        out = out + jnp.matmul(a.astype(dtype), b.astype(dtype).T, precision=_HIGHEST)
    return out


def _symmetrize(g: Array) -> Array:
    # Exactly symmetric (a A^T computed by XLA need not be bit-for-bit symmetric).
    return (g + g.T) / jnp.asarray(2, g.dtype)


# ------------------------------------------------------------------------ generic path


def _generic_gramian(
    fn_of_gram: Callable[[PyTree], Array],
    gram: PyTree,
    chunk_size: int | None,
) -> tuple[Array, Array]:
    losses, f_jvp = jax.linearize(fn_of_gram, gram)
    losses = _check_losses(losses, "`fn`")
    shape, dtype = losses.shape, losses.dtype
    m = math.prod(shape)
    f_vjp = jax.linear_transpose(f_jvp, gram)
    eye = jnp.eye(m, dtype=dtype)
    if chunk_size is None or chunk_size >= m:
        # All rows at once: J is formed transiently, G = sum over leaves of J_l J_l^T.
        rows = jax.vmap(lambda e: f_vjp(jnp.reshape(e, shape))[0])(eye)
        leaves = _flat_rows(rows, m)
        g = _block(leaves, leaves, dtype)
    else:
        # G e_i = J (J^T e_i): a VJP then a JVP through the same linearisation, for
        # `chunk_size` basis vectors at a time. 2m linear passes, O(chunk_size * n).
        def column(e):
            (row,) = f_vjp(jnp.reshape(e, shape))
            return jnp.reshape(f_jvp(row), (m,))

        g = lax.map(column, eye, batch_size=chunk_size)
    return losses, _symmetrize(g)


def value_and_gramian(
    fn: Callable[..., Array],
    params: PyTree,
    *args: Any,
    chunk_size: int | None = None,
    filter_spec: FilterSpec = True,
) -> tuple[Array, Float[Array, "m m"]]:
    r"""The losses and the Gramian $G = J J^\top$ of any loss function.

    `J` is the Jacobian of `fn(params, *args)` (flattened in row-major order, `m`
    entries) w.r.t. the floating-point arrays of `params` selected by `filter_spec`.
    No structure is assumed: the losses may mix batch elements (e.g. BatchNorm), which
    the per-sample path ([`eqxjd.per_sample_value_and_gramian`][]) does not allow.

    - `chunk_size=None`: all `m` rows of $J$ at once (one vmapped VJP, then
      $\sum_\ell J_\ell J_\ell^\top$ leaf by leaf); memory $O(m n)$, fastest.
    - `chunk_size=c`: the columns $G e_i = J (J^\top e_i)$, `c` at a time, through one
      linearisation of `fn` (a VJP and a JVP per column); memory $O(c\,n)$ plus the
      linearisation residuals, about twice the compute. Row blocks contracted pairwise
      would instead need $O(m/c)$ VJPs per row.

    **Arguments:**

    - `fn`: `fn(params, *args) -> losses`, any floating array (`m = losses.size`).
    - `params`: a pytree (e.g. an `eqx.Module`); its floating arrays are differentiated.
    - `*args`: further arguments of `fn` (not differentiated).
    - `chunk_size`: rows of $J$ alive at once, or `None` for all. (Keyword only
        argument.)
    - `filter_spec`: which parameters enter the Gramian, a bool / callable / pytree of
        them as in `eqx.partition` (default: all floating arrays). (Keyword only
        argument.)

    **Returns:**

    A 2-tuple `(losses, gramian)`, with `gramian` of shape `(m, m)` in the order of
    `losses.ravel()`.
    """
    check_chunk_size(chunk_size)
    gram, rest, static = _split_params(params, filter_spec)
    rest = lax.stop_gradient(rest)

    def fn_of_gram(g):
        return fn(eqx.combine(g, rest, static), *args)

    return _generic_gramian(fn_of_gram, gram, chunk_size)


# --------------------------------------------------------------------- per-sample path


def _per_sample_vector_fn(
    loss_fn: Callable[..., Array], rest: PyTree, static: PyTree, batched: bool
) -> Callable[..., Array]:
    """`(gram, *sample) -> (T,)` losses of one sample."""

    def vec(g, *sample):
        model = eqx.combine(g, rest, static)
        if batched:
            sample = jtu.tree_map(lambda x: x[None], sample)
            out = loss_fn(model, *sample)
            if jnp.ndim(out) < 1 or out.shape[0] != 1:
                raise ValueError(
                    "With `batched=True`, `loss_fn` must return losses of shape (B,) "
                    f"or (B, T); on a batch of 1 it returned shape {jnp.shape(out)}."
                )
        else:
            out = loss_fn(model, *sample)
        out = _check_losses(out, "`loss_fn`")
        if out.ndim > (2 if batched else 1):
            raise ValueError(
                "Per-sample losses must be a scalar or a vector of tasks (T,) per "
                f"sample; got shape {out.shape[1:] if batched else out.shape}."
            )
        return jnp.reshape(out, (-1,))

    return vec


def _batched_losses(
    loss_fn: Callable[..., Array], batched: bool, model: PyTree, batch: tuple, size: int
) -> Array:
    if batched:
        losses = loss_fn(model, *batch)
    else:
        losses = jax.vmap(lambda *sample: loss_fn(model, *sample))(*batch)
    losses = _check_losses(losses, "`loss_fn`")
    if losses.ndim not in (1, 2) or losses.shape[0] != size:
        raise ValueError(
            f"The losses over the batch must have shape ({size},) or ({size}, T); "
            f"got {losses.shape}."
        )
    return losses


def _per_sample_gramian(
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
        return _flat_rows(jac, rows)

    if chunk_size is None or chunk_size >= size:
        rows = chunk_rows(batch)
        return _symmetrize(_block(rows, rows, dtype))
    if _forward_mode_is_cheap(vec, gram, batch):
        return _forward_gramian(vec, gram, batch, size, tasks, dtype, chunk_size)
    return _pairwise_gramian(chunk_rows, batch, size, tasks, dtype, chunk_size)


def _chunk_starts(size: int, c: int) -> Array:
    # Chunk i covers samples [start_i, start_i + c) with start_i = min(i c, B - c): the
    # last chunk overlaps the previous one when c does not divide B (overlapping
    # entries are written twice with the same values). No padding.
    return jnp.minimum(jnp.arange(-(-size // c)) * c, size - c)


def _task_rows(samples: Array, tasks: int) -> Array:
    return jnp.ravel(samples[:, None] * tasks + jnp.arange(tasks)[None, :])


def _forward_mode_is_cheap(vec: Callable[..., Array], gram: PyTree, batch) -> bool:
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


def _forward_gramian(vec, gram, batch, size, tasks, dtype, c) -> Array:
    """Dense-layer models: per chunk $a$, $J_a$ (c per-sample gradients) once, then the
    entries $G_{ij} = \\partial_{g_i} \\ell_j$ as JVPs of the losses of chunks
    $a, \\dots, a + k/2$ (mod k) in the $c$ directions $g_i$. Each chunk pair is covered
    (by symmetry) with $k$ chunk Jacobians instead of $k(k+1)/2$, and the contractions
    are large matmuls (directions x samples) instead of $c \\times c$ dots over $n$."""
    per_sample_jac = jax.vmap(jax.jacrev(vec), in_axes=(None,) + (0,) * len(batch))
    losses_of = jax.vmap(vec, in_axes=(None,) + (0,) * len(batch))
    starts = _chunk_starts(size, c)
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
        rows, cols = _task_rows(own, tasks), _task_rows(partners, tasks)
        g = g.at[rows[:, None], cols[None, :]].set(blk)
        return g.at[cols[:, None], rows[None, :]].set(blk.T)

    g = lax.fori_loop(0, k, body, jnp.zeros((size * tasks,) * 2, dtype))
    return _symmetrize(g)


def _pairwise_gramian(chunk_rows, batch, size, tasks, dtype, c) -> Array:
    """Any model: blocks $G_{ab}$ for chunk pairs $a \\le b$, chunk $b$ recomputed for
    each $a$ ($k(k+1)/2$ chunk Jacobians), two chunks of gradients alive at once."""
    starts = _chunk_starts(size, c)
    k = starts.shape[0]

    def chunk(i):
        return jtu.tree_map(lambda x: lax.dynamic_slice_in_dim(x, starts[i], c), batch)

    def outer(a, g):
        rows_a = chunk_rows(chunk(a))
        row = starts[a] * tasks
        g = lax.dynamic_update_slice(g, _block(rows_a, rows_a, dtype), (row, row))

        def inner(b, g):
            col = starts[b] * tasks
            blk = _block(rows_a, chunk_rows(chunk(b)), dtype)
            g = lax.dynamic_update_slice(g, blk, (row, col))
            return lax.dynamic_update_slice(g, blk.T, (col, row))

        return lax.fori_loop(a + 1, k, inner, g)

    g = lax.fori_loop(0, k, outer, jnp.zeros((size * tasks,) * 2, dtype))
    return _symmetrize(g)


def _independence_check(
    losses: Array,
    loss_fn: Callable[..., Array],
    model_diff: PyTree,
    static: PyTree,
    batch: tuple,
    vec: Callable[..., Array],
    gram: PyTree,
    rtol: float,
) -> Array:
    """Errors (at run time) if the batched losses or the gradient of sample 0 differ
    from the ones computed on a batch of one."""
    first = jtu.tree_map(lambda x: x[0], batch)
    single = jax.vmap(vec, in_axes=(None,) + (0,) * len(batch))(gram, *batch)
    flat = jnp.reshape(losses, single.shape)

    def first_loss_in_batch(g):
        out = loss_fn(eqx.combine(g, model_diff, static), *batch)
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
        "(e.g. BatchNorm in training mode). Use the generic path, "
        "`eqxjd.value_and_gramian`.",
    )


def per_sample_value_and_gramian(
    loss_fn: Callable[..., Array],
    params: PyTree,
    *batch: Any,
    batched: bool = False,
    chunk_size: int | None = None,
    filter_spec: FilterSpec = True,
    check_independence: bool = False,
    rtol: float = 1e-6,
) -> tuple[Array, Float[Array, "m m"]]:
    r"""The per-sample losses and their Gramian, for losses that decompose over a batch.

    The losses are $\ell_{i} = $ `loss_fn(params, *sample_i)` (a scalar, or a vector of
    `T` tasks for instance-wise multi-task learning), for the `B` samples in `batch`.
    Per-sample Jacobians are computed `chunk_size` samples at a time (`vmap` of
    `jacrev`), so at most $O(2\,c\,T\,n)$ memory instead of $O(B\,T\,n)$, in one
    of two ways, $k = \lceil B / c \rceil$ chunks:

    - forward: when a JVP of one sample costs at most ~8 flops per parameter (dense
      layers; estimated from XLA's cost analysis) and forward mode is supported, the
      Jacobian $J_a$ of each chunk is computed once and the entries
      $G_{ij} = \langle \nabla \ell_i, \nabla \ell_j \rangle$ for $i$ in chunk
      $a$ and $j$ in chunks $a, \dots, a + k/2$ (mod $k$) come from JVPs of those
      losses in the directions $\nabla \ell_i$: $k$ chunk Jacobians, and large
      matmuls (directions $\times$ samples) instead of $c \times c$ dots over $n$.
    - pairwise (any model, e.g. convolutions, where a JVP costs far more than a
      dot): blocks $G_{ab} = \sum_\ell J_{a,\ell} J_{b,\ell}^\top$ for chunk
      pairs $a \le b$, chunk $b$ recomputed for each $a < b$: $k(k+1)/2$ chunk
      Jacobians.

    Both are exact (up to rounding).

    !!! warning "Batch independence"

        This path is exact only if sample $i$'s loss depends on sample $i$ alone. With
        the default `batched=False`, `loss_fn` is written per sample and `vmap`-ed, so
        this holds by construction (a model using batch collectives, e.g.
        `eqx.nn.BatchNorm`, fails with an unbound axis name). With `batched=True`,
        `loss_fn(params, *batch) -> (B,)` or `(B, T)` sees whole batches and is called
        on batches of one for the per-sample Jacobians: a model mixing samples
        (BatchNorm in training mode) silently gives the Gramian of *other* losses.
        `check_independence=True` detects this at run time (an `eqx.error_if` comparing
        the losses and sample 0's gradient against a batch of one). Otherwise use
        [`eqxjd.value_and_gramian`][], which assumes nothing.

    **Arguments:**

    - `loss_fn`: `loss_fn(params, *sample)` -> scalar or `(T,)`; with `batched=True`,
        `loss_fn(params, *batch)` -> `(B,)` or `(B, T)`.
    - `params`: a pytree (e.g. an `eqx.Module`); its floating arrays are differentiated.
    - `*batch`: pytrees of arrays with a common leading batch axis `B`.
    - `batched`: whether `loss_fn` takes whole batches. (Keyword only argument.)
    - `chunk_size`: samples per chunk, or `None` for the whole batch at once.
        (Keyword only argument.)
    - `filter_spec`: which parameters enter the Gramian (partial Jacobian descent), as
        in `eqx.partition`. (Keyword only argument.)
    - `check_independence`: add the run-time batch-independence check (costs one extra
        backward pass). (Keyword only argument.)
    - `rtol`: relative tolerance of that check. (Keyword only argument.)

    **Returns:**

    A 2-tuple `(losses, gramian)`: `losses` of shape `(B,)` or `(B, T)`, `gramian` of
    shape `(B T, B T)` in the order of `losses.ravel()`.
    """
    losses, g, _ = _per_sample(
        loss_fn,
        params,
        batch,
        batched=batched,
        chunk_size=chunk_size,
        filter_spec=filter_spec,
        check_independence=check_independence,
        rtol=rtol,
        want_vjp=False,
    )
    return losses, g


def _per_sample(
    loss_fn,
    params,
    batch,
    *,
    batched,
    chunk_size,
    filter_spec,
    check_independence,
    rtol,
    want_vjp,
):
    check_chunk_size(chunk_size)
    size = _batch_size(batch)
    gram, rest, static = _split_params(params, filter_spec)
    diff, _ = eqx.partition(params, eqx.is_inexact_array)

    def batched_of_diff(d):
        return _batched_losses(loss_fn, batched, eqx.combine(d, static), batch, size)

    if want_vjp:
        losses, vjp = jax.vjp(batched_of_diff, diff)
    else:
        losses, vjp = batched_of_diff(diff), None
    tasks = 1 if losses.ndim == 1 else losses.shape[1]
    vec = _per_sample_vector_fn(
        loss_fn, lax.stop_gradient(rest), static, batched=batched
    )
    gram = lax.stop_gradient(gram)
    if check_independence:
        if not batched:
            raise ValueError(
                "`check_independence` only applies with `batched=True`: a per-sample "
                "`loss_fn` is vmapped, which makes samples independent by construction."
            )
        losses = _independence_check(
            losses, loss_fn, lax.stop_gradient(rest), static, batch, vec, gram, rtol
        )
    g = _per_sample_gramian(vec, gram, batch, size, tasks, losses.dtype, chunk_size)
    return losses, g, vjp


# ------------------------------------------------------------------------- the update


class GramianUpdate(eqx.Module):
    """What [`eqxjd.gramian_value_and_update`][] returns.

    **Fields:**

    - `losses`: the losses, with `fn`'s output shape.
    - `weights`: the weights, same shape as `losses`.
    - `updates`: $\\nabla_\\theta \\sum_i w_i \\ell_i$, shaped like
        `eqx.filter(params, eqx.is_inexact_array)` (`None` elsewhere). Like a gradient:
        pass it to an optimiser that descends (e.g. `optax.sgd`) as is.
    - `gramian`: the Gramian `(m, m)`.
    - `state`: the new weighting state (`None` for stateless weightings).
    """

    losses: Array
    weights: Array
    updates: PyTree
    gramian: Array
    state: State


AnyGramianWeighting = (
    AbstractWeighting
    | AbstractStatefulWeighting
    | AbstractGramianWeightedAggregator
    | AbstractStatefulGramianWeightedAggregator
)


def _as_weighting(weighting):
    if isinstance(
        weighting,
        (AbstractGramianWeightedAggregator, AbstractStatefulGramianWeightedAggregator),
    ):
        return weighting.gramian_weighting
    if isinstance(weighting, (AbstractWeighting, AbstractStatefulWeighting)):
        return weighting
    raise ValueError(
        "`weighting` must be a Gramian weighting (e.g. `eqxjd.UPGradWeighting()`) or a "
        f"Gramian-weighted aggregator (e.g. `eqxjd.UPGrad()`); got {type(weighting)}."
    )


def gramian_value_and_update(
    fn: Callable[..., Array],
    weighting: AnyGramianWeighting,
    params: PyTree,
    *args: Any,
    per_sample: bool = False,
    batched: bool = False,
    chunk_size: int | None = None,
    filter_spec: FilterSpec = True,
    state: State = None,
    key: PRNGKeyArray | None = None,
    check_independence: bool = False,
) -> GramianUpdate:
    r"""One Jacobian-descent step through the Gramian: $G \to w \to \nabla \sum w_i
    \ell_i$, never storing the Jacobian.

    Equivalent to aggregating `jax.jacrev`'s Jacobian with
    `eqxjd.GramianWeightedAggregator(weighting)` (TorchJD's `autogram.Engine` +
    `losses.backward(weights)`), but the update is one VJP of $\sum_i w_i \ell_i$ and
    $G$ comes from [`eqxjd.value_and_gramian`][] (`per_sample=False`) or
    [`eqxjd.per_sample_value_and_gramian`][] (`per_sample=True`, for instance-wise risk
    minimisation: one loss per sample, or `(B, T)` per sample and task).

    With `filter_spec`, $G$ is taken w.r.t. a part of the model only (partial Jacobian
    descent), while the update covers every floating array of `params`. The weights are
    treated as constants in the update (like `losses.backward(weights)`); $G$ is not
    differentiated.

    !!! Example

        ```python
        def loss_fn(model, x, y):  # one sample
            return (model(x) - y) ** 2

        step = eqx.filter_jit(ft.partial(
            eqxjd.gramian_value_and_update, loss_fn, eqxjd.UPGradWeighting(),
            per_sample=True, chunk_size=32))
        out = step(model, xs, ys)
        updates, opt_state = optimizer.update(out.updates, opt_state, model)
        ```

    **Arguments:**

    - `fn`: the loss function, `fn(params, *args) -> losses`; with `per_sample=True`
        as in [`eqxjd.per_sample_value_and_gramian`][].
    - `weighting`: a Gramian weighting (stateless or stateful) or a Gramian-weighted
        aggregator such as [`eqxjd.UPGrad`][] (its `gramian_weighting` is used).
    - `params`: a pytree, e.g. an `eqx.Module`.
    - `*args`: further arguments of `fn` (with `per_sample=True`: the batch).
    - `per_sample`, `batched`, `chunk_size`, `filter_spec`, `check_independence`: see
        the two Gramian functions. (Keyword only arguments.)
    - `state`: the state of a stateful weighting (from `weighting.init(gramian)`).
        (Keyword only argument.)
    - `key`: a PRNG key for random weightings. (Keyword only argument.)

    **Returns:**

    A [`eqxjd.GramianUpdate`][] with `losses`, `weights`, `updates`, `gramian` and
    `state`.
    """
    weighting = _as_weighting(weighting)
    stateful = isinstance(weighting, AbstractStatefulWeighting)
    if stateful and state is None:
        raise ValueError(
            f"{type(weighting).__name__} is stateful: pass `state=weighting.init(G)` "
            "(only the shape and dtype of G are read)."
        )
    if per_sample:
        losses, g, vjp = _per_sample(
            fn,
            params,
            args,
            batched=batched,
            chunk_size=chunk_size,
            filter_spec=filter_spec,
            check_independence=check_independence,
            rtol=1e-6,
            want_vjp=True,
        )
    else:
        if batched or check_independence:
            raise ValueError(
                "`batched` and `check_independence` only apply with `per_sample=True`."
            )
        diff, static = eqx.partition(params, eqx.is_inexact_array)
        losses, vjp = jax.vjp(lambda d: fn(eqx.combine(d, static), *args), diff)
        _, g = value_and_gramian(
            fn, params, *args, chunk_size=chunk_size, filter_spec=filter_spec
        )
    if stateful:
        weights, state = weighting(g, state, key=key)
    else:
        weights = weighting(g, key=key)
    weights = jnp.reshape(weights, losses.shape).astype(losses.dtype)
    if not weighting.differentiable:
        weights = lax.stop_gradient(weights)
    (updates,) = vjp(weights)
    return GramianUpdate(losses, weights, updates, g, state)
