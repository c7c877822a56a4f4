import dataclasses
import functools as ft
from typing import NamedTuple

import equinox as eqx
import jax
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
    members_first,
    refine_solution,
    relative_size,
    solve_by_enumeration,
)


class _BPPState(eqx.Module):
    # `free` is the partition that `slack` solves, except for `pending` lanes, whose
    # partition has not been solved yet.
    free: Bool[Array, "k m"]
    slack: Float[Array, "k m"]
    infeasible: Bool[Array, "k m"]
    pending: Bool[Array, " k"]
    best: Int[Array, " k"]
    budget: Int[Array, " k"]
    ridge: Float[Array, " k"]
    step: Int[Array, ""]
    # A reduced solve broke down: the full-size phase takes over.
    stuck: Bool[Array, ""]


_BUDGET = 3
_RETRIES = 3
# H = G^{-1} costs about four full-size lane solves; each reduced solve saves about
# 70% of one. Below this many lanes (DualProj has one) the full-size solves win.
_REDUCED_MIN_LANES = 8


def _infeasible(free, slack, multiplier, tol):
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
    broken = singular | ~(_free_residual(gramian, lower, free, slack) <= tol)
    return jnp.where(broken[:, None], 0.0, slack), broken


def _free_residual(gramian, lower, free, slack):
    # On F the multiplier G(u + s) must vanish; one GEMM for all lanes. Relative size
    # per lane.
    multiplier = jnp.where(free, (lower + slack) @ gramian, 0.0)
    return relative_size(multiplier, lower + slack)


def _inverse(gramian):
    r"""$H = G^{-1}$, and whether G is far enough from singular for reduced solves on
    $H$ (its Cholesky pivots above $\sqrt{\epsilon}$ on the unit-diagonal Gramian)."""
    m = gramian.shape[0]
    factor = jnp.linalg.cholesky(gramian)
    # H = Z^T Z with Z = L^{-1}: one triangular solve and one GEMM.
    z = lax.linalg.triangular_solve(
        factor, jnp.eye(m, dtype=gramian.dtype), left_side=True, lower=True
    )
    inverse = z.T @ z
    pivots = jnp.diagonal(factor) ** 2
    ok = jnp.all(pivots > jnp.sqrt(eps(gramian.dtype))) & jnp.all(jnp.isfinite(inverse))
    return inverse, ok


def _solve_reduced(pair, lower, conflict, free):
    r"""Exact solves on the partitions `free`, each of size at most $m/2$.

    `pair` stacks $G$ and $H = G^{-1}$; `conflict` is $-G u$ per lane. A lane with
    $|F| \leq |A|$ solves $G_{FF} s_F = -(G u)_F$. Otherwise it solves the dual system
    $H_{AA} \lambda_A = u_A$: then $v = H \lambda$, with multiplier $\lambda$ (zero
    on $F$). Both are principal submatrices of positive definite matrices, gathered
    into one `(k, m/2, m/2)` batch: on CPU a LAPACK Cholesky of half the size costs
    2.7-6x less.
    """
    k, m = lower.shape
    p = m // 2
    n_free = jnp.sum(free, axis=-1)
    dual = 2 * n_free > m
    size = jnp.where(dual, m - n_free, n_free)
    members = free ^ dual[:, None]
    order = members_first(members)[:, :p]
    valid = jnp.arange(p)[None, :] < size[:, None]
    both = valid[:, :, None] & valid[:, None, :]
    sub = pair[
        dual.astype(jnp.int32)[:, None, None], order[:, :, None], order[:, None, :]
    ]
    system = jnp.where(both, sub, jnp.eye(p, dtype=lower.dtype)[None])
    source = jnp.where(dual[:, None], lower, conflict)
    rhs = jnp.where(valid, jnp.take_along_axis(source, order, axis=-1), 0.0)
    x, _ = bordered_solve(system, rhs)
    x = jnp.where(valid, x, 0.0)
    full = jnp.zeros_like(lower).at[jnp.arange(k)[:, None], order].set(x)
    dual_slack = jnp.where(free, full @ pair[1] - lower, 0.0)
    slack = jnp.where(dual[:, None], dual_slack, full)
    multiplier = jnp.where(dual[:, None], full, slack @ pair[0] - conflict)
    broken = ~jnp.all(jnp.isfinite(slack) & jnp.isfinite(multiplier), axis=-1)
    return slack, multiplier, broken


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

    size = ft.partial(_free_residual, gramian, lower, free)
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


