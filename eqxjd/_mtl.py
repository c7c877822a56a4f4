"""Multi-task learning with a shared trunk and task heads (TorchJD's `mtl_backward`):
the trunk gets the aggregation of the tasks' Jacobian, each head its task's gradient."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._checks import check_chunk_size
from ._step import (
    AbstractStrategy,
    aggregate_linearized,
    check_strategy,
    FullJacobian,
    init_state,
    linearize,
    Problem,
    Step,
)
from ._tree import AnyAggregator, check_aggregator, check_state, Grouped, is_stateful


def _check_features(features: PyTree) -> None:
    leaves = jtu.tree_leaves(features)
    if not leaves:
        raise ValueError("`features_fn` returned no arrays.")
    for leaf in leaves:
        if not (eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating)):
            raise ValueError(
                "`features_fn` must return a pytree of floating arrays (the shared "
                f"representation); got a leaf {leaf!r:.80}."
            )


class _Composed(eqx.Module):
    """`fn((shared, heads), *args)`: the heads' losses on the trunk's features."""

    features_fn: Callable
    losses_fn: Callable

    @property
    def __name__(self) -> str:
        return getattr(self.losses_fn, "__name__", "losses_fn")

    def __call__(self, model, *args, **kwargs):
        shared, heads = model
        features = self.features_fn(shared, *args, **kwargs)
        _check_features(features)
        return self.losses_fn(heads, features, *args, **kwargs)


def _setup(composed, has_aux, shared, heads, args, kwargs):
    model = (shared, heads)
    diff, static = eqx.partition(model, eqx.is_inexact_array)
    problem = Problem(composed, has_aux, static, args, kwargs)
    spec = (
        jtu.tree_map(lambda _: True, diff[0]),
        jtu.tree_map(lambda _: False, diff[1]),
    )
    if not jtu.tree_leaves(diff[0]):
        raise ValueError("`shared` has no floating-point array to differentiate.")
    return problem, diff, spec


class _MTLValueAndJac(eqx.Module):
    composed: _Composed
    has_aux: bool = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)

    def __call__(self, shared, heads, /, *args, **kwargs):
        problem, diff, spec = _setup(
            self.composed, self.has_aux, shared, heads, args, kwargs
        )
        lin = linearize(FullJacobian(self.chunk_size), problem, diff, spec)
        heads_grad = lin.vjp(jnp.ones_like(lin.losses))[1]
        value = (lin.losses, lin.aux) if self.has_aux else lin.losses
        assert lin.jacobian is not None
        return value, (lin.jacobian[0], heads_grad)


def filter_mtl_value_and_jac(
    features_fn: Callable,
    losses_fn: Callable,
    *,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> Callable:
    r"""The Jacobian part of TorchJD's `mtl_backward`: for a shared trunk and task
    heads, the Jacobian of the task losses with respect to the trunk's parameters and
    the gradient of their sum with respect to the heads' parameters (a head used only
    by task $i$ gets exactly $\nabla L_i$). The trunk runs once.

    **Arguments:**

    - `features_fn`: `features_fn(shared, *args, **kwargs)` returning the shared
        representation (a floating array or a pytree of them).
    - `losses_fn`: `losses_fn(heads, features, *args, **kwargs)` returning the task
        losses, shape `(m,)` (or `(losses, aux)` with `has_aux=True`).
    - `has_aux`: whether `losses_fn` also returns auxiliary data. (Keyword only
        argument.)
    - `chunk_size`: rows of the Jacobian computed at a time (`None`: all). (Keyword
        only argument.)

    **Returns:**

    A function `(shared, heads, *args, **kwargs) -> (value, (shared_jacobian,
    heads_gradient))`, where `value` is `losses` (or `(losses, aux)`), the Jacobian
    pytree has the structure of `shared` with a leading `m` axis per array leaf and the
    gradient has the structure of `heads` (`None` for non-trainable leaves in both).
    """
    check_chunk_size(chunk_size)
    return _MTLValueAndJac(_Composed(features_fn, losses_fn), has_aux, chunk_size)


class _MTLValueAndAggregate(eqx.Module):
    composed: _Composed
    aggregator: Any
    strategy: AbstractStrategy
    has_aux: bool = eqx.field(static=True)

    def init(self, shared, heads, /, *args, **kwargs):
        """The aggregator's initial state (`None` for stateless aggregators); traces
        abstractly, nothing is computed."""
        if not is_stateful(self.aggregator):
            return None
        problem, diff, spec = _setup(
            self.composed, self.has_aux, shared, heads, args, kwargs
        )
        return init_state(self.aggregator, self.strategy, problem, diff, spec)

    def __call__(self, shared, heads, /, *args, agg_state=None, agg_key=None, **kwargs):
        check_state(self.aggregator, agg_state, "`step.init(shared, heads, *args)`")
        problem, diff, spec = _setup(
            self.composed, self.has_aux, shared, heads, args, kwargs
        )
        lin = linearize(self.strategy, problem, diff, spec)
        return aggregate_linearized(
            lin, self.aggregator, spec, "sum", agg_state, agg_key
        )


def filter_mtl_value_and_aggregate(
    features_fn: Callable,
    losses_fn: Callable,
    aggregator: AnyAggregator | Grouped,
    *,
    has_aux: bool = False,
    strategy: AbstractStrategy = FullJacobian(),
) -> Step:
    r"""Multi-task Jacobian descent: TorchJD's `mtl_backward` followed by `jac_to_grad`
    on the shared parameters.

    The shared trunk gets the aggregation $A(J)$ of the task losses' Jacobian with
    respect to its parameters; each task head gets the gradient of the sum of the
    losses (its own task's gradient when a head serves one task). Same calling
    convention and result as [`eqxjd.filter_value_and_aggregate`][], with the model
    given as two arguments.

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
        out = step(trunk, heads, x, y1, y2)
        trunk_update, heads_update = out.update
        ```

    **Arguments:**

    - `features_fn`: `features_fn(shared, *args, **kwargs) -> features`.
    - `losses_fn`: `losses_fn(heads, features, *args, **kwargs) -> losses` (or
        `(losses, aux)` with `has_aux=True`).
    - `aggregator`: any eqxjd aggregator, or an [`eqxjd.Grouped`][] over the trunk.
    - `has_aux`, `strategy`: as in [`eqxjd.filter_value_and_aggregate`][]. (Keyword
        only arguments.)

    **Returns:**

    A function `step(shared, heads, *args, agg_state=None, agg_key=None, **kwargs)`
    returning an [`eqxjd.Aggregated`][] whose `update` is the pair
    `(shared_update, heads_update)`; `step.init(shared, heads, *args, **kwargs)` gives
    the initial state of stateful aggregators.
    """
    check_aggregator(aggregator)
    check_strategy(strategy, has_aux)
    if isinstance(aggregator, Grouped):
        if not isinstance(strategy, FullJacobian):
            raise ValueError("`eqxjd.Grouped` needs `strategy=eqxjd.FullJacobian()`.")
        # The groups select parts of the trunk; the Jacobian pytree is (trunk, None).
        aggregator = Grouped(*((_on_trunk(w), agg) for w, agg in aggregator.groups))
    composed = _Composed(features_fn, losses_fn)
    return _MTLValueAndAggregate(composed, aggregator, strategy, has_aux)


def _on_trunk(where: Any) -> Any:
    if callable(where) and not isinstance(where, eqx.Module):
        return lambda tree: where(tree[0])
    return (where, False)
