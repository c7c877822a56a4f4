import abc

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._checks import AGGREGATOR_USAGE, check_matrix, jacobian_shape, require_state
from ._custom_types import State
from ._misc import combine, gramian
from ._scale import call_scaled, promote_half, scaled_gramian, work_dtype
from ._weighting import AbstractStatefulWeighting, AbstractWeighting, AnyWeighting


class AbstractAggregator(eqx.Module):
    r"""Base class for aggregators: maps a Jacobian to an update direction.

    An aggregator maps $J \in \mathbb{R}^{m \times n}$, whose row $i$ is the gradient
    of objective $i$, to one vector $d \in \mathbb{R}^n$ that a gradient-based
    optimiser then follows.

    **Conventions shared by every aggregator:**

    - The Jacobian is positional-only and must be a real floating matrix of shape
      `(m, n)`; anything else raises `ValueError` at trace time. One Jacobian per call:
      batch with `eqx.filter_vmap`, compile with `eqx.filter_jit`.
    - Randomness only through the keyword-only `key`: deterministic aggregators ignore
      it, random ones (e.g. [`eqxjd.PCGrad`][]) raise `ValueError` without it.
    - Stateless aggregators derive from this class (`d = aggregator(jacobian)`);
      stateful ones from [`eqxjd.AbstractStatefulAggregator`][].
    - `m = 0` gives `zeros(n)`; `n = 0` gives an empty vector. Output dtype = input
      dtype. See the reliability page for non-finite input, extreme scales and half
      precision.
    """

    @abc.abstractmethod
    def __call__(
        self, jacobian: Float[Array, "m n"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " n"]:
        """**Arguments:**

        - `jacobian`: the Jacobian, an array of shape `(m, n)` whose rows are the
            gradients of the `m` objectives.
        - `key`: a JAX PRNG key, for random aggregators. (Keyword only argument.)

        **Returns:**

        The aggregation, an array of shape `(n,)`.
        """


class AbstractStatefulAggregator(eqx.Module):
    r"""Base class for aggregators that carry state between calls.

    ```python
    state = aggregator.init(jacobian)
    aggregation, state = aggregator(jacobian, state, key=key)
    ```

    `init` reads only the shape and dtype of the Jacobian (a matrix, or a Jacobian
    pytree as given to [`eqxjd.aggregate`][]); the state keeps a fixed tree structure,
    so jitted loops do not retrace. Reset by calling `init` again.
    """

    @abc.abstractmethod
    def init(self, jacobian: PyTree[Float[Array, "m ..."]], /) -> State:
        """**Arguments:**

        - `jacobian`: an example Jacobian, a matrix of shape `(m, n)` or a pytree
            whose leaves have a leading axis `m` (only shapes and dtypes are read).

        **Returns:**

        The initial state.
        """

    @abc.abstractmethod
    def __call__(
        self,
        jacobian: Float[Array, "m n"],
        state: State,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " n"], State]:
        """**Arguments:**

        - `jacobian`: the Jacobian, an array of shape `(m, n)`.
        - `state`: the state from `init` or from the previous call.
        - `key`: a JAX PRNG key, for random aggregators. (Keyword only argument.)

        **Returns:**

        A 2-tuple of the aggregation (shape `(n,)`) and the new state.
        """


def statistic(
    weighting: AnyWeighting, jacobian: Float[Array, "m n"]
) -> tuple[Array, Int[Array, ""] | None]:
    r"""What `weighting` reads of `jacobian`, and the exponent `k` of its rescaling: the
    Gramian of $J / 2^k$ (rescaled only when $J J^\top$ would not be representable,
    see `_scale.py`), the matrix itself, or only its number of rows (an `(m, 0)`
    matrix, free to build). `k` is `None` for the last two."""
    if weighting.reads == "gramian":
        return scaled_gramian([jacobian], gramian)
    if weighting.reads == "rows":
        return jnp.zeros((jacobian.shape[0], 0), jacobian.dtype), None
    return jacobian, None


def example_statistic(weighting: AnyWeighting, jacobian: PyTree[Array]) -> Array:
    """A zero statistic with the shape that `weighting` reads of a Jacobian matrix or
    pytree, in the dtype the computation runs in (for `init`)."""
    if eqx.is_array(jacobian):
        check_matrix(jacobian)
    m, n, dtype = jacobian_shape(jacobian)
    shape = {"gramian": (m, m), "rows": (m, 0), "matrix": (m, n)}[weighting.reads]
    return jnp.zeros(shape, work_dtype(dtype))


