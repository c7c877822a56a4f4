"""autojac for JAX and Equinox: Jacobians of loss vectors as pytrees, aggregated
updates, the multi-task helper and grouped aggregation (TorchJD's `backward`, `jac`,
`mtl_backward` and `jac_to_grad`, as function transformations)."""

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._aggregator import AbstractAggregator, AbstractStatefulAggregator
from ._checks import check_chunk_size
from ._custom_types import State
from ._pytree import aggregate_tree, check_jacobian_tree, init_tree


AnyAggregator = AbstractAggregator | AbstractStatefulAggregator


# --------------------------------------------------------------------------------------
# Checks and small helpers
# --------------------------------------------------------------------------------------


def _check_losses(losses: Any, where: str) -> None:
    """The function being differentiated must return a 1-D floating vector."""
    shape = jnp.shape(losses) if hasattr(losses, "shape") else None
    if shape is None:
        raise ValueError(
            f"{where} must return a JAX array of shape (m,) (one loss per objective); "
            f"got {type(losses).__name__}. Stack several losses with `jnp.stack`."
        )
    if len(shape) != 1:
        hint = (
            "it returned a scalar: return a vector of losses, e.g. "
            "`jnp.stack([loss1, loss2])` (use `eqx.filter_value_and_grad` for one loss)"
            if len(shape) == 0
            else "flatten it (e.g. `losses.reshape(-1)`) if every entry is an objective"
        )
        raise ValueError(
            f"{where} must return a vector of losses of shape (m,); got shape {shape}: "
            f"{hint}."
        )
    if not jnp.issubdtype(jnp.result_type(losses), jnp.inexact):
        raise ValueError(
            f"{where} must return floating losses; got dtype {jnp.result_type(losses)}."
        )


def _split_output(out: Any, has_aux: bool, where: str) -> tuple[Array, Any]:
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(
                f"With `has_aux=True`, {where} must return a 2-tuple (losses, aux)."
            )
        losses, aux = out
    else:
        losses, aux = out, None
    _check_losses(losses, where)
    return losses, aux


def _pull_rows(
    vjp_fn: Callable[[Any], Any], cotangents: PyTree[Array], chunk_size: int | None
) -> PyTree[Array]:
    """Applies `vjp_fn` to every row of `cotangents` (leading axis m): one vmapped VJP,
    or `lax.map` over chunks of `chunk_size` vmapped rows."""
    m = jtu.tree_leaves(cotangents)[0].shape[0]
    if chunk_size is None or chunk_size >= m:
        return jax.vmap(vjp_fn)(cotangents)
    return lax.map(vjp_fn, cotangents, batch_size=chunk_size)


def _value_and_jac(
    fn: Callable,
    model: PyTree,
    args: tuple,
    kwargs: dict,
    has_aux: bool,
    chunk_size: int | None,
    where: str,
) -> tuple[Array, Any, PyTree[Array]]:
    diff, static = eqx.partition(model, eqx.is_inexact_array)

    def f(d):
        out = fn(eqx.combine(d, static), *args, **kwargs)
        losses, aux = _split_output(out, has_aux, where)
        return losses, aux

    losses, vjp_fn, aux = jax.vjp(f, diff, has_aux=True)
    seeds = jnp.eye(losses.shape[0], dtype=losses.dtype)
    jac = _pull_rows(lambda s: vjp_fn(s)[0], seeds, chunk_size)
    return losses, aux, jac


def _fn_name(fn: Callable) -> str:
    return f"`{getattr(fn, '__name__', type(fn).__name__)}`"


# --------------------------------------------------------------------------------------
# Grouping
# --------------------------------------------------------------------------------------


