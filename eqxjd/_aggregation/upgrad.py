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


def no_objectives(weights: Float[Array, " 0"]) -> DualConeSolution:
    """The solution of a weighting for m = 0: no QP to solve."""
    return DualConeSolution(weights, RESULTS.successful, jnp.zeros((0,), weights.dtype))


class UPGradWeighting(AbstractWeighting):
    r"""The weighting of [`eqxjd.UPGrad`][]: $w = \sum_i \max(p_i, 0) V_i$ with
    $V_i = \operatorname{argmin}_{v \geq e_i} v^\top G' v$.

    Each row $p_i g_i$ of the (preference-scaled) Jacobian is projected onto the dual
    cone of the rows; the weights of the projections are summed. Negative preferences
    contribute nothing (the projection of $p_i g_i$ with $p_i \leq 0$ is $0$). The $m$
    QPs are solved by `projector` as one batch; see [`eqxjd.DualConeProjector`][],
    also for the guarantee that the regularisation leaves.

    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024,
    [arXiv:2406.16232](https://arxiv.org/abs/2406.16232).
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
        lanes = self.projector(gramian, jnp.eye(m, dtype=gramian.dtype))
        return _combine(pref, lanes)

    def solve(self, gramian: Float[Array, "m m"], /) -> DualConeSolution:
        """The weights with the outcome of the solve, never raising (also with
        `throw=False`, to see whether a solve failed).

        **Arguments:**

        - `gramian`: $G = J J^\\top$, an array of shape `(m, m)`.

        **Returns:**

        An [`eqxjd.DualConeSolution`][] whose `value` holds the weights, shape `(m,)`,
        and whose `residual` holds the KKT residual of each of the $m$ QPs.
        """
        check_gramian(gramian)
        m = gramian.shape[0]
        pref = pref_weights(self.pref_vector, m, gramian.dtype)
        if m == 0:
            return no_objectives(pref)
        solution = self.projector.solve(gramian, jnp.eye(m, dtype=gramian.dtype))
        weights = _combine(pref, solution.value)
        return DualConeSolution(weights, solution.result, solution.residual)


def _combine(
    pref: Float[Array, " m"], lanes: Float[Array, "m m"]
) -> Float[Array, " m"]:
    # Homogeneity: lane p_i e_i has solution p_i V_i for p_i >= 0, and 0 otherwise.
    return jnp.maximum(pref, 0) @ lanes


_ARGS = """**Arguments:**

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
UPGradWeighting.__init__.__doc__ = _ARGS


class UPGrad(AbstractWeightedAggregator):
    r"""Unconflicting Projection of Gradients.

    $$A(J) = \sum_i \pi_J(p_i g_i), \qquad \pi_J(x) = \operatorname{argmin}_{y : J y
    \geq 0} \|y - x\|^2,$$

    each row $g_i$ of $J$ (scaled by its preference $p_i$) is projected onto the dual
    cone of the rows, and the projections are summed. It is permutation invariant and
    linear under row scaling, and it conflicts with no objective: with TorchJD's
    regularisation (the default) $(J A(J))_j \geq -\epsilon_{reg}
    \operatorname{tr}(J J^\top) w_j$, which lets a small gradient next to large ones be
    slightly conflicted; `projector=eqxjd.DualConeProjector(norm_eps=0.0,
    reg_eps=0.0)` makes $J A(J) \geq 0$ strict (see [`eqxjd.DualConeProjector`][]).
    Computed from the Gramian with $m$ QPs solved as one batch.

    !!! Example

        ```python
        import jax.numpy as jnp
        import eqxjd

        J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        eqxjd.UPGrad()(J)  # [0.2929, 1.9004, 1.9004]
        eqxjd.UPGrad(solver="nesterov_pgd")(J)  # another solver, same answer
        ```

    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024,
    [arXiv:2406.16232](https://arxiv.org/abs/2406.16232).
    """

    weighting: UPGradWeighting

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
        self.weighting = UPGradWeighting(
            pref_vector,
            projector,
            solver=solver,
            norm_eps=norm_eps,
            reg_eps=reg_eps,
            differentiable=differentiable,
            throw=throw,
        )


UPGrad.__init__.__doc__ = _ARGS
