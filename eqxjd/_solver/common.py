r"""Shared pieces of the dual-cone QP solvers.

Every solver works on the LCP form of $\min_{v \geq u} \frac12 v^\top G v$: with
$s = v - u$, find $s \geq 0$ with $w = G(u + s) \geq 0$ and $s \circ w = 0$. Lanes are
the rows of `(k, m)` arrays, so a product with $G$ is one GEMM for all lanes.
"""

import itertools as it

import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from .. import _linalg as linalg
from .._results import RESULTS


def eps(dtype: jnp.dtype) -> float:
    return float(jnp.finfo(dtype).eps)


def jacobi_scale(
    gramian: Float[Array, "m m"], lower: Float[Array, "k m"]
) -> tuple[Float[Array, "m m"], Float[Array, "k m"], Float[Array, "1 m"]]:
    r"""Exact Jacobi scaling: $\hat G = D G D$, $\hat u = D^{-1} u$, $v = D \hat v$.

    With $D = \operatorname{diag}(G)^{-1/2}$ every coordinate has unit scale, so a
    single sign-test tolerance fits all of them. A zero diagonal entry (a zero row of
    $G$, possible with `reg_eps=0`) keeps the scale 1.
    """
    diag = jnp.diagonal(gramian)
    positive = diag > 0
    d = jnp.where(positive, lax.rsqrt(jnp.where(positive, diag, 1.0)), 1.0)
    scaled = gramian * d[:, None] * d[None, :]
    d = d[None, :]
    return scaled, lower / d, d


def members_first(mask: Bool[Array, "*k m"]) -> Array:
    """Indices along the last axis with the `True` entries first, each group in order:
    `jnp.argsort(~mask, stable=True)`, without a sort (a sort of small rows costs
    ~0.3 ms on CPU at m = 64; this scatter costs ~0.04 ms)."""
    m = mask.shape[-1]
    ones = mask.astype(jnp.int32)
    before = jnp.cumsum(ones, axis=-1, dtype=jnp.int32) - ones
    count = jnp.sum(ones, axis=-1, keepdims=True, dtype=jnp.int32)
    index = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), mask.shape)
    position = jnp.where(mask, before, count + index - before)
    lanes = tuple(
        jnp.arange(size).reshape((-1,) + (1,) * (mask.ndim - 1 - axis))
        for axis, size in enumerate(mask.shape[:-1])
    )
    return jnp.zeros_like(index).at[lanes + (position,)].set(index, unique_indices=True)


def relative_size(
    residual: Float[Array, "k m"], solution: Float[Array, "k m"]
) -> Float[Array, " k"]:
    r"""$\|r\|_\infty / \max(1, \|v\|_\infty)$ per lane, and $\infty$ for a lane with a
    non-finite entry: tests on it never pass NaN. (XLA:CPU's max reductions over large
    arrays drop NaN: measured with jax 0.10.2 from 4096 elements on.)"""
    size = jnp.max(jnp.abs(residual), axis=-1, initial=0.0)
    scale = jnp.maximum(1.0, jnp.max(jnp.abs(solution), axis=-1, initial=0.0))
    finite = jnp.all(jnp.isfinite(residual) & jnp.isfinite(solution), axis=-1)
    return jnp.where(finite, size / scale, jnp.inf)


def natural_residual(
    gramian: Float[Array, "m m"],
    lower: Float[Array, "k m"],
    solution: Float[Array, "k m"],
) -> Float[Array, " k"]:
    r"""Relative natural KKT residual per lane.

    $\rho = \|\min(v - u, G v)\|_\infty / \max(1, \|v\|_\infty)$, zero exactly at the
    solution of $\min_{v \geq u} \frac12 v^\top G v$ (feasibility, sign of the
    multiplier and complementarity in one number); $\infty$ for a non-finite lane.
    """
    return relative_size(jnp.minimum(solution - lower, solution @ gramian), solution)


