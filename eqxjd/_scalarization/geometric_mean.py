import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._scale import promote_half
from .base import AbstractScalarizer, as_losses


class GeometricMean(AbstractScalarizer):
    r"""The geometric mean of the losses, also known as GLS (Geometric Loss Strategy):

    $$\Big(\prod_{i=1}^m L_i\Big)^{1/m} = \exp\Big(\frac1m \sum_i \log L_i\Big).$$

    Chennupati et al., *MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
    Strategy for Multi-Task Learning*, CVPR Workshops 2019,
    [arXiv:1904.08492](https://arxiv.org/abs/1904.08492).

    The losses must be non-negative; a zero loss gives $0$, and empty losses give $0$
    (the rule of every scalarizer but `Mean`). Since this condition depends
    on the values, it is checked with `eqx.error_if`: a negative loss raises
    `eqx.EquinoxRuntimeError`, eagerly as well as under `jax.jit` and `jax.vmap` (set
    `EQX_ON_ERROR=nan` to get NaN instead, or `EQX_ON_ERROR=off` to skip the check).
    """

    def __call__(
        self, losses: Float[Array, "*shape"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, ""]:
        losses = as_losses(losses)
        dtype = losses.dtype
        if losses.size == 0:
            return jnp.zeros((), dtype)
        losses = eqx.error_if(
            losses,
            jnp.any(losses < 0),
            "GeometricMean is only defined for non-negative losses; found a negative "
            "loss.",
        )
        return jnp.exp(jnp.mean(jnp.log(promote_half(losses)))).astype(dtype)


GeometricMean.__init__.__doc__ = """**Arguments:** none."""
