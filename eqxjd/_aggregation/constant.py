import functools as ft
from typing import ClassVar

import equinox as eqx
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._aggregator import AbstractWeightedAggregator
from .._checks import check_length, check_matrix
from .._misc import as_vector
from .._scale import work_dtype
from .._weighting import AbstractWeighting, Reads


class ConstantWeighting(AbstractWeighting):
    r"""Fixed weights $w$, given at construction. Reads only the number of rows, which
    must equal `len(weights)`."""

    reads: ClassVar[Reads] = "rows"
    differentiable: ClassVar[bool] = True

    weights: Float[Array, " m"] = eqx.field(
        converter=ft.partial(as_vector, name="weights")
    )

    def __call__(
        self, stat: Float[Array, "m k"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        stat = check_matrix(stat, "stat")
        check_length(self.weights, stat.shape[0], "weights")
        return self.weights.astype(work_dtype(stat.dtype)).astype(stat.dtype)


ConstantWeighting.__init__.__doc__ = """**Arguments:**

- `weights`: the weights, a 1-D array of shape `(m,)`.
"""


class Constant(AbstractWeightedAggregator):
    r"""A fixed linear combination of the rows: $A(J) = J^\top w$."""

    weighting: ConstantWeighting

    def __init__(self, weights: Float[ArrayLike, " m"]):
        self.weighting = ConstantWeighting(weights)


Constant.__init__.__doc__ = ConstantWeighting.__init__.__doc__
