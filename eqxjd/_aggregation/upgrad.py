from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float

from .dual_cone import AbstractDualConeAggregator, AbstractDualConeWeighting


class UPGradWeighting(AbstractDualConeWeighting):
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

    # The shared constructor, declared here so that type checkers do not synthesise a
    # dataclass one from the fields.
    __init__ = AbstractDualConeWeighting.__init__

    def lower_bounds(self, pref: Float[Array, " m"]) -> Float[Array, "m m"]:
        return jnp.eye(pref.shape[0], dtype=pref.dtype)

    def combine(
        self, pref: Float[Array, " m"], solutions: Float[Array, "m m"]
    ) -> Float[Array, " m"]:
        # Homogeneity: lane p_i e_i has solution p_i V_i for p_i >= 0, and 0 otherwise.
        return jnp.maximum(pref, 0) @ solutions


class UPGrad(AbstractDualConeAggregator):
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

    weighting_type: ClassVar[type[AbstractDualConeWeighting]] = UPGradWeighting
    weighting: UPGradWeighting

    __init__ = AbstractDualConeAggregator.__init__
