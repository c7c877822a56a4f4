from typing import Literal, TypeAlias

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jaxtyping import Array, Bool, Float

from . import _linalg as linalg
from ._checks import check_gramian, check_lower, check_nonnegative
from ._custom_types import ScalarLike
from ._misc import all_finite, solve_dtype
from ._results import RESULTS
from ._solver import AbstractQPSolver, BPP, NesterovPGD, QPax
from ._solver.common import (
    cho_solve,
    eps,
    kkt_tolerance,
    masked_system,
    natural_residual,
)


SolverName: TypeAlias = Literal["bpp", "nesterov_pgd", "qpax"]
_SOLVERS = {"bpp": BPP, "nesterov_pgd": NesterovPGD, "qpax": QPax}


def to_solver(solver: SolverName | AbstractQPSolver) -> AbstractQPSolver:
    """Converter for `solver=`: a name, or a solver instance (passed through)."""
    if isinstance(solver, AbstractQPSolver):
        return solver
    if solver not in _SOLVERS:
        raise ValueError(
            f"Unknown solver {solver!r}; use one of {sorted(_SOLVERS)} or an "
            "AbstractQPSolver instance such as eqxjd.BPP()."
        )
    return _SOLVERS[solver]()


class DualConeSolution(eqx.Module):
    r"""The outcome of [`eqxjd.DualConeProjector.solve`][]: never raises, so failures
    can be inspected (or handled under `jit`) with `result`.

    - `value`: the solutions $V_j$, shape `(k, m)` (NaN for non-finite input and for a
        Gramian that is not positive semi-definite). For
        [`eqxjd.UPGradWeighting.solve`][] and [`eqxjd.DualProjWeighting.solve`][], the
        weights, shape `(m,)`.
    - `result`: an [`eqxjd.RESULTS`][]; `RESULTS.successful` when the solve passed the
        KKT check.
    - `residual`: the relative natural KKT residual of each lane, shape `(k,)`:
        $\|\min(\hat v - \hat u, \hat G \hat v)\|_\infty / \max(1, \|\hat v\|_\infty)$
        on the rescaled problem (Jacobi-scaled Gramian, lane with largest entry 1) that
        the check compares with its tolerance ($10^{-9}$ when solved in float64,
        $10^{-4}$ in float32, and $\sqrt{\epsilon} \|\hat G\|_F$ for a singular
        Gramian in float32, whose null space float32 resolves only to about
        $\sqrt{\epsilon}$). $0$ for lanes with $u_j \leq 0$, $\infty$ for non-finite
        input.
    """

    value: Float[Array, "..."]
    result: RESULTS
    residual: Float[Array, " k"]


