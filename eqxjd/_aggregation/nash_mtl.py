from typing import ClassVar

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from .._aggregator import AbstractStatefulWeightedAggregator
from .._checks import check_matrix, check_nonnegative, require_state, WEIGHTING_USAGE
from .._custom_types import ScalarLike, State
from .._misc import all_finite, combine, gramian, keep_state_unless, solve_dtype
from .._scale import jacobian_exponent, NARROW, root_sum_squares, scale_pow2
from .._weighting import AbstractStatefulWeighting, Reads


# Newton on the Nash bargaining equations: at most this many steps (a data-dependent
# while loop stops much earlier: typically 5 to 20 steps). Problems without a root
# (some v >= 0, v != 0 with J^T v = 0) never converge and are reported as failures.
_MAX_STEPS = 100
_HIGHEST = lax.Precision.HIGHEST


def _mv(matrix: Float[Array, "m m"], vector: Float[Array, " m"]) -> Float[Array, " m"]:
    return jnp.matmul(matrix, vector, precision=_HIGHEST)


class _NashMTLState(eqx.Module):
    step: Int[Array, ""]
    alpha: Float[Array, " m"]


# Jitted (inlined under an outer jit) so that eager calls do not re-trace and
# re-compile the loop on every call.
@eqx.filter_jit
def nash_root(
    gramian: Float[Array, "m m"],
) -> tuple[Float[Array, " m"], Bool[Array, ""]]:
    r"""The Nash bargaining weights: the root $\alpha > 0$ of
    $\alpha \odot G\alpha = 1$.

    Damped Newton on the strictly convex $f(\beta) = \tfrac12 \beta^\top \hat G \beta -
    \sum_i \log \beta_i$ with $\hat G = G / \|G\|_F$, then
    $\alpha = \beta / \sqrt{\|G\|_F}$ (scale-equivariant). Each step solves the
    well-conditioned system $(D \hat G D + I) y = 1 - \beta \odot \hat G \beta$ with
    $D = \operatorname{diag}(\beta)$ (Cholesky; eigenvalues $\geq 1$).

    Returns `(alpha, ok)`; `ok` is False when no root exists (some $v \geq 0$,
    $v \neq 0$ has $G v = 0$: a zero row, two opposite rows, ...), when $G$ is zero or
    not finite, or when Newton did not converge. Runs in `gramian`'s dtype.
    """
    m = gramian.shape[0]
    dtype = gramian.dtype
    eps = jnp.finfo(dtype).eps
    one = jnp.ones((), dtype)
    eye = jnp.eye(m, dtype=dtype)
    norm = jnp.linalg.norm(gramian)
    valid = jnp.isfinite(norm) & (norm > 0)
    safe_norm = jnp.where(valid, norm, one)
    g_hat = jnp.where(valid, gramian / safe_norm, eye)

    def objective(beta):
        return 0.5 * jnp.dot(beta, _mv(g_hat, beta)) - jnp.sum(jnp.log(beta))

    def newton_direction(beta):
        residual = beta * _mv(g_hat, beta) - one  # = D grad f
        hessian = beta[:, None] * g_hat * beta[None, :] + eye  # = D (hess f) D
        factor = jnp.linalg.cholesky(hessian)
        y = -lax.linalg.triangular_solve(
            factor,
            lax.linalg.triangular_solve(
                factor, residual[:, None], left_side=True, lower=True
            ),
            left_side=True,
            lower=True,
            transpose_a=True,
        )[:, 0]
        return y, -jnp.dot(residual, y)  # step in scaled variables, decrement^2

    def line_search(beta, y, lam2):
        # Largest step keeping beta > 0 (beta_new = beta * (1 + t y)).
        neg = y < 0
        limit = jnp.min(jnp.where(neg, -one / jnp.where(neg, y, -one), jnp.inf))
        t0 = jnp.minimum(one, 0.99 * limit)
        f0 = objective(beta)

        def cond(carry):
            t, k = carry
            good = objective(beta * (one + t * y)) <= f0 - 0.25 * t * lam2
            return ~good & (k < 60)  # NaN counts as not good

        def body(carry):
            t, k = carry
            return 0.5 * t, k + 1

        t, _ = lax.while_loop(cond, body, (t0, jnp.array(0)))
        # In the quadratic region (decrement < 1/4) the full step is feasible and
        # better than any line search limited by rounding.
        return jnp.where(lam2 < 0.0625, one, t)

    def cond(carry):
        _, lam2, step = carry
        return (lam2 > eps) & (step < _MAX_STEPS)  # NaN stops too

    def body(carry):
        beta, _, step = carry
        y, lam2 = newton_direction(beta)
        t = line_search(beta, y, lam2)
        return beta * (one + t * y), lam2, step + 1

    init = (jnp.ones((m,), dtype), jnp.array(jnp.finfo(dtype).max, dtype), jnp.array(0))
    beta, lam2, _ = lax.while_loop(cond, body, init)
    ok = (
        valid
        & (lam2 <= jnp.sqrt(eps))
        & jnp.all(jnp.isfinite(beta))
        & jnp.all(beta > 0)
    )
    return beta / jnp.sqrt(safe_norm), ok


