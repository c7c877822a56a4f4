"""One Jacobian-descent step, whatever the aggregator and however the Jacobian is
obtained: [`eqxjd.filter_value_and_aggregate`][] with a strategy
([`eqxjd.FullJacobian`][], [`eqxjd.Gramian`][], [`eqxjd.PerSampleGramian`][],
[`eqxjd.DataParallel`][]), and [`eqxjd.filter_value_and_gramian`][]."""

import abc
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._aggregator import call_weighting
from ._checks import check_chunk_size, check_method
from ._custom_types import State
from ._gramian import (
    batch_size,
    block,
    FilterSpec,
    flat_rows,
    independence_check,
    per_sample_gramian,
    per_sample_vector_fn,
    structured_value_and_gramian,
    symmetrize,
)
from ._jacobian import fn_name, seeds, split_output, value_and_jac
from ._tree import (
    aggregate_tree,
    Aggregated,
    AnyAggregator,
    check_aggregator,
    check_state,
    Grouped,
    init_tree,
    is_stateful,
    tree_gramian,
    WeightedAggregators,
)
from ._weighting import AbstractStatefulWeighting


def weigh(weighting, gramian, state, key):
    """A weighting's weights (and new state) on a Gramian."""
    if isinstance(weighting, AbstractStatefulWeighting):
        return call_weighting(weighting, gramian, state, key=key)
    return call_weighting(weighting, gramian, key=key), state