class Grouped(eqx.Module):
    r"""Different aggregators for different parts of the parameters.

    The Jacobian pytree is split into disjoint groups (e.g. one per layer, or trunk
    versus heads); each group is aggregated on its own, exactly as one TorchJD
    `jac_to_grad` call per parameter group. Every trainable leaf must belong to exactly
    one group. A `Grouped` is accepted wherever eqxjd takes an aggregator for a pytree:
    [`eqxjd.jac_to_grad`][], [`eqxjd.filter_value_and_aggregate`][],
    [`eqxjd.filter_mtl_value_and_aggregate`][] and [`eqxjd.as_optax`][].

    Its weights are a tuple (one entry per group, `None` for aggregators without
    weights) and its state is a tuple (one entry per group, `None` for stateless ones).
    A key is split into one key per group.

    !!! Example

        ```python
        grouped = eqxjd.Grouped(
            (lambda m: m.layers[0], eqxjd.UPGrad()),
            (lambda m: m.layers[2], eqxjd.Mean()),
        )
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
        checked = []
        for group in groups:
            if not (isinstance(group, tuple) and len(group) == 2):
                raise ValueError(
                    f"Each group must be a 2-tuple (where, aggregator); got {group!r}."
                )
            where, aggregator = group
            if not isinstance(
                aggregator, (AbstractAggregator, AbstractStatefulAggregator)
            ):
                raise ValueError(
                    "The second element of each group must be an eqxjd aggregator; "
                    f"got {type(aggregator).__name__}."
                )
            checked.append((where, aggregator))
        self.groups = tuple(checked)

    @property
    def stateful(self) -> bool:
        """Whether any group's aggregator is stateful."""
        return any(_is_stateful(agg) for _, agg in self.groups)

    def _indices(self, jacobians: PyTree[Array]) -> list[list[int]]:
        leaves, treedef = jtu.tree_flatten(jacobians)
        index_tree = jtu.tree_unflatten(treedef, list(range(len(leaves))))
        owner: dict[int, int] = {}
        out = []
        for g, (where, _) in enumerate(self.groups):
            if callable(where) and not isinstance(where, eqx.Module):
                try:
                    nodes = where(index_tree)
                except Exception as e:
                    raise ValueError(
                        f"Group {g}: its `where` function failed on the Jacobian "
                        f"pytree ({type(e).__name__}: {e}). The Jacobian pytree has "
                        "the structure of the model (see `eqxjd.filter_jac`)."
                    ) from e
                chosen = jtu.tree_leaves(nodes)
            else:
                try:
                    chosen = jtu.tree_leaves(eqx.filter(index_tree, where))
                except ValueError as e:
                    raise ValueError(
                        f"Group {g}: its filter specification does not match the "
                        f"structure of the Jacobian pytree ({e})."
                    ) from e
            idx = []
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
                idx.append(i)
            if not idx:
                raise ValueError(f"Group {g} selects no leaf of the Jacobian pytree.")
            out.append(sorted(idx))
        missing = [i for i in range(len(leaves)) if i not in owner]
        if missing:
            raise ValueError(
                f"{len(missing)} leaves of the Jacobian pytree (indices {missing}) "
                "are in no group: add a group for them, or leave them out of the "
                "Jacobian (differentiate a filtered model)."
            )
        return out

    def init(self, jacobians: PyTree[Array], /) -> tuple[State, ...]:
        """**Arguments:**

        - `jacobians`: an example Jacobian pytree (only shapes and dtypes are read).

        **Returns:**

        A tuple with one state per group (`None` for stateless aggregators).
        """
        leaves, _, _ = check_jacobian_tree(jacobians)
        states = []
        for (_, agg), idx in zip(self.groups, self._indices(jacobians)):
            sub = [leaves[i] for i in idx]
            states.append(init_tree(agg, sub) if _is_stateful(agg) else None)
        return tuple(states)

    def _aggregate(
        self, jacobians: PyTree[Array], state: Any, key: PRNGKeyArray | None
    ) -> tuple[PyTree[Array], tuple, tuple | None]:
        leaves, treedef, _ = check_jacobian_tree(jacobians)
        groups = self._indices(jacobians)
        if self.stateful:
            if not (isinstance(state, tuple) and len(state) == len(self.groups)):
                raise ValueError(
                    "A stateful `Grouped` needs the tuple of per-group states from "
                    "`grouped.init(jacobians)`."
                )
            states = state
        else:
            states = (None,) * len(self.groups)
        keys = (
            (None,) * len(self.groups)
            if key is None
            else tuple(jr.split(key, len(self.groups)))
        )
        out: list[Any] = [None] * len(leaves)
        weights, new_states = [], []
        for (_, agg), idx, st, k in zip(self.groups, groups, states, keys):
            sub = [leaves[i] for i in idx]
            upd, w, st = aggregate_tree(agg, sub, st, key=k)
            for i, u in zip(idx, upd):
                out[i] = u
            weights.append(w)
            new_states.append(st if _is_stateful(agg) else None)
        new_state = tuple(new_states) if self.stateful else None
        return jtu.tree_unflatten(treedef, out), tuple(weights), new_state