def nash_mtl_update(
    gramian: Float[Array, "m m"], previous: Float[Array, " m"], k: ArrayLike = 0
) -> Float[Array, " m"]:
    """The (unclipped) weights of one NashMTL update from `previous`, as TorchJD, for
    the Gramian `gramian * 4^k` (whose Nash root is `2^-k` times that of `gramian`).

    When TorchJD's linearised subproblem is bounded and all its constraints are active
    at the Nash root (the usual case), its sequential convex procedure, solved exactly,
    reaches that root in its first step. It keeps `previous` when the step is below
    `1e-6`, when `||G_hat previous - 1/(previous + 1e-10)|| < 1e-3`
    (`G_hat = G / ||G||_F`), or when no root exists (solver failure): these three rules
    are reproduced. Not reproduced: TorchJD also keeps `previous` when its first
    subproblem is unbounded (possible when `G previous` has negative entries).
    """
    root, ok = nash_root(gramian)
    root = scale_pow2(root, -jnp.asarray(k, jnp.int32))
    norm = jnp.linalg.norm(gramian)
    g_hat = gramian / jnp.where(norm > 0, norm, jnp.ones_like(norm))
    tiny = jnp.asarray(1e-10, previous.dtype)
    settled = jnp.linalg.norm(_mv(g_hat, previous) - 1 / (previous + tiny)) < 1e-3
    small_step = jnp.linalg.norm(root - previous) < 1e-6
    return jnp.where(ok & ~settled & ~small_step, root, previous)


class _NashMTLWeighting(AbstractStatefulWeighting):
    """The stateful weighting of [`eqxjd.NashMTL`][] (reads the Jacobian)."""

    reads: ClassVar[Reads] = "matrix"

    differentiable: ClassVar[bool] = False
    n_tasks: int = eqx.field(static=True)
    max_norm: ScalarLike = 1.0
    update_weights_every: int = eqx.field(static=True, default=1)
    optim_niter: int = eqx.field(static=True, default=20)

    def __check_init__(self):
        for name in ("n_tasks", "update_weights_every", "optim_niter"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
        check_nonnegative(self.max_norm, "max_norm")

    def _check(self, jacobian: Float[Array, "m n"]) -> Array:
        jacobian = check_matrix(jacobian)
        if jacobian.shape[0] != self.n_tasks:
            raise ValueError(
                f"NashMTL was built with `n_tasks={self.n_tasks}` but the Jacobian has "
                f"{jacobian.shape[0]} rows; use `NashMTL(n_tasks={jacobian.shape[0]})`."
            )
        return jacobian

    def init(self, jacobian: Float[Array, "m n"], /) -> State:
        jacobian = self._check(jacobian)
        return _NashMTLState(
            step=jnp.array(0, jnp.int32),
            alpha=jnp.ones((self.n_tasks,), solve_dtype(jacobian.dtype)),
        )

    def __call__(
        self,
        jacobian: Float[Array, "m n"],
        state: State = None,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " m"], State]:
        require_state(state, "NashMTL", WEIGHTING_USAGE)
        jacobian = self._check(jacobian)
        dtype = solve_dtype(jacobian.dtype)
        if state.alpha.shape != (self.n_tasks,):
            raise ValueError(
                f"The state was built for {state.alpha.shape[0]} objectives, not "
                f"{self.n_tasks}; call `init` again."
            )
        jacobian = lax.stop_gradient(jacobian)
        previous = lax.stop_gradient(state.alpha).astype(dtype)
        # The Gramian of J / 2^k (k = 0 for ordinary Jacobians), whose root is 2^k
        # times that of J J^T: no overflow or underflow at any scale.
        work = jacobian.astype(dtype)
        k = jacobian_exponent([work], NARROW)
        g = gramian(scale_pow2(work, -k))

        def update(g, previous):
            return nash_mtl_update(g, previous, k)

        if self.update_weights_every == 1:
            alpha = update(g, previous)
        else:
            alpha = lax.cond(
                state.step % self.update_weights_every == 0,
                update,
                lambda _, prev: prev,
                g,
                previous,
            )
        new_state = _NashMTLState(step=state.step + 1, alpha=alpha)
        # A non-finite Jacobian is not a step: the state stays as it was.
        new_state = keep_state_unless(all_finite(jacobian), new_state, state)

        weights = alpha.astype(jacobian.dtype)
        max_norm = jnp.asarray(self.max_norm, jacobian.dtype)
        norm = root_sum_squares(combine(weights, jacobian))
        clip = (max_norm > 0) & (norm > max_norm)
        safe = jnp.where(clip, norm, jnp.ones_like(norm))
        weights = jnp.where(clip, (weights / safe) * max_norm, weights)
        return lax.stop_gradient(weights), new_state