def masked_system(
    gramian: Float[Array, "m m"], free: Bool[Array, "k m"]
) -> Float[Array, "k m m"]:
    """$G$ on $F \\times F$ and the identity elsewhere, one matrix per lane."""
    m = gramian.shape[0]
    eye = jnp.eye(m, dtype=gramian.dtype)
    both = free[:, :, None] & free[:, None, :]
    return jnp.where(both, gramian[None], eye[None])


def cho_solve(
    factor: Float[Array, "k m m"], rhs: Float[Array, "k m"]
) -> Float[Array, "k m"]:
    # Row vectors: x (L L^T) = b, so solve y L^T = b, then x L = y.
    y = linalg.triangular_solve(
        factor, rhs[:, None, :], left_side=False, lower=True, transpose_a=True
    )
    x = linalg.triangular_solve(factor, y, left_side=False, lower=True)
    return x[:, 0, :]


def bordered_solve(
    matrix: Float[Array, "k m m"], rhs: Float[Array, "k m"]
) -> tuple[Float[Array, "k m"], Float[Array, " k"]]:
    r"""$x = A^{-1} b$ per lane, $A$ symmetric positive definite (lower triangle read).

    The Cholesky factor of the bordered matrix $\begin{pmatrix} A & b \\ b^\top & c
    \end{pmatrix}$ has $(L^{-1} b)^\top$ as its last row, so the forward substitution
    comes with the factorisation and only one triangular solve is left (on CPU each
    batched triangular solve is one LAPACK call per lane, as costly as the
    factorisation for small m). The corner $c$ only has to exceed $b^\top A^{-1} b$.
    A lane whose factorisation breaks down returns non-finite values.
    """
    k, m = rhs.shape
    dtype = rhs.dtype
    corner = jnp.full((k, 1, 1), jnp.sqrt(jnp.finfo(dtype).max), dtype)
    top = jnp.concatenate([matrix, rhs[:, :, None]], axis=2)
    bottom = jnp.concatenate([rhs[:, None, :], corner], axis=2)
    bordered = jnp.concatenate([top, bottom], axis=1)
    factor = linalg.cholesky(bordered, symmetrize_input=False)
    # Solve x L = [L^{-1} b, 0] with the bordered factor: its last entry is 0.
    forward = jnp.where(jnp.arange(m + 1) < m, factor[:, m, :], 0.0)
    x = linalg.triangular_solve(
        factor, forward[:, None, :], left_side=False, lower=True
    )
    pivots = jnp.diagonal(factor, axis1=1, axis2=2)[:, :m] ** 2
    # NaN as -inf: XLA:CPU's min reductions over large arrays drop NaN.
    pivots = jnp.where(jnp.isnan(pivots), -jnp.inf, pivots)
    return x[:, 0, :m], jnp.min(pivots, axis=-1, initial=jnp.inf)


def factor_free_set(
    gramian: Float[Array, "m m"],
    lower: Float[Array, "k m"],
    free: Bool[Array, "k m"],
    ridge: Float[Array, " k"],
) -> tuple[Float[Array, "k m m"], Float[Array, "k m m"], Float[Array, "k m"]]:
    """The masked system of `solve_on_free_set`, its right-hand side and the Cholesky
    factor of the ridged system."""
    system = masked_system(gramian, free)
    rhs = free_rhs(gramian, lower, free)
    return linalg.cholesky(add_ridge(system, free, ridge)), system, rhs


def free_rhs(
    gramian: Float[Array, "m m"], lower: Float[Array, "k m"], free: Bool[Array, "k m"]
) -> Float[Array, "k m"]:
    """$-(G u)_F$, and 0 off $F$."""
    return jnp.where(free, -(lower @ gramian), 0.0)


def add_ridge(
    system: Float[Array, "k m m"], free: Bool[Array, "k m"], ridge: Float[Array, " k"]
) -> Float[Array, "k m m"]:
    eye = jnp.eye(system.shape[-1], dtype=system.dtype)
    return system + jnp.where(free, ridge[:, None], 0.0)[:, :, None] * eye[None]