TreeAggregator = AbstractAggregator | AbstractStatefulAggregator | Grouped


def _is_stateful(aggregator: Any) -> bool:
    if isinstance(aggregator, Grouped):
        return aggregator.stateful
    return isinstance(aggregator, AbstractStatefulAggregator)


def _check_aggregator(aggregator: Any) -> None:
    if not isinstance(
        aggregator, (AbstractAggregator, AbstractStatefulAggregator, Grouped)
    ):
        raise ValueError(
            "`aggregator` must be an eqxjd aggregator (e.g. `eqxjd.UPGrad()`) or an "
            f"`eqxjd.Grouped`; got {type(aggregator).__name__}."
        )


def init_state(aggregator: TreeAggregator, jacobians: PyTree[Array]) -> State:
    """The initial state of any (grouped) aggregator for a Jacobian pytree; `None` for
    stateless ones. Reads only shapes and dtypes."""
    if isinstance(aggregator, Grouped):
        return aggregator.init(jacobians) if aggregator.stateful else None
    if _is_stateful(aggregator):
        return init_tree(aggregator, jacobians)  # pyright: ignore[reportArgumentType]
    return None


def _aggregate_any(
    aggregator: TreeAggregator,
    jacobians: PyTree[Array],
    state: State,
    key: PRNGKeyArray | None,
    state_name: str,
    init_hint: str,
) -> tuple[PyTree[Array], Any, State]:
    stateful = _is_stateful(aggregator)
    name = type(aggregator).__name__
    if stateful and state is None:
        raise ValueError(
            f"{name} is stateful: pass `{state_name}=` the state from {init_hint} (and "
            "then the state returned by the previous step)."
        )
    if not stateful and state is not None:
        raise ValueError(f"{name} is stateless: do not pass `{state_name}`.")
    if isinstance(aggregator, Grouped):
        return aggregator._aggregate(jacobians, state, key)
    return aggregate_tree(aggregator, jacobians, state, key=key)


def _pack(update, weights, state, return_weights: bool, stateful: bool) -> tuple:
    out = (update,)
    if return_weights:
        out = out + (weights,)
    if stateful:
        out = out + (state,)
    return out


def _check_weights(aggregator: Any, weights: Any) -> None:
    missing = weights is None or (
        isinstance(weights, tuple) and any(w is None for w in weights)
    )
    if missing:
        raise ValueError(
            f"`return_weights=True` but {type(aggregator).__name__} (or one of its "
            "groups) has no weights: only weighted aggregators (e.g. UPGrad, Mean, "
            "MGDA) define them."
        )


# --------------------------------------------------------------------------------------
# Public API: Jacobians
# --------------------------------------------------------------------------------------


def _losses_and_jac(step, model, args, kwargs):
    # `step`: a _ValueAndJac or _ValueAndAggregate (both carry fn, has_aux, chunk_size).
    return _value_and_jac(
        step.fn,
        model,
        args,
        kwargs,
        step.has_aux,
        step.chunk_size,
        _fn_name(step.fn),
    )


class _ValueAndJac(eqx.Module):
    fn: Callable
    has_aux: bool = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)

    @property
    def __wrapped__(self):
        return self.fn

    def __call__(self, model, /, *args, **kwargs):
        losses, aux, jac = _losses_and_jac(self, model, args, kwargs)
        value = (losses, aux) if self.has_aux else losses
        return value, jac


