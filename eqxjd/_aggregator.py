import abc

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import check_matrix
from ._custom_types import State
from ._misc import combine, gramian
from ._weighting import AbstractStatefulWeighting, AbstractWeighting


class AbstractAggregator(eqx.Module):
    r"""Base class for aggregators: maps a Jacobian to an update direction.

    An aggregator maps $J \in \mathbb{R}^{m \times n}$, whose row $i$ is the gradient
    of objective $i$, to one vector $d \in \mathbb{R}^n$ that a gradient-based
    optimiser then follows.

    **Conventions shared by every aggregator:**

    - The Jacobian is positional-only and must be a floating matrix of shape `(m, n)`;
      anything else raises `ValueError` at trace time. One Jacobian per call: batch with
      `eqx.filter_vmap`, compile with `eqx.filter_jit`.
    - Randomness only through the keyword-only `key`: deterministic aggregators ignore
      it, random ones (e.g. [`eqxjd.PCGrad`][]) raise `ValueError` without it.
    - Stateless aggregators derive from this class (`d = aggregator(jacobian)`);
      stateful ones from [`eqxjd.AbstractStatefulAggregator`][].
    - `m = 0` gives `zeros(n)`; `n = 0` gives an empty vector; non-finite input gives
      NaN output (documented per method).
    - Output dtype = input dtype.
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

    `init` reads only the shape and dtype of the Jacobian; the state keeps a fixed tree
    structure, so jitted loops do not retrace. Reset by calling `init` again.
    """

    @abc.abstractmethod
    def init(self, jacobian: Float[Array, "m n"], /) -> State:
        """**Arguments:**

        - `jacobian`: an example Jacobian of shape `(m, n)` (only its shape and dtype
            are read).

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


def weighted_combination(
    weighting: AbstractWeighting | AbstractStatefulWeighting,
    weights: Float[Array, " m"],
    jacobian: Float[Array, "m n"],
) -> Float[Array, " n"]:
    out = combine(weights.astype(jacobian.dtype), jacobian)
    return out if weighting.differentiable else lax.stop_gradient(out)


@eqx.filter_jit
def _weigh(weighting, stat, *state, key):
    # Jitted (inlined under an outer jit) so that eager calls of iterative weightings do
    # not re-trace and re-compile their loops on every call.
    return weighting(stat, *state, key=key)


def _empty_gramian(jacobian: Float[Array, "m n"]) -> Float[Array, "m m"]:
    m = jacobian.shape[0]
    return jnp.zeros((m, m), jacobian.dtype)


class AbstractWeightedAggregator(AbstractAggregator):
    r"""An aggregator $A(J) = w(J)^\top J$ whose weighting reads the Jacobian itself.

    Subclasses provide the field `weighting`.
    """

    weighting: eqx.AbstractVar[AbstractWeighting]

    def weights(
        self, jacobian: Float[Array, "m n"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        """The weights $w$ that the aggregation uses, shape `(m,)`."""
        check_matrix(jacobian)
        return _weigh(self.weighting, jacobian, key=key)

    def __call__(
        self, jacobian: Float[Array, "m n"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " n"]:
        return weighted_combination(
            self.weighting, self.weights(jacobian, key=key), jacobian
        )


class AbstractGramianWeightedAggregator(AbstractAggregator):
    r"""An aggregator $A(J) = w(J J^\top)^\top J$ whose weights depend on $J$ only
    through its Gramian.

    This is what lets eqxjd aggregate pytree Jacobians without concatenating them (the
    Gramian is a sum of per-leaf Gramians) and compute updates without ever forming $J$.
    Subclasses provide the field `gramian_weighting`.
    """

    gramian_weighting: eqx.AbstractVar[AbstractWeighting]

    def weights(
        self, jacobian: Float[Array, "m n"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        """The weights $w$ that the aggregation uses, shape `(m,)`."""
        check_matrix(jacobian)
        return _weigh(self.gramian_weighting, gramian(jacobian), key=key)

    def __call__(
        self, jacobian: Float[Array, "m n"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " n"]:
        weights = self.weights(jacobian, key=key)
        return weighted_combination(self.gramian_weighting, weights, jacobian)


class AbstractStatefulWeightedAggregator(AbstractStatefulAggregator):
    """A stateful $A(J) = w(J)^\\top J$: the state is the weighting's state."""

    weighting: eqx.AbstractVar[AbstractStatefulWeighting]

    def init(self, jacobian: Float[Array, "m n"], /) -> State:
        check_matrix(jacobian)
        return self.weighting.init(jacobian)

    def weights(
        self,
        jacobian: Float[Array, "m n"],
        state: State,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " m"], State]:
        """The weights (shape `(m,)`) and the new state."""
        check_matrix(jacobian)
        return _weigh(self.weighting, jacobian, state, key=key)

    def __call__(
        self,
        jacobian: Float[Array, "m n"],
        state: State,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " n"], State]:
        weights, state = self.weights(jacobian, state, key=key)
        return weighted_combination(self.weighting, weights, jacobian), state


class AbstractStatefulGramianWeightedAggregator(AbstractStatefulAggregator):
    """A stateful $A(J) = w(J J^\\top)^\\top J$: the state is the weighting's state."""

    gramian_weighting: eqx.AbstractVar[AbstractStatefulWeighting]

    def init(self, jacobian: Float[Array, "m n"], /) -> State:
        check_matrix(jacobian)
        return self.gramian_weighting.init(_empty_gramian(jacobian))

    def weights(
        self,
        jacobian: Float[Array, "m n"],
        state: State,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " m"], State]:
        """The weights (shape `(m,)`) and the new state."""
        check_matrix(jacobian)
        return _weigh(self.gramian_weighting, gramian(jacobian), state, key=key)

    def __call__(
        self,
        jacobian: Float[Array, "m n"],
        state: State,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " n"], State]:
        weights, state = self.weights(jacobian, state, key=key)
        return weighted_combination(self.gramian_weighting, weights, jacobian), state


class WeightedAggregator(AbstractWeightedAggregator):
    """Wraps any weighting that reads the Jacobian: $A(J) = w(J)^\\top J$."""

    weighting: AbstractWeighting


WeightedAggregator.__init__.__doc__ = """**Arguments:**

- `weighting`: an [`eqxjd.AbstractWeighting`][] that accepts a Jacobian `(m, n)`.
"""


class GramianWeightedAggregator(AbstractGramianWeightedAggregator):
    """Wraps any Gramian weighting: $A(J) = w(J J^\\top)^\\top J$."""

    gramian_weighting: AbstractWeighting


GramianWeightedAggregator.__init__.__doc__ = """**Arguments:**

- `gramian_weighting`: an [`eqxjd.AbstractWeighting`][] that accepts a Gramian `(m, m)`.
"""


class StatefulWeightedAggregator(AbstractStatefulWeightedAggregator):
    """Wraps a stateful weighting that reads the Jacobian."""

    weighting: AbstractStatefulWeighting


StatefulWeightedAggregator.__init__.__doc__ = """**Arguments:**

- `weighting`: an [`eqxjd.AbstractStatefulWeighting`][] accepting a Jacobian `(m, n)`.
"""


class StatefulGramianWeightedAggregator(AbstractStatefulGramianWeightedAggregator):
    """Wraps a stateful Gramian weighting (e.g. [`eqxjd.CRMOGMWeighting`][])."""

    gramian_weighting: AbstractStatefulWeighting


StatefulGramianWeightedAggregator.__init__.__doc__ = """**Arguments:**

- `gramian_weighting`: an [`eqxjd.AbstractStatefulWeighting`][] accepting a Gramian.
"""
