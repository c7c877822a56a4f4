import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._checks import check_floating
from .base import AbstractScalarizer


class Mean(AbstractScalarizer):
    r"""The mean of the losses: $\frac1m \sum_i L_i$ (over all entries, for any shape).

    An empty input gives NaN, as in TorchJD.
    """

    def __call__(
        self, losses: Float[Array, "*shape"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, ""]:
        check_floating(losses, "losses")
        return jnp.mean(losses)


Mean.__init__.__doc__ = """**Arguments:** none."""