def filter_value_and_jac(
    fn: Callable, *, has_aux: bool = False, chunk_size: int | None = None
) -> Callable:
    """The Jacobian of a vector of losses with respect to the first argument of `fn`
    (TorchJD's `autojac.jac` / `backward` without aggregation).

    As `eqx.filter_value_and_grad`, only the floating-point arrays of the first
    argument (`eqx.is_inexact_array`) are differentiated; the Jacobian pytree has the
    structure of that argument, with `None` in place of everything else (ints, static
    fields, non-array leaves), and each array leaf gains a leading axis of size `m`.
    Its leaves, flattened and concatenated in `jax.tree_util.tree_leaves` order, form
    the `(m, n)` Jacobian matrix. Rows are computed by vmapped VJPs over the rows of
    the identity: one forward pass, no `m` forward passes.

    **Arguments:**

    - `fn`: a function `fn(model, *args, **kwargs)` returning the losses, an array of
        shape `(m,)` (or `(losses, aux)` with `has_aux=True`).
    - `has_aux`: whether `fn` also returns auxiliary data.
    - `chunk_size`: `None` computes all `m` rows at once; an int bounds memory by
        computing `chunk_size` rows at a time (vmapped, with `lax.map` over the chunks;
        `1` is fully sequential). TorchJD's `parallel_chunk_size`. Same result.

    **Returns:**

    A function with the signature of `fn` returning `(losses, jacobian)`, or
    `((losses, aux), jacobian)` with `has_aux=True`.
    """
    check_chunk_size(chunk_size)
    return eqx.module_update_wrapper(_ValueAndJac(fn, has_aux, chunk_size))


def filter_jac(
    fn: Callable, *, has_aux: bool = False, chunk_size: int | None = None
) -> Callable:
    """As [`eqxjd.filter_value_and_jac`][], returning only the Jacobian pytree (or
    `(jacobian, aux)` with `has_aux=True`)."""
    value_and_jac = filter_value_and_jac(fn, has_aux=has_aux, chunk_size=chunk_size)

    @ft.wraps(fn)
    def jac_fn(model, /, *args, **kwargs):
        value, jac = value_and_jac(model, *args, **kwargs)
        return (jac, value[1]) if has_aux else jac

    return jac_fn


# --------------------------------------------------------------------------------------
# Public API: aggregated updates
# --------------------------------------------------------------------------------------


class _ValueAndAggregate(eqx.Module):
    fn: Callable
    aggregator: TreeAggregator
    has_aux: bool = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)
    return_weights: bool = eqx.field(static=True)

    # No `__wrapped__`: `eqx.filter_jit` would bind calls against `fn`'s signature,
    # which lacks `agg_state` and `agg_key`.

    def init(self, model, /, *args, **kwargs) -> State:
        """The aggregator's initial state for this model and these arguments (`None`
        for stateless aggregators). Traces `fn` abstractly: nothing is computed."""
        shapes = eqx.filter_eval_shape(
            lambda mdl, a, kw: _losses_and_jac(self, mdl, a, kw)[2],
            model,
            args,
            kwargs,
        )
        return _init_from_shapes(self.aggregator, shapes)

    def __call__(self, model, /, *args, agg_state=None, agg_key=None, **kwargs):
        losses, aux, jac = _losses_and_jac(self, model, args, kwargs)
        update, weights, state = _aggregate_any(
            self.aggregator,
            jac,
            agg_state,
            agg_key,
            "agg_state",
            "`step.init(model, ...)`",
        )
        if self.return_weights:
            _check_weights(self.aggregator, weights)
        value = (losses, aux) if self.has_aux else losses
        rest = _pack(
            update, weights, state, self.return_weights, _is_stateful(self.aggregator)
        )
        return (value,) + rest


def _init_from_shapes(aggregator: TreeAggregator, shapes: PyTree) -> State:
    if not _is_stateful(aggregator):
        return None

    @jax.jit
    def make():
        zeros = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return init_state(aggregator, zeros)

    return make()