def _on_active_lanes(solve, inputs, outputs, active, every_lane=False):
    """`outputs` with the `active` lanes replaced by `solve(*inputs)` on those lanes.

    After the first round fewer and fewer lanes still pivot: only those are solved,
    gathered into the smallest fixed-size batch that holds them.
    """
    k = active.shape[0]
    sizes = _lane_batches(k)

    def merge(keep, new, mask):
        return jnp.where(mask.reshape(mask.shape + (1,) * (new.ndim - 1)), new, keep)

    def gathered(size):
        def run(inputs):
            lanes = members_first(active)[:size]
            new = solve(*(x[lanes] for x in inputs))
            return jax.tree.map(
                lambda out, n: out.at[lanes].set(merge(out[lanes], n, active[lanes])),
                outputs,
                new,
            )

        return run

    def every(inputs):
        new = solve(*inputs)
        return jax.tree.map(lambda out, n: merge(out, n, active), outputs, new)

    if every_lane or len(sizes) == 1:
        return every(inputs)
    branch = jnp.searchsorted(jnp.array(sizes), jnp.sum(active))
    return lax.switch(branch, [gathered(size) for size in sizes[:-1]] + [every], inputs)


def _solve_retrying(g, u, free, ridge, slack, active, every_lane=False):
    """Solves the `active` lanes on their partitions `free`. A lane whose G_FF is
    singular (reg_eps=0 on a rank-deficient J) is solved again at a growing ridge;
    returns the slacks, the lanes still broken after that, and the ridges."""
    m = g.shape[0]

    def solve(u, free, ridge):
        return _solve_lanes(g, u, free, ridge)

    def attempt(ridge, slack, lanes, every_lane=False):
        outputs = (slack, jnp.zeros_like(lanes))
        return _on_active_lanes(solve, (u, free, ridge), outputs, lanes, every_lane)

    def again(carry):
        slack, broken, ridge, tries = carry
        ridge = _grow_ridge(ridge, broken, m)
        slack, broken = attempt(ridge, slack, broken)
        return slack, broken, ridge, tries + 1

    def cond(carry):
        return jnp.any(carry[1]) & (carry[3] < _RETRIES)

    slack, broken = attempt(ridge, slack, active, every_lane)
    slack, broken, ridge, _ = lax.while_loop(
        cond, again, (slack, broken, ridge, jnp.array(0))
    )
    return slack, broken, ridge


def _next_partition(state):
    """Block principal pivoting's exchange rule, with Murty's rule as the backup.

    Returns the partitions to solve next, the lanes to solve (pending or infeasible)
    and the updated counters."""
    count = jnp.sum(state.infeasible, axis=-1)
    flipping = count > 0
    improved = flipping & (count < state.best)
    use_budget = flipping & ~improved & (state.budget > 0)
    best = jnp.where(improved, count, state.best)
    budget = jnp.where(
        improved, _BUDGET, jnp.where(use_budget, state.budget - 1, state.budget)
    )
    full = improved | use_budget
    index = jnp.arange(state.free.shape[-1])[None, :]
    largest = jnp.max(jnp.where(state.infeasible, index, -1), axis=-1)
    flip = jnp.where(full[:, None], state.infeasible, index == largest[:, None])
    free = state.free ^ (flip & flipping[:, None])
    return free, flipping | state.pending, best, budget


def _unfinished(state):
    return jnp.any(state.pending) | jnp.any(state.infeasible)


class _Problem(NamedTuple):
    g: Float[Array, "m m"]
    u: Float[Array, "k m"]
    tol: float
    # For reduced solves: G stacked with G^{-1}, and -G u per lane.
    pair: Float[Array, "2 m m"] | None = None
    conflict: Float[Array, "k m"] | None = None


def _reduced_round(problem, state, first=False):
    """One exchange, then reduced solves (primal or dual, at most m/2 unknowns)."""
    free, active, best, budget = _next_partition(state)

    def solve(u, conflict, free):
        return _solve_reduced(problem.pair, u, conflict, free)

    outputs = (state.slack, jnp.zeros_like(state.slack), jnp.zeros_like(active))
    inputs = (problem.u, problem.conflict, free)
    slack, multiplier, broken = _on_active_lanes(solve, inputs, outputs, active, first)
    # A broken lane keeps its last partition, unsolved, for the full-size phase.
    free = jnp.where(broken[:, None], state.free, free)
    infeasible = _infeasible(free, slack, multiplier, problem.tol)
    return dataclasses.replace(
        state,
        free=free,
        slack=slack,
        infeasible=infeasible & (active & ~broken)[:, None],
        pending=broken | (state.pending & ~active),
        best=best,
        budget=budget,
        step=state.step + 1,
        stuck=jnp.any(broken),
    )


