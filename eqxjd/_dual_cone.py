import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from . import _linalg as linalg
from ._custom_types import ScalarLike
from ._misc import all_finite, normalize, regularize, solve_dtype
from ._results import RESULTS
from ._solver.base import AbstractQPSolver
from ._solver.common import natural_residual


def kkt_residual(
    gramian: Float[Array, "m m"],
    lower: Float[Array, "k m"],
    solution: Float[Array, "k m"],
) -> Float[Array, " k"]:
    r"""Relative natural KKT residual per lane.

    $\rho = \|\min(v - u, G v)\|_\infty / \max(1, \|v\|_\infty)$, zero exactly at the
    solution of $\min_{v \geq u} \frac12 v^\top G v$ (feasibility, sign of the
    multiplier and complementarity in one number). A lane with a non-finite entry gives
    $\infty$.
    """
    return natural_residual(gramian, lower, solution)


def kkt_tolerance(dtype: jnp.dtype) -> float:
    """Acceptance bound on `kkt_residual` for the rescaled problem."""
    return 1e-9 if jnp.dtype(dtype) == jnp.float64 else 1e-4


def _scale_lanes(
    lower: Float[Array, "k m"],
) -> tuple[Float[Array, "k m"], Array, Array]:
    # The QP is positively homogeneous in u, and v = 0 solves every lane with u <= 0.
    scale = jnp.max(jnp.abs(lower), axis=-1, keepdims=True, initial=0.0)
    trivial = jnp.max(lower, axis=-1, keepdims=True, initial=0.0) <= 0
    safe = jnp.where(trivial | (scale == 0), 1.0, scale)
    return lower / safe, safe, trivial


def _solve_exactly(
    scaled_gramian: Float[Array, "m m"],
    lower: Float[Array, "k m"],
    solver: AbstractQPSolver,
) -> tuple[Float[Array, "k m"], Bool[Array, "k m"], RESULTS]:
    # Invariance under G -> a G: bring the diagonal to unit mean so tolerances are
    # relative.
    m = scaled_gramian.shape[0]
    mean_diag = jnp.trace(scaled_gramian) / m
    degenerate = mean_diag <= 0
    gramian = scaled_gramian / jnp.where(degenerate, 1.0, mean_diag)
    unit_lower, lane_scale, trivial = _scale_lanes(lower)
    solution, result = solver.solve(gramian, unit_lower)
    residual = kkt_residual(gramian, unit_lower, solution)
    # Complementarity: a coordinate is free when its slack exceeds its multiplier.
    free = solution - unit_lower > solution @ gramian
    bad_kkt = jnp.any(residual > kkt_tolerance(gramian.dtype))
    result = RESULTS.where(
        (result == RESULTS.successful) & bad_kkt, RESULTS.kkt_check_failed, result
    )
    solution = jnp.where(trivial, 0.0, solution * lane_scale)
    # A zero Gramian (possible with reg_eps = 0) makes every feasible v optimal; take
    # the one a vanishing ridge would give.
    solution = jnp.where(degenerate, jnp.maximum(lower, 0.0), solution)
    free = jnp.where(degenerate | trivial, lower < 0, free)
    result = RESULTS.where(degenerate, RESULTS.successful, result)
    return solution, free, result


def _refine_on_free_set(
    gramian: Float[Array, "m m"],
    lower: Float[Array, "k m"],
    free: Bool[Array, "k m"],
) -> Float[Array, "k m"]:
    # With the free set F fixed, v_F = -G_FF^{-1} G_FA u_A is smooth in G and u, so this
    # one masked solve carries the exact derivative of the QP (away from degenerate
    # points).
    m = gramian.shape[0]
    eye = jnp.eye(m, dtype=gramian.dtype)
    both_free = free[:, :, None] & free[:, None, :]
    system = jnp.where(both_free, gramian[None], eye[None])
    active_part = jnp.where(free, 0.0, lower)
    rhs = jnp.where(free, -(active_part @ gramian), active_part)
    return linalg.solve(system, rhs[..., None])[..., 0]


def project_onto_dual_cone(
    gramian: Float[Array, "m m"],
    lower: Float[Array, "k m"],
    *,
    solver: AbstractQPSolver,
    norm_eps: ScalarLike = 1e-4,
    reg_eps: ScalarLike = 1e-4,
    differentiable: bool = False,
    throw: bool = True,
) -> Float[Array, "k m"]:
    r"""Solves $V_j = \operatorname{argmin}_{v \geq u_j} v^\top G' v$ per row $u_j$.

    $G' = G / \operatorname{tr} G + \epsilon_{reg} I$ (with $G/\operatorname{tr}G$
    replaced by $0$ when $\operatorname{tr} G < \epsilon_{norm}$), exactly as TorchJD's
    `QuadprogProjector`. Then $J^\top V_j$ is the projection of $J^\top u_j$ onto the
    dual cone $\{x : J x \geq 0\}$ of the rows of $J$.

    The QP is solved in float64 when x64 is enabled, on a rescaled problem, and the
    solution is checked against a relative KKT residual. With `throw=True` a failed
    solve raises an `EquinoxRuntimeError`; otherwise the unchecked solution is
    returned.

    **Arguments:**

    - `gramian`: $G = J J^\top$, shape `(m, m)`.
    - `lower`: the bounds $u_j$, one QP per row, shape `(k, m)`.
    - `solver`: an [`eqxjd.AbstractQPSolver`][].
    - `norm_eps`, `reg_eps`: normalisation threshold and ridge, as in TorchJD.
    - `differentiable`: if `True`, gradients are those of the exact QP solution
      (implicit differentiation on the identified free set); if `False`, gradients are
      stopped.
    - `throw`: raise on a failed solve.

    **Returns:**

    The solutions $V$, shape `(k, m)`, in the dtype of `gramian`. Non-finite input gives
    NaN.
    """
    return _project(gramian, lower, solver, norm_eps, reg_eps, differentiable, throw)


# Jitted internally (and inlined under an outer jit): eager calls of the solvers' loops
# would otherwise recompile on every call (~0.6 s instead of ~2 ms).
@eqx.filter_jit
def _project(gramian, lower, solver, norm_eps, reg_eps, differentiable, throw):
    dtype = gramian.dtype
    work = solve_dtype(dtype)
    g = regularize(normalize(gramian.astype(work), norm_eps), reg_eps)
    u = lower.astype(work)
    finite = all_finite(g) & all_finite(u)
    safe_g = jnp.where(finite, g, jnp.eye(g.shape[0], dtype=work))
    safe_u = jnp.where(finite, u, 0.0)
    solution, free, result = _solve_exactly(
        lax.stop_gradient(safe_g), lax.stop_gradient(safe_u), solver
    )
    if throw:
        solution = result.error_if(solution, result != RESULTS.successful)
    if differentiable:
        solution = _refine_on_free_set(safe_g, safe_u, free)
    solution = jnp.where(finite, solution, jnp.nan)
    return solution.astype(dtype)
