from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._aggregator import AbstractWeightedAggregator
from .._checks import check_gramian, check_nonnegative
from .._custom_types import ScalarLike
from .._dual_cone import project_onto_dual_cone
from .._misc import as_vector, pref_weights
from .._solver.base import AbstractQPSolver, SolverName, to_solver
from .._weighting import AbstractWeighting, Reads


class UPGradWeighting(AbstractWeighting):
    r"""The weighting of [`eqxjd.UPGrad`][]: $w = \sum_i p_i V_i$ with
    $V_i = \operatorname{argmin}_{v \geq e_i} v^\top G' v$.

    Each row $p_i g_i$ of the (preference-scaled) Jacobian is projected onto the dual
    cone of the rows; the weights of the projections are summed. Negative preferences
    contribute nothing (the projection of $p_i g_i$ with $p_i \leq 0$ is $0$).

    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024,
    [arXiv:2406.16232](https://arxiv.org/abs/2406.16232).
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
        lanes = project_onto_dual_cone(
            gramian,
            jnp.eye(m, dtype=gramian.dtype),
            solver=self.solver,
            norm_eps=self.norm_eps,
            reg_eps=self.reg_eps,
            differentiable=self.differentiable,
            throw=self.throw,
        )
        # Homogeneity: lane p_i e_i has solution p_i V_i for p_i >= 0, and 0 otherwise.
        return jnp.maximum(pref, 0) @ lanes


_ARGS = """**Arguments:**

- `pref_vector`: the preference vector $p$, shape `(m,)`; `None` means $1/m$ each.
- `norm_eps`: $G$ is replaced by $G / \\operatorname{tr} G$, or by $0$ when
    $\\operatorname{tr} G$ < `norm_eps` (TorchJD's absolute threshold). Default `1e-4`.
- `reg_eps`: ridge added to the normalised Gramian. Default `1e-4`. `0` is allowed:
    the projection is then exactly non-conflicting even on rank-deficient Jacobians.
- `solver`: the QP solver, a name (`"bpp"`, `"nesterov_pgd"`, `"qpax"`) or an
    [`eqxjd.AbstractQPSolver`][] instance carrying its own knobs. Default `"bpp"`.
- `differentiable`: if `False` (default, as TorchJD), gradients through the output are
    stopped (zero, never wrong). If `True`, they are the exact derivative of the QP
    solution, by implicit differentiation on the identified free set.
- `throw`: if `True` (default), a failed solve raises `eqx.EquinoxRuntimeError` (under
    `jit` too; see `EQX_ON_ERROR`). If `False`, the unchecked result is returned.
"""
UPGradWeighting.__init__.__doc__ = _ARGS


class UPGrad(AbstractWeightedAggregator):
    r"""Unconflicting Projection of Gradients.

    $$A(J) = \sum_i \pi_J(p_i g_i), \qquad \pi_J(x) = \operatorname{argmin}_{y : J y
    \geq 0} \|y - x\|^2,$$

    each row $g_i$ of $J$ (scaled by its preference $p_i$) is projected onto the dual
    cone of the rows, and the projections are summed. The result never conflicts with
    any objective ($J A(J) \geq 0$), is invariant to row permutations and linear under
    row scaling. Computed from the Gramian with $m$ QPs solved as one batch.

    !!! Example

        ```python
        import jax.numpy as jnp
        import eqxjd

        J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        eqxjd.UPGrad()(J)  # [0.2929, 1.9004, 1.9004]
        ```

    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024,
    [arXiv:2406.16232](https://arxiv.org/abs/2406.16232).
    """

    weighting: UPGradWeighting

    def __init__(
        self,
        pref_vector: Float[ArrayLike, " m"] | None = None,
        norm_eps: ScalarLike = 1e-4,
        reg_eps: ScalarLike = 1e-4,
        solver: SolverName | AbstractQPSolver = "bpp",
        differentiable: bool = False,
        throw: bool = True,
    ):
        self.weighting = UPGradWeighting(
            pref_vector, norm_eps, reg_eps, solver, differentiable, throw
        )


UPGrad.__init__.__doc__ = _ARGS