def filter_value_and_aggregate(
    fn: Callable,
    aggregator: TreeAggregator,
    *,
    has_aux: bool = False,
    chunk_size: int | None = None,
    return_weights: bool = False,
) -> Callable:
    r"""The Jacobian-descent analogue of `eqx.filter_value_and_grad`.

    Computes the losses $L(\theta) \in \mathbb{R}^m$, their Jacobian $J$ with respect
    to the floating-point arrays of the first argument (one forward pass, vmapped
    VJPs), and the aggregated update $A(J)$ as a pytree shaped like the model's
    trainable part (`None` elsewhere, as the gradients of `eqx.filter_value_and_grad`).
    Apply it like a gradient,
    `eqx.apply_updates(model, jtu.tree_map(lambda u: -lr * u, update))`, or feed it
    to any optax optimiser. This is TorchJD's `backward` followed by
    `jac_to_grad`. Gramian-weighted aggregators (UPGrad, DualProj, ...) use the sum of
    per-leaf Gramians: the Jacobian is never concatenated.

    !!! Example

        ```python
        def losses_fn(model, x, y):
            out = jax.vmap(model)(x)
            return jnp.mean((out - y) ** 2, axis=0)  # one MSE per output: shape (2,)

        step = eqxjd.filter_value_and_aggregate(losses_fn, eqxjd.UPGrad())
        losses, update = eqx.filter_jit(step)(model, x, y)
        ```

    **Arguments:**

    - `fn`: `fn(model, *args, **kwargs)` returning losses of shape `(m,)`, or
        `(losses, aux)` with `has_aux=True`.
    - `aggregator`: any eqxjd aggregator, or an [`eqxjd.Grouped`][].
    - `has_aux`: whether `fn` also returns auxiliary data.
    - `chunk_size`: bounds memory by computing the Jacobian `chunk_size` rows at a time
        (see [`eqxjd.filter_value_and_jac`][]).
    - `return_weights`: also return the weights $w$ with $A(J) = w^\top J$, for
        monitoring (weighted aggregators only; a tuple for `Grouped`).

    **Returns:**

    A function `step(model, *args, agg_state=None, agg_key=None, **kwargs)` returning
    `(value, update)` where `value` is `losses` (or `(losses, aux)`); with
    `return_weights=True` the weights follow the update; for stateful aggregators the
    new state comes last: `(value, update[, weights], new_state)`. `agg_state` is
    required for stateful aggregators (initial value: `step.init(model, *args)`);
    `agg_key` is the PRNG key of random aggregators. Both are keyword-only and named so
    that they do not clash with arguments of `fn` such as `key`.
    """
    check_chunk_size(chunk_size)
    _check_aggregator(aggregator)
    return _ValueAndAggregate(fn, aggregator, has_aux, chunk_size, return_weights)


def jac_to_grad(
    jacobians: PyTree[Array],
    aggregator: TreeAggregator,
    state: State = None,
    /,
    *,
    key: PRNGKeyArray | None = None,
) -> tuple:
    """Aggregates an existing Jacobian pytree, returning the weights too (TorchJD's
    `jac_to_grad`, which returns the weights of weighted aggregators).

    Leaves are ordered as `jax.tree_util.tree_leaves` (TorchJD: the order of the
    parameters). Gramian-weighted aggregators use the sum of per-leaf Gramians
    (TorchJD's `optimize_gramian_computation=True`, always on: it is exact); the
    others see the
    concatenated `(m, n)` matrix. `None` leaves (non-trainable parts) stay `None`.

    **Arguments:**

    - `jacobians`: a pytree whose array leaves have shape `(m, *leaf_shape)`, e.g. from
        [`eqxjd.filter_jac`][].
    - `aggregator`: any eqxjd aggregator, or an [`eqxjd.Grouped`][] for per-group
        aggregation.
    - `state`: the state of a stateful aggregator (from [`eqxjd.init_state`][]).
    - `key`: a PRNG key for random aggregators. (Keyword only argument.)

    **Returns:**

    `(update, weights)`, or `(update, weights, new_state)` for stateful aggregators.
    `weights` is an array of shape `(m,)`, `None` for aggregators without weights, and a
    tuple (one entry per group) for `Grouped`.
    """
    _check_aggregator(aggregator)
    update, weights, new_state = _aggregate_any(
        aggregator,
        jacobians,
        state,
        key,
        "state",
        "`eqxjd.init_state(aggregator, jac)`",
    )
    if _is_stateful(aggregator):
        return update, weights, new_state
    return update, weights


