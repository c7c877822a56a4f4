import functools as ft
from typing import ClassVar, Literal

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._aggregator import AbstractWeightedAggregator
from .._checks import check_gramian
from .._misc import as_vector, nan_unless_finite, pref_weights
from .._scale import in_window, promote_half
from .._weighting import AbstractWeighting, Reads


_HIGHEST = lax.Precision.HIGHEST
_SCALE_MODES = ("min", "median", "rmse")


def _balance_transformation(
    gramian: Float[Array, "m m"], scale_mode: str
) -> Float[Array, "m m"]:
    r"""$B = \sqrt{s}\, V_r \Lambda_r^{-1/2} V_r^\top$ (identity when the rank is 0).

    Values follow TorchJD (eigenvalues above `max(lambda) * m * eps` are kept; the
    scale is the smallest kept one, their lower median or their mean). Derivatives are
    the exact first-order ones of this spectral function (Daleckii–Krein), added with a
    zero-valued linearisation around the eigen-decomposition of the stopped Gramian: so
    they stay finite when eigenvalues repeat (rank-deficient Gramians), where
    differentiating `eigh` directly gives NaN.
    """
    m = gramian.shape[0]
    dtype = gramian.dtype
    eps = jnp.finfo(dtype).eps
    g0 = lax.stop_gradient(gramian)
    lam, vec = jnp.linalg.eigh(g0, symmetrize_input=True)  # ascending
    tol = jnp.max(lam) * m * eps
    keep = lam > tol
    rank = jnp.sum(keep)
    safe_lam = jnp.where(keep, lam, jnp.ones_like(lam))
    f = jnp.where(keep, 1 / jnp.sqrt(safe_lam), jnp.zeros_like(lam))
    fprime = jnp.where(keep, -0.5 * f / safe_lam, jnp.zeros_like(lam))

    # First-order perturbation: value 0, derivative V^T dG V.
    delta = gramian - g0
    dmat = jnp.matmul(
        jnp.matmul(vec.T, delta, precision=_HIGHEST), vec, precision=_HIGHEST
    )
    lam_lin = lam + jnp.diagonal(dmat)
    diff = lam[:, None] - lam[None, :]
    same = diff == 0
    safe_diff = jnp.where(same, jnp.ones_like(diff), diff)
    divided = jnp.where(
        same,
        0.5 * (fprime[:, None] + fprime[None, :]),
        (f[:, None] - f[None, :]) / safe_diff,
    )
    inner = jnp.diag(f) + divided * dmat
    transform = jnp.matmul(
        jnp.matmul(vec, inner, precision=_HIGHEST), vec.T, precision=_HIGHEST
    )

    safe_rank = jnp.maximum(rank, 1)
    lowest_kept = (
        m - safe_rank
    )  # index (ascending order) of the smallest kept eigenvalue
    if scale_mode == "min":
        scale = lam_lin[lowest_kept]
    elif scale_mode == "median":
        scale = lam_lin[lowest_kept + (safe_rank - 1) // 2]
    else:  # "rmse"
        kept_sum = jnp.sum(jnp.where(keep, lam_lin, jnp.zeros_like(lam_lin)))
        scale = kept_sum / safe_rank.astype(dtype)
    safe_scale = jnp.where(rank > 0, scale, jnp.ones_like(scale))
    balance = jnp.sqrt(safe_scale) * transform
    return jnp.where(rank > 0, balance, jnp.eye(m, dtype=dtype))


class AlignedMTLWeighting(AbstractWeighting):
    r"""The weighting of [`eqxjd.AlignedMTL`][]: $w = B p$ with the balance
    transformation $B = \sqrt{s}\, V_r \Lambda_r^{-1/2} V_r^\top$.

    $(\Lambda_r, V_r)$ are the eigenpairs of $G$ whose eigenvalue exceeds
    $\lambda_{\max} \cdot m \cdot \varepsilon$ (TorchJD's cutoff, with the machine
    epsilon of the input dtype); $B = I$ when there are none. $s$ is the smallest kept
    eigenvalue (`"min"`), their lower median (`"median"`, as `torch.median`) or their
    mean (`"rmse"`, the original implementation). Differentiable, with finite
    derivatives even for rank-deficient Gramians. The weights of $c\,G$ equal those of
    $G$ for every $c > 0$, however large or small; non-finite input gives NaN weights.

    Senushkin et al., *Independent Component Alignment for Multi-Task Learning*, CVPR
    2023, [arXiv:2305.19000](https://arxiv.org/abs/2305.19000), Algorithm 1.
    """

    reads: ClassVar[Reads] = "gramian"
    differentiable: ClassVar[bool] = True

    pref_vector: Float[Array, " m"] | None = eqx.field(
        default=None, converter=ft.partial(as_vector, name="pref_vector")
    )
    scale_mode: Literal["min", "median", "rmse"] = eqx.field(default="min", static=True)

    def __check_init__(self):
        if self.scale_mode not in _SCALE_MODES:
            raise ValueError(
                f"Invalid scale_mode={self.scale_mode!r}. Expected 'min', 'median', or "
                "'rmse'."
            )

    def __call__(
        self, gramian: Float[Array, "m m"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        gramian = check_gramian(gramian)
        m = gramian.shape[0]
        dtype = gramian.dtype
        # B p does not change when G is multiplied by a constant: compute it on G
        # rescaled by a power of 4 into a safe range (the identity for ordinary
        # Gramians), in float32 for half precision.
        g = in_window(promote_half(gramian))
        pref = pref_weights(self.pref_vector, m, g.dtype)
        if m == 0:
            return pref.astype(dtype)
        balance = _balance_transformation(g, self.scale_mode)
        weights = jnp.matmul(balance, pref, precision=_HIGHEST)
        return nan_unless_finite(g, weights).astype(dtype)


_ARGS = """**Arguments:**

- `pref_vector`: the preference vector $p$, shape `(m,)`; `None` means $1/m$ each.
- `scale_mode`: `"min"` (default), `"median"` or `"rmse"`: which statistic of the kept
    eigenvalues scales the balance transformation. Any other value raises `ValueError`
    at construction.
"""
AlignedMTLWeighting.__init__.__doc__ = _ARGS


class AlignedMTL(AbstractWeightedAggregator):
    r"""Aligned Multi-Task Learning.

    $$A(J) = J^\top B p, \qquad B = \sqrt{s}\, V_r \Lambda_r^{-1/2} V_r^\top,$$

    where $G = J J^\top = V \Lambda V^\top$: the balance transformation $B$ makes the
    singular values of the aggregated Jacobian equal (to $\sqrt s$), aligning the
    objectives' contributions. See [`eqxjd.AlignedMTLWeighting`][].

    Senushkin et al., *Independent Component Alignment for Multi-Task Learning*, CVPR
    2023, [arXiv:2305.19000](https://arxiv.org/abs/2305.19000).
    """

    weighting: AlignedMTLWeighting

    def __init__(
        self,
        pref_vector: Float[ArrayLike, " m"] | None = None,
        scale_mode: Literal["min", "median", "rmse"] = "min",
    ):
        self.weighting = AlignedMTLWeighting(pref_vector, scale_mode)


AlignedMTL.__init__.__doc__ = _ARGS
