from typing import ClassVar

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._aggregator import AbstractStatefulWeightedAggregator
from .._checks import (
    check_gramian,
    check_range,
    check_scalar,
    check_state_shape,
    require_state,
    WEIGHTING_USAGE,
)
from .._custom_types import ScalarLike, State
from .._misc import all_finite, keep_state_unless, solve_dtype
from .._scale import (
    exponent_of_pair,
    in_window,
    NARROW,
    promote_half,
    scale_pow2,
    to_window,
    vector_in_window,
    wide_window,
    work_dtype,
)
from .._weighting import AbstractStatefulWeighting, Reads


_HIGHEST = lax.Precision.HIGHEST


class _PCDState(eqx.Module):
    # The EMA is `sq_norm_ema * 4**exponent`: the exponent is 0 unless the squared
    # norms leave the range of the dtype.
    sq_norm_ema: Float[Array, " m"]
    n_steps: Int[Array, ""]
    exponent: Int[Array, ""]


def _ema(
    old: Float[Array, " m"],
    old_exponent: Int[Array, ""],
    new: Float[Array, " m"],
    new_exponent: Int[Array, ""],
    beta: Float[Array, ""],
) -> tuple[Float[Array, " m"], Int[Array, ""]]:
    """`beta * old + (1 - beta) * new` for values given as `x * 4**exponent`, in the
    same form (exponent 0 whenever representable)."""
    old_empty = ~jnp.any(old > 0)
    new_empty = ~jnp.any(new > 0)
    unit = jnp.where(
        old_empty,
        new_exponent,
        jnp.where(new_empty, old_exponent, jnp.maximum(old_exponent, new_exponent)),
    )
    total = beta * scale_pow2(old, 2 * (old_exponent - unit)) + (1 - beta) * scale_pow2(
        new, 2 * (new_exponent - unit)
    )
    return exponent_of_pair(total, unit, wide_window(total.dtype))


def _to_tau(value):
    if isinstance(value, (int, float)):
        return value
    array = jnp.asarray(value)
    if array.ndim > 1:
        raise ValueError(
            "`tau` must be a float or a vector (1-D array); got an array of shape "
            f"{array.shape}."
        )
    if not jnp.issubdtype(array.dtype, jnp.inexact):
        array = array.astype(jnp.result_type(float))
    return array