class DualConeProjector(eqx.Module):
    r"""Projection onto the dual cone of the rows of $J$, in weight space: TorchJD's
    `QuadprogProjector`, solved on device.

    For each lower bound $u_j$ (a row of `lower`),

    $$V_j = \operatorname{argmin}_{v \geq u_j} v^\top G' v, \qquad
    G' = \frac{G}{\operatorname{tr} G} + \epsilon_{reg} I,$$

    with $G / \operatorname{tr} G$ replaced by $0$ when $\operatorname{tr} G <$
    `norm_eps` (TorchJD's absolute threshold). Then $J^\top V_j$ is the projection of
    $J^\top u_j$ onto the dual cone $\{x : J x \geq 0\}$.

    **What the ridge costs.** The solution satisfies the KKT conditions of $G'$, not of
    $G$: $G' V_j \geq 0$, so for $w = \sum_j V_j$ (UPGrad) or $w = V_1$ (DualProj)

    $$(J d)_i = (G w)_i \geq -\epsilon_{reg} \operatorname{tr}(G)\, w_i,
    \qquad d = J^\top w.$$

    The default `reg_eps = 1e-4` (TorchJD's) can thus let $d$ conflict with an
    objective whose gradient is small next to the others: for
    $J = [[1, 0], [-0.0098, 0.002]]$, UPGrad's $d$ has cosine $-0.93$ with the second
    row. When $\operatorname{tr} G <$ `norm_eps`, $G'$ is $\epsilon_{reg} I$, $w$ is
    the preference vector and only $(J d)_i \geq -\operatorname{tr}(G) \|w\|_2$
    holds. **`DualConeProjector(norm_eps=0.0, reg_eps=0.0)` gives the strict
    guarantee $J d \geq 0$** (to rounding) at every scale; the weights are then not
    unique when the rows of $J$ are linearly dependent (the aggregation $d$ is).

    **How it is solved.** Once, for every solver: the Gramian is normalised and
    regularised as above, in float64 whenever x64 is enabled (as TorchJD does);
    non-finite input gives NaN. The problem is rescaled to a canonical one: Jacobi
    scaling to a unit diagonal ($\hat G = D G' D$, $D = \operatorname{diag}(G')^{-1/2}$;
    a zero row is decoupled) and each lane to largest entry $1$ (lanes with
    $u_j \leq 0$ have the solution $0$). $m \leq 2$ is solved in closed form. A
    singular $\hat G$ (`reg_eps=0` on linearly dependent rows), whose Cholesky pivots
    fall below $10^{-8}$ ($10^{-5}$ in float32) or on which the plain solve fails, is
    solved by proximal-point steps
    $v_{t+1} = \operatorname{argmin}_{v \geq u} \frac12 v^\top \hat G v +
    \frac\delta2 \|v - v_t\|^2$ with a fixed $\delta = 10^{-2}$ (each a positive
    definite QP for the solver), each followed by an exact active-set finish started
    on the face the step found (Lawson & Hanson, with pseudo-inverse solves on the
    free set), until the KKT residual of the singular problem is at rounding level
    (usually after one step). Every lane's relative
    KKT residual is then checked (see [`eqxjd.DualConeSolution`][]) and the solution
    is mapped back. A Gramian that is not positive semi-definite gives
    `RESULTS.indefinite_gramian` and NaN.

    !!! Example

        ```python
        import jax.numpy as jnp
        import eqxjd

        J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        projector = eqxjd.DualConeProjector()
        V = projector(J @ J.T, jnp.eye(2) / 2)  # UPGrad's lanes: w = V.sum(0)
        solution = eqxjd.DualConeProjector(throw=False).solve(J @ J.T, jnp.eye(2))
        print(solution.result == eqxjd.RESULTS.successful, solution.residual)
        ```
    """

    solver: AbstractQPSolver = eqx.field(default="bpp", converter=to_solver)
    norm_eps: ScalarLike = 1e-4
    reg_eps: ScalarLike = 1e-4
    differentiable: bool = eqx.field(default=False, static=True)
    throw: bool = eqx.field(default=True, static=True)

    def __check_init__(self):
        check_nonnegative(self.norm_eps, "norm_eps")
        check_nonnegative(self.reg_eps, "reg_eps")

    def __call__(
        self, gramian: Float[Array, "m m"], lower: Float[Array, "k m"]
    ) -> Float[Array, "k m"]:
        """**Arguments:**

        - `gramian`: $G = J J^\\top$, an array of shape `(m, m)`.
        - `lower`: the lower bounds $u_j$, one QP per row, an array of shape `(k, m)`.

        **Returns:**

        The solutions $V$, an array of shape `(k, m)` with the dtype of `gramian`. With
        `throw=True`, a failed solve raises an `eqx.EquinoxRuntimeError` (under `jit`
        too); non-finite input gives NaN without raising.
        """
        solution = self.solve(gramian, lower)
        value = solution.value
        if self.throw:
            failed = (solution.result != RESULTS.successful) & (
                solution.result != RESULTS.nonfinite
            )
            value = solution.result.error_if(value, failed)
        return value

    def solve(
        self, gramian: Float[Array, "m m"], lower: Float[Array, "k m"]
    ) -> DualConeSolution:
        """As `__call__`, but never raises: returns an [`eqxjd.DualConeSolution`][]
        holding the solutions, the [`eqxjd.RESULTS`][] and the KKT residual of each
        lane.
        """
        check_gramian(gramian)
        m = gramian.shape[0]
        check_lower(lower, m)
        k = lower.shape[0]
        if m == 0 or k == 0:
            empty = jnp.zeros((k, m), gramian.dtype)
            zero = jnp.zeros((k,), gramian.dtype)
            return DualConeSolution(empty, RESULTS.successful, zero)
        return _solve(self, gramian, lower)