# --------------------------------------------------------------------------------------
# Public API: multi-task learning
# --------------------------------------------------------------------------------------


def _check_features(features: PyTree) -> None:
    leaves = jtu.tree_leaves(features)
    if not leaves:
        raise ValueError("`features_fn` returned no arrays.")
    for leaf in leaves:
        if not (eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.inexact)):
            raise ValueError(
                "`features_fn` must return a pytree of floating arrays (the shared "
                f"representation); got a leaf {leaf!r:.80}."
            )


def _mtl_value_and_jac(
    features_fn: Callable,
    losses_fn: Callable,
    shared: PyTree,
    heads: PyTree,
    args: tuple,
    kwargs: dict,
    has_aux: bool,
    chunk_size: int | None,
) -> tuple[Array, Any, PyTree[Array], PyTree[Array]]:
    shared_diff, shared_static = eqx.partition(shared, eqx.is_inexact_array)
    heads_diff, heads_static = eqx.partition(heads, eqx.is_inexact_array)

    def trunk(d):
        features = features_fn(eqx.combine(d, shared_static), *args, **kwargs)
        _check_features(features)
        return features

    def tasks(h, features):
        out = losses_fn(eqx.combine(h, heads_static), features, *args, **kwargs)
        return _split_output(out, has_aux, _fn_name(losses_fn))

    # One forward pass of the trunk, one of the heads.
    features, trunk_vjp = jax.vjp(trunk, shared_diff)
    losses, tasks_vjp, aux = jax.vjp(tasks, heads_diff, features, has_aux=True)
    m = losses.shape[0]
    # Task parameters: the sum of the task losses' gradients (TorchJD adds each task's
    # gradient to `.grad`); a head used by one task gets exactly that task's gradient.
    heads_grad, _ = tasks_vjp(jnp.ones((m,), losses.dtype))
    # m gradients w.r.t. the features (zero where a task ignores a feature), then m
    # vmapped VJPs through the trunk.
    seeds = jnp.eye(m, dtype=losses.dtype)
    feature_jac = _pull_rows(lambda s: tasks_vjp(s)[1], seeds, None)
    shared_jac = _pull_rows(lambda c: trunk_vjp(c)[0], feature_jac, chunk_size)
    return losses, aux, shared_jac, heads_grad


class _MTLValueAndJac(eqx.Module):
    features_fn: Callable
    losses_fn: Callable
    has_aux: bool = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)

    def __call__(self, shared, heads, /, *args, **kwargs):
        losses, aux, shared_jac, heads_grad = _mtl_value_and_jac(
            self.features_fn,
            self.losses_fn,
            shared,
            heads,
            args,
            kwargs,
            self.has_aux,
            self.chunk_size,
        )
        value = (losses, aux) if self.has_aux else losses
        return value, (shared_jac, heads_grad)


