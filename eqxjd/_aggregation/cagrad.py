from typing import ClassVar

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .._aggregator import AbstractWeightedAggregator
from .._checks import check_gramian, check_nonnegative
from .._custom_types import ScalarLike
from .._misc import nan_unless_finite, normalize, solve_dtype
from .._weighting import AbstractWeighting, Reads


_HIGHEST = lax.Precision.HIGHEST


def _mv(a: Array, x: Array) -> Array:
    return jnp.matmul(a, x, precision=_HIGHEST)


def _quad(
    a: Float[Array, "m m"], x: Float[Array, " m"], y: Float[Array, " m"]
) -> Array:
    return jnp.dot(x, _mv(a, y), precision=_HIGHEST)


def _bordered(
    a: Float[Array, "m m"], free: Bool[Array, " m"]
) -> Float[Array, "m+1 m+1"]:
    """The KKT matrix of `min 1/2 w^T A w + q^T w` s.t. `sum(w) = 1` and `w_i = 0`
    off `free`."""
    m = a.shape[0]
    dtype = a.dtype
    both = free[:, None] & free[None, :]
    block = jnp.where(both, a, jnp.zeros_like(a))
    block = block + jnp.diag(
        jnp.where(free, jnp.zeros((m,), dtype), jnp.ones((m,), dtype))
    )
    ones = jnp.where(free, jnp.ones((m,), dtype), jnp.zeros((m,), dtype))
    top = jnp.concatenate([block, -ones[:, None]], axis=1)
    bottom = jnp.concatenate([ones, jnp.zeros((1,), dtype)])[None, :]
    return jnp.concatenate([top, bottom], axis=0)


def _subspace_solve(
    a: Float[Array, "m m"], q: Float[Array, " m"], free: Bool[Array, " m"], total: Array
) -> tuple[Float[Array, " m"], Float[Array, ""]]:
    """Minimiser of `1/2 w^T A w + q^T w` s.t. `sum(w) = total`, `w_i = 0` off `free`,
    and the multiplier of the sum constraint."""
    kkt = _bordered(a, free)
    rhs = jnp.concatenate([jnp.where(free, -q, jnp.zeros_like(q)), total[None]])
    solution = jnp.linalg.solve(kkt, rhs)
    return solution[:-1], solution[-1]


def _simplex_qp(
    a: Float[Array, "m m"], q: Float[Array, " m"], start: Float[Array, " m"]
) -> Float[Array, " m"]:
    r"""Exact $\operatorname{argmin}_{w \in \Delta} \frac12 w^\top A w + q^\top w$ for a
    positive definite $A$: a primal active-set method (Lawson–Hanson style) with masked
    bordered-KKT solves, warm-started from the feasible point `start`."""
    m = a.shape[0]
    dtype = a.dtype
    eps = jnp.finfo(dtype).eps
    one = jnp.ones((), dtype)
    inf = jnp.full((m,), jnp.inf, dtype)
    tol = 256 * eps * (jnp.max(jnp.abs(jnp.diagonal(a))) + jnp.max(jnp.abs(q)))
    max_steps = 4 * m + 20

    def cond(carry):
        _, _, step, done = carry
        return (~done) & (step < max_steps)

    def body(carry):
        w, free, step, _ = carry
        z, mu = _subspace_solve(a, q, free, one)
        feasible = jnp.all(jnp.where(free, z > 0, True))
        # Feasible: move to z, then add the most violating inactive index (if any).
        reduced = jnp.where(free, inf, _mv(a, z) + q - mu)
        j = jnp.argmin(reduced)
        optimal = reduced[j] >= -tol
        free_add = free.at[j].set(free[j] | ~optimal)
        # Infeasible: step towards z until the first free coordinate hits zero; drop it.
        blocking = free & (z <= 0)
        gap = w - z
        safe_gap = jnp.where(blocking & (gap > 0), gap, one)
        ratios = jnp.where(blocking, jnp.where(gap > 0, w / safe_gap, 0), inf)
        k = jnp.argmin(ratios)
        alpha = jnp.clip(ratios[k], 0, 1)
        w_step = w + alpha * (z - w)
        free_drop = free & (w_step > 0) & (jnp.arange(m) != k)
        free_drop = jnp.where(
            jnp.any(free_drop), free_drop, jnp.arange(m) == jnp.argmax(w_step)
        )
        w_step = jnp.where(free_drop, w_step, 0)
        w = jnp.where(feasible, jnp.where(free, z, 0), w_step)
        free = jnp.where(feasible, free_add, free_drop)
        done = feasible & optimal
        return w, free, step + 1, done

    init = (start, start > 0, jnp.array(0), jnp.array(False))
    w, _, _, _ = lax.while_loop(cond, body, init)
    return w


