import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._scale import promote_half
from .base import AbstractScalarizer, as_losses


class Mean(AbstractScalarizer):
    r"""The mean of the losses: $\frac1m \sum_i L_i$ (over all entries, for any shape).

    An empty input gives NaN, as in TorchJD.
    """

    def __call__(
        self, losses: Float[Array, "*shape"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, ""]:
        losses = as_losses(losses)
        return jnp.mean(promote_half(losses)).astype(losses.dtype)


Mean.__init__.__doc__ = """**Arguments:** none."""
