from typing import ClassVar

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._aggregator import AbstractWeightedAggregator
from .._checks import check_gramian
from .._misc import nan_unless_finite
from .._scale import in_window, promote_half
from .._weighting import AbstractWeighting, Reads


_HIGHEST = lax.Precision.HIGHEST


def _imtlg_weights(gramian: Float[Array, "m m"]) -> Float[Array, " m"]:
    m = gramian.shape[0]
    dtype = gramian.dtype
    eps = jnp.finfo(dtype).eps
    delta = jnp.sqrt(jnp.diagonal(gramian))
    # pinv(G) @ delta by SVD, TorchJD's cutoff (rtol = m * eps relative to sigma_max).
    u, s, vt = jnp.linalg.svd(gramian, full_matrices=False)
    cutoff = m * eps * s[0]
    keep = s > cutoff
    s_inv = jnp.where(keep, 1 / jnp.where(keep, s, jnp.ones_like(s)), jnp.zeros_like(s))
    coefficients = s_inv * jnp.matmul(u.T, delta, precision=_HIGHEST)
    v = jnp.matmul(vt.T, coefficients, precision=_HIGHEST)
    total = jnp.sum(v)
    # TorchJD treats |sum| < 1e-12 as zero. That absolute threshold misses pure rounding
    # noise (float32 [[1, 0], [-1, 0]] gives sum ~ 1.5e-8 and weights [-1, 2]); we also
    # treat the sum as zero when it is below the rounding level of pinv(G) @ delta.
    s_min_kept = jnp.min(jnp.where(keep, s, jnp.full_like(s, jnp.inf)))
    safe_s_min = jnp.where(
        jnp.isfinite(s_min_kept), s_min_kept, jnp.ones_like(s_min_kept)
    )
    noise = (
        8
        * m
        * eps
        * jnp.sqrt(jnp.asarray(m, dtype))
        * jnp.linalg.norm(delta)
        / safe_s_min
    )
    zero = (jnp.abs(total) < 1e-12) | (jnp.abs(total) <= noise)
    safe_total = jnp.where(zero, jnp.ones_like(total), total)
    return jnp.where(zero, jnp.zeros_like(v), v / safe_total)


class IMTLGWeighting(AbstractWeighting):
    r"""The weighting of [`eqxjd.IMTLG`][]: $w = v / \mathbf 1^\top v$ with
    $v = G^+ \delta$, $\delta_i = \sqrt{G_{ii}}$ (zero when $\mathbf 1^\top v$
    vanishes).

    The pseudo-inverse uses TorchJD's cutoff ($m \varepsilon \sigma_{\max}$). TorchJD
    treats $|\mathbf 1^\top v| < 10^{-12}$ as zero; eqxjd additionally treats it as zero
    when it is below the rounding level of $G^+ \delta$
    ($8 m \sqrt m\, \varepsilon \|\delta\| / \sigma_{\min}^{\text{kept}}$), which fixes
    float32 anti-parallel rows (TorchJD returns $d = [-3, 0]$ for
    $J = [[1, 0], [-1, 0]]$ in float32; eqxjd returns $0$ as in float64). Zero
    Gramians give zero weights. Not differentiable (gradients are stopped).

    The weights of $c\,G$ equal those of $G$ for every $c > 0$: eqxjd applies the
    $10^{-12}$ test to $G$ rescaled by a power of 4 into $[2^{-40}, 2^{40}]$ (trace),
    whereas TorchJD's weights vanish for very large Gramians (trace $\gtrsim 10^{24}$,
    where $\mathbf 1^\top v$ falls below $10^{-12}$). Non-finite input gives NaN
    weights.

    Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021; generalised to
    linearly dependent rows in Quinton & Rey,
    [arXiv:2406.16232](https://arxiv.org/abs/2406.16232).
    """

    reads: ClassVar[Reads] = "gramian"

    differentiable: ClassVar[bool] = False

    def __call__(
        self, gramian: Float[Array, "m m"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        gramian = check_gramian(gramian)
        dtype = gramian.dtype
        if gramian.shape[0] == 0:
            return jnp.zeros((0,), dtype)
        # The weights do not change when G is multiplied by a constant: compute them
        # on G rescaled by a power of 4 into a safe range (the identity for ordinary
        # Gramians), in float32 for half precision.
        g = in_window(promote_half(lax.stop_gradient(gramian)))
        weights = nan_unless_finite(g, _imtlg_weights(g))
        return lax.stop_gradient(weights.astype(dtype))


IMTLGWeighting.__init__.__doc__ = """**Arguments:** none."""


class IMTLG(AbstractWeightedAggregator):
    r"""Impartial Multi-Task Learning (gradient balancing), generalised.

    $$A(J) = J^\top w, \qquad w = \frac{G^+ \delta}{\mathbf 1^\top G^+ \delta},
    \quad \delta_i = \|g_i\|,$$

    the direction whose projections onto every unit row direction are equal. See
    [`eqxjd.IMTLGWeighting`][] for the degenerate cases.

    Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021; Quinton & Rey,
    *Jacobian Descent for Multi-Objective Optimization*,
    [arXiv:2406.16232](https://arxiv.org/abs/2406.16232).
    """

    weighting: IMTLGWeighting

    def __init__(self):
        self.weighting = IMTLGWeighting()


IMTLG.__init__.__doc__ = """**Arguments:** none."""
