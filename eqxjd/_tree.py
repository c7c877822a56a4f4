"""Aggregation of Jacobian pytrees: one function, [`eqxjd.aggregate`][], for every
aggregator and for [`eqxjd.Grouped`][], and the result type shared with the steps."""

import math
from typing import Any, TypeAlias

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._aggregator import (
    AbstractAggregator,
    AbstractStatefulAggregator,
    AbstractStatefulWeightedAggregator,
    AbstractWeightedAggregator,
    call_weighting,
)
from ._checks import check_jacobian_tree
from ._custom_types import State
from ._misc import gramian
from ._scale import promote_half, scaled_gramian


_HIGHEST = lax.Precision.HIGHEST
AnyAggregator: TypeAlias = AbstractAggregator | AbstractStatefulAggregator
WeightedAggregators = (AbstractWeightedAggregator, AbstractStatefulWeightedAggregator)


class Aggregated(eqx.Module):
    """What [`eqxjd.aggregate`][] and every Jacobian-descent step return, whatever the
    aggregator: the same fields, `None` where a quantity does not exist.

    **Fields:**

    - `update`: the aggregated update, a pytree shaped like the Jacobian's trailing
        axes (for a step: like the model's trainable part, `None` elsewhere). Like a
        gradient: pass it to an optimiser that descends (e.g. `optax.sgd`) as is.
    - `weights`: the weights $w$ with update $= w^\\top J$, shaped like `losses` (for
        [`eqxjd.aggregate`][]: `(m,)`); `None` for aggregators without weights
        ([`eqxjd.ConFIG`][], [`eqxjd.GradDrop`][], [`eqxjd.TrimmedMean`][]); a tuple
        with one entry per group for [`eqxjd.Grouped`][].
    - `state`: the new aggregator state; `None` for stateless aggregators.
    - `losses`: the losses computed by a step (`None` for [`eqxjd.aggregate`][]).
    - `aux`: the auxiliary output of a step's function with `has_aux=True`, else
        `None`.
    """

    update: PyTree
    weights: Any
    state: State
    losses: Any = None
    aux: Any = None


def _rows(leaf: Array, m: int) -> Array:
    return jnp.reshape(leaf, (m, math.prod(leaf.shape[1:])))


def tree_gramian(jacobians: PyTree[Array]) -> Float[Array, "m m"]:
    r"""The Gramian $G = J J^\top$ of a Jacobian pytree, as $\sum_\ell J_\ell
    J_\ell^\top$ over its leaves: the leaves are never concatenated.

    **Arguments:**

    - `jacobians`: a pytree of arrays, each of shape `(m, *leaf_shape)`.

    **Returns:**

    The Gramian, shape `(m, m)`, in the leaves' common dtype, exactly symmetric.
    """
    leaves, _, m = check_jacobian_tree(jacobians)
    dtype = jnp.result_type(*leaves)
    g = sum(
        (gramian(_rows(leaf, m).astype(dtype)) for leaf in leaves),
        start=jnp.zeros((m, m), dtype),
    )
    # A A^T computed by XLA need not be bit-for-bit symmetric.
    return (g + g.T) / jnp.asarray(2, dtype)


def tree_combine(
    weights: Float[Array, " m"], jacobians: PyTree[Array]
) -> PyTree[Array]:
    r"""$\sum_i w_i J_{\ell, i}$ for every leaf, with the leaves' shapes and dtypes
    (half-precision leaves are combined in float32)."""

    def combine(leaf):
        work = promote_half(leaf)
        out = jnp.tensordot(
            weights.astype(work.dtype), work, axes=1, precision=_HIGHEST
        )
        return out.astype(leaf.dtype)

    return jtu.tree_map(combine, jacobians)


def _concatenate(leaves: list[Array], m: int) -> Array:
    dtype = jnp.result_type(*leaves)
    return jnp.concatenate([_rows(leaf, m).astype(dtype) for leaf in leaves], axis=1)


def _split(flat: Array, leaves: list[Array], treedef: Any) -> PyTree[Array]:
    sizes = [math.prod(leaf.shape[1:]) for leaf in leaves]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    pieces = [
        flat[start : start + size].reshape(leaf.shape[1:]).astype(leaf.dtype)
        for start, size, leaf in zip(offsets, sizes, leaves)
    ]
    return jtu.tree_unflatten(treedef, pieces)


