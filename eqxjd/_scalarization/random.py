import jax.lax as lax
import jax.nn as jnn
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._scale import promote_half, work_dtype
from .base import AbstractScalarizer, as_losses


def scalarize_with_normals(
    losses: Float[Array, "*shape"], normals: Float[Array, " k"]
) -> Float[Array, ""]:
    """The deterministic core of [`eqxjd.scalarization.Random`][]: the draws
    $z \\sim \\mathcal N(0, I)$ (one per entry of `losses`, flattened) are injected."""
    losses = as_losses(losses)
    if normals.shape != (losses.size,):
        raise ValueError(
            f"`normals` must have shape ({losses.size},) (one draw per loss); "
            f"got {normals.shape}."
        )
    work = promote_half(losses)
    weights = jnn.softmax(jnp.asarray(normals).astype(work.dtype)).reshape(work.shape)
    return jnp.sum(lax.stop_gradient(weights) * work).astype(losses.dtype)


class Random(AbstractScalarizer):
    r"""Random positive weights summing to one, redrawn at every call:

    $$\sum_i \operatorname{softmax}(z)_i L_i, \qquad z \sim \mathcal N(0, I_m).$$

    Lin et al., *Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning*, TMLR 2022 (Algorithm 2),
    [arXiv:2111.10603](https://arxiv.org/abs/2111.10603).

    Unlike TorchJD, which draws from PyTorch's global generator, the draws come from the
    keyword-only `key`, which is required (a missing key raises `ValueError`). The same
    key gives the same weights.

    !!! Example

        ```python
        loss = eqxjd.scalarization.Random()(losses, key=jr.key(0))
        ```
    """

    def __call__(
        self, losses: Float[Array, "*shape"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, ""]:
        losses = as_losses(losses)
        if key is None:
            raise ValueError(
                "`Random` draws random weights: pass a key, e.g. "
                "`scalarizer(losses, key=jax.random.key(0))`."
            )
        # Half precision runs in float32, draws included.
        normals = jr.normal(key, (losses.size,), work_dtype(losses.dtype))
        return scalarize_with_normals(losses, normals)


Random.__init__.__doc__ = """**Arguments:** none."""
