import abc
from collections.abc import Callable
from typing import Literal

import equinox as eqx
from jaxtyping import Array, Float

from .._results import RESULTS


class AbstractQPSolver(eqx.Module):
    r"""Base class for the batched dual-cone QP solvers.

    A solver receives one Gramian $\hat G$ (shape `(m, m)`, symmetric positive
    semi-definite) and `k` lower bounds $u_1, \dots, u_k$ (rows of an array of shape
    `(k, m)`), and returns the `k` solutions

    $$V_j = \operatorname{argmin}_{v \geq u_j} \tfrac12 v^\top \hat G v.$$

    The caller ([`eqxjd.project_onto_dual_cone`][]) has already normalised, regularised
    and rescaled the problem: $\hat G$ has unit mean diagonal and every $u_j$ has
    $\max_i |u_{j,i}| = 1$, so solvers may use relative tolerances. Solvers must be
    exact: they stop on a KKT residual, never on a fixed step count alone, and report
    the outcome as an [`eqxjd.RESULTS`][].
    """

    @abc.abstractmethod
    def solve(
        self, gramian: Float[Array, "m m"], lower: Float[Array, "k m"]
    ) -> tuple[Float[Array, "k m"], RESULTS]:
        """**Arguments:**

        - `gramian`: the scaled Gramian, shape `(m, m)`.
        - `lower`: the lower bounds, one QP per row, shape `(k, m)`.

        **Returns:**

        A 2-tuple of the solutions (shape `(k, m)`) and a [`eqxjd.RESULTS`][].
        """


SolverName = Literal["bpp", "nesterov_pgd", "qpax"]
_SOLVERS: dict[str, Callable[[], AbstractQPSolver]] = {}


def register_solver(name: str, factory: Callable[[], AbstractQPSolver]) -> None:
    _SOLVERS[name] = factory


def to_solver(solver: SolverName | AbstractQPSolver) -> AbstractQPSolver:
    """Converter for `solver=` fields: a name or a solver instance (passed through)."""
    if isinstance(solver, AbstractQPSolver):
        return solver
    if solver not in _SOLVERS:
        raise ValueError(
            f"Unknown solver {solver!r}; use one of {sorted(_SOLVERS)} or an "
            "AbstractQPSolver instance such as eqxjd.BPP()."
        )
    return _SOLVERS[solver]()
