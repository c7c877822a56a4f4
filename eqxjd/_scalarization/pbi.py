import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._checks import check_nonnegative
from .._custom_types import ScalarLike
from .._scale import promote_half, root_sum_squares
from .base import (
    AbstractScalarizer,
    as_float_array,
    check_weights_and_reference,
    constant,
    shifted_losses,
)


_EPSILON = 1e-12


class PBI(AbstractScalarizer):
    r"""Penalty-based Boundary Intersection: with $f = L - z^*$ (flattened) and the
    preference direction $\hat w = w / \lVert w \rVert$,

    $$d_1 = f^\top \hat w, \qquad d_2 = \sqrt{\lVert f - d_1 \hat w \rVert^2 +
    10^{-12}}, \qquad \mathrm{PBI}(L) = d_1 + \theta d_2.$$

    $d_1$ is the progress along the preference direction and $d_2$ the distance to it.
    The $10^{-12}$ (as in TorchJD) keeps the gradient finite when $f$ lies on the
    direction (always the case for a single loss).

    Zhang & Li, *MOEA/D: A Multiobjective Evolutionary Algorithm Based on
    Decomposition*, IEEE Transactions on Evolutionary Computation 11(6), 2007,
    [doi:10.1109/TEVC.2007.892759](https://doi.org/10.1109/TEVC.2007.892759).
    """

    theta: ScalarLike
    weights: Float[Array, "*shape"] = eqx.field(converter=as_float_array)
    reference: Float[Array, "*shape"] | None = eqx.field(
        default=None, converter=as_float_array
    )

    def __check_init__(self):
        check_nonnegative(self.theta, "theta")
        check_weights_and_reference(self.weights, self.reference)

    def __call__(
        self, losses: Float[Array, "*shape"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, ""]:
        f = shifted_losses(losses, self.weights, self.reference)
        dtype = f.dtype
        if f.size == 0:
            return jnp.zeros((), dtype)
        f = promote_half(f).reshape(-1)
        work = f.dtype
        direction = constant(self.weights, work).reshape(-1)
        direction = direction / root_sum_squares(direction)
        d1 = jnp.sum(f * direction)
        perpendicular = f - d1 * direction
        eps = jnp.asarray(_EPSILON, work)
        d2 = root_sum_squares(perpendicular, eps)
        return (d1 + constant(self.theta, work) * d2).astype(dtype)


PBI.__init__.__doc__ = """**Arguments:**

- `theta`: the penalty $\\theta \\geq 0$ on the perpendicular distance (`0` gives the
    projection onto the preference direction). The paper uses `5`.
- `weights`: the preference vector $w$ (non-negative entries expected), an array with
    the shape of the losses.
- `reference`: the ideal point $z^*$ (a lower bound on the losses), an array with the
    shape of the losses; `None` (default) means the origin.
"""