DualConeProjector.__init__.__doc__ = """**Arguments:**

- `solver`: the QP solver, a name (`"bpp"`, `"nesterov_pgd"`, `"qpax"`) or an
    [`eqxjd.AbstractQPSolver`][] instance carrying its own settings. Default `"bpp"`.
- `norm_eps`: $G$ is replaced by $G / \\operatorname{tr} G$, or by $0$ when
    $\\operatorname{tr} G$ < `norm_eps` (TorchJD's absolute threshold). Default `1e-4`.
- `reg_eps`: ridge added to the normalised Gramian. Default `1e-4`, as TorchJD. `0`
    (with `norm_eps=0`) gives the strict non-conflict guarantee; see above.
- `differentiable`: if `False` (default, as TorchJD), gradients through the solutions
    are stopped (zero, never wrong). If `True`, they are the exact derivative of the QP
    solution, by implicit differentiation on the identified free set (defined where
    that set is unique and, with `reg_eps=0`, the rows on it are linearly independent).
- `throw`: if `True` (default), a failed solve raises `eqx.EquinoxRuntimeError` (under
    `jit` too; see `EQX_ON_ERROR`). If `False`, nothing is checked at run time; use
    [`eqxjd.DualConeProjector.solve`][] to see the outcome.
"""


def projector_from(
    projector: DualConeProjector | None,
    *,
    solver: SolverName | AbstractQPSolver | None,
    norm_eps: ScalarLike | None,
    reg_eps: ScalarLike | None,
    differentiable: bool | None,
    throw: bool | None,
) -> DualConeProjector:
    """The projector of UPGrad and DualProj: `projector`, or one built from the
    keyword shortcuts (a `DualConeProjector()` when neither is given)."""
    shortcuts = {
        "solver": solver,
        "norm_eps": norm_eps,
        "reg_eps": reg_eps,
        "differentiable": differentiable,
        "throw": throw,
    }
    given = [name for name, value in shortcuts.items() if value is not None]
    if projector is not None:
        if given:
            names = ", ".join(f"`{name}=`" for name in given)
            raise ValueError(
                f"Pass either `projector=` or {names}, not both: these settings belong "
                "to the projector, e.g. `projector=eqxjd.DualConeProjector(solver=..., "
                "reg_eps=...)`."
            )
        return projector
    default = DualConeProjector()
    return DualConeProjector(
        solver=default.solver if solver is None else solver,
        norm_eps=default.norm_eps if norm_eps is None else norm_eps,
        reg_eps=default.reg_eps if reg_eps is None else reg_eps,
        differentiable=default.differentiable
        if differentiable is None
        else differentiable,
        throw=default.throw if throw is None else throw,
    )


# The canonical Gramian counts as singular below this Cholesky pivot. With the default
# reg_eps = 1e-4 every pivot stays near 1e-4 or above, so the default never gets there.
_SINGULAR_PIVOT = {"float64": 1e-8, "float32": 1e-5}
# Below this pivot a failed plain solve is retried with proximal steps: a Gramian
# singular up to rounding can pass the test above by the rounding of its factorisation.
_NEAR_SINGULAR_PIVOT = {"float64": 1e-6, "float32": 1e-3}
# Ridge of the proximal-point steps, relative to the unit diagonal: fixed, so every
# subproblem is as well conditioned as with the default reg_eps. The steps only have to
# find the face of the solution; `_finish_on_face` then solves on it exactly.
_PROXIMAL_RIDGE = 1e-2
_PROXIMAL_STEPS = 40
# Lanes are solved in chunks of at most this many matrix entries (8 MiB in float32):
# UPGrad's m lanes hold m masked m x m systems, m^3 entries. From m = 129 on the lanes
# go in chunks, which also keeps each batched factorisation in cache.
_LANE_ELEMENTS = 2**21