@eqx.filter_jit
def pcd_solve(
    gramian: Float[Array, "m m"],
    taus: Float[Array, " k"],
    tol: float = 1e-9,
    dependence_tol: ScalarLike = 1e-9,
    max_iters: int | None = None,
) -> Float[Array, " m"]:
    r"""PCD's quadratic program on the Gramian $G$ of $g_1, \dots, g_m$ (row 0 primary):

    $$\min_d \tfrac12\|d - g_1\|^2 \quad\text{s.t.}\quad
    g_j^\top d \ge \tau_j \|g_j\|^2, \quad j = 2, \dots, m.$$

    Returns $w = [1, \mu_2, \dots, \mu_m]$ with $d = \sum_i w_i g_i$ ($\mu$ the KKT
    multipliers), or $[1, 0, \dots, 0]$ if the constraints are infeasible. Dual
    active-set method of Goldfarb & Idnani (1983) with identity Hessian, step for step
    as TorchJD, with the active set held as a boolean mask (masked linear solves)
    inside one `lax.while_loop`; each inner pass spends one of the `max_iters`
    (default $10m$) iterations. Ties in the ratio test go to the lowest index
    (TorchJD: the earliest added constraint).
    """
    m = gramian.shape[0]
    dtype = gramian.dtype
    weights = jnp.zeros((m,), dtype).at[0].set(1)
    if m == 1:
        return weights
    if max_iters is None:
        max_iters = 10 * m
    k = m - 1
    gs = gramian[1:, 1:]
    b = taus.astype(dtype) * jnp.diagonal(gs) - gramian[1:, 0]
    tiny = jnp.asarray(jnp.finfo(dtype).tiny, dtype)
    atol = jnp.asarray(tol, dtype) * jnp.maximum(jnp.max(jnp.diagonal(gramian)), tiny)
    dependence_tol = jnp.asarray(dependence_tol, dtype)
    inf = jnp.asarray(jnp.inf, dtype)
    eye = jnp.eye(k, dtype=dtype)
    index = jnp.arange(k)

    def slacks_of(mu, active):
        s = jnp.matmul(gs, mu, precision=_HIGHEST) - b
        return jnp.where(active, jnp.zeros_like(s), s)

    def cond(carry):
        _, _, _, _, n_iters, done, _ = carry
        return ~done & (n_iters < max_iters)

    def body(carry):
        mu, active, in_inner, p, n_iters, done, infeasible = carry
        # Outer step: pick the most violated constraint (no budget spent).
        slacks = slacks_of(mu, active)
        p_new = jnp.argmin(slacks)
        optimal = slacks[p_new] >= -atol
        p = jnp.where(in_inner, p, p_new)
        slack_p = jnp.where(
            in_inner, jnp.dot(gs[p], mu, precision=_HIGHEST) - b[p], slacks[p_new]
        )
        stop = ~in_inner & optimal

        # Inner pass: add p to the active set, possibly dropping one constraint first.
        both = active[:, None] & active[None, :]
        matrix = jnp.where(both, gs, eye)
        rhs = jnp.where(active, gs[:, p], jnp.zeros_like(mu))
        r = jnp.linalg.solve(matrix, rhs)
        r = jnp.where(active, r, jnp.zeros_like(r))
        z_sq = gs[p, p] - jnp.dot(jnp.where(active, gs[p], jnp.zeros_like(mu)), r)
        positive = active & (r > 0)
        safe_r = jnp.where(positive, r, jnp.ones_like(r))
        ratios = jnp.where(positive, mu / safe_r, inf)
        drop = jnp.argmin(ratios)
        partial = ratios[drop]
        nonzero = z_sq > dependence_tol * gs[p, p]
        safe_z = jnp.where(nonzero, z_sq, jnp.ones_like(z_sq))
        full = jnp.where(nonzero, -slack_p / safe_z, inf)
        step = jnp.minimum(partial, full)
        no_step = step == inf
        safe_step = jnp.where(no_step, jnp.zeros_like(step), step)
        mu_next = mu - safe_step * r
        mu_next = mu_next.at[p].add(safe_step)
        add = full <= partial
        active_next = jnp.where(add, active | (index == p), active & (index != drop))
        mu_next = jnp.where(add | (index != drop), mu_next, jnp.zeros_like(mu_next))

        run = ~stop
        mu = jnp.where(run & ~no_step, mu_next, mu)
        active = jnp.where(run & ~no_step, active_next, active)
        in_inner = run & ~no_step & ~add
        n_iters = n_iters + run.astype(n_iters.dtype)
        done = stop | no_step
        infeasible = run & no_step
        return mu, active, in_inner, p, n_iters, done, infeasible

    init = (
        jnp.zeros((k,), dtype),
        jnp.zeros((k,), bool),
        jnp.array(False),
        jnp.array(0),
        jnp.array(0),
        jnp.array(False),
        jnp.array(False),
    )
    mu, *_, infeasible = lax.while_loop(cond, body, init)
    mu = jnp.where(infeasible, jnp.zeros_like(mu), jnp.maximum(mu, 0))
    return weights.at[1:].set(mu)


