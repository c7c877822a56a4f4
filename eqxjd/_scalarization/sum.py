import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._scale import promote_half
from .base import AbstractScalarizer, as_losses


class Sum(AbstractScalarizer):
    r"""The sum of the losses: $\sum_i L_i$ (over all entries, for any shape)."""

    def __call__(
        self, losses: Float[Array, "*shape"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, ""]:
        losses = as_losses(losses)
        return jnp.sum(promote_half(losses)).astype(losses.dtype)


Sum.__init__.__doc__ = """**Arguments:** none."""
