import math
from typing import Any

import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._aggregator import (
    AbstractAggregator,
    AbstractGramianWeightedAggregator,
    AbstractStatefulAggregator,
    AbstractStatefulGramianWeightedAggregator,
    AbstractStatefulWeightedAggregator,
    AbstractWeightedAggregator,
    weighted_combination,
)
from ._custom_types import State
from ._misc import gramian


AnyAggregator = AbstractAggregator | AbstractStatefulAggregator
_HIGHEST = lax.Precision.HIGHEST


def _rows(leaf: Array, m: int) -> Array:
    return jnp.reshape(leaf, (m, math.prod(leaf.shape[1:])))


def check_jacobian_tree(jacobians: PyTree[Array]) -> tuple[list[Array], Any, int]:
    """Flattens a Jacobian pytree and checks that every leaf is a floating array with a
    common leading axis `m` (the objectives)."""
    leaves, treedef = jtu.tree_flatten(jacobians)
    if not leaves:
        raise ValueError("The Jacobian pytree has no array leaves.")
    for leaf in leaves:
        if not hasattr(leaf, "shape") or jnp.ndim(leaf) < 1:
            raise ValueError(
                "Every leaf of a Jacobian pytree needs a leading axis of size m (one "
                f"row per objective); got a leaf of shape {jnp.shape(leaf)}."
            )
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise ValueError(
                f"Jacobian leaves must be floating; got dtype {jnp.result_type(leaf)}."
            )
    sizes = {leaf.shape[0] for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(
            "Every leaf of a Jacobian pytree must have the same leading size m; got "
            f"{sorted(sizes)}."
        )
    return leaves, treedef, sizes.pop()


def tree_gramian(jacobians: PyTree[Array]) -> Float[Array, "m m"]:
    r"""$G = \sum_\ell J_\ell J_\ell^\top$ over the leaves, without concatenation."""
    leaves, _, m = check_jacobian_tree(jacobians)
    dtype = jnp.result_type(*leaves)
    return sum(
        (gramian(_rows(leaf, m).astype(dtype)) for leaf in leaves),
        start=jnp.zeros((m, m), dtype),
    )


def tree_combine(
    weights: Float[Array, " m"], jacobians: PyTree[Array]
) -> PyTree[Array]:
    r"""$\sum_i w_i J_{\ell, i}$ for every leaf, with the leaves' shapes and dtypes."""
    return jtu.tree_map(
        lambda leaf: jnp.tensordot(
            weights.astype(leaf.dtype), leaf, axes=1, precision=_HIGHEST
        ),
        jacobians,
    )


def _split(flat: Array, leaves: list[Array], treedef: Any) -> PyTree[Array]:
    sizes = [math.prod(leaf.shape[1:]) for leaf in leaves]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    pieces = [
        flat[start : start + size].reshape(leaf.shape[1:]).astype(leaf.dtype)
        for start, size, leaf in zip(offsets, sizes, leaves)
    ]
    return jtu.tree_unflatten(treedef, pieces)


def aggregate_tree(
    aggregator: AnyAggregator,
    jacobians: PyTree[Array],
    state: State = None,
    *,
    key: PRNGKeyArray | None = None,
) -> tuple[PyTree[Array], Float[Array, " m"] | None, State]:
    """Like [`eqxjd.aggregate`][], returning `(updates, weights or None, state)`."""
    leaves, treedef, m = check_jacobian_tree(jacobians)
    stateful = isinstance(aggregator, AbstractStatefulAggregator)
    if stateful and state is None:
        raise ValueError(
            f"{type(aggregator).__name__} is stateful: pass the state from "
            "`aggregator.init(jacobian)` (or `eqxjd.init_state`)."
        )
    if isinstance(
        aggregator,
        (AbstractGramianWeightedAggregator, AbstractStatefulGramianWeightedAggregator),
    ):
        weighting = aggregator.gramian_weighting
        g = tree_gramian(jacobians)
        if stateful:
            weights, state = weighting(g, state, key=key)
        else:
            weights = weighting(g, key=key)
        updates = tree_combine(weights, jacobians)
        if not weighting.differentiable:
            updates = lax.stop_gradient(updates)
        return updates, weights, state
    dtype = jnp.result_type(*leaves)
    matrix = jnp.concatenate([_rows(leaf, m).astype(dtype) for leaf in leaves], axis=1)
    weights = None
    if isinstance(aggregator, AbstractWeightedAggregator):
        weights = aggregator.weights(matrix, key=key)
        flat = weighted_combination(aggregator.weighting, weights, matrix)
    elif isinstance(aggregator, AbstractStatefulWeightedAggregator):
        weights, state = aggregator.weights(matrix, state, key=key)
        flat = weighted_combination(aggregator.weighting, weights, matrix)
    elif stateful:
        flat, state = aggregator(matrix, state, key=key)
    else:
        flat = aggregator(matrix, key=key)
    return _split(flat, leaves, treedef), weights, state


def init_tree(
    aggregator: AbstractStatefulAggregator, jacobians: PyTree[Array]
) -> State:
    """The initial state of a stateful aggregator for a Jacobian pytree."""
    leaves, _, m = check_jacobian_tree(jacobians)
    dtype = jnp.result_type(*leaves)
    n = sum(math.prod(leaf.shape[1:]) for leaf in leaves)
    return aggregator.init(jnp.zeros((m, n), dtype))


def aggregate(
    aggregator: AnyAggregator,
    jacobians: PyTree[Array],
    state: State = None,
    /,
    *,
    key: PRNGKeyArray | None = None,
) -> PyTree[Array] | tuple[PyTree[Array], State]:
    r"""Aggregates a pytree Jacobian into a pytree update.

    Each leaf of `jacobians` has a leading axis of size `m` (one row per objective), as
    returned by `jax.jacrev` of a loss vector or `jax.vmap(jax.grad(...))`. The result
    has the leaves' trailing shapes and dtypes. The leaves are ordered as
    `jax.tree_util.tree_leaves`, exactly like concatenating them into one `(m, n)`
    matrix.

    For Gramian-weighted aggregators ([`eqxjd.UPGrad`][], [`eqxjd.DualProj`][], ...) the
    Gramian is the sum of per-leaf Gramians and the update is combined leaf by leaf: no
    flat `(m, n)` copy is made. Other aggregators see the concatenated matrix.

    **Arguments:**

    - `aggregator`: any eqxjd aggregator.
    - `jacobians`: a pytree of arrays, each of shape `(m, *leaf_shape)`.
    - `state`: for stateful aggregators, the state from `eqxjd.init_state` (or
        `aggregator.init` on the concatenated Jacobian).
    - `key`: a PRNG key for random aggregators. (Keyword only argument.)

    **Returns:**

    The update pytree; for stateful aggregators a 2-tuple `(updates, new_state)`.
    """
    updates, _, new_state = aggregate_tree(aggregator, jacobians, state, key=key)
    if isinstance(aggregator, AbstractStatefulAggregator):
        return updates, new_state
    return updates
