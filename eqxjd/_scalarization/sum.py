import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._checks import check_floating
from .base import AbstractScalarizer


class Sum(AbstractScalarizer):
    r"""The sum of the losses: $\sum_i L_i$ (over all entries, for any shape)."""

    def __call__(
        self, losses: Float[Array, "*shape"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, ""]:
        check_floating(losses, "losses")
        return jnp.sum(losses)


Sum.__init__.__doc__ = """**Arguments:** none."""