@runtime_checkable
class Step(Protocol):
    """What [`eqxjd.filter_value_and_aggregate`][] and
    [`eqxjd.filter_mtl_value_and_aggregate`][] return: a step function (an
    `eqx.Module`, so it can be passed through `eqx.filter_jit`) with an `init` method.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Aggregated:
        """`step(model, *args, agg_state=None, agg_key=None, **kwargs)` (for the
        multi-task step, `step(shared, heads, *args, ...)`): the losses, the update,
        the weights and the new state, as an [`eqxjd.Aggregated`][]."""
        ...

    def init(self, *args: Any, **kwargs: Any) -> State:
        """`step.init(model, *args, **kwargs)`: the aggregator's initial state for
        these arguments (`None` for stateless aggregators). Traces the loss function
        abstractly: nothing is computed."""
        ...


class Linearized(eqx.Module):
    """What a strategy computes at the current parameters: the losses, `aux`, the
    Jacobian pytree of the Gramian part (or `None`) or its Gramian (or `None`), the
    VJP of the losses with respect to every differentiated leaf, and how to evaluate
    a weighting on that Gramian."""

    losses: Array
    aux: Any
    jacobian: PyTree[Array] | None
    gramian: Array | None
    vjp: Callable[[Array], PyTree[Array]]
    weigh: Callable = weigh


class AbstractStrategy(eqx.Module):
    """How a step obtains what the aggregator reads: the whole Jacobian
    ([`eqxjd.FullJacobian`][]), or only its Gramian ([`eqxjd.Gramian`][],
    [`eqxjd.PerSampleGramian`][], [`eqxjd.DataParallel`][]).

    Every strategy takes the same loss function, `fn(model, *args, **kwargs) ->
    losses` (any shape; one objective per entry, in the order of `losses.ravel()`), so
    switching strategy is a one-word change. The Gramian strategies need an
    aggregator whose weighting reads the Gramian (or only the number of rows), e.g.
    [`eqxjd.UPGrad`][] or [`eqxjd.Mean`][].
    """

    # Whether the step can return the auxiliary output of `fn`.
    returns_aux: ClassVar[bool] = True

    @abc.abstractmethod
    def linearize(
        self,
        f: Callable[[PyTree], tuple[Array, Any]],
        diff: PyTree,
        gram_spec: PyTree[bool],
        batch: tuple,
        batched_f: Callable[..., tuple[Array, Any]],
    ) -> Linearized:
        """**Arguments:**

        - `f`: `f(diff) -> (losses, aux)`, the loss function at fixed data.
        - `diff`: the differentiated leaves (`eqx.is_inexact_array`) of the model.
        - `gram_spec`: bools shaped like `diff`: the leaves that enter the Jacobian.
        - `batch`: the positional arguments after the model.
        - `batched_f`: `batched_f(diff, *batch) -> (losses, aux)`, for strategies that
            split the batch.

        **Returns:**

        A `Linearized`.
        """


def _select(tree: PyTree, spec: PyTree[bool]) -> PyTree:
    """`tree` with the leaves outside `spec` replaced by `None`."""
    return jtu.tree_map(lambda x, keep: x if keep else None, tree, spec)


def _rows_of(tree: PyTree[Array], spec: PyTree[bool]) -> list[Array]:
    """The selected leaves of a pytree of rows (leading axis m), flattened."""
    leaves = jtu.tree_leaves(_select(tree, spec))
    m = leaves[0].shape[0]
    return flat_rows(leaves, m)


class FullJacobian(AbstractStrategy):
    r"""The whole Jacobian, as a pytree (TorchJD's autojac): one forward pass and
    `m` vmapped VJPs (in chunks of `chunk_size` rows). Works with every aggregator,
    [`eqxjd.Grouped`][] included. Memory $O(m n)$."""

    chunk_size: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        check_chunk_size(self.chunk_size)

    def linearize(self, f, diff, gram_spec, batch, batched_f) -> Linearized:
        losses, aux, jac, vjp = value_and_jac(f, diff, self.chunk_size)
        return Linearized(losses, aux, _select(jac, gram_spec), None, vjp)


FullJacobian.__init__.__doc__ = """**Arguments:**

- `chunk_size`: `None` computes all `m` rows at once; an int computes `chunk_size`
    rows at a time (TorchJD's `parallel_chunk_size`). Same result.
"""


class Gramian(AbstractStrategy):
    r"""Only the Gramian $G = J J^\top$, never storing $J$ (TorchJD's autogram without
    `batch_dim`), for any loss function: losses may mix batch elements (e.g.
    BatchNorm), which [`eqxjd.PerSampleGramian`][] does not allow.

    The function is linearised once. With `chunk_size=None`, all `m` rows of $J$ are
    formed transiently and $G = \sum_\ell J_\ell J_\ell^\top$ leaf by leaf (memory
    $O(m n)$, fastest). With `chunk_size=c`, the columns $G e_i = J (J^\top e_i)$ are
    computed `c` at a time (a VJP then a JVP through the linearisation), so at most
    `c` rows exist at once (about twice the compute). The update is one VJP of
    $\sum_i w_i \ell_i$."""

    chunk_size: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        check_chunk_size(self.chunk_size)

    def linearize(self, f, diff, gram_spec, batch, batched_f) -> Linearized:
        losses, f_jvp, aux = jax.linearize(f, diff, has_aux=True)
        f_vjp = jax.linear_transpose(f_jvp, diff)

        def row(e):
            return f_vjp(e)[0]

        eye = seeds(losses)
        m = losses.size
        if self.chunk_size is None or self.chunk_size >= m:
            rows = _rows_of(jax.vmap(row)(eye), gram_spec)
            g = block(rows, rows, losses.dtype)
        else:
            zeros = jtu.tree_map(jnp.zeros_like, diff)

            def column(e):
                # G e_i = J_g (J_g^T e_i): the tangent is zero outside the Gramian part.
                tangent = jtu.tree_map(
                    lambda r, z, keep: r if keep else z, row(e), zeros, gram_spec
                )
                return jnp.reshape(f_jvp(tangent), (m,))

            g = lax.map(column, eye, batch_size=self.chunk_size)
        return Linearized(losses, aux, None, symmetrize(g), row)


Gramian.__init__.__doc__ = """**Arguments:**

- `chunk_size`: rows of $J$ alive at once, or `None` for all.
"""


class PerSampleGramian(AbstractStrategy):
    r"""The Gramian of per-sample losses (instance-wise risk minimisation, TorchJD's
    autogram with `batch_dim=0`), for losses that decompose over a batch.

    `fn(model, *batch, **kwargs)` returns the losses of a batch, shape `(B,)` (one per
    sample) or `(B, T)` (`T` tasks per sample, instance-wise multi-task learning);
    every array in the positional arguments has the leading batch axis `B`, and
    `**kwargs` are shared by all samples. The per-sample losses are `fn` on batches of
    one, under `vmap`.

    - `method="structured"` (default): the Gramian comes from the activations and
      output cotangents of one forward and one backward pass, without per-sample
      gradients wherever the model's structure allows it. For a dense layer $y = W a$
      at positions $p$, $G_{ij} = \sum_{p, q} (a_{ip} \cdot a_{jq})(\delta_{ip} \cdot
      \delta_{jq})$; convolutions, embeddings and attention projections are handled
      alike, and any other use of a parameter through that parameter's own
      per-sample gradient. The update reuses the same forward pass. Nothing in the
      model's code needs to change.
    - `method="gradients"`: per-sample gradients of every parameter, `chunk_size`
      samples at a time; the update is one VJP of $\sum_i w_i \ell_i$ through the
      batched function.

    Both are exact. With `has_aux=True`, the structured method evaluates `fn` once
    more on the whole batch for its auxiliary output.

    !!! warning "Batch independence"

        This is exact only if sample $i$'s loss depends on sample $i$ alone. A model
        that mixes samples (BatchNorm in training mode) gives the Gramian of *other*
        losses; `check_independence=True` detects this at run time (an
        `eqx.error_if` comparing the losses and sample 0's gradient against a batch of
        one). Otherwise use [`eqxjd.Gramian`][], which assumes nothing.
    """

    chunk_size: int | None = eqx.field(default=None, static=True)
    check_independence: bool = eqx.field(default=False, static=True)
    method: Literal["structured", "gradients"] = eqx.field(
        default="structured", static=True
    )

    def __check_init__(self):
        check_chunk_size(self.chunk_size)
        check_method(self.method)

    def linearize(self, f, diff, gram_spec, batch, batched_f) -> Linearized:
        size = batch_size(batch)

        def losses_of(d, *batch):
            losses, aux = batched_f(d, *batch)
            if losses.ndim not in (1, 2) or losses.shape[0] != batch_size(batch):
                raise ValueError(
                    f"With `PerSampleGramian`, the losses of a batch must have shape "
                    f"({size},) or ({size}, T); got {losses.shape}."
                )
            return losses, aux

        gram, rest = eqx.partition(lax.stop_gradient(diff), gram_spec)

        def loss_fn(g, *sample):
            return losses_of(eqx.combine(g, rest), *sample)[0]

        vec = per_sample_vector_fn(loss_fn)
        if self.method == "structured":
            nothing = jtu.tree_map(lambda _: None, diff)
            losses, g, vjp = structured_value_and_gramian(
                lambda d, *b: losses_of(d, *b)[0],
                diff,
                nothing,
                gram_spec,
                batch,
                chunk_size=self.chunk_size,
            )
            aux = None
            if self.check_independence or _has_aux(losses_of, diff, batch):
                batched, aux = losses_of(diff, *batch)
                if self.check_independence:
                    # The checked losses of the whole batch (equal, when the check
                    # passes, to the per-sample ones).
                    losses = independence_check(batched, loss_fn, batch, vec, gram)
            return Linearized(losses, aux, None, g, vjp)
        losses, vjp_fn, aux = jax.vjp(
            lambda d: losses_of(d, *batch), diff, has_aux=True
        )
        if self.check_independence:
            losses = independence_check(losses, loss_fn, batch, vec, gram)
        tasks = 1 if losses.ndim == 1 else losses.shape[1]
        g = per_sample_gramian(
            vec, gram, batch, size, tasks, losses.dtype, self.chunk_size
        )
        return Linearized(losses, aux, None, g, lambda c: vjp_fn(c)[0])


def _has_aux(losses_of, diff, batch) -> bool:
    """Whether the loss function returns an auxiliary output (traced abstractly)."""
    _, aux = jax.eval_shape(losses_of, diff, *batch)
    return aux is not None


PerSampleGramian.__init__.__doc__ = """**Arguments:**

- `chunk_size`: samples per chunk, or `None` for the whole batch at once.
- `check_independence`: add the run-time batch-independence check (one extra
    forward and backward pass).
- `method`: `"structured"` (default) or `"gradients"`, see above.
"""


# ------------------------------------------------------------------------- the step


def _reads_gramian(aggregator: Any) -> bool:
    return isinstance(aggregator, WeightedAggregators) and (
        aggregator.weighting.reads in ("gramian", "rows")
    )


def _merge(gram_part: PyTree, rest_part: PyTree, spec: PyTree[bool]) -> PyTree:
    return jtu.tree_map(
        lambda g, r, keep: g if keep else r,
        gram_part,
        rest_part,
        spec,
        is_leaf=lambda x: x is None,
    )


class Problem(eqx.Module):
    """A loss function bound to its arguments, split as the strategies need it."""

    fn: Callable
    has_aux: bool = eqx.field(static=True)
    static: PyTree
    args: tuple
    kwargs: dict

    def batched(self, d: PyTree, *batch: Any) -> tuple[Array, Any]:
        out = self.fn(eqx.combine(d, self.static), *batch, **self.kwargs)
        return split_output(out, self.has_aux, fn_name(self.fn))

    def at_data(self, d: PyTree) -> tuple[Array, Any]:
        return self.batched(d, *self.args)


def gram_spec_of(diff: PyTree, filter_spec: FilterSpec) -> PyTree[bool]:
    """Bools shaped like `diff`: which differentiated leaves enter the Jacobian."""
    gram, _ = eqx.partition(diff, filter_spec)
    spec = jtu.tree_map(
        lambda d, g: None if d is None else g is not None,
        diff,
        gram,
        is_leaf=lambda x: x is None,
    )
    if not any(jtu.tree_leaves(spec)):
        raise ValueError(
            "No floating-point array of the model is selected for the Jacobian: check "
            "`filter_spec` (a bool, a callable or a pytree of them, as in "
            "`eqx.partition`)."
        )
    return spec


def linearize(
    strategy: AbstractStrategy, problem: Problem, diff: PyTree, spec: PyTree[bool]
) -> Linearized:
    return strategy.linearize(
        problem.at_data, diff, spec, problem.args, problem.batched
    )


def aggregate_linearized(
    lin: Linearized,
    aggregator: Any,
    spec: PyTree[bool],
    rest: Literal["weighted", "sum"],
    state: State,
    key: PRNGKeyArray | None,
) -> Aggregated:
    """The update from a strategy's output: the aggregation on the Jacobian part, and
    on the other leaves the weighted (partial Jacobian descent) or plain (multi-task
    heads) sum of the gradients."""
    losses = lin.losses
    if lin.jacobian is not None:
        update, weights, state = aggregate_tree(aggregator, lin.jacobian, state, key)
    else:
        if not _reads_gramian(aggregator):
            raise ValueError(
                "This strategy computes only the Gramian: the aggregator must be "
                "weighted by a weighting that reads the Gramian (e.g. "
                "`eqxjd.UPGrad()`, `eqxjd.Mean()`, or `eqxjd.WeightedAggregator(w)` "
                f"for a Gramian weighting `w`); got {type(aggregator).__name__}. Use "
                "`strategy=eqxjd.FullJacobian()` for the other aggregators."
            )
        assert lin.gramian is not None
        weights, state = lin.weigh(aggregator.weighting, lin.gramian, state, key)
        weights = _as_cotangent(aggregator, weights, losses)
        update = _select(lin.vjp(weights), spec)
    if weights is not None and not isinstance(weights, tuple):
        weights = jnp.reshape(weights, losses.shape)
    if not all(jtu.tree_leaves(spec)):
        update = _merge(update, _rest_update(lin, aggregator, weights, rest), spec)
    return Aggregated(update, weights, state, losses, lin.aux)


def _as_cotangent(aggregator, weights, losses) -> Array:
    weights = jnp.reshape(weights, losses.shape).astype(losses.dtype)
    if not aggregator.weighting.differentiable:
        weights = lax.stop_gradient(weights)
    return weights


def _rest_update(lin: Linearized, aggregator, weights, rest) -> PyTree:
    losses = lin.losses
    if rest == "sum":
        cotangent = jnp.ones_like(losses)
    elif weights is None or isinstance(weights, tuple):
        raise ValueError(
            "With a `filter_spec`, the leaves outside the Jacobian are updated with "
            "the weighted sum of their gradients, which needs an aggregator with "
            f"weights (e.g. UPGrad, Mean); {type(aggregator).__name__} has none."
        )
    else:
        cotangent = _as_cotangent(aggregator, weights, losses)
    return lin.vjp(cotangent)


class _ValueAndAggregate(eqx.Module):
    fn: Callable
    aggregator: Any
    strategy: AbstractStrategy
    filter_spec: FilterSpec
    has_aux: bool = eqx.field(static=True)

    # No `__wrapped__`: `eqx.filter_jit` would bind calls against `fn`'s signature,
    # which lacks `agg_state` and `agg_key`.

    def _setup(self, model, args, kwargs):
        diff, static = eqx.partition(model, eqx.is_inexact_array)
        problem = Problem(self.fn, self.has_aux, static, args, kwargs)
        return problem, diff, gram_spec_of(diff, self.filter_spec)

    def init(self, model, /, *args, **kwargs) -> State:
        """The aggregator's initial state for this model and these arguments (`None`
        for stateless aggregators). Traces `fn` abstractly: nothing is computed."""
        if not is_stateful(self.aggregator):
            return None
        problem, diff, spec = self._setup(model, args, kwargs)
        return init_state(self.aggregator, self.strategy, problem, diff, spec)

    def __call__(self, model, /, *args, agg_state=None, agg_key=None, **kwargs):
        check_state(self.aggregator, agg_state, "`step.init(model, *args)`")
        problem, diff, spec = self._setup(model, args, kwargs)
        lin = linearize(self.strategy, problem, diff, spec)
        return aggregate_linearized(
            lin, self.aggregator, spec, "weighted", agg_state, agg_key
        )


def init_state(aggregator, strategy, problem, diff, spec) -> State:
    """The aggregator's initial state, from the shapes the strategy produces."""

    def shapes(d):
        lin = linearize(strategy, problem, d, spec)
        return lin.jacobian, lin.gramian

    jacobian, g = eqx.filter_eval_shape(shapes, diff)

    @jax.jit
    def make():
        if jacobian is not None:
            zeros = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jacobian)
            return init_tree(aggregator, zeros)
        return aggregator.weighting.init(jnp.zeros(g.shape, g.dtype))

    return make()