def refine_solution(factor, system, rhs, s, steps: int):
    """Iterative refinement against the unridged system with the ridged factor."""
    for _ in range(steps):
        residual = rhs - jnp.einsum("kij,kj->ki", system, s)
        s = s + cho_solve(factor, residual)
    return s


def solve_on_free_set(
    gramian: Float[Array, "m m"],
    lower: Float[Array, "k m"],
    free: Bool[Array, "k m"],
    ridge: Float[Array, " k"],
    refine: int = 2,
) -> Float[Array, "k m"]:
    r"""$s_F = -G_{FF}^{-1} (G u)_F$ and $s = 0$ off $F$, per lane, by masked Cholesky.

    The factorisation is of $G_{FF} + \delta I$ with a tiny per-lane ridge $\delta$, so
    it exists even when $G_{FF}$ is singular (`reg_eps=0` on a rank-deficient Jacobian;
    the system is then consistent, since $(G u)_F \in \operatorname{range} G_{FF}$).
    `refine` steps of iterative refinement against the unridged system remove the
    ridge's bias. Lanes whose factorisation breaks down return non-finite values.
    """
    factor, system, rhs = factor_free_set(gramian, lower, free, ridge)
    s = cho_solve(factor, rhs)
    return refine_solution(factor, system, rhs, s, refine)


def exact_on_free_set(
    gramian: Float[Array, "m m"], lower: Float[Array, "k m"], free: Bool[Array, "k m"]
) -> Float[Array, "k m"]:
    """The exact solution $v = u + s$ for a guessed free set, with the guarded solve.

    A lane whose factorisation fails at the smallest ridge is retried with a larger one.
    """
    k = lower.shape[0]
    e = eps(gramian.dtype)
    m = gramian.shape[0]
    first = jnp.full((k,), 4 * m * e, gramian.dtype)
    s = solve_on_free_set(gramian, lower, free, first)
    ok = jnp.all(jnp.isfinite(s), axis=-1)

    def _retry(s):
        bigger = jnp.full((k,), jnp.sqrt(jnp.asarray(e, gramian.dtype)))
        retry = solve_on_free_set(gramian, lower, free, bigger, refine=4)
        return jnp.where(ok[:, None], s, retry)

    s = lax.cond(jnp.all(ok), lambda s: s, _retry, s)
    return lower + jnp.where(free, jnp.maximum(s, 0.0), 0.0)


def enumerate_free_sets(
    gramian: Float[Array, "m m"], lower: Float[Array, "k m"]
) -> Float[Array, "k m"]:
    r"""Exact solution for tiny $m$: try every one of the $2^m$ free sets.

    Each lane keeps the candidate with the smallest natural KKT residual, which is the
    solution (residual zero up to roundoff). No data-dependent loop.
    """
    k, m = lower.shape
    masks = np.array(list(it.product([False, True], repeat=m)), dtype=bool)  # (2^m, m)
    n_sets = masks.shape[0]
    free = jnp.asarray(np.repeat(masks, k, axis=0))  # (2^m * k, m)
    lanes = jnp.tile(lower, (n_sets, 1))
    candidates = exact_on_free_set(gramian, lanes, free)
    residual = natural_residual(gramian, lanes, candidates)
    residual = jnp.where(jnp.isfinite(residual), residual, jnp.inf)
    residual = residual.reshape(n_sets, k)
    best = jnp.argmin(residual, axis=0)
    candidates = candidates.reshape(n_sets, k, m)
    return jnp.take_along_axis(candidates, best[None, :, None], axis=0)[0]


def solve_by_enumeration(
    g: Float[Array, "m m"], u: Float[Array, "k m"], d: Float[Array, "1 m"]
) -> tuple[Float[Array, "k m"], RESULTS]:
    """The exact answer for tiny m (every solver's fast path for m <= 2), mapped back
    from the Jacobi scaling `d`."""
    solution = enumerate_free_sets(g, u) * d
    ok = jnp.all(jnp.isfinite(solution))
    return solution, RESULTS.where(ok, RESULTS.successful, RESULTS.kkt_check_failed)
