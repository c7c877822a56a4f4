import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._scale import promote_half
from .base import (
    AbstractScalarizer,
    as_float_array,
    as_losses,
    check_same_shape,
    constant,
)


class Constant(AbstractScalarizer):
    r"""A fixed linear scalarization: $\sum_i w_i L_i$, with weights $w$ given at
    construction (the classic weighted-sum baseline).

    The weights must have exactly the shape of the losses. They are constants: no
    gradient flows into them.
    """

    weights: Float[Array, "*shape"] = eqx.field(converter=as_float_array)

    def __call__(
        self, losses: Float[Array, "*shape"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, ""]:
        losses = as_losses(losses)
        check_same_shape(self.weights, losses, "weights")
        work = promote_half(losses)
        out = jnp.sum(constant(self.weights, work.dtype) * work)
        return out.astype(losses.dtype)


Constant.__init__.__doc__ = """**Arguments:**

- `weights`: the weights $w$, an array with the shape of the losses (usually `(m,)`).
"""