def check_strategy(strategy: Any, has_aux: bool) -> None:
    if not isinstance(strategy, AbstractStrategy):
        raise ValueError(
            "`strategy` must be an eqxjd strategy (`eqxjd.FullJacobian()`, "
            "`eqxjd.Gramian()`, `eqxjd.PerSampleGramian()` or "
            f"`eqxjd.DataParallel(...)`); got {type(strategy).__name__}."
        )
    if has_aux and not strategy.returns_aux:
        raise ValueError(
            f"`has_aux=True` is not supported with {type(strategy).__name__}."
        )


def filter_value_and_aggregate(
    fn: Callable,
    aggregator: AnyAggregator | Grouped,
    *,
    has_aux: bool = False,
    strategy: AbstractStrategy = FullJacobian(),
    filter_spec: FilterSpec = True,
) -> Step:
    r"""The Jacobian-descent analogue of `eqx.filter_value_and_grad`.

    Computes the losses $L(\theta)$ (any shape; $m$ = `losses.size` objectives), what
    the aggregator reads of their Jacobian $J$ with respect to the floating-point
    arrays of the first argument (the whole Jacobian, or only its Gramian: see
    `strategy`), and the aggregated update $A(J)$ as a pytree shaped like the model's
    trainable part (`None` elsewhere, as the gradients of `eqx.filter_value_and_grad`).
    Apply it like a gradient,
    `eqx.apply_updates(model, jtu.tree_map(lambda u: -lr * u, out.update))`, or feed
    it to any optax optimiser. This is TorchJD's `backward` followed by `jac_to_grad`
    (or, with a Gramian strategy, its `autogram.Engine` followed by
    `losses.backward(weights)`).

    The step returns an [`eqxjd.Aggregated`][] whatever the aggregator: `losses`,
    `aux`, `update`, `weights` (shaped like `losses`, `None` for aggregators without
    weights) and `state` (`None` for stateless aggregators).

    !!! Example

        ```python
        def losses_fn(model, x, y):
            out = jax.vmap(model)(x)
            return jnp.mean((out - y) ** 2, axis=0)  # one MSE per output: shape (2,)

        step = eqxjd.filter_value_and_aggregate(losses_fn, eqxjd.UPGrad())
        out = eqx.filter_jit(step)(model, x, y)
        model = eqx.apply_updates(model, jtu.tree_map(lambda u: -0.1 * u, out.update))
        ```

    Instance-wise risk minimisation (one loss per sample) is the same step with a
    loss per sample and another strategy:

    ```python
    def per_sample_losses(model, x, y):
        return jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=1)  # shape (B,)

    step = eqxjd.filter_value_and_aggregate(
        per_sample_losses, eqxjd.UPGrad(), strategy=eqxjd.PerSampleGramian()
    )
    ```

    **Arguments:**

    - `fn`: `fn(model, *args, **kwargs)` returning the losses, an array with at least
        one axis (or `(losses, aux)` with `has_aux=True`).
    - `aggregator`: any eqxjd aggregator, or an [`eqxjd.Grouped`][] (with
        [`eqxjd.FullJacobian`][]).
    - `has_aux`: whether `fn` also returns auxiliary data. (Keyword only argument.)
    - `strategy`: how the Jacobian is obtained: [`eqxjd.FullJacobian`][] (default),
        [`eqxjd.Gramian`][], [`eqxjd.PerSampleGramian`][] or
        [`eqxjd.DataParallel`][]. (Keyword only argument.)
    - `filter_spec`: which floating-point arrays of the model enter the Jacobian, as
        in `eqx.partition` (partial Jacobian descent; default: all). The others are
        updated with $\sum_i w_i \nabla \ell_i$ (aggregators with weights only).
        (Keyword only argument.)

    **Returns:**

    A function `step(model, *args, agg_state=None, agg_key=None, **kwargs)` returning
    an [`eqxjd.Aggregated`][]. `agg_state` is required for stateful aggregators (its
    initial value is `step.init(model, *args, **kwargs)`, then `out.state`);
    `agg_key` is the PRNG key of random aggregators. Both are keyword-only and named
    so that they do not clash with arguments of `fn` such as `key`.
    """
    check_aggregator(aggregator)
    check_strategy(strategy, has_aux)
    if isinstance(aggregator, Grouped) and not isinstance(strategy, FullJacobian):
        raise ValueError("`eqxjd.Grouped` needs `strategy=eqxjd.FullJacobian()`.")
    return _ValueAndAggregate(fn, aggregator, strategy, filter_spec, has_aux)


