from typing import ClassVar

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
from .._solver import AbstractQPSolver
from .._weighting import AbstractWeighting, Reads
from .upgrad import _ARGS, no_objectives


class DualProjWeighting(AbstractWeighting):
    r"""The weighting of [`eqxjd.DualProj`][]:
    $w = \operatorname{argmin}_{v \geq p} v^\top G' v$, one QP solved by `projector`
    (see [`eqxjd.DualConeProjector`][]).

    Lopez-Paz & Ranzato, *Gradient Episodic Memory for Continual Learning*, NeurIPS
    2017, [arXiv:1706.08840](https://arxiv.org/abs/1706.08840), Eq. 11.
    """

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

    def __call__(
        self, gramian: Float[Array, "m m"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        check_gramian(gramian)
        m = gramian.shape[0]
        pref = pref_weights(self.pref_vector, m, gramian.dtype)
        if m == 0:
            return pref
        return self.projector(gramian, pref[None])[0]

    def solve(self, gramian: Float[Array, "m m"], /) -> DualConeSolution:
        """The weights with the outcome of the solve, never raising (also with
        `throw=False`, to see whether a solve failed).

        **Arguments:**

        - `gramian`: $G = J J^\\top$, an array of shape `(m, m)`.

        **Returns:**

        An [`eqxjd.DualConeSolution`][] whose `value` holds the weights, shape `(m,)`,
        and whose `residual` holds the KKT residual of the QP, shape `(1,)`.
        """
        check_gramian(gramian)
        m = gramian.shape[0]
        pref = pref_weights(self.pref_vector, m, gramian.dtype)
        if m == 0:
            return no_objectives(pref)
        solution = self.projector.solve(gramian, pref[None])
        return DualConeSolution(solution.value[0], solution.result, solution.residual)


DualProjWeighting.__init__.__doc__ = _ARGS


class DualProj(AbstractWeightedAggregator):
    r"""Projection of the preference-weighted mean onto the dual cone.

    $$A(J) = \pi_J(J^\top p), \qquad \pi_J(x) = \operatorname{argmin}_{y : J y \geq 0}
    \|y - x\|^2.$$

    Permutation invariant, equal to the weighted mean when that already conflicts with
    no objective, and non-conflicting: with TorchJD's regularisation (the default)
    $(J A(J))_j \geq -\epsilon_{reg} \operatorname{tr}(J J^\top) w_j$;
    `projector=eqxjd.DualConeProjector(norm_eps=0.0, reg_eps=0.0)` makes
    $J A(J) \geq 0$ strict (see [`eqxjd.DualConeProjector`][]). One QP, solved from
    the Gramian.

    Lopez-Paz & Ranzato, *Gradient Episodic Memory for Continual Learning*, NeurIPS
    2017, [arXiv:1706.08840](https://arxiv.org/abs/1706.08840), Eq. 11.
    """

    weighting: DualProjWeighting

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
        self.weighting = DualProjWeighting(
            pref_vector,
            projector,
            solver=solver,
            norm_eps=norm_eps,
            reg_eps=reg_eps,
            differentiable=differentiable,
            throw=throw,
        )


DualProj.__init__.__doc__ = _ARGS
