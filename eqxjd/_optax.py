from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._checks import check_jacobian_tree
from ._custom_types import State
from ._tree import (
    aggregate_tree,
    AnyAggregator,
    check_aggregator,
    check_state,
    Grouped,
    init_tree,
    is_stateful,
)


class AsOptaxState(NamedTuple):
    """The optax state of [`eqxjd.as_optax`][].

    - `aggregator_state`: the aggregator's state (`None` for stateless aggregators).
    - `key`: the PRNG key split at every step (`None` without a `key`).
    """

    aggregator_state: State
    key: PRNGKeyArray | None


def _import_optax():
    try:
        import optax
    except ImportError as e:  # pragma: no cover - exercised without optax only
        raise ImportError(
            "eqxjd.as_optax needs optax: `pip install optax` (or `pip install "
            "eqxjd[examples]`)."
        ) from e
    return optax


def _check_against_params(updates: PyTree[Array], params: PyTree) -> None:
    """Each Jacobian leaf `(m, *shape)` must sit where `params` has an array of
    shape `shape`."""

    def check(jac_leaf, param):
        if jac_leaf is None:
            return None
        if not eqx.is_array(param):
            raise ValueError(
                "The Jacobian pytree has an array where `params` has "
                f"{type(param).__name__}: the Jacobian must have the structure of the "
                "parameters."
            )
        if tuple(jac_leaf.shape[1:]) != tuple(param.shape):
            raise ValueError(
                f"A Jacobian leaf of shape {jac_leaf.shape} does not match its "
                f"parameter of shape {param.shape}: every leaf needs shape "
                "(m, *param.shape). "
                "`as_optax` takes Jacobians, not gradients, and must come first in "
                "`optax.chain`."
            )
        return None

    try:
        jtu.tree_map(check, updates, params, is_leaf=lambda x: x is None)
    except ValueError as e:
        if "Jacobian" in str(e):
            raise
        raise ValueError(
            "The Jacobian pytree and `params` have different structures: compute the "
            "Jacobian with respect to the same (filtered) model that optax updates. "
            f"({e})"
        ) from e


def as_optax(
    aggregator: AnyAggregator | Grouped,
    *,
    m: int | None = None,
    key: PRNGKeyArray | None = None,
) -> "optax.GradientTransformationExtraArgs":  # pyright: ignore  # noqa: F821
    """Turns an aggregator into an optax gradient transformation that takes a Jacobian
    pytree as its `updates` and returns the aggregated update (a gradient-shaped
    pytree).

    ```python
    optim = optax.chain(eqxjd.as_optax(eqxjd.UPGrad()), optax.adam(1e-3))
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    jac = eqxjd.filter_jac(losses_fn)(model, x, y)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optim.update(jac, opt_state, params)
    model = eqx.apply_updates(model, updates)
    ```

    !!! warning

        - It must come **first** in `optax.chain`: the transformations after it see
          ordinary gradients, the ones before it would see Jacobians.
        - Every array leaf of the updates needs the leading `m` axis (one row per
          objective), e.g. from [`eqxjd.filter_jac`][]; `None` leaves are kept.
        - `optax.MultiSteps` (gradient accumulation) does not apply: it would average
          Jacobians across steps before aggregation. Accumulate losses instead.

    **Arguments:**

    - `aggregator`: any eqxjd aggregator, or an [`eqxjd.Grouped`][].
    - `m`: the number of objectives. Required for stateful aggregators, whose state is
        created by `init` (which only sees the parameters). (Keyword only argument.)
    - `key`: a PRNG key for random aggregators; it is stored in the optax state and
        split at every step. (Keyword only argument.)

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose state is an
    [`eqxjd.AsOptaxState`][].
    """
    optax = _import_optax()
    check_aggregator(aggregator)
    stateful = is_stateful(aggregator)
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"`m` must be a positive int; got {m!r}.")
    if stateful and m is None:
        raise ValueError(
            f"{type(aggregator).__name__} is stateful: pass `m=` (the number of "
            "objectives) to `as_optax` so that `init` can build its state."
        )

    def init_fn(params):
        agg_state = None
        if stateful:
            trainable = eqx.filter(params, eqx.is_inexact_array)
            if not jtu.tree_leaves(trainable):
                raise ValueError("`params` has no floating-point array to optimise.")

            @jax.jit
            def make(p):
                zeros = jtu.tree_map(lambda x: jnp.zeros((m,) + x.shape, x.dtype), p)
                return init_tree(aggregator, zeros)

            agg_state = make(trainable)
        return AsOptaxState(agg_state, key)

    def update_fn(updates, state, params=None, **extra_args: Any):
        del extra_args
        if not isinstance(state, AsOptaxState):
            raise ValueError(
                "The state is not the one built by this transformation's `init`."
            )
        check_jacobian_tree(updates)
        if params is not None:
            _check_against_params(updates, params)
        new_key, step_key = (None, None) if state.key is None else jr.split(state.key)
        try:
            check_state(
                aggregator, state.aggregator_state, "`init` (pass `m=` to `as_optax`)"
            )
            update, _, agg_state = aggregate_tree(
                aggregator, updates, state.aggregator_state, step_key
            )
        except ValueError as e:
            if state.key is None and "key" in str(e):
                raise ValueError(
                    f"{e} With `as_optax`, pass `key=` to `as_optax`: it is kept in "
                    "the optax state and split at every step."
                ) from e
            raise
        return update, AsOptaxState(agg_state, new_key)

    return optax.GradientTransformationExtraArgs(
        init_fn,  # pyright: ignore[reportArgumentType]
        update_fn,  # pyright: ignore[reportArgumentType]
    )
