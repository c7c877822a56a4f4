from typing import ClassVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._aggregator import AbstractWeightedAggregator
from .._checks import check_gramian, require_key
from .._misc import nan_unless_finite
from .._scale import in_window, promote_half
from .._weighting import AbstractWeighting, Reads


def pcgrad_permutations(key: PRNGKeyArray, m: int) -> Int[Array, "m m"]:
    """The draws of [`eqxjd.PCGradWeighting`][]: one permutation of `range(m)` per row,
    row `i` from the `i`-th subkey of `jax.random.split(key, m)`."""
    if m == 0:
        return jnp.zeros((0, 0), jnp.int32)
    keys = jr.split(key, m)
    return jax.vmap(lambda k: jr.permutation(k, m))(keys)


# Jitted (inlined under an outer jit) so that eager calls do not re-trace and
# re-compile the loop on every call.
@eqx.filter_jit
def pcgrad_weights(
    gramian: Float[Array, "m m"], permutations: Int[Array, "m m"]
) -> Float[Array, " m"]:
    r"""The deterministic core of [`eqxjd.PCGradWeighting`][], with the projection
    orders given.

    Row `i` of `permutations` is the order in which the projected gradient
    $g_i^{PC}$ is projected against the other rows (entries equal to `i` are skipped).
    With TorchJD's draws (`torch.randperm(m)` once per row, after
    `torch.manual_seed(0)`) it reproduces TorchJD's weights. Not differentiable (the
    caller stops gradients). The weights of $c\,G$ equal those of $G$ for every
    $c > 0$; non-finite input gives NaN weights.
    """
    gramian = check_gramian(gramian)
    m = gramian.shape[0]
    dtype = gramian.dtype
    if permutations.shape != (m, m):
        raise ValueError(
            f"`permutations` must have shape ({m}, {m}); got {permutations.shape}."
        )
    if m == 0:
        return jnp.zeros((0,), dtype)
    # Only ratios of entries of G matter: rescale by a power of 4 into a safe range
    # (the identity for ordinary Gramians); half precision runs in float32.
    gramian = in_window(promote_half(gramian))
    diag = jnp.diagonal(gramian)
    zero = jnp.zeros((), gramian.dtype)

    def one_row(i, order):
        # c holds coefficients: g_i^PC = sum_k c_k g_k.
        def body(k, c):
            j = order[k]
            inner = jnp.dot(
                gramian[j], c, precision=lax.Precision.HIGHEST
            )  # g_j.g_i^PC
            gjj = diag[j]
            safe = jnp.where(gjj == 0, jnp.ones_like(gjj), gjj)
            project = (j != i) & (inner < zero)
            return c.at[j].add(jnp.where(project, -inner / safe, zero))

        c = jnp.zeros((m,), gramian.dtype).at[i].set(1)
        return lax.fori_loop(0, m, body, c)

    coefficients = jax.vmap(one_row)(jnp.arange(m), jnp.asarray(permutations))
    weights = jnp.sum(coefficients, axis=0)
    return nan_unless_finite(gramian, weights).astype(dtype)


class PCGradWeighting(AbstractWeighting):
    r"""The weighting of [`eqxjd.PCGrad`][], computed from the Gramian $G = J J^\top$.

    For every row $i$ (in a random order $\pi_i$ drawn from `key`), the projected
    gradient $g_i^{PC}$ starts at $g_i$ and, for each $j \in \pi_i \setminus \{i\}$, if
    $g_j \cdot g_i^{PC} < 0$, loses its component along $g_j$:
    $g_i^{PC} \leftarrow g_i^{PC} - \frac{g_j \cdot g_i^{PC}}{\|g_j\|^2} g_j$.
    The weights are the coefficients of $\sum_i g_i^{PC}$ (a sum, as TorchJD).

    Not differentiable (gradients through the weights are zero). `key` is required.
    With `m = 2` the result does not depend on the key. `m = 0` gives empty weights.
    The weights of $c\,G$ equal those of $G$ for every $c > 0$, however large or
    small; non-finite input gives NaN weights.

    Yu et al., *Gradient Surgery for Multi-Task Learning*, NeurIPS 2020,
    [arXiv:2001.06782](https://arxiv.org/abs/2001.06782), Algorithm 1.
    """

    reads: ClassVar[Reads] = "gramian"

    differentiable: ClassVar[bool] = False

    def __call__(
        self, gramian: Float[Array, "m m"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        gramian = check_gramian(gramian)
        key = require_key(key, "PCGrad")
        permutations = pcgrad_permutations(key, gramian.shape[0])
        return lax.stop_gradient(pcgrad_weights(gramian, permutations))


PCGradWeighting.__init__.__doc__ = """**Arguments:** none."""


class PCGrad(AbstractWeightedAggregator):
    r"""Projecting Conflicting Gradients.

    $$A(J) = \sum_i g_i^{PC},$$

    where $g_i^{PC}$ is row $g_i$ successively projected, in a random order drawn from
    `key`, onto the normal plane of every other row it conflicts with (see
    [`eqxjd.PCGradWeighting`][]). Computed from the Gramian only. Not differentiable.
    `key` is required; with two objectives the result does not depend on it (and then
    equals UPGrad with unit preferences, up to its normalisation). `m = 0` gives
    `zeros(n)`.

    Yu et al., *Gradient Surgery for Multi-Task Learning*, NeurIPS 2020,
    [arXiv:2001.06782](https://arxiv.org/abs/2001.06782), Algorithm 1.
    """

    weighting: PCGradWeighting = PCGradWeighting()


PCGrad.__init__.__doc__ = """**Arguments:** none."""
