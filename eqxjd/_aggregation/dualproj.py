from typing import ClassVar

import equinox as eqx
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._aggregator import AbstractWeightedAggregator
from .._checks import check_gramian, check_nonnegative
from .._custom_types import ScalarLike
from .._dual_cone import project_onto_dual_cone
from .._misc import as_vector, pref_weights
from .._solver.base import AbstractQPSolver, SolverName, to_solver
from .._weighting import AbstractWeighting, Reads
from .upgrad import _ARGS


class DualProjWeighting(AbstractWeighting):
    r"""The weighting of [`eqxjd.DualProj`][]:
    $w = \operatorname{argmin}_{v \geq p} v^\top G' v$.

    Lopez-Paz & Ranzato, *Gradient Episodic Memory for Continual Learning*, NeurIPS
    2017, [arXiv:1706.08840](https://arxiv.org/abs/1706.08840), Eq. 11.
    """

    reads: ClassVar[Reads] = "gramian"

    pref_vector: Float[Array, " m"] | None
    norm_eps: ScalarLike
    reg_eps: ScalarLike
    solver: AbstractQPSolver
    # An instance field shadowing the ABC's ClassVar: hence the hand-written __init__,
    # which keeps the arguments in this order.
    differentiable: bool = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        pref_vector: Float[ArrayLike, " m"] | None = None,
        norm_eps: ScalarLike = 1e-4,
        reg_eps: ScalarLike = 1e-4,
        solver: SolverName | AbstractQPSolver = "bpp",
        differentiable: bool = False,
        throw: bool = True,
    ):
        self.pref_vector = as_vector(pref_vector, "pref_vector")
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps
        self.solver = to_solver(solver)
        self.differentiable = differentiable
        self.throw = throw

    def __check_init__(self):
        check_nonnegative(self.norm_eps, "norm_eps")
        check_nonnegative(self.reg_eps, "reg_eps")

    def __call__(
        self, gramian: Float[Array, "m m"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        check_gramian(gramian)
        m = gramian.shape[0]
        pref = pref_weights(self.pref_vector, m, gramian.dtype)
        if m == 0:
            return pref
        (weights,) = project_onto_dual_cone(
            gramian,
            pref[None],
            solver=self.solver,
            norm_eps=self.norm_eps,
            reg_eps=self.reg_eps,
            differentiable=self.differentiable,
            throw=self.throw,
        )
        return weights


DualProjWeighting.__init__.__doc__ = _ARGS


class DualProj(AbstractWeightedAggregator):
    r"""Projection of the preference-weighted mean onto the dual cone.

    $$A(J) = \pi_J(J^\top p), \qquad \pi_J(x) = \operatorname{argmin}_{y : J y \geq 0}
    \|y - x\|^2.$$

    Non-conflicting ($J A(J) \geq 0$) and permutation invariant; equal to the weighted
    mean when that already conflicts with no objective. One QP, solved from the Gramian.

    Lopez-Paz & Ranzato, *Gradient Episodic Memory for Continual Learning*, NeurIPS
    2017, [arXiv:1706.08840](https://arxiv.org/abs/1706.08840), Eq. 11.
    """

    weighting: DualProjWeighting

    def __init__(
        self,
        pref_vector: Float[ArrayLike, " m"] | None = None,
        norm_eps: ScalarLike = 1e-4,
        reg_eps: ScalarLike = 1e-4,
        solver: SolverName | AbstractQPSolver = "bpp",
        differentiable: bool = False,
        throw: bool = True,
    ):
        self.weighting = DualProjWeighting(
            pref_vector, norm_eps, reg_eps, solver, differentiable, throw
        )


DualProj.__init__.__doc__ = _ARGS
