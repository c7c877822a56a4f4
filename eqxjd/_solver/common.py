r"""Shared pieces of the dual-cone QP solvers.

Every solver works on the LCP form of $\min_{v \geq u} \frac12 v^\top G v$: with
$s = v - u$, find $s \geq 0$ with $w = G(u + s) \geq 0$ and $s \circ w = 0$. Lanes are
the rows of `(k, m)` arrays, so a product with $G$ is one GEMM for all lanes. $G$ is
the canonical Gramian of `AbstractQPSolver` (positive definite, unit diagonal).
"""

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .. import _linalg as linalg


def eps(dtype: jnp.dtype) -> float:
    return float(jnp.finfo(dtype).eps)


def kkt_tolerance(dtype: jnp.dtype) -> float:
    """Acceptance bound on the relative natural KKT residual (canonical problem)."""
    return 1e-9 if jnp.dtype(dtype) == jnp.float64 else 1e-4


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


def exchange(
    free: Bool[Array, "k m"],
    infeasible: Bool[Array, "k m"],
    best: Int[Array, " k"],
    budget: Int[Array, " k"],
) -> tuple[Bool[Array, "k m"], Bool[Array, " k"], Int[Array, " k"], Int[Array, " k"]]:
    """Block principal pivoting's exchange rule, with Murty's rule as the backup.

    Every infeasible index changes sides while their number keeps decreasing (or for
    three more rounds); after that only the largest one does, which terminates finitely
    for a positive definite matrix. Returns the new partitions, the lanes that changed
    and the updated counters."""
    count = jnp.sum(infeasible, axis=-1)
    flipping = count > 0
    improved = flipping & (count < best)
    use_budget = flipping & ~improved & (budget > 0)
    best = jnp.where(improved, count, best)
    budget = jnp.where(improved, 3, jnp.where(use_budget, budget - 1, budget))
    whole = improved | use_budget
    index = jnp.arange(free.shape[-1])[None, :]
    largest = jnp.max(jnp.where(infeasible, index, -1), axis=-1)
    flip = jnp.where(whole[:, None], infeasible, index == largest[:, None])
    return free ^ (flip & flipping[:, None]), flipping, best, budget


def masked_system(
    gramian: Float[Array, "m m"], free: Bool[Array, "k m"]
) -> Float[Array, "k m m"]:
    """$G$ on $F \\times F$ and the identity elsewhere, one matrix per lane."""
    m = gramian.shape[0]
    eye = jnp.eye(m, dtype=gramian.dtype)
    both = free[:, :, None] & free[:, None, :]
    return jnp.where(both, gramian[None], eye[None])


def free_rhs(
    gramian: Float[Array, "m m"], lower: Float[Array, "k m"], free: Bool[Array, "k m"]
) -> Float[Array, "k m"]:
    """$-(G u)_F$, and 0 off $F$."""
    return jnp.where(free, -(lower @ gramian), 0.0)


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
    Returns the solutions and the smallest pivot of each lane; a lane whose
    factorisation breaks down returns non-finite values.
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


def solve_on_free_set(
    gramian: Float[Array, "m m"], lower: Float[Array, "k m"], free: Bool[Array, "k m"]
) -> Float[Array, "k m"]:
    r"""$s_F = -G_{FF}^{-1} (G u)_F$ and $s = 0$ off $F$, per lane, by masked Cholesky.

    $G_{FF}$ is a principal submatrix of a positive definite matrix, but a nearly
    singular one can break down in rounding: such lanes are solved again with a ridge
    of $4 m \epsilon$, then once more on the residual of the unridged system (one step
    of iterative refinement, which removes most of the ridge's bias). Lanes that still
    break down return non-finite values.
    """
    k, m = lower.shape
    system = masked_system(gramian, free)
    rhs = free_rhs(gramian, lower, free)
    slack, pivot = bordered_solve(system, rhs)
    ok = (pivot > 0) & jnp.all(jnp.isfinite(slack), axis=-1)

    def retry(slack):
        ridge = 4 * m * eps(gramian.dtype)
        eye = jnp.eye(m, dtype=gramian.dtype)
        ridged = system + jnp.where(free, ridge, 0.0)[..., None] * eye[None]
        first, _ = bordered_solve(ridged, rhs)
        residual = rhs - jnp.einsum("kij,kj->ki", system, first)
        correction, _ = bordered_solve(ridged, residual)
        return jnp.where(ok[:, None], slack, first + correction)

    slack = lax.cond(jnp.all(ok), lambda s: s, retry, slack)
    return jnp.where(free, slack, 0.0)
