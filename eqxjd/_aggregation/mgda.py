from typing import ClassVar

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._aggregator import AbstractWeightedAggregator
from .._checks import check_gramian
from .._custom_types import ScalarLike
from .._misc import nan_unless_finite
from .._scale import in_window, promote_half
from .._weighting import AbstractWeighting, Reads


_HIGHEST = lax.Precision.HIGHEST


# Jitted (inlined under an outer jit) so that eager calls do not re-trace and
# re-compile the loop on every call.
@eqx.filter_jit
def _frank_wolfe(
    gramian: Float[Array, "m m"], epsilon: Float[Array, ""], max_iters: int
) -> Float[Array, " m"]:
    """TorchJD's Frank-Wolfe loop, step for step (same argmin, gamma rules, stop test).

    Written as a `lax.scan` over the static `max_iters` with a `done` flag, so that it
    is differentiable in both forward and reverse mode (as TorchJD's unrolled loop is);
    once the stopping test fires the iterate is frozen.
    """
    m = gramian.shape[0]
    dtype = gramian.dtype
    alpha0 = jnp.ones((m,), dtype) / jnp.asarray(m, dtype)
    one = jnp.ones((), dtype)
    zero = jnp.zeros((), dtype)

    def step(carry, _):
        alpha, done = carry
        g_alpha = jnp.matmul(gramian, alpha, precision=_HIGHEST)
        t = jnp.argmin(g_alpha)
        e_t = jnp.zeros((m,), dtype).at[t].set(1)
        a = jnp.dot(alpha, gramian[:, t], precision=_HIGHEST)
        b = jnp.dot(alpha, g_alpha, precision=_HIGHEST)
        c = gramian[t, t]
        interior = (c > a) & (b > a)
        denom = jnp.where(interior, b + c - 2 * a, one)
        gamma = jnp.where(c <= a, one, jnp.where(b <= a, zero, (b - a) / denom))
        new_alpha = (1 - gamma) * alpha + gamma * e_t
        alpha = jnp.where(done, alpha, new_alpha)
        done = done | (gamma < epsilon)
        return (alpha, done), None

    (alpha, _), _ = lax.scan(step, (alpha0, jnp.array(False)), None, length=max_iters)
    return alpha


class MGDAWeighting(AbstractWeighting):
    r"""The weighting of [`eqxjd.MGDA`][]: an approximation of
    $\operatorname{argmin}_{w \in \Delta} w^\top G w$ by Frank–Wolfe.

    Starting from $\alpha = \frac1m \mathbf 1$, each step picks
    $t = \operatorname{argmin}_i (G\alpha)_i$ and moves to
    $(1 - \gamma)\alpha + \gamma e_t$ with the exact line-search step $\gamma$; the loop
    stops when $\gamma <$ `epsilon` or after `max_iters` steps. This is TorchJD's loop,
    step for step (same tie and step rules), so the weights agree to rounding.
    Differentiable (through the unrolled loop, as in TorchJD). The weights of $c\,G$
    equal those of $G$ for every $c > 0$, however large or small; non-finite input
    gives NaN weights.

    Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*, NeurIPS 2018,
    [arXiv:1810.04650](https://arxiv.org/abs/1810.04650), Algorithm 2.
    """

    reads: ClassVar[Reads] = "gramian"
    differentiable: ClassVar[bool] = True

    epsilon: ScalarLike = 1e-3
    max_iters: int = eqx.field(default=100, static=True)

    def __check_init__(self):
        if isinstance(self.epsilon, (int, float)) and self.epsilon <= 0:
            raise ValueError(f"`epsilon` must be positive; got {self.epsilon}.")
        if not isinstance(self.max_iters, int) or self.max_iters <= 0:
            raise ValueError(
                f"`max_iters` must be a positive int; got {self.max_iters}."
            )

    def __call__(
        self, gramian: Float[Array, "m m"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        gramian = check_gramian(gramian)
        dtype = gramian.dtype
        if gramian.shape[0] == 0:
            return jnp.zeros((0,), dtype)
        # The weights do not change when G is multiplied by a constant: compute them
        # on G rescaled by a power of 4 into a safe range (the identity for ordinary
        # Gramians).
        g = in_window(promote_half(gramian))
        epsilon = jnp.asarray(self.epsilon, g.dtype)
        weights = _frank_wolfe(g, epsilon, self.max_iters)
        return nan_unless_finite(g, weights).astype(dtype)


_ARGS = """**Arguments:**

- `epsilon`: the loop stops once the Frank–Wolfe step $\\gamma$ falls below it. Must be
    positive. Default `1e-3`.
- `max_iters`: the maximum number of Frank–Wolfe steps (a static int). Default `100`.
"""
MGDAWeighting.__init__.__doc__ = _ARGS


class MGDA(AbstractWeightedAggregator):
    r"""Multiple-Gradient Descent Algorithm.

    $$A(J) = J^\top w, \qquad w \approx \operatorname{argmin}_{w \in \Delta}
    \|J^\top w\|^2,$$

    the (approximate) minimum-norm element of the convex hull of the rows, computed by
    Frank–Wolfe on the Gramian exactly as TorchJD does (see [`eqxjd.MGDAWeighting`][]).

    Désidéri, *Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization*, Comptes Rendus Mathématique 350, 2012; Sener & Koltun, *Multi-Task
    Learning as Multi-Objective Optimization*, NeurIPS 2018,
    [arXiv:1810.04650](https://arxiv.org/abs/1810.04650).
    """

    weighting: MGDAWeighting

    def __init__(self, epsilon: ScalarLike = 1e-3, max_iters: int = 100):
        self.weighting = MGDAWeighting(epsilon, max_iters)


MGDA.__init__.__doc__ = _ARGS
