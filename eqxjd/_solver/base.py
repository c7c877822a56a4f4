import abc

import equinox as eqx
from jaxtyping import Array, Float

from .._results import RESULTS


class AbstractQPSolver(eqx.Module):
    r"""Base class for the batched dual-cone QP solvers.

    A solver receives one Gramian $\hat G$ and `k` lower bounds $u_1, \dots, u_k$ (the
    rows of an array of shape `(k, m)`), and returns the `k` solutions

    $$V_j = \operatorname{argmin}_{v \geq u_j} \tfrac12 v^\top \hat G v.$$

    **The contract.** Solvers only solve. [`eqxjd.DualConeProjector`][] does everything
    else once, before and after: TorchJD's normalisation and regularisation, the
    float64 solve dtype, non-finite input, Jacobi and lane scaling, the $m \leq 2$
    cases (closed form), singular Gramians, the KKT check, the mapping back and the
    derivative. A solver may therefore assume the canonical problem:

    - $\hat G$ is symmetric positive definite with unit diagonal, and $m \geq 3$. (A
      singular Gramian, possible with `reg_eps=0`, reaches solvers as a sequence of
      regularised ones: see the proximal-point note of [`eqxjd.DualConeProjector`][].)
    - Every lane has $\max_i |u_{j,i}| = 1$, so tolerances may be relative. A lane with
      $u_j \leq 0$ (whose solution is $0$) may occur; its output is ignored.

    It returns the solutions and an [`eqxjd.RESULTS`][]: `successful` when it stopped
    on its own optimality test (never on a step count alone),
    `max_steps_reached` when its budget ran out, and `kkt_check_failed` for a
    numerical breakdown. The driver then checks the relative KKT residual of every
    lane itself.
    """

    @abc.abstractmethod
    def solve(
        self, gramian: Float[Array, "m m"], lower: Float[Array, "k m"]
    ) -> tuple[Float[Array, "k m"], RESULTS]:
        """**Arguments:**

        - `gramian`: the canonical Gramian $\\hat G$ (positive definite, unit diagonal),
            shape `(m, m)`.
        - `lower`: the lower bounds, one QP per row, each with largest absolute entry
            1, shape `(k, m)`.

        **Returns:**

        A 2-tuple of the solutions (shape `(k, m)`) and an [`eqxjd.RESULTS`][].
        """