def _tree_statistic(weighting, leaves, m) -> tuple[Array, Array | None]:
    # Gramian weightings never see the concatenated Jacobian. Like `statistic` for a
    # matrix: half precision in float32, the Gramian rescaled only if not
    # representable.
    leaves = [promote_half(leaf) for leaf in leaves]
    if weighting.reads == "gramian":
        return scaled_gramian([_rows(leaf, m) for leaf in leaves], gramian)
    if weighting.reads == "rows":
        return jnp.zeros((m, 0), jnp.result_type(*leaves)), None
    return _concatenate(leaves, m), None


class Grouped(eqx.Module):
    r"""Different aggregators for different parts of the parameters.

    The Jacobian pytree is split into disjoint groups (e.g. one per layer, or trunk
    versus heads); each group is aggregated on its own, exactly as one TorchJD
    `jac_to_grad` call per parameter group. Every trainable leaf must belong to exactly
    one group. A `Grouped` is accepted wherever eqxjd takes an aggregator for a pytree:
    [`eqxjd.aggregate`][], [`eqxjd.filter_value_and_aggregate`][],
    [`eqxjd.filter_mtl_value_and_aggregate`][] and [`eqxjd.as_optax`][]. It is not
    called on a matrix: it needs the pytree to find its groups.

    Its weights are a tuple (one entry per group, `None` for aggregators without
    weights) and its state is a tuple (one entry per group, `None` for stateless ones;
    from `grouped.init(jacobians)`). A key is split into one key per group.

    !!! Example

        ```python
        grouped = eqxjd.Grouped(
            (lambda m: m.layers[0], eqxjd.UPGrad()),
            (lambda m: m.layers[2], eqxjd.Mean()),
        )
        out = eqxjd.aggregate(grouped, jac)
        ```

    Grouping strategies (whole model, per network, per layer, per tensor) are compared
    in Wang et al., *Gradient Vaccine*, 2021,
    [arXiv:2010.05874](https://arxiv.org/abs/2010.05874).
    """

    groups: tuple[tuple[Any, AnyAggregator], ...]

    def __init__(self, *groups: tuple[Any, AnyAggregator]):
        """**Arguments:**

        - `*groups`: pairs `(where, aggregator)`. `where` selects the group's part of
            the Jacobian pytree (which has the model's structure): either a function as
            in `eqx.tree_at` (`lambda model: model.layers[0]`, or returning a tuple of
            nodes), or a filter specification as in `eqx.filter` (a pytree prefix of
            bools, e.g. built with `jtu.tree_map`). `aggregator` is any eqxjd
            aggregator, stateful or random ones included.
        """
        if not groups:
            raise ValueError("`Grouped` needs at least one (where, aggregator) pair.")
        for group in groups:
            if not (isinstance(group, tuple) and len(group) == 2):
                raise ValueError(
                    f"Each group must be a 2-tuple (where, aggregator); got {group!r}."
                )
            if not isinstance(
                group[1], (AbstractAggregator, AbstractStatefulAggregator)
            ):
                raise ValueError(
                    "The second element of each group must be an eqxjd aggregator; "
                    f"got {type(group[1]).__name__}."
                )
        self.groups = tuple(groups)

    def _indices(self, jacobians: PyTree[Array]) -> list[list[int]]:
        leaves, treedef = jtu.tree_flatten(jacobians)
        index_tree = jtu.tree_unflatten(treedef, list(range(len(leaves))))
        owner: dict[int, int] = {}
        out = []
        for g, (where, _) in enumerate(self.groups):
            chosen = _select(g, where, index_tree)
            for i in chosen:
                if not isinstance(i, int) or isinstance(i, bool):
                    raise ValueError(
                        f"Group {g} selected something that is not a leaf of the "
                        "Jacobian pytree."
                    )
                if i in owner:
                    raise ValueError(
                        f"Leaf {i} of the Jacobian pytree is in groups {owner[i]} and "
                        f"{g}: groups must be disjoint."
                    )
                owner[i] = g
            if not chosen:
                raise ValueError(f"Group {g} selects no leaf of the Jacobian pytree.")
            out.append(sorted(chosen))
        missing = [i for i in range(len(leaves)) if i not in owner]
        if missing:
            raise ValueError(
                f"{len(missing)} leaves of the Jacobian pytree (indices {missing}) "
                "are in no group: add a group for them, or leave them out of the "
                "Jacobian (differentiate a filtered model)."
            )
        return out

    def init(self, jacobians: PyTree[Array], /) -> tuple[State, ...] | None:
        """**Arguments:**

        - `jacobians`: an example Jacobian pytree (only shapes and dtypes are read).

        **Returns:**

        A tuple with one state per group (`None` for stateless aggregators), or `None`
        if no group is stateful.
        """
        if not is_stateful(self):
            return None
        leaves, _, _ = check_jacobian_tree(jacobians)
        return tuple(
            init_tree(agg, [leaves[i] for i in idx])
            for (_, agg), idx in zip(self.groups, self._indices(jacobians))
        )

    def aggregate_tree(
        self, jacobians: PyTree[Array], state: Any, key: PRNGKeyArray | None
    ) -> tuple[PyTree[Array], tuple, tuple | None]:
        leaves, treedef, _ = check_jacobian_tree(jacobians)
        n = len(self.groups)
        if is_stateful(self) and not (isinstance(state, tuple) and len(state) == n):
            raise ValueError(
                "A stateful `Grouped` needs the tuple of per-group states from "
                "`grouped.init(jacobians)`."
            )
        states = state if is_stateful(self) else (None,) * n
        keys = (None,) * n if key is None else tuple(jr.split(key, n))
        out: list[Any] = [None] * len(leaves)
        weights, new_states = [], []
        for (_, agg), idx, st, k in zip(
            self.groups, self._indices(jacobians), states, keys
        ):
            update, w, st = aggregate_tree(agg, [leaves[i] for i in idx], st, k)
            for i, u in zip(idx, update):
                out[i] = u
            weights.append(w)
            new_states.append(st)
        new_state = tuple(new_states) if is_stateful(self) else None
        return jtu.tree_unflatten(treedef, out), tuple(weights), new_state


