from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._aggregator import AbstractWeightedAggregator
from .._checks import check_matrix
from .._weighting import AbstractWeighting, Reads


class SumWeighting(AbstractWeighting):
    r"""Unit weights $w = \mathbf 1$. Reads only the number of rows."""

    reads: ClassVar[Reads] = "rows"
    differentiable: ClassVar[bool] = True

    def __call__(
        self, stat: Float[Array, "m k"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        stat = check_matrix(stat, "stat")
        return jnp.ones((stat.shape[0],), dtype=stat.dtype)


class Sum(AbstractWeightedAggregator):
    r"""The sum of the rows: $A(J) = J^\top \mathbf 1$."""

    weighting: SumWeighting = SumWeighting()


Sum.__init__.__doc__ = """**Arguments:** none."""