@eqx.filter_jit
def _solve(projector: DualConeProjector, gramian, lower):
    # Jitted (and inlined under an outer jit): eager calls would otherwise recompile the
    # solvers' loops on every call.
    dtype = gramian.dtype
    # At least float32 (half-precision input is solved in float32).
    work = solve_dtype(dtype) if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)
    finite = all_finite(gramian) & all_finite(lower)
    g = jnp.where(finite, gramian.astype(work), jnp.eye(gramian.shape[0], dtype=work))
    u = jnp.where(finite, lower.astype(work), 0.0)
    g = _normalised(g, projector.norm_eps, projector.reg_eps)
    g_stop, u_stop = lax.stop_gradient(g), lax.stop_gradient(u)

    g_hat, scale, negative = _jacobi(g_stop)
    unit, lane_scale, trivial = _unit_lanes(u_stop / scale[None, :])
    indefinite, singular, near = _definiteness(g_hat, dtype)
    indefinite = indefinite | negative | (jnp.trace(g_stop) < 0)

    def solve(lanes):
        return _solve_canonical(projector.solver, g_hat, lanes, singular, near)

    v_unit, result, singular = _in_lane_chunks(solve, unit)

    residual = jnp.where(trivial, 0.0, natural_residual(g_hat, unit, v_unit))
    bad = jnp.any(residual > _acceptance(g_hat, singular))
    result = RESULTS.where(
        (result == RESULTS.successful) & bad, RESULTS.kkt_check_failed, result
    )
    value = scale[None, :] * v_unit * lane_scale[:, None]
    if projector.differentiable:
        # Complementarity: a coordinate is free when its slack exceeds its multiplier.
        free = v_unit - unit > v_unit @ g_hat
        free = jnp.where(trivial[:, None], u_stop < 0, free)
        refined = _on_free_set(g, u, free)
        value = value + (refined - lax.stop_gradient(refined))
    else:
        value = lax.stop_gradient(value)
    result = RESULTS.where(indefinite, RESULTS.indefinite_gramian, result)
    result = RESULTS.where(finite, result, RESULTS.nonfinite)
    value = jnp.where(finite & ~indefinite, value, jnp.nan)
    residual = jnp.where(finite, residual, jnp.inf)
    return DualConeSolution(value.astype(dtype), result, residual.astype(dtype))


