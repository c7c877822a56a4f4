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

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._aggregator import (
    AbstractGramianWeightedAggregator,
    AbstractStatefulGramianWeightedAggregator,
)
from ._checks import check_chunk_size
from ._custom_types import State
from ._gramian import (
    batch_size,
    batched_losses,
    FilterSpec,
    generic_gramian,
    independence_check,
    per_sample_gramian,
    per_sample_vector_fn,
    split_params,
)
from ._weighting import AbstractStatefulWeighting, AbstractWeighting


_HIGHEST = lax.Precision.HIGHEST


# ------------------------------------------------------------------------- the update


def _check_losses(losses: Any, what: str) -> Array:
    if not (hasattr(losses, "dtype") and hasattr(losses, "shape")):
        raise ValueError(f"{what} must return a JAX array; got {type(losses)}.")
    if not jnp.issubdtype(losses.dtype, jnp.inexact):
        raise ValueError(f"{what} must return floating losses; got {losses.dtype}.")
    return losses


# ------------------------------------------------------------------------- the update


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
    gram, rest, static = split_params(params, filter_spec)
    rest = lax.stop_gradient(rest)

    def fn_of_gram(g):
        return fn(eqx.combine(g, rest, static), *args)

    return generic_gramian(fn_of_gram, gram, chunk_size)


# ------------------------------------------------------------------------- the update


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
    size = batch_size(batch)
    gram, rest, static = split_params(params, filter_spec)
    diff, _ = eqx.partition(params, eqx.is_inexact_array)

    def batched_of_diff(d):
        return batched_losses(loss_fn, batched, eqx.combine(d, static), batch, size)

    if want_vjp:
        losses, vjp = jax.vjp(batched_of_diff, diff)
    else:
        losses, vjp = batched_of_diff(diff), None
    tasks = 1 if losses.ndim == 1 else losses.shape[1]
    vec = per_sample_vector_fn(
        loss_fn, lax.stop_gradient(rest), static, batched=batched
    )
    gram = lax.stop_gradient(gram)
    if check_independence:
        if not batched:
            raise ValueError(
                "`check_independence` only applies with `batched=True`: a per-sample "
                "`loss_fn` is vmapped, which makes samples independent by construction."
            )
        losses = independence_check(
            losses, loss_fn, lax.stop_gradient(rest), static, batch, vec, gram, rtol
        )
    g = per_sample_gramian(vec, gram, batch, size, tasks, losses.dtype, chunk_size)
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
