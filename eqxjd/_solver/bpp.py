import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._results import RESULTS
from .base import AbstractQPSolver, register_solver
from .common import (
    add_ridge,
    bordered_solve,
    eps,
    factor_free_set,
    free_rhs,
    jacobi_scale,
    masked_system,
    refine_solution,
    solve_by_enumeration,
)


class _BPPState(eqx.Module):
    free: Bool[Array, "k m"]
    slack: Float[Array, "k m"]
    infeasible: Bool[Array, "k m"]
    best: Int[Array, " k"]
    budget: Int[Array, " k"]
    ridge: Float[Array, " k"]
    step: Int[Array, ""]


_BUDGET = 3
_RETRIES = 3


def _infeasible(gramian, lower, free, slack, tol):
    multiplier = (lower + slack) @ gramian
    return (free & (slack < -tol)) | (~free & (multiplier < -tol))


def _solve_lanes(gramian, lower, free, ridge):
    system = add_ridge(masked_system(gramian, free), free, ridge)
    slack, pivot = bordered_solve(system, free_rhs(gramian, lower, free))
    # A (nearly) singular G_FF (reg_eps=0 on a rank-deficient J) is a breakdown, not a
    # solution: on the unit-diagonal Gramian its unridged pivots fall below sqrt(eps)
    # (with reg_eps=1e-4 they stay above ~1e-4), and a ridged solve that amplified
    # roundoff leaves a residual on F far above roundoff.
    tol = jnp.sqrt(eps(gramian.dtype))
    singular = ~(pivot > tol) & (ridge == 0)
    residual = _relative(_free_residual(gramian, lower, free, slack), lower + slack)
    broken = singular | ~(residual <= tol)
    return jnp.where(broken[:, None], 0.0, slack), broken


def _free_residual(gramian, lower, free, slack):
    # On F the multiplier G(u + s) must vanish; one GEMM for all lanes.
    return jnp.where(free, (lower + slack) @ gramian, 0.0)


def _relative(residual, solution):
    scale = jnp.maximum(1.0, jnp.max(jnp.abs(solution), axis=-1))
    return jnp.max(jnp.abs(residual), axis=-1) / scale


def _grow_ridge(ridge, broken, m):
    # Factorisations start unridged (no bias); a breakdown retries that lane at a
    # tiny ridge, then 1e4 and 1e8 times larger.
    bigger = jnp.where(ridge == 0, 4 * m * eps(ridge.dtype), ridge * 1e4)
    return jnp.where(broken, bigger, ridge)


def _polish(gramian, lower, free, slack, ridge):
    """Iterative refinement against the unridged system where it can matter: lanes
    whose ridge grew past the first retry level (a bias above roundoff), or whose
    residual is above roundoff. Not elsewhere: on a singular G_FF refinement moves s
    along the null space (harmless to J^T v, but not to the clamp s >= 0)."""
    m = gramian.shape[0]

    def size(slack):
        return _relative(_free_residual(gramian, lower, free, slack), lower + slack)

    before = size(slack)
    roundoff = 4 * m * eps(gramian.dtype)
    needed = (ridge > roundoff) | (before > 25 * roundoff)

    def refine(slack):
        factor, system, rhs = factor_free_set(gramian, lower, free, ridge)
        refined = refine_solution(factor, system, rhs, slack, 2)
        better = needed & (size(refined) < before)
        return jnp.where(better[:, None], refined, slack)

    return lax.cond(jnp.any(needed), refine, lambda s: s, slack)


