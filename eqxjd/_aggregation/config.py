import functools as ft

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._aggregator import AbstractAggregator
from .._checks import check_length, check_matrix
from .._misc import as_vector, nan_unless_finite, pinv
from .._scale import jacobian_exponent, NARROW, promote_half, scale_pow2


_HIGHEST = lax.Precision.HIGHEST


class ConFIG(AbstractAggregator):
    r"""Conflict-Free Inverse Gradients.

    $$b = \hat U^+ p, \quad \hat b = \frac{b}{\max(\|b\|, 10^{-12})}, \quad
    A(J) = \Big(\sum_i g_i^\top \hat b\Big)\, \hat b,$$

    where $\hat U$ holds the unit rows $g_i / \|g_i\|$ (zero rows stay zero) and $p$ is
    the preference vector (default: ones). The direction has equal cosine with every
    row (for $p = \mathbf 1$) and its length is the sum of the rows' projections on it.
    The pseudo-inverse uses TorchJD's cutoff. Not differentiable (gradients are
    stopped). There are no weights, so this is a plain aggregator. Positively
    homogeneous at every scale ($A(cJ) = c\,A(J)$ for $c > 0$); non-finite input gives
    NaN.

    Liu et al., *ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks*, [arXiv:2408.11104](https://arxiv.org/abs/2408.11104), Eq. 2.
    """

    pref_vector: Float[Array, " m"] | None = eqx.field(
        default=None, converter=ft.partial(as_vector, name="pref_vector")
    )

    def __call__(
        self, jacobian: Float[Array, "m n"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " n"]:
        jacobian = check_matrix(jacobian)
        m, n = jacobian.shape
        dtype = jacobian.dtype
        work = promote_half(jacobian)
        if self.pref_vector is None:
            pref = jnp.ones((m,), work.dtype)
        else:
            check_length(self.pref_vector, m, "pref_vector")
            pref = self.pref_vector.astype(work.dtype)
        if m == 0 or n == 0:
            return jnp.zeros((n,), dtype)
        # A(J / 2^k) = A(J) / 2^k: computed on J rescaled by a power of 2 so that the
        # norms neither overflow nor underflow (k = 0 for ordinary Jacobians).
        matrix = lax.stop_gradient(work)
        k = jacobian_exponent([matrix], NARROW)
        matrix = scale_pow2(matrix, -k)
        norms = jnp.linalg.norm(matrix, axis=1)
        units = jnp.nan_to_num(matrix / norms[:, None], nan=0.0)
        direction = jnp.matmul(pinv(units), lax.stop_gradient(pref), precision=_HIGHEST)
        unit = direction / jnp.maximum(jnp.linalg.norm(direction), 1e-12)
        length = jnp.sum(jnp.matmul(matrix, unit, precision=_HIGHEST))
        out = nan_unless_finite(matrix, scale_pow2(length * unit, k))
        return lax.stop_gradient(out.astype(dtype))


ConFIG.__init__.__doc__ = """**Arguments:**

- `pref_vector`: the preference vector $p$, shape `(m,)`; `None` means ones (as
    TorchJD).
"""
