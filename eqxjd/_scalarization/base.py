import abc
from collections.abc import Sequence
from typing import Any, overload

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Shaped

from .._checks import check_floating
from .._custom_types import State


class AbstractScalarizer(eqx.Module):
    r"""Base class for scalarizers: a map from a vector of losses to one scalar loss.

    A scalarizer combines the losses $L \in \mathbb{R}^m$ directly (no Jacobian): the
    user differentiates its output as an ordinary loss, e.g. with `eqx.filter_grad`. It
    is the baseline against which aggregators are compared.

    **Conventions shared by every scalarizer:**

    - The losses are positional-only and may have any shape (usually `(m,)`); methods
      with per-loss arrays (weights, reference points, learnable parameters) require
      exactly that shape, checked at trace time (`ValueError`).
    - The output is a scalar with the dtype of the losses (float32 in, float32 out);
      half-precision losses are computed in float32 and the result cast back. NumPy
      arrays and lists are accepted; complex or integer losses raise `ValueError`.
    - Empty losses (`m = 0`) give `0`, the value of an empty sum, except
      [`eqxjd.scalarization.Mean`][], which gives NaN as in TorchJD. NaN or infinite
      losses propagate to the output by IEEE arithmetic.
    - Randomness comes only from the keyword-only `key`; deterministic scalarizers
      ignore it, random ones raise `ValueError` when it is missing.
    - Hyperparameter arrays (`weights`, `reference`, ...) are constants: gradients
      through them are stopped, so placing a scalarizer inside a model trained with
      `eqx.filter_grad` never trains them. Learnable parameters
      ([`eqxjd.scalarization.UW`][], [`eqxjd.scalarization.IMTLL`][]) are ordinary
      inexact-array fields, trained like any other model leaf.
    - Stateless scalarizers derive from this class: `loss = scalarizer(losses)`. Those
      with internal updates (DWA, FAMO) derive from
      [`eqxjd.scalarization.AbstractStatefulScalarizer`][] instead.
    """

    @abc.abstractmethod
    def __call__(
        self, losses: Float[Array, "*shape"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, ""]:
        """**Arguments:**

        - `losses`: the losses, an array of any shape (usually `(m,)`).
        - `key`: a JAX PRNG key, for random scalarizers; ignored by the others.
            (Keyword only argument.)

        **Returns:**

        The scalarized loss, a scalar with the dtype of `losses`.
        """


class AbstractStatefulScalarizer(eqx.Module):
    r"""Base class for scalarizers whose weights evolve through explicit state updates.

    The call is pure and only *reads* the state, so it can be differentiated as an
    ordinary loss; the state changes only through the scalarizer's own transition
    methods, which return a new state (there is no hidden mutation):

    ```python
    state = scalarizer.init(losses)          # depends only on shape and dtype
    loss = scalarizer(losses, state)         # differentiate this as usual
    state = scalarizer.update(state, ...)    # method-specific transition(s)
    ```

    See [`eqxjd.scalarization.FAMO`][] and [`eqxjd.scalarization.DWA`][] for the
    transitions. The state's tree structure, shapes and dtypes never change, so a
    jitted training step does not retrace. Resetting is calling `init` again. A state
    built for another shape raises a `ValueError`.
    """

    @abc.abstractmethod
    def init(self, losses: Float[Array, "*shape"], /) -> State:
        """**Arguments:**

        - `losses`: an example of the losses (only its shape and dtype are read).

        **Returns:**

        The initial state.
        """

    @abc.abstractmethod
    def __call__(
        self,
        losses: Float[Array, "*shape"],
        state: State,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, ""]:
        """**Arguments:**

        - `losses`: the losses, with the shape and dtype given to `init`.
        - `state`: the current state (read, never modified).
        - `key`: ignored; provided for compatibility. (Keyword only argument.)

        **Returns:**

        The scalarized loss, a scalar with the dtype of `losses`.
        """


# ------------------------------------------------------------------------------
# Private helpers shared by the scalarizers.


def check_same_shape(
    array: Shaped[Array, "..."] | None, losses: Shaped[Array, "..."], name: str
) -> None:
    """Raises a `ValueError` if `array` (if given) is not shaped like `losses`."""
    if array is not None and array.shape != losses.shape:
        raise ValueError(
            f"`{name}` has shape {array.shape} but `losses` has shape {losses.shape}; "
            "they must be equal (one entry per loss)."
        )


def check_weights_and_reference(
    weights: Shaped[Array, "..."] | None, reference: Shaped[Array, "..."] | None
) -> None:
    """At construction: `weights` and `reference`, when both given, share a shape."""
    if weights is not None and reference is not None:
        if weights.shape != reference.shape:
            raise ValueError(
                f"`weights` (shape {weights.shape}) and `reference` (shape "
                f"{reference.shape}) must have the same shape as the losses."
            )


def as_losses(losses: Any) -> Float[Array, "*shape"]:
    """The losses as a JAX array (NumPy arrays and lists are accepted), after checking
    that they are real floating numbers."""
    check_floating(losses, "losses")
    return jnp.asarray(losses)


def shifted_losses(
    losses: Float[Array, "*shape"],
    weights: Shaped[Array, "..."] | None,
    reference: Shaped[Array, "..."] | None,
) -> Float[Array, "*shape"]:
    """Checks `losses` against `weights` / `reference` and returns $L - z^*$ (or $L$
    without a reference)."""
    losses = as_losses(losses)
    check_same_shape(weights, losses, "weights")
    check_same_shape(reference, losses, "reference")
    if reference is None:
        return losses
    return losses - constant(reference, losses.dtype)


@overload
def as_float_array(value: None) -> None: ...
@overload
def as_float_array(value: ArrayLike) -> Float[Array, "..."]: ...
def as_float_array(value: ArrayLike | None) -> Float[Array, "..."] | None:
    """Converter for optional per-loss arrays: a floating JAX array (or `None`)."""
    if value is None:
        return None
    array = jnp.asarray(value)
    if jnp.issubdtype(array.dtype, jnp.complexfloating):
        raise ValueError(
            "Per-loss arrays (weights, reference points, lower bounds) must be real; "
            "got a complex array. Pass its real part, e.g. `jnp.real(x)`."
        )
    if not jnp.issubdtype(array.dtype, jnp.inexact):
        array = array.astype(jnp.result_type(float))
    return array


def as_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    """`n -> (n,)`; sequences become tuples of non-negative ints."""
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"`shape` must have non-negative entries; got {shape}.")
    return shape


def constant(value: ArrayLike, dtype: jnp.dtype) -> Array:
    """A hyperparameter cast to the losses' dtype, with its gradient stopped."""
    return lax.stop_gradient(jnp.asarray(value, dtype=dtype))
