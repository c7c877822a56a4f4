import abc
from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._aggregator import AbstractWeightedAggregator
from .._checks import check_gramian
from .._custom_types import ScalarLike
from .._misc import as_vector, pref_weights
from .._projector import (
    DualConeProjector,
    DualConeSolution,
    projector_from,
    SolverName,
)
from .._results import RESULTS
from .._solver import AbstractQPSolver
from .._weighting import AbstractWeighting, Reads


class AbstractDualConeWeighting(AbstractWeighting):
    """Weights from projections onto the dual cone of the rows (UPGrad, DualProj): a
    preference vector, the projector that solves the QPs, and what a subclass says:
    the lower bounds of its QPs and how their solutions make the weights."""

    reads: ClassVar[Reads] = "gramian"

    pref_vector: Float[Array, " m"] | None
    projector: DualConeProjector

    def __init__(
        self,
        pref_vector: Float[ArrayLike, " m"] | None = None,
        projector: DualConeProjector | None = None,
        *,
        solver: SolverName | AbstractQPSolver | None = None,
        norm_eps: ScalarLike | None = None,
        reg_eps: ScalarLike | None = None,
        differentiable: bool | None = None,
        throw: bool | None = None,
    ):
        self.pref_vector = as_vector(pref_vector, "pref_vector")
        self.projector = projector_from(
            projector,
            solver=solver,
            norm_eps=norm_eps,
            reg_eps=reg_eps,
            differentiable=differentiable,
            throw=throw,
        )

    @property
    def differentiable(self) -> bool:
        return self.projector.differentiable

    @abc.abstractmethod
    def lower_bounds(self, pref: Float[Array, " m"]) -> Float[Array, "k m"]:
        """The lower bounds $u_j$ of the QPs, one row each."""

    @abc.abstractmethod
    def combine(
        self, pref: Float[Array, " m"], solutions: Float[Array, "k m"]
    ) -> Float[Array, " m"]:
        """The weights from the solutions of the QPs."""

    def __call__(
        self, gramian: Float[Array, "m m"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        check_gramian(gramian)
        pref = pref_weights(self.pref_vector, gramian.shape[0], gramian.dtype)
        if gramian.shape[0] == 0:
            return pref
        return self.combine(pref, self.projector(gramian, self.lower_bounds(pref)))

    def solve(self, gramian: Float[Array, "m m"], /) -> DualConeSolution:
        """The weights with the outcome of the solve, never raising (also with
        `throw=False`, to see whether a solve failed).

        **Arguments:**

        - `gramian`: $G = J J^\\top$, an array of shape `(m, m)`.

        **Returns:**

        An [`eqxjd.DualConeSolution`][] whose `value` holds the weights, shape `(m,)`,
        and whose `residual` holds the KKT residual of each QP.
        """
        check_gramian(gramian)
        pref = pref_weights(self.pref_vector, gramian.shape[0], gramian.dtype)
        if gramian.shape[0] == 0:
            empty = jnp.zeros((0,), gramian.dtype)
            return DualConeSolution(pref, RESULTS.successful, empty)
        solution = self.projector.solve(gramian, self.lower_bounds(pref))
        weights = self.combine(pref, solution.value)
        return DualConeSolution(weights, solution.result, solution.residual)


class AbstractDualConeAggregator(AbstractWeightedAggregator):
    """`w^T J` with the weights of an `AbstractDualConeWeighting` (UPGrad, DualProj),
    built from the same arguments."""

    weighting_type: ClassVar[type[AbstractDualConeWeighting]]
    weighting: AbstractDualConeWeighting

    def __init__(
        self,
        pref_vector: Float[ArrayLike, " m"] | None = None,
        projector: DualConeProjector | None = None,
        *,
        solver: SolverName | AbstractQPSolver | None = None,
        norm_eps: ScalarLike | None = None,
        reg_eps: ScalarLike | None = None,
        differentiable: bool | None = None,
        throw: bool | None = None,
    ):
        self.weighting = self.weighting_type(
            pref_vector,
            projector,
            solver=solver,
            norm_eps=norm_eps,
            reg_eps=reg_eps,
            differentiable=differentiable,
            throw=throw,
        )


ARGS = """**Arguments:**

- `pref_vector`: the preference vector $p$, shape `(m,)`; `None` means $1/m$ each.
- `projector`: the [`eqxjd.DualConeProjector`][] that solves the QPs, with its solver,
    TorchJD's `norm_eps` and `reg_eps` (default `1e-4` each), `differentiable` and
    `throw`. `None` (default) means `DualConeProjector()`, or one built from the
    keyword arguments below. As TorchJD's `projector=QuadprogProjector(norm_eps,
    reg_eps)`.
- `solver`, `norm_eps`, `reg_eps`, `differentiable`, `throw`: shortcuts (keyword
    only) for `projector=DualConeProjector(solver=..., norm_eps=..., ...)`, e.g.
    `solver="nesterov_pgd"` or `reg_eps=0.0`; see [`eqxjd.DualConeProjector`][] for
    their meaning and defaults. Passing any of them together with `projector` raises a
    `ValueError`.
"""
AbstractDualConeWeighting.__init__.__doc__ = ARGS
AbstractDualConeAggregator.__init__.__doc__ = ARGS
