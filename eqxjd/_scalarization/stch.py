import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._checks import check_positive
from .._custom_types import ScalarLike
from .._scale import promote_half
from .base import (
    AbstractScalarizer,
    as_float_array,
    check_weights_and_reference,
    constant,
    shifted_losses,
)


@jax.custom_jvp
def _deviation(y: Float[Array, " m"]) -> Float[Array, " m"]:
    """`y - y`: zero, with the derivative of `y` (first and higher order)."""
    return jnp.zeros_like(y)


@_deviation.defjvp
def _deviation_jvp(primals, tangents):
    (y,), (dy,) = primals, tangents
    return _deviation(y), dy


class STCH(AbstractScalarizer):
    r"""Smooth Tchebycheff scalarization:

    $$\mu \log \sum_{i=1}^m \exp\Big(\frac{\lambda_i (L_i - z^*_i)}{\mu}\Big),$$

    a smooth approximation of the weighted maximum $\max_i \lambda_i (L_i - z^*_i)$,
    tighter as $\mu \to 0$. It is evaluated stably as
    $\mu \log \sum_i \exp((y_i - \max_k y_k)/\mu) + \max_k y_k$ with
    $y = \lambda \odot (L - z^*)$.

    Lin et al., *Smooth Tchebycheff Scalarization for Multi-Objective Optimization*,
    ICML 2024, [arXiv:2402.19078](https://arxiv.org/abs/2402.19078).
    """

    mu: ScalarLike
    weights: Float[Array, "*shape"] | None = eqx.field(
        default=None, converter=as_float_array
    )
    reference: Float[Array, "*shape"] | None = eqx.field(
        default=None, converter=as_float_array
    )

    def __check_init__(self):
        check_positive(self.mu, "mu")
        check_weights_and_reference(self.weights, self.reference)

    def __call__(
        self, losses: Float[Array, "*shape"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, ""]:
        shifted = shifted_losses(losses, self.weights, self.reference)
        out_dtype = shifted.dtype
        if shifted.size == 0:
            return jnp.zeros((), out_dtype)
        shifted = promote_half(shifted)
        dtype = shifted.dtype
        if self.weights is None:
            weights = jnp.full(shifted.shape, 1 / max(shifted.size, 1), dtype)
        else:
            weights = constant(self.weights, dtype)
        y = (weights * shifted).reshape(-1)
        mu = constant(self.mu, dtype)
        # The shift by max(y) is value-preserving (paper, Appendix B.1); stopping its
        # gradient makes the derivative exactly softmax(y / mu) * weights, even at ties.
        max_y = lax.stop_gradient(jnp.max(y))
        # The largest entries get exactly 0 (with the derivative of (y - max_y) / mu):
        # under jit XLA may fuse the product that made y into `y - max_y` (a fused
        # multiply-add, without the rounding of y), and rounding noise / mu would
        # overflow or underflow exp for large losses. The other entries stay < 0.
        exponents = jnp.where(y == max_y, _deviation(y) / mu, (y - max_y) / mu)
        out = mu * jnp.log(jnp.sum(jnp.exp(exponents))) + max_y
        return out.astype(out_dtype)


STCH.__init__.__doc__ = """**Arguments:**

- `mu`: the smoothing parameter $\\mu > 0$; smaller is closer to the maximum. The
    paper evaluates $\\mu \\in \\{0.01, 0.1, 0.5, 1\\}$.
- `weights`: the preference vector $\\lambda$, an array with the shape of the losses;
    `None` (default) means $1/m$ each.
- `reference`: the ideal point $z^*$, an array with the shape of the losses; `None`
    (default) means no shift.
"""
