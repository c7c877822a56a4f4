import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._checks import check_nonnegative
from .._custom_types import ScalarLike
from .._scale import promote_half, root_sum_squares
from .base import (
    AbstractScalarizer,
    as_float_array,
    as_losses,
    check_same_shape,
    constant,
)


_COSINE_EPS = 1e-8


class COSMOS(AbstractScalarizer):
    r"""A linear scalarization penalised by the cosine similarity between the losses and
    the preference vector:

    $$\sum_i r_i L_i - \lambda \cos(r, L), \qquad
    \cos(r, L) = \frac{r^\top L}{\max(\lVert r \rVert, \epsilon)\,
    \max(\lVert L \rVert, \epsilon)},\quad \epsilon = 10^{-8}$$

    (both flattened). The penalty rewards losses aligned with the preference direction,
    which spreads the approximated Pareto front.

    Ruchte & Grabocka, *Scalable Pareto Front Approximation for Deep Multi-Objective
    Learning*, ICDM 2021, [arXiv:2103.13392](https://arxiv.org/abs/2103.13392).

    The full method also conditions the model on $r$ (a modelling choice left to the
    user) and re-samples $r$ from a Dirichlet distribution at every step, e.g.
    `cosmos = eqx.tree_at(lambda s: s.weights, cosmos, jr.dirichlet(key, jnp.ones(m)))`.
    """

    lambda_: ScalarLike
    weights: Float[Array, "*shape"] = eqx.field(converter=as_float_array)

    def __check_init__(self):
        check_nonnegative(self.lambda_, "lambda_")

    def __call__(
        self, losses: Float[Array, "*shape"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, ""]:
        losses = as_losses(losses)
        check_same_shape(self.weights, losses, "weights")
        dtype = losses.dtype
        losses = promote_half(losses)
        r = constant(self.weights, losses.dtype).reshape(-1)
        flat = losses.reshape(-1)
        eps = jnp.asarray(_COSINE_EPS, losses.dtype)
        r_unit = r / jnp.maximum(root_sum_squares(r), eps)
        l_unit = flat / jnp.maximum(root_sum_squares(flat), eps)
        cosine = jnp.sum(r_unit * l_unit)
        out = jnp.sum(r * flat) - constant(self.lambda_, losses.dtype) * cosine
        return out.astype(dtype)


COSMOS.__init__.__doc__ = """**Arguments:**

- `lambda_`: the penalty coefficient $\\lambda \\geq 0$ (`0` gives a plain weighted
    sum). The paper uses values from `0.01` to `8` depending on the dataset.
- `weights`: the preference vector $r$, an array with the shape of the losses.
"""