_ARGS = """**Arguments:**

- `n_tasks`: the number of objectives $m$ (rows of the Jacobian), a positive integer.
    Calling with another number of rows raises `ValueError`.
- `max_norm`: if positive, the weights are rescaled so that $\\|J^\\top w\\| \\leq$
    `max_norm`. `0` disables the clipping. Default `1.0`.
- `update_weights_every`: the weights are recomputed on calls $0, k, 2k, \\dots$ and
    reused (then clipped against the current Jacobian) in between. Default `1`.
- `optim_niter`: the iteration budget of TorchJD's sequential convex procedure, kept
    for compatibility (validated, positive). eqxjd solves for the exact fixed point of
    that procedure with Newton's method, which TorchJD reaches in its first iteration,
    so the value does not change the result. Default `20`.
"""
_NashMTLWeighting.__init__.__doc__ = _ARGS


class NashMTL(AbstractStatefulWeightedAggregator):
    r"""Multi-Task Learning as a Bargaining Game (Nash-MTL).

    The weights are the Nash bargaining solution: the $\alpha > 0$ with

    $$\alpha_i \, (G\alpha)_i = 1 \quad \text{for all } i, \qquad G = J J^\top,$$

    i.e. $d = J^\top\alpha$ maximises $\sum_i \log(g_i^\top d)$ on a ball. It is solved
    exactly by Newton's method (in float64 when enabled), which is the fixed point of
    TorchJD's sequential convex procedure (cvxpy + ECOS). The weights are then scaled so
    that $\|J^\top \alpha\| \leq$ `max_norm`. Stateful: the previous weights (the
    fallback) and a step counter live in an explicit state.

    ```python
    aggregator = eqxjd.NashMTL(n_tasks=2)
    state = aggregator.init(jacobian)
    aggregation, state = aggregator(jacobian, state)
    ```

    Not differentiable (gradients through the output are zero).

    **Degenerate inputs.** When no root exists (some $v \geq 0$, $v \neq 0$ has
    $J^\top v = 0$, e.g. `[[0, 0], [0, 1]]` or opposite rows), TorchJD's solver fails
    and it keeps the previous weights (ones at first); eqxjd does the same, without a
    hang. A zero or non-finite Jacobian, where TorchJD raises, also keeps the previous
    weights (so $d = 0$ for a zero Jacobian; NaN only in NaN columns); a non-finite
    one leaves the state exactly as it was (step counter included). With `m = 1`
    (TorchJD raises), $\alpha = 1$ meets TorchJD's stopping rule and is kept, so
    $d = g$ clipped to `max_norm`.

    **Differences with TorchJD.** TorchJD's conic solver is inexact on badly scaled or
    ill-conditioned inputs: its weights agree with the exact solution to about `1e-7`
    for Jacobian entries of order $10^{-2}$ to $10^{2}$, to `1e-3` up to $10^{4}$, and
    fall back to ones below about $10^{-4}$; on ill-conditioned Gramians it may stop
    at an inaccurate point. eqxjd always returns the exact, scale-equivariant solution,
    at every scale (the Gramian is formed from $J$ rescaled by a power of 2, and the
    root scaled back).
    Two rarer behaviours of TorchJD's linearised procedure are not reproduced: when
    its first subproblem is unbounded (possible when $G\alpha_{prev}$ has negative
    entries, e.g. after an abrupt change of $J$) TorchJD keeps the previous weights,
    and when some constraint is inactive at its fixed point it converges elsewhere
    than the Nash root; eqxjd returns the Nash root in both cases.

    Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022,
    [arXiv:2202.01017](https://arxiv.org/abs/2202.01017), Algorithm 1.
    """

    weighting: _NashMTLWeighting

    def __init__(
        self,
        n_tasks: int,
        max_norm: ScalarLike = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
    ):
        self.weighting = _NashMTLWeighting(
            n_tasks, max_norm, update_weights_every, optim_niter
        )


NashMTL.__init__.__doc__ = _ARGS