def weighted_combination(
    weighting: AnyWeighting, weights: Float[Array, " m"], jacobian: Float[Array, "m n"]
) -> Float[Array, " n"]:
    out = combine(weights.astype(jacobian.dtype), jacobian)
    return out if weighting.differentiable else lax.stop_gradient(out)


@eqx.filter_jit
def call_weighting(weighting, stat, *state, key, exponent=None):
    # Jitted (inlined under an outer jit) so that eager calls of iterative weightings do
    # not re-trace and re-compile their loops on every call. `exponent`: `stat` is a
    # Gramian rescaled by 4^-exponent (see `_scale.call_scaled`).
    return call_scaled(weighting, stat, exponent, *state, key=key)


def _weights_and_combination(weighting, jacobian, state, key):
    # Half precision is computed in float32 and cast back (the weights too).
    check_matrix(jacobian)
    jacobian = jnp.asarray(jacobian)
    dtype = jacobian.dtype
    work = promote_half(jacobian)
    stat, k = statistic(weighting, work)
    out = call_weighting(weighting, stat, *state, key=key, exponent=k)
    weights, new_state = (out, None) if not state else out
    aggregation = weighted_combination(weighting, weights, work)
    return weights.astype(dtype), aggregation.astype(dtype), new_state


class AbstractWeightedAggregator(AbstractAggregator):
    r"""An aggregator $A(J) = w^\top J$ whose weights $w$ come from a weighting.

    The weighting reads the Gramian $J J^\top$, the Jacobian, or only the number of
    rows (its `reads`); Gramian weightings are what lets eqxjd aggregate pytree
    Jacobians without concatenating them and compute updates without forming $J$.
    Subclasses provide the field `weighting`.
    """

    weighting: eqx.AbstractVar[AbstractWeighting]

    def weights(
        self, jacobian: Float[Array, "m n"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        """The weights $w$ that the aggregation uses, shape `(m,)`."""
        weights, _, _ = _weights_and_combination(self.weighting, jacobian, (), key)
        return weights

    def __call__(
        self, jacobian: Float[Array, "m n"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " n"]:
        _, aggregation, _ = _weights_and_combination(self.weighting, jacobian, (), key)
        return aggregation


class AbstractStatefulWeightedAggregator(AbstractStatefulAggregator):
    r"""A stateful $A(J) = w^\top J$: the state is the weighting's state."""

    weighting: eqx.AbstractVar[AbstractStatefulWeighting]

    def init(self, jacobian: PyTree[Float[Array, "m ..."]], /) -> State:
        return self.weighting.init(example_statistic(self.weighting, jacobian))

    def weights(
        self,
        jacobian: Float[Array, "m n"],
        state: State = None,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " m"], State]:
        """The weights (shape `(m,)`) and the new state."""
        require_state(state, type(self).__name__, AGGREGATOR_USAGE)
        weights, _, state = _weights_and_combination(
            self.weighting, jacobian, (state,), key
        )
        return weights, state

    def __call__(
        self,
        jacobian: Float[Array, "m n"],
        state: State = None,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " n"], State]:
        require_state(state, type(self).__name__, AGGREGATOR_USAGE)
        _, aggregation, state = _weights_and_combination(
            self.weighting, jacobian, (state,), key
        )
        return aggregation, state


class WeightedAggregator(AbstractWeightedAggregator):
    """Wraps any weighting: $A(J) = w^\\top J$, with $w$ computed from what the
    weighting reads (TorchJD's `WeightedAggregator` and `GramianWeightedAggregator`)."""

    weighting: AbstractWeighting


WeightedAggregator.__init__.__doc__ = """**Arguments:**

- `weighting`: any [`eqxjd.AbstractWeighting`][].
"""


class StatefulWeightedAggregator(AbstractStatefulWeightedAggregator):
    """Wraps any stateful weighting (e.g. [`eqxjd.CRMOGMWeighting`][])."""

    weighting: AbstractStatefulWeighting


StatefulWeightedAggregator.__init__.__doc__ = """**Arguments:**

- `weighting`: any [`eqxjd.AbstractStatefulWeighting`][].
"""