def is_stateful(aggregator: Any) -> bool:
    """Whether `aggregator` (or, for a `Grouped`, any of its groups) carries state."""
    if isinstance(aggregator, Grouped):
        return any(is_stateful(agg) for _, agg in aggregator.groups)
    return isinstance(aggregator, AbstractStatefulAggregator)


def check_aggregator(aggregator: Any) -> None:
    if not isinstance(
        aggregator, (AbstractAggregator, AbstractStatefulAggregator, Grouped)
    ):
        raise ValueError(
            "`aggregator` must be an eqxjd aggregator (e.g. `eqxjd.UPGrad()`) or an "
            f"`eqxjd.Grouped`; got {type(aggregator).__name__}. A weighting `w` is "
            "used through `eqxjd.WeightedAggregator(w)` (or "
            "`eqxjd.StatefulWeightedAggregator(w)`)."
        )


def check_state(aggregator: Any, state: State, init_hint: str) -> None:
    name = type(aggregator).__name__
    if is_stateful(aggregator) and state is None:
        raise ValueError(
            f"{name} is stateful: pass the state from {init_hint} (and then the "
            "state returned by the previous call)."
        )
    if not is_stateful(aggregator) and state is not None:
        raise ValueError(f"{name} is stateless: do not pass a state.")


def aggregate_tree(
    aggregator: AnyAggregator | Grouped,
    jacobians: PyTree[Array],
    state: State,
    key: PRNGKeyArray | None,
) -> tuple[PyTree[Array], Any, State]:
    """`(update, weights or None, new state)` of any aggregator (or `Grouped`) on a
    checked Jacobian pytree."""
    if isinstance(aggregator, Grouped):
        return aggregator.aggregate_tree(jacobians, state, key)
    leaves, treedef, m = check_jacobian_tree(jacobians)
    stateful = isinstance(aggregator, AbstractStatefulAggregator)
    if isinstance(aggregator, WeightedAggregators):
        weighting = aggregator.weighting
        stat, k = _tree_statistic(weighting, leaves, m)
        if stateful:
            weights, state = call_weighting(weighting, stat, state, key=key, exponent=k)
        else:
            weights = call_weighting(weighting, stat, key=key, exponent=k)
        update = tree_combine(weights, jacobians)
        weights = weights.astype(jnp.result_type(*leaves))
        if not weighting.differentiable:
            update = lax.stop_gradient(update)
        return update, weights, state
    matrix = _concatenate(leaves, m)
    if stateful:
        flat, state = aggregator(matrix, state, key=key)
    else:
        flat = aggregator(matrix, key=key)
    return _split(flat, leaves, treedef), None, state


