import abc
from typing import Literal, TypeAlias

import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray

from ._custom_types import State


Reads: TypeAlias = Literal["gramian", "matrix", "rows"]


class AbstractWeighting(eqx.Module):
    r"""Base class for weightings: a map from a statistic of the Jacobian to weights.

    A weighting extracts weights $w \in \mathbb{R}^m$ from a statistic of the Jacobian
    $J \in \mathbb{R}^{m \times n}$, and declares which one in `reads`:

    - `"gramian"`: the Gramian $G = J J^\top$, shape `(m, m)`. These weightings work
      without the Jacobian (pytree Jacobians are aggregated through a sum of per-leaf
      Gramians, and the Gramian strategies of
      [`eqxjd.filter_value_and_aggregate`][] never form $J$).
    - `"matrix"`: the Jacobian itself, shape `(m, n)` (or, for MoDo and SDMGrad, a
      cross-batch matrix).
    - `"rows"`: only the number of rows; any `(m, k)` matrix is accepted.

    **Conventions shared by every weighting:**

    - The statistic is positional-only; one statistic per call. Batch with
      `eqx.filter_vmap`, compile with `eqx.filter_jit`: weightings never jit themselves.
    - Randomness comes only from the keyword-only `key` argument. Deterministic
      weightings ignore it; random ones raise `ValueError` when it is missing.
    - Stateless weightings derive from this class: `weights = weighting(stat)`. Stateful
      ones derive from [`eqxjd.AbstractStatefulWeighting`][] instead.
    - `differentiable` says whether gradients flow through the weights. Methods that
      TorchJD treats as non-differentiable stop gradients explicitly (zero, never
      wrong).
    - Shape and dtype misuse raises `ValueError` at trace time; zero objectives give
      weights of shape `(0,)`. See the reliability page for non-finite input, extreme
      scales and half precision.
    """

    reads: eqx.AbstractVar[Reads]
    differentiable: eqx.AbstractVar[bool]

    @abc.abstractmethod
    def __call__(
        self, stat: Float[Array, "m k"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        """**Arguments:**

        - `stat`: what the weighting reads (see `reads`): the Gramian $J J^\\top$
            (shape `(m, m)`) or the Jacobian (shape `(m, n)`).
        - `key`: a JAX PRNG key, for random weightings. (Keyword only argument.)

        **Returns:**

        The weights, an array of shape `(m,)` with the dtype of `stat`.
        """


class AbstractStatefulWeighting(eqx.Module):
    r"""Base class for weightings that carry state from one call to the next.

    State is explicit and functional, as in `equinox.nn.BatchNorm` or optax:

    ```python
    state = weighting.init(gramian)
    weights, state = weighting(gramian, state)
    ```

    `init` depends only on the shape and dtype of its argument, and the state's tree
    structure, shapes and dtypes never change between calls, so a jitted training step
    does not retrace. Resetting is calling `init` again. A state built for another
    number of objectives raises a `ValueError`. `reads` and `differentiable` are as in
    [`eqxjd.AbstractWeighting`][].
    """

    reads: eqx.AbstractVar[Reads]
    differentiable: eqx.AbstractVar[bool]

    @abc.abstractmethod
    def init(self, stat: Float[Array, "m k"], /) -> State:
        """**Arguments:**

        - `stat`: an example statistic (only its shape and dtype are read).

        **Returns:**

        The initial state.
        """

    @abc.abstractmethod
    def __call__(
        self,
        stat: Float[Array, "m k"],
        state: State,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " m"], State]:
        """**Arguments:**

        - `stat`: what the weighting reads (see `reads`).
        - `state`: the state returned by `init` or by the previous call.
        - `key`: a JAX PRNG key, for random weightings. (Keyword only argument.)

        **Returns:**

        A 2-tuple of the weights (shape `(m,)`) and the new state.
        """


AnyWeighting: TypeAlias = AbstractWeighting | AbstractStatefulWeighting
