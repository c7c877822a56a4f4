from typing import ClassVar

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._aggregator import AbstractWeightedAggregator
from .._checks import check_gramian
from .._misc import nan_unless_finite
from .._scale import in_window, promote_half
from .._weighting import AbstractWeighting, Reads


class KrumWeighting(AbstractWeighting):
    r"""The weighting of [`eqxjd.Krum`][]: $1/k$ on the $k$ = `n_selected` rows with
    the lowest Krum scores, $0$ elsewhere.

    With $D_{ij} = \sqrt{\max(G_{ii} + G_{jj} - 2 G_{ij}, 0)}$ and
    $q = m - f - 2$ ($f$ = `n_byzantine`), the score of row $i$ is the sum of its $q$
    smallest distances to the other rows. Ties in the scores go to the lowest index.
    The weights are piecewise constant, so they carry no gradient (as in TorchJD, where
    they come from a one-hot encoding); the aggregation is differentiable in $J$.
    The selection is the same for $c\,G$, $c > 0$, at any scale; non-finite input gives
    NaN weights (a NaN score would otherwise be sorted as the largest).

    Blanchard et al., *Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent*, NeurIPS 2017, [arXiv:1703.02757](https://arxiv.org/abs/1703.02757).
    """

    reads: ClassVar[Reads] = "gramian"
    differentiable: ClassVar[bool] = True

    n_byzantine: int = eqx.field(static=True)
    n_selected: int = eqx.field(default=1, static=True)

    def __check_init__(self):
        if not isinstance(self.n_byzantine, int) or self.n_byzantine < 0:
            raise ValueError(
                f"`n_byzantine` must be a non-negative int; got {self.n_byzantine}."
            )
        if not isinstance(self.n_selected, int) or self.n_selected < 1:
            raise ValueError(
                f"`n_selected` must be a positive int; got {self.n_selected}."
            )

    def __call__(
        self, gramian: Float[Array, "m m"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        gramian = check_gramian(gramian)
        m = gramian.shape[0]
        min_rows = self.n_byzantine + 3
        if m < min_rows:
            raise ValueError(
                f"Krum needs at least {min_rows} rows (n_byzantine + 3); got a "
                f"Jacobian with {m} rows."
            )
        if m < self.n_selected:
            raise ValueError(
                f"Krum needs at least {self.n_selected} rows (n_selected); got a "
                f"Jacobian with {m} rows."
            )
        dtype = gramian.dtype
        # The selection does not change when G is multiplied by a constant: compute
        # it on G rescaled by a power of 4 into a safe range (the identity for
        # ordinary Gramians).
        g = in_window(promote_half(lax.stop_gradient(gramian)))
        norms_squared = jnp.diagonal(g)
        distances_squared = norms_squared[None, :] + norms_squared[:, None] - 2 * g
        distances = jnp.sqrt(jnp.maximum(distances_squared, 0))
        n_closest = m - self.n_byzantine - 2
        smallest = jnp.sort(distances, axis=1)[:, 1 : n_closest + 1]
        scores = jnp.sum(smallest, axis=1)
        selected = jnp.argsort(scores, stable=True)[: self.n_selected]
        counts = jnp.zeros((m,), g.dtype).at[selected].add(1)
        weights = counts / jnp.asarray(self.n_selected, g.dtype)
        return nan_unless_finite(g, weights).astype(dtype)


_ARGS = """**Arguments:**

- `n_byzantine`: the number $f$ of rows that may be adversarial (a static int
    $\\geq 0$). The Jacobian needs at least $f + 3$ rows.
- `n_selected`: the number $k$ of rows averaged (Multi-Krum; a static int
    $\\geq 1$). Default `1`.
"""
KrumWeighting.__init__.__doc__ = _ARGS


class Krum(AbstractWeightedAggregator):
    r"""(Multi-)Krum: the average of the `n_selected` rows that are closest to their
    $m - f - 2$ nearest neighbours.

    $$A(J) = \frac1k \sum_{i \in S} g_i,$$

    where $S$ holds the $k$ rows with the lowest Krum scores (sum of the distances to
    the $m - f - 2$ closest other rows). Robust to up to $f$ = `n_byzantine` adversarial
    rows. See [`eqxjd.KrumWeighting`][].

    Blanchard et al., *Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent*, NeurIPS 2017, [arXiv:1703.02757](https://arxiv.org/abs/1703.02757).
    """

    weighting: KrumWeighting

    def __init__(self, n_byzantine: int, n_selected: int = 1):
        self.weighting = KrumWeighting(n_byzantine, n_selected)


Krum.__init__.__doc__ = _ARGS