def _cagrad_direction(
    a: Float[Array, "m m"], b: Float[Array, " m"], s: Float[Array, ""]
) -> Float[Array, " m"]:
    r"""$\operatorname{argmin}_{w \in \Delta} b^\top w + s \sqrt{w^\top A w}$, $s > 0$.

    Its KKT conditions are those of the simplex QP
    $\min_{w \in \Delta} \frac12 w^\top A w + \tau\, b^\top w$ together with
    $\sqrt{w^\top A w} = s \tau$. We search the scalar $\tau$ in a bracket; on the
    support of the current QP solution, $w(\tau) = w_0 + \tau w_1$ is affine, so the
    root is the root of a quadratic (a Newton-like step, exact once the support is
    right), with bisection as the safeguard.
    """
    m = a.shape[0]
    dtype = a.dtype
    eps = jnp.finfo(dtype).eps
    zero = jnp.zeros((), dtype)
    one = jnp.ones((), dtype)
    hi0 = 1.001 * jnp.sqrt(jnp.max(jnp.diagonal(a))) / s
    start = (
        jnp.zeros((m,), dtype).at[jnp.argmin(0.5 * jnp.diagonal(a) + hi0 * b)].set(1)
    )
    max_outer = 100

    def cond(carry):
        _, _, _, _, step, done = carry
        return (~done) & (step < max_outer)

    def body(carry):
        tau, lo, hi, w, step, _ = carry
        w = _simplex_qp(a, tau * b, w)
        rho = jnp.sqrt(jnp.maximum(_quad(a, w, w), 0))
        positive = rho - s * tau > 0
        lo = jnp.where(positive, tau, lo)
        hi = jnp.where(positive, hi, tau)
        free = w > 0
        w0, _ = _subspace_solve(a, jnp.zeros_like(b), free, one)
        w1, _ = _subspace_solve(a, b, free, zero)
        c2 = _quad(a, w1, w1) - s * s
        c1 = _quad(a, w0, w1)
        c0 = _quad(a, w0, w0)
        disc = c1 * c1 - c2 * c0
        root = jnp.sqrt(jnp.maximum(disc, 0))
        sign = jnp.where(c1 >= 0, one, -one)
        big = -(c1 + sign * root)
        safe_big = jnp.where(big == 0, one, big)
        safe_c2 = jnp.where(c2 == 0, one, c2)
        r1 = jnp.where(c2 == 0, jnp.inf, big / safe_c2)
        r2 = jnp.where(big == 0, jnp.inf, c0 / safe_big)
        valid1 = (disc >= 0) & (r1 > lo) & (r1 < hi)
        valid2 = (disc >= 0) & (r2 > lo) & (r2 < hi)
        d1 = jnp.where(valid1, jnp.abs(r1 - tau), jnp.inf)
        d2 = jnp.where(valid2, jnp.abs(r2 - tau), jnp.inf)
        newton = jnp.where(d1 <= d2, r1, r2)
        new_tau = jnp.where(valid1 | valid2, newton, 0.5 * (lo + hi))
        done = (jnp.abs(new_tau - tau) <= 8 * eps * tau) | (hi - lo <= 8 * eps * hi)
        return new_tau, lo, hi, w, step + 1, done

    init = (0.5 * hi0, zero, hi0, start, jnp.array(0), jnp.array(False))
    _, _, _, w, _, _ = lax.while_loop(cond, body, init)
    return w


