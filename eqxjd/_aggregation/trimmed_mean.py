import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._aggregator import AbstractAggregator
from .._checks import check_matrix
from .._scale import promote_half


class TrimmedMean(AbstractAggregator):
    r"""Coordinate-wise trimmed mean.

    Each column of $J$ is sorted, its `trim_number` smallest and `trim_number` largest
    entries are dropped, and the remaining $m - 2t$ entries are averaged. Robust to up
    to $t$ adversarial rows. Differentiable (almost everywhere). There are no weights,
    so this is a plain aggregator.

    Non-finite entries are sorted like any other: NaN after $+\infty$, as in TorchJD.
    So up to $t$ NaN (or infinite) entries of a column are trimmed away and do not
    reach the output; more give NaN (or $\pm\infty$) in that coordinate only.

    Yin et al., *Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates*, ICML 2018, [arXiv:1803.01498](https://arxiv.org/abs/1803.01498).
    """

    trim_number: int = eqx.field(static=True)

    def __check_init__(self):
        if not isinstance(self.trim_number, int) or self.trim_number < 0:
            raise ValueError(
                f"`trim_number` must be a non-negative int; got {self.trim_number}."
            )

    def __call__(
        self, jacobian: Float[Array, "m n"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " n"]:
        jacobian = check_matrix(jacobian)
        m = jacobian.shape[0]
        min_rows = 2 * self.trim_number + 1
        if m < min_rows:
            raise ValueError(
                f"TrimmedMean needs a Jacobian of at least {min_rows} rows "
                f"(2 * trim_number + 1); got shape {jacobian.shape}."
            )
        ordered = jnp.sort(promote_half(jacobian), axis=0)
        kept = ordered[self.trim_number : m - self.trim_number]
        return jnp.mean(kept, axis=0).astype(jacobian.dtype)


TrimmedMean.__init__.__doc__ = """**Arguments:**

- `trim_number`: the number $t$ of smallest and of largest entries dropped from each
    column (a static int $\\geq 0$; $2t$ entries are dropped in all). The Jacobian needs
    at least $2t + 1$ rows.
"""