def _full_round(problem, state, first=False):
    """One exchange, then full-size masked solves with ridge retries."""
    g, u, tol = problem.g, problem.u, problem.tol
    free, active, best, budget = _next_partition(state)
    slack, broken, ridge = _solve_retrying(
        g, u, free, state.ridge, state.slack, active, first
    )
    # A lane that breaks down even at the largest ridge keeps its partition.
    free = jnp.where(broken[:, None], state.free, free)
    slack = jnp.where(broken[:, None], state.slack, slack)
    infeasible = _infeasible(free, slack, (u + slack) @ g, tol) | broken[:, None]
    return dataclasses.replace(
        state,
        free=free,
        slack=slack,
        infeasible=infeasible & active[:, None],
        pending=state.pending & ~active,
        best=best,
        budget=budget,
        ridge=ridge,
        step=state.step + 1,
    )


def block_pivoting(
    g: Float[Array, "m m"],
    u: Float[Array, "k m"],
    free: Bool[Array, "k m"],
    max_steps: int,
) -> tuple[Float[Array, "k m"], Bool[Array, ""]]:
    """Block principal pivoting from the partition `free`, on a Jacobi-scaled problem.

    With at least `_REDUCED_MIN_LANES` lanes and $G$ safely positive definite, the
    first half of `max_steps` uses reduced solves (see `_solve_reduced`); the rest,
    and everything otherwise (a singular $G$ with `reg_eps=0`, a breakdown, a cycle
    on roundoff), full-size masked solves with ridge retries. Both phases share the
    exchange rule, so the second one continues where the first stopped.

    Returns the solutions $u + s$ and whether every lane finished.
    """
    k, m = u.shape
    dtype = g.dtype
    init = _BPPState(
        free=free,
        slack=jnp.zeros((k, m), dtype),
        infeasible=jnp.zeros((k, m), bool),
        pending=jnp.ones((k,), bool),
        best=jnp.full((k,), m + 1),
        budget=jnp.full((k,), _BUDGET),
        ridge=jnp.zeros((k,), dtype),
        step=jnp.array(0),
        stuck=jnp.array(False),
    )
    tol = 10 * eps(dtype)
    full = ft.partial(_full_round, _Problem(g, u, tol))
    # The first round solves every lane: no loop and no lane gathering.
    if k >= _REDUCED_MIN_LANES:
        inverse, reduced_ok = _inverse(g)
        pair = jnp.stack([g, inverse])
        reduced = ft.partial(_reduced_round, _Problem(g, u, tol, pair, -(u @ g)))
        # Without a safe H the round is discarded and the full-size phase starts from
        # scratch (a select, not a cond: under vmap a cond would run both branches).
        state = reduced(init, first=True)
        state = jax.tree.map(lambda a, b: jnp.where(reduced_ok, a, b), state, init)

        def reduced_cond(state):
            steps_left = state.step < max(max_steps // 2, 1)
            return reduced_ok & ~state.stuck & _unfinished(state) & steps_left

        state = lax.while_loop(reduced_cond, reduced, state)
    else:
        state = full(init, first=True)

    def full_cond(state):
        return _unfinished(state) & (state.step < max_steps)

    final = lax.while_loop(full_cond, full, state)
    slack = _polish(g, u, final.free, final.slack, final.ridge)
    slack = jnp.where(final.free, jnp.maximum(slack, 0.0), 0.0)
    return u + slack, ~_unfinished(final)


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

    All lanes run with a done mask; pivoting stops when every lane has an empty
    infeasible set (typically 1 to 6 steps) or at `max_steps`. Each step factorises
    only the lanes still pivoting (gathered into batches of $k/8$, $k/4$, $k/2$ or $k$
    lanes), and the Cholesky factor of the system bordered by its right-hand side
    gives the forward substitution for free.

    Each solve has at most $m/2$ unknowns. Since $|F| + |A| = m$, a lane with
    $|F| \leq m/2$ solves $\hat G_{FF} s_F = -(\hat G \hat u)_F$, and any other lane
    solves the dual system $H_{AA} \lambda_A = \hat u_A$ with $H = \hat G^{-1}$
    (computed once), which gives the multipliers $\lambda_A$ and $v = H \lambda$.
    Both are exact on the same partition; on CPU a LAPACK Cholesky of half the size
    costs 3-5x less. This needs $\hat G$ safely positive definite (Cholesky pivots
    above $\sqrt{\epsilon}$; in float64 always so with the default `reg_eps`).
    Otherwise, and for whatever is left after half of `max_steps` (a breakdown, or a
    cycle on roundoff), pivoting continues with full-size masked solves: unridged at
    first, a (nearly) singular $\hat G_{FF}$ (`reg_eps=0` on a rank-deficient
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
    $10m + 10$. Reaching it gives `RESULTS.max_steps_reached`. Reduced solves use at
    most the first half; full-size solves continue from there.
"""

register_solver("bpp", BPP)