# Jitted (inlined under an outer jit) so that eager calls do not re-trace and
# re-compile the loop on every call.
@eqx.filter_jit
def _cagrad_weights(
    gramian: Float[Array, "m m"], c: Float[Array, ""], norm_eps: Float[Array, ""]
) -> Float[Array, " m"]:
    m = gramian.shape[0]
    dtype = gramian.dtype
    eps = jnp.finfo(dtype).eps
    normalized = normalize(gramian, norm_eps)
    mean = jnp.full((m,), 1 / m, dtype)
    b = _mv(normalized, mean)
    s = c * jnp.sqrt(jnp.maximum(jnp.sum(normalized), 0)) / m
    # A small ridge makes the minimiser unique in w (the direction J^T w is unique
    # anyway): among equivalent weights it selects the one of least norm, which is the
    # symmetric one that TorchJD's interior-point solver returns on duplicate rows.
    ridge = jnp.maximum(jnp.asarray(1e-10, dtype), 100 * eps)
    a = normalized + ridge * jnp.eye(m, dtype=dtype)
    positive = s > 0
    safe_s = jnp.where(positive, s, jnp.ones_like(s))
    w_conic = _cagrad_direction(a, b, safe_s)
    # s = 0: a linear program. Like an interior-point solver, spread w evenly over the
    # minimisers of b (all of them when the mean gradient vanishes).
    tied = b <= jnp.min(b) + 1000 * eps
    w_linear = tied.astype(dtype) / jnp.sum(tied).astype(dtype)
    w = jnp.where(positive, w_conic, w_linear)
    norm = jnp.sqrt(jnp.maximum(_quad(normalized, w, w), 0))
    # The ridge moves |g_w| of the minimiser by about sqrt(ridge) / sqrt(c^2 - 1),
    # which in float32 can exceed norm_eps where the exact |g_w| is 0 (when c > 1 and
    # the convex hull of the rows contains 0). For c > 1 the exact minimiser has
    # |g_w| <= delta (c + 1) / (c - 1), with delta the distance from 0 to the hull
    # (perturbed by the ridge only to second order): below norm_eps, the exact
    # weights are zero. A squared distance at rounding level (the normalised Gramian
    # has trace 1) counts as 0: in float32 its square root is too coarse to compare.
    w_min = _simplex_qp(a, jnp.zeros_like(b), mean)
    delta2 = jnp.maximum(_quad(normalized, w_min, w_min), 0)
    above_one = c > 1
    ratio = (c + 1) / jnp.where(above_one, c - 1, jnp.ones_like(c))
    in_hull = (jnp.sqrt(delta2) * ratio < norm_eps) | (delta2 <= 8 * m * eps)
    hull_zero = above_one & in_hull
    large = (norm >= norm_eps) & ~hull_zero
    safe_norm = jnp.where(large, norm, jnp.ones_like(norm))
    return jnp.where(large, mean + (s / safe_norm) * w, jnp.zeros_like(w))


