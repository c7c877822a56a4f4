import dataclasses
from typing import NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._results import RESULTS
from .base import AbstractQPSolver
from .common import (
    bordered_solve,
    eps,
    exchange,
    members_first,
    solve_on_free_set,
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
    # Lanes whose solve broke down even with a ridge.
    broken: Bool[Array, " k"]
    step: Int[Array, ""]
    # A reduced solve broke down: the full-size phase takes over.
    stuck: Bool[Array, ""]


# H = G^{-1} costs about four full-size lane solves; each reduced solve saves about
# 70% of one. Below this many lanes (DualProj has one) the full-size solves win.
_REDUCED_MIN_LANES = 8


def _infeasible(free, slack, multiplier, tol):
    return (free & (slack < -tol)) | (~free & (multiplier < -tol))


def _inverse(gramian):
    r"""$H = G^{-1}$, and whether G is far enough from singular for solves on $H$ (its
    Cholesky pivots above $\sqrt{\epsilon}$)."""
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


def _lane_batches(k: int) -> list[int]:
    # A batch of k/4 lanes (at least 4), then all k. Every size is one more copy of
    # the solve to compile; after the first round or two few lanes are left.
    return ([k // 4] if k // 4 >= 4 else []) + [k]


def _on_active_lanes(solve, inputs, outputs, active):
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

    if len(sizes) == 1:
        return every(inputs)
    branch = jnp.searchsorted(jnp.array(sizes), jnp.sum(active))
    return lax.switch(branch, [gathered(size) for size in sizes[:-1]] + [every], inputs)


def _next_partition(state):
    """The partitions to solve next, the lanes to solve (pending or infeasible) and
    the updated counters."""
    free, flipping, best, budget = exchange(
        state.free, state.infeasible, state.best, state.budget
    )
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


def _reduced_round(problem, state):
    """One exchange, then reduced solves (primal or dual, at most m/2 unknowns)."""
    free, active, best, budget = _next_partition(state)

    def solve(u, conflict, free):
        return _solve_reduced(problem.pair, u, conflict, free)

    outputs = (state.slack, jnp.zeros_like(state.slack), jnp.zeros_like(active))
    inputs = (problem.u, problem.conflict, free)
    slack, multiplier, broken = _on_active_lanes(solve, inputs, outputs, active)
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


def _full_round(problem, state):
    """One exchange, then full-size masked solves of every lane (a fallback for many
    lanes, so not gathered: one copy of the solve to compile)."""
    g, u, tol = problem.g, problem.u, problem.tol
    free, active, best, budget = _next_partition(state)
    slack = jnp.where(active[:, None], solve_on_free_set(g, u, free), state.slack)
    # A lane that breaks down even with a ridge stops, with its last partition.
    broken = active & ~jnp.all(jnp.isfinite(slack), axis=-1)
    free = jnp.where(broken[:, None], state.free, free)
    slack = jnp.where(broken[:, None], state.slack, slack)
    infeasible = _infeasible(free, slack, (u + slack) @ g, tol)
    return dataclasses.replace(
        state,
        free=free,
        slack=slack,
        infeasible=infeasible & (active & ~broken)[:, None],
        pending=state.pending & ~active,
        best=best,
        budget=budget,
        broken=state.broken | broken,
        step=state.step + 1,
    )


def block_pivoting(
    g: Float[Array, "m m"],
    u: Float[Array, "k m"],
    free: Bool[Array, "k m"],
    max_steps: int,
    inverse: tuple[Float[Array, "m m"], Bool[Array, ""]] | None = None,
) -> tuple[Float[Array, "k m"], Bool[Array, ""], Bool[Array, ""]]:
    r"""Block principal pivoting from the partitions `free`, with direct solves.

    With `inverse` ($G^{-1}$ and whether it is safe, for at least `_REDUCED_MIN_LANES`
    lanes), the first half of `max_steps` uses reduced solves (see `_solve_reduced`);
    the rest, and everything otherwise (a breakdown, a cycle on roundoff), full-size
    masked solves. Both phases share the exchange rule, so the second one continues
    where the first stopped.

    Returns the solutions $u + s$, whether every lane finished, and whether one broke
    down.
    """
    k, m = u.shape
    dtype = g.dtype
    init = _BPPState(
        free=free,
        slack=jnp.zeros((k, m), dtype),
        infeasible=jnp.zeros((k, m), bool),
        pending=jnp.ones((k,), bool),
        best=jnp.full((k,), m + 1),
        budget=jnp.full((k,), 3),
        broken=jnp.zeros((k,), bool),
        step=jnp.array(0),
        stuck=jnp.array(False),
    )
    tol = 10 * eps(dtype)
    state = init
    if inverse is not None:
        h, safe = inverse
        reduced = _Problem(g, u, tol, jnp.stack([g, h]), -(u @ g))

        def reduced_cond(state):
            steps_left = state.step < max(max_steps // 2, 1)
            return safe & ~state.stuck & _unfinished(state) & steps_left

        state = lax.while_loop(
            reduced_cond, lambda s: _reduced_round(reduced, s), state
        )

    def full_cond(state):
        return _unfinished(state) & (state.step < max_steps)

    full = _Problem(g, u, tol)
    final = lax.while_loop(full_cond, lambda s: _full_round(full, s), state)
    slack = jnp.where(final.free, jnp.maximum(final.slack, 0.0), 0.0)
    return u + slack, ~_unfinished(final), jnp.any(final.broken)


class BPP(AbstractQPSolver):
    r"""Block principal pivoting with Murty's backup rule (Júdice & Pires; Kim & Park).

    Each lane solves the LCP $s \geq 0$, $w = \hat G(\hat u + s) \geq 0$,
    $s^\top w = 0$. A lane holds a guess $F$ of the free set $\{s > 0\}$, solves
    $\hat G_{FF} s_F = -(\hat G \hat u)_F$ exactly, and exchanges every infeasible
    index ($s_j < 0$ on $F$, $w_j < 0$ off $F$) between $F$ and its complement. When
    the number of infeasible indices has not decreased for three steps, only the
    largest infeasible index is exchanged (Murty's rule), which terminates finitely
    for the positive definite Gramian. The cold start is
    $F = \{j : (\hat G \hat u)_j < 0\}$, the rows that conflict.

    All lanes run with a done mask; pivoting stops when every lane has an empty
    infeasible set (typically 1 to 6 steps) or at `max_steps`. With at least 8 lanes
    (UPGrad), every solve has at most $m/2$ unknowns: a lane with $|F| \leq m/2$
    solves on $F$, any other the dual system $H_{AA} \lambda_A = \hat u_A$ on its
    active set, with $H = \hat G^{-1}$ computed once (on CPU a Cholesky of half the
    size costs 3-5x less). Each step factorises only the lanes still pivoting,
    gathered into a batch of $k/4$ lanes when they fit. Fewer lanes (DualProj has one)
    use full-size masked solves, as does whatever is left after half of `max_steps`
    (a breakdown, or a cycle on rounding).

    Júdice & Pires, *A block principal pivoting algorithm for large-scale strictly
    monotone linear complementarity problems*, Comput. Oper. Res. 21(5), 1994.
    Kim & Park, *Fast nonnegative matrix factorization: an active-set-like method and
    comparisons*, SIAM J. Sci. Comput. 33(6), 2011.
    """

    max_steps: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(
                f"`max_steps` must be None or at least 1; got {self.max_steps}."
            )

    def solve(
        self, gramian: Float[Array, "m m"], lower: Float[Array, "k m"]
    ) -> tuple[Float[Array, "k m"], RESULTS]:
        k, m = lower.shape
        g, u = gramian, lower
        max_steps = 10 * m + 10 if self.max_steps is None else self.max_steps
        free = (u @ g) < 0
        inverse = _inverse(g) if k >= _REDUCED_MIN_LANES else None
        solution, finished, broken = block_pivoting(g, u, free, max_steps, inverse)
        finite = jnp.all(jnp.isfinite(solution))
        result = RESULTS.where(finished, RESULTS.successful, RESULTS.max_steps_reached)
        result = RESULTS.where(finite & ~broken, result, RESULTS.kkt_check_failed)
        return solution, result


BPP.__init__.__doc__ = """**Arguments:**

- `max_steps`: the maximum number of pivoting steps (static). `None` (default) means
    $10m + 10$. Reaching it gives `RESULTS.max_steps_reached`. Reduced solves use at
    most the first half; full-size solves continue from there.
"""
