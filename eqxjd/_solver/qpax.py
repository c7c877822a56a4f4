from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .. import _linalg as linalg
from .._custom_types import ScalarLike
from .._results import RESULTS
from .base import AbstractQPSolver
from .bpp import block_pivoting
from .common import natural_residual


class QPax(AbstractQPSolver):
    r"""The primal-dual interior-point solver of [qpax](https://github.com/kevin-tracy/qpax),
    vmapped over lanes, followed by an exact polishing step.

    Each lane solves $\min \frac12 \hat v^\top \hat G \hat v$ s.t.
    $-\hat v \leq -\hat u$. qpax clamps its slacks and
    multipliers at $\sqrt{\epsilon}$, so it cannot reach a tight absolute tolerance;
    it is stopped at a moderate `solver_tol` and its free set
    $\{\hat v - \hat u > \lambda\}$ is then solved exactly (one masked Cholesky per
    lane, plus at most `polish_steps` block principal pivots if the free set was
    wrong). The polished solution is accepted if
    its relative KKT residual passes; otherwise the result is
    `RESULTS.max_steps_reached` (or `RESULTS.kkt_check_failed` if qpax itself
    reported convergence). Under `vmap` every lane runs until the slowest stops,
    and every lane factors its own KKT matrix at every iteration, so this solver is slow
    for large $m$; it is provided as an independent cross-check of [`eqxjd.BPP`][].

    Tracy & Manchester, *On the differentiability of the primal-dual interior-point
    method*, 2024, [arXiv:2406.11749](https://arxiv.org/abs/2406.11749).
    """

    solver_tol: ScalarLike | None = None
    max_iter: int = eqx.field(default=50, static=True)
    backend: Literal["e", "i"] = eqx.field(default="e", static=True)
    rtol: ScalarLike | None = None
    polish_steps: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        if self.polish_steps is not None and self.polish_steps < 0:
            raise ValueError(
                f"`polish_steps` must be non-negative; got {self.polish_steps}."
            )
        if self.max_iter < 1:
            raise ValueError(f"`max_iter` must be at least 1; got {self.max_iter}.")
        if self.backend not in ("e", "i"):
            raise ValueError(f"`backend` must be 'e' or 'i'; got {self.backend!r}.")

    def solve(
        self, gramian: Float[Array, "m m"], lower: Float[Array, "k m"]
    ) -> tuple[Float[Array, "k m"], RESULTS]:
        import qpax

        k, m = lower.shape
        g, u = gramian, lower
        dtype = g.dtype
        f64 = dtype == jnp.float64
        if self.solver_tol is None:
            # Above qpax's complementarity floor (slack and multiplier >= sqrt(eps)).
            solver_tol = 1e-7 if f64 else 1e-3
        else:
            solver_tol = self.solver_tol
        if self.rtol is None:
            rtol = jnp.asarray(1e-10 if f64 else 1e-5, dtype)
        else:
            rtol = jnp.asarray(self.rtol, dtype)
        eye = jnp.eye(m, dtype=dtype)
        q = jnp.zeros(m, dtype)
        a = jnp.zeros((0, m), dtype)
        b = jnp.zeros((0,), dtype)

        def one_lane(lane):
            x, _, z, _, converged, _ = qpax.solve_qp(
                g,
                q,
                a,
                b,
                -eye,
                -lane,
                solver_tol=solver_tol,
                max_iter=self.max_iter,
                backend=self.backend,
            )
            return x, z, converged

        # qpax relies on implicit promotion; keep it working under strict settings.
        with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
            x, z, converged = linalg.map_lanes(one_lane, u)
        # Complementarity: a coordinate is free when its slack exceeds its multiplier.
        # Polishing is block principal pivoting warm-started at qpax's free set: zero
        # pivots when qpax identified it, a few exact exchanges otherwise.
        free = (x - u) > z
        polish_steps = 10 * m + 10 if self.polish_steps is None else self.polish_steps
        solution, finished, broken = block_pivoting(g, u, free, polish_steps)
        ok = jnp.all(natural_residual(g, u, solution) <= rtol) & finished & ~broken
        failure = RESULTS.where(
            jnp.all(converged == 1), RESULTS.kkt_check_failed, RESULTS.max_steps_reached
        )
        result = RESULTS.where(ok, RESULTS.successful, failure)
        finite = jnp.all(jnp.isfinite(solution))
        result = RESULTS.where(finite, result, RESULTS.kkt_check_failed)
        return solution, result


QPax.__init__.__doc__ = """**Arguments:**

- `solver_tol`: qpax's absolute stopping tolerance on the rescaled problem. `None`
    (default) means `1e-7` in float64 and `1e-3` in float32 (qpax cannot go much lower).
- `max_iter`: qpax's maximum number of interior-point iterations (static). Default `50`.
- `backend`: qpax's backend, `"e"` (explicit predictor-corrector, default) or `"i"`.
- `rtol`: acceptance bound on the relative KKT residual of the polished solution.
    `None` (default) means `1e-10` in float64 and `1e-5` in float32.
- `polish_steps`: the maximum number of block-pivoting steps of the polish (static).
    `None` (default) means $10m + 10$, so the polish always finishes (usually after 0
    steps); `0` accepts qpax's free set only if it passes the KKT check.
"""