class CAGradWeighting(AbstractWeighting):
    r"""The weighting of [`eqxjd.CAGrad`][].

    With $G_n$ = $G / \operatorname{tr} G$ (or $0$ when $\operatorname{tr} G <$
    `norm_eps`), $b = G_n \mathbf 1 / m$ and
    $s = c \sqrt{\mathbf 1^\top G_n \mathbf 1} / m$ (the norm of the normalised mean
    gradient times $c$),

    $$w^\star = \operatorname{argmin}_{w \in \Delta} b^\top w + s \sqrt{w^\top G_n w},
    \qquad \text{weights} = \frac1m \mathbf 1 + \frac{s}{\sqrt{w^{\star\top} G_n
    w^\star}}\, w^\star$$

    (zero weights when $\sqrt{w^{\star\top} G_n w^\star} <$ `norm_eps`, and for
    $c > 1$ when the convex hull of the rows contains $0$ to rounding, where the exact
    $w^{\star\top} G_n w^\star$ is $0$). TorchJD solves
    this second-order cone program with cvxpy/CLARABEL; eqxjd solves it exactly in JAX
    (a scalar root search whose steps are exact on the support of $w$, around an
    active-set simplex QP; see the source), in float64 when x64 is enabled. For
    $c \geq 1$ TorchJD's answer is only accurate to about `1e-5`; eqxjd returns the
    optimum. Not differentiable (gradients are stopped). The weights of $c'G$ equal
    those of $G$ for every $c' > 0$ on the same side of `norm_eps` (the threshold is
    compared with the trace of $G$ itself, as in TorchJD); non-finite input gives NaN
    weights.

    Liu et al., *Conflict-Averse Gradient Descent for Multi-task Learning*, NeurIPS
    2021, [arXiv:2110.14048](https://arxiv.org/abs/2110.14048), Algorithm 1.
    """

    reads: ClassVar[Reads] = "gramian"

    c: ScalarLike
    norm_eps: ScalarLike = 1e-4
    differentiable: ClassVar[bool] = False

    def __check_init__(self):
        check_nonnegative(self.c, "c")
        check_nonnegative(self.norm_eps, "norm_eps")

    def __call__(
        self, gramian: Float[Array, "m m"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        gramian = check_gramian(gramian)
        m = gramian.shape[0]
        if m == 0:
            return jnp.zeros((0,), gramian.dtype)
        dtype = solve_dtype(gramian.dtype)
        g = lax.stop_gradient(gramian).astype(dtype)
        c = jnp.asarray(lax.stop_gradient(self.c), dtype)
        norm_eps = jnp.asarray(lax.stop_gradient(self.norm_eps), dtype)
        weights = nan_unless_finite(g, _cagrad_weights(g, c, norm_eps))
        return lax.stop_gradient(weights.astype(gramian.dtype))


_ARGS = """**Arguments:**

- `c`: the radius of the ball around the mean gradient, relative to its norm
    ($c \\geq 0$; `0` gives the mean).
- `norm_eps`: Gramians with trace below it, and solutions with
    $\\|J^\\top w^\\star\\| / \\|J\\|_F$ below it, give zero weights. Default `1e-4`.
"""
CAGradWeighting.__init__.__doc__ = _ARGS


class CAGrad(AbstractWeightedAggregator):
    r"""Conflict-Averse Gradient descent.

    $$A(J) = g_0 + \frac{\sqrt\phi}{\|g_{w^\star}\|}\, g_{w^\star}, \qquad
    w^\star = \operatorname{argmin}_{w \in \Delta} g_w^\top g_0 + \sqrt\phi\, \|g_w\|,$$

    with $g_0$ the mean row, $g_w = J^\top w$ and $\sqrt\phi = c\|g_0\|$, computed on
    the Frobenius-normalised Jacobian as in TorchJD (there is no final division by
    $1 + c^2$). For $c \geq 1$ the result does not conflict with any row. See
    [`eqxjd.CAGradWeighting`][].

    Liu et al., *Conflict-Averse Gradient Descent for Multi-task Learning*, NeurIPS
    2021, [arXiv:2110.14048](https://arxiv.org/abs/2110.14048).
    """

    weighting: CAGradWeighting

    def __init__(self, c: ScalarLike, norm_eps: ScalarLike = 1e-4):
        self.weighting = CAGradWeighting(c, norm_eps)


CAGrad.__init__.__doc__ = _ARGS