def _lane_batches(k: int) -> list[int]:
    # Fixed batch sizes k/8, k/4, k/2 (at least 4 lanes each), then all k.
    sizes = sorted({size for size in (k // 8, k // 4, k // 2) if 4 <= size < k})
    return sizes + [k]


def _solve_active_lanes(g, u, free, ridge, slack, active):
    # After the first round fewer and fewer lanes still pivot: factorise only those,
    # gathered into the smallest fixed-size batch that holds them. Other lanes keep
    # `slack`.
    k = u.shape[0]
    sizes = _lane_batches(k)

    def gathered(size):
        def solve(free):
            lanes = jnp.argsort(~active, stable=True)[:size]
            new, broken = _solve_lanes(g, u[lanes], free[lanes], ridge[lanes])
            broken = jnp.zeros((k,), bool).at[lanes].set(broken)
            return slack.at[lanes].set(new), broken & active

        return solve

    def every(free):
        new, broken = _solve_lanes(g, u, free, ridge)
        return jnp.where(active[:, None], new, slack), broken & active

    if len(sizes) == 1:
        return every(free)
    branch = jnp.searchsorted(jnp.array(sizes), jnp.sum(active))
    return lax.switch(branch, [gathered(size) for size in sizes[:-1]] + [every], free)


def _solve_retrying(g, u, free, ridge, slack, active):
    """Solves the `active` lanes on their partitions `free`. A lane whose G_FF is
    singular (reg_eps=0 on a rank-deficient J) is solved again at a growing ridge;
    returns the slacks, the lanes still broken after that, and the ridges."""
    m = g.shape[0]

    def again(carry):
        slack, broken, ridge, tries = carry
        ridge = _grow_ridge(ridge, broken, m)
        slack, broken = _solve_active_lanes(g, u, free, ridge, slack, broken)
        return slack, broken, ridge, tries + 1

    def cond(carry):
        return jnp.any(carry[1]) & (carry[3] < _RETRIES)

    slack, broken = _solve_active_lanes(g, u, free, ridge, slack, active)
    slack, broken, ridge, _ = lax.while_loop(
        cond, again, (slack, broken, ridge, jnp.array(0))
    )
    return slack, broken, ridge


def block_pivoting(
    g: Float[Array, "m m"],
    u: Float[Array, "k m"],
    free: Bool[Array, "k m"],
    max_steps: int,
) -> tuple[Float[Array, "k m"], Bool[Array, ""]]:
    """Block principal pivoting from the partition `free`, on a Jacobi-scaled problem.

    Returns the solutions $u + s$ and whether every lane finished.
    """
    k, m = u.shape
    dtype = g.dtype
    tol = 10 * eps(dtype)
    index = jnp.arange(m)[None, :]

    every = jnp.ones((k,), bool)
    zeros = jnp.zeros((k, m), dtype)
    slack, broken, ridge = _solve_retrying(
        g, u, free, jnp.zeros((k,), dtype), zeros, every
    )
    infeasible = _infeasible(g, u, free, slack, tol) | broken[:, None]
    init = _BPPState(
        free=free,
        slack=slack,
        infeasible=infeasible,
        best=jnp.full((k,), m + 1),
        budget=jnp.full((k,), _BUDGET),
        ridge=ridge,
        step=jnp.array(0),
    )

    def cond(state):
        return jnp.any(state.infeasible) & (state.step < max_steps)

    def body(state):
        count = jnp.sum(state.infeasible, axis=-1)
        active = count > 0
        improved = count < state.best
        use_budget = ~improved & (state.budget > 0)
        best = jnp.where(improved, count, state.best)
        budget = jnp.where(
            improved, _BUDGET, jnp.where(use_budget, state.budget - 1, state.budget)
        )
        full = improved | use_budget
        largest = jnp.max(jnp.where(state.infeasible, index, -1), axis=-1)
        flip = jnp.where(full[:, None], state.infeasible, index == largest[:, None])
        flip = flip & active[:, None]
        free = state.free ^ flip
        slack, broken, ridge = _solve_retrying(
            g, u, free, state.ridge, state.slack, active
        )
        # A lane that breaks down even at the largest ridge keeps its partition.
        free = jnp.where(broken[:, None], state.free, free)
        slack = jnp.where(broken[:, None], state.slack, slack)
        infeasible = _infeasible(g, u, free, slack, tol) | broken[:, None]
        infeasible = infeasible & active[:, None]
        return _BPPState(free, slack, infeasible, best, budget, ridge, state.step + 1)

    final = lax.while_loop(cond, body, init)
    slack = _polish(g, u, final.free, final.slack, final.ridge)
    slack = jnp.where(final.free, jnp.maximum(slack, 0.0), 0.0)
    return u + slack, ~jnp.any(final.infeasible)


class BPP(AbstractQPSolver):
    r"""Block principal pivoting with Murty's backup rule (Júdice & Pires; Kim & Park).

    Each lane solves the LCP $s \geq 0$, $w = \hat G(\hat u + s) \geq 0$,
    $s^\top w = 0$ on the Jacobi-scaled Gramian $\hat G = D G D$,
    $D = \operatorname{diag}(G)^{-1/2}$. A lane holds a guess $F$ of the free set
    $\{s > 0\}$, solves $\hat G_{FF} s_F = -(\hat G \hat u)_F$ exactly (a fixed-shape
    masked Cholesky), and exchanges every infeasible index ($s_j < 0$ on $F$, $w_j < 0$
    off $F$) between $F$ and its complement. When the number of infeasible indices has
    not decreased for three steps, only the largest infeasible index is exchanged
    (Murty's rule), which terminates finitely for the positive definite Gramian. The
    cold start is $F = \{j : (\hat G \hat u)_j < 0\}$, the rows that conflict.

    All lanes run in one `lax.while_loop` with a done mask; the loop stops when every
    lane has an empty infeasible set (typically 1 to 6 steps) or at `max_steps`. Each
    step factorises only the lanes still pivoting (gathered into batches of $k/8$,
    $k/4$, $k/2$ or $k$ lanes), and the Cholesky factor of the system bordered by its
    right-hand side gives the forward substitution for free. Factorisations are
    unridged; a (nearly) singular $\hat G_{FF}$ (`reg_eps=0` on a rank-deficient
    Jacobian) is retried at a growing ridge, then refined against the unridged
    system. For $m \leq 2$ all free sets are enumerated instead (exact, no loop).

    Júdice & Pires, *A block principal pivoting algorithm for large-scale strictly
    monotone linear complementarity problems*, Comput. Oper. Res. 21(5), 1994.
    Kim & Park, *Fast nonnegative matrix factorization: an active-set-like method and
    comparisons*, SIAM J. Sci. Comput. 33(6), 2011.
    """

    max_steps: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"`max_steps` must be at least 1; got {self.max_steps}.")

    def solve(
        self, gramian: Float[Array, "m m"], lower: Float[Array, "k m"]
    ) -> tuple[Float[Array, "k m"], RESULTS]:
        k, m = lower.shape
        g, u, d = jacobi_scale(gramian, lower)
        if m <= 2:
            return solve_by_enumeration(g, u, d)
        max_steps = 10 * m + 10 if self.max_steps is None else self.max_steps
        solution, finished = block_pivoting(g, u, (u @ g) < 0, max_steps)
        solution = solution * d
        finite = jnp.all(jnp.isfinite(solution))
        result = RESULTS.where(finished, RESULTS.successful, RESULTS.max_steps_reached)
        result = RESULTS.where(finite, result, RESULTS.kkt_check_failed)
        return solution, result


BPP.__init__.__doc__ = """**Arguments:**

- `max_steps`: the maximum number of pivoting steps (static). `None` (default) means
    $10m + 10$. Reaching it gives `RESULTS.max_steps_reached`.
"""

register_solver("bpp", BPP)