class _ValueAndGramian(eqx.Module):
    fn: Callable
    strategy: AbstractStrategy
    filter_spec: FilterSpec
    has_aux: bool = eqx.field(static=True)

    @property
    def __wrapped__(self):
        return self.fn

    def __call__(self, model, /, *args, **kwargs):
        diff, static = eqx.partition(model, eqx.is_inexact_array)
        problem = Problem(self.fn, self.has_aux, static, args, kwargs)
        spec = gram_spec_of(diff, self.filter_spec)
        lin = linearize(self.strategy, problem, diff, spec)
        g = lin.gramian if lin.jacobian is None else tree_gramian(lin.jacobian)
        return ((lin.losses, lin.aux) if self.has_aux else lin.losses), g


def filter_value_and_gramian(
    fn: Callable,
    *,
    has_aux: bool = False,
    strategy: AbstractStrategy = Gramian(),
    filter_spec: FilterSpec = True,
) -> Callable:
    r"""The losses and the Gramian $G = J J^\top$ of their Jacobian with respect to the
    first argument of `fn` (TorchJD's `autogram.Engine.compute_gramian`).

    Same loss-function convention and strategies as
    [`eqxjd.filter_value_and_aggregate`][]: `fn(model, *args, **kwargs)` returns
    losses of any shape, `m = losses.size`, and $G$ is `(m, m)` in the order of
    `losses.ravel()`. The default [`eqxjd.Gramian`][] assumes nothing about `fn`;
    [`eqxjd.PerSampleGramian`][] is for losses that decompose over a batch.

    **Arguments:**

    - `fn`: `fn(model, *args, **kwargs)` returning the losses (or `(losses, aux)` with
        `has_aux=True`).
    - `has_aux`, `strategy`, `filter_spec`: as in
        [`eqxjd.filter_value_and_aggregate`][]. (Keyword only arguments.)

    **Returns:**

    A function with the signature of `fn` returning `(losses, gramian)`, or
    `((losses, aux), gramian)` with `has_aux=True`.
    """
    check_strategy(strategy, has_aux)
    return eqx.module_update_wrapper(
        _ValueAndGramian(fn, strategy, filter_spec, has_aux)
    )