def filter_mtl_value_and_jac(
    features_fn: Callable,
    losses_fn: Callable,
    *,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> Callable:
    """The Jacobian part of TorchJD's `mtl_backward`: for a shared trunk and task heads,
    the Jacobian of the task losses with respect to the trunk's parameters and the
    gradient of the task losses with respect to the heads' parameters.

    The trunk runs once. The `m` gradients of the losses with respect to the features
    are obtained with vmapped VJPs through the heads, then pulled back through the trunk
    with `m` vmapped VJPs (chunked with `chunk_size`). The heads get the gradient of
    $\\sum_i L_i$: a head used only by task $i$ gets exactly $\\nabla L_i$.

    **Arguments:**

    - `features_fn`: `features_fn(shared, *args, **kwargs)` returning the shared
        representation (a floating array or a pytree of them).
    - `losses_fn`: `losses_fn(heads, features, *args, **kwargs)` returning the task
        losses, shape `(m,)` (or `(losses, aux)` with `has_aux=True`).
    - `has_aux`: whether `losses_fn` also returns auxiliary data.
    - `chunk_size`: rows pulled back through the trunk at a time (`None`: all).

    **Returns:**

    A function `(shared, heads, *args, **kwargs) -> (value, (shared_jacobian,
    heads_gradient))`, where `value` is `losses` (or `(losses, aux)`), the Jacobian
    pytree has the structure of `shared` with a leading `m` axis per array leaf and the
    gradient has the structure of `heads` (`None` for non-trainable leaves in both).
    """
    check_chunk_size(chunk_size)
    return _MTLValueAndJac(features_fn, losses_fn, has_aux, chunk_size)


class _MTLValueAndAggregate(eqx.Module):
    features_fn: Callable
    losses_fn: Callable
    aggregator: TreeAggregator
    has_aux: bool = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)
    return_weights: bool = eqx.field(static=True)

    def _run(self, shared, heads, args, kwargs):
        return _mtl_value_and_jac(
            self.features_fn,
            self.losses_fn,
            shared,
            heads,
            args,
            kwargs,
            self.has_aux,
            self.chunk_size,
        )

    def init(self, shared, heads, /, *args, **kwargs) -> State:
        """The aggregator's initial state (`None` for stateless aggregators); traces
        abstractly, nothing is computed."""
        shapes = eqx.filter_eval_shape(
            lambda s, h, a, kw: self._run(s, h, a, kw)[2], shared, heads, args, kwargs
        )
        return _init_from_shapes(self.aggregator, shapes)

    def __call__(self, shared, heads, /, *args, agg_state=None, agg_key=None, **kwargs):
        losses, aux, shared_jac, heads_grad = self._run(shared, heads, args, kwargs)
        update, weights, state = _aggregate_any(
            self.aggregator,
            shared_jac,
            agg_state,
            agg_key,
            "agg_state",
            "`step.init(shared, heads, ...)`",
        )
        if self.return_weights:
            _check_weights(self.aggregator, weights)
        value = (losses, aux) if self.has_aux else losses
        rest = _pack(
            (update, heads_grad),
            weights,
            state,
            self.return_weights,
            _is_stateful(self.aggregator),
        )
        return (value,) + rest


def filter_mtl_value_and_aggregate(
    features_fn: Callable,
    losses_fn: Callable,
    aggregator: TreeAggregator,
    *,
    has_aux: bool = False,
    chunk_size: int | None = None,
    return_weights: bool = False,
) -> Callable:
    r"""Multi-task Jacobian descent: TorchJD's `mtl_backward` followed by `jac_to_grad`
    on the shared parameters.

    The shared trunk gets the aggregation $A(J)$ of the task losses' Jacobian with
    respect to its parameters (computed through the features, see
    [`eqxjd.filter_mtl_value_and_jac`][]); each task head gets its own task's gradient.

    !!! Example

        ```python
        def features_fn(trunk, x, y1, y2):
            return jax.vmap(trunk)(x)

        def losses_fn(heads, features, x, y1, y2):
            p1 = jax.vmap(heads[0])(features)[:, 0]
            p2 = jax.vmap(heads[1])(features)[:, 0]
            return jnp.stack([jnp.mean((p1 - y1) ** 2), jnp.mean((p2 - y2) ** 2)])

        agg = eqxjd.UPGrad()
        step = eqxjd.filter_mtl_value_and_aggregate(features_fn, losses_fn, agg)
        losses, (trunk_update, heads_update) = step(trunk, heads, x, y1, y2)
        ```

    **Arguments:**

    - `features_fn`: `features_fn(shared, *args, **kwargs) -> features`.
    - `losses_fn`: `losses_fn(heads, features, *args, **kwargs) -> losses` of shape
        `(m,)` (or `(losses, aux)` with `has_aux=True`).
    - `aggregator`: any eqxjd aggregator, or an [`eqxjd.Grouped`][] over the trunk.
    - `has_aux`, `chunk_size`, `return_weights`: as in
        [`eqxjd.filter_value_and_aggregate`][].

    **Returns:**

    A function `step(shared, heads, *args, agg_state=None, agg_key=None, **kwargs)`
    returning `(value, (shared_update, heads_update)[, weights][, new_state])`, with
    `step.init(shared, heads, *args, **kwargs)` giving the initial state of stateful
    aggregators.
    """
    check_chunk_size(chunk_size)
    _check_aggregator(aggregator)
    return _MTLValueAndAggregate(
        features_fn, losses_fn, aggregator, has_aux, chunk_size, return_weights
    )
