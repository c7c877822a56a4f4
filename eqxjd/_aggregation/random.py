from typing import ClassVar

import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._aggregator import AbstractWeightedAggregator
from .._checks import check_matrix, require_key
from .._scale import work_dtype
from .._weighting import AbstractWeighting, Reads


def random_normals(key: PRNGKeyArray, m: int, dtype: jnp.dtype) -> Float[Array, " m"]:
    """The draws of [`eqxjd.RandomWeighting`][]: $z \\sim \\mathcal N(0, I_m)$."""
    return jr.normal(key, (m,), dtype)


def random_weights(normals: Float[Array, " m"]) -> Float[Array, " m"]:
    """The deterministic core of [`eqxjd.RandomWeighting`][]: `softmax(normals)`.

    Given TorchJD's draws (`torch.randn(m)` after `torch.manual_seed(0)`), this
    reproduces TorchJD's weights.
    """
    if normals.shape[0] == 0:
        return normals
    return jax.nn.softmax(normals)


class RandomWeighting(AbstractWeighting):
    r"""Random positive weights: $w = \operatorname{softmax}(z)$ with
    $z \sim \mathcal N(0, I_m)$ drawn from `key` at every call.

    Reads only the number of rows, so it accepts a Jacobian `(m, n)` or a Gramian
    `(m, m)`. The draws have the dtype of the input. Differentiable (the weights do not
    depend on the input). `key` is required.

    Lin et al., *Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning*, TMLR 2022,
    [arXiv:2111.10603](https://arxiv.org/abs/2111.10603), Algorithm 2.
    """

    reads: ClassVar[Reads] = "rows"
    differentiable: ClassVar[bool] = True

    def __call__(
        self, stat: Float[Array, "m k"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        stat = check_matrix(stat, "stat")
        key = require_key(key, "RandomWeighting")
        # Half precision runs in float32, draws included.
        normals = random_normals(key, stat.shape[0], work_dtype(stat.dtype))
        return random_weights(normals).astype(stat.dtype)


RandomWeighting.__init__.__doc__ = """**Arguments:** none."""


class Random(AbstractWeightedAggregator):
    r"""A random convex combination of the rows: $A(J) = J^\top
    \operatorname{softmax}(z)$, $z \sim \mathcal N(0, I_m)$ drawn from `key`.

    Pass a fresh key at every call (`key` is required). `m = 0` gives `zeros(n)`.

    Lin et al., *Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning*, TMLR 2022,
    [arXiv:2111.10603](https://arxiv.org/abs/2111.10603), Algorithm 2.
    """

    weighting: RandomWeighting = RandomWeighting()


Random.__init__.__doc__ = """**Arguments:** none."""
