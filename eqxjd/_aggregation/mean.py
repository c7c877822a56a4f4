from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._aggregator import AbstractWeightedAggregator
from .._checks import check_matrix
from .._scale import work_dtype
from .._weighting import AbstractWeighting, Reads


class MeanWeighting(AbstractWeighting):
    r"""Uniform weights $w = \frac1m \mathbf 1$. Reads only the number of rows, so it
    accepts a Jacobian `(m, n)` or a Gramian `(m, m)`. With `m = 0` it returns an
    empty vector."""

    reads: ClassVar[Reads] = "rows"
    differentiable: ClassVar[bool] = True

    def __call__(
        self, stat: Float[Array, "m k"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        stat = check_matrix(stat, "stat")
        m = stat.shape[0]
        work = work_dtype(stat.dtype)
        return jnp.full((m,), 1 / max(m, 1), dtype=work).astype(stat.dtype)


class Mean(AbstractWeightedAggregator):
    r"""The mean of the rows, $A(J) = \frac1m J^\top \mathbf 1$ (zeros at `m = 0`)."""

    weighting: MeanWeighting = MeanWeighting()


Mean.__init__.__doc__ = """**Arguments:** none."""