class PCDWeighting(AbstractStatefulWeighting):
    r"""The weighting of [`eqxjd.PCD`][] (row 0 of the Jacobian is the primary
    objective). With $s_i = 1/\sqrt{\hat v_i + \epsilon}$ ($\hat v$ the bias-corrected
    EMA of $\|g_i\|^2$, state), $\tilde g_i = s_i g_i$ and $\hat G = G \odot s s^\top$:

    $$\tilde d = \operatorname{argmin}_d \tfrac12\|d - \tilde g_1\|^2 \ \text{s.t.}\
    \tilde g_j^\top d \ge \tau_j \|\tilde g_j\|^2\ (j \ge 2),\qquad
    w = \frac{\|g_1\|}{\|\tilde d\|}\, s \odot q,$$

    with $\tilde d = \sum_i q_i \tilde g_i$ (`pcd_solve`). $g_1 = 0$ or
    $\tilde d \approx 0$ give $w = 0$; infeasible constraints give $w = e_1$ (the
    output is $g_1$). Computed in float64 (when enabled) whatever the input dtype.
    Non-finite input gives NaN weights and leaves the state unchanged. Only ratios of
    the $s_i$ and of the entries of $G$ enter $w$, so with `eps = 0` the weights of
    $c\,G$ equal those of $G$ for every $c > 0$; the EMA keeps the true squared norms
    however large or small (with a power-of-4 exponent in the state).

    Stateful: the EMA $v \in \mathbb{R}^m$ and the step count. Not differentiable, not
    permutation invariant (by design).

    *Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
    Multi-Objective Optimization*, TMLR 2026,
    [arXiv:2606.29521](https://arxiv.org/abs/2606.29521).
    """

    reads: ClassVar[Reads] = "gramian"

    tau: ScalarLike | Float[Array, " k"] = eqx.field(default=0.02, converter=_to_tau)
    beta: ScalarLike = 0.999
    eps: ScalarLike = 1e-8

    differentiable: ClassVar[bool] = False

    def __check_init__(self):
        check_range(self.tau, "tau", 0.0, 1.0)
        check_scalar(self.beta, "beta")
        check_scalar(self.eps, "eps")
        check_range(self.beta, "beta", 0.0, 1.0, high_open=True)
        check_range(self.eps, "eps", 0.0)

    def init(self, gramian: Float[Array, "m m"], /) -> State:
        gramian = check_gramian(gramian)
        m = gramian.shape[0]
        return _PCDState(
            sq_norm_ema=jnp.zeros((m,), solve_dtype(gramian.dtype)),
            n_steps=jnp.zeros((), jnp.int32),
            exponent=jnp.zeros((), jnp.int32),
        )

    def _taus(self, m: int, dtype) -> Float[Array, " k"]:
        if jnp.ndim(self.tau) == 1:
            tau = jnp.asarray(self.tau)
            if tau.shape[0] != m - 1:
                raise ValueError(
                    "When `tau` is a vector it needs one value per secondary "
                    "objective: "
                    f"got {tau.shape[0]} values for {m - 1} secondary objectives."
                )
            return tau.astype(dtype)
        return jnp.full((max(m - 1, 0),), jnp.asarray(self.tau, dtype), dtype)

    def __call__(
        self,
        gramian: Float[Array, "m m"],
        state: State = None,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " m"], State]:
        require_state(state, "PCDWeighting", WEIGHTING_USAGE)
        gramian = check_gramian(gramian)
        work = promote_half(gramian)
        g, k = to_window(work, wide_window(work.dtype))
        weights, state = self._scaled_call(g, k, state)
        return weights.astype(gramian.dtype), state

    def _scaled_call(
        self,
        gramian: Float[Array, "m m"],
        k: Int[Array, ""],
        state: State = None,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " m"], State]:
        # The weights for the Gramian `gramian * 4^k` (see `_scale.py`): the EMA keeps
        # the true squared norms (with an exponent), the weights only need ratios.
        require_state(state, "PCDWeighting", WEIGHTING_USAGE)
        gramian = check_gramian(gramian)
        m = gramian.shape[0]
        check_state_shape(state.sq_norm_ema.shape, (m,), "PCD")
        dtype = gramian.dtype
        if m == 0:
            return jnp.zeros((0,), dtype), state
        sd = solve_dtype(dtype)
        g = gramian.astype(sd)
        taus = self._taus(m, sd)
        finite = all_finite(g)

        beta = jnp.asarray(self.beta, sd)
        one = jnp.ones((), sd)
        sq_norms = jnp.diagonal(g)
        n_steps = state.n_steps + 1
        ema, exponent = _ema(
            state.sq_norm_ema.astype(sd), state.exponent, sq_norms, k, beta
        )
        debiased = ema / (one - beta ** n_steps.astype(sd))
        # s_i = 1 / sqrt(v_i + eps) with v = debiased * 4^exponent, up to the common
        # factor 2^-exponent, which does not change the weights; eps is capped where
        # it dominates the EMA by far more than the dtype can resolve.
        eps = scale_pow2(jnp.asarray(self.eps, sd), -2 * exponent)
        eps = jnp.minimum(eps, jnp.asarray(jnp.finfo(sd).max / 4, sd))
        denominators = jnp.sqrt(debiased + eps)
        positive = denominators > 0
        safe_den = jnp.where(positive, denominators, one)
        scales = jnp.where(positive, one / safe_den, jnp.zeros_like(safe_den))
        scales = vector_in_window(scales, NARROW // 2)

        precision = 10.0 * float(np.finfo(work_dtype(dtype)).eps)
        g_unit = in_window(g)
        normalized = g_unit * jnp.outer(scales, scales)
        safe_normalized = jnp.where(finite, normalized, jnp.eye(m, dtype=sd))
        q = pcd_solve(safe_normalized, taus, dependence_tol=max(1e-9, precision))
        sq = jnp.dot(
            q, jnp.matmul(normalized, q, precision=_HIGHEST), precision=_HIGHEST
        )
        magnitude = jnp.dot(jnp.abs(q), jnp.sqrt(jnp.diagonal(normalized))) ** 2
        keep = (g_unit[0, 0] > 0) & (sq > precision * magnitude)
        safe_sq = jnp.where(keep, sq, one)
        weights = jnp.where(keep, q * scales * jnp.sqrt(g_unit[0, 0] / safe_sq), 0)
        weights = jnp.where(finite, weights, jnp.full_like(weights, jnp.nan)).astype(
            dtype
        )

        new_state = _PCDState(
            sq_norm_ema=ema.astype(state.sq_norm_ema.dtype),
            n_steps=n_steps,
            exponent=exponent,
        )
        new_state = keep_state_unless(finite, new_state, state)
        return lax.stop_gradient(weights), lax.stop_gradient(new_state)


_ARGS = """**Arguments:**

- `tau`: the fraction $\\tau \\in [0, 1]$ of normalised first-order progress guaranteed
    to each secondary objective: a float shared by all, or a 1-D array with one value
    per secondary objective (length $m - 1$, checked at call time). Default `0.02`.
- `beta`: EMA decay $\\beta \\in [0, 1)$ of the squared gradient norms. Default `0.999`.
- `eps`: non-negative constant added to the EMA before the inverse square root.
    Default `1e-8`.
"""
PCDWeighting.__init__.__doc__ = _ARGS


class PCD(AbstractStatefulWeightedAggregator):
    r"""Priority-Constrained Descent: follow the primary gradient $g_1$ (row 0) as
    closely as possible while guaranteeing each secondary objective a fraction $\tau$
    of normalised progress,

    $$\tilde d = \operatorname{argmin}_d \tfrac12\|d - \tilde g_1\|^2 \ \text{s.t.}\
    \tilde g_j^\top d \ge \tau_j\|\tilde g_j\|^2,\qquad A(J) = \|g_1\|\,
    \frac{\tilde d}{\|\tilde d\|}$$

    where $\tilde g_i = g_i / \sqrt{\hat v_i + \epsilon}$ and $\hat v$ is the
    bias-corrected EMA of the squared gradient norms (state; see
    [`eqxjd.PCDWeighting`][]). $g_1 = 0$ gives $0$; infeasible constraints (needs
    $m \ge 3$) are dropped and the output is $g_1$. Stateful, not differentiable, not
    permutation invariant.

    *Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
    Multi-Objective Optimization*, TMLR 2026,
    [arXiv:2606.29521](https://arxiv.org/abs/2606.29521).
    """

    weighting: PCDWeighting

    def __init__(
        self,
        tau: ScalarLike | Float[ArrayLike, " k"] = 0.02,
        beta: ScalarLike = 0.999,
        eps: ScalarLike = 1e-8,
    ):
        self.weighting = PCDWeighting(tau, beta, eps)


PCD.__init__.__doc__ = _ARGS