def _in_lane_chunks(solve, unit):
    """`solve(unit)`, over chunks of lanes in sequence when all at once would hold more
    than `_LANE_ELEMENTS` matrix entries (UPGrad's m lanes of m x m systems: m^3).

    The lanes are independent; padding lanes are trivial ($u = -1$, solution 0). The
    result is the first failure of a chunk, if any; `singular` whether any chunk took
    the proximal steps.
    """
    k, m = unit.shape
    size = max(1, _LANE_ELEMENTS // (m * m))
    if k <= size:
        return solve(unit)
    chunks = -(-k // size)
    padded = jnp.concatenate(
        [unit, -jnp.ones((chunks * size - k, m), unit.dtype)], axis=0
    )
    values, results, singular = lax.map(solve, padded.reshape(chunks, size, m))
    first = jnp.argmax(results._value != RESULTS.successful._value)
    result = jax.tree.map(lambda x: x[first], results)
    return values.reshape(chunks * size, m)[:k], result, jnp.any(singular)


def _acceptance(g_hat, singular):
    r"""The bound on the relative KKT residual: `kkt_tolerance`, or for a singular
    $\hat G$ in float32 $\sqrt{\epsilon} \|\hat G\|_F$.

    Rounded to float32, a singular Gramian has eigenvalues of order $\epsilon
    \|\hat G\|$ in place of its zeros, and its near-null vectors $z$ only have
    $\|\hat G z\| \lesssim \sqrt{\epsilon} \|\hat G\|$: no solve on a face can get
    below that. (In float64 the same bound is below `kkt_tolerance`.)
    """
    tolerance = kkt_tolerance(g_hat.dtype)
    if jnp.dtype(g_hat.dtype) != jnp.float32:
        return tolerance
    rounding = jnp.sqrt(eps(g_hat.dtype)) * jnp.linalg.norm(g_hat)
    return jnp.where(singular, jnp.maximum(tolerance, rounding), tolerance)


def _normalised(g, norm_eps, reg_eps):
    """TorchJD's $G / \\operatorname{tr} G + \\epsilon_{reg} I$, with the cliff: $0$
    when the trace is below `norm_eps` (or not positive)."""
    trace = jnp.trace(g)
    small = (trace < norm_eps) | ~(trace > 0)
    normalised = jnp.where(small, 0.0, g / jnp.where(small, 1.0, trace))
    return normalised + reg_eps * jnp.eye(g.shape[0], dtype=g.dtype)


def _jacobi(g):
    r"""$\hat G = D G D$, $D = \operatorname{diag}(G)^{-1/2}$, with an exact unit
    diagonal.

    A coordinate with a zero diagonal (a zero row of $J$ with `reg_eps=0`) has a zero
    row in a PSD $G$: it is decoupled and gets a unit diagonal, so its solution is
    $\max(u_i, 0)$, the one a vanishing ridge would give. Also returns whether a
    diagonal entry is negative (then $G$ is not PSD)."""
    m = g.shape[0]
    diag = jnp.diagonal(g)
    positive = diag > 0
    scale = jnp.where(positive, lax.rsqrt(jnp.where(positive, diag, 1.0)), 1.0)
    g_hat = g * scale[:, None] * scale[None, :]
    eye = jnp.eye(m, dtype=bool)
    g_hat = jnp.where(
        positive[:, None] & positive[None, :] & ~eye, g_hat, eye.astype(g.dtype)
    )
    return g_hat, scale, jnp.any(diag < 0)


def _unit_lanes(lanes):
    """Lanes with largest absolute entry 1 (homogeneity), their scales, and the lanes
    with $u \\leq 0$, whose solution is $0$ (replaced by $u = -1$, scale $0$)."""
    trivial = jnp.max(lanes, axis=-1) <= 0
    scale = jnp.max(jnp.abs(lanes), axis=-1)
    safe = jnp.where(trivial, 1.0, scale)
    unit = jnp.where(trivial[:, None], -1.0, lanes / safe[:, None])
    return unit, jnp.where(trivial, 0.0, scale), trivial


def _definiteness(
    g_hat, dtype
) -> tuple[Bool[Array, ""], Bool[Array, ""], Bool[Array, ""]]:
    r"""Whether $\hat G$ is clearly indefinite; whether it is singular: a Cholesky
    pivot below `_SINGULAR_PIVOT`, or a factorisation that breaks down but succeeds
    with a ridge at the rounding level of the input's dtype (PSD up to rounding); and
    whether it is nearly singular (a pivot below `_NEAR_SINGULAR_PIVOT`)."""
    m = g_hat.shape[0]
    name = jnp.dtype(g_hat.dtype).name
    pivots = jnp.diagonal(jnp.linalg.cholesky(g_hat)) ** 2
    finite = jnp.all(jnp.isfinite(pivots))
    regular = finite & jnp.all(pivots >= _SINGULAR_PIVOT[name])
    near = ~finite | jnp.any(pivots < _NEAR_SINGULAR_PIVOT[name])

    def breaks_down_with_ridge():
        ridge = 16 * m * eps(dtype) * jnp.eye(m, dtype=g_hat.dtype)
        return ~jnp.all(jnp.isfinite(jnp.linalg.cholesky(g_hat + ridge)))

    indefinite = lax.cond(regular, lambda: jnp.array(False), breaks_down_with_ridge)
    return indefinite, ~regular & ~indefinite, near


def _closed_form(g_hat, lower):
    r"""The exact answer for $m \leq 2$ (unit diagonal): $\max(u, 0)$ for $m = 1$; for
    $m = 2$, $\hat G = [[1, b], [b, 1]]$ and the solution is one of $u$,
    $(-b u_2, u_2)$, $(u_1, -b u_1)$ and $0$ (free sets $\{\}$, $\{1\}$, $\{2\}$,
    $\{1, 2\}$): the one whose KKT residual vanishes."""
    if lower.shape[1] == 1:
        return jnp.maximum(lower, 0.0)
    b = g_hat[0, 1]
    first, second = lower[:, 0], lower[:, 1]
    candidates = jnp.stack(
        [
            lower,
            jnp.stack([-b * second, second], axis=-1),
            jnp.stack([first, -b * first], axis=-1),
            jnp.zeros_like(lower),
        ]
    )
    residuals = jnp.stack([natural_residual(g_hat, lower, c) for c in candidates])
    best = jnp.argmin(residuals, axis=0)
    return jnp.take_along_axis(candidates, best[None, :, None], axis=0)[0]


def _finish_on_face(g_hat, unit, v):
    r"""An exact solution, by Lawson & Hanson's active-set method started on the face
    of `v` (which a proximal step found).

    With $F = \{v > u\}$ fixed, the minimisers on the face are the $v'$ with
    $v'_A = u_A$ and $(\hat G v')_F = 0$. $\hat G_{FF}$ may be singular, but the system
    is consistent (its null vectors $z$ have $z^\top \hat G_{F \cdot} = 0$), so the
    nearest one is $v + c$, $c_F = -\hat G_{FF}^+ (\hat G v)_F$, by an
    eigendecomposition whose rounding-level eigenvalues count as zero: the limit of
    infinitely many proximal steps on the face. If it leaves $v \geq u$, the step
    stops at the first bound it meets (the objective still decreases) and that index
    leaves $F$; at the face's minimiser, the bound with the most negative multiplier
    $(\hat G v)_j$, if any, joins $F$. Both repeat until the KKT conditions hold (at
    most $3m$ steps).
    """
    k, m = unit.shape
    dtype = g_hat.dtype
    tolerance = 0.1 * kkt_tolerance(dtype)

    def correction(v, free):
        values, vectors = jnp.linalg.eigh(masked_system(g_hat, free))
        # Rounding of an exactly singular Gramian leaves its null eigenvalues well
        # below m * eps * (largest eigenvalue).
        cut = m * eps(dtype) * jnp.max(values, axis=-1)
        keep = values > cut[:, None]
        inverse = jnp.where(keep, 1 / jnp.where(keep, values, 1.0), 0.0)
        rhs = jnp.where(free, -(v @ g_hat), 0.0)
        coefficients = jnp.einsum("kij,ki->kj", vectors, rhs) * inverse
        return jnp.where(free, jnp.einsum("kij,kj->ki", vectors, coefficients), 0.0)

    def body(carry):
        v, free, done, step = carry
        c = correction(v, free)
        slack = v - unit
        blocking = free & (slack + c <= 0)
        blocked = jnp.any(blocking, axis=-1)
        ratio = jnp.where(blocking, slack / jnp.where(blocking, -c, 1.0), jnp.inf)
        alpha = jnp.minimum(jnp.min(ratio, axis=-1), 1.0)
        first = blocking & (ratio <= alpha[:, None])
        moved = jnp.maximum(jnp.where(first, unit, v + alpha[:, None] * c), unit)
        # Optimal on the face: add the bound with the most negative multiplier, if any.
        multiplier = jnp.where(free | blocked[:, None], jnp.inf, moved @ g_hat)
        entering = jnp.argmin(multiplier, axis=-1)
        more = jnp.min(multiplier, axis=-1) < -tolerance
        added = more[:, None] & (jnp.arange(m)[None, :] == entering[:, None])
        v = jnp.where(done[:, None], v, moved)
        new_free = (free & ~first & (moved - unit > slack_tolerance)) | added
        free = jnp.where(done[:, None], free, new_free)
        return v, free, done | (~blocked & ~more), step + 1

    def cond(carry):
        _, _, done, step = carry
        return ~jnp.all(done) & (step < 3 * m)

    # Slacks at rounding level count as bounds: each one left in F would cost a step
    # that only moves it onto its bound. A lane that already satisfies the KKT
    # conditions is left alone.
    slack_tolerance = 16 * eps(dtype)
    done = natural_residual(g_hat, unit, v) <= 1e-2 * kkt_tolerance(dtype)
    init = (v, v - unit > slack_tolerance, done, jnp.array(0))
    v, *_ = lax.while_loop(cond, body, init)
    return v


def _solve_canonical(solver, g_hat, unit, singular, near_singular):
    r"""The solver on the canonical problem, or proximal-point steps around it when
    $\hat G$ is singular (the first step, from $v = 0$, is the plain solve when it
    is not), each followed by an exact solve on the face it found. A plain solve that
    fails on a nearly singular $\hat G$ (singular to rounding, but its Cholesky
    pivots passed the test) starts over with proximal steps. Also returns whether they
    ran."""
    k, m = unit.shape
    if m <= 2:
        return _closed_form(g_hat, unit), RESULTS.successful, jnp.array(False)
    dtype = g_hat.dtype
    eye = jnp.eye(m, dtype=dtype)
    target = 1e-2 * kkt_tolerance(dtype)

    def proximal_step(v, singular):
        # argmin_{v >= u} 1/2 v^T G v + delta/2 |v - v_t|^2 is, with v = y + c and
        # (G + delta I) c = delta v_t, the canonical QP in y with bound u - c, whose
        # matrix is G + delta I, rescaled to a unit diagonal.
        delta = jnp.where(singular, jnp.asarray(_PROXIMAL_RIDGE, dtype), 0.0)

        def shifted():
            factor = jnp.linalg.cholesky(g_hat + delta * eye)
            return jsl.cho_solve((factor, True), delta * v.T).T

        shift = lax.cond(singular, shifted, lambda: jnp.zeros_like(v))
        lanes, scale, _ = _unit_lanes(unit - shift)
        y, result = solver.solve((g_hat + delta * eye) / (1 + delta), lanes)
        return y * scale[:, None] + shift, result

    def body(carry):
        previous, last, step, residual, _, singular = carry
        v, result = proximal_step(previous, singular)
        failed = result != RESULTS.successful
        restart = failed & ~singular & near_singular & (step == 0)
        # The first step reports its own failure; a later failed subproblem ends the
        # iteration (the KKT check judges the last accepted iterate).
        keep = failed & (step > 0)
        v = jnp.where(keep | restart, previous, v)
        result = RESULTS.where(keep, last, result)
        result = RESULTS.where(restart, RESULTS.successful, result)
        singular = singular | restart
        lanes = natural_residual(g_hat, unit, v)

        def finish():
            finished = _finish_on_face(g_hat, unit, v)
            better = natural_residual(g_hat, unit, finished) < lanes
            return jnp.where(better[:, None], finished, v)

        v = lax.cond(singular & ~restart, finish, lambda: v)
        new = jnp.where(restart, jnp.inf, jnp.max(natural_residual(g_hat, unit, v)))
        # A step that gains less than 10% (rounding level) ends the iteration too.
        stalled = keep | ((step > 0) & (new > 0.9 * residual))
        return v, result, step + 1, jnp.minimum(new, residual), stalled, singular

    def cond(carry):
        _, result, step, residual, stalled, singular = carry
        more = singular & (residual > target) & ~stalled & (step < _PROXIMAL_STEPS)
        return (step == 0) | (more & (result == RESULTS.successful))

    init = (
        jnp.zeros_like(unit),
        RESULTS.successful,
        jnp.array(0),
        jnp.array(jnp.inf, dtype),
        jnp.array(False),
        singular,
    )
    v, result, _, _, _, singular = lax.while_loop(cond, body, init)
    return v, result, singular


def _on_free_set(g, u, free):
    # With the free set F fixed, v_F = -G_FF^{-1} G_FA u_A is smooth in G and u, so this
    # one masked solve carries the exact derivative of the QP (away from degenerate
    # points).
    m = g.shape[0]
    eye = jnp.eye(m, dtype=g.dtype)
    both_free = free[:, :, None] & free[:, None, :]
    system = jnp.where(both_free, g[None], eye[None])
    active_part = jnp.where(free, 0.0, u)
    rhs = jnp.where(free, -(active_part @ g), active_part)
    return cho_solve(linalg.cholesky(system), rhs)