def init_tree(aggregator: AnyAggregator | Grouped, jacobians: PyTree[Array]) -> State:
    """The initial state of any aggregator (or `Grouped`) for a Jacobian pytree (`None`
    for stateless ones)."""
    if isinstance(aggregator, Grouped):
        return aggregator.init(jacobians)
    if isinstance(aggregator, AbstractStatefulAggregator):
        return aggregator.init(jacobians)
    return None


def aggregate(
    aggregator: AnyAggregator | Grouped,
    jacobians: PyTree[Array],
    state: State = None,
    /,
    *,
    key: PRNGKeyArray | None = None,
) -> Aggregated:
    r"""Aggregates a Jacobian pytree into an update pytree (TorchJD's `jac_to_grad`).

    Each leaf of `jacobians` has a leading axis of size `m` (one row per objective), as
    returned by [`eqxjd.filter_jac`][], `jax.jacrev` of a loss vector or
    `jax.vmap(jax.grad(...))`. The update has the leaves' trailing shapes and dtypes;
    `None` leaves (non-trainable parts) stay `None`. The leaves are ordered as
    `jax.tree_util.tree_leaves`, exactly like concatenating them into one `(m, n)`
    matrix.

    Weightings that read the Gramian ([`eqxjd.UPGrad`][], [`eqxjd.DualProj`][], ...) get
    the sum of per-leaf Gramians and the update is combined leaf by leaf: no flat
    `(m, n)` copy is made (TorchJD's `optimize_gramian_computation=True`, always on: it
    is exact). The other aggregators see the concatenated matrix.

    !!! Example

        ```python
        jac = eqxjd.filter_jac(losses_fn)(model, x, y)
        out = eqxjd.aggregate(eqxjd.UPGrad(), jac)
        model = eqx.apply_updates(model, jtu.tree_map(lambda u: -0.1 * u, out.update))
        ```

    **Arguments:**

    - `aggregator`: any eqxjd aggregator, or an [`eqxjd.Grouped`][] for per-group
        aggregation.
    - `jacobians`: a pytree of arrays, each of shape `(m, *leaf_shape)`.
    - `state`: for stateful aggregators, the state from `aggregator.init(jacobians)`
        or from the previous call.
    - `key`: a PRNG key for random aggregators. (Keyword only argument.)

    **Returns:**

    An [`eqxjd.Aggregated`][] with `update`, `weights` and `state` (`losses` and `aux`
    are `None`).
    """
    check_aggregator(aggregator)
    check_state(aggregator, state, "`aggregator.init(jacobians)`")
    update, weights, state = aggregate_tree(aggregator, jacobians, state, key)
    return Aggregated(update=update, weights=weights, state=state)


def _select(g: int, where: Any, index_tree: PyTree[int]) -> list:
    """The leaf indices that group `g`'s `where` selects."""
    if callable(where) and not isinstance(where, eqx.Module):
        try:
            nodes = where(index_tree)
        except Exception as e:
            raise ValueError(
                f"Group {g}: its `where` function failed on the Jacobian pytree "
                f"({type(e).__name__}: {e}). The Jacobian pytree has the structure of "
                "the model (see `eqxjd.filter_jac`)."
            ) from e
        return jtu.tree_leaves(nodes)
    try:
        return jtu.tree_leaves(eqx.filter(index_tree, where))
    except ValueError as e:
        raise ValueError(
            f"Group {g}: its filter specification does not match the structure of the "
            f"Jacobian pytree ({e})."
        ) from e
