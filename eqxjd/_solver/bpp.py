import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._results import RESULTS
from .base import AbstractQPSolver, register_solver
from .common import (
    cho_solve,
    eps,
    factor_free_set,
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
    factor: Float[Array, "k m m"]
    step: Int[Array, ""]


_BUDGET = 3


def _infeasible(gramian, lower, free, slack, tol):
    multiplier = (lower + slack) @ gramian
    return (free & (slack < -tol)) | (~free & (multiplier < -tol))


def _solve_lanes(gramian, lower, free, ridge):
    # No refinement inside the loop: the ridge is far below what a sign test sees.
    factor, _, rhs = factor_free_set(gramian, lower, free, ridge)
    slack = cho_solve(factor, rhs)
    broken = ~jnp.all(jnp.isfinite(slack), axis=-1)
    return jnp.where(broken[:, None], 0.0, slack), factor, broken


def _solve_active_lanes(g, u, free, state, active):
    # After the first rounds only a few lanes still pivot; once at most `small` do,
    # factorise just those (gathered into a fixed-size batch) instead of all k.
    k = u.shape[0]
    small = max(4, k // 8)
    if k < 2 * small:
        return _solve_lanes(g, u, free, state.ridge)

    def some(free):
        lanes = jnp.argsort(~active, stable=True)[:small]
        slack, factor, broken = _solve_lanes(
            g, u[lanes], free[lanes], state.ridge[lanes]
        )
        return (
            state.slack.at[lanes].set(slack),
            state.factor.at[lanes].set(factor),
            jnp.zeros((k,), bool).at[lanes].set(broken),
        )

    def every(free):
        return _solve_lanes(g, u, free, state.ridge)

    return lax.cond(jnp.sum(active) <= small, some, every, free)


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

    ridge = jnp.full((k,), 4 * m * eps(dtype), dtype)
    slack, factor, broken = _solve_lanes(g, u, free, ridge)
    ridge = jnp.where(broken, ridge * 1e4, ridge)
    infeasible = _infeasible(g, u, free, slack, tol) | broken[:, None]
    init = _BPPState(
        free=free,
        slack=slack,
        infeasible=infeasible,
        best=jnp.full((k,), m + 1),
        budget=jnp.full((k,), _BUDGET),
        ridge=ridge,
        factor=factor,
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
        slack, factor, broken = _solve_active_lanes(g, u, free, state, active)
        # A breakdown (singular G_FF with reg_eps=0) keeps the lane's partition and
        # retries next step with a larger ridge.
        free = jnp.where(broken[:, None], state.free, free)
        keep = broken | ~active
        slack = jnp.where(keep[:, None], state.slack, slack)
        factor = jnp.where(keep[:, None, None], state.factor, factor)
        ridge = jnp.where(broken, state.ridge * 1e4, state.ridge)
        infeasible = _infeasible(g, u, free, slack, tol) | broken[:, None]
        infeasible = infeasible & active[:, None]
        return _BPPState(
            free, slack, infeasible, best, budget, ridge, factor, state.step + 1
        )

    final = lax.while_loop(cond, body, init)
    system = masked_system(g, final.free)
    rhs = jnp.where(final.free, -(u @ g), 0.0)
    slack = refine_solution(final.factor, system, rhs, final.slack, 2)
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
    lane has an empty infeasible set (typically 1 to 6 steps) or at `max_steps`. For
    $m \leq 2$ all free sets are enumerated instead (exact, no loop).

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
